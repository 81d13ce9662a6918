"""The editing metrics of MagicBrush (against the target image) and Emu Edit (against the source).

MagicBrush: L1 and L2 (mean absolute / squared pixel difference in [0, 1], the edit resized to the
target), CLIP-I and DINO (cosine of image embeddings), CLIP-T (edit vs the target caption). Emu Edit
compares with the source instead (L1, CLIP-I, DINO) and adds CLIP-dir (does the image move the way
the captions do); its CLIP-Out is MagicBrush's CLIP-T. A metric whose inputs an example lacks (no
target image, no captions) is None for that example.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from assistant.models import Example, Metric, Scores
from plugins.evaluation.features import FeatureModels


def _metric(key: str, label: str, compares: str, higher_is_better: bool) -> Metric:
    return Metric(key=key, label=label, compares=compares, higher_is_better=higher_is_better)


METRICS = (
    _metric("l1", "L1", "edit vs target, pixels (MagicBrush)", False),
    _metric("l2", "L2", "edit vs target, squared pixels (MagicBrush)", False),
    _metric("clip_i", "CLIP-I", "edit vs target, CLIP image (MagicBrush)", True),
    _metric("dino", "DINO", "edit vs target, DINO (MagicBrush)", True),
    _metric("clip_t", "CLIP-T", "edit vs target caption (MagicBrush; Emu Edit's CLIP-Out)", True),
    _metric("clip_dir", "CLIP-dir", "edit - source vs caption change (Emu Edit)", True),
    _metric("src_l1", "L1 (source)", "edit vs source, pixels (Emu Edit)", False),
    _metric("src_clip_i", "CLIP-I (source)", "edit vs source, CLIP image (Emu Edit)", True),
    _metric("src_dino", "DINO (source)", "edit vs source, DINO (Emu Edit)", True),
)
NO_CHANGE = 1e-4


def pixel_distances(edit: Image.Image, reference: Image.Image) -> tuple[float, float]:
    """(L1, L2): mean absolute and mean squared difference of RGB values in [0, 1], the edit at the reference's size."""
    if edit.size != reference.size:
        edit = edit.resize(reference.size, Image.Resampling.BICUBIC)
    diff = (
        np.asarray(edit.convert("RGB"), np.float64) - np.asarray(reference.convert("RGB"), np.float64)
    ) / 255
    return float(np.abs(diff).mean()), float((diff**2).mean())


def _embed(fn: Callable[[list], torch.Tensor], items: Sequence, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(list(items[i : i + batch_size])) for i in range(0, len(items), batch_size)]).cpu()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b))


def _direction(image_change: torch.Tensor, caption_change: torch.Tensor) -> float:
    """Cosine of two changes of unit embeddings; one shorter than NO_CHANGE is rounding noise, not a direction: 0."""
    if min(image_change.norm(), caption_change.norm()) < NO_CHANGE:
        return 0.0
    return float(torch.nn.functional.cosine_similarity(image_change, caption_change, dim=0))


def score(
    features: FeatureModels, examples: Sequence[Example], batch_size: int = 8
) -> list[dict[str, float | None]]:
    """Every metric of METRICS for each example; feature models run `batch_size` images at a time."""
    n = len(examples)
    images = [e.edit for e in examples] + [e.source for e in examples]
    with_target = [i for i, e in enumerate(examples) if e.target is not None]
    images += [examples[i].target for i in with_target]
    clip = _embed(features.clip_images, images, batch_size)
    dino = _embed(features.dino_images, images, batch_size)
    target_row = {i: 2 * n + j for j, i in enumerate(with_target)}
    captioned = [i for i, e in enumerate(examples) if e.target_caption]
    both = [i for i in captioned if examples[i].source_caption]
    texts = [examples[i].target_caption for i in captioned] + [examples[i].source_caption for i in both]
    text = _embed(features.clip_texts, texts, batch_size) if texts else None
    out_row = {i: j for j, i in enumerate(captioned)}
    in_row = {i: len(captioned) + j for j, i in enumerate(both)}

    rows = []
    for i, e in enumerate(examples):
        row: dict[str, float | None] = dict.fromkeys(m.key for m in METRICS)
        row["src_l1"], _ = pixel_distances(e.edit, e.source)
        row["src_clip_i"] = _cos(clip[i], clip[n + i])
        row["src_dino"] = _cos(dino[i], dino[n + i])
        if i in target_row:
            row["l1"], row["l2"] = pixel_distances(e.edit, e.target)
            row["clip_i"] = _cos(clip[i], clip[target_row[i]])
            row["dino"] = _cos(dino[i], dino[target_row[i]])
        if i in out_row:
            row["clip_t"] = _cos(clip[i], text[out_row[i]])
        if i in in_row:
            row["clip_dir"] = _direction(clip[i] - clip[n + i], text[out_row[i]] - text[in_row[i]])
        rows.append(row)
    return rows


def means(
    rows: Sequence[dict[str, float | None]], metrics: Sequence[Metric] = METRICS
) -> dict[str, float | None]:
    """Each metric's mean over the examples that have it (None when none does)."""
    result = {}
    for m in metrics:
        values = [r[m.key] for r in rows if r.get(m.key) is not None]
        result[m.key] = float(np.mean(values)) if values else None
    return result


class MagicBrushScorer:
    """The scorer `magicbrush`: every metric above, the feature models run on the whole batch at once."""

    metrics = METRICS

    def __init__(self, features: FeatureModels, models: dict[str, str]):
        self.features, self.models = features, models
        self.random_weights = features.random_weights

    def score(self, examples: Sequence[Example]) -> list[Scores]:
        return [Scores(values=row) for row in score(self.features, examples, max(1, len(examples)))]


def magicbrush(settings, options) -> MagicBrushScorer:
    """The scorer with its feature models loaded on its `device` (`icedit eval` sets it per process)."""
    from plugins.evaluation import features

    device = options.device or "cpu"
    refs = features.chosen(settings, options)
    if refs is None:
        return MagicBrushScorer(features.tiny(device), {"clip": "tiny (random)", "dino": "tiny (random)"})
    return MagicBrushScorer(features.load(*refs, device), {"clip": refs[0], "dino": refs[1]})
