"""One turn of the conversation: message -> rewriter -> plan -> engine or history move -> commit.

The CLI, replay and the chat all drive this class; none of them touches the engine or the store's
turn logic directly. A turn that fails or is cancelled commits nothing.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from assistant import plugins
from assistant.errors import UserError
from assistant.images import decode_png, encode_png, sha256
from assistant.models import SEEDS, EditPlan, EditRequest, EditResult, EngineEvent, TurnSummary, next_seed
from assistant.preflight import rewriter_name
from assistant.settings import Settings
from assistant.text import check_message
from sessions.history import History, Turn
from sessions.store import NewTurn, Store

CONTEXT_TURNS = 6


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


def new_seed() -> int:
    return secrets.randbelow(2**31)


class Agent:
    """Drives one named session of a store with the engine and rewriter named in settings."""

    def __init__(self, store: Store, session: str, settings: Settings):
        self.store = store
        self.session = session
        self.settings = settings
        self._engine = None
        self._rewriter = None
        self._judge = None
        self._last_image: tuple[str | None, Image.Image | None] = (None, None)
        self.problems: list[str] = []
        """Observers that failed on committed turns, one line each, for the caller to show (and clear)."""

    @property
    def engine(self):
        if self._engine is None:
            self._engine = plugins.get("engines", self.settings.engine).factory(self.settings)
        return self._engine

    @property
    def judge(self):
        if self._judge is None:
            self._judge = plugins.get("judges", self.settings.judge).factory(self.settings)
        return self._judge

    @property
    def rewriter(self):
        if self._rewriter is None:
            self._rewriter = plugins.get("rewriters", rewriter_name(self.settings)).factory(self.settings)
        return self._rewriter

    # ------------------------------------------------------------------ state

    def history(self) -> History | None:
        return self.store.history(self.session) if self.store.exists(self.session) else None

    def image(self, turn: Turn) -> Image.Image:
        """A turn's picture; the last one is kept decoded (images are content-addressed, so it can't go stale)."""
        if self._last_image[0] != turn.image_sha256:
            self._last_image = (turn.image_sha256, decode_png(self.store.image(turn.image_sha256)).convert("RGB"))
        return self._last_image[1]

    def current(self, history: History | None = None) -> Turn:
        """The cursor's turn (of `history` when the caller has it already)."""
        history = history or self.history()
        if history is None or history.cursor is None:
            raise UserError(f"session '{self.session}' has no image yet: open one first")
        return history.current()

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
            if history.current().image_sha256 == digest:
                return history.current()
            for turn in reversed(history.turns):
                if turn.image_sha256 == digest:
                    return turn
        return NewTurn(kind="open", message=message, png=png, image_sha256=digest, size=image.size,
                       replies=[("user", message)])

    def open(self, image: Image.Image, message: str) -> Turn:
        """Make `image` the current one: a jump to a turn showing it, or a new "open" turn under the cursor."""
        history = self.history()
        place = self._place(history, image, message)
        if isinstance(place, Turn):
            if place.id != history.cursor:
                self.store.move_cursor(self.session, place.id, [("user", message)])
            return place
        return self._announced(self.store.add_turns(self.session, history and history.cursor, [place]))[0]

    def turn(
        self,
        message: str,
        *,
        source: tuple[Image.Image, str] | None = None,
        instruction: str | None = None,
        seed: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        native_size: bool = False,
        candidates: int | None = None,
        early_steps: int | None = None,
        events: Callable[[EngineEvent], None] = lambda event: None,
        cancel: threading.Event | None = None,
    ) -> TurnOutcome:
        """Run one message.

        `source` (image, message) edits that image: from the turn showing it if the session has
        one, else from a new "open" turn committed together with the edit, so a failed edit leaves
        no trace. `instruction` skips the rewriter (replay of an exported session).
        """
        started = time.perf_counter()
        message = check_message(message)
        history = self.history()
        place = self._place(history, *source) if source else self.current(history)
        opening = place if isinstance(place, NewTurn) else None
        if opening is None:
            current = place
            image = self.image(current)
        else:
            current, image = None, source[0]
        if instruction is not None:
            plan = EditPlan(intent="edit", instruction=check_message(instruction), rationale="given instruction")
            rewriter = "given"
        else:
            context = self._context(history, current.id) if current else []
            plan = self.rewriter.rewrite(image, message, context)
            rewriter = rewriter_name(self.settings) + (f" -> {plan.fallback}" if plan.fallback else "")
        rewritten = time.perf_counter()
        common = {"message": message, "intent": plan.intent, "plan": plan, "rewriter": rewriter}

        if plan.intent in ("undo", "redo"):
            turn = self.move(plan.intent, message)
            reply = f"{plan.intent}: back at turn {turn.id} ({turn.message})"
            return TurnOutcome(**common, reply=reply, turn=turn)
        if plan.intent in ("answer", "clarify"):
            if history is not None:
                self.store.log(self.session, [("user", message), ("assistant", plan.rationale)])
            return TurnOutcome(**common, reply=plan.rationale)

        params: dict[str, Any] = {}
        if plan.intent == "retry":
            if current is None or current.kind != "edit" or not current.plan:
                raise UserError("nothing to retry: the current image is not an edit")
            params = current.params
            stored = current.seed
            try:  # a turn imported before archives were validated may hold anything
                plan = EditPlan.model_validate(current.plan | {"rationale": f"retry of turn {current.id}, new seed"})
                if type(stored) is not int or not 0 <= stored < SEEDS:
                    raise ValueError(stored)
            except (ValidationError, TypeError, ValueError):
                raise UserError(f"turn {current.id} holds a damaged plan or seed: it cannot be retried; edit again "
                                "instead") from None
            seed = next_seed(stored) if seed is None else seed
            current = history.turn(current.parent)
            image = self.image(current)
        candidates = candidates or params.get("candidates") or self.settings.candidates
        request = EditRequest(
            source=image,
            plan=plan,
            seed=new_seed() if seed is None else seed,
            steps=steps or params.get("steps") or self.settings.steps,
            guidance=guidance or params.get("guidance") or self.settings.guidance,
            native_size=native_size,
            candidates=candidates,
            early_steps=early_steps or params.get("early_steps") or self.settings.early_steps,
            judge=self.judge if candidates > 1 else None,
        )
        result = self.engine.edit(request, events, cancel or threading.Event())
        edited = time.perf_counter()
        plan = plan.model_copy(update={"ic_prompt": result.ic_prompt})
        png = encode_png(result.image)
        draft = NewTurn(
            kind="edit",
            message=message,
            png=png,
            image_sha256=sha256(png),
            size=result.image.size,
            plan=plan.model_dump(),
            params={
                "seed": result.seed,
                "steps": request.steps,
                "guidance": request.guidance,
                "native_size": native_size,
                "engine": self.settings.engine,
                "rewriter": rewriter,
                "preset": self.settings.preset,
                "random_weights": result.random_weights,
                "nfe": result.nfe,
                "adapter": result.adapter.model_dump() if result.adapter else None,
                **self._filter_params(request, result),
            },
            timings=result.timings,
            replies=[("user", message), ("assistant", plan.rationale)],
        )
        parent = current.id if opening is None else history and history.cursor
        turn = self._announced(self.store.add_turns(self.session, parent, [opening, draft] if opening else [draft]))[-1]
        self._last_image = (turn.image_sha256, result.image)
        timings = {"rewrite": rewritten - started, **result.timings, "total": time.perf_counter() - started}
        timings["agent"] = timings["total"] - timings["rewrite"] - (edited - rewritten)
        return TurnOutcome(
            **common | {"plan": plan},
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
        return [
            TurnSummary(message=t.message, intent=t.plan["intent"], instruction=t.plan.get("instruction"))
            for t in path
            if t.plan
        ]


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
    if outcome.result is not None:
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
