"""Data safety: what a person keeps is never half-written, never overwritten unasked, and never destroyed
by a `-wal` that is not the store's or by an SQLite file that is not a store at all.

Each refusal is one `Error:` line with exit code 2 and no traceback; the store and any file in the way
are byte-for-byte as before. Disk faults are injected where the bytes would reach the disk (`os.fsync`,
or a file that fills up part way through a write); crashes are a real SIGKILL of a child process.
The stale-WAL scenarios share one store built once per module: a few turns, a backup, then a child
that commits 150 turns of noise (enough for SQLite's automatic checkpoints to restart the WAL twice)
and is killed with the WAL still there.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from PIL import Image
from store_checks import EXAMPLES, check_store, dump, env_for, popen

import sessions.wal
from assistant.cli import cli
from assistant.errors import UserError
from sessions.identity import encode_png, png_digest, sha256
from sessions.store import MIGRATIONS, NewTurn, Store

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_V1 = Path(__file__).resolve().parent / "fixtures" / "store-v1.sqlite3"
STORE = "sessions.sqlite3"
FAKE = ["--engine", "fake"]
NO_SPACE = "No space left on device"


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="icedit")


def refused(result, message: str, exit_code: int = 2) -> None:
    """Exactly one `Error:` line on stderr, the exit code, and no exception escaping the command."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert (result.exit_code, result.stderr) == (exit_code, f"Error: {message}\n")


def ok(result) -> None:
    assert result.exit_code == 0, result.output
    assert result.exception is None


def unchanged(path: Path, before: bytes) -> None:
    after = path.read_bytes()
    offsets = [
        i for i, (a, b) in enumerate(zip(before, after, strict=False)) if a != b
    ]  # lengths may differ[:10]
    assert after == before, (
        f"{path.name} was changed: {len(before)} -> {len(after)} bytes, differing at {offsets}"
    )


def files(folder: Path) -> dict[str, bytes | str]:
    """Every name in `folder` with its bytes (a link: where it points), so a test can compare folders whole."""
    out: dict[str, bytes | str] = {}
    for p in sorted(folder.iterdir()):
        if p.is_symlink():
            out[p.name] = f"-> {os.readlink(p)}"
        elif p.is_file():
            out[p.name] = p.read_bytes()
    return out


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


# ---------------------------------------------------------------------------------- a session to write out


