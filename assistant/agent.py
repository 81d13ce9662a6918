"""One turn of the conversation: message -> rewriter -> plan -> engine or history move -> commit.

The CLI, replay and the chat all drive this class; none of them touches the engine or the store's
turn logic directly. An edit that fails or is cancelled commits nothing of itself; in a plan of
several steps, or among the self-check's attempts, what landed before it stays (`TurnOutcome.stopped`).
"""

from __future__ import annotations

import inspect
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any, get_args

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from assistant import early_filter, plugins
from assistant.errors import Cancelled, UserError
from assistant.models import (
    SEEDS,
    CandidateCount,
    Checked,
    Choices,
    EarlySteps,
    EditPlan,
    EditRequest,
    EditResult,
    Guidance,
    Intent,
    Landed,
    Planned,
    Steps,
    TurnSummary,
    next_seed,
    probability,
)
from assistant.preflight import check_variations, checks, rewriter_name
from assistant.protocols import CheckingJudge, Engine, Events, Judge, Rewriter, VariationEngine
from assistant.settings import Settings
from assistant.text import check_message, printable
from sessions.history import History, Turn
from sessions.identity import encode_png, pixel_digest
from sessions.store import NewTurn, Store

CONTEXT_TURNS = 6
LISTED_TURNS = 40
"""Turns a rewriter is shown to jump to: enough for a chat, few enough for a prompt."""


class Attempt(BaseModel):
    """One seed the self-check judged: its turn, its score (None: the judge failed) and its cost."""

    attempt: int
    seed: int
    turn: int
    score: float | None
    nfe: int
    seconds: float


class TurnOutcome(BaseModel):
    """What a turn did, for the CLI's JSON and the chat's log. A plan of several steps is described by
    its last step's outcome, which lists every step's (`steps`)."""

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
    planned: list[str] = Field([], description="a plan of several steps: each step's instruction, in order")
    steps: list[TurnOutcome] = Field([], description="each landed step's outcome, in order (this one last)")
    attempts: list[Attempt] = Field([], description="with the self-check on: every attempt, in order")
    variations: list[TurnOutcome] = Field([], description="-n N: each variation's outcome (this one first)")
    stopped: str | None = Field(
        None, description="why a plan or its attempts ended early (what landed is kept)"
    )
    exit_code: int = Field(0, description="with `stopped`: the exit status of the error that stopped it")
    notes: list[str] = Field([], description="what the person should know: a self-check that could not run")

    @property
    def nfe(self) -> int:
        """Transformer evaluations the whole turn spent: every step, every attempt."""
        if self.steps:
            return sum(step.nfe for step in self.steps)
        if self.variations:
            return sum(v.result.nfe for v in self.variations if v.result)
        if self.attempts:
            return sum(a.nfe for a in self.attempts)
        return self.result.nfe if self.result else 0


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
    step: list[int] | None = Field(None, description="[i, n]: step i of a plan of n")

    def outcome(self, **fields: Any) -> TurnOutcome:
        return TurnOutcome(
            message=self.message, intent=self.intent, rewriter=self.rewriter, **{"plan": self.plan} | fields
        )


def new_seed() -> int:
    return secrets.randbelow(2**31)


