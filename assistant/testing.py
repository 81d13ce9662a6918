"""A test kit for plugin authors: contract tests to subclass, and the fakes icedit's own suite uses.

Subclass a contract in a test module (the class name starting with `Test`) and say how to build the
object; every test of the contract then runs against it:

    from assistant.testing import EngineContract

    class TestMyEngine(EngineContract):
        def make_engine(self):
            return MyEngine(bits=3)

The object is built once per class by the `engine` / `rewriter` / `judge` / `scorer` fixture. When building it
needs other fixtures, override that fixture instead of `make_*`, as a class-scoped classmethod:

    @pytest.fixture(scope="class")
    @classmethod
    def judge(cls, tiny_vlm_folder):
        return MyJudge(tiny_vlm_folder)

The source picture and the request parameters are attributes and methods to override; the defaults
keep a model-backed engine fast (a 64x48 source, 2 steps, 1 early step, 2 candidates).

Needs pytest; imports no torch (the fakes and contracts use PIL only).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import pytest
from PIL import Image, ImageChops, ImageStat

from assistant import early_filter
from assistant.errors import Cancelled, UserError
from assistant.hookspecs import hookimpl
from assistant.models import (
    Candidates,
    EditPlan,
    EditRequest,
    EditResult,
    Example,
    Log,
    Step,
    TurnSummary,
    Verdict,
    next_seed,
)
from assistant.plugins import EngineSpec
from assistant.protocols import (
    CandidateEngine,
    CheckingJudge,
    Engine,
    Judge,
    PairwiseJudge,
    Rewriter,
    Scorer,
    VariationEngine,
)
from sessions.identity import encode_png

__all__ = [
    "registered",
    "BrighterJudge",
    "EngineContract",
    "FakeEngine",
    "FakePlugin",
    "JudgeContract",
    "RewriterContract",
    "gradient",
    "same_picture",
]


def gradient(size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A small deterministic RGB picture with structure in every channel (a flat one hides bugs)."""
    ramp = Image.linear_gradient("L")
    return Image.merge("RGB", (ramp.resize(size), ramp.rotate(90).resize(size), ramp.rotate(45).resize(size)))


def same_picture(a: Image.Image, b: Image.Image, tolerance: int = 0) -> bool:
    """Equal PNG bytes (tolerance 0), or the same size with no pixel off by more than `tolerance`."""
    if tolerance == 0:
        return encode_png(a) == encode_png(b)
    if a.size != b.size:
        return False
    difference = ImageStat.Stat(ImageChops.difference(a.convert("RGB"), b.convert("RGB")))
    return max(high for _, high in difference.extrema) <= tolerance


class BrighterJudge(PairwiseJudge):
    """A Judge without a model for early-filter tests: the brighter candidate wins, equal ones tie."""

    def __init__(self):
        self.calls = 0

    def compare(self, instruction: str, source: Image.Image, a: Image.Image, b: Image.Image) -> float:
        self.calls += 1
        left, right = (ImageStat.Stat(x.convert("L")).mean[0] for x in (a, b))
        return 1.0 if left > right else 0.0 if left < right else 0.5


# ------------------------------------------------------------------------------------------------- engines


