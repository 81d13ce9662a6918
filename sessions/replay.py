"""Replay scripts: a TOML list of turns run headless through the agent, reproducibly.

```toml
source = "astronaut.png"        # relative to the script's folder
seed = 0                        # turn n uses seed + n unless it sets its own
[[turns]]
say = "make it look like winter"
[[turns]]
command = "undo"
```
Scripts are data: parsed with tomllib, validated here (nothing in them is ever run), input paths
confined to the script's folder (unless the person passes --allow-outside) and read only when they are
regular files, outputs written as new files in --out (nothing planted there is opened or written
through), and the size of the run capped: MAX_SCRIPT_BYTES, MAX_TURNS, MAX_TOTAL_NFE and
MAX_IMAGE_PIXELS.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from assistant.agent import Agent
from assistant.errors import Cancelled, UserError
from assistant.files import SAID, kind, write_file
from assistant.images import load_source
from assistant.models import CandidateCount, EarlySteps, Guidance, Seed, Steps
from assistant.protocols import Events
from assistant.settings import Settings
from assistant.text import check_message, path_text
from sessions.history import Turn
from sessions.store import Store

MAX_SCRIPT_BYTES = 1_000_000
MAX_TURNS = 500
MAX_TOTAL_NFE = 20_000
"""Transformer evaluations of all edits together: n steps per edit, M*m + n - m with the early filter."""
MAX_IMAGE_PIXELS = 16_000_000
"""Images a script opens: at most 16 megapixels each (the assistant edits at 512 pixels wide anyway)."""


class ReplayTurn(BaseModel):
    """Exactly one of `say` (a message), `command` (undo/redo) or `open` (an image file)."""

    model_config = ConfigDict(extra="forbid")

    say: str | None = None
    command: Literal["undo", "redo"] | None = None
    open: str | None = None
    instruction: str | None = Field(None, description="skip the rewriter and edit with this instruction")
    seed: Seed | None = None
    steps: Steps | None = None
    guidance: Guidance | None = None
    candidates: CandidateCount | None = None
    early_steps: EarlySteps | None = None

    @field_validator("say", "instruction")
    @classmethod
    def _plain_text(cls, text: str | None) -> str | None:
        if text is None:
            return None
        try:
            return check_message(text)
        except UserError as e:  # pydantic reports ValueErrors with the field's name
            raise ValueError(str(e)) from None

    @model_validator(mode="after")
    def _one_action(self) -> ReplayTurn:
        actions = [k for k in ("say", "command", "open") if getattr(self, k) is not None]
        if len(actions) != 1:
            raise ValueError("a turn needs exactly one of say, command, open")
        extras = (self.instruction, self.seed, self.steps, self.guidance, self.candidates, self.early_steps)
        if self.say is None and any(v is not None for v in extras):
            raise ValueError("instruction, seed, steps, guidance, candidates and early_steps go with say")
        return self


class ReplayScript(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str
    seed: int = Field(0, ge=0, lt=2**62)
    steps: Steps | None = None
    guidance: Guidance | None = None
    candidates: CandidateCount | None = None
    early_steps: EarlySteps | None = None
    judge: str | None = None
    preset: str | None = None
    engine: str | None = None
    rewriter: str | None = None
    turns: list[ReplayTurn] = Field(min_length=1, max_length=MAX_TURNS)

    def settings(self) -> dict[str, Any]:
        """The script's engine settings (the command line's options win over them)."""
        keys = ("steps", "guidance", "candidates", "early_steps", "judge", "preset", "engine", "rewriter")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    def needs_judge(self) -> bool:
        """Whether a turn runs the early filter, so the judge's weights are checked up front too."""
        return any((t.candidates or 0) > 1 for t in self.turns)


Kind = Literal[
    "file",
    "hard link",
    "folder",
    "special",
    "missing",
    "dangling",
    "loop",
    "outside",
    "bad name",
    "unreadable",
]

_SAID: dict[str, str] = SAID | {
    "hard link": "a hard link (the file has another name, maybe outside this folder)",
    "folder": "a folder",
    "dangling": "a link to nothing",
}
"""How a one-line error says what holds a path ("outside" names its folder, so each caller says it)."""


def _what_is(path: Path, within: Path | None = None) -> Kind:
    """`assistant.files.kind`, plus what matters where replay reads and writes: a link leading out of
    `within` is "outside", a file with a second name a "hard link", a link to nothing "dangling".

    Replay asks this of every file it reads and of every entry of --out before any turn runs, so a FIFO
    (whose reader blocks forever), a device such as /dev/zero, a loop or a link out is refused by type.
    """
    try:
        if within is not None and not path.resolve().is_relative_to(within.resolve()):
            return "outside"
    except RuntimeError:  # Path.resolve's symlink loop (Python 3.11)
        return "loop"
    except ValueError:
        return "bad name"
    found = kind(path)
    if found == "missing" and os.path.islink(path):
        return "dangling"
    if found == "file" and os.stat(path).st_nlink > 1:
        return "hard link"
    return found


