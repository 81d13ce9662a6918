"""The conversation: the person's messages, the assistant's rationale and IC prompt, errors."""

from __future__ import annotations

from rich.text import Text
from textual.containers import VerticalScroll
from textual.widgets import Static

LABELS = {"user": "you", "assistant": "assistant", "prompt": "IC prompt", "error": "error", "info": ""}
"""Roles a line can have and the label in front of it (the store's transcript uses user and assistant)."""
MAX_SHOWN = 4000
"""Longer lines are cut on screen: wrapping a 10 MB paste would freeze the chat for seconds."""


class ChatLog(VerticalScroll):
    """One Static per line, styled by role in app.tcss; `lines` keeps (role, text) for whoever asks."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.lines: list[tuple[str, str]] = []

    def add(self, role: str, text: str) -> None:
        self.lines.append((role, text))
        label = LABELS.get(role, role)
        shown = text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN]}… ({len(text)} characters)"
        line = Text.assemble((f"{label}: ", "bold") if label else "", shown)
        self.mount(Static(line, classes=f"line {role}", markup=False))
        self.scroll_end(animate=False)

    def clear(self) -> None:
        self.lines.clear()
        self.remove_children()
