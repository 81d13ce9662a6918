"""The agent: message -> rewriter -> plan -> engine or cursor move -> one commit (fake engine, no model)."""

from __future__ import annotations

import threading

import pytest
from PIL import Image

from assistant.agent import Agent
from assistant.errors import Cancelled, UserError
from assistant.hookspecs import hookimpl
from assistant.plugins import RewriterSpec, get_plugin_manager
from assistant.settings import Settings
from assistant.text import MAX_MESSAGE
from plugins.rules.rewriter import RulesRewriter
from sessions.identity import decode_png, encode_png, pixel_digest


def dump(store) -> list[str]:
    return list(store.db.iterdump())


def png_of(store, turn) -> bytes:
    return store.image(turn.image_sha256)


@pytest.fixture
def agent(store, fake_settings):
    return Agent(store, "s", fake_settings)


class Recording:
    """A rewriter plugin that records what it is given and answers like the rules rewriter."""

    def __init__(self):
        self.seen: list[tuple[str, list]] = []

    def rewrite(self, image, message, context):
        self.seen.append((message, context))
        return RulesRewriter().rewrite(image, message, context)

    @hookimpl
    def register_rewriters(self, register):
        register(RewriterSpec("recording", lambda settings: self, "records its calls"))


@pytest.fixture
def recording(fake):
    rec = Recording()
    pm = get_plugin_manager()
    pm.register(rec, name="recording-plugin")
    try:
        yield rec
    finally:
        pm.unregister(name="recording-plugin")


@pytest.fixture
def rec_agent(store, recording):
    return Agent(store, "s", Settings(engine="fake", rewriter="recording", steps=3))


# ---------------------------------------------------------------------- edits


def test_first_edit_commits_the_open_turn_and_the_edit_together(agent, store, fake, photo):
    out = agent.turn("please add a hat", source=(photo, "open cat"), seed=5)
    h = store.history("s")
    assert [(t.id, t.parent, t.kind, t.message) for t in h.turns] == [
        (1, None, "open", "open cat"),
        (2, 1, "edit", "please add a hat"),
    ]
    assert h.cursor == 2 and out.turn.id == 2
    assert (out.intent, out.plan.instruction, out.rewriter, out.engine) == (
        "edit",
        "add a hat",
        "rules",
        "fake",
    )
    assert png_of(store, h.turns[0]) == encode_png(photo)
    assert png_of(store, h.turns[1]) == encode_png(out.result.image)
    assert (
        out.turn.params["seed"] == 5 and out.turn.params["steps"] == 3 and out.turn.params["engine"] == "fake"
    )
    assert out.turn.plan["ic_prompt"] == "fake: add a hat"
    assert len(fake.engine.calls) == 1
    call = fake.engine.calls[0]
    assert (call.seed, call.steps, call.plan.instruction) == (5, 3, "add a hat")
    assert encode_png(call.source) == encode_png(photo)
    assert [(e.role, e.text, e.turn_id) for e in store.transcript("s")] == [
        ("user", "open cat", 1),
        ("user", "please add a hat", 2),
        ("assistant", "rules: used your request as the edit instruction", 2),
    ]


def test_each_result_is_the_source_of_the_next_edit(agent, store, fake, photo):
    turns = [agent.turn("add a hat", source=(photo, "open cat"), seed=1).turn]
    turns.append(agent.turn("make it winter", seed=2).turn)
    turns.append(agent.turn("add a red scarf", seed=3).turn)
    assert [t.parent for t in turns] == [1, turns[0].id, turns[1].id]
    assert len(fake.engine.calls) == 3
    for call, previous in zip(fake.engine.calls[1:], turns[:-1], strict=True):
        assert encode_png(call.source) == png_of(store, previous)
    assert [c.seed for c in fake.engine.calls] == [1, 2, 3]
    assert store.history("s").cursor == turns[-1].id


