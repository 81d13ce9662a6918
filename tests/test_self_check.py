"""The self-check and automatic retries (issue 18, part 2): a judge scores each finished edit; below
`accept` the next seed runs, up to `attempts`; every attempt is a sibling turn with its score and the
cursor ends on the best."""

from __future__ import annotations

import json
import threading

import pytest
from click.testing import CliRunner
from PIL import Image

from assistant.agent import Agent, describe
from assistant.cli import cli
from assistant.hookspecs import hookimpl
from assistant.plugins import JudgeSpec
from assistant.protocols import PairwiseJudge
from assistant.replay import total_nfe
from assistant.settings import ACCEPT, Settings
from assistant.testing import BrighterJudge, registered
from sessions.scripts import ReplayScript
from sessions.store import Store


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="icedit")


class Scripted(PairwiseJudge):
    """Checks edits with the scores it is given, in order; records what it was shown."""

    def __init__(self, *scores: object):
        self.scores = list(scores)
        self.seen: list[tuple[str, Image.Image, Image.Image]] = []

    def compare(self, instruction, source, a, b) -> float:
        return 0.5

    def check(self, instruction, source, edit) -> float:
        self.seen.append((instruction, source, edit))
        answer = self.scores.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[return-value]


class Judges:
    """Registers judge "scripted" (the current `Scripted`) and "pairwise" (one that cannot check)."""

    def __init__(self):
        self.judge = Scripted()

    @hookimpl
    def register_judges(self, register):
        register(JudgeSpec("scripted", lambda settings: self.judge, "scores from a list"))
        register(JudgeSpec("pairwise", lambda settings: BrighterJudge(), "compares only"))


@pytest.fixture
def judges(fake):
    plugin = Judges()
    with registered(plugin, "test-judges"):
        yield plugin


def agent_with(store, judges, *scores, **settings) -> Agent:
    judges.judge = Scripted(*scores)
    return Agent(store, "s", Settings(engine="fake", judge="scripted", steps=3, **settings))


def siblings(store) -> list[tuple[int, int | None, int, float | None]]:
    """(id, parent, seed, score) of every edit turn."""
    return [
        (t.id, t.parent, t.seed, t.params["check"]["score"])
        for t in store.history("s").turns
        if t.kind == "edit"
    ]


# -------------------------------------------------------------------------------------------- the agent


def test_a_rejected_first_attempt_makes_the_next_seed_run(judges, store, photo):
    agent = agent_with(store, judges, 0.2, 0.9, attempts=3)
    events = []
    out = agent.turn("add a hat", source=(photo, "open cat"), seed=40, events=events.append)
    assert siblings(store) == [(2, 1, 40, 0.2), (3, 1, 41, 0.9)]  # siblings: both from the opened picture
    assert store.history("s").cursor == 3 and out.turn.id == 3
    assert [(a.attempt, a.seed, a.turn, a.score) for a in out.attempts] == [(1, 40, 2, 0.2), (2, 41, 3, 0.9)]
    assert all(a.nfe == 3 and a.seconds >= 0 for a in out.attempts)
    checked = [e for e in events if e.kind == "checked"]
    assert [(e.attempt, e.attempts, e.score, e.accepted) for e in checked] == [
        (1, 3, 0.2, False),
        (2, 3, 0.9, True),
    ]
    assert [instruction for instruction, _, _ in judges.judge.seen] == ["add a hat", "add a hat"]
    assert judges.judge.seen[0][1].tobytes() == photo.tobytes()  # judged against the source
    assert out.reply.endswith("(kept attempt 2 of 2, seed 41: score 0.90 passed)")
    check = store.history("s").turn(2).params["check"]
    assert check == {"score": 0.2, "accept": ACCEPT, "attempt": 1, "attempts": 3, "judge": "scripted"}
    said = describe(out)
    assert [(a["seed"], a["score"]) for a in said["attempts"]] == [(40, 0.2), (41, 0.9)]
    assert said["turn"] == 3 and said["seed"] == 41


def test_when_none_passes_every_attempt_is_kept_and_the_cursor_goes_to_the_best(judges, store, photo):
    agent = agent_with(store, judges, 0.3, 0.1, 0.2, attempts=3)
    out = agent.turn("add a hat", source=(photo, "open cat"), seed=7)
    assert siblings(store) == [(2, 1, 7, 0.3), (3, 1, 8, 0.1), (4, 1, 9, 0.2)]
    history = store.history("s")
    assert history.cursor == 2 and out.turn.id == 2 and out.result.seed == 7
    assert agent.image(history.turn(2)).tobytes() == out.result.image.tobytes()
    assert "kept attempt 1 of 3, seed 7: score 0.30 < 0.5" in out.reply
    assert history.turn(3).label == "add a hat  check 0.10"
    # the next edit starts from the best one
    assert agent.turn("make it night", seed=1, check=False).turn.parent == 2