@pytest.fixture
def work(fake, icedit_home, tmp_path, monkeypatch) -> Path:
    """Folder `work` (the working directory) with photo.png and session 's' (open + one edit, winter.png)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    Image.open(EXAMPLES / "chelsea.png").convert("RGB").resize((96, 64)).save(work / "photo.png")
    ok(
        invoke(
            "edit",
            "photo.png",
            "make it look like winter",
            *FAKE,
            "--session",
            "s",
            "--seed",
            "1",
            "-o",
            "winter.png",
        )
    )
    fake.engine.calls.clear()
    return work


def _add_turn(fake) -> None:
    """Change session 's', so that a new export of it would differ from the one already on disk."""
    ok(
        invoke(
            "edit", "winter.png", "add a red scarf", *FAKE, "--session", "s", "--seed", "2", "-o", "scarf.png"
        )
    )
    fake.engine.calls.clear()


# the commands that write a file a person keeps: args, the name that fails, how to make the old copy (None: winter.png)
WRITERS = {
    "edit -o": (
        ["edit", "photo.png", "add snow", *FAKE, "--seed", "5", "-o", "winter.png", "--force"],
        "winter.png",
        None,
    ),
    "export zip": (
        ["sessions", "export", "s", "backup.zip", "--force"],
        "backup.zip",
        ["sessions", "export", "s", "backup.zip"],
    ),
    "export toml: its image": (
        ["sessions", "export", "s", "trip.toml", "--force"],
        "trip-1.png",
        ["sessions", "export", "s", "trip.toml"],
    ),
    "export toml: the script": (
        ["sessions", "export", "s", "trip.toml", "--force"],
        "trip.toml",
        ["sessions", "export", "s", "trip.toml"],
    ),
    "sheet": (
        ["sessions", "sheet", "s", "sheet.png", "--force"],
        "sheet.png",
        ["sessions", "sheet", "s", "sheet.png"],
    ),
}


class _FillingFile:
    """A file on a disk with `room` bytes left: the write that crosses it lands in part, then ENOSPC."""

    def __init__(self, f, room: int):
        self._f, self._room = f, room

    def write(self, data) -> int:
        size = len(memoryview(data).cast("B"))
        if size > self._room:
            self._f.write(memoryview(data).cast("B")[: self._room])
            self._room = 0
            raise OSError(errno.ENOSPC, NO_SPACE)
        self._room -= size
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def disk_fault(monkeypatch, kind: str, name: str) -> None:
    """Writing the file called `name` fails with ENOSPC: at its fsync, or 100 bytes into its data."""
    if kind == "fsync":
        real_fsync = os.fsync

        def fsync(fd):
            if f".{name}." in Path(_fd_path(fd)).name:
                raise OSError(errno.ENOSPC, NO_SPACE)
            return real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
    else:
        real_fdopen = os.fdopen

        def fdopen(fd, *args, **kwargs):
            f = real_fdopen(fd, *args, **kwargs)
            return _FillingFile(f, 100) if f".{name}." in Path(_fd_path(fd)).name else f

        monkeypatch.setattr(os, "fdopen", fdopen)


@pytest.mark.parametrize("kind", ["fsync", "disk fills midway"])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_failed_write_over_a_file_leaves_the_old_file_and_no_temporary(
    work, fake, icedit_home, monkeypatch, writer, kind
):
    args, name, first = WRITERS[writer]
    if first is not None:
        ok(invoke(*first))
    _add_turn(fake)  # a write that went through (even non-atomically) would now change the file
    before, store = files(work), dump(icedit_home)
    assert name in before
    disk_fault(monkeypatch, kind, name)
    result = invoke(*args)
    assert files(work) == before  # the old file byte for byte, nothing new, no .part
    if writer == "edit -o":  # the picture could not be written; the edit itself is kept in the day's log
        kept = r" \(the edit is kept as turn \d+ of session edits-\d{4}-\d\d-\d\d\)"
        assert result.exit_code == 2
        assert re.fullmatch(f"Error: cannot write {name}: {NO_SPACE}{kept}\n", result.stderr), result.stderr
        return
    refused(result, f"cannot write {name}: {NO_SPACE}")
    assert dump(icedit_home) == store


def test_an_archive_failing_after_its_first_member_leaves_the_old_archive(
    work, fake, icedit_home, monkeypatch
):
    ok(invoke("sessions", "export", "s", "backup.zip"))
    _add_turn(fake)
    before, store = files(work), dump(icedit_home)
    real = zipfile.ZipFile.writestr
    written = []

    def writestr(self, info, data, *args, **kwargs):
        if written:
            raise OSError(errno.ENOSPC, NO_SPACE)
        written.append(info.filename)
        return real(self, info, data, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "writestr", writestr)
    result = invoke("sessions", "export", "s", "backup.zip", "--force")
    refused(result, f"cannot write backup.zip: {NO_SPACE}")
    assert written == ["session.json"]
    assert files(work) == before
    assert dump(icedit_home) == store
    with zipfile.ZipFile(work / "backup.zip") as zf:  # still the whole old archive
        assert zf.testzip() is None and len(zf.namelist()) == 3  # session.json and two images


def test_an_edit_kept_in_a_session_says_where_when_its_output_cannot_be_written(
    work, fake, icedit_home, monkeypatch
):
    before = files(work)
    disk_fault(monkeypatch, "disk fills midway", "winter.png")
    result = invoke(
        "edit", "photo.png", "add snow", *FAKE, "--session", "s", "--seed", "5", "-o", "winter.png", "--force"
    )
    refused(result, f"cannot write winter.png: {NO_SPACE} (the edit is kept as turn 3 of session s)")
    assert files(work) == before
    assert [row[4] for row in dump(icedit_home)["turns"]] == [
        "open photo.png",
        "make it look like winter",
        "add snow",
    ]  # photo.png is turn 1 again, not a new turn


KILLED_WRITER = """
import sys, time
from pathlib import Path
from assistant.files import write_file

def writer(f):
    for i in range(64):  # 4 MB, slowly
        f.write(bytes([i]) * 65536)
        f.flush()
        print("wrote", i, flush=True)
        time.sleep(0.02)

