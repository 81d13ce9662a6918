"""The early filter: a fair tournament, NFE accounting, the winner resumed, every surface."""

import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from assistant import early_filter
from assistant.cli import cli
from assistant.early_filter import tournament
from assistant.hookspecs import hookimpl
from assistant.models import CandidateInfo, EditPlan, EditRequest
from assistant.plugins import JudgeSpec, get_plugin_manager
from assistant.protocols import PairwiseJudge
from plugins.icedit.engine import IceditEngine
from plugins.icedit.options import IceditOptions

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def shade(value: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (value, value, value))


def candidates(*values: int, first_seed: int = 10) -> list[CandidateInfo]:
    return [
        CandidateInfo(seed=first_seed + i, preview=shade(v), preview_sha256=str(v))
        for i, v in enumerate(values)
    ]


class BiasedJudge(PairwiseJudge):
    """Prefers brighter images, but with a strong preference for whatever is shown first."""

    def __init__(self, bias: float = 3.0):
        self.bias, self.calls = bias, []

    def compare(self, instruction, source, a, b):
        self.calls.append((a.getpixel((0, 0))[0], b.getpixel((0, 0))[0]))
        d = (a.getpixel((0, 0))[0] - b.getpixel((0, 0))[0]) / 100
        return 1 / (1 + math.exp(-(self.bias + d)))


def test_both_orders_cancel_a_position_bias_and_the_brightest_wins():
    judge = BiasedJudge(bias=3.0)
    cands = candidates(40, 90, 200, 120)
    winner, verdicts = tournament(judge, "make it brighter", shade(0), cands)
    assert winner == 2
    # every match was asked both ways: (best, challenger) then (challenger, best)
    assert judge.calls == [(40, 90), (90, 40), (90, 200), (200, 90), (200, 120), (120, 200)]
    assert [(v.a, v.b, v.winner) for v in verdicts] == [(10, 11, 11), (11, 12, 12), (12, 13, 12)]
    for v in verdicts:
        assert v.p == pytest.approx((v.p_ab + 1 - v.p_ba) / 2)
    assert [c.wins for c in cands] == [0, 1, 2, 0]
    # Asked in one order only, this judge keeps the first candidate: the bias would decide.
    assert all(judge.compare("", None, shade(40), shade(x)) > 0.5 for x in (90, 200, 120))


def test_ties_go_to_the_lower_seed():
    class Indifferent(PairwiseJudge):
        def compare(self, *args):
            return 0.5

    winner, verdicts = tournament(Indifferent(), "x", shade(0), candidates(10, 200, 90))
    assert winner == 0
    assert [v.p for v in verdicts] == [0.5, 0.5]


@pytest.mark.parametrize("answer", [float("nan"), 1.5, -0.1, "yes", None, RuntimeError("CUDA error")])
def test_a_failing_or_garbage_judge_makes_that_match_a_coin_flip_by_seed_order(answer):
    class Broken(PairwiseJudge):
        def compare(self, instruction, source, a, b):
            if a.getpixel((0, 0))[0] == 200 or b.getpixel((0, 0))[0] == 200:
                if isinstance(answer, Exception):
                    raise answer
                return answer
            return 0.0 if a.getpixel((0, 0))[0] < b.getpixel((0, 0))[0] else 1.0  # brighter is better

    winner, verdicts = tournament(Broken(), "x", shade(0), candidates(40, 90, 200, first_seed=3))
    assert winner == 1  # 90 beat 40 fairly; 90 (seed 4) vs 200 (seed 5) fell back to seed order
    assert verdicts[0].note is None
    assert verdicts[1].note.startswith("judge failed") and verdicts[1].note.endswith("lower seed wins")
    assert verdicts[1].winner == 4 and verdicts[1].p == 1.0


class BrightJudge(PairwiseJudge):
    """A real Judge for the engine: the brighter right panel follows the instruction better."""

    def compare(self, instruction, source, a, b):
        return float(np.asarray(a).mean() > np.asarray(b).mean())


@pytest.fixture
def bright_judge():
    class Plugin:
        @hookimpl
        def register_judges(self, register):
            register(JudgeSpec("bright", lambda settings: BrightJudge(), "brighter wins"))

    pm = get_plugin_manager()
    pm.register(Plugin(), name="bright-judge")
    yield
    pm.unregister(name="bright-judge")


