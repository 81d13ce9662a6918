"""The engine's progress while an edit runs: a bar, `step i/n` and the phase Step.phase names."""

from __future__ import annotations

from textual.containers import Horizontal
from textual.widgets import Label, ProgressBar

from assistant.models import Step


class StepBar(Horizontal):
    """Hidden while idle; indeterminate until the first Step arrives (rewriting, loading the engine)."""

    def compose(self):
        yield ProgressBar(total=None, show_eta=False, show_percentage=False, id="bar")
        yield Label("", id="phase")

    def start(self, text: str) -> None:
        self.query_one("#bar", ProgressBar).update(total=None, progress=0)
        self.query_one("#phase", Label).update(text)
        self.display = True

    def step(self, event: Step) -> None:
        self.query_one("#bar", ProgressBar).update(total=event.n, progress=event.i)
        text = f"{event.phase}..." if event.i == 0 else f"step {event.i}/{event.n} · {event.phase}"
        self.query_one("#phase", Label).update(text)

    def say(self, text: str) -> None:
        self.query_one("#phase", Label).update(text)

    def stop(self) -> None:
        self.display = False
