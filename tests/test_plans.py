"""Plans of several steps (issue 18, part 1): one message, an ordered list of single-change edits, each
its own turn committed as it lands; a failure or a cancel keeps what landed."""

from __future__ import annotations

import json
import threading

import pytest
from click.testing import CliRunner

from assistant.agent import Agent, describe
from assistant.cli import cli
from assistant.errors import Cancelled, UserError
from assistant.models import MAX_STEPS, EditPlan
from plugins.qwen_vl.rewriter import parse
from plugins.rules.rewriter import RulesRewriter
from sessions.store import Store

WINTER_SCARF = "make it look like winter, then add a red scarf"


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="icedit")


# ------------------------------------------------------------------------------------------ the rules read


@pytest.mark.parametrize(
    ("message", "steps"),
    [
        (WINTER_SCARF, ["make it look like winter", "add a red scarf"]),
        ("add snow; make it night; add a moon", ["add snow", "make it night", "add a moon"]),
        ("Please add a hat, and then make it black and white!", ["add a hat", "make it black and white"]),
        ("add a hat. After that, a red scarf", ["add a hat", "add a red scarf"]),
        ("make it sunny then add birds afterwards add a kite", ["make it sunny", "add birds", "add a kite"]),
    ],
)
def test_the_rules_split_on_sequence_words_only(message, steps):
    plan = RulesRewriter().rewrite(None, message, [])
    assert plan.intent == "edit"
    assert [s.instruction for s in plan.steps()] == steps
    assert [s.rationale for s in plan.steps()] == [
        f"step {i} of {len(steps)}: {text}" for i, text in enumerate(steps, 1)
    ]


@pytest.mark.parametrize(
    "message",
    [
        "add a hat and a scarf",  # one change as the person wrote it
        "make it black and white",
        "put a cat next to the dog",
        "add snow, then undo",  # not only edits: read as one message
        "add snow; go back to turn 1",
        "make the sky bluer than the sea",
        "make it look like it did back then, with more snow",  # "then", the adverb
        "make it as dark as it was by then",
        "add snow then",
    ],
)
def test_the_rules_keep_one_request_whole(message):
    plan = RulesRewriter().rewrite(None, message, [])
    assert plan.then == [] and len(plan.steps()) == 1


def test_more_steps_than_a_plan_takes_is_a_question_back():
    message = "; ".join(f"add {n} birds" for n in range(2, MAX_STEPS + 3))
    plan = RulesRewriter().rewrite(None, message, [])
    assert plan.intent == "clarify" and f"at most {MAX_STEPS}" in plan.rationale


def test_the_vlm_answer_carries_its_steps_and_only_an_edit_keeps_them():
    plan = parse(
        '{"intent": "edit", "instruction": "make it winter", "then": ["add a snowman"], "rationale": "x"}'
    )
    assert [s.instruction for s in plan.steps()] == ["make it winter", "add a snowman"]
    assert plan.ic_prompt is None  # each step's prompt is the engine's own
    undo = parse('{"intent": "undo", "then": ["add a snowman"], "rationale": "x"}')
    assert undo.then == []
    for bad in ('["add a snowman", " "]', f"{json.dumps(['x'] * MAX_STEPS)}"):
        with pytest.raises(ValueError):
            parse(f'{{"intent": "edit", "instruction": "a", "then": {bad}, "rationale": "x"}}')


# -------------------------------------------------------------------------------------------- the agent