@pytest.mark.parametrize(("accept", "tried"), [(0.95, 3), (0.5, 2), (0.0, 1)])
def test_accept_is_the_bar(judges, store, photo, accept, tried):
    agent = agent_with(store, judges, 0.4, 0.9, 0.1, attempts=3, accept=accept)
    out = agent.turn("add a hat", source=(photo, "open cat"), seed=1)
    assert len(out.attempts) == tried


def test_with_the_early_filter_the_next_attempt_starts_past_every_candidate(judges, store, photo):
    agent = agent_with(store, judges, 0.1, 0.9, attempts=2, candidates=3, early_steps=1)
    out = agent.turn("add a hat", source=(photo, "open cat"), seed=100)
    turns = [t for t in store.history("s").turns if t.kind == "edit"]
    assert [t.params["candidate_seeds"] for t in turns] == [[100, 101, 102], [103, 104, 105]]
    assert len(judges.judge.seen) == 2  # the check judges the finished winner only
    assert out.nfe == sum(t.params["nfe"] for t in turns)


def test_check_with_one_attempt_scores_without_retrying(judges, store, photo):
    agent = agent_with(store, judges, 0.05, check=True)
    out = agent.turn("add a hat", source=(photo, "open cat"), seed=1)
    assert siblings(store) == [(2, 1, 1, 0.05)]
    assert out.reply.endswith("(self-check: score 0.05 < 0.5)")


def test_a_judge_that_cannot_check_runs_each_edit_once_and_says_so(judges, store, photo):
    agent = Agent(store, "s", Settings(engine="fake", judge="pairwise", steps=3, attempts=3))
    out = agent.turn("add a hat", source=(photo, "open cat"), seed=1)
    assert [t.id for t in store.history("s").turns] == [1, 2] and out.attempts == []
    assert out.notes == ["judge pairwise cannot check an edit: it ran once, unchecked"]
    assert "check" not in store.history("s").turn(2).params


@pytest.mark.parametrize("answer", [RuntimeError("VLM fell over"), 1.5, float("nan"), True, "yes", None])
def test_a_failing_judge_keeps_the_attempt_unjudged_and_stops(judges, store, photo, answer):
    agent = agent_with(store, judges, answer, 0.9, attempts=3)
    out = agent.turn("add a hat", source=(photo, "open cat"), seed=1)
    assert siblings(store) == [(2, 1, 1, None)]
    assert out.attempts[0].score is None and "unjudged" in out.reply
    assert len(out.notes) == 1 and out.notes[0].startswith("self-check failed (")
    assert store.history("s").turn(2).params["check"]["note"] == out.notes[0]


def test_a_cancel_between_attempts_keeps_the_ones_that_landed(judges, store, photo):
    agent = agent_with(store, judges, 0.1, 0.9, attempts=3)
    cancel = threading.Event()
    out = agent.turn(
        "add a hat",
        source=(photo, "open cat"),
        seed=1,
        cancel=cancel,
        events=lambda e: cancel.set() if e.kind == "checked" else None,
    )
    assert [t.id for t in store.history("s").turns] == [1, 2]
    assert out.stopped == "attempt 2 of 3: cancelled" and out.exit_code == 130


def test_each_step_of_a_plan_is_checked_and_the_next_step_starts_from_its_best(judges, store, photo):
    agent = agent_with(store, judges, 0.3, 0.1, 0.9, attempts=2)
    out = agent.turn("add snow; make it night", source=(photo, "open cat"), seed=1)
    history = store.history("s")
    assert siblings(store) == [(2, 1, 1, 0.3), (3, 1, 2, 0.1), (4, 2, 2, 0.9)]
    assert history.cursor == 4 and [s.turn.id for s in out.steps] == [2, 4]
    assert [len(s.attempts) for s in out.steps] == [2, 1]
    assert out.nfe == 3 * 3


def test_a_retry_is_one_more_picture_not_more_attempts(judges, store, photo):
    agent = agent_with(store, judges, 0.9, 0.1, 0.1, attempts=3)
    agent.turn("add a hat", source=(photo, "open cat"), seed=1)
    out = agent.turn("try another seed")
    assert [t.seed for t in store.history("s").turns[1:]] == [1, 2]
    assert out.attempts[0].score == 0.1  # still scored: the check is on


# --------------------------------------------------------------------------------------- CLI and replay


