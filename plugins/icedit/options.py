"""The icedit engine's options (`--preset`, `--lora`, ...): its spec declares them, the host fills them
from flags, `--option`, ICEDIT_* variables, and hands them to the factory; nothing else reads them.

`FluxOptions` is what any FLUX pipeline here takes (kontext's options extend it too)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Dtype = Literal["bfloat16", "float16", "float32"]


class FluxOptions(BaseModel):
    """Which FLUX weights and adapter load, and where they run."""

    model_config = ConfigDict(extra="forbid")  # the host passes only declared keys; a typo here fails

    preset: str = Field(
        "default",
        description="engine preset: default (real weights), tiny (random, offline), toy (trained on shapes, "
        "offline); icedit also moe (+ LoRA-MoE)",
    )
    model: str | None = Field(
        None, description="the engine's model: hub id or local folder (overrides the preset)"
    )
    revision: str | None = Field(None, description="pin the model's hub revision (commit, tag or branch)")
    lora: str | None = Field(None, description="LoRA hub id or path (overrides the preset); 'none' for none")
    lora_revision: str | None = Field(None, description="pin the LoRA's hub revision")
    lora_weight_name: str | None = Field(
        None, description="the adapter's file in its repo or folder (pytorch_lora_weights.safetensors)"
    )
    lora_scale: float = Field(1.0, ge=0, le=4, description="adapter strength, 1 as trained")
    device: str | None = Field(None, description="torch device (default: cuda when available, else cpu)")
    dtype: Dtype | None = Field(None, description="weights' dtype (default: bfloat16 on CUDA, else float32)")
    compile: bool = Field(
        False, description="torch.compile the transformer (once per shape; pays off on GPUs)"
    )
    quantize: Literal["none", "int8", "fp8"] = Field(
        "none",
        description="weight-only quantized transformer (torchao; fp8 needs a CUDA GPU of compute 8.9+)",
    )
    offload: Literal["none", "encoders", "model", "sequential"] = Field(
        "none",
        description="memory modes for small GPUs: encoders (prompt encoders on the CPU, ~24 GB), model "
        "(diffusers model offload, ~24 GB), sequential (least memory, slowest); see README",
    )


class IceditOptions(FluxOptions):
    """FLUX.1 Fill with the ICEdit adapter."""

    top_k: int | None = Field(
        None,
        ge=1,
        le=64,
        description="experts per token of a LoRA-MoE adapter (default: as trained; 1 for the published one)",
    )
