"""The early filter's candidates: one small preview per seed and the judge's running score."""

from __future__ import annotations

from PIL import Image
from textual.containers import Horizontal, Vertical
from textual.widgets import Label

from assistant.models import Candidates, Verdict
from assistant.tui.widgets.picture import Renderer


class CandidateStrip(Horizontal):
    """Filled by a Candidates event, scored by Verdict events; hidden until candidates arrive.

    Score = sum over a candidate's matches of the probability that it was the better one.
    """

    def __init__(self, renderer: Renderer, **kwargs) -> None:
        super().__init__(**kwargs)
        self.renderer = renderer
        self.seeds: list[int] = []
        self.scores: list[float] = []
        self.labels: list[Label] = []

    def show(self, event: Candidates) -> None:
        self.remove_children()
        self.seeds = list(event.seeds)
        self.scores = [0.0] * len(event.previews)
        self.labels = [Label(self._caption(i), classes="score") for i in range(len(event.previews))]
        for preview, label in zip(event.previews, self.labels, strict=True):
            image = preview if isinstance(preview, Image.Image) else None
            self.mount(Vertical(self.renderer(image, classes="preview"), label, classes="candidate"))
        self.display = bool(event.previews)

    def verdict(self, event: Verdict) -> None:
        a, b = self._index(event.a), self._index(event.b)
        if a is None or b is None:
            return
        self.scores[a] += event.p
        self.scores[b] += 1 - event.p
        for i in (a, b):
            self.labels[i].update(self._caption(i))

    def _index(self, key: int) -> int | None:
        """Verdicts name candidates by seed (or by position when the event has no seeds)."""
        if key in self.seeds:
            return self.seeds.index(key)
        return key if not self.seeds and 0 <= key < len(self.scores) else None

    def _caption(self, i: int) -> str:
        name = f"seed {self.seeds[i]}" if i < len(self.seeds) else f"#{i}"
        return f"{name} · {self.scores[i]:.2f}"

    def clear(self) -> None:
        self.remove_children()
        self.seeds, self.scores, self.labels = [], [], []
        self.display = False