def test_the_cli_reports_attempts_and_the_session_holds_them(judges, tmp_path, photo):
    judges.judge = Scripted(0.1, 0.7)
    photo.save(tmp_path / "cat.png")
    result = invoke(
        "edit", tmp_path / "cat.png", "add a hat", "--engine", "fake", "--judge", "scripted",
        "--attempts", "3", "--accept", "0.6", "--session", "s", "--seed", "5", "--json", "-o", tmp_path / "o.png",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    said = json.loads(result.stdout)
    assert [(a["attempt"], a["seed"], a["score"]) for a in said["attempts"]] == [(1, 5, 0.1), (2, 6, 0.7)]
    assert "attempt 1 of 3 (seed 5, turn #2): score 0.10, below the bar" in result.stderr
    with Store(Settings().store_path) as store:
        assert siblings(store) == [(2, 1, 5, 0.1), (3, 1, 6, 0.7)]
        assert store.history("s").cursor == 3


def test_without_the_judges_weights_the_check_is_skipped_with_a_note(fake, tmp_path, photo):
    photo.save(tmp_path / "cat.png")
    result = invoke(
        "edit", tmp_path / "cat.png", "add a hat", "--engine", "fake", "--attempts", "3",
        "--vlm", tmp_path / "no-vlm-here", "--json", "-o", tmp_path / "o.png",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (
        "note: the self-check cannot run (" in result.stderr and "each edit once, unchecked" in result.stderr
    )
    assert "attempts" not in json.loads(result.stdout)
    assert (
        "rewriter cannot run" not in result.stderr
    )  # the rules were the rewriter anyway: the lack is the judge's


def test_an_exported_session_replays_the_same_attempts(judges, store, photo, tmp_path):
    agent = agent_with(store, judges, 0.1, 0.8, 0.2, attempts=3, accept=0.9)
    agent.turn("add a hat", source=(photo, "open cat"), seed=3)
    original = store.history("s")
    script = tmp_path / "exp" / "s.toml"
    assert invoke("sessions", "export", "s", script).exit_code == 0
    # a config asking for attempts changes nothing: the script lists each attempt and says attempts = 1
    (tmp_path / "config.toml").write_text("attempts = 3\ncheck = true\n")
    judges.judge = Scripted(0.0, 0.0, 0.0)
    result = invoke(
        "replay",
        script,
        "--out",
        tmp_path / "out",
        "--session",
        "again",
        "--engine",
        "fake",
        "--judge",
        "scripted",
    )
    assert result.exit_code == 0, result.output
    again = store.history("again")
    assert sorted(t.image_sha256 for t in again.turns) == sorted(t.image_sha256 for t in original.turns)
    assert again.cursor_turn().image_sha256 == original.cursor_turn().image_sha256
    root = again.turns[0].id
    assert [t.parent for t in again.turns] == [None, root, root, root]


def test_replay_counts_every_attempt_against_its_budget():
    script = ReplayScript.model_validate(
        {"source": "a.png", "turns": [{"say": "x"}, {"say": "y", "steps": 5}]}
    )
    assert total_nfe(script, Settings(steps=4)) == 9
    assert total_nfe(script, Settings(steps=4, attempts=3)) == 27


# ---------------------------------------------------------------------------------------- the VLM judge


def test_the_qwen_judge_checks_edits_with_the_tiny_vlm(fake, tmp_path, photo):
    """The issue's third "done when": attempts with seed and score in [0, 1], one sibling turn each, the
    cursor on the best score (`--accept 1`: a random model's P(yes) is below 1, so all 3 run)."""
    from tiny_qwen import save_tiny_qwen

    vlm = save_tiny_qwen(tmp_path / "vlm")
    photo.save(tmp_path / "cat.png")
    result = invoke(
        "edit", tmp_path / "cat.png", "add a hat", "--engine", "fake", "--attempts", "3", "--accept", "1",
        "--judge", "qwen_vl", "--vlm", vlm, "--session", "s", "--seed", "9", "--json", "-o", tmp_path / "o.png",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    said = json.loads(result.stdout)
    attempts = said["attempts"]
    assert [a["seed"] for a in attempts] == [9, 10, 11]
    assert all(0.0 <= a["score"] <= 1.0 for a in attempts)
    best = max(attempts, key=lambda a: a["score"])
    with Store(Settings().store_path) as store:
        history = store.history("s")
    assert [(t.parent, t.kind) for t in history.turns] == [
        (None, "open"),
        (1, "edit"),
        (1, "edit"),
        (1, "edit"),
    ]
    assert history.cursor == best["turn"] == said["turn"]


def test_another_seed_after_attempts_paints_none_of_theirs(judges, store, photo):
    agent = agent_with(store, judges, 0.3, 0.1, 0.2, 0.5, attempts=3)
    agent.turn("add a hat", source=(photo, "open cat"), seed=10)  # 10, 11, 12; the cursor on 10
    assert store.history("s").cursor_turn().seed == 10
    out = agent.turn("try another seed")
    assert out.result.seed == 13 and out.turn.parent == 1


def test_with_no_vlm_the_check_is_skipped_and_said(fake, store, photo):
    agent = Agent(store, "s", Settings(engine="fake", judge="qwen_vl", steps=3, attempts=3, vlm="none"))
    out = agent.turn("add a hat", source=(photo, "open cat"), seed=1)
    assert [t.id for t in store.history("s").turns] == [1, 2]
    assert out.notes == ["judge qwen_vl cannot check an edit: it ran once, unchecked"]


def test_no_check_wins_over_attempts(judges, store, photo):
    agent = agent_with(store, judges, 0.1, 0.1, attempts=3, check=False)
    out = agent.turn("add a hat", source=(photo, "open cat"), seed=1)
    assert (
        [t.id for t in store.history("s").turns] == [1, 2] and out.attempts == [] and judges.judge.seen == []
    )
