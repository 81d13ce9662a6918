"""The chat app and `make_app()`, the one factory that `icedit chat` and the Pilot tests use.

Importing this module loads Textual, PIL and the store, never torch: the engine (and torch with
it) loads inside the edit worker, on the first edit.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from textual.app import App

from assistant.agent import Agent
from assistant.settings import Settings
from assistant.text import file_name
from assistant.tui.palette import ChatCommands
from assistant.tui.screens.chat import ChatScreen
from assistant.tui.widgets.picture import Renderer
from sessions.store import Store


class ChatApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "icedit chat"
    COMMANDS = App.COMMANDS | {ChatCommands}

    def __init__(
        self,
        store: Store,
        session: str,
        settings: Settings,
        renderer: Renderer | None = None,
        notes: list[str] | None = None,
        memory: str | None = None,
    ):
        super().__init__()
        self.store = store
        self.session = session
        """The session on screen (/session NAME changes it)."""
        self.settings = settings
        self.renderer = renderer
        self.notes = notes or []
        """Said once in the log when the chat opens (e.g. the rules rewriter runs: no VLM weights)."""
        self.memory = memory
        """The memory plan's one line (where each model runs), on the status line."""

    def on_mount(self) -> None:
        self.push_screen(
            ChatScreen(self.store, self.session, self.settings, self.renderer, self.notes, self.memory)
        )


def default_session() -> str:
    return datetime.now().strftime("chat-%Y%m%d-%H%M%S")


def make_app(
    settings: Settings,
    session: str | None = None,
    image: Path | None = None,
    renderer: Renderer | None = None,
    notes: list[str] | None = None,
    memory: str | None = None,
) -> ChatApp:
    """The chat on session `session` (default: a new "chat-<timestamp>") of the settings' store.

    `image` is opened into the session before the app starts, so a bad path is a one-line error
    from the CLI; an image the session already shows is not added twice.
    """
    from assistant.images import load_source

    store = Store(settings.store_path)
    session = session or default_session()
    if image is not None:
        try:
            Agent(store, session, settings).open(load_source(image), f"open {file_name(image)}")
        except BaseException:
            store.close()
            raise
    return ChatApp(store, session, settings, renderer, notes, memory)
