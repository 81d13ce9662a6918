"""A contact sheet of a session: each turn's image as a thumbnail with its message, for people who
would rather look than read.

Columns are depths in the tree. A turn's first child continues its row, every further child (a
branch made after an undo) starts a new row below, so a session without undo is one row and each
branch adds one. Lines join parents to children; the cursor's thumbnail has an orange frame.
A tree too big for MAX_CELLS or MAX_SIDE shows only the cursor's path, so a sheet's size is
bounded whatever the session.
"""

from __future__ import annotations

import bisect
import io
import shlex
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from assistant.files import refuse_existing, save_image
from assistant.text import printable
from sessions.history import History, Turn, numbered
from sessions.store import DamagedImage, Store

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
DAMAGED = (205, 205, 205)
MAX_CELLS = 600
"""Grid cells (columns x rows, about 24 megapixels) a sheet may take; a bigger tree shows the cursor's path."""
MAX_SIDE = 16_000
"""Pixels either side of a sheet may take."""
PATH_COLUMNS = 20
"""Thumbnails a row holds when the cursor's path is shown, wrapped like lines of text."""
MAX_TEXT = 1000
"""Characters of a message or title measured for drawing; a caption shows about 30, the header a few hundred."""


def layout(history: History) -> dict[int, tuple[int, int]]:
    """{turn id: (column, row)}: column = depth; later children and later roots open new rows."""
    places: dict[int, tuple[int, int]] = {}
    rows = -1
    previous = None
    for turn, depth in history.walk():
        if (
            previous is None or turn.parent != previous.id
        ):  # the walk gives a first child right after its parent
            rows += 1
        places[turn.id] = (depth, rows)
        previous = turn
    return places


def cursor_path(history: History) -> list[Turn]:
    """What a sheet too big for the caps shows: root to cursor, then on down the way redo goes.

    At most MAX_CELLS turns: the newest end of it, unless that would leave out the cursor.
    """
    cursor = history.cursor_turn().id
    path = history.path(cursor)
    line = path + history.newest_below(cursor)
    start = min(max(0, len(line) - MAX_CELLS), len(path) - 1)
    return line[start : start + MAX_CELLS]


