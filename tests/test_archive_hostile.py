"""Hostile and damaged session archives (issue 16, class 3 and the archive part of class 1).

Every field of session.json is held to what typed input is held to, a damaged zip is one line, and a
session with bit-rotten images exports what it can, which import restores only with --partial. Each
refusal is exit 2, one `Error:` line, no traceback, and the store row for row as it was.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import sqlite3
import tempfile
import warnings
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from store_checks import EXAMPLES, check_store, dump, popen

import sessions.archive
from assistant.cli import cli
from assistant.errors import UserError
from sessions.archive import MAX_TURNS, export_archive, import_archive
from sessions.store import Store

CHELSEA = EXAMPLES / "chelsea.png"


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="icedit")


@pytest.fixture
def archive(fake, icedit_home, tmp_path, monkeypatch) -> Path:
    """Session 's' from fake edits, exported: 1 open -> 2 winter; undo; 1 -> 3 scarf -> 4 night (the cursor)."""
    monkeypatch.chdir(tmp_path)
    for args in [
        ("edit", CHELSEA, "make it look like winter", "--seed", 1, "-o", "winter.png"),
        ("undo", "s"),
        ("edit", CHELSEA, "add a red scarf", "--seed", 2, "-o", "scarf.png"),
        ("edit", "scarf.png", "make it night", "--seed", 3, "-o", "night.png"),
    ]:
        result = invoke(*args, *(["--engine", "fake", "--session", "s"] if args[0] == "edit" else []))
        assert result.exit_code == 0, result.output
    path = tmp_path / "s.zip"
    assert invoke("sessions", "export", "s", path).exit_code == 0
    with Store(icedit_home / "sessions.sqlite3") as store:
        history = store.history("s")
        assert ({t.id: t.parent for t in history.turns}, history.cursor) == ({1: None, 2: 1, 3: 1, 4: 3}, 4)
    return path


def entries(path: Path) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(path) as zf:
        return [(info, zf.read(info)) for info in zf.infolist()]


def rezip(dest: Path, members: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    """A zip of `members` in this order (a name may come twice), each compressed as its ZipInfo says."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name": on purpose
        for info, data in members:
            zf.writestr(info, data)
    return dest


def with_json(archive: Path, change=lambda s: None, text=lambda t: t) -> Path:
    """A copy of `archive` whose session.json went through `change` (the data) and `text` (the JSON)."""

    def edit(info, data):
        if info.filename != "session.json":
            return data
        session = json.loads(data)
        change(session)
        return text(json.dumps(session)).encode()

    return rezip(archive.with_name("bad.zip"), [(info, edit(info, data)) for info, data in entries(archive)])


def patched(archive: Path, member: str, at: dict[str, tuple[int, int]]) -> Path:
    """A copy of `archive` with header fields of `member` overwritten: {"local"|"central": (offset, value)}."""
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        info, central = zf.getinfo(member), zf.start_dir
    while (
        data[central + 46 : central + 46 + int.from_bytes(data[central + 28 : central + 30], "little")]
        != member.encode()
    ):  # walk the central directory to the member's entry
        central += 46 + sum(
            int.from_bytes(data[central + i : central + i + 2], "little") for i in (28, 30, 32)
        )
    for where, (offset, value) in at.items():
        start = (info.header_offset if where == "local" else central) + offset
        data[start : start + 2] = value.to_bytes(2, "little")
    bad = archive.with_name("bad.zip")
    bad.write_bytes(bytes(data))
    return bad


def data_offset(archive: Path, member: str) -> int:
    """Where the (compressed) bytes of `member` start in the file."""
    raw = archive.read_bytes()
    with zipfile.ZipFile(archive) as zf:
        start = zf.getinfo(member).header_offset
    names, extra = (
        int.from_bytes(raw[start + 26 : start + 28], "little"),
        int.from_bytes(raw[start + 28 : start + 30], "little"),
    )
    return start + 30 + names + extra


def flipped(archive: Path, offsets: list[int]) -> Path:
    data = bytearray(archive.read_bytes())
    for offset in offsets:
        data[offset] ^= 0xFF
    bad = archive.with_name("bad.zip")
    bad.write_bytes(bytes(data))
    return bad


