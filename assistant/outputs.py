"""Writing a turn's picture for a person: the format its name asks for, how it was made written inside it,
never over a file that is there (unless `force`), and default names no earlier edit has taken.

How it was made (`provenance`, from what the store keeps of the turn) goes in twice: as the "infotext"
that A1111, Forge, ComfyUI's image loaders and most image browsers read (the prompt on the first line,
then `Key: value, ...`), and as JSON for scripts. PNG holds them as the text chunks `parameters` and
`icedit`; JPEG and WebP, which have no text chunks, in EXIF: UserComment (where A1111 writes its
infotext for them) and ImageDescription. The pixels are the turn's exactly in PNG and lossless WebP
(`--quality 100`), so the file still matches its turn (`sessions.identity`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from assistant.errors import UserError
from assistant.files import in_the_way, refuse_existing, write_file
from sessions.history import Turn

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
"""What an output name may end in, and the format it is written as."""
QUALITY = 95
"""JPEG and WebP quality when none is given: a picture a person keeps, not a thumbnail."""
STDOUT = Path("-")
"""`-o -`: the PNG goes to standard output."""
PARAMETERS, JSON_KEY = "parameters", "icedit"
"""The PNG text keys: A1111's infotext, and ours."""
_USER_COMMENT, _DESCRIPTION, _EXIF_IFD = 0x9286, 0x010E, 0x8769


def check_target(path: Path | None, source: Path | None, force: bool, quality: int | None) -> None:
    """Refuse an -o the picture could not or should not be written to, before anything is painted."""
    if path is None:
        if quality is not None:
            raise UserError("--quality is for -o names ending in .jpg or .webp")
        return
    if path == STDOUT:
        if quality is not None:
            raise UserError("--quality is for .jpg and .webp: -o - writes a PNG")
        return
    if path.is_dir():
        raise UserError(f"{path} is a folder: give -o a file name ending in .png, .jpg or .webp")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: give -o a name ending in .png, .jpg or .webp")
    if quality is not None and fmt == "PNG":
        raise UserError("--quality is for .jpg and .webp (a PNG is lossless)")
    if not path.parent.is_dir():
        raise UserError(f"{path.parent}: no such folder for -o")
    if not force and source is not None and _same_file(path, source):
        raise UserError(
            f"{path} is the picture being edited: give -o another name, or pass --force to replace it"
        )
    refuse_existing([path], force)


