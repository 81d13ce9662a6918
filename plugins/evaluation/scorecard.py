"""What an evaluation leaves for people: a Markdown table of the metrics and a contact sheet PNG."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont, ImageOps

from assistant.models import Metric
from plugins.evaluation.metrics import METRICS

THUMB = 128
PAD = 8
TEXT_W = 260
HEADER = 24
BACKGROUND = (250, 250, 248)
INK = (40, 40, 40)
MUTED = (120, 120, 120)
COLUMNS = ("source", "edit", "target", "instruction")


def markdown_table(means: dict[str, float | None], count: int, metrics: Sequence[Metric] = METRICS) -> str:
    """One row per metric: its name (arrow: which way is better), what it compares, the mean over `count` edits."""
    lines = [f"| metric | compares | mean over {count} |", "|---|---|---|"]
    for m in metrics:
        value = means.get(m.key)
        lines.append(
            f"| {m.label} {'↑' if m.higher_is_better else '↓'} | {m.compares} | "
            f"{'n/a' if value is None else f'{value:.{m.digits}f}'} |"
        )
    return "\n".join(lines) + "\n"


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """Words wrapped into lines no wider than `width`."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return [*lines, line] if line else lines


def _thumb(image: Image.Image | None) -> Image.Image | None:
    if image is None:
        return None
    return ImageOps.contain(image.convert("RGB"), (THUMB, THUMB), Image.Resampling.LANCZOS)


def contact_sheet(rows: list[tuple[Image.Image, Image.Image, Image.Image | None, str]]) -> Image.Image:
    """One row per example: source | edit | target (blank when there is none) | instruction."""
    cell = THUMB + 2 * PAD
    sheet = Image.new("RGB", (3 * cell + TEXT_W + PAD, HEADER + len(rows) * cell), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=11)
    for c, name in enumerate(COLUMNS):
        draw.text((c * cell + PAD, 6), name, fill=MUTED, font=font)
    for r, (source, edit, target, instruction) in enumerate(rows):
        top = HEADER + r * cell + PAD
        for c, image in enumerate(map(_thumb, (source, edit, target))):
            if image is not None:
                sheet.paste(image, (c * cell + PAD + (THUMB - image.width) // 2, top))
        for i, line in enumerate(_fit(draw, instruction, font, TEXT_W - PAD)[: THUMB // 14]):
            draw.text((3 * cell + PAD, top + i * 14), line, fill=INK, font=font)
    return sheet