def refused(home: Path, *args: object) -> str:
    """`icedit sessions import ARGS`: exit 2, one `Error:` line and nothing else, the store as it was."""
    before = dump(home)
    result = invoke("sessions", "import", *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("Error: "), result.stderr
    assert dump(home) == before
    return result.stderr.rstrip("\n")


def image_of(archive: Path, n: int) -> str:
    """The sha256 of turn n's image."""
    with zipfile.ZipFile(archive) as zf:
        return json.loads(zf.read("session.json"))["turns"][n - 1]["image_sha256"]


# ------------------------------------------------------------------------------------ fields of session.json


def _edit(key: str, value):
    """Turn 2 (an edit) with `key` (a/b for nested keys) set to `value`, or removed for ...."""

    def change(session):
        *parents, last = key.split("/")
        target = session["turns"][1]
        for part in parents:
            target = target[part]
        if value is ...:
            del target[last]
        else:
            target[last] = value

    return change


CONTROL = r"contains a control character ('\x1b')"
FIELDS = {
    "plan null": (_edit("plan", None), "turn 2: Value error, turn 2 is an edit without its plan or seed"),
    "plan without intent": (_edit("plan/intent", ...), "turn 2: plan.intent: Field required"),
    "intent explode": (_edit("plan/intent", "explode"), "turn 2: plan.intent: Input should be 'edit'"),
    "instruction with ESC": (
        _edit("plan/instruction", "add a hat\x1b[2J"),
        f"turn 2: plan.instruction: Value error, the instruction {CONTROL}: type plain text",
    ),
    "rationale with a title sequence": (
        _edit("plan/rationale", "\x1b]0;owned\x07"),
        f"turn 2: plan.rationale: Value error, {CONTROL}: plain text is accepted",
    ),
    "seed a string": (_edit("params/seed", "12"), "turn 2: params.seed: Input should be a valid integer"),
    "seed -1": (_edit("params/seed", -1), "turn 2: params.seed: Input should be greater than or equal to 0"),
    "seed 2**63": (
        _edit("params/seed", 2**63),
        "turn 2: params.seed: Input should be less than 9223372036854775808",
    ),
    "seed 1.5": (_edit("params/seed", 1.5), "turn 2: params.seed: Input should be a valid integer"),
    "seed true": (_edit("params/seed", True), "turn 2: params.seed: Input should be a valid integer"),
    "no seed": (_edit("params/seed", ...), "turn 2: Value error, turn 2 is an edit without its plan or seed"),
    "steps 0": (_edit("params/steps", 0), "turn 2: params.steps: Input should be greater than or equal to 1"),
    "guidance NaN": (
        _edit("params/guidance", math.nan),
        "turn 2: params.guidance: Input should be a finite number",
    ),
    "candidates 17": (
        _edit("params/candidates", 17),
        "turn 2: params.candidates: Input should be less than or equal to 16",
    ),
    "an unknown parameter that is a list": (
        _edit("params/future", [1, 2]),
        (
            "turn 2: params: Value error, parameter 'future': one this version does not know must be a short name with a "
            "number, true/false, null or plain text"
        ),
    ),
    "timings fast": (
        _edit("timings/denoise", "fast"),
        "turn 2: timings.denoise: Input should be a valid number",
    ),
    "a control character in a key": (
        _edit("timings/\x1b[2J", 1.0),
        rf"turn 2: timings.\x1b[2J.[key]: Value error, {CONTROL}: plain text is accepted",
    ),
    "parent true": (_edit("parent", True), "turn 2: parent: Input should be a valid integer"),
    "created yesterday": (
        _edit("created", "yesterday"),
        "turn 2: created: Value error, 'yesterday' is not an ISO 8601 time",
    ),
    "message of 5 MB": (
        _edit("message", "a" * 5_000_000),
        "turn 2: Value error, turn 2's message is 5000000 characters long; at most 2000 are accepted",
    ),
    "message that sets the window title": (
        _edit("message", "hi\x1b]0;owned\x07"),
        f"turn 2: Value error, turn 2's message {CONTROL}: type plain text",
    ),
    "open turn with a plan": (
        lambda s: s["turns"][0].update(plan=s["turns"][1]["plan"]),
        "turn 1: Value error, turn 1 opens an image: it has no plan",
    ),
    "log text that clears the screen": (
        lambda s: s["log"][0].update(text="\x1b[2J"),
        f"log line 1: text: Value error, {CONTROL}: plain text is accepted",
    ),
    "log text of 5 MB": (
        lambda s: s["log"][0].update(text="a" * 5_000_000),
        "log line 1: text: String should have at most 20000 characters",
    ),
    "log role system": (
        lambda s: s["log"][0].update(role="system"),
        "log line 1: role: Input should be 'user' or 'assistant'",
    ),
    "cursor a string": (lambda s: s.update(cursor="4"), "cursor: Input should be a valid integer"),
    "updated not a time": (lambda s: s.update(updated=12), "updated: Input should be a valid string"),
}


@pytest.mark.parametrize("case", list(FIELDS), ids=list(FIELDS))
def test_a_bad_field_is_one_line_naming_it_and_changes_nothing(archive, icedit_home, case):
    change, expected = FIELDS[case]
    bad = with_json(archive, change)
    assert refused(icedit_home, bad, "--as", "copy") == f"Error: {bad}: session.json: {expected}"


def test_guidance_past_the_largest_float_is_refused(archive, icedit_home):
    bad = with_json(archive, text=lambda t: t.replace('"guidance": 50.0', '"guidance": 1e309', 1))
    assert refused(icedit_home, bad, "--as", "copy") == (
        f"Error: {bad}: session.json: turn 2: params.guidance: Input should be a finite number"
    )


@pytest.mark.parametrize(
    "name, expected",
    [
        ("\x1b]0;title\x07", r"the session name contains a control character ('\x1b'): use plain text"),
        ("", "the session name is empty: give a name, e.g. --session trip"),
        ("   ", "the session name is empty: give a name, e.g. --session trip"),
        ("x" * 201, "the session name is 201 characters long; at most 200 are accepted"),
    ],
    ids=["title sequence", "empty", "spaces", "201 characters"],
)
def test_a_bad_name_in_the_archive_is_refused_and_another_can_be_given(archive, icedit_home, name, expected):
    bad = with_json(archive, lambda s: s.update(name=name))
    assert refused(icedit_home, bad) == (
        f"Error: {expected} (the name in the archive: import it under another with --as NAME)"
    )
    result = invoke("sessions", "import", bad, "--as", "copy")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("imported session copy (4 turns, cursor at #8)")


def test_a_bad_name_given_with_as_is_refused(archive, icedit_home):
    assert refused(icedit_home, archive, "--as", "red\x1b[31m") == (
        r"Error: the session name contains a control character ('\x1b'): use plain text"
    )


def test_more_turns_than_the_cap_are_refused(archive, icedit_home):
    bad = with_json(archive, lambda s: s.update(turns=s["turns"][:1] * (MAX_TURNS + 1)))
    assert refused(icedit_home, bad, "--as", "copy") == (
        f"Error: {bad}: session.json: turns: Value error, {MAX_TURNS + 1} of them; at most {MAX_TURNS} are accepted"
    )


def test_a_tree_deeper_than_the_cap_is_refused(archive, icedit_home, monkeypatch):
    monkeypatch.setattr(sessions.archive, "MAX_DEPTH", 2)  # turn 4 is the third turn down
    assert refused(icedit_home, archive, "--as", "copy") == (
        f"Error: {archive}: session.json: Value error, turn 4 is 3 turns deep; at most 2 are accepted"
    )


def test_a_parameter_from_another_version_travels_with_the_session(archive, icedit_home, tmp_path):
    newer = with_json(archive, _edit("params/sharpness", 0.5))
    assert invoke("sessions", "import", newer, "--as", "copy").exit_code == 0
    with Store(icedit_home / "sessions.sqlite3") as store:
        assert store.history("copy").turns[1].params["sharpness"] == 0.5
        assert export_archive(store, "copy", tmp_path / "copy.zip").damaged == []
    assert (
        json.loads(zipfile.ZipFile(tmp_path / "copy.zip").read("session.json"))["turns"][1]["params"][
            "sharpness"
        ]
        == 0.5
    )


def test_export_holds_the_store_to_the_same_rules_and_writes_nothing_import_would_refuse(
    archive, icedit_home, tmp_path
):
    with sqlite3.connect(icedit_home / "sessions.sqlite3") as con:  # as an older version might have
        con.execute("UPDATE turns SET params_json = ? WHERE id = 2", (json.dumps({"seed": "12"}),))
    con.close()
    result = invoke("sessions", "export", "s", tmp_path / "again.zip")
    assert (result.exit_code, result.stderr) == (
        2,
        "Error: session 's' cannot be archived: turn 2: params.seed: Input should be a valid integer\n",
    )
    assert not (tmp_path / "again.zip").exists()


# ------------------------------------------------------------------------------------ a damaged zip


def test_a_bad_crc_in_an_image_names_the_turn(archive, icedit_home):
    member = f"images/{image_of(archive, 3)}.png"
    bad = flipped(archive, [data_offset(archive, member) + 1000])  # stored: the CRC no longer matches
    assert refused(icedit_home, bad, "--as", "copy") == (
        f"Error: {bad}: {member} is damaged (Bad CRC-32 for file '{member}'): nothing was imported (turn 3 cannot "
        "be restored; --partial imports the rest)"
    )


def test_a_bad_crc_in_session_json_is_one_line(archive, icedit_home):
    stored = rezip(
        archive.with_name("stored.zip"),
        [(zipfile.ZipInfo(info.filename), data) for info, data in entries(archive)],
    )  # nothing compressed
    bad = flipped(stored, [data_offset(stored, "session.json") + 3])
    assert refused(icedit_home, bad, "--as", "copy") == (
        f"Error: {bad}: session.json is damaged (Bad CRC-32 for file 'session.json')"
    )


def test_bad_deflate_data_is_one_line(archive, icedit_home):
    start = data_offset(archive, "session.json")
    bad = flipped(archive, range(start, start + 8))
    assert refused(icedit_home, bad, "--as", "copy").startswith(f"Error: {bad}: session.json is damaged (")


def test_an_unknown_compression_method_is_one_line(archive, icedit_home):
    bad = patched(archive, "session.json", {"local": (8, 99), "central": (10, 99)})
    assert refused(icedit_home, bad, "--as", "copy") == (
        f"Error: {bad}: session.json cannot be read: That compression method is not supported (compression method "
        "99): the archive is damaged or not from icedit"
    )


def test_an_encrypted_member_is_one_line(archive, icedit_home):
    bad = patched(archive, "session.json", {"local": (6, 1), "central": (8, 1)})
    assert (
        refused(icedit_home, bad, "--as", "copy")
        == f"Error: {bad}: session.json is encrypted: session archives are not"
    )


def test_a_truncated_zip_is_one_line(archive, icedit_home):
    bad = archive.with_name("bad.zip")
    bad.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    assert refused(icedit_home, bad, "--as", "copy") == (
        f"Error: {bad}: not a session archive (a .zip from `icedit sessions export NAME FILE.zip`): File is not a zip "
        "file"
    )


@pytest.mark.parametrize("which", ["session.json", "an image"])
def test_a_member_twice_is_refused(archive, icedit_home, which):
    members = entries(archive)
    twice = members[0] if which == "session.json" else members[-1]
    bad = rezip(archive.with_name("bad.zip"), [*members, twice])
    assert refused(icedit_home, bad, "--as", "copy") == (
        f"Error: {bad}: {twice[0].filename} is in the archive twice: the archive is damaged"
    )


def test_a_name_with_a_newline_after_it_is_not_an_image(archive, icedit_home):
    info, png = entries(archive)[-1]
    bad = rezip(archive.with_name("bad.zip"), [*entries(archive)[:-1], (info.filename + "\n", png)])
    assert refused(icedit_home, bad, "--as", "copy") == (
        f"Error: {bad}: unexpected file {info.filename + chr(10)!r} in the archive (a session archive holds "
        "session.json and images/<sha256>.png)"
    )


@pytest.mark.parametrize("case", ["a name that sets the window title", "compression method 99"])
def test_the_console_script_refuses_in_one_line(archive, icedit_home, tmp_path, case):
    if case == "compression method 99":
        bad = patched(archive, "session.json", {"local": (8, 99), "central": (10, 99)})
    else:
        bad = with_json(archive, lambda s: s.update(name="\x1b]0;title\x07"))
    before = dump(icedit_home)
    run = popen("sessions", "import", bad, home=icedit_home, cwd=tmp_path)
    out, err = run.communicate(timeout=120)
    assert (run.returncode, out) == (2, "")
    assert len(err.splitlines()) == 1 and err.startswith("Error: ") and "\x1b" not in err, err
    assert dump(icedit_home) == before


# ------------------------------------------------------------------------------------ bit rot in the store


def rot(home: Path, sha: str) -> None:
    """Damage one image blob in place, as a failing disk would (SQLite's own checks still pass)."""
    with sqlite3.connect(home / "sessions.sqlite3") as con:
        (png,) = con.execute("SELECT png FROM images WHERE sha256 = ?", (sha,)).fetchone()
        con.execute(
            "UPDATE images SET png = ? WHERE sha256 = ?", (png[:100] + bytes([png[100] ^ 1]) + png[101:], sha)
        )
    con.close()


def test_bit_rot_export_saves_the_rest_and_import_restores_it_only_when_asked(
    archive, icedit_home, tmp_path, monkeypatch
):
    scarf = image_of(archive, 3)
    rot(icedit_home, scarf)
    rotten = tmp_path / "rotten.zip"
    result = invoke("sessions", "export", "s", rotten)
    assert (result.exit_code, result.stdout) == (1, f"wrote {rotten} (session s: 4 turns, 3 images)\n")
    assert result.stderr == (
        "warning: turn 3: its image is damaged in the store and not in the archive (icedit "
        "sessions import --partial restores the rest)\n"
    )
    assert f"images/{scarf}.png" not in zipfile.ZipFile(rotten).namelist()
    assert len(json.loads(zipfile.ZipFile(rotten).read("session.json"))["turns"]) == 4

    monkeypatch.setenv("ICEDIT_HOME", str(tmp_path / "other"))
    invoke("sessions", "list")  # the store exists, empty
    assert refused(tmp_path / "other", rotten) == (
        f"Error: {rotten}: image {scarf[:12]} of the session is not in the archive: nothing was imported (turn 3 "
        "cannot be restored; --partial imports the rest)"
    )
    result = invoke("sessions", "import", rotten, "--partial", "--json")
    assert (result.exit_code, result.stderr) == (
        0,
        (
            "warning: turns 3, 4 of the archive not restored: the image of turn 3 is missing or damaged, and an edit "
            "needs the picture it was made from\n"
        ),
    )
    assert json.loads(result.stdout) == {
        "session": "s",
        "turns": 2,
        "cursor": 1,
        "archive": str(rotten),
        "dropped": [3, 4],
    }
    check_store(tmp_path / "other" / "sessions.sqlite3")
    with (
        Store(tmp_path / "other" / "sessions.sqlite3") as store,
        Store(icedit_home / "sessions.sqlite3") as old,
    ):
        restored, original = store.history("s"), old.history("s")
        assert [t.model_dump() for t in restored.turns] == [t.model_dump() for t in original.turns[:2]]
        assert restored.cursor == 1  # turn 4's nearest restored ancestor
        lines, before = store.transcript("s"), old.transcript("s")
        assert [(e.role, e.text) for e in lines] == [(e.role, e.text) for e in before]  # every line kept
        assert [e.turn_id for e in lines] == [t if t in (1, 2) else None for t in (e.turn_id for e in before)]
    again = tmp_path / "again.zip"
    assert invoke("sessions", "export", "s", again).exit_code == 0  # what --partial restored is whole


def test_a_damaged_first_turn_leaves_nothing_to_restore(archive, icedit_home, tmp_path):
    opened = image_of(archive, 1)
    rot(icedit_home, opened)
    rotten = tmp_path / "rotten.zip"
    result = invoke("sessions", "export", "s", rotten)
    assert (result.exit_code, result.stderr.split(":")[0]) == (1, "warning")
    assert refused(icedit_home, rotten, "--partial", "--as", "copy") == (
        f"Error: {rotten}: image {opened[:12]} of the session is not in the archive: nothing can be restored (turn 1 "
        "cannot, and every other turn is an edit of one of them)"
    )


# ------------------------------------------------------------------------------------ any mutation


HOSTILE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["", "\x1b[2J", "a" * 3000]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
PLAUSIBLE = (
    st.integers(0, 300)
    | st.floats(0.1, 300)
    | st.booleans()
    | st.none()
    | st.text("abc xyz", min_size=1, max_size=8)
    | st.sampled_from(["edit", "open", "user", "assistant", "2024-01-01T00:00:00+00:00"])
)
"""Values of the kinds the fields hold, so that some mutated archives are still valid sessions."""
PATH = st.lists(st.integers(0, 40), min_size=1, max_size=5)
MUTATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("field"), PATH, HOSTILE | st.just(...)),
        st.tuples(st.just("leaf"), PATH, PLAUSIBLE),
        st.tuples(st.just("drop"), st.integers(0, 20), st.none()),
        st.tuples(st.just("twice"), st.integers(0, 20), st.none()),
        st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
    ),
    min_size=1,
    max_size=3,
)


