"""A contact sheet of a session: each turn's image as a thumbnail with its message, for people who
would rather look than read.

Columns are depths in the tree. A turn's first child continues its row, every further child (a
branch made after an undo) starts a new row below, so a session without undo is one row and each
branch adds one. Lines join parents to children; the cursor's thumbnail has an orange frame.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from assistant.errors import UserError
from sessions.history import History
from sessions.store import Store

THUMB = 160
"""Largest side of a thumbnail, in pixels."""
PAD = 12
CAPTION = 34
HEADER = 30
CELL_W = THUMB + 2 * PAD
CELL_H = THUMB + CAPTION + 2 * PAD
BACKGROUND = (250, 250, 248)
INK = (40, 40, 40)
MUTED = (120, 120, 120)
LINE = (170, 170, 170)
CURSOR = (230, 120, 20)


def layout(history: History) -> dict[int, tuple[int, int]]:
    """{turn id: (column, row)}: column = depth; later children and later roots open new rows."""
    places: dict[int, tuple[int, int]] = {}
    rows = -1
    stack = [(root, 0, None) for root in reversed(history.children(None))]
    while stack:
        turn, col, row = stack.pop()
        if row is None:
            rows += 1
            row = rows
        places[turn.id] = (col, row)
        kids = history.children(turn.id)
        stack.extend((kid, col + 1, row if i == 0 else None) for i, kid in reversed(list(enumerate(kids))))
    return places


def thumbnail(image: Image.Image) -> Image.Image:
    """The image shrunk (never enlarged) to fit THUMB x THUMB, aspect kept."""
    thumb = image.convert("RGB")
    thumb.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
    return thumb


def thumb_origin(place: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """Top-left pixel of a thumbnail of `size` drawn at (column, row): top of its box, centred across."""
    col, row = place
    return col * CELL_W + PAD + (THUMB - size[0]) // 2, HEADER + row * CELL_H + PAD


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def render_sheet(store: Store, name: str) -> Image.Image:
    """The contact sheet of session `name` (a UserError if there is no such session)."""
    history = store.history(name)
    places = layout(history)
    cols = max((c for c, _ in places.values()), default=0) + 1
    rows = max((r for _, r in places.values()), default=0) + 1
    sheet = Image.new("RGB", (cols * CELL_W, HEADER + rows * CELL_H), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=11)
    title = f"session {name}  ·  {len(history.turns)} turns  ·  cursor #{history.cursor}"
    draw.text((PAD, 9), _fit(draw, title, font, sheet.width - 2 * PAD), fill=INK, font=font)

    thumbs = {}
    for turn in history.turns:
        with Image.open(io.BytesIO(store.image(turn.image_sha256))) as img:
            thumbs[turn.id] = thumbnail(img)
    boxes = {}
    for turn in history.turns:
        x, y = thumb_origin(places[turn.id], thumbs[turn.id].size)
        boxes[turn.id] = (x, y, x + thumbs[turn.id].width, y + thumbs[turn.id].height)
    for turn in history.turns:
        if turn.parent is not None:
            _, top, right, bottom = boxes[turn.parent]
            left, ctop, _, cbottom = boxes[turn.id]
            py, cy, gap = (top + bottom) // 2, (ctop + cbottom) // 2, (places[turn.parent][0] + 1) * CELL_W
            draw.line([(right, py), (gap, py), (gap, cy), (left, cy)], fill=LINE, width=2)
    for turn in history.turns:
        x, y, right, bottom = boxes[turn.id]
        sheet.paste(thumbs[turn.id], (x, y))
        if turn.id == history.cursor:
            draw.rectangle([x - 4, y - 4, right + 3, bottom + 3], outline=CURSOR, width=3)
        cx = places[turn.id][0] * CELL_W + PAD
        draw.text((cx, bottom + 6), _fit(draw, f"#{turn.id} {turn.message}", font, THUMB), fill=INK, font=font)
        detail = "opened" if turn.kind == "open" else f"seed {turn.seed}"
        draw.text((cx, bottom + 20), _fit(draw, detail, font, THUMB), fill=MUTED, font=font)
    return sheet


def write_sheet(store: Store, name: str, path: Path) -> Image.Image:
    """Render the sheet of session `name` to `path` (any type PIL writes); one-line errors."""
    sheet = render_sheet(store, name)
    try:
        sheet.save(path)
    except ValueError:
        raise UserError(f"{path}: unknown image type (use .png, .jpg, .webp, ...)") from None
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    return sheet
