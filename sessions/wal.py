"""Telling whether a `-wal` file belongs to the store file beside it, before SQLite replays it.

SQLite replays any WAL whose frames are valid in themselves into the database next to it; a WAL
left from another copy (the usual mistake: restoring a backup by copying the main file back while
the old `-wal` stays) is replayed into the restored file and destroys it. SQLite keeps nothing in
the main file that names its WAL, so the store keeps it: every commit stamps `store_state` with a
commit count, the WAL header it saw when its transaction began, and `wal_base`, the commit count
the current WAL was started on. A WAL belongs to the main file when the main file alone (read with
`immutable=1`, the WAL ignored) is the same store at a commit count between that base and the
WAL's newest commit: the WAL's frames were written on top of exactly that file.

Why `wal_base` is known: SQLite writes a new WAL header with the first frame of a new WAL (after a
checkpoint or when the file was deleted), inside the commit that starts it; that commit read the
header before writing, so the first commit to see a new header is the one after its starter.
"""

from __future__ import annotations

import sqlite3
import struct
from pathlib import Path

from assistant.errors import UserError

_MAGIC = (0x377F0682, 0x377F0683)
SCHEMA = """
CREATE TABLE store_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    store_id TEXT NOT NULL,
    commits INTEGER NOT NULL,
    wal_header TEXT,
    wal_base INTEGER NOT NULL
);
INSERT INTO store_state VALUES (1, lower(hex(randomblob(16))), 0, NULL, 0)
"""


def header(wal: Path) -> str | None:
    """The WAL's checkpoint sequence and salts as hex (they change whenever SQLite starts the WAL anew)."""
    try:
        with open(wal, "rb") as f:
            data = f.read(32)
    except OSError:
        return None
    if len(data) < 32 or struct.unpack(">I", data[:4])[0] not in _MAGIC:
        return None
    return data[12:24].hex()


def stamp(db: sqlite3.Connection, seen: str | None) -> None:
    """Count one commit whose transaction began with the WAL header `seen` (None: no WAL yet)."""
    commits, stored, base = db.execute("SELECT commits, wal_header, wal_base FROM store_state").fetchone()
    if seen is None:
        base = commits  # this commit writes the WAL's first frame
    elif seen != stored:
        base = commits - 1  # the commit before this one started the WAL whose header this one sees
    db.execute("UPDATE store_state SET commits = ?, wal_header = ?, wal_base = ?", (commits + 1, seen, base))


def _state(uri: str) -> tuple[str, int, str | None, int] | None:
    db = sqlite3.connect(uri, uri=True)
    try:
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'store_state'").fetchone() is None:
            return None
        return db.execute("SELECT store_id, commits, wal_header, wal_base FROM store_state").fetchone()
    finally:
        db.close()


def check(path: Path) -> None:
    """Refuse, in one line and before any connection could replay it, a WAL that is not this file's."""
    wal = Path(f"{path}-wal")
    uri = path.resolve().as_uri()
    for _ in range(5):  # a writer running now changes the WAL under us: read until two headers agree
        seen = header(wal)
        if seen is None:
            return
        try:
            main = _state(f"{uri}?immutable=1")
        except sqlite3.DatabaseError:
            return  # the main file itself is damaged: the store's own open says so
        try:
            view = _state(f"{uri}?mode=ro")
        except sqlite3.DatabaseError:
            view = "damaged"
        if header(wal) == seen:
            break
    else:
        return  # a live writer owns it
    if view is None and main is None:
        return  # a store from before this check: nothing to compare
    if view == "damaged" or view is None or not _belongs(main, view, seen):
        raise UserError(
            f"{wal} does not belong to the session store {path} (it was left by another copy of the store, e.g. "
            f"when a backup was copied back over it): nothing was changed; if {path.name} is the copy you want, "
            f"move {wal.name} and {path.name}-shm out of the folder and run again"
        )


def _belongs(main: tuple | None, view: tuple, seen: str) -> bool:
    store_id, commits, stored, base = view
    if stored != seen:
        base = commits - 1  # the WAL holds one commit: the last one, which started it
    if main is None:
        return base == 0
    return main[0] == store_id and base <= main[1] <= commits