def mutate_json(session: dict, path: list[int], value, to_a_leaf: bool) -> None:
    """Set (or, for ..., remove) the value found by walking `path` (indices into sorted keys or items), on to
    a leaf (the path repeated) when `to_a_leaf`."""
    parent, key, node = None, None, session
    for i in itertools.cycle(path) if to_a_leaf else path:
        if not isinstance(node, dict | list) or not node:
            break
        parent, key = node, sorted(node)[i % len(node)] if isinstance(node, dict) else i % len(node)
        node = parent[key]
    if value is ...:
        del parent[key]
    else:
        parent[key] = value


def mutated(original: Path, dest: Path, mutations: list[tuple]) -> Path:
    """`original` with session.json's fields changed and members dropped or doubled, then bytes flipped."""
    members = entries(original)
    for kind, where, value in mutations:
        i = next((i for i, (info, _) in enumerate(members) if info.filename == "session.json"), None)
        if kind in ("field", "leaf") and i is not None:
            session = json.loads(members[i][1])
            mutate_json(session, where, value, kind == "leaf")
            members[i] = (members[i][0], json.dumps(session).encode())
        elif kind == "drop" and members:
            members.pop(where % len(members))
        elif kind == "twice" and members:
            members.append(members[where % len(members)])
    data = bytearray(rezip(dest, members).read_bytes())
    for kind, where, value in mutations:
        if kind == "flip":
            data[int(where * len(data))] ^= value
    dest.write_bytes(bytes(data))
    return dest