write_file(Path(sys.argv[1]), writer, force=sys.argv[2] == "force")
print("done", flush=True)
"""


@pytest.mark.parametrize("old", [b"the person's own file\n" * 1000, None], ids=["over a file", "a new file"])
def test_kill_9_mid_write_leaves_the_old_file_or_none(tmp_path, old):
    folder = tmp_path / "out"
    folder.mkdir()
    path = folder / "keep.bin"
    if old is not None:
        path.write_bytes(old)
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(path), "force" if old else "new"],
        cwd=ROOT,
        env=env_for(tmp_path, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        for line in child.stdout:
            if line == "wrote 16\n":  # a megabyte is in the temporary file
                break
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    left = sorted(p.name for p in folder.iterdir())
    parts = [n for n in left if re.fullmatch(r"\.keep\.bin\.\w+\.part", n)]
    assert len(parts) == 1 and (folder / parts[0]).stat().st_size >= 16 * 65536  # it was killed mid-write
    if old is None:
        assert left == parts
    else:
        assert left == sorted(["keep.bin", *parts])
        assert path.read_bytes() == old


# ---------------------------------------------------------------------------------- never over a file unasked


def _elsewhere(tmp_path: Path) -> Path:
    target = tmp_path / "elsewhere" / "keep.png"
    target.parent.mkdir(exist_ok=True)
    Image.new("RGB", (40, 40), "navy").save(target)
    return target


@pytest.mark.parametrize(
    "case",
    [
        "the source",
        "the source, as ./path",
        "the source, absolute",
        "a hard link to it",
        "a symlink to it",
        "another file",
        "a symlink elsewhere",
        "a dangling symlink",
    ],
)
@pytest.mark.parametrize("session", [None, "s"], ids=["no session", "in a session"])
def test_edit_never_writes_over_a_file_without_force(work, fake, icedit_home, tmp_path, case, session):
    out = {
        "the source": "photo.png",
        "the source, as ./path": "./photo.png",
        "the source, absolute": str(work / "photo.png"),
    }.get(case, "out.png")
    if case == "a hard link to it":
        os.link(work / "photo.png", work / "out.png")
    elif case == "a symlink to it":
        (work / "out.png").symlink_to(work / "photo.png")
    elif case == "another file":
        shutil.copy(work / "winter.png", work / "out.png")
    elif case == "a symlink elsewhere":
        (work / "out.png").symlink_to(_elsewhere(tmp_path))
    elif case == "a dangling symlink":
        (work / "out.png").symlink_to(tmp_path / "nowhere.png")
    source = case.startswith("the source") or case.endswith("to it")
    elsewhere = tmp_path / "elsewhere"
    before, store, outside = files(work), dump(icedit_home), files(elsewhere) if elsewhere.exists() else None
    session_args = ["--session", session] if session else []
    result = invoke("edit", "photo.png", "add snow", *FAKE, *session_args, "--seed", "3", "-o", out)
    if source:
        refused(
            result,
            f"{Path(out)} is the picture being edited: give -o another name, or pass --force to replace it",
        )
    else:
        refused(result, f"{out} already exists: choose another name, or pass --force to replace it")
    assert fake.engine.calls == []  # refused before any edit ran
    assert files(work) == before
    assert dump(icedit_home) == store

    result = invoke(
        "edit", "photo.png", "add snow", *FAKE, *session_args, "--seed", "3", "-o", out, "--force"
    )
    ok(result)
    assert len(fake.engine.calls) == 1
    written = Path(out)
    assert (
        not written.is_symlink() and written.is_file()
    )  # a link is replaced by the edit, not written through
    digest = re.search(r"sha256 ([0-9a-f]{12})\)", result.stdout).group(1)
    assert sha256(written.read_bytes())[:12] == digest
    if outside is not None:
        assert files(elsewhere) == outside
    if case == "a dangling symlink":
        assert not (tmp_path / "nowhere.png").exists()
    if source and not case.startswith("the source"):  # -o named a link to the source: the source stays
        assert (work / "photo.png").read_bytes() == before["photo.png"]
    changed = {n for n in files(work) if files(work)[n] != before.get(n)}
    assert changed == {Path(out).name}


def _archive(path: Path) -> None:
    path.write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip: the person's own archive


@pytest.mark.parametrize(
    ("args", "name", "plant"),
    [
        (["sessions", "export", "s", "trip.toml"], "trip.toml", lambda p: p.write_text("# my own notes\n")),
        (
            ["sessions", "export", "s", "trip.toml"],
            "trip-1.png",
            lambda p: Image.new("RGB", (40, 40)).save(p),
        ),
        (["sessions", "export", "s", "b.zip"], "b.zip", _archive),
        (
            ["sessions", "sheet", "s", "out.png"],
            "out.png",
            lambda p: Image.new("RGB", (40, 40), "red").save(p),
        ),
        (["sessions", "sheet", "s", "out.png"], "out.png", lambda p: p.symlink_to(p.parent / "photo.png")),
        (["sessions", "export", "s", "b.zip"], "b.zip", lambda p: p.symlink_to(p.parent / "nowhere.zip")),
    ],
    ids=[
        "toml over a script",
        "toml beside the person's trip-1.png",
        "zip over a zip",
        "sheet over a png",
        "sheet over a symlink to a photo",
        "zip over a dangling symlink",
    ],
)
def test_exports_never_write_over_a_file_without_force(work, icedit_home, args, name, plant):
    plant(work / name)
    before, store = files(work), dump(icedit_home)
    refused(invoke(*args), f"{name} already exists: choose another name, or pass --force to replace it")
    assert files(work) == before  # nothing written: not even the script beside a taken image name
    assert dump(icedit_home) == store

    ok(invoke(*args, "--force"))
    assert not (work / name).is_symlink()
    assert files(work)["photo.png"] == before["photo.png"]  # a link's target is never written through
    assert not (work / "nowhere.zip").exists()
    assert files(work)[name] != before[name]
    assert dump(icedit_home) == store
    assert temporaries(work) == []


def test_a_taken_default_name_gets_a_fresh_one(work, fake, tmp_path):
    name = f"photo-7-{sha256(b'add snow')[:6]}"  # seed and a short hash of the instruction
    (work / f"{name}.png").write_bytes(b"someone's photo")
    (work / f"{name}-2.png").symlink_to(tmp_path / "nowhere.png")  # a dangling link holds its name too
    before = files(work)
    result = invoke("edit", "photo.png", "add snow", *FAKE, "--seed", "7")
    ok(result)
    assert (
        f"wrote {name}-3.png  (seed 7, 96x64, sha256 {sha256((work / f'{name}-3.png').read_bytes())[:12]})"
        in result.stdout
    )
    after = files(work)
    assert set(after) - set(before) == {f"{name}-3.png"}
    assert {n: after[n] for n in before} == before


@pytest.fixture(params=[0o022, 0o002, 0o027])
def umask(request):
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def test_new_files_get_the_umask_permissions(work, fake, umask):
    ok(invoke("edit", "photo.png", "add snow", *FAKE, "--seed", "3", "-o", "new.png"))
    ok(invoke("edit", "photo.png", "add snow", *FAKE, "--seed", "4"))
    ok(invoke("sessions", "export", "s", "new.zip"))
    ok(invoke("sessions", "export", "s", "new.toml"))
    ok(invoke("sessions", "sheet", "s", "new-sheet.png"))
    default = f"photo-4-{sha256(b'add snow')[:6]}.png"
    modes = {
        n: (work / n).stat().st_mode & 0o777
        for n in ("new.png", default, "new.zip", "new.toml", "new-1.png", "new-sheet.png")
    }
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)


# ---------------------------------------------------------------------------------- a -wal that is not the store's

CHILD = """
import json, random, shutil, sys, time
from pathlib import Path
from PIL import Image
from sessions.identity import encode_png, png_digest, sha256
from sessions import wal
from sessions.store import NewTurn, Store

