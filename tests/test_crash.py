"""Crash safety: the real `icedit` console script killed (SIGKILL) at random moments, and stopped with Ctrl+C.

Runs use the tiny preset with one step on a small source, so a turn takes a fraction of a second
and a process about four. Two lanes kill processes side by side on one store, as two terminals
would; after every kill the store is checked whole, and every turn a process reported (printed
its JSON line) before it died must be there with its image.
"""

from __future__ import annotations

import json
import os
import pty
import random
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from store_checks import EXAMPLES, ICEDIT, check_store, env_for, popen

KILLS = 30
lock = threading.Lock()
SCRIPT = """source = "small.png"
steps = 1
seed = 10
[[turns]]
say = "make it look like winter"
[[turns]]
say = "add a red scarf"
[[turns]]
command = "undo"
[[turns]]
say = "make it a snowy night"
[[turns]]
say = "add a full moon"
[[turns]]
command = "undo"
[[turns]]
command = "redo"
[[turns]]
say = "add falling snow"
"""
TURNS = SCRIPT.count("[[turns]]")


@pytest.fixture
def folder(tmp_path) -> Path:
    Image.open(EXAMPLES / "chelsea.png").convert("RGB").resize((48, 32)).save(tmp_path / "small.png")
    (tmp_path / "walk.toml").write_text(SCRIPT)
    return tmp_path


class Run:
    """One console-script process whose stdout lines are collected as they come."""

    def __init__(self, *args: object, home: Path, cwd: Path, **kw):
        self.proc = popen(*args, home=home, cwd=cwd, **kw)
        self.lines: list[str] = []
        self.times: list[float] = []
        """Seconds from the start to each line."""
        self.started = time.monotonic()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.times.append(time.monotonic() - self.started)
            self.lines.append(line)

    def wait_lines(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.lines) < n and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)

    def kill(self) -> bool:
        """SIGKILL now; True if the process was still running."""
        running = self.proc.poll() is None
        if running:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)
        self.reader.join(timeout=60)
        self.stderr = self.proc.stderr.read()  # the process is gone: what it said, for a failure's message
        self.proc.stderr.close()
        return running

    def reported(self) -> list[dict]:
        """The JSON lines printed whole before the end (a line cut by the kill is not a report)."""
        return [json.loads(line) for line in self.lines if line.endswith("\n")]


