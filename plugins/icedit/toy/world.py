"""A synthetic world of coloured shapes and the colour edits the `toy` preset learns.

A scene is a plain background with 1-3 shapes of distinct types (circle, square, triangle), every colour
in it distinct and named from PALETTE. An edit recolours one object, a shape or the background:
"make the circle blue", "turn the background yellow", "change the square to green". Its target is the
same scene with that one change.

Train / held-out split: each object (the three shapes and the background) reserves 8 of its 56
(from colour, to colour) pairs for held-out edits only (HELDOUT_PAIRS); every colour still appears as a
from and a to colour of every object in training. Positions and sizes are continuous (shapes are drawn
4x supersampled at float coordinates), so a held-out scene's layout is never one seen in training.

Everything is a pure function of a numpy Generator: `random_edit(rng, split)` draws one edit,
`edits(seed, n, split)` a reproducible list, `write_dataset` the imagefolder layout `icedit train` and
`icedit eval` read (as examples/toy_edits/make_toy_edits.py writes it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PANEL = 64
"""Side of a scene in pixels (the toy preset's panel width)."""
SUPERSAMPLE = 4
PALETTE = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 215, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (145, 60, 190),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
COLOURS = tuple(PALETTE)
NEW_COLOURS = {"pink": (250, 150, 200)}
"""Colours the toy preset never saw: the `pink` split is a new task an adapter can be taught."""
SPLITS = ("train", "heldout", "pink")
SHAPES = ("circle", "square", "triangle")
OBJECTS = (*SHAPES, "background")
TEMPLATES = ("make the {obj} {colour}", "turn the {obj} {colour}", "change the {obj} to {colour}")
SIZE_RANGE = (14.0, 30.0)
"""A shape's bounding-box side in pixels, uniform in this range."""
MARGIN, GAP = 2.0, 3.0
"""Shapes stay MARGIN px inside the panel and GAP px apart (their boxes never touch)."""

_OFFSETS = {"circle": 1, "square": 3, "triangle": 5, "background": 2}
HELDOUT_PAIRS = {
    obj: frozenset((COLOURS[i], COLOURS[(i + k) % len(COLOURS)]) for i in range(len(COLOURS)))
    for obj, k in _OFFSETS.items()
}
"""Per object, the (from, to) colour pairs seen only in held-out edits: each colour once as from, once as to."""


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    x: float  # bounding box, panel pixels
    y: float
    size: float


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]

    def caption(self) -> str:
        things = [f"{_article(s.colour)} {s.colour} {s.kind}" for s in self.shapes]
        listed = things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]
        return f"{listed} on {_article(self.background)} {self.background} background"

    def recoloured(self, obj: str, colour: str) -> Scene:
        if obj == "background":
            return Scene(colour, self.shapes)
        return Scene(
            self.background,
            tuple(Shape(s.kind, colour, s.x, s.y, s.size) if s.kind == obj else s for s in self.shapes),
        )

    def render(self) -> Image.Image:
        """The scene as a PANEL x PANEL RGB image, anti-aliased (drawn SUPERSAMPLE x larger, box-filtered)."""
        k = SUPERSAMPLE
        image = Image.new("RGB", (PANEL * k, PANEL * k), PALETTE[self.background])
        pen = ImageDraw.Draw(image)
        for s in self.shapes:
            x0, y0, x1, y1 = s.x * k, s.y * k, (s.x + s.size) * k, (s.y + s.size) * k
            fill = PALETTE.get(s.colour) or NEW_COLOURS[s.colour]
            if s.kind == "circle":
                pen.ellipse((x0, y0, x1, y1), fill=fill)
            elif s.kind == "square":
                pen.rectangle((x0, y0, x1, y1), fill=fill)
            else:  # upright isosceles triangle filling its box
                pen.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        return image.resize((PANEL, PANEL), Image.Resampling.BOX)


@dataclass(frozen=True)
class Edit:
    source: Scene
    target: Scene
    obj: str
    before: str
    after: str
    instruction: str

    @property
    def kind(self) -> str:
        return "background" if self.obj == "background" else "shape"


