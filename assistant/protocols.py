"""Behaviour a plugin object provides. Plugins implement these; the agent only calls these."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from PIL import Image

from assistant.models import EditPlan, EditRequest, EditResult, EngineEvent, TurnSummary


class Engine(Protocol):
    random_weights: bool

    def edit(
        self, request: EditRequest, events: Callable[[EngineEvent], None], cancel: threading.Event
    ) -> EditResult: ...


class Rewriter(Protocol):
    def rewrite(self, image: Image.Image, message: str, context: list[TurnSummary]) -> EditPlan: ...


class Judge(Protocol):
    def compare(self, instruction: str, source: Image.Image, a: Image.Image, b: Image.Image) -> float: ...
