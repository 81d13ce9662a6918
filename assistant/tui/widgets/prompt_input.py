"""The input line: up/down walk through earlier lines, Tab completes a slash command, a dropped or
pasted image file opens it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar
from urllib.parse import unquote

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


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def dropped_path(text: str) -> Path | None:
    """The image file a pasted or dropped text names, as terminals paste a dropped file: quoted,
    `file://`, or with backslash-escaped spaces; None when the text is not one (it is a request)."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    if text.startswith("file://"):
        text = unquote(text.removeprefix("file://"))
    text = re.sub(r"\\(.)", r"\1", text)
    if "\n" in text or not text:
        return None
    path = Path(text).expanduser()
    try:
        return path if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() else None
    except (OSError, ValueError):
        return None
