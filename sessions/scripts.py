"""Replay scripts: a TOML list of turns, parsed and validated, and the paths they may name.

```toml
source = "astronaut.png"        # relative to the script's folder
seed = 0                        # turn n uses seed + n unless it sets its own
[[turns]]
say = "make it look like winter"
[[turns]]
command = "undo"
```
Scripts are data: parsed with tomllib, validated here (nothing in them is ever run), of at most
MAX_SCRIPT_BYTES and MAX_TURNS, with input paths confined to the script's folder (unless the person
passes --allow-outside) and read only when they are regular files. `assistant.replay` runs them.
"""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from assistant.errors import UserError
from assistant.files import SAID, kind
from assistant.models import AttemptCount, CandidateCount, EarlySteps, Guidance, Seed, Steps
from assistant.text import check_message, path_text

MAX_SCRIPT_BYTES = 1_000_000
MAX_TURNS = 500


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
    attempts: AttemptCount | None = Field(
        None, description="self-check attempts per edit; an exported script says 1: it lists every attempt"
    )
    preset: str | None = None
    engine: str | None = None
    rewriter: str | None = None
    options: dict[str, str | int | float | bool] = Field(
        {},
        max_length=100,
        description="plugins' options the edits ran with (`icedit sessions export` writes the model, the "
        "adapter, its scale and top-k, and their hub commits), below the command line's",
    )
    turns: list[ReplayTurn] = Field(min_length=1, max_length=MAX_TURNS)

    def settings(self) -> dict[str, Any]:
        """The script's engine settings (the command line's options win over them)."""
        keys = (
            "steps",
            "guidance",
            "candidates",
            "early_steps",
            "judge",
            "attempts",
            "preset",
            "engine",
            "rewriter",
        )
        return self.options | {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

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

PATH_SAID: dict[str, str] = SAID | {
    "hard link": "a hard link (the file has another name, maybe outside this folder)",
    "folder": "a folder",
    "dangling": "a link to nothing",
}
"""How a one-line error says what holds a path ("outside" names its folder, so each caller says it)."""


def what_is(path: Path, within: Path | None = None) -> Kind:
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
    found = what_is(path)
    if found in ("missing", "dangling"):
        raise UserError(f"{path_text(path)}: no such replay script")
    if found == "folder":
        raise UserError(f"{path} is a folder, not a replay script")
    if found not in ("file", "hard link"):
        raise UserError(f"{path_text(path)}: {PATH_SAID[found]}; replay scripts are files")
    try:
        with os.fdopen(
            os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb"
        ) as f:  # a FIFO swapped in cannot block
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise UserError(f"{path}: {PATH_SAID['special']}; replay scripts are files")
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
    found = what_is(base / candidate, None if allow_outside else base)
    if found == "outside":
        raise UserError(f"{relative}: leads outside the script's folder")
    if found in ("special", "loop", "bad name"):
        raise UserError(f"{path_text(relative)}: {PATH_SAID[found]}; replay scripts open image files only")
    return (base / candidate).resolve()
