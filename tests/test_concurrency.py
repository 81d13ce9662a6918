"""Two or more processes writing one store at once: nobody sees `database is locked`, no turn is lost.

The store waits out other writers (busy_timeout, BEGIN IMMEDIATE, short transactions, and a retry
around switching a new file to WAL, which SQLite's busy handler does not cover).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image
from store_checks import EXAMPLES, check_store, popen
from textual_image.widget import HalfcellImage

from assistant.tui.app import make_app
from assistant.tui.widgets.prompt_input import PromptInput
from sessions.store import Store

WRITER = """
import sys, time
sys.path[:0] = [{root!r}, {tests!r}]
from test_store import draft
from sessions.store import Store

start, n = float(sys.argv[1]), int(sys.argv[2])
while time.time() < start:
    pass
ids = []
with Store(sys.argv[3]) as store:  # every writer opens the brand-new file at the same moment
    root = None
    for i in range(40):
        if root is None:
            (root,) = store.add_turns(f"w{{n}}", None, [draft("open", "o", (n, i, 1))])
            ids.append(root.id)
        else:
            (turn,) = store.add_turns(f"w{{n}}", root.id, [draft("edit", f"e{{i}}", (n, i, 2))])
            ids.append(turn.id)
            store.move_cursor(f"w{{n}}", root.id, [("user", "undo")])
            store.log(f"w{{n}}", [("user", "hi"), ("assistant", "hello")])
print(ids)
"""


def test_writers_hammering_a_new_store_at_once_all_succeed(tmp_path):
    path = tmp_path / "home" / "sessions.sqlite3"
    tests = Path(__file__).resolve().parent
    code = WRITER.format(root=str(tests.parent), tests=str(tests))
    start = time.time() + 2  # they all wait for the same moment, imports done
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(start), str(n), str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(6)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert err == ""
    sessions = check_store(path)
    for n, (out, _) in enumerate(outs):
        assert sorted(sessions[f"w{n}"]) == json.loads(out)  # every committed turn, each writer its own 40
        assert len(json.loads(out)) == 40
    with Store(path) as store:
        assert len(store.transcript("w0")) == 1 + 39 * 4  # open; edit; undo; hi; hello


def test_two_edits_and_a_replay_on_one_session_at_once(tmp_path):
    """Console scripts, tiny preset: all finish, every reported turn is kept, the source is opened once."""
    Image.open(EXAMPLES / "chelsea.png").convert("RGB").resize((48, 32)).save(tmp_path / "small.png")
    (tmp_path / "walk.toml").write_text(
        'source = "small.png"\nsteps = 1\n[[turns]]\nsay = "add snow"\n'
        '[[turns]]\nsay = "add a hat"\n[[turns]]\ncommand = "undo"\n'
        '[[turns]]\nsay = "add a dog"\n'
    )
    home = tmp_path / "home"
    edit = [
        "edit",
        "small.png",
        "make it look like winter",
        "--preset",
        "tiny",
        "--steps",
        "1",
        "--session",
        "shared",
        "--json",
    ]
    procs = [
        popen(*edit, "--seed", 1, "-o", "a.png", home=home, cwd=tmp_path),
        popen(*edit, "--seed", 2, "-o", "b.png", home=home, cwd=tmp_path),
        popen(
            "replay",
            "walk.toml",
            "--out",
            "out",
            "--preset",
            "tiny",
            "--session",
            "shared",
            "--json",
            home=home,
            cwd=tmp_path,
        ),
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert "locked" not in err and "Traceback" not in err
    edits = [json.loads(outs[0][0]), json.loads(outs[1][0])]
    rows = [json.loads(line) for line in outs[2][0].splitlines()]
    assert len(rows) == 4
    turns = check_store(home / "sessions.sqlite3")["shared"]
    for reported in [
        *((e["turn"], e["image_sha256"]) for e in edits),
        *((r["cursor"], r["image_sha256"]) for r in rows),
    ]:
        assert turns[reported[0]] == reported[1]
    # 1 open (the same picture, opened by whoever came first), 2 edits, the replay's 3 edits
    assert len(turns) == 6
    with Store(home / "sessions.sqlite3") as store:
        history = store.history("shared")
    assert [t.kind for t in history.turns].count("open") == 1
    root = history.children(None)[0]
    assert {e["turn"] for e in edits} | {rows[0]["cursor"]} == {t.id for t in history.children(root.id)}


async def test_the_chat_keeps_editing_while_a_replay_writes_the_same_store(
    tmp_path, fake_settings, fake, photo
):
    Image.open(EXAMPLES / "chelsea.png").convert("RGB").resize((48, 32)).save(tmp_path / "small.png")
    turns = "".join(f'[[turns]]\nsay = "edit number {i}"\n' for i in range(6))
    (tmp_path / "r.toml").write_text(f'source = "small.png"\nsteps = 1\n{turns}')
    photo.save(tmp_path / "cat.png")
    app = make_app(fake_settings, session="chat", image=tmp_path / "cat.png", renderer=HalfcellImage)
    replay = popen(
        "replay",
        "r.toml",
        "--out",
        "out",
        "--preset",
        "tiny",
        "--session",
        "r",
        "--json",
        home=fake_settings.home,
        cwd=tmp_path,
    )
    said = 0
    async with app.run_test(size=(120, 40)) as pilot:
        while replay.poll() is None or said < 5:
            app.screen.query_one(PromptInput).value = f"add hat number {said}"
            await pilot.press("enter")
            await app.workers.wait_for_complete()
            await pilot.pause()
            said += 1
        errors = [text for role, text in app.screen.query_one("#log").lines if role == "error"]
    out, err = replay.communicate(timeout=60)
    assert replay.returncode == 0, err
    assert errors == []
    sessions = check_store(fake_settings.store_path)
    assert len(sessions["chat"]) == 1 + said  # the open and every edit said in the chat
    rows = [json.loads(line) for line in out.splitlines()]
    assert [sessions["r"][r["cursor"]] for r in rows] == [r["image_sha256"] for r in rows]
    assert len(sessions["r"]) == 7
