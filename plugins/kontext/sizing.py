"""The size Kontext works at: the trained resolution nearest the source's aspect ratio.

FLUX.1 Kontext dev was trained on a fixed list of about one-megapixel sizes (each side a multiple
of 16: VAE factor 8, 2x2 packing); diffusers' `FluxKontextPipeline` resizes its input to the nearest
of them (`PREFERRED_KONTEXT_RESOLUTIONS`). We generate at that same size too (as BFL's reference
does), rather than at the pipeline's default 1024x1024, so the edit keeps the source's shape; the
engine then resizes the result back to the source's size. No torch here: `describe` stays cheap.
"""

from __future__ import annotations

RESOLUTIONS = (
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
)
"""(width, height) pairs, diffusers' `PREFERRED_KONTEXT_RESOLUTIONS` (a test keeps them equal)."""

TINY_SHRINK = 8
"""The tiny preset makes the same choice at an eighth of each side (rounded down to a multiple of 16
still, so the VAE and the 2x2 packing see legal shapes): a fraction of a second on a CPU instead of
one-megapixel pictures through its VAE."""


def working_size(size: tuple[int, int], shrink: int = 1) -> tuple[int, int]:
    """(width, height) of the trained resolution whose aspect ratio is nearest the source's, picked
    as diffusers picks it (ties go to the smaller width), each side divided by `shrink`."""
    width, height = size
    aspect = width / height
    _, w, h = min((abs(aspect - w / h), w, h) for w, h in RESOLUTIONS)
    return w // shrink // 16 * 16, h // shrink // 16 * 16