class Agent:
    """Drives one named session of a store with the engine and rewriter named in settings."""

    def __init__(self, store: Store, session: str, settings: Settings, engine: Engine | None = None):
        """`engine`: one already built for these settings (replaying a folder keeps its pipeline loaded)."""
        self.store = store
        self.session = session
        self.settings = settings
        self._engine: Engine | None = engine
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
    def loaded_engine(self) -> Engine | None:
        """The engine if it was built already (nothing is loaded to answer)."""
        return self._engine

    def drop_engine(self) -> None:
        """Build the engine afresh on the next edit (its options changed)."""
        self._engine = None

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
                self.store.picture(turn.image_sha256).convert("RGB"),
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
        digest = pixel_digest(image)
        if history is not None:
            if history.cursor_turn().image_sha256 == digest:
                return history.cursor_turn()
            for turn in reversed(history.turns):
                if turn.image_sha256 == digest:
                    return turn
        return NewTurn(
            kind="open",
            message=message,
            png=encode_png(image),
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
        variations: int = 1,
        **sampling: Any,
    ) -> TurnOutcome:
        """Run one message: place the source, read the message into a plan, carry the plan out.

        `source` (image, message) edits that image: from the turn showing it if the session has
        one, else from a new "open" turn committed together with the edit, so a failed edit leaves
        no trace. `instruction` skips the rewriter (replay of an exported session). `variations`: an
        edit painted with that many seeds, each its own turn (`-n`). `sampling`: seed, steps,
        guidance, native_size, candidates, early_steps (None: the settings' value).
        """
        started = time.perf_counter()
        message = check_message(message)
        cancel = cancel or threading.Event()
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
            turns = self._turns(history, current.id) if history and current else []
            known = {"turns": turns, "choices": _choices(history, current)}
            takes = inspect.signature(self.rewriter.rewrite).parameters
            plan = self.rewriter.rewrite(
                image, message, context, **{k: v for k, v in known.items() if k in takes}
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
            return read.outcome(reply=f"{plan.intent}: back at turn {turn.id} ({turn.label})", turn=turn)
        if plan.intent == "jump":
            if history is None or plan.turn is None:
                raise UserError("nothing to go back to: the session has no turns yet")
            turn = self.jump(plan.turn, message)  # a turn the session lacks is one line; nothing moves
            return read.outcome(
                reply=f"jump: at turn #{turn.id} ({turn.label}); an edit from here starts a branch",
                turn=turn,
            )
        if plan.intent in ("answer", "clarify"):
            if history is not None:
                self.store.log(self.session, [("user", message), ("assistant", plan.rationale)])
            return read.outcome(reply=plan.rationale)
        if plan.intent == "retry":
            return self._retry(read, history, current, events, cancel, **sampling)
        opening = place if isinstance(place, NewTurn) else None
        parent = place.id if isinstance(place, Turn) else (history.cursor if history else None)
        if variations > 1:
            return self._variations(read, image, parent, opening, variations, events, cancel, **sampling)
        return self._plan(read, image, parent, opening, events, cancel, **sampling)

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
        return self._retry(
            read, history, self.current(history), events, cancel or threading.Event(), **sampling
        )

    def _retry(
        self,
        read: _Read,
        history: History | None,
        current: Turn | None,
        events: Events,
        cancel: threading.Event,
        seed: int | None = None,
        **sampling: Any,
    ) -> TurnOutcome:
        if history is None or current is None or not _retryable(current):
            raise UserError("nothing to retry: the current image is not an edit")
        assert current.plan is not None and current.parent is not None  # what _retryable checked
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
        seed = _unused_seed(history, current) if seed is None else seed
        return self._attempts(  # "another seed" is one more picture: scored if the check is on, not retried
            read,
            self.image(parent),
            parent.id,
            None,
            earlier,
            events,
            cancel,
            **sampling | {"seed": seed, "attempts": 1, "check": checks(self.settings)},
        )

    def _plan(
        self,
        read: _Read,
        image: Image.Image,
        parent: int | None,
        opening: NewTurn | None,
        events: Events,
        cancel: threading.Event,
        seed: int | None = None,
        **sampling: Any,
    ) -> TurnOutcome:
        """Carry out an edit of one step or several (`EditPlan.then`), each step from the one before's
        picture and committed as it lands, so undo walks back one step. A failure or a cancel after the
        first step stops the plan there and keeps the steps that landed (`stopped` says why)."""
        steps = read.plan.steps()
        if len(steps) == 1:
            return self._attempts(read, image, parent, opening, {}, events, cancel, seed=seed, **sampling)
        planned = [step.instruction or "" for step in steps]
        events(Planned(steps=planned))
        done: list[TurnOutcome] = []
        stopped, code = None, 0
        for i, step in enumerate(steps):
            now = time.perf_counter()
            this = read.model_copy(
                update={"plan": step, "step": [i + 1, len(steps)]}
                | ({"started": now, "rewritten": now} if done else {})
            )
            try:
                if done and cancel.is_set():
                    raise Cancelled("cancelled")
                outcome = self._attempts(
                    this,
                    image,
                    parent,
                    None if done else opening,
                    {},
                    events,
                    cancel,
                    seed=None if seed is None else next_seed(seed, i),
                    **sampling,
                )
            except UserError as e:  # Cancelled too: what landed stays, the rest does not run
                if not done:
                    raise
                stopped, code = f"step {i + 1} of {len(steps)}: {e}", e.exit_code
                break
            assert outcome.turn is not None and outcome.result is not None  # an edit always paints
            done.append(outcome)
            events(
                Landed(
                    step=i + 1,
                    of=len(steps),
                    turn=outcome.turn.id,
                    instruction=planned[i],
                    image=outcome.result.image,
                    source=image,
                )
            )
            image, parent = outcome.result.image, outcome.turn.id
            if outcome.stopped:  # its attempts were cut short: the next step would start from a guess
                stopped, code = f"step {i + 1} of {len(steps)}: {outcome.stopped}", outcome.exit_code
                break
        landed = ", ".join(f"#{o.turn.id} {o.plan.instruction}" for o in done if o.turn)
        reply = f"{len(done)} of {len(steps)} steps: {landed}" + (
            f"; stopped at {stopped}" if stopped else ""
        )
        notes = list(dict.fromkeys(note for o in done for note in o.notes))  # each step's, said once
        return done[-1].model_copy(
            update={
                "planned": planned,
                "steps": done,
                "stopped": stopped,
                "exit_code": code,
                "reply": reply,
                "notes": notes,
            }
        )

    def _variations(
        self,
        read: _Read,
        image: Image.Image,
        parent: int | None,
        opening: NewTurn | None,
        n: int,
        events: Events,
        cancel: threading.Event,
        seed: int | None = None,
        attempts: int | None = None,
        accept: float | None = None,
        check: bool | None = None,
        **sampling: Any,
    ) -> TurnOutcome:
        """One edit painted with seeds S..S+n-1 at once (batched by an engine that can), each committed as
        a sibling turn: pictures to choose from. The cursor ends on the last; any of them continues."""
        if len(read.plan.steps()) > 1:
            raise UserError(
                f"-n {n} paints variations of one change; this message asks for {len(read.plan.steps())} "
                "in a row: ask for one, or leave out -n"
            )
        request = self._request(read, image, {}, seed=new_seed() if seed is None else seed, **sampling)
        check_variations(n, request.candidates, checks(self.settings, attempts, check))
        seeds = [next_seed(request.seed, i) for i in range(n)]
        engine = self.engine

        def painted() -> Iterator[EditResult]:
            """Batched, all at once; else one seed at a time, each kept as it is painted."""
            if isinstance(engine, VariationEngine):
                results = engine.edit_variations(request, seeds, events, cancel)
                if [r.seed for r in results] != seeds:
                    raise ValueError(
                        f"engine {self.settings.engine} painted {[r.seed for r in results]}, not {seeds}"
                    )
                yield from results
                return
            for seed in seeds:
                if seed != seeds[0] and cancel.is_set():
                    raise Cancelled("cancelled")
                yield engine.edit(request.model_copy(update={"seed": seed}), events, cancel)

        done: list[TurnOutcome] = []
        stopped, code = None, 0
        results = painted()
        while True:
            try:
                result = next(results, None)
            except UserError as e:  # Cancelled too: the variations painted so far are kept
                if not done:
                    raise
                stopped, code = f"variation {len(done) + 1} of {n}: {e}", e.exit_code
                break
            if result is None:
                break
            outcome = self._commit(read, request, result, parent, None if done else opening, None)
            assert outcome.turn is not None
            parent = outcome.turn.parent  # the opened picture, once the first committed it
            done.append(outcome)
        made = ", ".join(f"#{o.turn.id} seed {o.result.seed}" for o in done if o.turn and o.result)
        return done[0].model_copy(
            update={
                "variations": done,
                "reply": f"{len(done)} of {n} variations: {made}" if stopped else f"{n} variations: {made}",
                "stopped": stopped,
                "exit_code": code,
            }
        )

    def _attempts(
        self,
        read: _Read,
        image: Image.Image,
        parent: int | None,
        opening: NewTurn | None,
        earlier: dict[str, Any],
        events: Events,
        cancel: threading.Event,
        *,
        seed: int | None = None,
        attempts: int | None = None,
        accept: float | None = None,
        check: bool | None = None,
        **sampling: Any,
    ) -> TurnOutcome:
        """Paint `read.plan` from `image` under `parent` (after `opening`, when new). With the self-check
        on (`check`, or more than one attempt), the judge scores the result; below `accept` the next seed
        runs, up to `attempts`, each attempt a sibling turn with its score, and the cursor ends on the
        best. A failure or cancel after the first attempt keeps the ones that landed."""
        notes: list[str] = []
        checker = self._checker(notes) if checks(self.settings, attempts, check) else None
        attempts = (attempts or self.settings.attempts) if checker else 1
        accept = self.settings.accept if accept is None else accept
        seed = new_seed() if seed is None else seed
        tried: list[TurnOutcome] = []
        records: list[Attempt] = []
        stopped, code = None, 0
        for k in range(attempts):
            began = time.perf_counter()
            try:
                if tried and cancel.is_set():
                    raise Cancelled("cancelled")
                request = self._request(read, image, earlier, seed=seed, **sampling)
                result = self._paint(request, events, cancel)
            except UserError as e:
                if not tried:
                    raise
                stopped, code = f"attempt {k + 1} of {attempts}: {e}", e.exit_code
                break
            score = None
            judged: dict[str, Any] | None = None
            if checker is not None:
                score, note = self._score(checker, read.plan, image, result)
                notes += [note] if note else []
                judged = {"score": score, "accept": accept, "attempt": k + 1, "attempts": attempts}
                judged |= {"judge": self.settings.judge} | ({"note": note} if note else {})
            outcome = self._commit(read, request, result, parent, None if tried else opening, judged)
            assert outcome.turn is not None
            parent = outcome.turn.parent  # the opened picture, once the first attempt committed it
            tried.append(outcome)
            records.append(
                Attempt(
                    attempt=k + 1,
                    seed=result.seed,
                    turn=outcome.turn.id,
                    score=score,
                    nfe=result.nfe,
                    seconds=time.perf_counter() - began,
                )
            )
            if checker is None:
                break
            passed = score is not None and score >= accept
            events(
                Checked(
                    attempt=k + 1,
                    attempts=attempts,
                    seed=result.seed,
                    turn=outcome.turn.id,
                    score=score,
                    accepted=passed,
                )
            )
            if passed or score is None:
                break
            seed = next_seed(request.seed, request.candidates)  # past every candidate this attempt tried
        if checker is None:
            return tried[0].model_copy(update={"notes": notes})
        best = max(
            range(len(tried)), key=lambda i: (records[i].score if records[i].score is not None else -1, -i)
        )
        kept = tried[best]
        assert kept.turn is not None and kept.result is not None
        if best != len(tried) - 1:
            self.store.move_cursor(
                self.session, kept.turn.id, [("assistant", f"kept attempt {best + 1} of {len(tried)}")]
            )
            self._last_image = (kept.turn.image_sha256, kept.result.image)
        return kept.model_copy(
            update={
                "attempts": records,
                "stopped": stopped,
                "exit_code": code,
                "notes": notes,
                "reply": f"{kept.reply} ({_verdict(records, best, accept)})",
            }
        )

    def _checker(self, notes: list[str]) -> CheckingJudge | None:
        """The judge, when it can check one edit; else None and a note (each edit then runs once)."""
        judge = self.judge
        if isinstance(judge, CheckingJudge):
            return judge
        notes.append(f"judge {self.settings.judge} cannot check an edit: it ran once, unchecked")
        return None

    @staticmethod
    def _score(
        checker: CheckingJudge, plan: EditPlan, source: Image.Image, result: EditResult
    ) -> tuple[float | None, str | None]:
        """The judge's P(yes) for the result; a judge that fails leaves the attempt unjudged, and says why."""
        try:
            return probability(checker.check(plan.instruction or "", source, result.image)), None
        except Exception as e:  # noqa: BLE001 - the picture is painted: keep it, unjudged
            return (
                None,
                f"self-check failed ({type(e).__name__}: {str(e)[:80]}): the attempt is kept unjudged",
            )

    def _request(
        self,
        read: _Read,
        image: Image.Image,
        earlier: dict[str, Any],
        *,
        seed: int,
        steps: int | None = None,
        guidance: float | None = None,
        native_size: bool | None = None,
        candidates: int | None = None,
        early_steps: int | None = None,
    ) -> EditRequest:
        """The engine's request: unset sampling values come from `earlier` (a retried turn's parameters),
        then the settings."""
        return EditRequest(
            source=image,
            plan=read.plan,
            seed=seed,
            steps=steps or earlier.get("steps") or self.settings.steps,
            guidance=guidance or earlier.get("guidance") or self.settings.guidance,
            native_size=bool(earlier.get("native_size", False)) if native_size is None else native_size,
            candidates=candidates or earlier.get("candidates") or self.settings.candidates,
            early_steps=early_steps or earlier.get("early_steps") or self.settings.early_steps,
        )

    def _paint(self, request: EditRequest, events: Events, cancel: threading.Event) -> EditResult:
        if request.candidates > 1:
            return early_filter.run(
                self.engine, request, self.judge, events, cancel, f"engine {self.settings.engine}"
            )
        return self.engine.edit(request, events, cancel)

    def _commit(
        self,
        read: _Read,
        request: EditRequest,
        result: EditResult,
        parent: int | None,
        opening: NewTurn | None,
        judged: dict[str, Any] | None,
    ) -> TurnOutcome:
        """Store the painted result as an edit turn under `parent` (after `opening`, when new)."""
        edited = time.perf_counter()
        plan = read.plan.model_copy(update={"ic_prompt": result.prompt})
        draft = NewTurn(
            kind="edit",
            message=read.message,
            png=encode_png(result.image),
            image_sha256=pixel_digest(result.image),
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
                "model": result.model.model_dump() if result.model else None,
                "adapter": result.adapter.model_dump() if result.adapter else None,
                **({"extras": result.extras} if result.extras else {}),
                **({"plan_step": read.step} if read.step else {}),
                **({"check": judged} if judged else {}),
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


def _verdict(records: list[Attempt], best: int, accept: float) -> str:
    """What the self-check made of the attempts, in a few words."""
    score = records[best].score
    said = (
        "unjudged"
        if score is None
        else f"score {score:.2f}" + (" passed" if score >= accept else f" < {accept:g}")
    )
    if len(records) == 1:
        return f"self-check: {said}"
    return f"kept attempt {best + 1} of {len(records)}, seed {records[best].seed}: {said}"


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


def _unused_seed(history: History, current: Turn) -> int:
    """The seed after the current turn's that none of its siblings painted with (nor tried as an early-
    filter candidate): after attempts 10, 11, 12 with the cursor on 10, "another seed" is 13, not 11."""
    used: set[object] = set()
    for sibling in history.children(current.parent):
        if sibling.plan == current.plan:
            tried = sibling.params.get("candidate_seeds")
            used |= {sibling.seed, *(tried if isinstance(tried, list) else [])}
    seed = next_seed(current.seed or 0)
    while seed in used:
        seed = next_seed(seed)
    return seed


def _retryable(turn: Turn) -> bool:
    """Whether "the same edit with another seed" has an edit to repeat: an edit turn with its plan."""
    return turn.kind == "edit" and bool(turn.plan) and turn.parent is not None


def _choices(history: History | None, current: Turn | None) -> Choices:
    """The intents that can apply now, and every turn a jump may name (all of the session's: "branch
    from turn 3" in a long session is no less possible for being off the listed ones)."""
    if history is None or current is None:
        return Choices(intents=["edit", "answer", "clarify"])
    others = [t.id for t in history.turns if t.id != current.id]
    can = {
        "undo": current.parent is not None,
        "redo": bool(history.children(current.id)),
        "retry": _retryable(current),
        "jump": bool(others),
    }
    intents = [i for i in get_args(Intent) if can.get(i, True)]
    return Choices(intents=intents, turns=others)


def progress_line(event: Planned | Landed | Checked) -> str:
    """A plan, a landed step or a self-check verdict as one line (the CLI's stderr, the chat's log)."""
    if isinstance(event, Planned):
        steps = "; ".join(f"{i}. {printable(step)}" for i, step in enumerate(event.steps, 1))
        return f"plan of {len(event.steps)} edits: {steps}"
    if isinstance(event, Landed):
        return f"step {event.step} of {event.of} done: turn #{event.turn} ({printable(event.instruction)})"
    score = "unjudged" if event.score is None else f"score {event.score:.2f}"
    verdict = "passed" if event.accepted else ("kept unjudged" if event.score is None else "below the bar")
    return f"attempt {event.attempt} of {event.attempts} (seed {event.seed}, turn #{event.turn}): {score}, {verdict}"


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
            "nfe": outcome.nfe,  # the whole turn's: every step and attempt
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
    if outcome.attempts and not outcome.planned:  # a plan's are in each of `landed`
        out["attempts"] = [a.model_dump() for a in outcome.attempts]
    if outcome.planned:
        out |= {"plan": outcome.planned, "landed": [describe(step) for step in outcome.steps]}
    if outcome.variations:
        out["variations"] = [describe(v) for v in outcome.variations]
    if outcome.stopped:
        out["stopped"] = outcome.stopped
    if outcome.notes:
        out["notes"] = outcome.notes
    return out | extra
