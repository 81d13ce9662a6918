"""What the edit worker tells the chat screen: posted from the worker thread, handled on the UI thread."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from textual.message import Message

if TYPE_CHECKING:
    from assistant.agent import TurnOutcome
    from assistant.models import EngineEvent


@dataclass
class EditProgress(Message):
    """An engine event (Step, Candidates, Verdict, Log) while the edit runs."""

    event: EngineEvent


@dataclass
class EditFinished(Message):
    """The agent committed the turn (or answered without painting)."""

    text: str
    outcome: TurnOutcome


@dataclass
class EditFailed(Message):
    """The turn stored nothing: `error` is one line; `text` goes back into the input."""

    text: str
    error: str
    cancelled: bool = False