def test_each_step_is_a_turn_from_the_one_before_committed_as_it_lands(fake, fake_settings, store, photo):
    agent = Agent(store, "s", fake_settings)
    events = []
    out = agent.turn(
        "add snow; make it night; add a moon", source=(photo, "open cat"), seed=10, events=events.append
    )
    history = store.history("s")
    assert [(t.id, t.parent, t.plan["instruction"] if t.plan else None) for t in history.turns] == [
        (1, None, None),
        (2, 1, "add snow"),
        (3, 2, "make it night"),
        (4, 3, "add a moon"),
    ]
    assert history.cursor == 4 and out.turn.id == 4
    assert [t.params.get("plan_step") for t in history.turns[1:]] == [[1, 3], [2, 3], [3, 3]]
    assert [t.seed for t in history.turns[1:]] == [10, 11, 12]
    # each step painted the one before's picture
    calls = fake.engine.calls[-3:]
    assert calls[1].source.tobytes() == agent.image(history.turn(2)).tobytes()
    assert calls[2].source.tobytes() == agent.image(history.turn(3)).tobytes()
    # the plan is announced before anything runs; each step as it lands
    kinds = [e.kind for e in events if e.kind != "step"]
    assert kinds == ["plan", "landed", "landed", "landed"]
    assert events[0].steps == ["add snow", "make it night", "add a moon"]
    landed = [e for e in events if e.kind == "landed"]
    assert [(e.step, e.of, e.turn) for e in landed] == [(1, 3, 2), (2, 3, 3), (3, 3, 4)]
    for e in landed:  # each carries its picture and the one it was made from, for the chat to show
        turn = history.turn(e.turn)
        assert e.image.tobytes() == agent.image(turn).tobytes()
        assert e.source.tobytes() == agent.image(history.turn(turn.parent)).tobytes()
    assert out.planned == ["add snow", "make it night", "add a moon"] and out.stopped is None
    assert [s.turn.id for s in out.steps] == [2, 3, 4]
    assert history.turn(3).label == "make it night (step 2/3)"
    said = describe(out)
    assert said["plan"] == out.planned and [s["turn"] for s in said["landed"]] == [2, 3, 4]
    assert said["turn"] == 4 and said["steps"] == fake_settings.steps  # "steps" stays the sampling's


def test_undo_walks_back_one_step(fake, fake_settings, store, photo):
    agent = Agent(store, "s", fake_settings)
    agent.turn(WINTER_SCARF, source=(photo, "open cat"), seed=1)
    assert agent.turn("undo").turn.id == 2
    assert agent.turn("undo").turn.id == 1


def fail_on(fake, monkeypatch, word: str, error: Exception) -> None:
    """The fake engine raises `error` for an instruction containing `word`."""
    paint = fake.engine.edit

    def edit(request, events, cancel):
        if word in (request.plan.instruction or ""):
            raise error
        return paint(request, events, cancel)

    monkeypatch.setattr(fake.engine, "edit", edit)


@pytest.mark.parametrize(
    ("error", "code"), [(UserError("the engine cannot take it"), 2), (Cancelled("cancelled"), 130)]
)
def test_a_failure_after_the_first_step_stops_the_plan_and_keeps_what_landed(
    fake, fake_settings, store, photo, error, code, monkeypatch
):
    agent = Agent(store, "s", fake_settings)
    fail_on(fake, monkeypatch, "night", error)
    out = agent.turn("add snow; make it night; add a moon", source=(photo, "open cat"), seed=1)
    history = store.history("s")
    assert [t.id for t in history.turns] == [1, 2] and history.cursor == 2
    assert out.turn.id == 2 and [s.turn.id for s in out.steps] == [2]
    assert out.stopped.startswith("step 2 of 3: ") and str(error) in out.stopped
    assert out.exit_code == code
    assert not any("moon" in (c.plan.instruction or "") for c in fake.engine.calls)


def test_a_failure_in_the_first_step_stores_nothing(fake, fake_settings, store, photo, monkeypatch):
    agent = Agent(store, "s", fake_settings)
    fail_on(fake, monkeypatch, "snow", UserError("no"))
    with pytest.raises(UserError, match="no"):
        agent.turn("add snow; make it night", source=(photo, "open cat"), seed=1)
    assert not store.exists("s")