def _read_script(path: Path) -> str:
    """The script's text: a regular file's, of at most MAX_SCRIPT_BYTES by what is read, not by `stat()`."""
    found = _what_is(path)
    if found in ("missing", "dangling"):
        raise UserError(f"{path_text(path)}: no such replay script")
    if found == "folder":
        raise UserError(f"{path} is a folder, not a replay script")
    if found not in ("file", "hard link"):
        raise UserError(f"{path_text(path)}: {_SAID[found]}; replay scripts are files")
    try:
        with os.fdopen(
            os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb"
        ) as f:  # a FIFO swapped in cannot block
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise UserError(f"{path}: {_SAID['special']}; replay scripts are files")
            data = f.read(MAX_SCRIPT_BYTES + 1)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(data) > MAX_SCRIPT_BYTES:
        size = st.st_size if st.st_size > MAX_SCRIPT_BYTES else f"over {MAX_SCRIPT_BYTES}"
        raise UserError(
            f"{path}: {size} bytes; replay scripts of at most {MAX_SCRIPT_BYTES} bytes are accepted"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: cannot read ({e})") from None


def load_script(path: Path) -> ReplayScript:
    """Parse and validate; errors name the file and the line or field."""
    text = _read_script(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise UserError(f"{path}: not valid TOML: nested too deeply") from None
    try:
        return ReplayScript.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = [str(p) for p in first["loc"]] or ["script"]
        if len(loc) > 1 and loc[0] == "turns" and loc[1].isdigit():
            loc = [f"turn {int(loc[1]) + 1}", *loc[2:]]  # people count turns from 1, as the output does
        where = ": ".join([loc[0], ".".join(loc[1:])] if len(loc) > 1 else loc)
        raise UserError(f"{path}: {where}: {first['msg']}") from None


def confined(base: Path, relative: str, allow_outside: bool = False) -> Path:
    """`relative` inside `base`, or an error: scripts only read beside themselves (unless allowed), and
    never a FIFO, device or loop, which would hang or flood the reader. Missing files and folders
    pass, for the caller to name."""
    candidate = Path(relative).expanduser() if allow_outside else Path(relative)
    if not allow_outside and (candidate.is_absolute() or ".." in candidate.parts):
        raise UserError(f"{path_text(relative)}: replay scripts may only name files in their own folder")
    found = _what_is(base / candidate, None if allow_outside else base)
    if found == "outside":
        raise UserError(f"{relative}: leads outside the script's folder")
    if found in ("special", "loop", "bad name"):
        raise UserError(f"{path_text(relative)}: {_SAID[found]}; replay scripts open image files only")
    return (base / candidate).resolve()


def _open_image(base: Path, relative: str, allow_outside: bool) -> Image.Image:
    """A script's image: confined, then its size read from the header before any pixel is decoded."""
    path = confined(base, relative, allow_outside)
    if path.is_file() and path.stat().st_size > 0:
        try:
            with Image.open(path) as img:
                width, height = img.size
        except Exception:  # noqa: BLE001 - load_source below says what is wrong with the file
            width = height = 0
        if width * height > MAX_IMAGE_PIXELS:
            raise UserError(
                f"{relative}: a {width}x{height} image; replay scripts may open images of at most "
                f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels"
            )
    return load_source(path)


OUTPUT_NAME = re.compile(r"\d{2,}-[a-z]+\.png")
"""What replay names its outputs (`01-edit.png`); a folder holding such a name is in the way."""


def _prepare_out(out_dir: Path) -> None:
    """Create --out, or refuse it in one line if anything in it is not a plain file or folder of its own:
    a link out, a hard link, a FIFO, a device, a loop. Runs before any turn, so nothing is written then."""
    found = _what_is(out_dir)
    if found not in ("folder", "missing"):
        raise UserError(f"{path_text(out_dir)}: {_SAID.get(found, 'a file')}; --out must be a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        entries = sorted(out_dir.iterdir())
    except OSError as e:
        raise UserError(f"cannot create {out_dir}: {e.strerror}") from None
    for entry in entries:
        found = _what_is(entry, out_dir)
        if found == "file" or (found == "folder" and not OUTPUT_NAME.fullmatch(entry.name)):
            continue
        said = f"a link leading outside {out_dir}" if found == "outside" else _SAID[found]
        raise UserError(f"{entry}: {said}; replay writes only into --out")


def _write(out_dir: Path, name: str, data: bytes) -> Path:
    """Write one output as a new file: the name is unlinked first (an earlier run's output; unlinking
    never touches another name's data), then `write_file` links a whole new file there, so nothing
    there is written through and a crash leaves no half picture."""
    output = out_dir / name
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(output)
    except OSError as e:
        raise UserError(f"cannot write {output}: {e.strerror or e}") from None
    return write_file(output, data)  # linked into place, so a name taken meanwhile is refused, never opened


def total_nfe(script: ReplayScript, settings: Settings) -> int:
    """Transformer evaluations the script's edits ask for, as the engine counts them (its `nfe`).

    `settings` already merges the script's values with the command line's (which win), as the run uses them.
    """
    return sum(_nfe(turn, settings) for turn in script.turns if turn.say is not None)


def _nfe(turn: ReplayTurn, settings: Settings) -> int:
    """n steps, or M*m + n - m when M > 1 candidates run m early steps each (plugins/icedit/early_filter.py)."""
    steps = turn.steps or settings.steps
    candidates = turn.candidates or settings.candidates
    if candidates == 1:
        return steps
    early = turn.early_steps or settings.early_steps
    return candidates * early + steps - early


def run_script(
    script: ReplayScript,
    script_path: Path,
    out_dir: Path,
    store: Store,
    session: str,
    settings: Settings,
    cancel: threading.Event | None = None,
    allow_outside: bool = False,
    events: Events = lambda event: None,
) -> Iterator[dict[str, Any]]:
    """Run each turn through the agent; yield one JSON-able row per turn after writing its PNG.

    Each turn commits on its own: an error or Ctrl+C in turn n keeps turns 1..n-1 and nothing of n.
    """
    base = script_path.parent
    agent = Agent(store, session, settings)
    cancel = cancel or threading.Event()
    if (nfe := total_nfe(script, settings)) > MAX_TOTAL_NFE:
        raise UserError(
            f"{script_path}: the edits ask for {nfe} transformer evaluations in all; at most "
            f"{MAX_TOTAL_NFE} are accepted"
        )
    pending: tuple[Image.Image, str] | None = (
        _open_image(base, script.source, allow_outside),
        f"open {script.source}",
    )
    for n, step in enumerate(script.turns, start=1):  # every file the script names, before any turn runs
        if step.open is None:
            continue
        try:
            path = confined(base, step.open, allow_outside)
        except UserError as e:
            raise UserError(f"turn {n}: {e}") from None
        if not path.is_file():
            raise UserError(f"turn {n}: {step.open}: no such file beside the script")
    _prepare_out(out_dir)
    spent = 0  # what the edits really cost: a retry repeats the parameters of the turn it retries
    for n, step in enumerate(script.turns, start=1):
        try:
            if cancel.is_set():
                raise Cancelled("cancelled")
            if spent >= MAX_TOTAL_NFE:
                raise UserError(
                    f"the turns before it used {spent} transformer evaluations, the most a replay "
                    "may use: it stops here (the turns before it are kept)"
                )
            row, turn, opened = _run_turn(
                agent, script, step, n, base, pending, allow_outside, cancel, events
            )
            spent += row.get("nfe") or 0
            if agent.problems:  # observers that failed on this turn's commits
                row["warnings"], agent.problems = agent.problems, []
            row["output"] = None
            if turn is not None:
                output = _write(out_dir, f"{n:02d}-{row['intent']}.png", store.image(turn.image_sha256))
                row |= {"cursor": turn.id, "image_sha256": turn.image_sha256, "output": str(output)}
        except Cancelled:
            kept = " (the turns before it are kept)" if n > 1 else ""
            raise Cancelled(f"turn {n}: cancelled: nothing of it was saved{kept}") from None
        except UserError as e:
            raise type(e)(str(e) if str(e).startswith(f"turn {n}:") else f"turn {n}: {e}") from None
        if opened:
            pending = None
        yield row


def _run_turn(
    agent: Agent,
    script: ReplayScript,
    step: ReplayTurn,
    n: int,
    base: Path,
    pending: tuple[Image.Image, str] | None,
    allow_outside: bool,
    cancel: threading.Event,
    events: Events,
) -> tuple[dict[str, Any], Turn | None, bool]:
    """(the turn's row, the turn the cursor is on after it, whether the script's source is in the session now)."""
    row: dict[str, Any] = {"turn": n}
    turn: Turn | None
    if step.open is not None:
        turn = agent.open(_open_image(base, step.open, allow_outside), f"open {step.open}")
        row |= {"open": step.open, "intent": "open", "reply": f"opened {step.open}"}
        return row, turn, True
    if step.command is not None:
        if pending is not None and agent.history() is None:
            raise UserError(f"turn {n}: nothing to {step.command} yet: the first edit opens {script.source}")
        turn = agent.move(step.command)
        row |= {"command": step.command, "intent": step.command, "reply": f"cursor at #{turn.id}"}
        return row, turn, False
    if step.say is None:  # not after ReplayTurn's check
        raise UserError(f"turn {n} needs exactly one of say, command, open")
    outcome = agent.turn(
        step.say,
        source=pending,
        instruction=step.instruction,
        seed=script.seed + n if step.seed is None else step.seed,
        steps=step.steps,
        guidance=step.guidance,
        candidates=step.candidates,
        early_steps=step.early_steps,
        events=events,
        cancel=cancel,
    )
    turn = outcome.turn or (agent.current() if agent.history() else None)
    if outcome.result is not None:
        row |= {
            "seed": outcome.result.seed,
            "nfe": outcome.result.nfe,
            "random_weights": outcome.result.random_weights,
        }
        if outcome.result.candidates:
            row["candidate_seeds"] = [c.seed for c in outcome.result.candidates]
            row["verdicts"] = [v.model_dump() for v in outcome.result.verdicts]
    row |= {
        "say": step.say,
        "intent": outcome.intent,
        "instruction": outcome.plan.instruction,
        "reply": outcome.reply,
    }
    return row, turn, outcome.result is not None
