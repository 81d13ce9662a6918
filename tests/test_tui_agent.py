"""The chat shows the agent at work (issue 18, part 5): a plan and its steps, each self-check attempt
with its seed and score; /attempts, /accept and /check set the next edits (Pilot, fake engine)."""

from __future__ import annotations

import threading

import pytest
from test_self_check import Judges, Scripted
from test_tui import SIZE, app_for, history, log_lines, say, tree_nodes

from assistant.settings import Settings
from assistant.testing import registered
from assistant.tui.widgets.status_line import StatusLine


@pytest.fixture
def cat(tmp_path, photo):
    path = tmp_path / "cat.png"
    photo.save(path)
    return path


@pytest.fixture
def judges(fake):
    plugin = Judges()
    with registered(plugin, "test-judges"):
        yield plugin


def status(app) -> str:
    return str(app.screen.query_one(StatusLine).render())


async def test_a_plan_shows_its_steps_and_each_lands_as_a_turn(fake_settings, fake, cat):
    app = app_for(fake_settings, image=cat)
    async with app.run_test(size=SIZE) as pilot:
        await say(pilot, "add snow; make it night")
        h = history(fake_settings)
        assert [(t.id, t.parent) for t in h.turns] == [(1, None), (2, 1), (3, 2)] and h.cursor == 3
        info = [text for kind, text in log_lines(app) if kind == "info"]
        assert "plan of 2 edits: 1. add snow; 2. make it night" in info
        assert "step 1 of 2 done: turn #2 (add snow)" in info
        assert "step 2 of 2 done: turn #3 (make it night)" in info
        assert ("assistant", "2 of 2 steps: #2 add snow, #3 make it night") in log_lines(app)
        nodes = tree_nodes(app)
        assert "add snow (step 1/2)" in nodes[2][1] and "make it night (step 2/2)" in nodes[3][1]
        await say(pilot, "/undo")
        assert history(fake_settings).cursor == 2  # one step back, named as the tree names it
        assert log_lines(app)[-1] == ("info", "undo: back at turn #2 (add snow (step 1/2))")


async def test_attempts_show_seed_and_score_and_the_cursor_ends_on_the_best(judges, cat):
    judges.judge = Scripted(0.2, 0.1, 0.4)
    settings = Settings(engine="fake", judge="scripted", steps=3)
    app = app_for(settings, image=cat)
    async with app.run_test(size=SIZE) as pilot:
        assert "check off" in status(app)
        await say(pilot, "/seed 20")
        await say(pilot, "/attempts 3")
        assert log_lines(app)[-1] == ("info", "check ≥ 0.5, 3 attempts: below the bar, the next seed runs")
        await say(pilot, "/accept 0.3")
        assert "check ≥ 0.3, 3 attempts" in status(app)
        await say(pilot, "add a hat")
        h = history(settings)
        assert [(t.id, t.parent, t.seed) for t in h.turns] == [
            (1, None, None),
            (2, 1, 20),
            (3, 1, 21),
            (4, 1, 22),
        ]
        assert h.cursor == 4
        info = [text for kind, text in log_lines(app) if kind == "info"]
        assert "attempt 1 of 3 (seed 20, turn #2): score 0.20, below the bar" in info
        assert "attempt 3 of 3 (seed 22, turn #4): score 0.40, passed" in info
        nodes = tree_nodes(app)
        assert "check 0.10" in nodes[3][1] and "▶" in nodes[4][1]


async def test_check_on_scores_one_attempt_and_off_turns_retries_off(judges, cat):
    judges.judge = Scripted(0.9)
    settings = Settings(engine="fake", judge="scripted", steps=3)
    app = app_for(settings, image=cat)
    async with app.run_test(size=SIZE) as pilot:
        await say(pilot, "/check on")
        assert "check ≥ 0.5" in status(app)
        await say(pilot, "add a hat")
        assert any("self-check: score 0.90 passed" in text for _, text in log_lines(app))
        await say(pilot, "/attempts 4")
        await say(pilot, "/check off")
        assert log_lines(app)[-1] == ("info", "check off for the next edits")
        await say(pilot, "add a scarf")  # no judge left to ask: Scripted has no more scores
        assert len(history(settings).turns) == 3


@pytest.mark.parametrize(
    ("command", "error"),
    [
        ("/accept 1.5", "usage: /accept P (the judge's P(yes) an edit needs, from 0 to 1)"),
        ("/accept lots", "usage: /accept P (the judge's P(yes) an edit needs, from 0 to 1)"),
        ("/attempts 0", "usage: /attempts N (a whole number from 1 to 16; got 0)"),
        ("/check maybe", "usage: /check on|off (now check off)"),
    ],
)
async def test_bad_values_are_one_line_and_change_nothing(judges, cat, command, error):
    settings = Settings(engine="fake", judge="scripted", steps=3)
    app = app_for(settings, image=cat)
    async with app.run_test(size=SIZE) as pilot:
        before = status(app)
        await say(pilot, command)
        assert log_lines(app)[-1] == ("error", error)
        assert status(app) == before


async def test_the_judges_weights_must_be_on_disk_for_the_check(fake_settings, fake, cat, tmp_path):
    app = app_for(fake_settings.with_options(vlm=str(tmp_path / "nowhere")), image=cat)
    async with app.run_test(size=SIZE) as pilot:
        for command in ("/attempts 2", "/check on"):
            await say(pilot, command)
            kind, text = log_lines(app)[-1]
            assert kind == "error" and "nowhere" in text
        assert "check off" in status(app)


async def test_escape_between_attempts_keeps_the_first(judges, cat, monkeypatch):
    judges.judge = Scripted(0.1, 0.9)
    settings = Settings(engine="fake", judge="scripted", steps=3, attempts=3)
    app = app_for(settings, image=cat)
    checked = threading.Event()
    original = judges.judge.check

    def check(*args):
        checked.set()
        app.screen.cancel.set()  # Escape while the first attempt is judged
        return original(*args)

    monkeypatch.setattr(judges.judge, "check", check)
    async with app.run_test(size=SIZE) as pilot:
        await say(pilot, "add a hat")
        assert checked.is_set() and len(history(settings).turns) == 2
        assert log_lines(app)[-1][0] == "error" and "attempt 2 of 3: cancelled" in log_lines(app)[-1][1]
