"""Session archives: one session and its images in a zip that `icedit sessions import` restores exactly.

`session.json` holds the turns (numbered 1..n in creation order, parents by those numbers), the
cursor, the transcript and every timestamp; `images/<sha256>.png` the PNGs the turns show, byte for
byte, each named by the sha256 of its pixels (`sessions.identity`). The zip is written
deterministically, so exporting an imported session gives the same bytes. Format 1 named each PNG by
the sha256 of its bytes; it is still imported, each image checked against that name and then renamed.

An archive is untrusted on import. Only those two kinds of member are read, each once, with a size
cap, and a damaged zip (bad CRC or deflate data, an unknown method, encryption) is one line. Every
field is held to what typed input is held to: plans are `EditPlan`s, parameters keep `EditRequest`'s
bounds, text goes through `assistant.text`'s checks, and turns, depth and transcript are capped. Every
PNG must decode and hash to its name, all before anything is written; then the session goes in in one
transaction. Export validates with the same models, so what it writes, import takes.

A turn whose image is missing or damaged cannot be restored, nor can the edits made from it. Export
leaves such images out (the store's copy is bit-rotten) and says which turns; import then refuses
unless asked for the rest (`partial`).
"""

from __future__ import annotations

import json
import math
import re
import zipfile
import zlib
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from assistant.errors import UserError
from assistant.files import kind, kind_problem, refuse_existing, write_file
from assistant.models import (
    MAX_STEPS,
    AdapterInfo,
    AttemptCount,
    EditPlan,
    EditRequest,
    VerdictInfo,
    WeightsInfo,
)
from assistant.text import check_message, check_name, control_in, printable
from sessions.history import History, Turn, numbered
from sessions.identity import decode_png, pixel_digest, sha256
from sessions.store import DamagedImage, LogEntry, SessionInfo, Store

FORMAT = "icedit-session/2"
BYTE_NAMES = "icedit-session/1"
"""The first format: images named by the sha256 of their PNG bytes."""
MAX_JSON_BYTES = 64_000_000
MAX_IMAGE_BYTES = 256_000_000
"""A 64-megapixel RGB PNG (the largest image the assistant reads) stays below this."""
MAX_MEMBERS = 100_000
MAX_TURNS = 100_000
MAX_DEPTH = 10_000
"""Edits in a row from the first turn: a chain of ten thousand is weeks of work; more is a crafted file."""
MAX_LOG_LINES = 1_000_000
MAX_TEXT = 20_000
"""Characters in a transcript line, a rationale or a prompt (a message has assistant.text.MAX_MESSAGE)."""
_IMAGE = re.compile(r"images/([0-9a-f]{64})\.png")
_EPOCH = (1980, 1, 1, 0, 0, 0)
_ZIP_DAMAGE = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError)
"""What zipfile raises for a bad CRC, bad deflate data, a truncated file or headers pointing nowhere."""


def _plain(text: str) -> str:
    """Text that prints as itself: no control character but newline and tab (replies may have lines)."""
    if found := control_in(text):
        raise ValueError(f"contains a control character ({found!r}): plain text is accepted")
    return text


def _timestamp(text: str) -> str:
    try:
        datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{printable(text[:40])!r} is not an ISO 8601 time") from None
    return text


def _check(check, *args: Any) -> Any:
    """One of our one-line checks inside a model: pydantic reports a ValueError with where it was."""
    try:
        return check(*args)
    except UserError as e:
        raise ValueError(str(e)) from None


Text = Annotated[str, Field(max_length=MAX_TEXT), AfterValidator(_plain)]
Key = Annotated[str, Field(max_length=100), AfterValidator(_plain)]
Timestamp = Annotated[str, Field(max_length=64), AfterValidator(_timestamp)]
_REQUEST = EditRequest.model_fields
Seed = Annotated[int, *_REQUEST["seed"].metadata]
Count = Annotated[int, Field(ge=0, lt=2**63)]
_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ArchivedPlan(EditPlan):
    """An edit turn's plan as the agent commits it: an "edit" with an instruction a person could type."""

    model_config = _STRICT

    intent: Literal["edit"]
    instruction: str
    subject: Text | None = None
    description: Text | None = None
    ic_prompt: Text | None = None
    rationale: Text = ""
    fallback: Text | None = None

    @field_validator("instruction")
    @classmethod
    def _typed(cls, text: str) -> str:
        return _check(check_message, text)


