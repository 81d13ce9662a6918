"""A strip of small pictures to choose from: the early filter's candidates (one preview per seed and the
judge's running score) or an edit's finished variations (`/variations N`). Clicking one picks it."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image
from textual import events
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Label

from assistant.models import Candidates, Verdict
from assistant.tui.widgets.picture import Renderer


class _Choice(Vertical):
    """One picture of the strip and its caption; a click posts `CandidateStrip.Picked`."""

    def __init__(self, seed: int | None, turn: int | None, *children, **kwargs) -> None:
        super().__init__(*children, **kwargs)
        self.seed, self.turn = seed, turn

    def on_click(self, event: events.Click) -> None:
        self.post_message(CandidateStrip.Picked(self.seed, self.turn))


class CandidateStrip(Horizontal):
    """Filled by a Candidates event (scored by Verdict events) or by `show_variations`; hidden until then.

    Score = sum over a candidate's matches of the probability that it was the better one.
    """

    @dataclass
    class Picked(Message):
        """A picture of the strip was clicked: a variation's `turn`, or a candidate's `seed` (not finished)."""

        seed: int | None
        turn: int | None

    def __init__(self, renderer: Renderer, **kwargs) -> None:
        super().__init__(**kwargs)
        self.renderer = renderer
        self.seeds: list[int] = []
        self.scores: list[float] = []
        self.labels: list[Label] = []

    def show(self, event: Candidates) -> None:
        self.seeds = list(event.seeds)
        self.scores = [0.0] * len(event.previews)
        pictures = [p if isinstance(p, Image.Image) else None for p in event.previews]
        seeds = [self.seeds[i] if i < len(self.seeds) else None for i in range(len(pictures))]
        self._fill(pictures, seeds, [None] * len(pictures), [self._caption(i) for i in range(len(pictures))])

    def show_variations(self, pictures: list[Image.Image], seeds: list[int], turns: list[int]) -> None:
        """An edit's finished pictures, each already a turn: a click goes on from that one."""
        self.seeds, self.scores = [], []
        captions = [f"#{turn} · seed {seed} (click)" for seed, turn in zip(seeds, turns, strict=True)]
        self._fill(list(pictures), list(seeds), list(turns), captions)

    def _fill(self, pictures: list, seeds: list, turns: list, captions: list[str]) -> None:
        self.remove_children()
        self.labels = [Label(caption, classes="score") for caption in captions]
        for picture, seed, turn, label in zip(pictures, seeds, turns, self.labels, strict=True):
            self.mount(
                _Choice(seed, turn, self.renderer(picture, classes="preview"), label, classes="candidate")
            )
        self.display = bool(pictures)

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
