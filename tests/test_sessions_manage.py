"""Managing stored sessions: `icedit sessions rm`, `rename`, `get`, `search` and `gc`.

Sessions are built with the store directly (no engine). The behaviours a script relies on run through
the real console script; the rest through CliRunner.
"""

from __future__ import annotations

import json
import random
import re
import sqlite3
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image
from store_checks import ICEDIT, check_store, dump, env_for

from assistant.cli import cli
from sessions.identity import decode_png, encode_png, png_digest
from sessions.store import NewTurn, Store

SIZE = (64, 48)
GC_HINT = "icedit sessions gc frees their images"


def noise(seed: int) -> Image.Image:
    """A picture PNG cannot squeeze: gc has whole pages to free."""
    rng = random.Random(seed)
    return Image.frombytes("RGB", SIZE, rng.randbytes(SIZE[0] * SIZE[1] * 3))


def draft(kind: str, message: str, seed: int, instruction: str | None = None) -> NewTurn:
    png = encode_png(noise(seed))
    return NewTurn(
        kind=kind,
        message=message,
        png=png,
        image_sha256=png_digest(png),
        size=SIZE,
        plan=None if kind == "open" else {"intent": "edit", "instruction": instruction or message},
        params={} if kind == "open" else {"seed": seed},
        replies=[("user", message), ("assistant", "done")],
    )


@pytest.fixture
def home(icedit_home, tmp_path, monkeypatch) -> Path:
    """trip: open(1) -> 2 -> 3, cursor on 3; cat: open(4, trip's picture again) -> 5. cwd is tmp_path."""
    monkeypatch.chdir(tmp_path)
    with Store(icedit_home / "sessions.sqlite3") as store:
        store.add_turns(
            "trip",
            None,
            [
                draft("open", "open beach.png", 1),
                draft("edit", "make it brighter", 2, instruction="raise the exposure by 50%"),
                draft("edit", "paint a_b on the sand", 3),
            ],
        )
        store.add_turns(
            "cat",
            None,
            [draft("open", "open beach.png", 1), draft("edit", "write aXb at 500 px, Brighter", 5)],
        )
    return icedit_home


def invoke(*args: object, input: str | None = None, runner: CliRunner | None = None):
    return (runner or CliRunner()).invoke(cli, [str(a) for a in args], input=input, prog_name="icedit")


class Terminal(CliRunner):
    """A CliRunner whose stdin says it is a terminal, as a person's is."""

    @contextmanager
    def isolation(self, *args, **kwargs):
        import sys

        with super().isolation(*args, **kwargs) as streams:
            sys.stdin.isatty = lambda: True  # type: ignore[method-assign]
            yield streams