class ArchivedAdapter(AdapterInfo):
    model_config = _STRICT

    source: Text
    keys: Count
    num_experts: Count = 0
    top_k: Count | None = None
    revision: Key | None = None


class ArchivedWeights(WeightsInfo):
    model_config = _STRICT

    source: Text
    revision: Key | None = None


class ArchivedCheck(BaseModel):
    """The self-check's verdict on one attempt (`Agent._attempts`)."""

    model_config = _STRICT

    score: Annotated[float, Field(ge=0, le=1)] | None
    accept: Annotated[float, Field(ge=0, le=1)]
    attempt: AttemptCount
    attempts: AttemptCount
    judge: Key
    note: Text | None = None


class ArchivedVerdict(VerdictInfo):
    model_config = _STRICT

    a: Seed
    b: Seed
    winner: Seed
    note: Text | None = None


class ArchivedParams(BaseModel):
    """What `Agent.turn` records of an edit, with `EditRequest`'s bounds: a retry or replay reads these back.

    Other keys (from another version) are kept when they are plain JSON scalars.
    """

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    seed: Seed | None = None
    base_seed: Seed | None = None
    steps: Annotated[int, *_REQUEST["steps"].metadata] | None = None
    guidance: Annotated[float, *_REQUEST["guidance"].metadata] | None = None
    native_size: bool | None = None
    candidates: Annotated[int, *_REQUEST["candidates"].metadata] | None = None
    early_steps: Annotated[int, *_REQUEST["early_steps"].metadata] | None = None
    candidate_seeds: list[Seed] | None = Field(None, max_length=16)
    verdicts: list[ArchivedVerdict] | None = Field(None, max_length=16)
    nfe: Count | None = None
    engine: Text | None = None
    preset: Text | None = None
    rewriter: Text | None = None
    judge: Text | None = None
    random_weights: bool | None = None
    model: ArchivedWeights | None = None
    adapter: ArchivedAdapter | None = None
    plan_step: (
        Annotated[list[Annotated[int, Field(ge=1, le=MAX_STEPS)]], Field(min_length=2, max_length=2)] | None
    ) = None
    check: ArchivedCheck | None = None
    extras: dict[Key, Text | int | float | bool | None] | None = Field(None, max_length=100)

    @model_validator(mode="after")
    def _scalars(self) -> ArchivedParams:
        for key, value in (self.model_extra or {}).items():
            scalar = (
                value is None
                or isinstance(value, bool)
                or isinstance(value, int)
                and abs(value) < 2**63
                or isinstance(value, float)
                and math.isfinite(value)
                or isinstance(value, str)
                and len(value) <= MAX_TEXT
                and not control_in(value)
            )
            if not scalar or len(key) > 100 or control_in(key):
                raise ValueError(
                    f"parameter {printable(key[:40])!r}: one this version does not know must be a short "
                    "name with a number, true/false, null or plain text"
                )
        return self


class ArchivedTurn(BaseModel):
    model_config = _STRICT

    n: int = Field(ge=1)
    parent: int | None
    kind: Literal["open", "edit"]
    message: str
    plan: ArchivedPlan | None = None
    params: ArchivedParams = ArchivedParams()
    image_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    timings: dict[Key, float] = Field({}, max_length=100)
    created: Timestamp

    @model_validator(mode="after")
    def _a_turn(self) -> ArchivedTurn:
        self.message = _check(check_message, self.message, f"turn {self.n}'s message")
        if self.kind == "edit" and (self.plan is None or self.params.seed is None):
            raise ValueError(f"turn {self.n} is an edit without its plan or seed")
        if self.kind == "open" and self.plan is not None:
            raise ValueError(f"turn {self.n} opens an image: it has no plan")
        return self


class ArchivedLine(BaseModel):
    model_config = _STRICT

    role: Literal["user", "assistant"]
    text: Text
    turn: int | None
    created: Timestamp


