"""The scorer `toy`: did the edit paint the colour its instruction asked for, where it was asked, and
how far is it from the target (`l1`, MagicBrush's, so toy and tiny compare without feature models)?

The region is where the target differs from the source (the recoloured shape or background). There, each
pixel of the target and of the edit is named by its nearest palette colour; `colour_hit` is 1 when the
edit's most common colour is the target's, 0 when it is another. An example without a target, or whose
target changes nothing, has no value. Pixel metrics (L1) say how close the edit is; this says whether
it did the one thing asked, which a blurred copy of the source can score well on L1 without doing.
`kept` looks at the rest: the share of the pixels the target keeps whose colour the edit keeps too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image

from assistant.models import Example, Metric, Scores
from plugins.evaluation.metrics import METRICS, pixel_distances
from plugins.icedit.toy.world import COLOURS, nearest_colour

CHANGED = 48
"""A pixel whose |R| + |G| + |B| difference between source and target exceeds this is in the edited region."""


class Named(NamedTuple):
    """An example's pixels named by palette colour (indices into COLOURS) at the target's size, and the
    edited region (where target and source differ)."""

    source: np.ndarray
    edit: np.ndarray
    target: np.ndarray
    region: np.ndarray


def named(source: Image.Image, edit: Image.Image, target: Image.Image) -> Named:
    size = target.size
    src, painted, wanted = (
        np.asarray(
            (image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)).convert("RGB")
        ).astype(np.int64)
        for image in (source, edit, target)
    )
    region = np.abs(wanted - src).sum(-1) > CHANGED
    return Named(nearest_colour(src), nearest_colour(painted), nearest_colour(wanted), region)


def colour_hit(n: Named) -> tuple[float, str, str] | None:
    """(1.0 or 0.0, the asked colour, the edit's colour) in the edited region; None if there is none."""
    if not n.region.any():
        return None
    asked = int(np.bincount(n.target[n.region], minlength=len(COLOURS)).argmax())
    got = int(np.bincount(n.edit[n.region], minlength=len(COLOURS)).argmax())
    return float(asked == got), COLOURS[asked], COLOURS[got]


def kept(n: Named) -> float:
    """The share of the pixels the target keeps whose palette colour the edit keeps too: a second shape
    recoloured by mistake lowers it, which `colour_hit` (the edited region only) cannot see."""
    rest = ~n.region
    return float((n.edit[rest] == n.source[rest]).mean()) if rest.any() else 1.0


class ColourScorer:
    metrics = (
        next(m for m in METRICS if m.key == "l1"),
        Metric(
            key="colour_hit",
            label="Colour hit",
            compares="edit's dominant palette colour where the target changes, vs the target's (toy world)",
            higher_is_better=True,
        ),
        Metric(
            key="kept",
            label="Kept",
            compares="share of the pixels the target keeps whose palette colour the edit keeps (toy world)",
            higher_is_better=True,
        ),
    )
    models: dict[str, str] = {}
    random_weights = False

    def score(self, examples: Sequence[Example]) -> list[Scores]:
        found = []
        for e in examples:
            if e.target is None:
                found.append(
                    Scores(
                        values={"l1": None, "colour_hit": None, "kept": None}, details={"why": "no target"}
                    )
                )
                continue
            l1, _ = pixel_distances(e.edit, e.target)
            pixels = named(e.source, e.edit, e.target)
            hit, rest = colour_hit(pixels), kept(pixels)
            if hit is None:
                found.append(
                    Scores(
                        values={"l1": l1, "colour_hit": None, "kept": rest},
                        details={"why": "the target changes nothing"},
                    )
                )
            else:
                found.append(
                    Scores(
                        values={"l1": l1, "colour_hit": hit[0], "kept": rest},
                        details={"asked": hit[1], "got": hit[2]},
                    )
                )
        return found
