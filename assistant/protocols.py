"""The behaviour a plugin object provides: what factories return and what the agent holds.

A plugin registers specs (`assistant.plugins`) whose factory(settings) returns one of these. The
host calls nothing else on them. Errors are part of the contract:

- `assistant.errors.UserError` (or a subclass): bad input or a missing resource, shown to the person
  as its one-line message; nothing is stored. `WeightsMissing` when weights are neither on disk nor
  cached. An engine or rewriter raises these for anything the person can fix.
- `assistant.errors.Cancelled`: the `cancel` event was set; engines check it between steps and raise
  this, so nothing of the edit is stored.
- Anything else is a bug in the plugin and keeps its traceback (a judge's failure is the one
  exception: the early filter decides that match by seed order and records why; the self-check keeps
  the attempt unjudged and records why).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from PIL import Image

from assistant.models import (
    EditPlan,
    EditRequest,
    EditResult,
    EngineEvent,
    Example,
    Metric,
    Scores,
    TurnSummary,
)

Events = Callable[[EngineEvent], object]
"""Where an engine reports progress: `Step` per denoising step, `Candidates`, `Verdict`, `Log`."""


class Engine(Protocol):
    """Edits one image. Same request (seed included) -> same image bytes on the same machine."""

    random_weights: bool
    """True when the weights are random (a tiny preset): every surface labels the output so."""

    def edit(self, request: EditRequest, events: Events, cancel: threading.Event) -> EditResult:
        """Run `request.steps` steps from `request.seed`, reporting a `Step` per step and raising
        `Cancelled` when `cancel` is set between steps. `request.candidates` is always 1 here: the host
        runs the early filter through `start_candidates`."""
        ...


class CandidateRun(Protocol):
    """Candidates that have run their first steps: one preview each, any one can be finished."""

    previews: Sequence[Image.Image]
    """One picture per seed, in the order the seeds were given: what the edit looks like so far."""

    def finish(self, index: int, events: Events, cancel: threading.Event) -> EditResult:
        """Run candidate `index` to the last step; the result is the image a plain edit with that seed
        makes (up to rounding where the batched steps sum in another order). Its `nfe` counts what this
        run spent in all (every candidate's early steps included)."""
        ...


@runtime_checkable
class CandidateEngine(Engine, Protocol):
    """An engine the early filter can drive (optional): start several noises, look, finish one."""

    def start_candidates(
        self, request: EditRequest, seeds: list[int], events: Events, cancel: threading.Event
    ) -> CandidateRun:
        """Run the first `request.early_steps` steps for every seed (batched where it can). The host has
        checked 1 <= early_steps < steps and that there is a judge."""
        ...


@runtime_checkable
class VariationEngine(Engine, Protocol):
    """An engine that paints several seeds of one edit together (optional; `-n`): batched, the steps
    cost little more than one seed's on a GPU. Without it the host runs `edit` once per seed."""

    def edit_variations(
        self, request: EditRequest, seeds: list[int], events: Events, cancel: threading.Event
    ) -> list[EditResult]:
        """One finished result per seed, in order: each the picture `edit` paints for that seed (up to
        rounding where batched sums run in another order), its `nfe` its own steps."""
        ...


@runtime_checkable
class AdapterScaling(Protocol):
    """An engine that can change its adapter's strength in place (optional; the chat's /lora-scale):
    without it the engine is built again, and its weights load again, for the next edit."""

    def set_adapter_scale(self, scale: float) -> None: ...


@runtime_checkable
class Preloading(Protocol):
    """An engine that can load its weights before the first edit (optional): the chat calls `load` in
    the background when it opens, so the first edit does not wait for what the person spent typing."""

    def load(self) -> None: ...


class Rewriter(Protocol):
    """Reads a person's message into a plan: an intent and, for edits, one instruction."""

    def rewrite(self, image: Image.Image, message: str, context: list[TurnSummary]) -> EditPlan:
        """`context` is the path to the current turn, oldest first (at most a few turns). Intents: edit
        (with an instruction; a message asking for several changes puts the later ones, in order, in
        `then`: the host runs each as its own edit), undo, redo, retry (the host re-runs the current edit with the next seed),
        jump (to the turn in `turn`, which the host checks exists), answer / clarify (a reply in
        `rationale`, nothing edited).

        A rewriter whose `rewrite` also takes a keyword `turns` gets every turn of the session there
        (the most recent ones of a long session, and the current picture's original), each with its
        id, parent and whether it is current: what "go back to the one with the hat" needs. One that
        takes `choices` gets the intents that can apply now and the turns a jump may name
        (`models.Choices`): what it answers should be among them (the host still checks)."""
        ...


class Judge(Protocol):
    """Which of two candidates carries out the instruction better (the early filter asks)."""

    def compare(self, instruction: str, source: Image.Image, a: Image.Image, b: Image.Image) -> float:
        """P(a follows the instruction better than b), in [0, 1]."""
        ...

    def compare_many(
        self, instruction: str, source: Image.Image, pairs: Sequence[tuple[Image.Image, Image.Image]]
    ) -> list[float]:
        """`compare` for several pairs at once (batched where it can); `PairwiseJudge` gives a loop."""
        ...


@runtime_checkable
class CheckingJudge(Judge, Protocol):
    """A judge that can also check one finished edit (optional): the agent's self-check asks it."""

    def check(self, instruction: str, source: Image.Image, edit: Image.Image) -> float:
        """P(`edit` carries out the instruction on `source` and keeps the rest), in [0, 1]."""
        ...


class Scorer(Protocol):
    """Scores finished edits for `icedit eval` (MagicBrush's metrics, a VLM's ratings, ...)."""

    metrics: Sequence[Metric]
    """What `score` gives each edit, in the order the report's table lists them."""
    models: dict[str, str]
    """The models it runs, for the report: {"clip": "openai/clip-vit-base-patch32"}."""
    random_weights: bool
    """True when its models have random weights (the tiny presets): the numbers check plumbing only."""

    def score(self, examples: Sequence[Example]) -> list[Scores]:
        """One `Scores` per example, in order, with a value (or None) for each of `metrics`."""
        ...


class PairwiseJudge:
    """A base for judges that only write `compare`: `compare_many` asks it pair by pair."""

    def compare(self, instruction: str, source: Image.Image, a: Image.Image, b: Image.Image) -> float:
        raise NotImplementedError

    def compare_many(
        self, instruction: str, source: Image.Image, pairs: Sequence[tuple[Image.Image, Image.Image]]
    ) -> list[float]:
        return [self.compare(instruction, source, a, b) for a, b in pairs]