def test_a_cancel_between_steps_runs_no_further_step(fake, fake_settings, store, photo):
    agent = Agent(store, "s", fake_settings)
    cancel = threading.Event()

    def events(event):
        if event.kind == "landed":
            cancel.set()  # Escape while step 1 lands

    out = agent.turn(
        "add snow; make it night", source=(photo, "open cat"), seed=1, events=events, cancel=cancel
    )
    assert [t.id for t in store.history("s").turns] == [1, 2]
    assert out.stopped == "step 2 of 2: cancelled" and out.exit_code == 130


# ------------------------------------------------------------------------------------------ the CLI, replay


def test_the_cli_commits_two_turns_and_lists_both_steps(icedit_home, tmp_path):
    """The issue's first "done when", with the real tiny preset."""
    from conftest import EXAMPLES

    out = tmp_path / "o.png"
    result = invoke(
        "edit", EXAMPLES / "chelsea.png", WINTER_SCARF, "--preset", "tiny", "--session", "s", "--json",
        "--steps", "1", "--seed", "3", "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    said = json.loads(result.stdout)
    assert said["plan"] == ["make it look like winter", "add a red scarf"]
    assert [(s["turn"], s["instruction"], s["seed"]) for s in said["landed"]] == [
        (2, "make it look like winter", 3),
        (3, "add a red scarf", 4),
    ]
    assert "plan of 2 edits: 1. make it look like winter; 2. add a red scarf" in result.stderr
    with Store(icedit_home / "sessions.sqlite3") as store:
        history = store.history("s")
    assert [(t.id, t.parent, t.kind) for t in history.turns] == [
        (1, None, "open"),
        (2, 1, "edit"),
        (3, 2, "edit"),
    ]
    assert history.cursor == 3 and said["image_sha256"] == history.turn(3).image_sha256
    from sessions.identity import png_digest

    assert png_digest(out.read_bytes()) == history.turn(3).image_sha256  # -o holds the last step


def test_a_stopped_plan_exits_with_the_error_and_keeps_what_landed(
    fake, fake_settings, photo, tmp_path, monkeypatch
):
    photo.save(tmp_path / "cat.png")
    fail_on(fake, monkeypatch, "night", UserError("out of ideas"))
    result = invoke(
        "edit", tmp_path / "cat.png", "add snow; make it night", "--engine", "fake", "--session", "s",
        "-o", tmp_path / "o.png",
    )  # fmt: skip
    assert result.exit_code == 2
    assert "stopped at step 2 of 2: out of ideas (what landed before it is kept)" in result.stderr
    assert (tmp_path / "o.png").exists()  # step 1's picture, written before the error is said
    with Store(fake_settings.store_path) as store:
        assert [t.id for t in store.history("s").turns] == [1, 2]


def test_an_exported_plan_replays_the_same_steps(fake, fake_settings, photo, tmp_path):
    with Store(fake_settings.store_path) as store:
        Agent(store, "p", fake_settings).turn("add snow; make it night", source=(photo, "open cat"), seed=4)
        original = store.history("p")
    script = tmp_path / "exp" / "p.toml"
    assert invoke("sessions", "export", "p", script).exit_code == 0
    assert "attempts = 1" in script.read_text()
    result = invoke(
        "replay", script, "--out", tmp_path / "out", "--session", "again", "--engine", "fake", "--json"
    )
    assert result.exit_code == 0, result.output
    with Store(fake_settings.store_path) as store:
        again = store.history("again")
    assert [t.image_sha256 for t in again.turns] == [t.image_sha256 for t in original.turns]
    assert [(t.plan or {}).get("instruction") for t in again.turns] == [None, "add snow", "make it night"]


def test_a_plan_is_an_edit_plan_with_steps_for_third_party_rewriters():
    plan = EditPlan(intent="edit", instruction="a", then=["b"])
    assert [s.intent for s in plan.steps()] == ["edit", "edit"]
    with pytest.raises(ValueError):
        EditPlan(intent="edit", instruction="a", then=["b"] * MAX_STEPS)