class ArchivedSession(BaseModel):
    model_config = _STRICT

    format: Literal["icedit-session/2", "icedit-session/1"]
    name: str = Field(max_length=10_000)
    """Checked by `check_name` where it is used, so a bad one can be replaced with --as."""
    created: Timestamp
    updated: Timestamp
    cursor: int
    turns: list[ArchivedTurn] = Field(min_length=1)
    log: list[ArchivedLine] = []

    @field_validator("turns", "log", mode="before")
    @classmethod
    def _not_too_many(cls, items: Any, info: ValidationInfo) -> Any:
        """Counted before any item is validated, so a huge list is refused at once."""
        cap = MAX_TURNS if info.field_name == "turns" else MAX_LOG_LINES
        if isinstance(items, list) and len(items) > cap:
            raise ValueError(f"{len(items)} of them; at most {cap} are accepted")
        return items

    @model_validator(mode="after")
    def _a_tree(self) -> ArchivedSession:
        depth = [0]
        for i, turn in enumerate(self.turns, start=1):
            if turn.n != i:
                raise ValueError(f"turn {i} is numbered {turn.n}: turns are numbered 1, 2, ... in order")
            if turn.parent is not None and not 1 <= turn.parent < i:
                raise ValueError(f"turn {i}: its parent {turn.parent} is not an earlier turn")
            if turn.parent is None and turn.kind == "edit":
                raise ValueError(f"turn {i}: an edit needs a parent turn")
            depth.append(1 if turn.parent is None else depth[turn.parent] + 1)
            if depth[i] > MAX_DEPTH:
                raise ValueError(f"turn {i} is {depth[i]} turns deep; at most {MAX_DEPTH} are accepted")
        if not 1 <= self.cursor <= len(self.turns):
            raise ValueError(f"the cursor {self.cursor} is not one of the turns")
        for line in self.log:
            if line.turn is not None and not 1 <= line.turn <= len(self.turns):
                raise ValueError(f"a log line refers to turn {line.turn}, which is not in the archive")
        return self


class Exported(NamedTuple):
    archived: ArchivedSession
    damaged: list[int]
    """Turns whose image is bit-rotten in the store: in session.json, their image not in the zip."""


class Imported(NamedTuple):
    history: History
    damaged: list[int]
    """Archive numbers of turns whose own image is missing or damaged (any only with `partial`)."""
    dropped: list[int]
    """Archive numbers of turns not restored: the damaged ones and every turn below them."""


def _where(loc: tuple) -> str:
    """pydantic's location of an error, turns and log lines counted from 1, printable and short."""
    parts = [printable(str(p))[:40] for p in loc]
    if len(loc) >= 2 and loc[0] in ("turns", "log") and isinstance(loc[1], int):
        head = f"{'turn' if loc[0] == 'turns' else 'log line'} {loc[1] + 1}"
        return ": ".join([head, ".".join(parts[2:])]) if parts[2:] else head
    return ".".join(parts)


