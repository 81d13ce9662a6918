"""The SQLite session store: sessions, their turn trees, and content-addressed images.

One short `BEGIN IMMEDIATE` transaction per change, WAL and a busy timeout, so a crash loses
at most the turn in flight and two processes can write the same store. Full disks, read-only or
damaged files and a store that stays busy are one line each (`UserError`), never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

from PIL import Image
from pydantic import BaseModel

from assistant.errors import UserError
from assistant.text import check_name
from sessions import identity, wal
from sessions.history import History, Turn, TurnKind


def _pixel_names(db: sqlite3.Connection) -> None:
    """Schema 4: rename every image (and the turns showing it) to its pixel digest; two encodings of
    one picture become one image. One that no longer decodes keeps its name: reads report it damaged."""
    for (old,) in db.execute("SELECT sha256 FROM images ORDER BY rowid").fetchall():  # one PNG at a time
        png, width, height = db.execute(
            "SELECT png, width, height FROM images WHERE sha256 = ?", (old,)
        ).fetchone()
        try:
            new = identity.png_digest(png)
        except Exception:  # noqa: BLE001 - bit rot: PIL raises many kinds
            continue
        if new == old:
            continue
        db.execute(
            "INSERT OR IGNORE INTO images (sha256, png, width, height) VALUES (?, ?, ?, ?)",
            (new, png, width, height),
        )
        db.execute("UPDATE turns SET image_sha256 = ? WHERE image_sha256 = ?", (new, old))
        db.execute("DELETE FROM images WHERE sha256 = ?", (old,))


MIGRATIONS: list[str | Callable[[sqlite3.Connection], None]] = [
    """
    CREATE TABLE sessions (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        cursor INTEGER REFERENCES turns(id),
        created TEXT NOT NULL,
        updated TEXT NOT NULL
    );
    CREATE TABLE images (
        sha256 TEXT PRIMARY KEY,
        png BLOB NOT NULL,
        width INTEGER NOT NULL,
        height INTEGER NOT NULL
    );
    CREATE TABLE turns (
        id INTEGER PRIMARY KEY,
        session_id INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        parent_id INTEGER REFERENCES turns(id),
        kind TEXT NOT NULL CHECK (kind IN ('open', 'edit')),
        message TEXT NOT NULL,
        plan_json TEXT,
        params_json TEXT NOT NULL,
        image_sha256 TEXT NOT NULL REFERENCES images(sha256),
        timings_json TEXT NOT NULL,
        created TEXT NOT NULL
    );
    CREATE INDEX turns_by_session ON turns(session_id, id);
    CREATE TABLE log (
        id INTEGER PRIMARY KEY,
        session_id INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        role TEXT NOT NULL,
        text TEXT NOT NULL,
        turn_id INTEGER REFERENCES turns(id),
        created TEXT NOT NULL
    );
    """,
    """
    CREATE INDEX turns_by_image ON turns(session_id, image_sha256);
    CREATE INDEX log_by_session ON log(session_id, id);
    """,
    wal.SCHEMA,
    _pixel_names,
]
"""Schema versions in order (SQL, or a step in Python); `PRAGMA user_version` records how many have run.