@pytest.fixture
def base(archive, tmp_path) -> Path:
    """A store holding session 'other' (the archive under another name), so its own name 's' is free."""
    with Store(tmp_path / "base" / "sessions.sqlite3") as store:
        import_archive(store, archive, "other")
    return tmp_path / "base" / "sessions.sqlite3"


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(mutations=MUTATIONS, name=st.sampled_from([None, "copy"]))
def test_any_mutation_ends_in_a_valid_session_or_one_of_our_errors(archive, base, mutations, name):
    with tempfile.TemporaryDirectory() as d:
        home = Path(d)
        shutil.copy(base, home / "sessions.sqlite3")
        path = mutated(archive, home / "m.zip", mutations)
        with Store(home / "sessions.sqlite3") as store:
            before = dump(home)
            try:
                history = import_archive(store, path, name).history
            except UserError as e:
                assert "\n" not in str(e)
                assert dump(home) == before
                return
            assert check_store(home / "sessions.sqlite3")[history.name]
            again = export_archive(store, history.name, home / "again.zip")
            assert again.damaged == []
            assert import_archive(store, home / "again.zip", "again").history.cursor is not None


def test_importing_a_sound_archive_heals_a_rotten_copy_of_its_image(archive, icedit_home):
    """Images are shared by hash: a second session importing the same picture replaces the store's bad bytes."""
    scarf = image_of(archive, 3)
    rot(icedit_home, scarf)
    result = invoke("sessions", "import", archive, "--as", "copy")
    assert result.exit_code == 0, result.output
    check_store(icedit_home / "sessions.sqlite3")  # every image hashes to its name again
    healed = invoke("sessions", "export", "s", icedit_home.parent / "healed.zip")
    assert (healed.exit_code, healed.stderr) == (0, "")


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (lambda p: os.mkfifo(p), "a device, pipe or socket, not a file"),
        (lambda p: p.symlink_to("/dev/zero"), "a device, pipe or socket, not a file"),
        (lambda p: p.symlink_to(p), "a loop of symbolic links"),
    ],
    ids=["a FIFO (would block)", "a link to /dev/zero", "a link to itself"],
)
def test_an_archive_that_is_not_a_regular_file_is_refused_unopened(icedit_home, tmp_path, make, said):
    invoke("sessions", "list")  # the store exists, empty
    path = tmp_path / "in.zip"
    make(path)
    assert refused(icedit_home, path) == f"Error: {path}: {said}"
