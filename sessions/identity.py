"""An image's identity in the store: the sha256 of its decoded pixels, and the PNG bytes it is kept as.

A turn's picture is stored, shared and found again by `pixel_digest` (`Store`, archives, the agent's
"is this picture already a turn?"). It hashes what the picture *is* (mode, size, raw samples, the
palette of a palette image), not how it was encoded: PNG bytes differ between Pillow versions, zlib
builds and save options, so a hash of the bytes stopped a session's own picture, re-saved or read
after an upgrade, from matching its turn (store schema 4 and archive format 2 moved to this).
"""

from __future__ import annotations

import hashlib
import io

from PIL import Image

_DOMAIN = b"icedit-pixels/1\n"
"""Prefixed to what is hashed, so a pixel digest never equals the sha256 of some file's bytes."""


def encode_png(img: Image.Image) -> bytes:
    """Deterministic PNG bytes (no timestamps or text chunks), the form the store keeps a picture in."""
    if (
        img.info
    ):  # PIL writes an inherited ICC profile or tRNS from info: the bytes would depend on more than pixels
        img = img.copy()
        img.info = {}
    buf = io.BytesIO()
    # Level 1: 3x faster than zlib's default, files ~6% larger (identity no longer depends on the bytes).
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def sha256(data: bytes) -> str:
    """The sha256 of bytes (a file's checksum, archive format 1's image names)."""
    return hashlib.sha256(data).hexdigest()


def pixel_digest(img: Image.Image) -> str:
    """The identity of a picture: equal pixels, equal digest, however the picture was encoded."""
    h = hashlib.sha256(_DOMAIN)
    h.update(f"{img.mode} {img.width} {img.height}\n".encode())
    if img.mode in ("P", "PA"):  # the samples are indices: the colours are in the palette
        h.update(bytes(img.getpalette() or ()))
    h.update(img.tobytes())
    return h.hexdigest()


def png_digest(data: bytes) -> str:
    """`pixel_digest` of encoded bytes (any format Pillow reads); raises what Pillow raises if they do not decode."""
    return pixel_digest(decode_png(data))


def checked(data: bytes, digest: str) -> Image.Image | None:
    """The picture `data` holds if its pixels hash to `digest`; None if they do not, or do not decode."""
    try:
        img = decode_png(data)
    except Exception:  # noqa: BLE001 - PIL raises many kinds for bad data; all mean "not this picture"
        return None
    return img if pixel_digest(img) == digest else None
