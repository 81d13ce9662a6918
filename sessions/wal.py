"""Telling whether a `-wal` file belongs to the store file beside it, before SQLite replays it.

SQLite replays any WAL whose frames are valid in themselves into the database next to it; a WAL
left from another copy (the usual mistake: restoring a backup by copying the main file back while
the old `-wal` stays) is replayed into the restored file and destroys it. SQLite keeps nothing in
the main file that names its WAL, so the store keeps it. Every commit stamps `store_state` with a
commit count, a random token and the WAL header it saw when its transaction began, and logs
(count, token) in `wal_commits`; the log starts again with each new WAL, from `wal_base`, the commit
the WAL was written on top of. A WAL belongs to the main file when the main file alone (read with
`immutable=1`, the WAL ignored) is at one of the commits that WAL logs: its frames were written on
top of exactly that file. A copy that went its own way has its own tokens.

Why `wal_base` is known: SQLite writes a new WAL header with the first frame of a new WAL (after a
checkpoint, or when the file was deleted), inside the commit that starts it; that commit read the
header before writing, so the first commit to see a new header is the one after its starter. A WAL
begun before a store had `store_state`, or begun by the upgrade that added it, cannot be compared
with the file it continues: it is taken as it is, as before this check existed (the store
checkpoints right after an upgrade, so such a WAL soon gives way to one that can be).
"""

from __future__ import annotations

import os
import sqlite3
import stat
import struct
import time
from pathlib import Path
from typing import Literal

from assistant.errors import UserError

_MAGIC = (0x377F0682, 0x377F0683)
CHECKS = 4
"""Readings that must all disagree before a WAL is refused (see `check`)."""
SCHEMA = """
CREATE TABLE store_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    store_id TEXT NOT NULL,
    commits INTEGER NOT NULL,
    token TEXT,
    wal_header TEXT,
    wal_base INTEGER
);
CREATE TABLE wal_commits (commits INTEGER PRIMARY KEY, token TEXT NOT NULL);
INSERT INTO store_state VALUES (1, lower(hex(randomblob(16))), 0, NULL, NULL, 0)
"""


def wal_path(store: str | Path) -> Path:
    """Where SQLite keeps the store's WAL: beside the file a link leads to, not beside the link."""
    return Path(f"{os.path.realpath(store)}-wal")


def header(wal: Path) -> str | None:
    """The WAL's checkpoint sequence and salts as hex (they change whenever SQLite starts the WAL anew).

    Opened without blocking and read only if it is a regular file: a FIFO planted there waits for no one."""
    try:
        fd = os.open(wal, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, 32)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) < 32 or struct.unpack(">I", data[:4])[0] not in _MAGIC:
        return None
    return data[12:24].hex()


def stamp(db: sqlite3.Connection, seen: str | None) -> None:
    """Count one commit whose transaction began with the WAL header `seen` (None: no WAL yet)."""
    commits, stored, base = db.execute("SELECT commits, wal_header, wal_base FROM store_state").fetchone()
    if seen is None:
        base = commits  # this commit writes the WAL's first frame
    elif commits == 0:
        base = None  # store_state was made in this commit, inside a WAL begun before it: no known base
    elif seen != stored:
        base = commits - 1  # the commit before this one started the WAL whose header this one sees
    if base is not None:
        db.execute("DELETE FROM wal_commits WHERE commits < ?", (base,))
    token = os.urandom(8).hex()
    db.execute("INSERT OR REPLACE INTO wal_commits VALUES (?, ?)", (commits + 1, token))
    db.execute(
        "UPDATE store_state SET commits = ?, token = ?, wal_header = ?, wal_base = ?",
        (commits + 1, token, seen, base),
    )


State = tuple[str, int, str | None, str | None, int | None, frozenset[tuple[int, str]]]
"""store_id, commits, token, wal_header, wal_base and the logged (commits, token) pairs."""

Bare = Literal["empty", "unstamped"]
"""A file with no tables, or an older store with no stamp."""


def _state(uri: str) -> State | Bare:
    """The store's stamp as one file or view holds it, or "empty" (no tables) or "unstamped" (an older store)."""
    db = sqlite3.connect(uri, uri=True, timeout=30)
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return "empty"
        if "store_state" not in tables:
            return "unstamped"
        row = db.execute("SELECT store_id, commits, token, wal_header, wal_base FROM store_state").fetchone()
        return (*row, frozenset(db.execute("SELECT commits, token FROM wal_commits")))
    finally:
        db.close()


def check(path: Path) -> None:
    """Refuse, in one line and before any connection could replay it, a WAL that is not this file's.

    A WAL left by another copy is still, so it is refused only when it fails the same way CHECKS times
    in a row: a writer running now (another process opening the new store, a checkpoint copying pages
    into the main file while it is read) can make one reading disagree, never all of them."""
    wal = wal_path(path)
    for attempt in range(CHECKS):
        if _fits(path, wal):
            return
        time.sleep(0.05 * (attempt + 1))
    raise UserError(
        f"{wal} does not belong to the session store {path} (it was left by another copy of the store, e.g. "
        f"when a backup was copied back over it): the store was not opened, nothing in it changed; if "
        f"{path.name} is the copy you want, move {wal.name} and {path.name}-shm out of the folder and run again"
    )


def _fits(path: Path, wal: Path) -> bool:
    """One reading: whether the WAL may be this file's (True also when it cannot be told now)."""
    uri = Path(os.path.realpath(path)).as_uri()
    for _ in range(5):  # a writer running now changes the WAL under us: read until two headers agree
        seen = header(wal)
        if seen is None:
            return True
        try:
            main = _state(f"{uri}?immutable=1")
        except sqlite3.DatabaseError:
            return True  # the main file itself is damaged: the store's own open says so
        view: State | Bare | Literal["damaged"]
        try:
            view = _state(f"{uri}?mode=ro")
        except sqlite3.OperationalError:
            return True  # busy or unreadable: cannot tell, and the store's own open says what is wrong
        except sqlite3.DatabaseError:
            view = "damaged"  # the WAL's frames do not fit this file
        if header(wal) == seen:
            return _belongs(main, view, seen)
    return True  # a live writer owns it


def _belongs(main: State | Bare, view: State | Bare | Literal["damaged"], seen: str) -> bool:
    if view == "unstamped":
        return main in ("unstamped", "empty")  # an older store and its WAL: nothing to compare
    if isinstance(view, str):
        return False  # frames that do not fit this file
    store_id, commits, _, stored, base, logged = view
    if stored != seen:
        base = commits - 1  # the WAL holds one commit: the last one, which started it
    if main == "empty":
        return base == 0
    if main == "unstamped":
        return base in (None, 0)  # the WAL began with the upgrade that stamped this store: nothing to compare
    if base is None:
        return main[0] == store_id
    return main[0] == store_id and base <= main[1] <= commits and (main[1], main[2]) in logged
