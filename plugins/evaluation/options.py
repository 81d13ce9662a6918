"""Options of the MagicBrush scorer: which CLIP and DINO ViT it measures with, and where they run
(`icedit eval` sets `device` per process)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class FeatureOptions(BaseModel):
    """The feature models; neither named with an engine of random weights (a tiny preset): random ones."""

    model_config = ConfigDict(extra="forbid")

    clip_model: str | None = Field(
        None, description="CLIP for icedit eval: hub id or folder (default openai/clip-vit-base-patch32)"
    )
    dino_model: str | None = Field(
        None, description="DINO ViT for icedit eval: hub id or folder (default facebook/dino-vits16)"
    )
    device: str | None = Field(None, description="torch device (default: cuda when available, else cpu)")
