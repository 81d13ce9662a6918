"""Settings shared by the CLI, the chat and replay; each can be set by an ICEDIT_* variable."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from assistant.models import CandidateCount, EarlySteps, Guidance, Steps


def _default_home() -> Path:
    return platformdirs.user_data_path("icedit-assistant")


class Settings(BaseSettings):
    """Everything a plugin factory may read. Plugins get this object, never the CLI's flags."""

    model_config = SettingsConfigDict(env_prefix="ICEDIT_", extra="ignore", env_nested_delimiter="__")

    home: Path = Field(default_factory=_default_home, description="folder of the session store")
    engine: str = "icedit"
    rewriter: str | None = Field(
        None, description="rewriter plugin (default: qwen_vl with real weights, rules with random ones)"
    )
    preset: str = Field("default", description="engine preset: 'default' (real weights) or 'tiny'")
    model: str | None = Field(
        None, description="the engine's model: hub id or local folder (overrides the preset)"
    )
    lora: str | None = Field(None, description="LoRA hub id or path (overrides the preset); 'none' for none")
    revision: str | None = Field(None, description="hub revision (commit, tag, branch) of the engine's model")
    lora_revision: str | None = Field(None, description="hub revision of the LoRA")
    lora_weight_name: str | None = Field(
        None,
        description="the adapter's file in its repo or folder (default pytorch_lora_weights.safetensors)",
    )
    vlm_revision: str | None = Field(None, description="hub revision of the VLM")
    lora_scale: float = Field(1.0, ge=0, le=4, description="strength of the adapter (1 = as trained)")
    top_k: int = Field(1, ge=1, le=64, description="experts per token for a LoRA-MoE adapter (published: 1)")
    device: str | None = Field(None, description="cuda, cpu, ... (default: cuda when available)")
    compile: bool = Field(
        False, description="torch.compile the transformer (once per shape; pays off on GPUs)"
    )
    quantize: Literal["none", "int8", "fp8"] = Field(
        "none",
        description="weight-only quantized transformer (torchao; fp8 needs a CUDA GPU of compute 8.9+)",
    )
    offload: Literal["none", "encoders", "model", "sequential"] = Field(
        "none",
        description="encoders: prompt encoders stay on the CPU, the rest on the GPU (~24 GB, no per-edit transfers); "
        "model / sequential: diffusers CPU offload (model ~24 GB; sequential least memory, slowest)",
    )
    dtype: Literal["bfloat16", "float16", "float32"] | None = None
    judge: str = Field("qwen_vl", description="judge plugin for the early filter")
    vlm: str = Field(
        "Qwen/Qwen2.5-VL-7B-Instruct", description="Qwen2.5-VL hub id or local folder ('none': no VLM)"
    )
    vlm_device: str | None = Field(None, description="device of the VLM (default: cuda when available)")
    vlm_dtype: Literal["bfloat16", "float16", "float32"] | None = None
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = None
    min_pixels: int = Field(256 * 28 * 28, ge=28 * 28, description="smallest image the VLM sees, in pixels")
    max_pixels: int = Field(1024 * 28 * 28, ge=28 * 28, description="largest image the VLM sees, in pixels")
    vlm_max_new_tokens: int = Field(
        256, ge=1, le=4096, description="longest answer the VLM rewriter may give"
    )
    candidates: CandidateCount = Field(1, description="early filter: noises tried per edit (1 = off)")
    early_steps: EarlySteps = Field(4, description="early filter: steps each candidate runs before judging")
    clip_model: str | None = Field(
        None,
        description="CLIP for icedit eval: hub id or folder (default openai/clip-vit-base-patch32; random with tiny)",
    )
    dino_model: str | None = Field(
        None,
        description="DINO ViT for icedit eval: hub id or folder (default facebook/dino-vits16; random with tiny)",
    )
    options: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="plugins' own options, KEY or NAME.KEY -> value (--option, ICEDIT_OPTIONS__KEY, ICEDIT_OPTIONS)",
    )
    steps: Steps = 28
    guidance: Guidance = 50.0

    @field_validator("home", mode="before")
    @classmethod
    def _a_folder(cls, value: object) -> object:
        """ICEDIT_HOME set but empty would put the store in whatever folder the command runs in."""
        if isinstance(value, str | Path) and not str(value).strip():
            raise ValueError(
                "ICEDIT_HOME is set but empty: unset it, or give the folder for the session store"
            )
        return value

    @property
    def store_path(self) -> Path:
        return self.home / "sessions.sqlite3"
