"""Store evolution: an older store upgrades in place, a newer one is refused, and a session travels between
stores as an archive (`icedit sessions export NAME FILE.zip` / `icedit sessions import FILE`) exactly.

tests/fixtures/store-v1.sqlite3 was written by the schema-1 store (before the v2 indexes): session
"walk" (open; winter; scarf; undo; snowy night; a question; /branch 2) and session "other" (one open).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sqlite3
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image
from store_checks import check_store, dump

import sessions.archive
from assistant.agent import Agent
from assistant.cli import cli
from sessions.identity import png_digest
from sessions.store import MIGRATIONS, Store

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "store-v1.sqlite3"


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="icedit")


def rows(path: Path) -> dict:
    """The data of the v1 tables, row by row (not the schema)."""
    with sqlite3.connect(path) as con:
        return {
            t: con.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall()
            for t in ("sessions", "turns", "images", "log")
        }


@pytest.fixture
def v1_home(icedit_home) -> Path:
    icedit_home.mkdir()
    shutil.copy(FIXTURE, icedit_home / "sessions.sqlite3")
    return icedit_home


def renamed(data: dict) -> dict:
    """`rows` as schema 4 holds them: each image (and the turns showing it) named by its pixels."""
    names = {sha: png_digest(png) for sha, png, *_ in data["images"]}
    turns = [(*t[:7], names[t[7]], *t[8:]) for t in data["turns"]]
    return data | {"images": [(names[i[0]], *i[1:]) for i in data["images"]], "turns": turns}


def test_a_v1_store_opens_upgrades_and_keeps_everything(v1_home):
    path = v1_home / "sessions.sqlite3"
    before = rows(path)
    assert dump(v1_home)["user_version"] == 1 and len(MIGRATIONS) == 4
    assert all(hashlib.sha256(png).hexdigest() == sha for sha, png, *_ in before["images"])  # v1 names
    with Store(path) as store:
        assert store.db.execute("PRAGMA user_version").fetchone() == (4,)
        walk = store.history("walk")
        assert [(t.id, t.parent, t.kind, t.message) for t in walk.turns] == [
            (1, None, "open", "open cat.png"),
            (2, 1, "edit", "make it look like winter"),
            (3, 2, "edit", "add a red scarf"),
            (4, 2, "edit", "make it a snowy night"),
        ]
        assert walk.cursor == 2 and walk.turn(3).seed == 7
        assert [(e.role, e.text) for e in store.transcript("walk")][-3:] == [
            ("user", "what is in the picture?"),
            ("assistant", "a cat in the snow"),
            ("user", "/branch 2"),
        ]
        # the v2 indexes exist and the two lookups they are for use them
        plans = [
            " ".join(r[3] for r in store.db.execute(f"EXPLAIN QUERY PLAN {q}", args))
            for q, args in [
                (
                    "SELECT id FROM turns WHERE session_id = ? AND image_sha256 = ? ORDER BY id DESC LIMIT 1",
                    (1, "x"),
                ),
                ("SELECT role, text, turn_id, created FROM log WHERE session_id = ? ORDER BY id", (1,)),
            ]
        ]
        assert "turns_by_image" in plans[0] and "log_by_session" in plans[1]
    assert rows(path) == renamed(before)  # not a row changed but the images' names, PNG bytes as they were
    check_store(path)
    shown = invoke("sessions", "show", "walk")
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.splitlines()[0] == "session walk (cursor at #2)"


def test_an_upgraded_store_takes_new_turns(v1_home, fake_settings, photo):
    with Store(v1_home / "sessions.sqlite3") as store:
        outcome = Agent(store, "walk", fake_settings).turn("add a dog", seed=5)
        assert (outcome.turn.id, outcome.turn.parent) == (6, 2)
        assert store.history("walk").cursor == 6


def test_a_failed_upgrade_leaves_the_old_store_as_it_was(v1_home, monkeypatch):
    path = v1_home / "sessions.sqlite3"
    before = dump(v1_home)
    broken = MIGRATIONS[1] + "\nCREATE INDEX broken ON no_such_table(x);"
    monkeypatch.setattr("sessions.store.MIGRATIONS", [MIGRATIONS[0], broken])
    result = invoke("sessions", "list")
    assert result.exit_code == 2
    assert (
        result.stderr == f"Error: cannot open the session store {path}: no such table: main.no_such_table\n"
    )
    assert dump(v1_home) == before  # still version 1, no half of version 2
    with sqlite3.connect(path) as con:
        assert (
            con.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND name = 'turns_by_image'"
            ).fetchall()
            == []
        )


def test_a_store_from_a_newer_version_is_refused_in_one_line(v1_home):
    path = v1_home / "sessions.sqlite3"
    with sqlite3.connect(path) as con:
        con.execute("PRAGMA user_version = 9")
    before = dump(v1_home)
    for args in (["sessions", "list"], ["undo", "walk"]):
        result = invoke(*args)
        assert (result.exit_code, result.stderr) == (
            2,
            (
                f"Error: the session store {path} is from a newer "
                "icedit-assistant (schema 9, this one knows 4): upgrade "
                "icedit-assistant\n"
            ),
        )
    assert dump(v1_home) == before


# ------------------------------------------------------------------------------------------------ archives


@pytest.fixture
def walk(fake_settings, photo, tmp_path):
    """Session 'walk' with a branch, a second opened image, a question and a jump back."""
    with Store(fake_settings.store_path) as store:
        agent = Agent(store, "walk", fake_settings)
        agent.turn("make it look like winter", source=(photo, "open cat"), seed=1)
        agent.turn("add a red scarf", seed=2)
        agent.turn("undo")
        agent.turn("make it a snowy night", seed=3, steps=5)
        agent.turn("hmm")
        agent.open(Image.new("RGB", (40, 30), (200, 10, 10)), "open red")
        agent.turn("add a dog", seed=4)
        agent.jump(2)
    return fake_settings.home


def test_export_import_round_trips_a_session_exactly(walk, tmp_path, monkeypatch):
    first = tmp_path / "walk.zip"
    result = invoke("sessions", "export", "walk", first)
    assert (result.exit_code, result.stdout) == (0, f"wrote {first} (session walk: 6 turns, 6 images)\n")
    # into another store: the same session, and exported again, the same bytes
    monkeypatch.setenv("ICEDIT_HOME", str(tmp_path / "other"))
    result = invoke("sessions", "import", first, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"session": "walk", "turns": 6, "cursor": 2, "archive": str(first)}
    again = tmp_path / "again.zip"
    assert invoke("sessions", "export", "walk", again).exit_code == 0
    assert again.read_bytes() == first.read_bytes()
    assert check_store(tmp_path / "other" / "sessions.sqlite3")
    # into the same store under another name: ids move, nothing else does
    monkeypatch.setenv("ICEDIT_HOME", str(walk))
    result = invoke("sessions", "import", first, "--as", "copy")
    assert result.stdout == f"imported session copy (6 turns, cursor at #8) from {first}\n"
    with Store(walk / "sessions.sqlite3") as store:
        original, copy = store.history("walk"), store.history("copy")
        ids = {o.id: c.id for o, c in zip(original.turns, copy.turns, strict=True)}
        for o, c in zip(original.turns, copy.turns, strict=True):
            assert c.model_dump() == o.model_dump() | {"id": ids[o.id], "parent": ids.get(o.parent)}
            assert store.image(c.image_sha256) == store.image(o.image_sha256)
        assert copy.cursor == ids[original.cursor]
        assert [e.model_dump() | {"turn_id": None} for e in store.transcript("copy")] == [
            e.model_dump() | {"turn_id": None} for e in store.transcript("walk")
        ]
        assert [ids[e.turn_id] for e in store.transcript("walk")] == [
            e.turn_id for e in store.transcript("copy")
        ]
        infos = {i.name: i for i in store.sessions()}
        assert (infos["copy"].created, infos["copy"].updated) == (
            infos["walk"].created,
            infos["walk"].updated,
        )


def _rezip(src: Path, dest: Path, change) -> Path:
    """A copy of archive `src` whose {name: bytes} went through `change`."""
    with zipfile.ZipFile(src) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    change(members)
    with zipfile.ZipFile(dest, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return dest


def _session_json(change):
    def edit(members):
        data = json.loads(members["session.json"])
        change(data)
        members["session.json"] = json.dumps(data).encode()

    return edit


def _first_image(members) -> str:
    return next(n for n in sorted(members) if n.startswith("images/"))


def _other_pixels(members) -> None:
    """The first image replaced by a sound PNG of another picture, under the same name."""
    name = _first_image(members)
    image = Image.open(io.BytesIO(members[name])).convert("RGB")
    image.putpixel((0, 0), tuple(255 - v for v in image.getpixel((0, 0))))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    members[name] = buf.getvalue()


def _jpeg_named_by_its_hash(members) -> None:
    name = _first_image(members)
    buf = io.BytesIO()
    Image.open(io.BytesIO(members.pop(name))).convert("RGB").save(buf, "JPEG")
    digest = hashlib.sha256(buf.getvalue()).hexdigest()
    members[f"images/{digest}.png"] = buf.getvalue()
    old = name.removeprefix("images/").removesuffix(".png")
    members["session.json"] = members["session.json"].replace(old.encode(), digest.encode())


BAD_ARCHIVES = {
    "text file": (
        lambda a, d: (d / "x.zip").write_text("not a zip") and d / "x.zip",
        (
            "{path}: not a session archive (a .zip from `icedit sessions export NAME FILE.zip`): File is not a "
            "zip file"
        ),
    ),
    "folder": (
        lambda a, d: (d / "f.zip").mkdir() or d / "f.zip",
        "{path} is a folder, not a session archive",
    ),
    "missing": (lambda a, d: d / "nope.zip", "{path}: no such file"),
    "path escape": (
        lambda a, d: _rezip(a, d / "b.zip", lambda m: m.__setitem__("../evil.sh", b"rm -rf ~")),
        (
            "{path}: unexpected file '../evil.sh' in the archive (a session archive holds session.json and "
            "images/<sha256>.png)"
        ),
    ),
    "image not matching its name": (
        lambda a, d: _rezip(a, d / "b.zip", _other_pixels),
        (
            "{path}: {first} does not hash to its name: the archive is damaged"
            ": nothing was imported (turn {turn} cannot be restored; --partial imports the rest)"
        ),
    ),
    "image missing": (
        lambda a, d: _rezip(a, d / "b.zip", lambda m: m.pop(_first_image(m))),
        (
            "{path}: image {short} of the session is not in the archive"
            ": nothing was imported (turn {turn} cannot be restored; --partial imports the rest)"
        ),
    ),
    "a jpeg": (
        lambda a, d: _rezip(a, d / "b.zip", _jpeg_named_by_its_hash),
        (
            "{path}: {jpeg} is a JPEG, not a PNG"
            ": nothing was imported (turn {turn} cannot be restored; --partial imports the rest)"
        ),
    ),
    "cursor on no turn": (
        lambda a, d: _rezip(a, d / "b.zip", _session_json(lambda s: s.__setitem__("cursor", 99))),
        "{path}: session.json: Value error, the cursor 99 is not one of the turns",
    ),
    "parent after child": (
        lambda a, d: _rezip(a, d / "b.zip", _session_json(lambda s: s["turns"][1].__setitem__("parent", 5))),
        "{path}: session.json: Value error, turn 2: its parent 5 is not an earlier turn",
    ),
    "unknown format": (
        lambda a, d: _rezip(
            a, d / "b.zip", _session_json(lambda s: s.__setitem__("format", "icedit-session/9"))
        ),
        "{path}: session.json: format: Input should be 'icedit-session/2' or 'icedit-session/1'",
    ),
    "no session.json": (
        lambda a, d: _rezip(a, d / "b.zip", lambda m: m.pop("session.json")),
        "{path}: no session.json in the archive",
    ),
    "oversized session.json": (
        lambda a, d: _rezip(
            a, d / "b.zip", lambda m: m.__setitem__("session.json", m["session.json"] + b" " * 2_000_000)
        ),
        "{path}: session.json is {size} bytes; at most 1000000 are accepted",
    ),
    "name taken": (
        lambda a, d: a,
        "a session named 'walk' already exists: import it under another name with --as",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ARCHIVES), ids=list(BAD_ARCHIVES))
def test_a_bad_archive_is_one_line_and_changes_nothing(walk, tmp_path, monkeypatch, case):
    monkeypatch.setattr(sessions.archive, "MAX_JSON_BYTES", 1_000_000)
    archive = tmp_path / "walk.zip"
    assert invoke("sessions", "export", "walk", archive).exit_code == 0
    make, expected = BAD_ARCHIVES[case]
    path = make(archive, tmp_path)
    names = zipfile.ZipFile(path).namelist() if path.is_file() and zipfile.is_zipfile(path) else []
    first = min(n for n in zipfile.ZipFile(archive).namelist() if n.startswith("images/"))
    jpeg = next(
        (n for n in names if n.startswith("images/") and n not in zipfile.ZipFile(archive).namelist()), ""
    )
    size = zipfile.ZipFile(path).getinfo("session.json").file_size if "session.json" in names else 0
    turns = json.loads(zipfile.ZipFile(archive).read("session.json"))["turns"]
    turn = next(t["n"] for t in turns if t["image_sha256"] == first[7:-4])
    before = dump(walk)
    result = invoke("sessions", "import", path)
    assert result.exit_code == 2, result.output
    assert (
        result.stderr
        == "Error: "
        + expected.format(path=path, first=first, short=first[7:19], jpeg=jpeg, size=size, turn=turn)
        + "\n"
    )
    assert "Traceback" not in result.output
    assert dump(walk) == before