def icedit(*args: object, home: Path, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    """The real console script, stdin not a terminal (as in a script); output as bytes."""
    return subprocess.run(
        [str(ICEDIT), *map(str, args)],
        cwd=cwd,
        env=env_for(home),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=False,
    )


def stored(home: Path, session: str, turn: int) -> bytes:
    with Store(home / "sessions.sqlite3") as store:
        return store.image(store.history(session).turn(turn).image_sha256)


def size_on_disk(home: Path) -> int:
    path = home / "sessions.sqlite3"
    wal = Path(f"{path}-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


# ----------------------------------------------------------------------------------------------- rm


def test_rm_off_a_terminal_refuses_without_yes_and_deletes_with_it(home, tmp_path):
    before = dump(home)
    refused = icedit("sessions", "rm", "trip", home=home, cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.decode() == (
        "Error: session trip (3 turns) not deleted: stdin is not a terminal to ask on; pass --yes\n"
    )
    assert refused.stdout == b""
    assert dump(home) == before

    done = icedit("sessions", "rm", "trip", "--yes", home=home, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == f"deleted session trip (3 turns); {GC_HINT}\n"
    assert done.stderr == b""
    after = dump(home)
    assert [row[1] for row in after["sessions"]] == ["cat"]
    cat_id = after["sessions"][0][0]
    assert [row[0] for row in after["turns"]] == [4, 5]
    assert {row[1] for row in after["log"]} == {cat_id}
    assert after["images"] == before["images"]  # rm frees no image: gc does
    assert set(check_store(home / "sessions.sqlite3")) == {"cat"}


def test_rm_of_two_sessions_is_one_transaction(home):
    commits = dump(home)["store_state"][0][2]
    result = invoke("sessions", "rm", "trip", "cat", "trip", "--yes")
    assert result.exit_code == 0, result.output
    assert (
        result.stdout
        == f"deleted session trip (3 turns); {GC_HINT}\ndeleted session cat (2 turns); {GC_HINT}\n"
    )
    after = dump(home)
    assert (after["sessions"], after["turns"], after["log"]) == ([], [], [])
    assert after["store_state"][0][2] == commits + 1  # every commit is counted (sessions/wal.py): one


def test_rm_with_one_unknown_name_deletes_nothing(home):
    before = dump(home)
    result = invoke("sessions", "rm", "trip", "nosuch", "--yes")
    assert result.exit_code == 2
    assert result.stderr == "Error: no session named 'nosuch' (see `icedit sessions list`)\n"
    assert result.stdout == ""
    assert dump(home) == before


def test_rm_on_a_terminal_asks_and_a_no_keeps_everything(home):
    before = dump(home)
    kept = invoke("sessions", "rm", "trip", "cat", input="n\n", runner=Terminal())
    assert kept.exit_code == 1
    assert kept.stdout == "delete sessions trip (3 turns), cat (2 turns)? [y/N]: n\nnothing deleted\n"
    assert dump(home) == before
    kept = invoke("sessions", "rm", "trip", input="\n", runner=Terminal())  # the default is no
    assert kept.exit_code == 1
    assert dump(home) == before

    deleted = invoke("sessions", "rm", "trip", input="y\n", runner=Terminal())
    assert deleted.exit_code == 0, deleted.output
    assert (
        deleted.stdout
        == f"delete session trip (3 turns)? [y/N]: y\ndeleted session trip (3 turns); {GC_HINT}\n"
    )
    assert [row[1] for row in dump(home)["sessions"]] == ["cat"]


# ------------------------------------------------------------------------------------------- rename


def test_rename_keeps_the_turns_under_the_new_name(home):
    with Store(home / "sessions.sqlite3") as store:
        turns = store.history("trip").turns
    result = invoke("sessions", "rename", "trip", "holiday")
    assert result.exit_code == 0, result.output
    assert result.stdout == "renamed session trip to holiday\n"
    with Store(home / "sessions.sqlite3") as store:
        assert not store.exists("trip")
        assert store.history("holiday").turns == turns
        assert store.history("holiday").cursor == 3


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("trip", "cat", "Error: a session named 'cat' already exists: choose another name"),
        ("trip", "trip", "Error: a session named 'trip' already exists: choose another name"),
        ("trip", " ", "Error: the session name is empty: give a name, e.g. --session trip"),
        (
            "trip",
            "a\x1b[2Jb",
            "Error: the session name contains a control character ('\\x1b'): use plain text",
        ),
        ("nosuch", "new", "Error: no session named 'nosuch' (see `icedit sessions list`)"),
    ],
)
def test_rename_onto_a_taken_or_bad_name_changes_nothing(home, old, new, expected):
    before = dump(home)
    result = invoke("sessions", "rename", old, new)
    assert result.exit_code == 2
    assert result.stderr == expected + "\n"
    assert result.stdout == ""
    assert dump(home) == before


# ---------------------------------------------------------------------------------------------- get


def test_get_writes_the_turns_exact_pixels(home, tmp_path):
    png = stored(home, "trip", 2)
    out = tmp_path / "two.png"
    result = icedit("sessions", "get", "trip", "2", "-o", out.name, home=home, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == "wrote two.png (session trip turn 2, 64x48)\n"
    assert result.stderr == b""
    assert png_digest(out.read_bytes()) == png_digest(png)  # the turn's exact pixels
    assert decode_png(out.read_bytes()).tobytes() == noise(2).tobytes()
    assert "parameters" in decode_png(out.read_bytes()).text  # with how it was made, as edits write it

    piped = icedit("sessions", "get", "trip", "cursor", "-o", "-", home=home, cwd=tmp_path)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.startswith(b"\x89PNG") and png_digest(piped.stdout) == png_digest(
        stored(home, "trip", 3)
    )
    assert piped.stderr.decode() == "wrote a PNG to stdout (session trip turn 3, 64x48)\n"
    assert decode_png(piped.stdout).tobytes() == noise(3).tobytes()


def test_get_onto_an_existing_file_exits_2_and_leaves_it(home, tmp_path):
    out = tmp_path / "mine.png"
    out.write_bytes(b"a picture of mine")
    result = icedit("sessions", "get", "trip", "2", "-o", out.name, home=home, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.decode() == (
        "Error: mine.png already exists: choose another name, or pass --force to replace it\n"
    )
    assert result.stdout == b""
    assert out.read_bytes() == b"a picture of mine"

    forced = invoke("sessions", "get", "trip", "2", "-o", out, "--force")
    assert forced.exit_code == 0, forced.output
    assert png_digest(out.read_bytes()) == png_digest(stored(home, "trip", 2))


def test_get_writes_other_types_by_their_extension(home, tmp_path):
    result = invoke("sessions", "get", "cat", "cursor", "-o", "five.webp")
    assert result.exit_code == 0, result.output
    assert result.stdout == "wrote five.webp (session cat turn 5, 64x48)\n"
    with Image.open(tmp_path / "five.webp") as written:
        assert (written.format, written.size) == ("WEBP", SIZE)
    unknown = invoke("sessions", "get", "cat", "5", "-o", "five.xyz")
    assert unknown.exit_code == 2
    assert unknown.stderr == "Error: five.xyz: give -o a name ending in .png, .jpg or .webp\n"
    assert not (tmp_path / "five.xyz").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["nosuch", "1"], "Error: no session named 'nosuch' (see `icedit sessions list`)"),
        (["cat", "2"], "Error: session 'cat' has no turn 2"),
        (
            ["cat", "last"],
            "Error: Invalid value for 'TURN': 'last': give a turn id (icedit sessions show NAME lists them) "
            "or cursor (see `icedit sessions get --help`)",
        ),
    ],
)
def test_get_of_what_is_not_there_is_one_line(home, tmp_path, args, expected):
    result = invoke("sessions", "get", *args, "-o", "out.png")
    assert result.exit_code == 2
    assert result.stderr == expected + "\n"
    assert result.stdout == ""
    assert not (tmp_path / "out.png").exists()


def test_get_of_a_damaged_image_is_one_line(home, tmp_path):
    path = home / "sessions.sqlite3"
    digest = dump(home)["turns"][1][7]
    with sqlite3.connect(path) as con:  # bit rot: another picture's bytes under this name
        con.execute("UPDATE images SET png = ? WHERE sha256 = ?", (encode_png(noise(99)), digest))
    con.close()
    result = invoke("sessions", "get", "trip", "2", "-o", "out.png")
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: image {digest[:12]} in the session store {path} is damaged (its bytes no longer match "
        "their hash): restore the store from a backup\n"
    )
    assert not (tmp_path / "out.png").exists()


# ------------------------------------------------------------------------------------------- search


def test_search_matches_percent_and_underscore_literally(home, tmp_path):
    percent = icedit("sessions", "search", "50%", home=home, cwd=tmp_path)
    assert percent.returncode == 0, percent.stderr
    assert percent.stdout.decode() == "trip #2  make it brighter  (raise the exposure by 50%)\n"
    underscore = icedit("sessions", "search", "a_b", "--json", home=home, cwd=tmp_path)
    assert underscore.returncode == 0, underscore.stderr
    found = json.loads(underscore.stdout)  # one JSON document, nothing else
    assert [(f["session"], f["turn"]) for f in found] == [("trip", 3)]  # not cat's "aXb"
    assert underscore.stderr == b""


def test_search_ignores_case_goes_newest_first_and_stops_at_n(home):
    result = invoke("sessions", "search", "BRIGHTER")
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        "cat #5  write aXb at 500 px, Brighter  (write aXb at 500 px, Brighter)\n"
        "trip #2  make it brighter  (raise the exposure by 50%)\n"
    )
    first = invoke("sessions", "search", "brighter", "-n", "1", "--json")
    assert first.exit_code == 0, first.output
    with Store(home / "sessions.sqlite3") as store:
        turn = store.history("cat").turn(5)
    assert json.loads(first.stdout) == [
        {
            "session": "cat",
            "turn": 5,
            "parent": 4,
            "kind": "edit",
            "message": "write aXb at 500 px, Brighter",
            "instruction": "write aXb at 500 px, Brighter",
            "seed": 5,
            "created": turn.created,
        }
    ]
    opened = invoke("sessions", "search", "beach")  # an open turn has no instruction
    assert opened.stdout == "cat #4  open beach.png\ntrip #1  open beach.png\n"
    none = invoke("sessions", "search", "snow", "--json")
    assert (none.exit_code, none.stdout) == (0, "[]\n")
    assert invoke("sessions", "search", "snow").stdout == "no turn's message or instruction contains 'snow'\n"


