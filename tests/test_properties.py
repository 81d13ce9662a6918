"""Property tests (hypothesis): the history tree under any sequence of actions, and parsers fed anything."""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError

from assistant.agent import Agent
from assistant.errors import UserError
from assistant.models import EditPlan
from plugins.qwen_vl import model
from plugins.qwen_vl.rewriter import QwenRewriter, parse
from sessions.identity import png_digest
from sessions.scripts import ReplayScript, load_script
from sessions.store import Store

FIXTURES = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]

# ------------------------------------------------------------------------------------ the history tree

ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("edit"), st.integers(0, 50)),
        st.tuples(st.just("undo"), st.none()),
        st.tuples(st.just("redo"), st.none()),
        st.tuples(st.just("branch"), st.integers(0, 30)),
        st.tuples(st.just("retry"), st.none()),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURES)
@given(actions=ACTIONS)
def test_any_sequence_of_edit_undo_redo_branch_keeps_the_tree(fake, fake_settings, actions):
    """A model of the tree (parents, cursor) predicts the store after every action; refusals change nothing."""
    with Store(":memory:") as store:
        agent = Agent(store, "p", fake_settings)
        agent.open(Image.new("RGB", (16, 12), (90, 60, 30)), "open cat")
        parents: dict[int, int | None] = {1: None}
        kinds = {1: "open"}
        cursor = 1
        for action, arg in actions:
            before = list(store.db.iterdump())
            try:
                if action == "edit":
                    turn = agent.turn(f"add {arg} hats", seed=arg).turn
                elif action == "retry":
                    turn = agent.turn("try another seed").turn
                elif action == "undo":
                    turn = agent.move("undo")
                elif action == "redo":
                    turn = agent.move("redo")
                else:
                    turn = agent.jump(sorted(parents)[arg % len(parents)])
            except UserError:
                assert list(store.db.iterdump()) == before  # a refusal leaves everything as it was
                refused = True
            else:
                refused = False
            # what the model says should have happened
            if action == "edit":
                expected = max(parents) + 1
                parents[expected], kinds[expected] = cursor, "edit"
            elif action == "retry" and kinds[cursor] == "edit":
                expected = max(parents) + 1
                parents[expected], kinds[expected] = parents[cursor], "edit"
            elif action == "undo" and parents[cursor] is not None:
                expected = parents[cursor]
            elif action == "redo" and any(p == cursor for p in parents.values()):
                expected = max(t for t, p in parents.items() if p == cursor)
            elif action == "branch":
                expected = sorted(parents)[arg % len(parents)]
            else:
                assert refused, (action, cursor)
                continue
            assert not refused and turn.id == expected
            cursor = expected
            history = store.history("p")
            assert {t.id: t.parent for t in history.turns} == parents  # undo never deletes anything
            assert history.cursor == cursor
            assert next(t.id for t in history.path(cursor)) == 1
            for t in history.turns:
                assert png_digest(store.image(t.image_sha256)) == t.image_sha256


# ------------------------------------------------------------------------------------ replay scripts

KEYS = [
    "source",
    "seed",
    "steps",
    "guidance",
    "candidates",
    "early_steps",
    "judge",
    "preset",
    "engine",
    "rewriter",
    "say",
    "command",
    "open",
    "instruction",
    "turns",
    "colour",
]
SCALARS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=30),
    st.sampled_from(["cat.png", "../x.png", "/etc/passwd", "undo", "redo", "jump", "", "\x00", "tiny"]),
)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(str(value), repr(value))
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string, escapes and all
    return str(value)


@st.composite
def toml_ish(draw) -> str:
    """A valid script mutated a few times (keys set to anything, dropped, turns added), sometimes spliced."""
    header: dict = {"source": "cat.png"}
    turns: list[dict] = [{"say": "add a hat"}]
    for _ in range(draw(st.integers(0, 4))):
        key, value = draw(st.sampled_from(KEYS)), draw(SCALARS)
        where = draw(st.sampled_from(["header", "turn", "new turn", "drop"]))
        if where == "header":
            header[key] = value
        elif where == "new turn" or not turns:
            turns.append({key: value})
        elif where == "turn":
            turns[draw(st.integers(0, len(turns) - 1))][key] = value
        else:
            header.pop(key, None) if draw(st.booleans()) else turns.pop()
    lines = [f"{k} = {toml_value(v)}" for k, v in header.items() if k != "turns"]
    for turn in turns:
        lines += ["[[turns]]", *(f"{k} = {toml_value(v)}" for k, v in turn.items() if k != "turns")]
    text = "\n".join(lines) + "\n"
    if draw(st.integers(0, 3)) == 0:
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.text(alphabet=string.printable + "\x00é", max_size=5)) + text[cut:]
    return text


@settings(max_examples=300, deadline=None)
@given(content=st.one_of(toml_ish(), st.text(max_size=200), st.binary(max_size=200)))
def test_the_replay_parser_raises_only_user_errors(content):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "s.toml"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, "utf-8", errors="surrogatepass")
        try:
            script = load_script(path)
        except UserError as e:
            assert "\n" not in str(e) and str(e).startswith(str(path))
        else:
            assert isinstance(script, ReplayScript) and len(script.turns) >= 1


# ------------------------------------------------------------------------------------ the plan validator

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
PLAN_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "intent": st.sampled_from(["edit", "undo", "redo", "retry", "answer", "clarify", "paint", ""]) | JSON,
        "instruction": st.text(max_size=40) | JSON,
        "subject": st.text(max_size=10) | JSON,
        "description": JSON,
        "rationale": st.text(max_size=400) | JSON,
        "ic_prompt": st.text(max_size=10),
    },
)
ANSWERS = st.one_of(
    JSON.map(json.dumps),
    PLAN_FIELDS.map(json.dumps),
    st.text(max_size=100),
    PLAN_FIELDS.map(lambda d: f"Sure! ```json\n{json.dumps(d)}\n``` hope that helps {{"),
)


@settings(max_examples=300, deadline=None)
@given(answer=ANSWERS)
def test_the_plan_validator_raises_only_validation_errors(answer):
    try:
        plan = parse(answer)
    except ValidationError:
        return  # the rewriter's cue to ask again, then fall back to the rules
    assert isinstance(plan, EditPlan)
    assert plan.intent != "edit" or (plan.instruction or "").strip()


class Garbage:
    """A VLM that answers whatever hypothesis says."""

    def __init__(self, answers):
        self.answers = answers

    def generate(self, conversation, max_new_tokens, logits_processor=None):
        return self.answers.pop(0)


@settings(max_examples=100, deadline=None, suppress_health_check=FIXTURES)
@given(first=ANSWERS, second=ANSWERS)
def test_a_vlm_answering_anything_still_gives_a_plan(monkeypatch, options_for_vlm, first, second):
    monkeypatch.setattr(model, "load", lambda options: Garbage([first, second]))
    plan = QwenRewriter(options_for_vlm).rewrite(Image.new("RGB", (8, 8)), "make it look like winter", [])
    assert isinstance(plan, EditPlan)
    if plan.fallback is not None:
        assert plan.fallback.startswith("rules (invalid answer twice: ")
        assert plan.instruction == "make it look like winter"


@pytest.fixture
def options_for_vlm(icedit_home):
    from plugins.qwen_vl.options import QwenVlOptions

    return QwenVlOptions(vlm="some/vlm", vlm_grammar=False)  # free text: anything can come back
