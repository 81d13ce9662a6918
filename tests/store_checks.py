"""What the reliability tests check a session store file for, read with plain sqlite3 (no migrations run)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from sessions.identity import png_digest

ICEDIT = Path(sys.executable).with_name("icedit")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def env_for(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a console-script run on store folder `home`: no ICEDIT_* from outside, one thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICEDIT_")}
    return env | {"ICEDIT_HOME": str(home), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"} | extra


def popen(*args: object, home: Path, cwd: Path, **kw) -> subprocess.Popen:
    """The real `icedit` console script, as a person runs it."""
    assert ICEDIT.is_file(), f"console script missing: {ICEDIT}"
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    return subprocess.Popen(
        [str(ICEDIT), *map(str, args)], cwd=cwd, env=env_for(home), text=True, **pipes | kw
    )


def dump(home: Path) -> dict | None:
    """Every row of every table and the schema version (None when there is no store file)."""
    path = home / "sessions.sqlite3"
    if not path.exists():
        return None
    con = sqlite3.connect(path)
    try:
        tables = [
            r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        ]
        out = {t: con.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall() for t in tables}
        out["user_version"] = con.execute("PRAGMA user_version").fetchone()[0]
        return out
    finally:
        con.close()


def check_store(path: Path) -> dict:
    """Assert the invariants a store keeps whatever happened to the processes writing it.

    The file is intact; every turn has its image, which hashes to its name, parents in the same
    session and older, and readable JSON; every session has turns and its cursor on one of them.
    Returns {session name: {turn id: image sha256}}.
    """
    con = sqlite3.connect(path, timeout=30)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        con.execute("PRAGMA foreign_keys = ON")
        assert con.execute("PRAGMA foreign_key_check").fetchall() == []
        images = dict(con.execute("SELECT sha256, png FROM images").fetchall())
        for sha, png in images.items():
            assert png_digest(png) == sha
        turns = {
            r[0]: r[1:]
            for r in con.execute(
                "SELECT id, session_id, parent_id, kind, plan_json, params_json, image_sha256,"
                " timings_json FROM turns"
            )
        }
        for tid, (sid, parent, kind, plan, params, image, timings) in turns.items():
            assert image in images, f"turn {tid} has no image"
            json.loads(params), json.loads(timings)
            if kind == "edit":
                assert parent is not None and json.loads(plan)["intent"], f"edit turn {tid} is half-written"
            if parent is not None:
                assert parent < tid and turns[parent][0] == sid, f"turn {tid} hangs under a foreign turn"
        out = {}
        for sid, name, cursor in con.execute("SELECT id, name, cursor FROM sessions"):
            mine = {tid: t[5] for tid, t in turns.items() if t[0] == sid}
            assert mine, f"session {name} has no turns"
            assert cursor in mine, f"the cursor of session {name} is on no turn of it"
            out[name] = mine
        return out
    finally:
        con.close()
