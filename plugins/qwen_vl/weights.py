"""The VLM's weights as an artifact: named without importing torch, so checking them is quick."""

from __future__ import annotations

from assistant import hub
from assistant.settings import Settings


def artifact(settings: Settings) -> hub.Artifact | None:
    """The VLM's weights, or None for `--vlm none`."""
    if settings.vlm == "none":
        return None
    return hub.Artifact(
        role="VLM",
        ref=settings.vlm,
        revision=None if hub.is_local(settings.vlm) else settings.vlm_revision,
        layout="transformers",
        option="--vlm",
    )
