"""The input line: up/down walk through earlier lines, Tab completes a slash command."""

from __future__ import annotations

from typing import ClassVar

from textual.binding import Binding
from textual.suggester import SuggestFromList
from textual.widgets import Input


class PromptInput(Input):
    BINDINGS: ClassVar = [
        Binding("up", "history(-1)", "earlier line", show=False),
        Binding("down", "history(1)", "later line", show=False),
        Binding("tab", "complete", "complete", show=False),
    ]

    def __init__(self, commands: list[str], **kwargs) -> None:
        super().__init__(suggester=SuggestFromList(commands, case_sensitive=False), **kwargs)
        self.history: list[str] = []
        self._index = 0
        self._draft = ""

    def remember(self, text: str) -> None:
        if text and (not self.history or self.history[-1] != text):
            self.history.append(text)
        self._index = len(self.history)

    def action_history(self, delta: int) -> None:
        if not self.history:
            return
        if self._index == len(self.history):
            self._draft = self.value
        self._index = max(0, min(len(self.history), self._index + delta))
        self.value = self.history[self._index] if self._index < len(self.history) else self._draft
        self.cursor_position = len(self.value)

    def action_complete(self) -> None:
        if self._suggestion and self._suggestion != self.value:
            self.value = self._suggestion
            self.cursor_position = len(self.value)
        else:
            self.screen.focus_next()
