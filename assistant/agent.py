"""One turn of the conversation: message -> rewriter -> plan -> engine or history move -> commit.

The CLI, replay and the chat all drive this class; none of them touches the engine or the store's
turn logic directly. A turn that fails or is cancelled commits nothing.
"""

from __future__ import annotations

import inspect
import secrets
import threading
import time
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from assistant import early_filter, plugins
from assistant.errors import UserError
from assistant.models import (
    SEEDS,
    CandidateCount,
    EarlySteps,
    EditPlan,
    EditRequest,
    EditResult,
    Guidance,
    Steps,
    TurnSummary,
    next_seed,
)
from assistant.preflight import rewriter_name
from assistant.protocols import Engine, Events, Judge, Rewriter
from assistant.settings import Settings
from assistant.text import check_message
from sessions.history import History, Turn
from sessions.identity import decode_png, encode_png, sha256
from sessions.store import NewTurn, Store

CONTEXT_TURNS = 6
LISTED_TURNS = 40
"""Turns a rewriter is shown to jump to: enough for a chat, few enough for a prompt."""


class TurnOutcome(BaseModel):
    """What a turn did, for the CLI's JSON and the chat's log."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    message: str
    intent: str = Field(description="what the rewriter read; a retry executes the earlier turn's plan")
    plan: EditPlan
    reply: str
    turn: Turn | None = None
    result: EditResult | None = None
    rewriter: str
    engine: str | None = None
    timings: dict[str, float] = {}


class _Sampling(BaseModel):
    """The sampling a retried turn ran with, as it was stored (None: not recorded): held to the same
    ranges as a new edit's, since a turn imported before archives were validated may hold anything."""

    model_config = ConfigDict(strict=True)

    steps: Steps | None = None
    guidance: Guidance | None = None
    native_size: bool | None = None
    candidates: CandidateCount | None = None
    early_steps: EarlySteps | None = None


class _Read(BaseModel):
    """A message as the rewriter read it, and when: what every outcome of the turn starts from."""

    message: str
    intent: str
    plan: EditPlan
    rewriter: str
    started: float
    rewritten: float

    def outcome(self, **fields: Any) -> TurnOutcome:
        return TurnOutcome(
            message=self.message, intent=self.intent, rewriter=self.rewriter, **{"plan": self.plan} | fields
        )


def new_seed() -> int:
    return secrets.randbelow(2**31)