def test_undo_and_redo_messages_move_the_cursor(agent, store, fake, photo):
    first = agent.turn("add a hat", source=(photo, "open cat"), seed=1).turn
    second = agent.turn("make it winter", seed=2).turn
    out = agent.turn("undo that")
    assert (out.intent, out.turn.id, out.result) == ("undo", first.id, None)
    assert out.reply == f"undo: back at turn {first.id} (add a hat)"
    assert store.history("s").cursor == first.id
    out = agent.turn("redo")
    assert (out.intent, out.turn.id) == ("redo", second.id)
    assert store.history("s").cursor == second.id
    assert len(fake.engine.calls) == 2  # moving the cursor paints nothing
    assert [t.id for t in store.history("s").turns] == [1, first.id, second.id]
    with pytest.raises(UserError, match="nothing to redo in session 's'"):
        agent.turn("redo")


def test_a_new_edit_after_undo_makes_a_branch(agent, store, fake, photo):
    first = agent.turn("add a hat", source=(photo, "open cat"), seed=1).turn
    second = agent.turn("make it winter", seed=2).turn
    agent.turn("undo")
    third = agent.turn("make it summer", seed=3).turn
    h = store.history("s")
    assert third.parent == first.id
    assert [t.id for t in h.children(first.id)] == [second.id, third.id]
    assert h.cursor == third.id
    assert encode_png(fake.engine.calls[-1].source) == png_of(store, first)
    assert len(h.turns) == 4  # the undone edit is still there


def test_try_another_seed_retries_the_plan_from_the_parent(agent, store, fake, photo):
    first = agent.turn("add a hat", source=(photo, "open cat"), seed=1).turn
    edited = agent.turn("make it winter", seed=41, steps=5).turn
    out = agent.turn("try another seed")
    assert out.intent == "retry"
    assert out.plan.instruction == "make it winter"
    assert out.turn.parent == first.id  # a sibling of the retried edit
    assert out.turn.params["seed"] == 42 and out.turn.params["steps"] == 5
    assert out.turn.plan["rationale"] == f"retry of turn {edited.id}, new seed"
    call = fake.engine.calls[-1]
    assert (call.seed, call.steps, call.plan.instruction) == (42, 5, "make it winter")
    assert encode_png(call.source) == png_of(store, first)
    again = agent.turn("again")
    assert (again.intent, again.turn.parent, again.turn.params["seed"]) == ("retry", first.id, 43)
    assert store.history("s").cursor == again.turn.id


def test_retry_with_an_explicit_seed_uses_it(agent, fake, photo):
    agent.turn("add a hat", source=(photo, "open cat"), seed=1)
    out = agent.turn("retry", seed=77)
    assert out.turn.params["seed"] == 77 and fake.engine.calls[-1].seed == 77


def test_retry_is_an_agent_operation_that_no_rewriter_has_to_understand(store, fake, fake_settings, photo):
    """/retry and `icedit retry` call Agent.retry: a rewriter that reads every message as an edit (verbatim
    would paint "try another seed") is never asked, and the retry is the same plan with the next seed."""
    agent = Agent(store, "s", fake_settings.model_copy(update={"rewriter": "verbatim"}))
    first = agent.turn("add a hat", source=(photo, "open cat"), seed=1).turn
    edited = agent.turn("make it winter", seed=41, steps=5).turn
    assert agent.turn("try another seed", seed=3).plan.instruction == "try another seed"  # verbatim's reading
    agent.jump(edited.id)
    out = agent.retry()
    assert (out.intent, out.plan.instruction, out.turn.parent) == ("retry", "make it winter", first.id)
    assert (out.turn.params["seed"], out.turn.params["steps"]) == (42, 5)
    assert out.turn.plan["rationale"] == f"retry of turn {edited.id}, new seed"
    assert agent.retry(seed=9).turn.params["seed"] == 9
    agent.jump(first.parent)
    with pytest.raises(UserError, match="nothing to retry: the current image is not an edit"):
        agent.retry()


