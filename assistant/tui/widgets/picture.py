"""The current image, drawn with textual-image, with a before/after toggle and the sizes.

textual-image picks its renderer (Sixel, Kitty, half-cells; Unicode when stdout is not a TTY)
when `textual_image.widget` is imported, by asking the terminal, which only works before Textual
starts: importing this module does that. Tests pass an explicit renderer class instead.
"""

from __future__ import annotations

from PIL import Image
from textual import events
from textual.containers import Vertical
from textual.reactive import reactive
from textual.widgets import Label
from textual_image import _terminal

try:
    _terminal.get_cell_size()
except ZeroDivisionError:  # a 0x0 pty (some CI runners, `script` without a size): assume VT340 cells
    _terminal.get_cell_size._result = _terminal.CellSize(10, 20)  # type: ignore[attr-defined]  # its cache

# imported after the cell-size guard above, on purpose
from textual_image.widget import BaseImage
from textual_image.widget import Image as DEFAULT_RENDERER

Renderer = type[BaseImage]
"""A textual-image widget class: DEFAULT_RENDERER, or HalfcellImage, UnicodeImage, ... to force one."""


def size(image: Image.Image | None) -> str:
    return "-" if image is None else f"{image.width}x{image.height}"


class Picture(Vertical, can_focus=True):
    """`show()` gives it the result and the image it was made from; Ctrl+B (or `b` when it has the
    focus) flips between them."""

    before = reactive(False)

    def __init__(self, renderer: Renderer = DEFAULT_RENDERER, **kwargs) -> None:
        super().__init__(**kwargs)
        self.renderer = renderer
        self.result: Image.Image | None = None
        self.source: Image.Image | None = None
        self.note = ""

    def compose(self):
        yield Label("open an image: /open PATH", id="caption")
        yield self.renderer(None, id="image")

    def show(self, result: Image.Image | None, source: Image.Image | None, note: str = "") -> None:
        """`source` is None for an opened image (nothing came before it)."""
        self.result, self.source, self.note = result, source, note
        self.before = False
        self._draw()

    def toggle(self) -> None:
        self.before = not self.before

    def watch_before(self) -> None:
        self._draw()

    def _draw(self) -> None:
        if not self.is_mounted:
            return
        caption = self.query_one("#caption", Label)
        image = self.query_one("#image", BaseImage)
        if self.result is None:
            caption.update("open an image: /open PATH")
            image.image = None
            return
        if self.source is None:
            text = f"opened · {size(self.result)}"
        elif self.before:
            text = f"BEFORE (ctrl+b: after) · source {size(self.source)} · result {size(self.result)}"
        else:
            text = f"after (ctrl+b: before) · source {size(self.source)} → result {size(self.result)}"
        caption.update(text + (f" · {self.note}" if self.note else ""))
        image.image = self.source if self.before and self.source is not None else self.result
        self.call_after_refresh(self._fit)  # once the panel has its size

    def _fit(self) -> None:
        """The largest size in cells at which the picture fits the panel, its aspect kept."""
        image = self.query_one("#image", BaseImage)
        shown = self.source if self.before and self.source is not None else self.result
        room_w, room_h = self.content_size.width, self.content_size.height - 1  # the caption's line
        if shown is None or room_w <= 0 or room_h <= 0:
            return
        cell = _terminal.get_cell_size()
        scale = min(room_w * cell.width / shown.width, room_h * cell.height / shown.height)
        image.styles.width = max(1, int(shown.width * scale / cell.width))
        image.styles.height = max(1, int(shown.height * scale / cell.height))

    def on_mount(self) -> None:
        self._draw()

    def on_resize(self, event: events.Resize) -> None:
        self._fit()

    def on_click(self, event: events.Click) -> None:
        self.focus()