class EngineContract:
    """What every `protocols.Engine` does (and a `CandidateEngine` on top); override `make_engine`."""

    instruction = "add a hat"
    seed = 7
    steps = 2
    """At least 2: the cancel test stops an edit between its first and second step."""
    guidance = 50.0
    early_steps = 1
    candidates = 2
    finish_tolerance = 0
    """How far a finished candidate's pixels may be from a plain edit of its seed (0: equal PNG bytes);
    an engine that batches candidates may round differently from a lone run."""

    def make_engine(self) -> Engine:
        raise NotImplementedError("subclass EngineContract and return your engine from make_engine()")

    def source(self) -> Image.Image:
        return gradient()

    def request(self, **changes) -> EditRequest:
        fields = {
            "seed": self.seed,
            "steps": self.steps,
            "guidance": self.guidance,
            "early_steps": self.early_steps,
            "plan": EditPlan(intent="edit", instruction=self.instruction),
        }
        return EditRequest(source=self.source(), **fields | changes)

    @pytest.fixture(scope="class")
    @classmethod
    def engine(cls) -> Engine:
        return cls().make_engine()

    @pytest.fixture(scope="class")
    @classmethod
    def plain_edit(cls, engine) -> Callable[[int], tuple[EditResult, list]]:
        """plain_edit(seed) -> (result, events) of `edit` with that seed, run once per class and shared."""
        done: dict[int, tuple[EditResult, list]] = {}

        def run(seed: int) -> tuple[EditResult, list]:
            if seed not in done:
                events: list = []
                done[seed] = (engine.edit(cls().request(seed=seed), events.append, threading.Event()), events)
            return done[seed]

        return run

    def test_result_is_an_edit_result_with_the_seed_at_the_source_size(self, engine, plain_edit):
        result, _ = plain_edit(self.seed)
        assert isinstance(result, EditResult)
        assert result.seed == self.seed
        assert result.image.size == self.source().size
        assert isinstance(engine.random_weights, bool)
        assert result.random_weights == engine.random_weights

    def test_reports_a_step_per_step_in_order_up_to_n(self, plain_edit):
        _, events = plain_edit(self.seed)
        assert all(isinstance(e, Step | Candidates | Verdict | Log) for e in events), events
        steps = [e for e in events if isinstance(e, Step)]
        assert {e.n for e in steps} == {self.steps}, steps
        seen = [e.i for e in steps]
        assert seen == sorted(seen), f"steps went backwards: {seen}"
        assert set(range(1, self.steps + 1)) <= set(seen) and max(seen) == self.steps, seen

    def test_cancel_between_steps_raises_cancelled_and_stops(self, engine):
        assert self.steps >= 2, "the cancel test needs at least 2 steps"
        cancel, after = threading.Event(), []

        def on_event(event) -> None:
            if cancel.is_set():
                after.append(event)
            elif isinstance(event, Step) and event.i >= 1:
                cancel.set()
                after.append(event)

        with pytest.raises(Cancelled):
            engine.edit(self.request(), on_event, cancel)
        assert after, "no step was reported before the edit ended"
        assert all(e.i <= after[0].i for e in after if isinstance(e, Step)), f"ran on after cancel: {after}"

    def test_same_seed_same_png_bytes_another_seed_another_image(self, engine, plain_edit):
        first, _ = plain_edit(self.seed)
        again = engine.edit(self.request(), lambda event: None, threading.Event())
        assert encode_png(again.image) == encode_png(first.image)
        other, _ = plain_edit(next_seed(self.seed))
        assert other.seed == next_seed(self.seed)
        assert encode_png(other.image) != encode_png(first.image)

    @pytest.mark.parametrize("instruction", [None, "", "   "])
    def test_an_empty_instruction_is_a_user_error(self, engine, instruction):
        plan = EditPlan(intent="edit", instruction=instruction)
        with pytest.raises(UserError):
            engine.edit(self.request(plan=plan), lambda event: None, threading.Event())

    def _seeds(self) -> list[int]:
        return [next_seed(self.seed, k) for k in range(self.candidates)]

    def _spent(self) -> int:
        return self.candidates * self.early_steps + self.steps - self.early_steps

    def test_candidates_preview_each_seed_and_finish_as_a_plain_edit(self, engine, plain_edit):
        if not isinstance(engine, CandidateEngine):
            pytest.skip("not a CandidateEngine")
        seeds = self._seeds()
        started = engine.start_candidates(
            self.request(candidates=len(seeds)), seeds, lambda e: None, threading.Event()
        )
        previews = list(started.previews)
        assert len(previews) == len(seeds) and all(isinstance(p, Image.Image) for p in previews)
        last = len(seeds) - 1  # not the first: a run that always finishes candidate 0 shows here
        finished = started.finish(last, lambda event: None, threading.Event())
        assert isinstance(finished, EditResult)
        assert (finished.seed, finished.nfe) == (seeds[last], self._spent())
        plain, _ = plain_edit(seeds[last])
        assert same_picture(finished.image, plain.image, self.finish_tolerance)

    def test_the_host_early_filter_runs_it_with_a_judge(self, engine, plain_edit):
        if not isinstance(engine, CandidateEngine):
            pytest.skip("not a CandidateEngine")
        events: list = []
        judge = BrighterJudge()
        result = early_filter.run(
            engine, self.request(candidates=self.candidates), judge, events.append, threading.Event()
        )
        shown = next(e for e in events if isinstance(e, Candidates))
        brightness = [ImageStat.Stat(p.convert("L")).mean[0] for p in shown.previews]
        winner = shown.seeds[brightness.index(max(brightness))]  # ties go to the lower seed
        assert [c.seed for c in result.candidates] == shown.seeds == self._seeds()
        assert len(result.verdicts) == self.candidates - 1 and judge.calls == 2 * (self.candidates - 1)
        assert (result.seed, result.nfe) == (winner, self._spent())
        assert same_picture(result.image, plain_edit(winner)[0].image, self.finish_tolerance)

    def test_variations_paint_what_plain_edits_of_their_seeds_paint(self, engine, plain_edit):
        if not isinstance(engine, VariationEngine):
            pytest.skip("not a VariationEngine")
        seeds = self._seeds()
        events: list = []
        results = engine.edit_variations(self.request(), seeds, events.append, threading.Event())
        assert [r.seed for r in results] == seeds and {r.nfe for r in results} == {self.steps}
        for seed, result in zip(seeds, results, strict=True):
            assert same_picture(result.image, plain_edit(seed)[0].image, self.finish_tolerance), seed
        assert max(e.i for e in events if isinstance(e, Step)) == self.steps


