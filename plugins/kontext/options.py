"""The kontext engine's options: a FLUX pipeline's (`plugins.icedit.options.FluxOptions`), no more."""

from __future__ import annotations

from plugins.icedit.options import FluxOptions


class KontextOptions(FluxOptions):
    """FLUX.1 Kontext dev: its preset, weights, an optional stock LoRA (no preset adapter), placement."""