# ----------------------------------------------------------------------------------------------- gc


def test_gc_after_rm_frees_the_images_only_that_session_showed(home, tmp_path):
    assert icedit("sessions", "rm", "trip", "--yes", home=home, cwd=tmp_path).returncode == 0
    before = size_on_disk(home)
    result = icedit("sessions", "gc", home=home, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    store = home / "sessions.sqlite3"
    line = re.fullmatch(
        rf"freed 2 images, (\d+) bytes \(store {re.escape(str(store))}: (\d+) -> (\d+)\)\n",
        result.stdout.decode(),
    )
    assert line, result.stdout
    freed, was, now = map(int, line.groups())
    assert (was, now) == (before, size_on_disk(home))
    assert freed == was - now > 2 * SIZE[0] * SIZE[1] * 3  # two incompressible pictures' worth
    assert result.stderr == b""
    assert check_store(store) == {"cat": {4: dump(home)["turns"][0][7], 5: dump(home)["turns"][1][7]}}
    assert len(dump(home)["images"]) == 2  # trip's open picture stays: cat shows it

    again = invoke("sessions", "gc", "--json")
    assert again.exit_code == 0, again.output
    report = json.loads(again.stdout)
    assert report == {
        "images": 0,
        "bytes_freed": report["before"] - report["after"],
        "before": now,
        "after": now,
        "shrunk": True,
    }


def test_gc_while_another_process_reads_deletes_and_says_the_file_shrinks_later(home, tmp_path):
    assert invoke("sessions", "rm", "trip", "--yes").exit_code == 0
    reader = sqlite3.connect(home / "sessions.sqlite3")
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM images").fetchone()  # holds a snapshot, as a running chat does
        result = invoke("sessions", "gc", "--json")
    finally:
        reader.close()
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["images"], report["shrunk"]) == (2, False)
    assert result.stderr == ""  # --json: the note is the field
    assert len(dump(home)["images"]) == 2 and check_store(home / "sessions.sqlite3")
    again = json.loads(invoke("sessions", "gc", "--json").stdout)  # nobody reading now: it shrinks
    assert again["shrunk"] is True and again["after"] < report["after"]


def test_list_json_is_exactly_one_document(home):
    result = invoke("sessions", "list", "--json")
    assert result.exit_code == 0, result.output
    assert [(r["name"], r["turns"], r["cursor"]) for r in json.loads(result.stdout)] == [
        ("cat", 2, 5),
        ("trip", 3, 3),
    ]
    assert result.stderr == ""