2: indexes for the two lookups that otherwise scan whole tables as a store grows over weeks:
`add_turns` asking whether a session already holds an image (a turn "open"ed by a concurrent
process is reused, not doubled) and `transcript`, which the chat reads on every start.
3: `store_state`, which lets a later open tell whether a `-wal` file belongs to this file (sessions/wal.py).
4: images named by the sha256 of their pixels instead of their PNG bytes (`sessions.identity`).
"""
APPLICATION_ID = 0x69636564
"""`PRAGMA application_id` of a session store ("iced"): an SQLite file of another program is not taken for one."""
BUSY_TIMEOUT_S = 30
_STORE_ERRORS = {
    "disk is full": "the disk holding the session store {path} is full: free some space and try again",
    "readonly database": "the session store {path} is read-only: make it writable, or set ICEDIT_HOME to a "
    "writable folder",
    "database is locked": f"the session store {{path}} stayed busy for {BUSY_TIMEOUT_S} s (another icedit is "
    "writing to it): try again",
    "disk I/O error": "cannot read or write the session store {path}: disk I/O error",
    "malformed": "the session store {path} is damaged ({error}): restore it from a backup",
    "not a database": "cannot open the session store {path}: {error}; move it away or restore it from a backup",
    "unable to open": "cannot open the session store {path} ({error}): is its folder writable?",
}
"""SQLite's messages for what is wrong with the store's file or disk (not with our SQL) -> one line."""


P = ParamSpec("P")
R = TypeVar("R")


class DamagedImage(UserError):
    """A stored image whose bytes no longer hash to its name; `sha256` says which."""

    def __init__(self, sha256: str, message: str):
        super().__init__(message)
        self.sha256 = sha256


class SessionInfo(BaseModel):
    name: str
    cursor: int | None
    turns: int
    created: str
    updated: str


class NewTurn(BaseModel):
    """A turn about to be committed, with its image's canonical PNG bytes and its chat lines."""

    kind: TurnKind
    message: str
    png: bytes
    image_sha256: str
    size: tuple[int, int]
    plan: dict[str, Any] | None = None
    params: dict[str, Any] = {}
    timings: dict[str, float] = {}
    replies: list[tuple[str, str]] = []

    def image_row(self) -> tuple[bytes, int, int]:
        """(png, width, height) for the store's `images` table."""
        return (self.png, *self.size)


class LogEntry(BaseModel):
    """A line of the conversation (user message, assistant reply, error) for the chat view."""

    role: str
    text: str
    turn_id: int | None
    created: str


class Found(BaseModel):
    """A turn `search` found, with the name of its session."""

    session: str
    turn: int
    parent: int | None
    kind: TurnKind
    message: str
    instruction: str | None
    seed: int | None
    created: str


class Collected(BaseModel):
    """What `collect_garbage` freed; sizes are the store file's and its WAL's together, in bytes."""

    images: int
    bytes_freed: int
    before: int
    after: int
    shrunk: bool = True
    """False when another process was reading the store: the images are gone, the file shrinks next time."""