def allowed_pairs(obj: str, split: str) -> list[tuple[str, str]]:
    """The (from, to) colour pairs an object's edits use in `split` ('train' or 'heldout')."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    held = HELDOUT_PAIRS[obj]
    pairs = [(a, b) for a in COLOURS for b in COLOURS if a != b]
    return [p for p in pairs if (p in held) == (split == "heldout")]


def _layout(rng: np.random.Generator, count: int) -> list[tuple[float, float, float]]:
    """`count` non-overlapping boxes (x, y, size) inside the panel, by rejection."""
    while True:
        boxes: list[tuple[float, float, float]] = []
        for _ in range(50):
            size = rng.uniform(*SIZE_RANGE)
            x, y = rng.uniform(MARGIN, PANEL - MARGIN - size, size=2)
            if all(
                x + size + GAP <= bx or bx + bs + GAP <= x or y + size + GAP <= by or by + bs + GAP <= y
                for bx, by, bs in boxes
            ):
                boxes.append((float(x), float(y), float(size)))
                if len(boxes) == count:
                    return boxes


def random_edit(rng: np.random.Generator, split: str = "train") -> Edit:
    """One edit: an object and a (from, to) pair of `split`, uniformly; then a scene around it."""
    obj = OBJECTS[rng.integers(len(OBJECTS))]
    pairs = allowed_pairs(obj, split)
    before, after = pairs[rng.integers(len(pairs))]
    count = int(rng.integers(1, 4))
    if obj == "background":
        kinds = list(rng.permutation(SHAPES)[:count])
        background = before
    else:
        others = [s for s in SHAPES if s != obj]
        kinds = [obj, *rng.permutation(others)[: count - 1]]
        kinds = [str(k) for k in rng.permutation(kinds)]  # the edited shape is not always drawn first
        free = [c for c in COLOURS if c not in (before, after)]
        background = free[rng.integers(len(free))]
    # every colour of the scene distinct, and the new colour not already in it
    free = [c for c in COLOURS if c not in (before, after, background)]
    others = list(rng.permutation(free))
    shapes = []
    for kind, (x, y, size) in zip(kinds, _layout(rng, len(kinds)), strict=True):
        colour = before if kind == obj else str(others.pop())
        shapes.append(Shape(str(kind), colour, x, y, size))
    source = Scene(background, tuple(shapes))
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    instruction = template.format(obj=obj, colour=after)
    return Edit(source, source.recoloured(obj, after), obj, before, after, instruction)


def pink_edit(rng: np.random.Generator) -> Edit:
    """A training scene whose shape turns pink, a colour outside the palette the toy preset learned."""
    edit = random_edit(rng, "train")
    while edit.obj == "background":
        edit = random_edit(rng, "train")
    instruction = TEMPLATES[0].format(obj=edit.obj, colour="pink")
    return Edit(
        edit.source, edit.source.recoloured(edit.obj, "pink"), edit.obj, edit.before, "pink", instruction
    )


def edits(seed: int, n: int, split: str = "train") -> list[Edit]:
    """`n` edits drawn from one seeded Generator: the same list for the same (seed, n, split)."""
    rng = np.random.default_rng(seed)
    if split == "pink":
        return [pink_edit(rng) for _ in range(n)]
    return [random_edit(rng, split) for _ in range(n)]


def instructions() -> list[str]:
    """Every instruction the grammar can produce (what a prompt cache has to hold)."""
    return [t.format(obj=o, colour=c) for o in OBJECTS for c in COLOURS for t in TEMPLATES]


def nearest_colour(pixels: np.ndarray, colours: tuple[str, ...] = COLOURS) -> np.ndarray:
    """The index in `colours` of each RGB pixel's nearest colour among them (pixels: [..., 3], 0-255);
    `colours` may name NEW_COLOURS too."""
    rgb = PALETTE | NEW_COLOURS
    palette = np.asarray([rgb[c] for c in colours], np.float64)
    d = ((pixels[..., None, :].astype(np.float64) - palette) ** 2).sum(-1)
    return d.argmin(-1)


def write_dataset(root: str | Path, seed: int, n: int, split: str = "train") -> Path:
    """The imagefolder layout: source/ and target/ PNGs and metadata.jsonl rows of source_file_name,
    target_file_name, instruction, source_caption and target_caption (plus the edit's obj/before/after)."""
    root = Path(root)
    (root / "source").mkdir(parents=True, exist_ok=True)
    (root / "target").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, e in enumerate(edits(seed, n, split)):
        name = f"{i:05d}.png"
        e.source.render().save(root / "source" / name, optimize=True)
        e.target.render().save(root / "target" / name, optimize=True)
        rows.append(
            {
                "source_file_name": f"source/{name}",
                "target_file_name": f"target/{name}",
                "instruction": e.instruction,
                "source_caption": e.source.caption(),
                "target_caption": e.target.caption(),
                "object": e.obj,
                "before": e.before,
                "after": e.after,
            }
        )
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--split", choices=SPLITS, default="heldout")
    args = parser.parse_args()
    print(write_dataset(args.out, args.seed, args.n, args.split))