class Agent:
    """Drives one named session of a store with the engine and rewriter named in settings."""

    def __init__(self, store: Store, session: str, settings: Settings):
        self.store = store
        self.session = session
        self.settings = settings
        self._engine: Engine | None = None
        self._rewriter: Rewriter | None = None
        self._judge: Judge | None = None
        self._last_image: tuple[str, Image.Image] | None = None
        self.problems: list[str] = []
        """Observers that failed on committed turns, one line each, for the caller to show (and clear)."""

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = plugins.build("engines", self.settings.engine, self.settings)
        return self._engine

    @property
    def judge(self) -> Judge:
        if self._judge is None:
            self._judge = plugins.build("judges", self.settings.judge, self.settings)
        return self._judge

    @property
    def rewriter(self) -> Rewriter:
        if self._rewriter is None:
            self._rewriter = plugins.build("rewriters", rewriter_name(self.settings), self.settings)
        return self._rewriter

    # ------------------------------------------------------------------ state

    def history(self) -> History | None:
        return self.store.history(self.session) if self.store.exists(self.session) else None

    def image(self, turn: Turn) -> Image.Image:
        """A turn's picture; the last one is kept decoded (images are content-addressed, so it can't go stale)."""
        if self._last_image is None or self._last_image[0] != turn.image_sha256:
            self._last_image = (
                turn.image_sha256,
                decode_png(self.store.image(turn.image_sha256)).convert("RGB"),
            )
        return self._last_image[1]

    def current(self, history: History | None = None) -> Turn:
        """The cursor's turn (of `history` when the caller has it already)."""
        history = history or self.history()
        if history is None or history.cursor is None:
            raise UserError(f"session '{self.session}' has no image yet: open one first")
        return history.cursor_turn()

    # ------------------------------------------------------------------ turns

    def _announced(self, turns: list[Turn]) -> list[Turn]:
        """`turns`, after the `turn_finished` observers have seen them."""
        self.problems += plugins.announce(self.session, turns, self.store.image)
        return turns

    @staticmethod
    def _place(history: History | None, image: Image.Image, message: str) -> Turn | NewTurn:
        """Where `image` stands: the cursor or the newest turn showing exactly it, else a new "open"."""
        png = encode_png(image)
        digest = sha256(png)
        if history is not None:
            if history.cursor_turn().image_sha256 == digest:
                return history.cursor_turn()
            for turn in reversed(history.turns):
                if turn.image_sha256 == digest:
                    return turn
        return NewTurn(
            kind="open",
            message=message,
            png=png,
            image_sha256=digest,
            size=image.size,
            replies=[("user", message)],
        )

    def open(self, image: Image.Image, message: str) -> Turn:
        """Make `image` the current one: a jump to a turn showing it, or a new "open" turn under the cursor."""
        history = self.history()
        place = self._place(history, image, message)
        cursor = history.cursor if history else None
        if isinstance(place, Turn):
            if place.id != cursor:
                self.store.move_cursor(self.session, place.id, [("user", message)])
            return place
        return self._announced(self.store.add_turns(self.session, cursor, [place]))[0]

    def turn(
        self,
        message: str,
        *,
        source: tuple[Image.Image, str] | None = None,
        instruction: str | None = None,
        events: Events = lambda event: None,
        cancel: threading.Event | None = None,
        **sampling: Any,
    ) -> TurnOutcome:
        """Run one message: place the source, read the message into a plan, carry the plan out.

        `source` (image, message) edits that image: from the turn showing it if the session has
        one, else from a new "open" turn committed together with the edit, so a failed edit leaves
        no trace. `instruction` skips the rewriter (replay of an exported session). `sampling`:
        seed, steps, guidance, native_size, candidates, early_steps (None: the settings' value).
        """
        started = time.perf_counter()
        message = check_message(message)
        history = self.history()
        place = self._place(history, *source) if source else self.current(history)
        current: Turn | None
        if isinstance(place, Turn):
            current, image = place, self.image(place)
        else:
            assert source is not None  # only a given source makes a new "open"
            current, image = None, source[0]
        if instruction is not None:
            plan = EditPlan(
                intent="edit", instruction=check_message(instruction), rationale="given instruction"
            )
            rewriter = "given"
        else:
            context = self._context(history, current.id) if history and current else []
            listed = {"turns": self._turns(history, current.id) if history and current else []}
            plan = self.rewriter.rewrite(
                image, message, context, **(listed if _takes_turns(self.rewriter) else {})
            )
            rewriter = rewriter_name(self.settings) + (f" -> {plan.fallback}" if plan.fallback else "")
        read = _Read(
            message=message,
            intent=plan.intent,
            plan=plan,
            rewriter=rewriter,
            started=started,
            rewritten=time.perf_counter(),
        )

        if plan.intent in ("undo", "redo"):
            turn = self.move(plan.intent, message)
            return read.outcome(reply=f"{plan.intent}: back at turn {turn.id} ({turn.message})", turn=turn)
        if plan.intent == "jump":
            if history is None or plan.turn is None:
                raise UserError("nothing to go back to: the session has no turns yet")
            turn = self.jump(plan.turn, message)  # a turn the session lacks is one line; nothing moves
            return read.outcome(
                reply=f"jump: at turn #{turn.id} ({turn.message}); an edit from here starts a branch",
                turn=turn,
            )
        if plan.intent in ("answer", "clarify"):
            if history is not None:
                self.store.log(self.session, [("user", message), ("assistant", plan.rationale)])
            return read.outcome(reply=plan.rationale)
        if plan.intent == "retry":
            return self._retry(read, history, current, events, cancel, **sampling)
        if isinstance(place, NewTurn):
            return self._edit(
                read, image, history.cursor if history else None, place, {}, events, cancel, **sampling
            )
        return self._edit(read, image, place.id, None, {}, events, cancel, **sampling)

    def retry(
        self,
        message: str = "/retry",
        *,
        events: Events = lambda event: None,
        cancel: threading.Event | None = None,
        **sampling: Any,
    ) -> TurnOutcome:
        """The current edit again with the next seed (or `seed`), from the same source, as a sibling turn:
        /retry, `icedit retry` and a rewriter's `retry` intent all end here."""
        started = time.perf_counter()
        message = check_message(message)
        history = self.history()
        read = _Read(
            message=message,
            intent="retry",
            plan=EditPlan(intent="retry"),
            rewriter="given",
            started=started,
            rewritten=started,
        )
        return self._retry(read, history, self.current(history), events, cancel, **sampling)

    def _retry(
        self,
        read: _Read,
        history: History | None,
        current: Turn | None,
        events: Events,
        cancel: threading.Event | None,
        seed: int | None = None,
        **sampling: Any,
    ) -> TurnOutcome:
        if (
            history is None
            or current is None
            or current.kind != "edit"
            or not current.plan
            or current.parent is None
        ):
            raise UserError("nothing to retry: the current image is not an edit")
        stored = current.seed
        try:  # a turn imported before archives were validated may hold anything
            plan = EditPlan.model_validate(
                current.plan | {"rationale": f"retry of turn {current.id}, new seed"}
            )
            if type(stored) is not int or not 0 <= stored < SEEDS:
                raise ValueError(stored)
            earlier = _Sampling.model_validate(
                {k: current.params.get(k) for k in _Sampling.model_fields}
            ).model_dump(exclude_none=True)
        except (ValidationError, TypeError, ValueError):
            raise UserError(
                f"turn {current.id} holds a damaged plan, seed or sampling: it cannot be retried; "
                "edit again instead"
            ) from None
        if current.params.get("engine") != self.settings.engine:  # another engine's prompt is not this one's
            plan = plan.model_copy(update={"ic_prompt": None})
        read = read.model_copy(update={"plan": plan})
        parent = history.turn(current.parent)
        seed = next_seed(stored) if seed is None else seed
        return self._edit(
            read, self.image(parent), parent.id, None, earlier, events, cancel, seed=seed, **sampling
        )

    def _edit(
        self,
        read: _Read,
        image: Image.Image,
        parent: int | None,
        opening: NewTurn | None,
        earlier: dict[str, Any],
        events: Events,
        cancel: threading.Event | None,
        *,
        seed: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        native_size: bool | None = None,
        candidates: int | None = None,
        early_steps: int | None = None,
    ) -> TurnOutcome:
        """Paint `read.plan` from `image` and commit it under `parent` (after `opening`, when new).
        Unset sampling values come from `earlier` (a retried turn's parameters), then the settings."""
        request = EditRequest(
            source=image,
            plan=read.plan,
            seed=new_seed() if seed is None else seed,
            steps=steps or earlier.get("steps") or self.settings.steps,
            guidance=guidance or earlier.get("guidance") or self.settings.guidance,
            native_size=bool(earlier.get("native_size", False)) if native_size is None else native_size,
            candidates=candidates or earlier.get("candidates") or self.settings.candidates,
            early_steps=early_steps or earlier.get("early_steps") or self.settings.early_steps,
        )
        cancel = cancel or threading.Event()
        if request.candidates > 1:
            result = early_filter.run(
                self.engine, request, self.judge, events, cancel, f"engine {self.settings.engine}"
            )
        else:
            result = self.engine.edit(request, events, cancel)
        edited = time.perf_counter()
        plan = read.plan.model_copy(update={"ic_prompt": result.prompt})
        png = encode_png(result.image)
        draft = NewTurn(
            kind="edit",
            message=read.message,
            png=png,
            image_sha256=sha256(png),
            size=result.image.size,
            plan=plan.model_dump(),
            params={
                "seed": result.seed,
                "steps": request.steps,
                "guidance": request.guidance,
                "native_size": request.native_size,
                "engine": self.settings.engine,
                "rewriter": read.rewriter,
                "preset": plugins.option("engines", self.settings.engine, "preset", self.settings),
                "random_weights": result.random_weights,
                "nfe": result.nfe,
                "adapter": result.adapter.model_dump() if result.adapter else None,
                **({"extras": result.extras} if result.extras else {}),
                **self._filter_params(request, result),
            },
            timings=result.timings,
            replies=[("user", read.message), ("assistant", plan.rationale)],
        )
        turn = self._announced(
            self.store.add_turns(self.session, parent, [opening, draft] if opening else [draft])
        )[-1]
        self._last_image = (turn.image_sha256, result.image)
        timings = {
            "rewrite": read.rewritten - read.started,
            **result.timings,
            "total": time.perf_counter() - read.started,
        }
        timings["agent"] = timings["total"] - timings["rewrite"] - (edited - read.rewritten)
        return read.outcome(
            plan=plan,
            reply=plan.rationale,
            turn=turn,
            result=result,
            engine=self.settings.engine,
            timings=timings,
        )

    def _filter_params(self, request: EditRequest, result: EditResult) -> dict[str, Any]:
        """What a replay needs to re-run the same early-filter selection."""
        if not result.candidates:
            return {}
        return {
            "candidates": request.candidates,
            "early_steps": request.early_steps,
            "judge": self.settings.judge,
            "base_seed": request.seed,
            "candidate_seeds": [c.seed for c in result.candidates],
            "verdicts": [v.model_dump() for v in result.verdicts],
        }

    def move(self, intent: str, message: str | None = None) -> Turn:
        """Undo or redo (also the `icedit undo|redo` commands, /undo and /redo): the cursor moves."""
        history = self.store.history(self.session)
        target = history.undo_target() if intent == "undo" else history.redo_target()
        self.store.move_cursor(self.session, target.id, [("user", message or f"/{intent}")])
        return target

    def jump(self, turn_id: int, message: str | None = None) -> Turn:
        """Move the cursor to any turn (the chat's /branch N and tree); the next edit from there branches."""
        target = self.store.history(self.session).turn(turn_id)
        self.store.move_cursor(self.session, target.id, [("user", message or f"/branch {turn_id}")])
        return target

    def _context(self, history: History, turn_id: int) -> list[TurnSummary]:
        path = history.path(turn_id)[-CONTEXT_TURNS:]
        return [_summary(t, turn_id) for t in path if t.plan]

    def _turns(self, history: History, turn_id: int) -> list[TurnSummary]:
        """The session's turns for a rewriter to pick one from: the last LISTED_TURNS and the current
        picture's original (the root of its path), oldest first."""
        root = history.path(turn_id)[0]
        listed = {t.id: t for t in history.turns[-LISTED_TURNS:]} | {root.id: root}
        return [_summary(t, turn_id) for t in sorted(listed.values(), key=lambda t: t.id)]