def _validated(data: str | bytes | dict, what: str) -> ArchivedSession:
    """`data` as an ArchivedSession, or one line: `what`, where, and the first thing wrong."""
    try:
        if isinstance(data, dict):
            return ArchivedSession.model_validate(data)
        return ArchivedSession.model_validate_json(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = _where(first["loc"])
        raise UserError(f"{what}: {where + ': ' if where else ''}{first['msg']}") from None


def export_archive(store: Store, name: str, path: Path, force: bool = False) -> Exported:
    """Write session `name` and its images to the zip at `path` (atomically; an existing file only with `force`).

    A bit-rotten image is left out and its turns reported, so the rest of the session is saved.
    """
    history, info = store.history(name), store.info(name)
    number = {t.id: n for n, t in enumerate(history.turns, start=1)}
    archived = _validated(
        {
            "format": FORMAT,
            "name": name,
            "created": info.created,
            "updated": info.updated,
            "cursor": number[history.cursor_turn().id],
            "turns": [
                {
                    "n": number[t.id],
                    "parent": None if t.parent is None else number[t.parent],
                    "kind": t.kind,
                    "message": t.message,
                    "plan": t.plan,
                    "params": t.params,
                    "image_sha256": t.image_sha256,
                    "timings": t.timings,
                    "created": t.created,
                }
                for t in history.turns
            ],
            "log": [
                {
                    "role": e.role,
                    "text": e.text,
                    "turn": None if e.turn_id is None else number[e.turn_id],
                    "created": e.created,
                }
                for e in store.transcript(name)
            ],
        },
        f"session '{printable(name)}' cannot be archived",
    )
    data = json.dumps(
        archived.model_dump(exclude_unset=True), ensure_ascii=False, indent=1, sort_keys=True
    ).encode()
    refuse_existing([path], force)
    damaged: set[str] = set()

    def write(f) -> None:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
            zf.writestr(zipfile.ZipInfo("session.json", _EPOCH), data)
            for digest in sorted({t.image_sha256 for t in history.turns}):  # one image in memory at a time
                try:
                    png = store.image(digest)
                except DamagedImage:
                    damaged.add(digest)
                    continue
                zf.writestr(
                    zipfile.ZipInfo(f"images/{digest}.png", _EPOCH), png, compress_type=zipfile.ZIP_STORED
                )  # PNGs are compressed already

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {path.parent}: {e.strerror or e}") from None
    write_file(path, write, force=force)
    return Exported(archived, [t.n for t in archived.turns if t.image_sha256 in damaged])


def _read(zf: zipfile.ZipFile, member: zipfile.ZipInfo, limit: int, path: Path) -> bytes:
    """A member's bytes, never more than `limit` of them whatever its header claims; damage is one line."""
    if member.file_size > limit:
        raise UserError(
            f"{path}: {member.filename} is {member.file_size} bytes; at most {limit} are accepted"
        )
    if member.flag_bits & 0x1:
        raise UserError(f"{path}: {member.filename} is encrypted: session archives are not")
    try:
        with zf.open(member) as f:
            data = f.read(limit + 1)
    except NotImplementedError as e:  # an unknown compression method, or a zip feature icedit never writes
        raise UserError(
            f"{path}: {member.filename} cannot be read: {str(e)[:100]} (compression method "
            f"{member.compress_type}): the archive is damaged or not from icedit"
        ) from None
    except _ZIP_DAMAGE as e:
        raise UserError(f"{path}: {member.filename} is damaged ({printable(str(e))[:200]})") from None
    if len(data) > limit:
        raise UserError(f"{path}: {member.filename} is over {limit} bytes")
    return data


class _Member(NamedTuple):
    png: bytes
    width: int
    height: int
    pixels: str
    """Its pixel digest: the name the store keeps it under."""


def _image(zf: zipfile.ZipFile, member: zipfile.ZipInfo, digest: str, path: Path, fmt: str) -> _Member:
    """A member that decodes as a PNG and hashes to its name (its bytes' hash in format 1)."""
    png = _read(zf, member, MAX_IMAGE_BYTES, path)
    damaged = UserError(f"{path}: {member.filename} does not hash to its name: the archive is damaged")
    if fmt == BYTE_NAMES and sha256(png) != digest:
        raise damaged
    try:
        image = decode_png(png)
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for bad data; all mean "not a usable PNG"
        raise UserError(f"{path}: {member.filename} is not a readable PNG ({type(e).__name__})") from None
    if image.format != "PNG":
        raise UserError(f"{path}: {member.filename} is a {image.format}, not a PNG")
    pixels = pixel_digest(image)
    if fmt != BYTE_NAMES and pixels != digest:
        raise damaged
    return _Member(png, image.width, image.height, pixels)


def _open(path: Path) -> zipfile.ZipFile:
    """The archive, if `path` is a regular file (a FIFO would block the reader, a device never end)."""
    found = kind(path)
    if found == "folder":
        raise UserError(f"{path} is a folder, not a session archive")
    if found != "file":
        raise UserError(kind_problem(path, found))
    try:
        return zipfile.ZipFile(path)
    except _ZIP_DAMAGE as e:
        raise UserError(
            f"{path}: not a session archive (a .zip from `icedit sessions export NAME FILE.zip`): "
            f"{printable(str(e))[:200]}"
        ) from None


def _members(zf: zipfile.ZipFile, path: Path) -> tuple[zipfile.ZipInfo, dict[str, zipfile.ZipInfo]]:
    """session.json and {sha256: member} of the images; anything else, or a name twice, is refused."""
    members = zf.infolist()
    if len(members) > MAX_MEMBERS:
        raise UserError(f"{path}: {len(members)} files in the archive; at most {MAX_MEMBERS} are accepted")
    images: dict[str, zipfile.ZipInfo] = {}
    meta = None
    for member in members:
        m = _IMAGE.fullmatch(member.filename)
        if m is None and member.filename != "session.json":
            raise UserError(
                f"{path}: unexpected file {member.filename!r} in the archive "
                "(a session archive holds session.json and images/<sha256>.png)"
            )
        if (meta if m is None else images.get(m[1])) is not None:
            raise UserError(f"{path}: {member.filename} is in the archive twice: the archive is damaged")
        if m is None:
            meta = member
        else:
            images[m[1]] = member
    if meta is None:
        raise UserError(f"{path}: no session.json in the archive")
    return meta, images


def _survey(
    zf: zipfile.ZipFile, images: dict[str, zipfile.ZipInfo], archived: ArchivedSession, path: Path
) -> tuple[dict[str, str], dict[str, str]]:
    """({name: why} for each image of the session missing from the archive or damaged in it,
    {name: pixel digest} for the others)."""
    why, pixels = {}, {}
    for digest in sorted({t.image_sha256 for t in archived.turns}):
        if digest not in images:
            why[digest] = f"{path}: image {digest[:12]} of the session is not in the archive"
            continue
        try:
            pixels[digest] = _image(zf, images[digest], digest, path, archived.format).pixels
        except UserError as e:
            why[digest] = str(e)
    return why, pixels


def _restorable(
    archived: ArchivedSession, unusable: dict[str, str], partial: bool
) -> tuple[list[int], list[int]]:
    """(damaged, dropped) turn numbers, or one line: a turn without its image goes, and every turn below it
    (an edit is made from its parent's picture); only with `partial`, and only if some turn is left."""
    damaged = [t.n for t in archived.turns if t.image_sha256 in unusable]
    if not damaged:
        return [], []
    first = unusable[archived.turns[damaged[0] - 1].image_sha256]
    if not partial:
        raise UserError(
            f"{first}: nothing was imported ({numbered(damaged)} cannot be restored; --partial "
            "imports the rest)"
        )
    dropped: set[int] = set()
    for t in archived.turns:
        if t.image_sha256 in unusable or t.parent in dropped:
            dropped.add(t.n)
    if len(dropped) == len(archived.turns):
        raise UserError(
            f"{first}: nothing can be restored ({numbered(damaged)} cannot, and every other turn is "
            "an edit of one of them)"
        )
    return damaged, sorted(dropped)


def _cursor(archived: ArchivedSession, dropped: set[int]) -> int:
    """The archived cursor, or its nearest restored ancestor (the last restored turn if none is)."""
    n: int | None = archived.cursor
    while n is not None and n in dropped:
        n = archived.turns[n - 1].parent
    return n if n is not None else max(t.n for t in archived.turns if t.n not in dropped)


def import_archive(store: Store, path: Path, name: str | None = None, partial: bool = False) -> Imported:
    """Check the archive at `path` whole, then add its session (as `name` if given) in one transaction.

    With `partial`, turns whose image is missing or damaged, and the turns below them, are left out.
    """
    with _open(path) as zf:
        meta, images = _members(zf, path)
        archived = _validated(_read(zf, meta, MAX_JSON_BYTES, path), f"{path}: session.json")
        try:
            name = check_name(archived.name if name is None else name)
        except UserError as e:
            hint = (
                " (the name in the archive: import it under another with --as NAME)" if name is None else ""
            )
            raise UserError(f"{e}{hint}") from None
        unusable, pixels = _survey(zf, images, archived, path)
        damaged, dropped = _restorable(archived, unusable, partial)
        gone = set(dropped)
        member = {pixels[name]: (images[name], name) for name in pixels}
        turns = [
            Turn(
                id=t.n,
                parent=t.parent,
                kind=t.kind,
                message=t.message,
                plan=None if t.plan is None else t.plan.model_dump(exclude_unset=True),
                params=t.params.model_dump(exclude_unset=True),
                image_sha256=pixels[t.image_sha256],
                timings=t.timings,
                created=t.created,
            )
            for t in archived.turns
            if t.n not in gone
        ]
        log = [
            LogEntry(role=e.role, text=e.text, turn_id=None if e.turn in gone else e.turn, created=e.created)
            for e in archived.log
        ]
        info = SessionInfo(
            name=name,
            cursor=_cursor(archived, gone),
            turns=len(turns),
            created=archived.created,
            updated=archived.updated,
        )
        history = store.restore(
            name, info, turns, log, lambda digest: _image(zf, *member[digest], path, archived.format)[:3]
        )
    return Imported(history, damaged, dropped)