def test_retry_keeps_the_turns_size_policy_and_leaves_another_engines_prompt_behind(
    store, fake, fake_settings, photo
):
    from assistant.plugins import EngineSpec

    agent = Agent(store, "s", fake_settings)
    agent.turn("add a hat", source=(photo, "open cat"), seed=1, native_size=True)
    assert agent.retry().turn.params["native_size"] is True and fake.engine.calls[-1].native_size is True
    assert fake.engine.calls[-1].plan.ic_prompt == "fake: add a hat"  # the same engine keeps its own prompt

    class Other:
        @hookimpl
        def register_engines(self, register):
            register(EngineSpec("other", lambda settings: fake.engine, "the same fake under another name"))

    get_plugin_manager().register(Other(), name="other")
    try:
        other = Agent(store, "s", fake_settings.model_copy(update={"engine": "other"}))
        out = other.retry(candidates=1)
        assert (
            fake.engine.calls[-1].plan.ic_prompt is None
        )  # icedit's diptych prompt is not kontext's, nor back
        assert (out.turn.params["engine"], out.turn.plan["instruction"]) == ("other", "add a hat")
    finally:
        get_plugin_manager().unregister(name="other")


def test_retry_on_an_open_turn_is_refused(agent, store, fake, photo):
    with pytest.raises(UserError, match="nothing to retry: the current image is not an edit"):
        agent.turn("try another seed", source=(photo, "open cat"))
    assert not store.exists("s")
    agent.turn("add a hat", source=(photo, "open cat"), seed=1)
    agent.turn("undo")
    before = dump(store)
    with pytest.raises(UserError, match="nothing to retry: the current image is not an edit"):
        agent.turn("try another seed")
    assert dump(store) == before
    assert len(fake.engine.calls) == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("plan", {"intent": 5}),
        ("seed", "seven"),
        ("seed", -1),
        ("seed", True),
        ("steps", "abc"),
        ("steps", 10**6),
        ("steps", 2.5),
        ("guidance", -1),
        ("guidance", "high"),
        ("native_size", "maybe"),
        ("candidates", 99),
        ("early_steps", 0),
    ],
)
def test_retrying_a_turn_whose_stored_values_are_damaged_is_one_line(agent, store, fake, photo, field, value):
    """A turn imported before archives were validated may hold anything; a retry reads it as typed input."""
    import json

    agent.turn("add a hat", source=(photo, "open cat"), seed=1)
    column, key = ("plan_json", None) if field == "plan" else ("params_json", field)
    (stored,) = store.db.execute(f"SELECT {column} FROM turns WHERE id = 2").fetchone()
    damaged = value if key is None else json.loads(stored) | {key: value}
    with store.db:
        store.db.execute(f"UPDATE turns SET {column} = ? WHERE id = 2", (json.dumps(damaged),))
    before = dump(store)
    with pytest.raises(UserError) as e:
        agent.retry()
    assert str(e.value) == (
        "turn 2 holds a damaged plan, seed or sampling: it cannot be retried; edit again instead"
    )
    assert dump(store) == before and len(fake.engine.calls) == 1


def test_a_jump_in_words_moves_the_cursor_and_a_missing_turn_changes_nothing(
    store, fake_settings, fake, photo
):
    agent = Agent(store, "s", fake_settings.model_copy(update={"rewriter": "rules"}))
    agent.turn("add a hat", source=(photo, "open cat"), seed=1)
    agent.turn("add snow", seed=2)
    out = agent.turn("go back to turn 2")
    assert (out.intent, out.turn.id, store.history("s").cursor) == ("jump", 2, 2)
    assert out.reply == "jump: at turn #2 (add a hat); an edit from here starts a branch"
    branched = agent.turn("add a scarf", seed=3)
    assert branched.turn.parent == 2  # a branch beside "add snow"
    agent.turn("start again from the original")
    assert store.history("s").cursor == 1
    before = dump(store)
    with pytest.raises(UserError) as e:
        agent.turn("go back to turn 9")
    assert str(e.value) == "session 's' has no turn 9"
    assert dump(store) == before


def test_the_rewriter_that_takes_turns_gets_the_sessions_turns(
    rec_agent, recording, store, photo, monkeypatch
):
    seen = []
    monkeypatch.setattr(
        Recording,
        "rewrite",
        lambda self, image, message, context, turns=None: (
            seen.append(turns) or RulesRewriter().rewrite(image, message, context)
        ),
    )
    rec_agent.turn("add a hat", source=(photo, "open cat"), seed=1)
    rec_agent.turn("undo")
    rec_agent.turn("add snow", seed=2)
    listed = seen[-1]
    assert [(t.id, t.parent, t.intent, t.current) for t in listed] == [
        (1, None, None, True),
        (2, 1, "edit", False),
    ]
    assert seen[0] == []  # a new image: no turns yet