def lane(name: str, rng: random.Random, home: Path, cwd: Path, results: dict, errors: list) -> None:
    """Start, kill at a random moment, check; repeat until the lanes together have KILLS kills.

    Edits go to a new session each (their open and edit commit together); replays alternate between
    the lane's long-lived session and new ones. A kill lands in start-up, in a turn, or near a commit:
    the time to a run's first JSON line is learnt from the runs before.
    """
    first_line = {"edit": 4.0, "replay": 3.5}
    try:
        while results["kills"] < KILLS and results["runs"] < 3 * KILLS:
            with lock:
                results["runs"] += 1
                n = results["runs"]
            kind = "edit" if rng.random() < 0.25 else "replay"
            if kind == "edit":  # a single edit, killed from start-up to just after its commit
                session = f"{name}-{n}"
                run = Run(
                    "edit",
                    "small.png",
                    "add snow",
                    "--preset",
                    "tiny",
                    "--steps",
                    "1",
                    "--session",
                    session,
                    "--seed",
                    rng.randrange(1000),
                    "-o",
                    f"{name}.png",
                    "--json",
                    home=home,
                    cwd=cwd,
                )
                time.sleep(rng.uniform(0.5, 1.05) * first_line["edit"])
            else:  # a replay, killed after a random number of committed turns, a random moment into the next
                session = name if n % 2 else f"{name}-{n}"
                run = Run(
                    "replay",
                    "walk.toml",
                    "--out",
                    f"out-{name}",
                    "--preset",
                    "tiny",
                    "--session",
                    session,
                    "--json",
                    home=home,
                    cwd=cwd,
                )
                if (done := rng.randrange(TURNS)) == 0:
                    time.sleep(rng.uniform(0.5, 1.05) * first_line["replay"])
                else:
                    run.wait_lines(done)
                    time.sleep(rng.uniform(0, 0.3))
            killed = run.kill()
            if run.times:
                first_line[kind] = run.times[0]
            if not killed:
                assert run.proc.returncode == 0, (
                    f"a run that was not killed failed ({run.proc.returncode}): {run.stderr[-500:]}"
                )
            key = "turn" if kind == "edit" else "cursor"
            reports = [(r[key], r["image_sha256"]) for r in run.reported()]
            with lock:
                results["kills"] += killed
                results["reported"] += len(reports)
                sessions = (
                    check_store(home / "sessions.sqlite3") if (home / "sessions.sqlite3").exists() else {}
                )
            for turn_id, sha in reports:
                assert sessions[session].get(turn_id) == sha, f"reported turn {turn_id} of {session} is gone"
    except BaseException as e:  # noqa: BLE001 - handed to the test's thread
        errors.append(e)


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_no_reported_turn_and_leaves_the_store_whole(folder):
    home = folder / "home"
    results = {"kills": 0, "runs": 0, "reported": 0}
    errors: list[BaseException] = []
    lanes = [
        threading.Thread(
            target=lane, args=(f"lane{i}", random.Random(1000 + i), home, folder, results, errors)
        )
        for i in range(2)
    ]
    for t in lanes:
        t.start()
    for t in lanes:
        t.join()
    if errors:
        raise errors[0]
    assert results["kills"] >= KILLS, results
    assert results["reported"] > KILLS  # most kills came after some turns were committed
    sessions = check_store(home / "sessions.sqlite3")
    with sqlite3.connect(home / "sessions.sqlite3") as con:
        # no "open" turn without its first edit: the two are committed together
        lonely = con.execute(
            "SELECT id FROM turns t WHERE kind = 'open' AND NOT EXISTS "
            "(SELECT 1 FROM turns c WHERE c.parent_id = t.id)"
        ).fetchall()
    assert lonely == []
    # the store still serves the person: the same store, read by the console script after all that
    shown = subprocess.run(
        [str(ICEDIT), "sessions", "show", "lane0", "--json"],
        env=env_for(home),
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert {t["id"] for t in json.loads(shown.stdout)["turns"]} == set(sessions["lane0"])


def test_ctrl_c_during_a_replay_keeps_the_turns_before_and_nothing_of_the_one_in_flight(folder):
    home = folder / "home"
    (folder / "slow.toml").write_text(
        'source = "small.png"\nseed = 3\n[[turns]]\nsay = "make it look like winter"\nsteps = 1\n'
        '[[turns]]\nsay = "add a red scarf"\nsteps = 200\n[[turns]]\nsay = "add a hat"\nsteps = 1\n'
    )
    # stderr is a terminal, so the console script draws its progress line there: Ctrl+C is sent once turn 2
    # has reported a step (an event, not a guess at how long turn 1 takes).
    leader, follower = pty.openpty()
    run = Run(
        "replay",
        "slow.toml",
        "--out",
        "out",
        "--preset",
        "tiny",
        "--session",
        "s",
        "--json",
        home=home,
        cwd=folder,
        stderr=follower,
    )
    os.close(follower)
    err_text, in_turn_2 = [], threading.Event()

    def read_terminal() -> None:
        while True:
            try:
                chunk = os.read(leader, 4096).decode(errors="replace")
            except OSError:  # the process is gone and the terminal closed
                return
            if not chunk:
                return
            err_text.append(chunk)
            if run.lines and "step 2/200" in "".join(err_text):
                in_turn_2.set()

    terminal = threading.Thread(target=read_terminal, daemon=True)
    terminal.start()
    assert in_turn_2.wait(120), "".join(err_text)
    assert len(run.lines) == 1
    run.proc.send_signal(signal.SIGINT)
    code = run.proc.wait(timeout=60)
    run.reader.join(timeout=10)
    terminal.join(timeout=10)
    os.close(leader)
    # the progress line overwrites itself with \r; what stays are the lines after it
    err = [line.rsplit("\r", 1)[-1].strip() for line in "".join(err_text).replace("\r\n", "\n").split("\n")]
    err = [line for line in err if line]
    assert code == 130
    assert err[-1] == "Error: turn 2: cancelled: nothing of it was saved (the turns before it are kept)"
    assert [line for line in err if line.startswith("Error")] == [err[-1]]
    assert "Traceback" not in "\n".join(err)
    first = json.loads(run.lines[0])
    turns = check_store(home / "sessions.sqlite3")["s"]
    assert set(turns) == {
        first["cursor"] - 1,
        first["cursor"],
    }  # turn 1 (its open and its edit), nothing of 2
    assert turns[first["cursor"]] == first["image_sha256"]
    assert sorted(p.name for p in (folder / "out").iterdir()) == ["01-edit.png"]
