"""The chat's settings for the next edit (seed, steps, guidance, variations, candidates, self-check),
what runs them, and the keys that work."""

from __future__ import annotations

from textual.widgets import Static


class StatusLine(Static):
    def show(
        self,
        *,
        seed: int | None,
        steps: int,
        guidance: float,
        variations: int,
        candidates: int,
        check: str,
        engine: str,
        rewriter: str,
        memory: str | None = None,
    ) -> None:
        seed_text = "random" if seed is None else str(seed)
        where = f" · {memory}" if memory else ""
        many = f" · {variations} variations" if variations > 1 else ""
        self.update(
            f"seed {seed_text} · steps {steps} · guidance {guidance:g}{many} · candidates {candidates} · {check}"
            f" · {engine} · {rewriter}{where} · Esc cancels · ^Z/^Y undo/redo · ^B before/after · ^P commands"
        )
