"""Session archives: one session and its images in a zip that `icedit sessions import` restores exactly.

`session.json` holds the turns (numbered 1..n in creation order, parents by those numbers), the
cursor, the transcript and every timestamp; `images/<sha256>.png` the PNGs the turns show, byte for
byte. The zip is written deterministically, so exporting an imported session gives the same bytes.

An archive is untrusted on import: only those two kinds of member are read, each with a size cap,
every PNG must hash to its name and decode, and the tree must hold together before anything is
written; then the whole session goes in in one transaction.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from assistant.errors import UserError
from assistant.images import decode_png
from sessions.history import Turn
from sessions.store import LogEntry, SessionInfo, Store

FORMAT = "icedit-session/1"
MAX_JSON_BYTES = 64_000_000
MAX_IMAGE_BYTES = 256_000_000
"""A 64-megapixel RGB PNG (the largest image the assistant reads) stays below this."""
MAX_MEMBERS = 100_000
_IMAGE = re.compile(r"^images/([0-9a-f]{64})\.png$")
_EPOCH = (1980, 1, 1, 0, 0, 0)


class ArchivedTurn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(ge=1)
    parent: int | None
    kind: Literal["open", "edit"]
    message: str
    plan: dict[str, Any] | None = None
    params: dict[str, Any] = {}
    image_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    timings: dict[str, float] = {}
    created: str


class ArchivedLine(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str
    text: str
    turn: int | None
    created: str


class ArchivedSession(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["icedit-session/1"]
    name: str = Field(min_length=1, max_length=200)
    created: str
    updated: str
    cursor: int
    turns: list[ArchivedTurn] = Field(min_length=1)
    log: list[ArchivedLine] = []

    @model_validator(mode="after")
    def _a_tree(self) -> ArchivedSession:
        for i, turn in enumerate(self.turns, start=1):
            if turn.n != i:
                raise ValueError(f"turn {i} is numbered {turn.n}: turns are numbered 1, 2, ... in order")
            if turn.parent is not None and not 1 <= turn.parent < i:
                raise ValueError(f"turn {i}: its parent {turn.parent} is not an earlier turn")
            if turn.parent is None and turn.kind == "edit":
                raise ValueError(f"turn {i}: an edit needs a parent turn")
        if not 1 <= self.cursor <= len(self.turns):
            raise ValueError(f"the cursor {self.cursor} is not one of the turns")
        for line in self.log:
            if line.turn is not None and not 1 <= line.turn <= len(self.turns):
                raise ValueError(f"a log line refers to turn {line.turn}, which is not in the archive")
        return self


def export_archive(store: Store, name: str, path: Path) -> ArchivedSession:
    """Write session `name` and its images to the zip at `path`."""
    history, info = store.history(name), store.info(name)
    number = {t.id: n for n, t in enumerate(history.turns, start=1)}
    archived = ArchivedSession(
        format=FORMAT,
        name=name,
        created=info.created,
        updated=info.updated,
        cursor=number[history.cursor],
        turns=[
            ArchivedTurn(n=number[t.id], parent=None if t.parent is None else number[t.parent], kind=t.kind,
                         message=t.message, plan=t.plan, params=t.params, image_sha256=t.image_sha256,
                         timings=t.timings, created=t.created)
            for t in history.turns
        ],
        log=[ArchivedLine(role=e.role, text=e.text, turn=None if e.turn_id is None else number[e.turn_id],
                          created=e.created)
             for e in store.transcript(name)],
    )
    data = json.dumps(archived.model_dump(), ensure_ascii=False, indent=1, sort_keys=True).encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
            zf.writestr(zipfile.ZipInfo("session.json", _EPOCH), data)
            for digest in sorted({t.image_sha256 for t in history.turns}):
                zf.writestr(zipfile.ZipInfo(f"images/{digest}.png", _EPOCH), store.image(digest),
                            compress_type=zipfile.ZIP_STORED)  # PNGs are compressed already
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    return archived


def _read(zf: zipfile.ZipFile, member: zipfile.ZipInfo, limit: int, path: Path) -> bytes:
    """A member's bytes, never more than `limit` of them whatever its header claims."""
    if member.file_size > limit:
        raise UserError(f"{path}: {member.filename} is {member.file_size} bytes; at most {limit} are accepted")
    with zf.open(member) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"{path}: {member.filename} is over {limit} bytes")
    return data


def _image(zf: zipfile.ZipFile, member: zipfile.ZipInfo, digest: str, path: Path) -> tuple[bytes, int, int]:
    """(png, width, height) of a member that hashes to its name and decodes as a PNG."""
    png = _read(zf, member, MAX_IMAGE_BYTES, path)
    if hashlib.sha256(png).hexdigest() != digest:
        raise UserError(f"{path}: {member.filename} does not hash to its name: the archive is damaged")
    try:
        image = decode_png(png)
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for bad data; all mean "not a usable PNG"
        raise UserError(f"{path}: {member.filename} is not a readable PNG ({type(e).__name__})") from None
    if image.format != "PNG":
        raise UserError(f"{path}: {member.filename} is a {image.format}, not a PNG")
    return png, image.width, image.height


def import_archive(store: Store, path: Path, name: str | None = None) -> tuple[str, ArchivedSession]:
    """Check the archive at `path` whole, then add its session (as `name` if given) in one transaction."""
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder, not a session archive") from None
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"{path}: not a session archive (a .zip from `icedit sessions export NAME FILE.zip`): "
                        f"{e}") from None
    with zf:
        members = zf.infolist()
        if len(members) > MAX_MEMBERS:
            raise UserError(f"{path}: {len(members)} files in the archive; at most {MAX_MEMBERS} are accepted")
        images: dict[str, zipfile.ZipInfo] = {}
        meta = None
        for member in members:
            if member.filename == "session.json":
                meta = member
            elif m := _IMAGE.match(member.filename):
                images[m[1]] = member
            else:
                raise UserError(f"{path}: unexpected file {member.filename!r} in the archive "
                                "(a session archive holds session.json and images/<sha256>.png)")
        if meta is None:
            raise UserError(f"{path}: no session.json in the archive")
        try:
            archived = ArchivedSession.model_validate_json(_read(zf, meta, MAX_JSON_BYTES, path))
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise UserError(f"{path}: session.json: {where + ': ' if where else ''}{first['msg']}") from None
        name = archived.name if name is None else name
        if not name.strip():
            raise UserError("the session name is empty: give one with --as NAME")
        needed = {t.image_sha256 for t in archived.turns}
        if missing := sorted(needed - set(images)):
            raise UserError(f"{path}: image {missing[0][:12]} of the session is not in the archive")
        for digest in sorted(needed):  # every image checked before the store is touched
            _image(zf, images[digest], digest, path)
        turns = [Turn(id=t.n, parent=t.parent, kind=t.kind, message=t.message, plan=t.plan, params=t.params,
                      image_sha256=t.image_sha256, timings=t.timings, created=t.created) for t in archived.turns]
        log = [LogEntry(role=e.role, text=e.text, turn_id=e.turn, created=e.created) for e in archived.log]
        info = SessionInfo(name=name, cursor=archived.cursor, turns=len(turns), created=archived.created,
                           updated=archived.updated)
        store.restore(name, info, turns, log, lambda digest: _image(zf, images[digest], digest, path))
    return name, archived