def _grid(places: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """(columns, rows) the places take up."""
    return (
        max((c for c, _ in places.values()), default=0) + 1,
        max((r for _, r in places.values()), default=0) + 1,
    )


def _too_big(cols: int, rows: int) -> bool:
    return cols * rows > MAX_CELLS or cols * CELL_W > MAX_SIDE or HEADER + rows * CELL_H > MAX_SIDE


def thumbnail(image: Image.Image) -> Image.Image:
    """The image shrunk (never enlarged) to fit THUMB x THUMB, aspect kept."""
    thumb = image.convert("RGB")
    thumb.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
    return thumb


def _thumbnails(store: Store, turns: list[Turn], font) -> tuple[dict[int, Image.Image], list[int]]:
    """Each turn's thumbnail, one decode per image; a grey box for an image the store has damaged.

    Returns the thumbnails by turn id and the ids of the turns drawn as damaged, ascending.
    """
    by_image: dict[str, Image.Image | None] = {}
    for turn in turns:
        if turn.image_sha256 not in by_image:
            try:
                png = store.image(turn.image_sha256)
            except DamagedImage:
                by_image[turn.image_sha256] = None
                continue
            with Image.open(io.BytesIO(png)) as img:
                by_image[turn.image_sha256] = thumbnail(img)
    placeholder = Image.new("RGB", (THUMB, THUMB), DAMAGED)
    ImageDraw.Draw(placeholder).text((THUMB // 2, THUMB // 2), "damaged", fill=INK, font=font, anchor="mm")
    thumbs = {t.id: by_image[t.image_sha256] or placeholder for t in turns}
    return thumbs, sorted(t.id for t in turns if by_image[t.image_sha256] is None)


def damaged_note(turn_ids: list[int]) -> str:
    """The one line saying which turns a sheet drew as "damaged" boxes."""
    their = "its image is" if len(turn_ids) == 1 else "their images are"
    return (
        f'{numbered(turn_ids)}: {their} damaged in the store; drawn as grey "damaged" boxes '
        "(restore the store from a backup)"
    )


def thumb_origin(place: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """Top-left pixel of a thumbnail of `size` drawn at (column, row): top of its box, centred across."""
    col, row = place
    return col * CELL_W + PAD + (THUMB - size[0]) // 2, HEADER + row * CELL_H + PAD


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> str:
    """`text` cut to `width` pixels, with an ellipsis if cut; only its first MAX_TEXT characters are measured."""
    if len(text) <= MAX_TEXT and draw.textlength(text, font=font) <= width:
        return text
    text = text[:MAX_TEXT]
    fitting = bisect.bisect_right(
        range(len(text) + 1), width, key=lambda n: draw.textlength(text[:n] + "…", font=font)
    )
    return text[: max(fitting - 1, 0)] + "…"


def render_sheet(store: Store, name: str) -> Image.Image:
    """The contact sheet of session `name` (a UserError if there is no such session).

    A tree over the caps is drawn as its cursor's path, wrapped into rows, and the header says so.
    Turns whose image the store has damaged are grey "damaged" boxes, listed in `info["damaged"]`.
    """
    history = store.history(name)
    places = layout(history)
    cols, rows = _grid(places)
    title = f"session {printable(name)}  ·  {len(history.turns)} turns  ·  cursor #{history.cursor}"
    if _too_big(cols, rows):
        shown = cursor_path(history)
        places = {t.id: (i % PATH_COLUMNS, i // PATH_COLUMNS) for i, t in enumerate(shown)}
        cols, rows = PATH_COLUMNS, _grid(places)[1]
        title += (
            f"  ·  showing the cursor's path: {len(shown)} of {len(history.turns)} turns; "
            f"`icedit sessions show {printable(shlex.quote(name))}` lists all"
        )
    sheet = Image.new("RGB", (cols * CELL_W, HEADER + rows * CELL_H), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=11)
    draw.text((PAD, 9), _fit(draw, title, font, sheet.width - 2 * PAD), fill=INK, font=font)

    turns = [history.turn(i) for i in places]
    thumbs, sheet.info["damaged"] = _thumbnails(store, turns, font)
    boxes = {}
    for turn in turns:
        x, y = thumb_origin(places[turn.id], thumbs[turn.id].size)
        boxes[turn.id] = (x, y, x + thumbs[turn.id].width, y + thumbs[turn.id].height)
    for turn in turns:
        if turn.parent in places and places[turn.parent][0] + 1 == places[turn.id][0]:  # not across a wrap
            _, top, right, bottom = boxes[turn.parent]
            left, ctop, _, cbottom = boxes[turn.id]
            py, cy, gap = (top + bottom) // 2, (ctop + cbottom) // 2, (places[turn.parent][0] + 1) * CELL_W
            draw.line([(right, py), (gap, py), (gap, cy), (left, cy)], fill=LINE, width=2)
    for turn in turns:
        x, y, right, bottom = boxes[turn.id]
        sheet.paste(thumbs[turn.id], (x, y))
        if turn.id == history.cursor:
            draw.rectangle([x - 4, y - 4, right + 3, bottom + 3], outline=CURSOR, width=3)
        cx = places[turn.id][0] * CELL_W + PAD
        caption = f"#{turn.id} {printable(turn.message[:MAX_TEXT])}"
        draw.text((cx, bottom + 6), _fit(draw, caption, font, THUMB), fill=INK, font=font)
        detail = "opened" if turn.kind == "open" else f"seed {turn.seed}"
        draw.text((cx, bottom + 20), _fit(draw, detail, font, THUMB), fill=MUTED, font=font)
    return sheet


def write_sheet(store: Store, name: str, path: Path, force: bool = False) -> Image.Image:
    """Render the sheet of session `name` to `path` (any type PIL writes); one-line errors."""
    refuse_existing([path], force)
    sheet = render_sheet(store, name)
    save_image(sheet, path, force)
    return sheet
