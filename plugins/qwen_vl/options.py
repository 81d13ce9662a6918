"""Options of the Qwen2.5-VL rewriter and judge: one model serves both, so both take the same."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from plugins.icedit.options import Dtype


class QwenVlOptions(BaseModel):
    """Which Qwen2.5-VL loads, where, and how much of an image and an answer it takes."""

    model_config = ConfigDict(extra="forbid")

    vlm: str = Field(
        "Qwen/Qwen2.5-VL-7B-Instruct",
        description="Qwen2.5-VL hub id or local folder for the rewriter and judge ('none': no VLM)",
    )
    vlm_revision: str | None = Field(None, description="pin the VLM's hub revision")
    vlm_device: str | None = Field(None, description="device of the VLM (default: cuda when available)")
    vlm_dtype: Dtype | None = Field(
        None, description="the VLM's dtype (default: bfloat16 on CUDA, else float32)"
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = Field(
        None, description="the VLM's attention kernel (default: transformers' choice)"
    )
    min_pixels: int = Field(256 * 28 * 28, ge=28 * 28, description="smallest image the VLM sees, in pixels")
    max_pixels: int = Field(1024 * 28 * 28, ge=28 * 28, description="largest image the VLM sees, in pixels")
    vlm_max_new_tokens: int = Field(
        1024,
        ge=1,
        le=4096,
        description="longest answer the VLM rewriter may give (a plan under the grammar ends well within it)",
    )
    vlm_grammar: bool = Field(
        True,
        description="write the rewriter's plan under its JSON schema (constrained decoding); off: free "
        "text, parsed, retried once, then the rules",
    )

    @model_validator(mode="after")
    def _ordered(self) -> QwenVlOptions:
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) is above max_pixels ({self.max_pixels})")
        return self