def _summary(turn: Turn, current: int) -> TurnSummary:
    plan = turn.plan or {}
    return TurnSummary(
        message=turn.message,
        intent=plan.get("intent"),
        instruction=plan.get("instruction"),
        id=turn.id,
        parent=turn.parent,
        current=turn.id == current,
    )


def _takes_turns(rewriter: Rewriter) -> bool:
    """Whether the rewriter reads the session's turns (`Rewriter.rewrite(..., turns=...)`)."""
    return "turns" in inspect.signature(rewriter.rewrite).parameters


def describe(outcome: TurnOutcome, **extra: Any) -> dict[str, Any]:
    """The JSON a person or a script reads for one turn."""
    out: dict[str, Any] = {
        "intent": outcome.intent,
        "message": outcome.message,
        "instruction": outcome.plan.instruction,
        "ic_prompt": outcome.plan.ic_prompt,
        "rationale": outcome.plan.rationale,
        "rewriter": outcome.rewriter,
        "engine": outcome.engine,
        "turn": outcome.turn.id if outcome.turn else None,
        "image_sha256": outcome.turn.image_sha256 if outcome.turn else None,
    }
    if outcome.result is not None and outcome.turn is not None:
        out |= {
            "seed": outcome.result.seed,
            "nfe": outcome.result.nfe,
            "steps": outcome.turn.params["steps"],
            "guidance": outcome.turn.params["guidance"],
            "size": list(outcome.result.image.size),
            "random_weights": outcome.result.random_weights,
            "adapter": outcome.result.adapter.model_dump() if outcome.result.adapter else None,
            "timings": {k: round(v, 4) for k, v in outcome.timings.items()},
        }
        if outcome.result.candidates:
            out["candidates"] = [c.model_dump() for c in outcome.result.candidates]
            out["verdicts"] = [v.model_dump() for v in outcome.result.verdicts]
    return out | extra
