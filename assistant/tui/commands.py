"""Slash commands: the built-in table, what a plugin's command gets to see, and argument parsing.

The chat screen runs the built-ins (they change its widgets); plugins add commands through
`register_chat_commands` with `CommandSpec.run(chat, argument_text) -> text to show`, where `chat` is
a `Chat` below: the agent (its session, store and settings) and the options for the next edit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from assistant.agent import Agent
from assistant.errors import UserError
from sessions.history import History


@dataclass(frozen=True)
class Builtin:
    usage: str
    help: str
    needs_store: bool = True
    """Refused while an edit runs: the worker owns the session until it finishes."""


BUILTINS: dict[str, Builtin] = {
    "undo": Builtin("/undo", "back to the previous image (nothing is deleted)"),
    "redo": Builtin("/redo", "forward again, to the newest edit made from here"),
    "retry": Builtin("/retry", "the same edit again with a new seed"),
    "seed": Builtin("/seed N|random", "noise seed for the next edits (default: random)", needs_store=False),
    "steps": Builtin("/steps N", "denoising steps for the next edits", needs_store=False),
    "candidates": Builtin(
        "/candidates N", "early filter: noises tried per edit, the judge keeps one", needs_store=False
    ),
    "open": Builtin("/open PATH", "open an image (the next edit starts from it)"),
    "save": Builtin(
        "/save PATH [--force]",
        "write the current image to PATH (.png, .jpg, .webp, ...); --force replaces a file",
    ),
    "history": Builtin("/history", "the session's turns as a tree; * marks where you are"),
    "branch": Builtin("/branch N", "jump to turn N; an edit from there starts a branch"),
    "session": Builtin("/session NAME", "switch to session NAME (a new name starts a new one)"),
    "sheet": Builtin("/sheet PATH [--force]", "write a contact sheet of the session (a PNG of every turn)"),
    "help": Builtin("/help", "this list", needs_store=False),
    "quit": Builtin("/quit", "leave (the session is kept: icedit chat --session NAME)", needs_store=False),
}


@dataclass
class ChatOptions:
    """Settings the person changed in the chat; None means the settings' default."""

    seed: int | None = None
    steps: int | None = None
    candidates: int | None = None


@dataclass
class Chat:
    """What a plugin's slash command sees of the chat."""

    agent: Agent
    options: ChatOptions = field(default_factory=ChatOptions)


def whole_number(text: str, usage: str, low: int, high: int) -> int:
    """`text` as an int in [low, high], or a one-line error quoting the usage."""
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"usage: {usage} (a whole number from {low} to {high})") from None
    if not low <= value <= high:
        raise UserError(f"usage: {usage} (a whole number from {low} to {high}; got {value})")
    return value


def history_text(history: History) -> str:
    """The tree as indented lines, as `icedit sessions show` prints it (without the image ids)."""
    return "\n".join(history.tree_lines())