def _create(path: Path) -> None:
    """A new store appears whole or not at all: its schema is written to a file of its own beside it, then
    linked into place, so a kill -9 while it is made leaves no store without tables behind. Another
    icedit making it at the same moment: one link wins, and both use that store."""
    try:
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".new")
        os.close(fd)
        os.unlink(temp)  # SQLite makes the file
    except OSError as e:
        raise UserError(f"cannot create the session store in {path.parent}: {e.strerror or e}") from None
    try:
        Store(temp, _creating=True).close()
        try:
            os.link(temp, path)
        except FileExistsError:
            pass
        except (
            OSError
        ):  # a file system without hard links: a rename, which could replace a store made meanwhile
            if not os.path.lexists(path):
                os.rename(temp, path)
    finally:
        for leftover in (temp, f"{temp}-wal", f"{temp}-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _row_id(cursor: sqlite3.Cursor) -> int:
    """The id of the row an INSERT just made (sqlite3 types it optional: it is None only before any)."""
    if cursor.lastrowid is None:
        raise RuntimeError("an INSERT gave no row id")
    return cursor.lastrowid


_TURN_COLUMNS = (
    "t.id, t.parent_id, t.kind, t.message, t.plan_json, t.params_json, t.image_sha256, t.timings_json, "
    "t.created"
)
"""What `_turn` reads, of table `turns` named `t`."""


def _turn(row: Sequence[Any]) -> Turn:
    return Turn(
        id=row[0],
        parent=row[1],
        kind=row[2],
        message=row[3],
        plan=json.loads(row[4]) if row[4] else None,
        params=json.loads(row[5]),
        image_sha256=row[6],
        timings=json.loads(row[7]),
        created=row[8],
    )


def _reading(method: Callable[Concatenate[Store, P], R]) -> Callable[Concatenate[Store, P], R]:
    """A read that meets a damaged or unreadable file says so in one line, like a write does."""

    @functools.wraps(method)
    def read(self: Store, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as e:
            raise self._error(e) from None

    return read


class Store:
    """The session store at `path` (":memory:" for a throwaway one)."""

    def __init__(self, path: str | Path, *, _creating: bool = False):
        self.path = str(path)
        if self.path != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create the store folder {Path(path).parent}: {e.strerror}") from None
            if not _creating and not os.path.lexists(path):
                _create(Path(path))
        if self.path != ":memory:" and Path(path).is_file():
            wal.check(Path(path))
        connected: sqlite3.Connection | None = None
        try:
            self.db = connected = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
            self._check_ours(
                self.db
            )  # before the journal mode is set: that would change another program's file
            self._wal()
            self.db.execute("PRAGMA foreign_keys = ON")
            if self._migrate() and self.path != ":memory:":
                # into the main file at once: a WAL begun by the upgrade cannot be checked (sessions/wal.py)
                self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except BaseException as e:
            if connected is not None:
                connected.close()
            if isinstance(e, sqlite3.DatabaseError):
                raise self._error(e, "cannot open the session store {path}: {error}") from None
            raise

    def _error(self, error: sqlite3.Error, fallback: str | None = None) -> Exception:
        """One line for a problem with the store's file or disk; anything else (a bug) as it was."""
        text = str(error)
        for fragment, message in _STORE_ERRORS.items():
            if fragment in text:
                return UserError(message.format(path=self.path, error=text))
        return UserError(fallback.format(path=self.path, error=text)) if fallback else error

    def _wal(self) -> None:
        """Switch to WAL, waiting out other processes: SQLite's busy handler does not cover this pragma."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                self.db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it is committed, or (error, Ctrl+C, full disk) none of it."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.DatabaseError as e:
            raise self._error(e) from None
        try:
            seen = wal.header(wal.wal_path(self.path)) if self.path != ":memory:" else None
            before = self._written()
            yield self.db
            if (
                self._written() != before
            ):  # only commits that write count: a read-only open leaves the file as it was
                wal.stamp(self.db, seen)
            self.db.execute("COMMIT")
        except BaseException as e:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            if isinstance(e, sqlite3.DatabaseError):
                raise self._error(e) from None
            raise

    def _written(self) -> tuple[int, int]:
        """Rows changed and the schema cookie (DDL bumps it): what tells a write from a read."""
        return self.db.total_changes, self.db.execute("PRAGMA schema_version").fetchone()[0]

    def _migrate(self) -> bool:
        """Run the migrations this store lacks, in one transaction; whether there were any."""
        with self._tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise UserError(
                    f"the session store {self.path} is from a newer icedit-assistant "
                    f"(schema {version}, this one knows {len(MIGRATIONS)}): upgrade icedit-assistant"
                )
            for i, script in enumerate(MIGRATIONS[version:], start=version + 1):
                if callable(script):
                    script(db)
                else:
                    for statement in filter(str.strip, script.split(";")):
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {i}")
            if version < len(MIGRATIONS):
                db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        return version < len(MIGRATIONS)

    def _check_ours(self, db: sqlite3.Connection) -> None:
        """Refuse an SQLite file of another program at the store's path instead of adding tables to it."""
        db.execute("BEGIN")  # one snapshot: another icedit may be creating this store right now
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            app = db.execute("PRAGMA application_id").fetchone()[0]
            tables = [
                r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            ]
        finally:
            db.execute("COMMIT")
        if (
            app not in (0, APPLICATION_ID)
            or (version == 0 and tables)
            or (version and "sessions" not in tables)
        ):
            shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
            raise UserError(
                f"{self.path} is not a session store (an SQLite database of another program, "
                f"tables: {shown or 'none'}): move it away, or set ICEDIT_HOME to another folder"
            )

    # ------------------------------------------------------------------ reading

    @_reading
    def sessions(self) -> list[SessionInfo]:
        rows = self.db.execute(
            "SELECT s.name, s.cursor, COUNT(t.id), s.created, s.updated FROM sessions s "
            "LEFT JOIN turns t ON t.session_id = s.id GROUP BY s.id ORDER BY s.updated DESC, s.id DESC"
        ).fetchall()
        return [SessionInfo(name=r[0], cursor=r[1], turns=r[2], created=r[3], updated=r[4]) for r in rows]

    def info(self, name: str) -> SessionInfo:
        for info in self.sessions():
            if info.name == name:
                return info
        raise UserError(f"no session named '{name}' (see `icedit sessions list`)")

    @_reading
    def exists(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM sessions WHERE name = ?", (name,)).fetchone() is not None

    def _session(self, db: sqlite3.Connection, name: str) -> tuple[int, int | None]:
        row = db.execute("SELECT id, cursor FROM sessions WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise UserError(f"no session named '{name}' (see `icedit sessions list`)")
        return row

    @_reading
    def history(self, name: str) -> History:
        session_id, cursor = self._session(self.db, name)
        rows = self.db.execute(
            f"SELECT {_TURN_COLUMNS} FROM turns t WHERE session_id = ? ORDER BY id", (session_id,)
        ).fetchall()
        return History(name=name, cursor=cursor, turns=[_turn(r) for r in rows])

    def image(self, sha256: str) -> bytes:
        """An image's PNG bytes, checked against its name: bit rot SQLite cannot see is caught here."""
        return self._read_image(sha256)[0]

    def picture(self, sha256: str) -> Image.Image:
        """An image decoded, checked against its name like `image`."""
        return self._read_image(sha256)[1]

    @_reading
    def _read_image(self, sha256: str) -> tuple[bytes, Image.Image]:
        row = self.db.execute("SELECT png FROM images WHERE sha256 = ?", (sha256,)).fetchone()
        if row is None:
            raise UserError(f"image {sha256[:12]} is not in the store")
        if (picture := identity.checked(row[0], sha256)) is None:
            raise DamagedImage(
                sha256,
                f"image {sha256[:12]} in the session store {self.path} is damaged (its bytes "
                "no longer match their hash): restore the store from a backup",
            )
        return row[0], picture

    @_reading
    def transcript(self, name: str) -> list[LogEntry]:
        session_id, _ = self._session(self.db, name)
        rows = self.db.execute(
            "SELECT role, text, turn_id, created FROM log WHERE session_id = ? ORDER BY id", (session_id,)
        ).fetchall()
        return [LogEntry(role=r[0], text=r[1], turn_id=r[2], created=r[3]) for r in rows]

    # ------------------------------------------------------------------ writing

    def add_turns(self, name: str, parent: int | None, drafts: list[NewTurn]) -> list[Turn]:
        """Commit turns, their images and chat lines in one transaction; the cursor moves onto the last.

        The first draft hangs under `parent`, each next one under the one before. A session is
        created by its first turn, so a failed first edit leaves no empty session behind. A first
        draft that opens an image the session already holds (another process may have committed it
        since the agent looked) is not doubled: that turn is used, as the agent would have.
        """
        now = _now()
        ids = []
        with self._tx() as db:
            row = db.execute("SELECT id FROM sessions WHERE name = ?", (name,)).fetchone()
            if row is None:
                check_name(name)
                session_id = _row_id(
                    db.execute(
                        "INSERT INTO sessions (name, created, updated) VALUES (?, ?, ?)", (name, now, now)
                    )
                )
            else:
                session_id = row[0]
            if parent is not None:
                self._check_turn(db, name, session_id, parent)
            if drafts and drafts[0].kind == "open" and row is not None:
                shown = db.execute(
                    "SELECT id FROM turns WHERE session_id = ? AND image_sha256 = ? ORDER BY id DESC LIMIT 1",
                    (session_id, drafts[0].image_sha256),
                ).fetchone()
                if shown is not None:
                    parent = shown[0]
                    ids.append(parent)
                    self._log(db, session_id, drafts[0].replies, parent, now)
                    drafts = drafts[1:]
            for draft in drafts:
                self._put_image(db, draft.image_sha256, draft.image_row)
                parent = self._insert_turn(db, session_id, parent, draft, now)
                ids.append(parent)
                self._log(db, session_id, draft.replies, parent, now)
            db.execute("UPDATE sessions SET cursor = ?, updated = ? WHERE id = ?", (parent, now, session_id))
        history = self.history(name)
        return [history.turn(i) for i in ids]

    def restore(
        self,
        name: str,
        info: SessionInfo,
        turns: list[Turn],
        transcript: list[LogEntry],
        image: Callable[[str], tuple[bytes, int, int]],
    ) -> History:
        """Insert a whole session (an imported archive) in one transaction, timestamps as they were.

        Turn ids are renumbered into this store (parents before children, as `turns` lists them);
        `info.cursor`, parents and log lines refer to the ids in `turns`. `image(sha256)` gives
        (png, width, height) for images the store does not hold yet, or holds damaged.
        """
        with self._tx() as db:
            check_name(name)
            if db.execute("SELECT 1 FROM sessions WHERE name = ?", (name,)).fetchone() is not None:
                raise UserError(
                    f"a session named '{name}' already exists: import it under another name with --as"
                )
            session_id = _row_id(
                db.execute(
                    "INSERT INTO sessions (name, created, updated) VALUES (?, ?, ?)",
                    (name, info.created, info.updated),
                )
            )
            ids: dict[int, int] = {}
            for turn in turns:
                self._put_image(db, turn.image_sha256, functools.partial(image, turn.image_sha256))
                parent = None if turn.parent is None else ids[turn.parent]
                ids[turn.id] = self._insert_turn(db, session_id, parent, turn, turn.created)
            for entry in transcript:
                db.execute(
                    "INSERT INTO log (session_id, role, text, turn_id, created) VALUES (?, ?, ?, ?, ?)",
                    (
                        session_id,
                        entry.role,
                        entry.text,
                        None if entry.turn_id is None else ids[entry.turn_id],
                        entry.created,
                    ),
                )
            cursor = None if info.cursor is None else ids[info.cursor]
            db.execute("UPDATE sessions SET cursor = ? WHERE id = ?", (cursor, session_id))
        return self.history(name)

    @staticmethod
    def _put_image(
        db: sqlite3.Connection, sha256: str, content: Callable[[], tuple[bytes, int, int]]
    ) -> None:
        """Store an image once; a copy whose bytes no longer match their hash is replaced (healed) by sound ones."""
        held = db.execute("SELECT png FROM images WHERE sha256 = ?", (sha256,)).fetchone()
        if held is None:
            db.execute(
                "INSERT INTO images (sha256, png, width, height) VALUES (?, ?, ?, ?)", (sha256, *content())
            )
        elif identity.checked(held[0], sha256) is None:
            png, width, height = content()
            db.execute(
                "UPDATE images SET png = ?, width = ?, height = ? WHERE sha256 = ?",
                (png, width, height, sha256),
            )

    @staticmethod
    def _insert_turn(
        db: sqlite3.Connection, session_id: int, parent: int | None, turn: NewTurn | Turn, created: str
    ) -> int:
        """One row of `turns` (a new draft or an imported turn); its id."""
        return _row_id(
            db.execute(
                "INSERT INTO turns (session_id, parent_id, kind, message, plan_json, params_json, image_sha256,"
                " timings_json, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    session_id,
                    parent,
                    turn.kind,
                    turn.message,
                    None if turn.plan is None else json.dumps(turn.plan),
                    json.dumps(turn.params),
                    turn.image_sha256,
                    json.dumps(turn.timings),
                    created,
                ),
            )
        )

    @staticmethod
    def _check_turn(db: sqlite3.Connection, name: str, session_id: int, turn_id: int) -> None:
        if (
            db.execute(
                "SELECT 1 FROM turns WHERE id = ? AND session_id = ?", (turn_id, session_id)
            ).fetchone()
            is None
        ):
            raise UserError(f"session '{name}' has no turn {turn_id}")

    def move_cursor(self, name: str, turn_id: int, replies: Sequence[tuple[str, str]] = ()) -> None:
        """Point the session at one of its turns (undo, redo, jump), with the chat lines that did it."""
        now = _now()
        with self._tx() as db:
            session_id, _ = self._session(db, name)
            self._check_turn(db, name, session_id, turn_id)
            db.execute("UPDATE sessions SET cursor = ?, updated = ? WHERE id = ?", (turn_id, now, session_id))
            self._log(db, session_id, replies, turn_id, now)

    def log(self, name: str, replies: list[tuple[str, str]]) -> None:
        """Record chat lines that change nothing else (answers, clarifying questions, errors)."""
        now = _now()
        with self._tx() as db:
            session_id, cursor = self._session(db, name)
            self._log(db, session_id, replies, cursor, now)
            db.execute("UPDATE sessions SET updated = ? WHERE id = ?", (now, session_id))

    @staticmethod
    def _log(
        db: sqlite3.Connection,
        session_id: int,
        replies: Iterable[tuple[str, str]],
        turn_id: int | None,
        now: str,
    ) -> None:
        for role, text in replies:
            db.execute(
                "INSERT INTO log (session_id, role, text, turn_id, created) VALUES (?, ?, ?, ?, ?)",
                (session_id, role, text, turn_id, now),
            )

    # ------------------------------------------------------------------ managing

    def delete_sessions(self, names: Sequence[str]) -> dict[str, int]:
        """Delete sessions with their turns and chat lines, all or (an unknown name) none: {name: turns}.

        Their images stay, also those no other turn shows: `collect_garbage` frees them, so a delete is
        a short transaction whatever the sessions hold."""
        deleted = {}
        with self._tx() as db:
            for name in dict.fromkeys(names):
                session_id, _ = self._session(db, name)
                deleted[name] = db.execute(
                    "SELECT COUNT(*) FROM turns WHERE session_id = ?", (session_id,)
                ).fetchone()[0]
                db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))  # turns and log cascade
        return deleted

    def rename(self, old: str, new: str) -> None:
        """Give session `old` the name `new`, which no session has; `updated` stays: nothing was edited."""
        with self._tx() as db:
            session_id, _ = self._session(db, old)
            check_name(new)
            if db.execute("SELECT 1 FROM sessions WHERE name = ?", (new,)).fetchone() is not None:
                raise UserError(f"a session named '{new}' already exists: choose another name")
            db.execute("UPDATE sessions SET name = ? WHERE id = ?", (new, session_id))

    @_reading
    def search(self, text: str, limit: int, edits_only: bool = False) -> list[Found]:
        """Turns of every session whose message or plan instruction holds `text`, newest first
        (`icedit sessions search`; `icedit log` lists the edits, "" matching every one).

        SQL LIKE, its wildcards escaped so that `50%` and `a_b` match only themselves; like LIKE it
        ignores the case of ASCII letters only."""
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = self.db.execute(
            f"SELECT s.name, {_TURN_COLUMNS} FROM turns t JOIN sessions s ON s.id = t.session_id "
            "WHERE (t.message LIKE :p ESCAPE '\\' "
            "OR json_extract(t.plan_json, '$.instruction') LIKE :p ESCAPE '\\') "
            "AND (t.kind = 'edit' OR NOT :edits) "
            "ORDER BY t.created DESC, t.id DESC LIMIT :n",
            {"p": pattern, "n": limit, "edits": edits_only},
        ).fetchall()
        found = []
        for session, *row in rows:
            turn = _turn(row)
            found.append(
                Found(
                    session=session,
                    turn=turn.id,
                    parent=turn.parent,
                    kind=turn.kind,
                    message=turn.message,
                    instruction=(turn.plan or {}).get("instruction"),
                    seed=turn.seed,
                    created=turn.created,
                )
            )
        return found

    def collect_garbage(self) -> Collected:
        """Delete the images no turn shows, then VACUUM so the file shrinks by what they held.

        VACUUM cannot run inside a transaction: it follows the delete's commit. In WAL mode it writes
        the new file into the WAL, so the WAL is checkpointed (and truncated) before and after it."""
        before = self._size()
        with self._tx() as db:
            images = db.execute(
                "DELETE FROM images WHERE sha256 NOT IN (SELECT image_sha256 FROM turns)"
            ).rowcount
        try:
            # PASSIVE waits for no one: a reader in another process keeps WAL frames, and a VACUUM then
            # would only grow the WAL by a copy of the whole file. The next gc shrinks it.
            _, frames, done = self.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            shrunk = frames == done
            if shrunk:
                for statement in ("VACUUM", "PRAGMA wal_checkpoint(TRUNCATE)"):
                    self.db.execute(statement).fetchall()
        except sqlite3.DatabaseError as e:
            raise self._error(e) from None
        after = self._size()
        return Collected(images=images, bytes_freed=before - after, before=before, after=after, shrunk=shrunk)

    def _size(self) -> int:
        """Bytes the store takes on disk: its file and its WAL."""
        if self.path == ":memory:":
            return 0
        return sum(p.stat().st_size for p in (Path(self.path), wal.wal_path(self.path)) if p.exists())