# ----------------------------------------------------------------------------------------------- rewriters


class RewriterContract:
    """What every `protocols.Rewriter` does; override `make_rewriter` (and `intents` if it reads otherwise)."""

    intents: Sequence[tuple[str, str]] = (
        ("add a hat", "edit"),
        ("make it look like winter", "edit"),
        ("undo", "undo"),
    )
    """(message, the intent it must read); an edit must come with a non-empty instruction."""
    odd_messages: Sequence[str] = (
        "",
        "   ",
        "?!",
        "\u2026",
        "a" * 10_000,
        "add " * 2_000,
        "\U0001f3a9 \u00fcn\u00efc\u00f6d\u00e9 \u5e3d\u5b50 \u0645\u0631\u062d\u0628\u0627",
        "tab\tnew\nline\r\x00nul",
        "\u202eevil\u202c",
        "undo undo undo",
    )
    """Messages a person may type: the rewriter returns a plan or raises UserError, nothing else."""

    def make_rewriter(self) -> Rewriter:
        raise NotImplementedError("subclass RewriterContract and return your rewriter from make_rewriter()")

    def image(self) -> Image.Image:
        return gradient()

    def context(self) -> list[TurnSummary]:
        """A past turn, as the host passes one: odd messages are read with and without it."""
        return [TurnSummary(message="add a red scarf", intent="edit", instruction="add a red scarf")]

    @pytest.fixture(scope="class")
    @classmethod
    def rewriter(cls) -> Rewriter:
        return cls().make_rewriter()

    def test_reads_each_message_as_its_intent(self, rewriter):
        for message, intent in self.intents:
            plan = rewriter.rewrite(self.image(), message, [])
            assert isinstance(plan, EditPlan), (message, plan)
            assert plan.intent == intent, (message, plan)
            if intent == "edit":
                assert plan.instruction and plan.instruction.strip(), (message, plan)
                assert all((step.instruction or "").strip() for step in plan.steps()), (message, plan)

    def test_odd_text_gives_a_plan_or_a_user_error(self, rewriter):
        for context in ([], self.context()):
            for message in self.odd_messages:
                try:
                    plan = rewriter.rewrite(self.image(), message, context)
                except UserError:
                    continue
                assert isinstance(plan, EditPlan), (message[:40], plan)


# -------------------------------------------------------------------------------------------------- judges


class JudgeContract:
    """What every `protocols.Judge` does; override `make_judge`."""

    instruction = "add a hat"
    tolerance = 1e-4
    """How far `compare_many` may be from `compare` (a batched forward pass rounds differently)."""

    def make_judge(self) -> Judge:
        raise NotImplementedError("subclass JudgeContract and return your judge from make_judge()")

    def source(self) -> Image.Image:
        return gradient()

    def pictures(self) -> tuple[Image.Image, Image.Image]:
        """Two candidates that differ: the source tinted two ways."""
        src = self.source()
        return (
            ImageChops.add(src, Image.new("RGB", src.size, (90, 0, 0))),
            ImageChops.add(src, Image.new("RGB", src.size, (0, 0, 90))),
        )

    @pytest.fixture(scope="class")
    @classmethod
    def judge(cls) -> Judge:
        return cls().make_judge()

    def _pairs(self) -> list[tuple[Image.Image, Image.Image]]:
        a, b = self.pictures()
        return [(a, b), (b, a), (a, a)]

    def test_compare_is_a_probability(self, judge):
        for a, b in self._pairs():
            p = judge.compare(self.instruction, self.source(), a, b)
            assert isinstance(p, float) and 0.0 <= p <= 1.0, p

    def test_compare_many_gives_one_probability_per_pair_as_compare_does(self, judge):
        pairs = self._pairs()
        many = list(judge.compare_many(self.instruction, self.source(), pairs))
        assert len(many) == len(pairs)
        one_by_one = [judge.compare(self.instruction, self.source(), a, b) for a, b in pairs]
        assert many == pytest.approx(one_by_one, abs=self.tolerance)

    def test_a_judge_that_checks_gives_a_probability_per_edit(self, judge):
        if not isinstance(judge, CheckingJudge):
            pytest.skip("this judge does not check single edits (the self-check runs without it)")
        for edit in (*self.pictures(), self.source()):
            p = judge.check(self.instruction, self.source(), edit)
            assert isinstance(p, float) and 0.0 <= p <= 1.0, p


