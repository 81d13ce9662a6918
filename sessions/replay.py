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
confined to the script's folder (unless the person passes --allow-outside), outputs to --out, and
the size of the run capped: MAX_SCRIPT_BYTES, MAX_TURNS, MAX_TOTAL_STEPS and MAX_IMAGE_PIXELS.
"""

from __future__ import annotations

import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from assistant.agent import Agent, check_message
from assistant.errors import Cancelled, UserError
from assistant.images import load_source
from assistant.settings import Settings
from sessions.history import Turn
from sessions.store import Store

MAX_SCRIPT_BYTES = 1_000_000
MAX_TURNS = 500
MAX_TOTAL_STEPS = 20_000
"""Denoising steps of all edits together (a turn's steps, else the script's, else the setting's)."""
MAX_IMAGE_PIXELS = 16_000_000
"""Images a script opens: at most 16 megapixels each (the assistant edits at 512 pixels wide anyway)."""


class ReplayTurn(BaseModel):
    """Exactly one of `say` (a message), `command` (undo/redo) or `open` (an image file)."""

    model_config = ConfigDict(extra="forbid")

    say: str | None = None
    command: Literal["undo", "redo"] | None = None
    open: str | None = None
    instruction: str | None = Field(None, description="skip the rewriter and edit with this instruction")
    seed: int | None = Field(None, ge=0, lt=2**63)
    steps: int | None = Field(None, ge=1, le=200)
    guidance: float | None = Field(None, gt=0, le=200)
    candidates: int | None = Field(None, ge=1, le=16)
    early_steps: int | None = Field(None, ge=1, le=199)

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
    steps: int | None = Field(None, ge=1, le=200)
    guidance: float | None = Field(None, gt=0, le=200)
    candidates: int | None = Field(None, ge=1, le=16)
    early_steps: int | None = Field(None, ge=1, le=199)
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


def load_script(path: Path) -> ReplayScript:
    """Parse and validate; errors name the file and the line or field."""
    try:
        if path.is_file() and path.stat().st_size > MAX_SCRIPT_BYTES:
            raise UserError(f"{path}: {path.stat().st_size} bytes; replay scripts of at most {MAX_SCRIPT_BYTES} "
                            "bytes are accepted")
        data = tomllib.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such replay script") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder, not a replay script") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML: {e}") from None
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
    """`relative` inside `base`, or an error: scripts only read beside themselves (unless allowed)."""
    if allow_outside:
        return (base / Path(relative).expanduser()).resolve()
    candidate = Path(relative)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise UserError(f"{relative}: replay scripts may only name files in their own folder")
    resolved = (base / candidate).resolve()
    if not resolved.is_relative_to(base.resolve()):
        raise UserError(f"{relative}: leads outside the script's folder")
    return resolved


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
            raise UserError(f"{relative}: a {width}x{height} image; replay scripts may open images of at most "
                            f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels")
    return load_source(path)


def _outside(out_dir: Path, output: Path) -> UserError | None:
    """The error for an output that would land outside `out_dir` (through a planted link), else None."""
    if output.resolve().is_relative_to(out_dir.resolve()):
        return None
    return UserError(f"{output}: a link leading outside {out_dir}; replay writes only into --out")


def _write(out_dir: Path, name: str, data: bytes) -> Path:
    """Write one output inside `out_dir`: a name or a link there leading elsewhere is refused."""
    output = out_dir / name
    if error := _outside(out_dir, output):
        raise error
    try:
        output.write_bytes(data)
    except OSError as e:
        raise UserError(f"cannot write {output}: {e.strerror or e}") from None
    return output


def total_steps(script: ReplayScript, settings: Settings) -> int:
    """Denoising steps the script's edits ask for, as the run will count them."""
    default = script.steps or settings.steps
    return sum(turn.steps or default for turn in script.turns if turn.say is not None)


def run_script(
    script: ReplayScript,
    script_path: Path,
    out_dir: Path,
    store: Store,
    session: str,
    settings: Settings,
    cancel: threading.Event | None = None,
    allow_outside: bool = False,
) -> Iterator[dict[str, Any]]:
    """Run each turn through the agent; yield one JSON-able row per turn after writing its PNG.

    Each turn commits on its own: an error or Ctrl+C in turn n keeps turns 1..n-1 and nothing of n.
    """
    base = script_path.parent
    agent = Agent(store, session, settings)
    cancel = cancel or threading.Event()
    if (steps := total_steps(script, settings)) > MAX_TOTAL_STEPS:
        raise UserError(f"{script_path}: the edits ask for {steps} denoising steps in all; at most "
                        f"{MAX_TOTAL_STEPS} are accepted")
    pending = (_open_image(base, script.source, allow_outside), f"open {script.source}")
    for n, step in enumerate(script.turns, start=1):  # every file the script names, before any turn runs
        if step.open is not None and not confined(base, step.open, allow_outside).is_file():
            raise UserError(f"turn {n}: {step.open}: no such file beside the script")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        planted = [error for entry in sorted(out_dir.iterdir()) if (error := _outside(out_dir, entry))]
    except OSError as e:
        raise UserError(f"cannot create {out_dir}: {e.strerror}") from None
    if planted:
        raise planted[0]
    for n, step in enumerate(script.turns, start=1):
        try:
            if cancel.is_set():
                raise Cancelled("cancelled")
            row, turn, opened = _run_turn(agent, script, step, n, base, pending, allow_outside, cancel)
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


def _run_turn(agent: Agent, script: ReplayScript, step: ReplayTurn, n: int, base: Path,
              pending: tuple[Image.Image, str] | None, allow_outside: bool,
              cancel: threading.Event) -> tuple[dict[str, Any], Turn | None, bool]:
    """(the turn's row, the turn the cursor is on after it, whether the script's source is in the session now)."""
    row: dict[str, Any] = {"turn": n}
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
    outcome = agent.turn(
        step.say,
        source=pending,
        instruction=step.instruction,
        seed=script.seed + n if step.seed is None else step.seed,
        steps=step.steps,
        guidance=step.guidance,
        candidates=step.candidates,
        early_steps=step.early_steps,
        cancel=cancel,
    )
    turn = outcome.turn or (agent.current() if agent.history() else None)
    if outcome.result is not None:
        row |= {"seed": outcome.result.seed, "nfe": outcome.result.nfe,
                "random_weights": outcome.result.random_weights}
        if outcome.result.candidates:
            row["candidate_seeds"] = [c.seed for c in outcome.result.candidates]
            row["verdicts"] = [v.model_dump() for v in outcome.result.verdicts]
    row |= {"say": step.say, "intent": outcome.intent, "instruction": outcome.plan.instruction,
            "reply": outcome.reply}
    return row, turn, outcome.result is not None