# ---------------------------------------------------------------------- failures commit nothing


def test_a_cancelled_edit_commits_nothing(agent, store, fake, photo):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        agent.turn("add a hat", source=(photo, "open cat"), seed=1, cancel=cancel)
    assert not store.exists("s")  # not even the "open" turn or an empty session
    assert store.db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 0
    agent.turn("add a hat", source=(photo, "open cat"), seed=1)
    before = dump(store)
    with pytest.raises(Cancelled):
        agent.turn("make it winter", seed=2, cancel=cancel)
    assert dump(store) == before
    assert fake.finished == [("s", 1), ("s", 2)]  # observers heard of the committed turns only (open, edit)


def test_an_engine_error_commits_nothing(agent, store, fake, photo, monkeypatch):
    agent.turn("add a hat", source=(photo, "open cat"), seed=1)
    before = dump(store)

    def boom(request, events, cancel):
        raise UserError("engine exploded")

    monkeypatch.setattr(fake.engine, "edit", boom)
    with pytest.raises(UserError, match="engine exploded"):
        agent.turn("make it winter", seed=2)
    with pytest.raises(UserError, match="engine exploded"):
        agent.turn("retry")
    other = Image.new("RGB", (40, 30), (200, 10, 10))
    with pytest.raises(UserError, match="engine exploded"):
        agent.turn("add a dog", source=(other, "open red"), seed=3)  # a new "open" turn would go with it
    assert dump(store) == before


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ("", "the instruction is empty"),
        (" \t\n  ", "the instruction is empty"),
        ("x" * (MAX_MESSAGE + 1), f"the instruction is {MAX_MESSAGE + 1} characters long; at most 2000"),
        ("add a hat\x00", r"control character \('\\x00'\)"),
        ("add\x1b[31m a hat", r"control character \('\\x1b'\)"),
        ("add a hat\r", None),  # \r is stripped at the end ...
        ("add\ra hat", r"control character \('\\r'\)"),  # ... but refused inside
    ],
)
def test_bad_messages_are_refused_before_anything_is_stored(agent, store, fake, photo, message, error):
    agent.turn("add a hat", source=(photo, "open cat"), seed=1)
    before = dump(store)
    if error is None:
        assert agent.turn(message, seed=2).message == "add a hat"
        return
    with pytest.raises(UserError, match=error):
        agent.turn(message, seed=2)
    with pytest.raises(UserError, match=error):
        agent.turn(message, source=(photo, "open cat"), seed=2)
    assert dump(store) == before
    assert len(fake.engine.calls) == 1


def test_a_message_of_exactly_the_maximum_length_is_accepted_and_whitespace_collapsed(agent, fake, photo):
    out = agent.turn("  add   a\that\n", source=(photo, "open cat"), seed=1)
    assert out.turn.message == "add a hat"
    long = agent.turn("y" * MAX_MESSAGE, seed=2)
    assert long.turn.message == "y" * MAX_MESSAGE


def test_a_bad_message_to_a_new_session_creates_nothing(agent, store, photo):
    with pytest.raises(UserError):
        agent.turn("\x07", source=(photo, "open cat"))
    assert not store.exists("s")
    assert store.db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 0


# ---------------------------------------------------------------------- sources, instructions, context


def test_a_source_already_shown_continues_from_that_turn(agent, store, fake, photo):
    first = agent.turn("add a hat", source=(photo, "open cat"), seed=1).turn
    second = agent.turn("make it winter", seed=2).turn
    shown = decode_png(png_of(store, first)).convert("RGB")
    out = agent.turn("add a scarf", source=(shown, "open first.png"), seed=3)
    h = store.history("s")
    assert out.turn.parent == first.id  # a branch beside `second`, no duplicate "open" turn
    assert [t.kind for t in h.turns] == ["open", "edit", "edit", "edit"]
    assert [t.id for t in h.children(first.id)] == [second.id, out.turn.id]
    assert encode_png(fake.engine.calls[-1].source) == png_of(store, first)
    # the original photo again: from the root, still one "open" turn
    out = agent.turn("add a boat", source=(photo, "open cat"), seed=4)
    assert out.turn.parent == 1
    assert sum(t.kind == "open" for t in store.history("s").turns) == 1


