"""The chat's settings for the next edit (seed, steps, candidates, self-check) and what runs them."""

from __future__ import annotations

from textual.widgets import Static


class StatusLine(Static):
    def show(
        self,
        *,
        seed: int | None,
        steps: int,
        candidates: int,
        check: str,
        engine: str,
        rewriter: str,
        memory: str | None = None,
    ) -> None:
        seed_text = "random" if seed is None else str(seed)
        where = f" · {memory}" if memory else ""
        self.update(
            f"seed {seed_text} · steps {steps} · candidates {candidates} · {check} · {engine} · {rewriter}{where}"
            " · Esc cancels · ^T tree · b/^B before/after · /help"
        )
