"""Reading images people hand us, and the canonical PNG bytes we store and hash."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from assistant.errors import UserError
from assistant.files import kind, kind_problem

MAX_PIXELS = 64_000_000
"""Larger images are refused (PIL's decompression-bomb guard, set deliberately)."""
MIN_SIDE = 32
"""Smaller sources are refused: a 512-wide panel made from a few pixels is an upscaled blur, not an edit."""
MAX_PIPE_BYTES = 256 * 2**20
"""The most read from a pipe or device given as a picture (a 64-megapixel PNG is well below it)."""
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


def load_source(path: str | Path) -> Image.Image:
    """`load_image` for a picture to edit: at least MIN_SIDE pixels on each side."""
    image = load_image(path)
    if min(image.size) < MIN_SIDE:
        raise UserError(
            f"{path}: {image.width}x{image.height} is too small to edit (at least {MIN_SIDE} pixels "
            "on each side)"
        )
    return image


def load_image(path: str | Path) -> Image.Image:
    """Open a photo as RGB: EXIF orientation applied, alpha laid on white, first frame only.

    A pipe (`cat photo.png | icedit edit /dev/stdin ...`) is read whole first, up to MAX_PIPE_BYTES."""
    path = Path(path)
    found = kind(path)
    if found == "folder":
        raise UserError(f"{path} is a folder, not an image")
    if found not in ("file", "special"):
        raise UserError(kind_problem(path, found))
    source = path if found == "file" else io.BytesIO(_read_pipe(path))
    if found == "file" and path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                img.load()
                return to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"{path}: image too large (over {MAX_PIXELS // 1_000_000} megapixels)") from None
    except UnidentifiedImageError:
        raise UserError(f"{path}: not an image PIL can read (PNG, JPEG, WebP, ...)") from None
    except PermissionError:
        raise UserError(f"{path}: permission denied") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: broken image ({e})") from None


def _read_pipe(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PIPE_BYTES + 1)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    if not data:
        raise UserError(
            f"{path}: nothing came through (an empty pipe or device): pass a picture's bytes or a file"
        )
    if len(data) > MAX_PIPE_BYTES:
        raise UserError(f"{path}: over {MAX_PIPE_BYTES // 2**20} MiB came through: not a picture")
    return data


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode PIL opens (16-bit, CMYK, palette, RGBA, ...)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")
    if img.mode == "P" or "A" in img.mode or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.new("RGBA", rgba.size, "white")
        img.alpha_composite(rgba)
    return img.convert("RGB")