def test_a_new_source_in_an_existing_session_opens_under_the_cursor(agent, store, fake, photo):
    first = agent.turn("add a hat", source=(photo, "open cat"), seed=1).turn
    other = Image.new("RGB", (40, 30), (200, 10, 10))
    out = agent.turn("add a dog", source=(other, "open red"), seed=3)
    h = store.history("s")
    opened = h.turn(out.turn.parent)
    assert (opened.kind, opened.message, opened.parent) == ("open", "open red", first.id)
    assert png_of(store, opened) == encode_png(other)
    assert pixel_digest(fake.engine.calls[-1].source) == opened.image_sha256


def test_an_explicit_instruction_skips_the_rewriter(rec_agent, store, recording, fake, photo):
    out = rec_agent.turn("undo that", source=(photo, "open cat"), instruction="add  a hat", seed=1)
    assert recording.seen == []
    assert (out.intent, out.plan.instruction, out.rewriter) == ("edit", "add a hat", "given")
    assert out.turn.params["rewriter"] == "given"
    assert out.turn.message == "undo that"
    assert fake.engine.calls[0].plan.instruction == "add a hat"
    with pytest.raises(UserError, match="control character"):
        rec_agent.turn("fine", instruction="bad\x00", seed=2)


def test_the_rewriter_sees_the_last_turns_of_the_path(rec_agent, store, recording, photo):
    rec_agent.turn("edit 0", source=(photo, "open cat"), seed=0)
    assert recording.seen[0][1] == []  # a new image has no past
    for i in range(1, 8):
        rec_agent.turn(f"edit {i}", seed=i)
    message, context = recording.seen[-1]
    assert message == "edit 7"
    # path: open, edit 0..6 -> the last 6 turns of it, the open turn has no plan anyway
    assert [(c.message, c.intent, c.instruction) for c in context] == [
        (f"edit {i}", "edit", f"edit {i}") for i in range(1, 7)
    ]
    rec_agent.turn("undo")
    rec_agent.turn("undo")  # cursor on "edit 5"
    rec_agent.turn("make it blue", seed=99)
    assert [c.message for c in recording.seen[-1][1]] == [
        "edit 0",
        "edit 1",
        "edit 2",
        "edit 3",
        "edit 4",
        "edit 5",
    ]
    rec_agent.turn("what?")  # a branch: its context holds the branch, not the abandoned edits 6 and 7
    assert [c.message for c in recording.seen[-1][1]] == [
        "edit 1",
        "edit 2",
        "edit 3",
        "edit 4",
        "edit 5",
        "make it blue",
    ]


def test_a_clarifying_answer_is_logged_but_moves_nothing(agent, store, fake, photo):
    with_nothing = agent.turn("please", source=(photo, "open cat"))
    assert (with_nothing.intent, with_nothing.turn) == ("clarify", None)
    assert not store.exists("s")
    edited = agent.turn("add a hat", source=(photo, "open cat"), seed=1).turn
    out = agent.turn("please!")
    assert out.intent == "clarify" and out.reply == "What would you like to change in the picture?"
    assert store.history("s").cursor == edited.id
    assert [(e.role, e.text, e.turn_id) for e in store.transcript("s")][-2:] == [
        ("user", "please!", edited.id),
        ("assistant", "What would you like to change in the picture?", edited.id),
    ]
    assert len(fake.engine.calls) == 1


def test_a_session_without_an_image_is_one_line(agent, store):
    with pytest.raises(UserError, match="session 's' has no image yet: open one first"):
        agent.turn("undo")
    with pytest.raises(UserError, match="session 's' has no image yet: open one first"):
        agent.turn("add a hat")
