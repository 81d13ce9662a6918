"""The VLM's weights as an artifact: named without importing torch, so checking them is quick."""

from __future__ import annotations

from assistant import hub
from plugins.qwen_vl.options import QwenVlOptions


def artifact(options: QwenVlOptions) -> hub.Artifact | None:
    """The VLM's weights, or None for `--vlm none`."""
    if options.vlm == "none":
        return None
    return hub.Artifact(
        role="VLM",
        ref=options.vlm,
        revision=None if hub.is_local(options.vlm) else options.vlm_revision,
        layout="transformers",
        option="--vlm",
    )