path, turns, copy_at, copy_to = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
store = Store(path)
parent = store.history("trip").cursor
for i in range(1, turns + 1):
    noise = Image.frombytes("RGB", (128, 128), random.Random(i).randbytes(128 * 128 * 3))
    png = encode_png(noise)
    turn = store.add_turns("trip", parent, [NewTurn(kind="open", message=f"noise {i}", png=png,
                                                    image_sha256=png_digest(png), size=noise.size)])[0]
    parent = turn.id
    if i == copy_at:  # a backup script's plain copy, between two commits
        shutil.copy(path, copy_to)
    commits, base = store.db.execute("SELECT commits, wal_base FROM store_state").fetchone()
    print(json.dumps({"turn": turn.id, "sha256": turn.image_sha256, "wal": wal.header(Path(f"{path}-wal")),
                      "commits": commits, "base": base}), flush=True)
print("done", flush=True)
time.sleep(600)
"""
NOISE_TURNS = 150
COPY_AT = 80
SETUP_TURNS = 3


def _open_turns(store: Store, name: str, n: int, colour: tuple[int, int, int]) -> None:
    parent = None
    for i in range(n):
        png = encode_png(Image.new("RGB", (64, 64), (colour[0], colour[1], i * 40)))
        parent = store.add_turns(
            name,
            parent,
            [
                NewTurn(
                    kind="open", message=f"{name} {i}", png=png, image_sha256=png_digest(png), size=(64, 64)
                )
            ],
        )[0].id


@pytest.fixture(scope="module")
def crashed(tmp_path_factory) -> SimpleNamespace:
    """A store ('trip': 3 turns, then 150 of noise) whose writer was SIGKILLed: main file, -wal and -shm.

    Also: `backup`, a backup of it (SQLite's backup API) after the first 3 turns; `midcopy`, a plain copy
    of its main file taken after noise turn 80; `other`, a different store; `reports`, what the child
    said after each commit.
    """
    root = tmp_path_factory.mktemp("wal")
    home, backup, other = root / "home", root / "backup", root / "other"
    for d in (home, backup, other):
        d.mkdir()
    with Store(home / STORE) as store:
        _open_turns(store, "trip", SETUP_TURNS, (200, 0))
    src, dst = sqlite3.connect(home / STORE), sqlite3.connect(backup / STORE)
    try:
        src.backup(dst)
        commits_at_backup = dst.execute("SELECT commits FROM store_state").fetchone()[0]
    finally:
        src.close()
        dst.close()  # no connection of ours stays open: closing the last one would checkpoint the WAL away
    with Store(other / STORE) as store:
        _open_turns(store, "other", 2, (0, 200))
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            str(home / STORE),
            str(NOISE_TURNS),
            str(COPY_AT),
            str(root / "midcopy.sqlite3"),
        ],
        cwd=ROOT,
        env=env_for(home, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        text=True,
    )
    reports = []
    try:
        for line in child.stdout:
            if line == "done\n":
                break
            reports.append(json.loads(line))
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
        child.stdout.close()
    assert len(reports) == NOISE_TURNS, "the child died before committing every turn"
    assert sorted(p.name for p in home.iterdir()) == [STORE, f"{STORE}-shm", f"{STORE}-wal"]
    final, at_copy = reports[-1], reports[COPY_AT - 1]
    # the scenario is real: the WAL left behind was started after the backup and after the plain copy
    assert final["base"] > commits_at_backup and final["base"] > at_copy["commits"]
    assert len({r["wal"] for r in reports}) >= 3  # the WAL restarted at least twice
    return SimpleNamespace(
        root=root,
        home=home,
        backup=backup / STORE,
        midcopy=root / "midcopy.sqlite3",
        other=other / STORE,
        reports=reports,
        backup_dump=dump(backup),
    )


def scene(
    crashed, tmp_path: Path, main: Path | None = None, wal: Path | None = None, shm: bool = True
) -> Path:
    """A store folder of copies: the crashed store's files, `main` copied over the main file, `wal` as the -wal."""
    home = tmp_path / "scene"
    home.mkdir()
    shutil.copy(main or crashed.home / STORE, home / STORE)
    shutil.copy(wal or crashed.home / f"{STORE}-wal", home / f"{STORE}-wal")
    if shm:
        shutil.copy(crashed.home / f"{STORE}-shm", home / f"{STORE}-shm")
    return home


def run_icedit(home: Path, *args: str) -> tuple[int, str, str]:
    proc = popen(*args, home=home, cwd=home.parent)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def digests(home: Path) -> dict[str, str]:
    return {n: hashlib.sha256((home / n).read_bytes()).hexdigest() for n in (STORE, f"{STORE}-wal")}


def stale(home: Path) -> str:
    wal, store = home / f"{STORE}-wal", home / STORE
    return (
        f"Error: {wal} does not belong to the session store {store} (it was left by another copy of the store, "
        f"e.g. when a backup was copied back over it): the store was not opened, nothing in it changed; if {STORE} "
        f"is the copy you want, move {STORE}-wal and {STORE}-shm out of the folder and run again\n"
    )


@pytest.mark.parametrize(
    ("main", "wal", "shm"),
    [
        ("backup", None, True),
        ("midcopy", None, True),
        ("other", None, False),
    ],
    ids=[
        "a backup copied back over the main file",
        "a plain copy taken mid-run copied back",
        "a -wal copied from a different store",
    ],
)
def test_a_wal_that_is_not_the_stores_is_refused_and_nothing_changes(crashed, tmp_path, main, wal, shm):
    home = scene(crashed, tmp_path, main=getattr(crashed, main), wal=wal, shm=shm)
    before = digests(home)
    code, out, err = run_icedit(home, "sessions", "list")
    assert (code, out, err) == (2, "", stale(home))
    assert digests(home) == before


def test_a_store_reached_through_a_link_is_checked_where_sqlite_keeps_its_wal(crashed, tmp_path):
    """SQLite keeps the -wal beside the file a link leads to; the check looks there too."""
    real = scene(crashed, tmp_path, main=crashed.backup)
    home = tmp_path / "linked"
    home.mkdir()
    (home / STORE).symlink_to(real / STORE)
    before = digests(real)
    code, out, err = run_icedit(home, "sessions", "list")
    assert (
        code == 2 and out == "" and f"Error: {real / STORE}-wal does not belong to the session store" in err
    )
    assert digests(real) == before


def _snapshot(store_dir: Path, into: Path) -> None:
    """The store's files as a kill -9 would leave them, taken while its writer is still open."""
    into.mkdir()
    for name in (STORE, f"{STORE}-wal"):
        shutil.copy(store_dir / name, into / name)


def test_a_copy_that_went_its_own_way_is_refused_though_its_counts_fit(tmp_path):
    """A copy of the store gets 3 turns of its own; the original 5 more, then a crash; the copy is put back.
    The commit counts line up, the tokens do not."""
    original, copy = tmp_path / "original", tmp_path / "copy"
    original.mkdir(), copy.mkdir()
    with Store(original / STORE) as store:
        _open_turns(store, "trip", 2, (10, 0))
    shutil.copy(original / STORE, copy / STORE)
    with Store(copy / STORE) as store:
        _open_turns(store, "copy's own", 3, (0, 10))
    with Store(original / STORE) as store:
        _open_turns(store, "later", 5, (10, 10))
        _snapshot(original, tmp_path / "crashed")
    restored = tmp_path / "restored"
    restored.mkdir()
    shutil.copy(copy / STORE, restored / STORE)
    shutil.copy(tmp_path / "crashed" / f"{STORE}-wal", restored / f"{STORE}-wal")
    assert run_icedit(tmp_path / "crashed", "sessions", "list")[0] == 0  # the crash alone is fine
    before = digests(restored)
    code, out, err = run_icedit(restored, "sessions", "list")
    assert (code, out, err) == (2, "", stale(restored))
    assert digests(restored) == before


def test_an_upgrade_while_an_older_icedit_holds_a_wal_keeps_the_store_usable(icedit_home):
    """An older icedit (no stamps) has the store open with a WAL when this one upgrades it: the WAL cannot be
    compared with anything, so it is taken as it is, and every later command opens the store."""
    icedit_home.mkdir()
    shutil.copy(ROOT / "tests" / "fixtures" / "store-v1.sqlite3", icedit_home / STORE)
    older = sqlite3.connect(icedit_home / STORE, isolation_level=None)
    try:
        older.execute("PRAGMA journal_mode = WAL")
        older.execute("UPDATE sessions SET updated = '2026-01-01T00:00:00.000+00:00' WHERE name = 'other'")
        older.execute("BEGIN")
        older.execute(
            "SELECT COUNT(*) FROM turns"
        ).fetchone()  # a reader: the upgrade cannot checkpoint it all
        for args in (["undo", "walk"], ["redo", "walk"], ["sessions", "list"], ["undo", "walk"]):
            code, _, err = run_icedit(icedit_home, *args)
            assert (code, err) == (0, ""), err
        older.execute("COMMIT")
    finally:
        older.close()
    check_store(icedit_home / STORE)
    assert dump(icedit_home)["user_version"] == len(MIGRATIONS)  # upgraded to this version


def test_a_crash_without_a_restore_opens_and_keeps_every_turn(crashed, tmp_path):
    home = scene(crashed, tmp_path)
    code, out, err = run_icedit(home, "sessions", "list")
    assert (code, err) == (0, "")
    assert re.fullmatch(
        rf"trip\t{SETUP_TURNS + NOISE_TURNS} turns\tcursor {SETUP_TURNS + NOISE_TURNS}\tupdated \S+\n", out
    )
    turns = check_store(home / STORE)["trip"]
    assert len(turns) == SETUP_TURNS + NOISE_TURNS
    assert all(turns[r["turn"]] == r["sha256"] for r in crashed.reports)


def test_moving_the_wal_away_as_told_opens_the_backup_with_exactly_its_turns(crashed, tmp_path):
    home = scene(crashed, tmp_path, main=crashed.backup)
    code, _, err = run_icedit(home, "sessions", "list")
    assert (code, err) == (2, stale(home))
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in (f"{STORE}-wal", f"{STORE}-shm"):
        (home / name).rename(moved / name)
    code, out, err = run_icedit(home, "sessions", "list")
    assert (code, err) == (0, "")
    assert re.fullmatch(rf"trip\t{SETUP_TURNS} turns\tcursor {SETUP_TURNS}\tupdated \S+\n", out)
    assert dump(home) == crashed.backup_dump
    assert len(check_store(home / STORE)["trip"]) == SETUP_TURNS


def test_without_the_check_the_restored_store_is_destroyed(crashed, tmp_path, monkeypatch):
    """The control: the scenario really builds a stale WAL, and only the check stands between it and the data."""
    home = scene(crashed, tmp_path, main=crashed.backup)
    with pytest.raises(UserError, match="does not belong to the session store"):
        Store(home / STORE)
    monkeypatch.setattr(sessions.wal, "check", lambda path: None)
    with Store(home / STORE) as store:
        # SQLite replayed the WAL onto the backup: it claims the crashed store's turns, not the backup's 3 ...
        assert [(s.name, s.turns) for s in store.sessions()] == [("trip", SETUP_TURNS + NOISE_TURNS)]
        with pytest.raises(UserError, match="is damaged"):  # ... whose pages are not in the backup
            for turn in store.history("trip").turns:
                store.image(turn.image_sha256)
    with pytest.raises(AssertionError):
        check_store(home / STORE)  # and closing checkpointed the damage into the file itself


# ---------------------------------------------------------------------------------- an SQLite file of another program


def _notes(con: sqlite3.Connection) -> None:
    con.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
    con.execute("INSERT INTO notes (text) VALUES ('buy milk')")


def _app_id(con: sqlite3.Connection) -> None:
    con.execute("PRAGMA application_id = 1234")
    con.execute(
        "CREATE TABLE sessions (id INTEGER PRIMARY KEY)"
    )  # a table named like ours does not make it ours


def _version_2(con: sqlite3.Connection) -> None:
    con.execute("PRAGMA user_version = 2")
    con.execute("CREATE TABLE items (id INTEGER PRIMARY KEY)")


def _many(con: sqlite3.Connection) -> None:
    for name in "gfedcba":
        con.execute(f"CREATE TABLE {name} (x)")


def _wal_notes(con: sqlite3.Connection) -> None:
    con.execute("PRAGMA journal_mode = WAL")
    _notes(con)


FOREIGN = {
    "a notes table": (_notes, "notes"),
    "application_id 1234": (_app_id, "sessions"),
    "user_version 2 without sessions": (_version_2, "items"),
    "seven tables": (_many, "a, b, c, d, e, ..."),
    "a notes table, in WAL mode": (_wal_notes, "notes"),
}


@pytest.mark.parametrize("command", ["sessions list", "edit --session"])
@pytest.mark.parametrize("kind", list(FOREIGN))
def test_an_sqlite_file_of_another_program_is_refused_and_untouched(work, fake, icedit_home, kind, command):
    make, tables = FOREIGN[kind]
    shutil.rmtree(icedit_home)
    icedit_home.mkdir()
    path = icedit_home / STORE
    con = sqlite3.connect(path)
    try:
        make(con)
        con.commit()
    finally:
        con.close()
    before = path.read_bytes()
    args = (
        ["sessions", "list"]
        if command == "sessions list"
        else ["edit", "photo.png", "add snow", *FAKE, "--session", "s", "--seed", "1"]
    )
    refused(
        invoke(*args),
        f"{path} is not a session store (an SQLite database of another program, tables: "
        f"{tables}): move it away, or set ICEDIT_HOME to another folder",
    )
    assert fake.engine.calls == []
    assert sorted(p.name for p in icedit_home.iterdir()) == [STORE]
    unchanged(path, before)


def test_an_empty_file_becomes_a_store(work, fake, icedit_home):
    shutil.rmtree(icedit_home)
    icedit_home.mkdir()
    (icedit_home / STORE).touch()
    result = invoke("sessions", "list")
    ok(result)
    assert result.stdout == "no sessions yet (icedit edit IMAGE TEXT --session NAME starts one)\n"
    ok(invoke("edit", "photo.png", "add snow", *FAKE, "--session", "s", "--seed", "1", "-o", "snow.png"))
    assert dump(icedit_home)["user_version"] == len(MIGRATIONS)  # upgraded to this version
    assert len(check_store(icedit_home / STORE)["s"]) == 2


def test_a_v1_store_still_opens(icedit_home):
    icedit_home.mkdir()
    shutil.copy(FIXTURE_V1, icedit_home / STORE)
    result = invoke("sessions", "list")
    ok(result)
    assert [line.split("\tupdated ")[0] for line in result.stdout.splitlines()] == [
        "other\t1 turns\tcursor 5",
        "walk\t4 turns\tcursor 2",
    ]
    assert dump(icedit_home)["user_version"] == len(MIGRATIONS)  # upgraded to this version


def test_sessions_list_json_is_only_json(icedit_home):
    """Scripts read `sessions list --json` (e.g. to check a restored store): the text rows must not follow it."""
    icedit_home.mkdir()
    shutil.copy(FIXTURE_V1, icedit_home / STORE)
    result = invoke("sessions", "list", "--json")
    ok(result)
    assert result.stdout.count("\n") == 1
    assert sorted((r["name"], r["turns"]) for r in json.loads(result.stdout)) == [("other", 1), ("walk", 4)]


def test_the_real_console_script_refuses_a_foreign_file_in_one_line(tmp_path):
    home = tmp_path / "foreign"
    home.mkdir()
    con = sqlite3.connect(home / STORE)
    try:
        _notes(con)
        con.commit()
    finally:
        con.close()
    before = (home / STORE).read_bytes()
    code, out, err = run_icedit(home, "sessions", "list")
    assert (code, out) == (2, "")
    assert err == (
        f"Error: {home / STORE} is not a session store (an SQLite database of another program, tables: "
        "notes): move it away, or set ICEDIT_HOME to another folder\n"
    )
    assert sorted(p.name for p in home.iterdir()) == [STORE]
    unchanged(home / STORE, before)


@pytest.mark.parametrize("misreads", [1, sessions.wal.CHECKS - 1])
def test_a_reading_that_disagrees_while_writers_run_is_read_again_before_refusing(
    crashed, tmp_path, monkeypatch, misreads
):
    """A live writer can tear one reading of a WAL that is the store's own: it opens after a few readings
    disagree, while a stale WAL (still, the same every time) is refused after all of them."""
    (tmp_path / "own").mkdir()
    (tmp_path / "stale").mkdir()
    own = scene(crashed, tmp_path / "own")
    stale_home = scene(crashed, tmp_path / "stale", main=crashed.backup)
    readings: list[bool] = []
    real = sessions.wal._belongs

    def torn(*args):
        readings.append(real(*args))
        return readings[-1] and len(readings) > misreads

    monkeypatch.setattr(sessions.wal, "_belongs", torn)
    monkeypatch.setattr(sessions.wal.time, "sleep", lambda s: None)
    with Store(own / STORE) as store:
        assert "trip" in [s.name for s in store.sessions()]
    assert readings == [True] * (misreads + 1)
    readings.clear()
    with pytest.raises(UserError, match="does not belong to the session store"):
        Store(stale_home / STORE)
    assert readings == [False] * sessions.wal.CHECKS
