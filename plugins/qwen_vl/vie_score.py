"""VIEScore-style absolute ratings of an edit by the shared Qwen2.5-VL: semantic consistency and quality.

SC asks how well the edit follows the instruction and how little it over-edits; PQ how natural and
artifact-free the picture is. Each answer holds two 0-10 scores; as in VIEScore, SC and PQ are the
minimum of their two, and the overall score is sqrt(SC * PQ). Prompts: prompts/vie_sc.md, vie_pq.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from PIL import Image
from pydantic import BaseModel, Field

import prompts
from assistant.models import Example, Metric, Scores
from plugins.qwen_vl import model
from plugins.qwen_vl.options import QwenVlOptions
from plugins.qwen_vl.vision import image_part


class VieScore(BaseModel):
    sc: float | None = Field(None, description="semantic consistency, 0-10: min of its two scores")
    pq: float | None = Field(None, description="perceptual quality, 0-10: min of its two scores")
    overall: float | None = Field(None, description="sqrt(sc * pq)")
    sc_scores: list[float] = []
    pq_scores: list[float] = []
    error: str | None = Field(
        None, description="why a score is missing (an answer that was not two 0-10 scores)"
    )


def parse_scores(answer: str) -> list[float]:
    """The two 0-10 scores of an answer's outermost JSON object; ValueError when it holds anything else."""
    start, end = answer.find("{"), answer.rfind("}")
    try:
        scores = json.loads(answer[start : end + 1])["score"] if 0 <= start < end else None
    except (json.JSONDecodeError, KeyError, TypeError):
        scores = None
    if not (
        isinstance(scores, list)
        and len(scores) == 2
        and all(isinstance(s, int | float) and not isinstance(s, bool) and 0 <= s <= 10 for s in scores)
    ):
        raise ValueError(f"not two 0-10 scores: {answer.strip()[:80]!r}")
    return [float(s) for s in scores]


VIE_METRICS = tuple(
    Metric(key=f"vie_{key}", label=f"VIE {key.upper()}", compares=what, higher_is_better=True, digits=2)
    for key, what in (
        ("sc", "Qwen2.5-VL rating, 0-10"),
        ("pq", "Qwen2.5-VL rating, 0-10"),
        ("overall", "Qwen2.5-VL rating, 0-10"),
    )
)


class QwenVieScorer:
    """The scorer `qwen_vl` (VIEScore): two greedy answers per edit from the shared VLM, SC on (source, edit,
    instruction) and PQ on the edit. Each example's VieScore is kept in its details."""

    metrics = VIE_METRICS
    random_weights = False

    def __init__(self, options: QwenVlOptions):
        self.options = options
        self.models = {"vlm": options.vlm}

    def score(self, examples: Sequence[Example]) -> list[Scores]:
        found = []
        for e in examples:
            verdict = self.rate(e.instruction, e.source, e.edit)
            values = {"vie_sc": verdict.sc, "vie_pq": verdict.pq, "vie_overall": verdict.overall}
            found.append(Scores(values=values, details=verdict.model_dump()))
        return found

    def _image(self, picture: Image.Image) -> dict[str, Any]:
        return image_part(picture, self.options.min_pixels, self.options.max_pixels)

    def conversations(self, instruction: str, source: Image.Image, edit: Image.Image) -> tuple[list, list]:
        sc = [
            {"role": "system", "content": prompts.load("vie_sc.md")},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Source:"},
                    self._image(source),
                    {"type": "text", "text": "Edited:"},
                    self._image(edit),
                    {"type": "text", "text": f"Instruction: {instruction}"},
                ],
            },
        ]
        pq = [
            {"role": "system", "content": prompts.load("vie_pq.md")},
            {"role": "user", "content": [self._image(edit), {"type": "text", "text": "Rate this picture."}]},
        ]
        return sc, pq

    def rate(self, instruction: str, source: Image.Image, edit: Image.Image) -> VieScore:
        """SC and PQ of one edit; an answer that is not two scores leaves its score None, saying why."""
        vlm = model.load(self.options)
        scores, errors = {}, []
        for key, chat in zip(("sc", "pq"), self.conversations(instruction, source, edit), strict=True):
            try:
                scores[key] = parse_scores(vlm.generate(chat, self.options.vlm_max_new_tokens))
            except ValueError as e:
                errors.append(f"{key}: {e}")
        sc = min(scores["sc"]) if "sc" in scores else None
        pq = min(scores["pq"]) if "pq" in scores else None
        return VieScore(
            sc=sc,
            pq=pq,
            overall=None if sc is None or pq is None else math.sqrt(sc * pq),
            sc_scores=scores.get("sc", []),
            pq_scores=scores.get("pq", []),
            error="; ".join(errors) or None,
        )
