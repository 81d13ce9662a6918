"""Text that comes from people or files and is shown or stored again: messages and session names.

Every way in (typed, a replay script, an archive, the chat) goes through these checks, so what
one path accepts the others accept too, and nothing reaches a terminal that could drive it
(escape sequences, carriage returns, bidirectional overrides).
"""

from __future__ import annotations

import os
import re

from assistant.errors import UserError

MAX_MESSAGE = 2000
"""Characters in one message or instruction."""
MAX_NAME = 200
"""Characters in a session name."""
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
"""C0/C1 controls (tab and newline excepted in messages) and the bidirectional overrides."""


def check_message(message: str, what: str = "the instruction") -> str:
    """The message stripped, its whitespace runs made one space, or a one-line error saying what is accepted."""
    text = message.strip()
    if not text:
        raise UserError(f'{what} is empty: say what to change, e.g. "make it look like winter"')
    if len(text) > MAX_MESSAGE:
        raise UserError(f"{what} is {len(text)} characters long; at most {MAX_MESSAGE} are accepted")
    if m := _CONTROL.search(text):
        raise UserError(f"{what} contains a control character ({m.group()!r}): type plain text")
    return " ".join(text.split())


def control_in(text: str) -> str | None:
    """The first character of `text` that could drive a terminal (newline and tab are not), or None."""
    m = _CONTROL.search(text)
    return m.group() if m else None


def check_name(name: str) -> str:
    """A session name as given, or a one-line error: 1..MAX_NAME printable characters, not blank."""
    if not name.strip():
        raise UserError("the session name is empty: give a name, e.g. --session trip")
    if len(name) > MAX_NAME:
        raise UserError(f"the session name is {len(name)} characters long; at most {MAX_NAME} are accepted")
    if m := _CONTROL.search(name) or re.search(r"[\t\n]", name):
        raise UserError(f"the session name contains a control character ({m.group()!r}): use plain text")
    return name


def path_text(path: str | os.PathLike) -> str:
    """A path as text that can be stored and printed: bytes that are not UTF-8 (Python keeps them as lone
    surrogates, which neither SQLite nor a UTF-8 terminal takes) become U+FFFD, controls are escaped."""
    return printable(os.fsdecode(path).encode("utf-8", "surrogateescape").decode("utf-8", "replace"))


def file_name(path: str | os.PathLike) -> str:
    """`path_text` of the path's last part, as "open <name>" turns record it."""
    return path_text(os.path.basename(os.fsdecode(path)))


def printable(text: str, lines: bool = False) -> str:
    """Text from the file system or an old store made safe to print: controls shown escaped, one line (or
    the lines it has, for our own reports of several lines)."""
    text = _CONTROL.sub(lambda m: repr(m.group())[1:-1], text).replace("\t", " ")
    return text if lines else text.replace("\n", "\\n")
