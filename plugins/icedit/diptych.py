"""The in-context diptych: source on the left, a masked right half for FLUX Fill to paint."""

from __future__ import annotations

from PIL import Image

from assistant.errors import UserError

PANEL_WIDTH = 512
MULTIPLE = 16
"""FLUX packs 2x2 latent patches of an 8x-downsampled image: sides must be multiples of 16."""
MAX_ASPECT = 4.0
"""Tallest panel 4:1 (512x2048) and widest 1:4 (512x128); beyond that the edit is refused."""


def panel_size(width: int, height: int, panel_width: int = PANEL_WIDTH) -> tuple[int, int]:
    """Panel width fixed, aspect kept, height rounded to the nearest multiple of 16."""
    ratio = height / width
    if not 1 / MAX_ASPECT <= ratio <= MAX_ASPECT:
        raise UserError(
            f"a {width}x{height} image is too {'tall' if ratio > 1 else 'wide'}: "
            f"height/width must be between 1/{MAX_ASPECT:g} and {MAX_ASPECT:g}"
        )
    return panel_width, max(MULTIPLE, round(panel_width * ratio / MULTIPLE) * MULTIPLE)


def make_diptych(source: Image.Image, panel_width: int = PANEL_WIDTH) -> tuple[Image.Image, Image.Image]:
    """(canvas, mask): the resized source in both halves, as the reference does; mask 255 on the right."""
    w, h = panel_size(*source.size, panel_width)
    panel = source.convert("RGB").resize((w, h), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (2 * w, h))
    canvas.paste(panel, (0, 0))
    canvas.paste(panel, (w, 0))
    mask = Image.new("L", (2 * w, h), 0)
    mask.paste(255, (w, 0, 2 * w, h))
    return canvas, mask


def right_panel(result: Image.Image, size: tuple[int, int] | None = None) -> Image.Image:
    """The edit: the right half of the painted canvas, resized to `size` when given."""
    w, h = result.size
    edit = result.crop((w // 2, 0, w, h))
    return edit if size is None or edit.size == size else edit.resize(size, Image.Resampling.LANCZOS)