def test_engine_runs_candidates_batched_counts_nfe_and_resume_equals_a_plain_run(photo):
    engine = IceditEngine(IceditOptions(preset="tiny"))
    plan = EditPlan(intent="edit", instruction="add snow")
    events = []
    calls = []
    pipe = engine.pipeline()
    hook = pipe.transformer.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0] if i else None))
    try:
        result = early_filter.run(
            engine,
            EditRequest(source=photo, plan=plan, seed=5, steps=6, candidates=3, early_steps=2),
            BrightJudge(),
            events.append,
            threading.Event(),
        )
    finally:
        hook.remove()
    assert result.nfe == 3 * 2 + 6 - 2 == 10
    assert [c.seed for c in result.candidates] == [5, 6, 7]
    assert len(calls) == 2 + 4  # two batched calls for the candidates, four for the winner
    assert [c.kind for c in events if c.kind in ("candidates", "verdict")] == [
        "candidates",
        "verdict",
        "verdict",
    ]
    previews = next(e for e in events if e.kind == "candidates").previews
    brightness = [np.asarray(p).mean() for p in previews]
    assert result.seed == 5 + int(np.argmax(brightness))
    plain = engine.edit(
        EditRequest(source=photo, plan=plan, seed=result.seed, steps=6), lambda e: None, threading.Event()
    )
    # The winner resumed from its batched step-2 latents equals a plain run of its seed up to rounding
    # (batched matmuls sum in another order): at most 1/255 per pixel.
    diff = np.abs(np.asarray(result.image, dtype=np.int16) - np.asarray(plain.image, dtype=np.int16))
    assert diff.max() <= 1 and diff.mean() < 0.05


def test_early_steps_must_leave_steps_to_finish(photo):
    from assistant.errors import UserError

    engine = IceditEngine(IceditOptions(preset="tiny"))
    with pytest.raises(UserError, match=r"--early-steps must be between 1 and --steps - 1 \(3\), not 4"):
        early_filter.run(
            engine,
            EditRequest(
                source=photo,
                plan=EditPlan(intent="edit", instruction="x"),
                seed=1,
                steps=4,
                candidates=2,
                early_steps=4,
            ),
            BrightJudge(),
            lambda e: None,
            threading.Event(),
        )


def test_cli_reports_candidates_verdicts_nfe_saves_previews_and_replay_repeats_the_selection(
    bright_judge, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    args = [
        "edit",
        str(EXAMPLES / "chelsea.png"),
        "add snow",
        "--preset",
        "tiny",
        "--steps",
        "6",
        "--candidates",
        "3",
        "--early-steps",
        "2",
        "--seed",
        "5",
        "--judge",
        "bright",
        "-o",
        "f.png",
        "--json",
        "--save-candidates",
        "cands",
        "--session",
        "s",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["nfe"] == 10
    assert [c["seed"] for c in data["candidates"]] == [5, 6, 7]
    assert (data["verdicts"][0]["a"], data["verdicts"][0]["b"]) == (5, 6) and len(data["verdicts"]) == 2
    assert data["seed"] in (5, 6, 7)
    saved = sorted(p.name for p in (tmp_path / "cands").iterdir())
    assert saved == ["candidate-5.png", "candidate-6.png", "candidate-7.png"]
    from sessions.identity import pixel_digest

    assert [pixel_digest(Image.open(tmp_path / "cands" / n).convert("RGB")) for n in saved] == [
        c["preview_sha256"] for c in data["candidates"]
    ]
    # the stored turn keeps the selection; an export replays it to the same picture
    show = json.loads(CliRunner().invoke(cli, ["sessions", "show", "s", "--json"]).stdout)
    assert show["turns"][-1]["image_sha256"] == data["image_sha256"]
    assert CliRunner().invoke(cli, ["sessions", "export", "s", str(tmp_path / "s.toml")]).exit_code == 0
    script = (tmp_path / "s.toml").read_text()
    assert "candidates = 3" in script and "early_steps = 2" in script and "seed = 5" in script
    replay = CliRunner().invoke(
        cli, ["replay", str(tmp_path / "s.toml"), "--out", str(tmp_path / "r"), "--json"]
    )
    assert replay.exit_code == 0, replay.output
    row = json.loads(replay.stdout.splitlines()[-1])
    assert row["image_sha256"] == data["image_sha256"]
    assert row["candidate_seeds"] == [5, 6, 7] and row["seed"] == data["seed"]


def test_a_judge_with_compare_many_is_asked_both_orders_in_one_call():
    class Batched:
        def __init__(self):
            self.calls = []

        def compare_many(self, instruction, source, pairs):
            self.calls.append([(a.getpixel((0, 0))[0], b.getpixel((0, 0))[0]) for a, b in pairs])
            return [0.9 if a.getpixel((0, 0))[0] > b.getpixel((0, 0))[0] else 0.2 for a, b in pairs]

    judge = Batched()
    winner, verdicts = tournament(judge, "x", shade(0), candidates(50, 150))
    assert judge.calls == [[(50, 150), (150, 50)]]
    assert winner == 1 and verdicts[0].p == pytest.approx((0.2 + 1 - 0.9) / 2)