def check_folder(folder: Path | None) -> None:
    """--output-dir: a folder, made if missing (its parent must be there)."""
    if folder is None:
        return
    if in_the_way(folder) and not folder.is_dir():
        raise UserError(f"{folder} is not a folder: give --output-dir a folder")
    try:
        folder.mkdir(exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the --output-dir {folder}: {e.strerror or e}") from None


def default_name(folder: Path | None, stem: str, seed: int, instruction: str | None) -> Path:
    """`STEM-SEED-HASH.png` in `folder` (default: here), HASH a short hash of the instruction, so the same
    seed with another instruction is another file; `-2`, `-3`, ... after it if even that is taken. STEM
    is made a plain file name (a session's name may hold `/`)."""
    short = hashlib.sha256((instruction or "").encode()).hexdigest()[:6]
    stem = re.sub(r"[/\\\x00]", "_", stem).lstrip(".") or "edit"  # the person's other bytes stay
    return free_name((folder or Path()) / f"{stem}-{seed}-{short}.png")


def free_name(path: Path) -> Path:
    """`path`, or `STEM-2.png`, `STEM-3.png`, ... when something holds that name: a default replaces nothing."""
    n, candidate = 1, path
    while in_the_way(candidate):
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# ------------------------------------------------------------------------------------------ provenance


def version() -> str:
    try:
        return metadata.version("icedit-assistant")
    except metadata.PackageNotFoundError:
        return "unknown"


def provenance(turn: Turn) -> dict[str, Any]:
    """How a turn's picture was made, from what the store keeps of it (None values left out). Not which
    session or turn holds it: the same command with the same seed writes the same bytes, and the picture
    finds its turn by its pixels (`image_sha256`)."""
    params, plan = turn.params, turn.plan or {}
    candidates = params.get("candidate_seeds")
    facts = {
        "prompt": plan.get("ic_prompt"),
        "instruction": plan.get("instruction"),
        "message": turn.message,
        "seed": params.get("seed"),
        "steps": params.get("steps"),
        "guidance": params.get("guidance"),
        "engine": params.get("engine"),
        "preset": params.get("preset"),
        "model": params.get("model"),
        "adapter": params.get("adapter"),
        "candidates": candidates,
        "winner": params.get("seed") if candidates else None,
        "early_steps": params.get("early_steps") if candidates else None,
        "check": params.get("check"),
        "random_weights": params.get("random_weights") or None,
        "image_sha256": turn.image_sha256,
        "icedit": version(),
    }
    return {k: v for k, v in facts.items() if v is not None}


def _ref(info: dict | None) -> str | None:
    if not info:
        return None
    return info["source"] + (f"@{info['revision']}" if info.get("revision") else "")


def infotext(facts: dict[str, Any], size: tuple[int, int]) -> str:
    """A1111's "parameters" text: the prompt, then one line of `Key: value` pairs."""
    adapter = facts.get("adapter") or {}
    pairs = {
        "Steps": facts.get("steps"),
        "Guidance": facts.get("guidance"),
        "Seed": facts.get("seed"),
        "Size": f"{size[0]}x{size[1]}",
        "Model": _ref(facts.get("model")),
        "Preset": facts.get("preset"),
        "Lora": _ref(adapter),
        "Lora scale": adapter.get("scale"),
        "Top-k": adapter.get("top_k"),
        "Candidates": " ".join(map(str, facts["candidates"])) if facts.get("candidates") else None,
        "Winner": facts.get("winner"),
        "Instruction": facts.get("instruction"),
        "Engine": facts.get("engine"),
        "Version": f"icedit-assistant {facts['icedit']}",
    }
    line = ", ".join(f"{k}: {_value(v)}" for k, v in pairs.items() if v is not None)
    return f"{facts.get('prompt') or facts.get('instruction') or facts.get('message', '')}\n{line}"


def _value(value: object) -> str:
    """A value as A1111 writes one: quoted (JSON) when it holds what separates the pairs."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:"\n') else text


# ------------------------------------------------------------------------------------------ writing


def encode(image: Image.Image, fmt: str, facts: dict[str, Any], quality: int | None = None) -> bytes:
    """The picture in `fmt` with its provenance inside."""
    text = infotext(facts, image.size)
    data = json.dumps(facts, ensure_ascii=True, sort_keys=True)
    buf = io.BytesIO()
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text(PARAMETERS, text)  # tEXt, as A1111 writes it (iTXt when it is not Latin-1)
        info.add_text(JSON_KEY, data)
        image.save(buf, "PNG", pnginfo=info)
        return buf.getvalue()
    quality = QUALITY if quality is None else quality
    options: dict[str, Any] = {"exif": _exif(text, data, facts), "quality": quality}
    if fmt == "WEBP" and quality == 100:
        options |= {"lossless": True, "exact": True}
    if fmt == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")  # JPEG has no alpha or palette
    image.save(buf, fmt, **options)
    return buf.getvalue()


EXIF_MAX = 60_000
"""An EXIF block must fit one 64 KiB JPEG segment."""


def _exif(text: str, data: str, facts: dict[str, Any]) -> bytes:
    """EXIF with the infotext in UserComment (as A1111 writes it) and the JSON in ImageDescription (ASCII,
    as EXIF wants it); a long message or prompt is cut so that the block fits."""
    for cut in (None, 2000, 200):
        if cut is not None:
            short = {k: v[:cut] if isinstance(v, str) else v for k, v in facts.items()}
            text, data = text[: cut * 2], json.dumps(short, ensure_ascii=True, sort_keys=True)
        exif = Image.Exif()
        exif[_DESCRIPTION] = data
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\0" + text.encode("utf-16-be")
        block = exif.tobytes()
        if len(block) <= EXIF_MAX:
            return block
    return Image.Exif().tobytes()


def write_picture(
    path: Path, image: Image.Image, facts: dict[str, Any], *, quality: int | None = None, force: bool = False
) -> bytes:
    """Write the picture to `path` (atomically; `STDOUT` for standard output) as its name says; the bytes."""
    fmt = "PNG" if path == STDOUT else FORMATS[path.suffix.lower()]
    try:
        data = encode(image, fmt, facts, quality)
    except (OSError, ValueError) as e:  # Pillow: a mode or a size the format cannot hold
        raise UserError(f"cannot write {path} as {fmt}: {e}") from None
    if path == STDOUT:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        write_file(path, data, force=force)
    return data
