"""Kontext presets: the real FLUX.1 Kontext dev (`default`) and `tiny`, random weights built in-process.

`tiny` takes ICEdit's tiny prompt encoders, tokenizers, VAE and scheduler as they are (the same
toy widths, built offline and seeded) and adds a transformer of the same widths that reads what
Kontext feeds it: 2x2-packed noise latents beside the packed source latents, 4 * 16 = 64 channels
per token (FLUX Fill's reads 384: its mask and masked image ride along as channels instead).
Its output is noise: every surface labels it as coming from random weights.
"""

from __future__ import annotations

from pydantic import BaseModel

from assistant.errors import UserError


class Preset(BaseModel):
    name: str
    model: str | None = None
    random_weights: bool = False
    description: str


PRESETS = {
    p.name: p
    for p in (
        Preset(
            name="default",
            model="black-forest-labs/FLUX.1-Kontext-dev",
            description="FLUX.1 Kontext dev (real weights; a GPU with ~24 GB or offload)",
        ),
        Preset(
            name="tiny",
            random_weights=True,
            description="random-weight tiny FLUX Kontext built in-process: runs the whole flow offline in a second",
        ),
    )
}

TINY_SEED = 1


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown kontext preset '{name}' (available: {', '.join(PRESETS)})")
    return PRESETS[name]


def build_tiny():
    """The tiny FluxKontextPipeline, identical on every call (seeded, without touching global RNG)."""
    import torch
    from diffusers import FluxKontextPipeline, FluxTransformer2DModel

    from plugins.icedit.presets import build_tiny as build_tiny_fill

    fill = build_tiny_fill()
    channels = fill.vae.config.latent_channels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        transformer = FluxTransformer2DModel.from_config(fill.transformer.config, in_channels=4 * channels)
    transformer.eval()
    pipe = FluxKontextPipeline(
        scheduler=fill.scheduler,
        vae=fill.vae,
        text_encoder=fill.text_encoder,
        tokenizer=fill.tokenizer,
        text_encoder_2=fill.text_encoder_2,
        tokenizer_2=fill.tokenizer_2,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
