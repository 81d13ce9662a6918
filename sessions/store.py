"""The SQLite session store: sessions, their turn trees, and content-addressed images.

One short `BEGIN IMMEDIATE` transaction per change, WAL and a busy timeout, so a crash loses
at most the turn in flight and two processes can write the same store.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel

from assistant.errors import UserError
from sessions.history import History, Turn, TurnKind

MIGRATIONS: list[str] = [
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
]
"""Schema versions in order; `PRAGMA user_version` records how many have run."""


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


class LogEntry(BaseModel):
    """A line of the conversation (user message, assistant reply, error) for the chat view."""

    role: str
    text: str
    turn_id: int | None
    created: str


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Store:
    """The session store at `path` (":memory:" for a throwaway one)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        if self.path != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create the store folder {Path(path).parent}: {e.strerror}") from None
        try:
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA busy_timeout = 30000")
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except UserError:
            self.db.close()
            raise
        except sqlite3.DatabaseError as e:
            raise UserError(f"cannot open the session store {self.path}: {e}") from None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _migrate(self) -> None:
        with self._tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise UserError(
                    f"the session store {self.path} is from a newer icedit-assistant "
                    f"(schema {version}, this one knows {len(MIGRATIONS)}): upgrade icedit-assistant"
                )
            for i, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {i}")

    # ------------------------------------------------------------------ reading

    def sessions(self) -> list[SessionInfo]:
        rows = self.db.execute(
            "SELECT s.name, s.cursor, COUNT(t.id), s.created, s.updated FROM sessions s "
            "LEFT JOIN turns t ON t.session_id = s.id GROUP BY s.id ORDER BY s.updated DESC, s.id DESC"
        ).fetchall()
        return [SessionInfo(name=r[0], cursor=r[1], turns=r[2], created=r[3], updated=r[4]) for r in rows]

    def exists(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM sessions WHERE name = ?", (name,)).fetchone() is not None

    def _session(self, db: sqlite3.Connection, name: str) -> tuple[int, int | None]:
        row = db.execute("SELECT id, cursor FROM sessions WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise UserError(f"no session named '{name}' (see `icedit sessions list`)")
        return row

    def history(self, name: str) -> History:
        session_id, cursor = self._session(self.db, name)
        rows = self.db.execute(
            "SELECT id, parent_id, kind, message, plan_json, params_json, image_sha256, timings_json, created "
            "FROM turns WHERE session_id = ? ORDER BY id",
            (session_id,),
        ).fetchall()
        turns = [
            Turn(
                id=r[0],
                parent=r[1],
                kind=r[2],
                message=r[3],
                plan=json.loads(r[4]) if r[4] else None,
                params=json.loads(r[5]),
                image_sha256=r[6],
                timings=json.loads(r[7]),
                created=r[8],
            )
            for r in rows
        ]
        return History(name=name, cursor=cursor, turns=turns)

    def image(self, sha256: str) -> bytes:
        row = self.db.execute("SELECT png FROM images WHERE sha256 = ?", (sha256,)).fetchone()
        if row is None:
            raise UserError(f"image {sha256[:12]} is not in the store")
        return row[0]

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
        created by its first turn, so a failed first edit leaves no empty session behind.
        """
        now = _now()
        ids = []
        with self._tx() as db:
            row = db.execute("SELECT id FROM sessions WHERE name = ?", (name,)).fetchone()
            if row is None:
                session_id = db.execute(
                    "INSERT INTO sessions (name, created, updated) VALUES (?, ?, ?)", (name, now, now)
                ).lastrowid
            else:
                session_id = row[0]
            if parent is not None:
                self._check_turn(db, name, session_id, parent)
            for draft in drafts:
                db.execute(
                    "INSERT OR IGNORE INTO images (sha256, png, width, height) VALUES (?, ?, ?, ?)",
                    (draft.image_sha256, draft.png, *draft.size),
                )
                parent = db.execute(
                    "INSERT INTO turns (session_id, parent_id, kind, message, plan_json, params_json,"
                    " image_sha256, timings_json, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        session_id,
                        parent,
                        draft.kind,
                        draft.message,
                        None if draft.plan is None else json.dumps(draft.plan),
                        json.dumps(draft.params),
                        draft.image_sha256,
                        json.dumps(draft.timings),
                        now,
                    ),
                ).lastrowid
                ids.append(parent)
                self._log(db, session_id, draft.replies, parent, now)
            db.execute("UPDATE sessions SET cursor = ?, updated = ? WHERE id = ?", (parent, now, session_id))
        history = self.history(name)
        return [history.turn(i) for i in ids]

    @staticmethod
    def _check_turn(db: sqlite3.Connection, name: str, session_id: int, turn_id: int) -> None:
        if db.execute("SELECT 1 FROM turns WHERE id = ? AND session_id = ?", (turn_id, session_id)).fetchone() is None:
            raise UserError(f"session '{name}' has no turn {turn_id}")

    def move_cursor(self, name: str, turn_id: int, replies: list[tuple[str, str]] = ()) -> None:
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
    def _log(db, session_id: int, replies, turn_id: int | None, now: str) -> None:
        for role, text in replies:
            db.execute(
                "INSERT INTO log (session_id, role, text, turn_id, created) VALUES (?, ?, ?, ?, ?)",
                (session_id, role, text, turn_id, now),
            )
