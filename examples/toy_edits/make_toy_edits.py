"""Writes the toy edit dataset beside this script: 12 shapes that change colour, 64x64 PNGs.

The `imagefolder` layout `icedit train` and `icedit eval` read: `metadata.jsonl` rows of
`source_file_name`, `target_file_name` and `instruction` (the `_file_name` suffix makes
`datasets` load those two columns as images named `source` and `target`), plus the captions before
and after that `icedit eval`'s CLIP-T and CLIP-dir compare with.
Run `python examples/toy_edits/make_toy_edits.py` to make it again; the output is byte-identical.
"""

import json
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 64
BACKGROUND = (235, 232, 225)
COLOURS = {"red": (210, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200), "yellow": (230, 200, 30)}
EDITS = [  # (shape, from colour, to colour)
    ("circle", "red", "blue"),
    ("circle", "green", "yellow"),
    ("circle", "blue", "red"),
    ("circle", "yellow", "green"),
    ("square", "red", "green"),
    ("square", "blue", "yellow"),
    ("square", "yellow", "red"),
    ("square", "green", "blue"),
    ("triangle", "red", "yellow"),
    ("triangle", "blue", "green"),
    ("triangle", "green", "red"),
    ("triangle", "yellow", "blue"),
]


def draw(shape: str, colour: str) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    pen = ImageDraw.Draw(image)
    box = (14, 14, SIZE - 14, SIZE - 14)
    if shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        pen.rectangle(box, fill=COLOURS[colour])
    else:
        pen.polygon([(SIZE // 2, 12), (SIZE - 12, SIZE - 14), (12, SIZE - 14)], fill=COLOURS[colour])
    return image


def main() -> None:
    root = Path(__file__).resolve().parent
    rows = []
    for i, (shape, before, after) in enumerate(EDITS):
        for kind, colour in (("source", before), ("target", after)):
            (root / kind).mkdir(exist_ok=True)
            draw(shape, colour).save(root / kind / f"{i:02d}.png", optimize=True)
        rows.append(
            {
                "source_file_name": f"source/{i:02d}.png",
                "target_file_name": f"target/{i:02d}.png",
                "instruction": f"the {before} {shape} is {after}",
                "source_caption": f"a {before} {shape} on a light background",
                "target_caption": f"a {after} {shape} on a light background",
            }
        )
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