class ScorerContract:
    """What every `protocols.Scorer` does; override `make_scorer`."""

    def make_scorer(self) -> Scorer:
        raise NotImplementedError("subclass ScorerContract and return your scorer from make_scorer()")

    def examples(self) -> list[Example]:
        """Three edits: one that changed the picture, one that did not, one without a target."""
        src = gradient()
        tinted = ImageChops.add(src, Image.new("RGB", src.size, (90, 0, 0)))
        return [
            Example("make it red", src, tinted, tinted, "a gradient", "a red gradient"),
            Example("make it red", src, src, tinted),
            Example("add a hat", src, tinted),
        ]

    @pytest.fixture(scope="class")
    @classmethod
    def scorer(cls) -> Scorer:
        return cls().make_scorer()

    def test_metrics_have_their_own_keys_and_the_report_their_models(self, scorer):
        keys = [m.key for m in scorer.metrics]
        assert keys and len(keys) == len(set(keys))
        assert isinstance(scorer.models, dict) and isinstance(scorer.random_weights, bool)

    def test_one_scores_per_example_with_a_number_or_none_for_each_metric(self, scorer):
        examples = self.examples()
        found = scorer.score(examples)
        assert len(found) == len(examples)
        for scores in found:
            assert set(scores.values) == {m.key for m in scorer.metrics}
            assert all(
                v is None or (isinstance(v, float) and math.isfinite(v)) for v in scores.values.values()
            )

    def test_the_same_edits_score_the_same(self, scorer):
        assert [s.values for s in scorer.score(self.examples())] == [
            s.values for s in scorer.score(self.examples())
        ]


# --------------------------------------------------------------------------------------------------- fakes


class FakeEngine:
    """A real Engine and CandidateEngine without a model, for tests of the host (agent, CLI, chat): it
    tints the source by seed and records every request in `calls`. Each candidate's preview is its
    finished picture."""

    random_weights = False

    def __init__(self):
        self.calls: list[EditRequest] = []

    def _paint(
        self, request: EditRequest, seed: int, steps: int, events, cancel: threading.Event
    ) -> Image.Image:
        instruction = request.plan.instruction or ""
        if not instruction.strip():
            raise UserError("the plan has no instruction to edit with")
        for i in range(1, steps + 1):
            if cancel.is_set():
                raise Cancelled("edit cancelled between steps: nothing was saved")
            events(Step(i=i, n=steps, phase="denoise"))
        tint = Image.new("RGB", request.source.size, (seed % 256, len(instruction) % 256, 40))
        return ImageChops.add(request.source, tint)

    def edit(self, request: EditRequest, events, cancel: threading.Event) -> EditResult:
        self.calls.append(request)
        image = self._paint(request, request.seed, request.steps, events, cancel)
        return EditResult(
            image=image, seed=request.seed, prompt=f"fake: {request.plan.instruction}", nfe=request.steps
        )

    def start_candidates(self, request: EditRequest, seeds: list[int], events, cancel: threading.Event):
        self.calls.append(request)
        previews = [self._paint(request, s, request.early_steps, events, cancel) for s in seeds]
        spent = len(seeds) * request.early_steps + request.steps - request.early_steps

        class Started:
            def __init__(self):
                self.previews = previews

            def finish(self, index, events, cancel):
                return EditResult(
                    image=previews[index],
                    seed=seeds[index],
                    nfe=spent,
                    prompt=f"fake: {request.plan.instruction}",
                )

        return Started()


class FakePlugin:
    """Registers engine 'fake' (one FakeEngine, as `engine`) and records `turn_finished` calls."""

    def __init__(self):
        self.engine = FakeEngine()
        self.finished: list = []

    @hookimpl
    def register_engines(self, register):
        register(EngineSpec("fake", lambda settings: self.engine, "test double"))

    @hookimpl
    def turn_finished(self, session, turn):
        self.finished.append((session, turn.id))


@contextmanager
def registered(plugin: object, name: str) -> Iterator[None]:
    """`plugin` registered with icedit's plugin manager for the block, as its entry point would register
    it: its engines, rewriters, judges and commands (the `icedit` group asks for plugin commands afresh)
    are there inside the block and gone after it."""
    from assistant.cli import cli
    from assistant.plugins import get_plugin_manager

    pm = get_plugin_manager()
    pm.register(plugin, name=name)
    cli.forget_plugin_commands()
    try:
        yield
    finally:
        pm.unregister(name=name)
        cli.forget_plugin_commands()
