"""Replay scripts: a TOML list of turns run headless through the agent, reproducibly.

```toml
source = "astronaut.png"        # relative to the script's folder
seed = 0                        # turn n uses seed + n unless it sets its own
[[turns]]
say = "make it look like winter"
[[turns]]
command = "undo"
```
Scripts are data: parsed with tomllib, validated here, paths confined to the script's folder.
"""

from __future__ import annotations

import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from assistant.errors import UserError
from assistant.images import load_image
from assistant.settings import Settings
from sessions.store import Store

MAX_TURNS = 500


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


def load_script(path: Path) -> ReplayScript:
    """Parse and validate; errors name the file and the line or field."""
    try:
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


def confined(base: Path, relative: str) -> Path:
    """`relative` inside `base`, or an error: scripts only read beside themselves."""
    candidate = Path(relative)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise UserError(f"{relative}: replay scripts may only name files in their own folder")
    resolved = (base / candidate).resolve()
    if not resolved.is_relative_to(base.resolve()):
        raise UserError(f"{relative}: leads outside the script's folder")
    return resolved


def run_script(
    script: ReplayScript,
    script_path: Path,
    out_dir: Path,
    store: Store,
    session: str,
    settings: Settings,
    cancel: threading.Event | None = None,
) -> Iterator[dict[str, Any]]:
    """Run each turn through the agent; yield one JSON-able row per turn after writing its PNG."""
    from assistant.agent import Agent

    base = script_path.parent
    agent = Agent(store, session, settings)
    pending = (load_image(confined(base, script.source)), f"open {script.source}")
    for n, step in enumerate(script.turns, start=1):  # every file the script names, before any turn runs
        if step.open is not None and not confined(base, step.open).is_file():
            raise UserError(f"turn {n}: {step.open}: no such file beside the script")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out_dir}: {e.strerror}") from None
    for n, step in enumerate(script.turns, start=1):
        row: dict[str, Any] = {"turn": n}
        if step.open is not None:
            turn = agent.open(load_image(confined(base, step.open)), f"open {step.open}")
            pending = None
            row |= {"open": step.open, "intent": "open", "reply": f"opened {step.open}"}
        elif step.command is not None:
            if pending is not None and agent.history() is None:
                raise UserError(f"turn {n}: nothing to {step.command} yet: the first edit opens {script.source}")
            turn = agent.move(step.command)
            row |= {"command": step.command, "intent": step.command, "reply": f"cursor at #{turn.id}"}
        else:
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
                pending = None
                row |= {"seed": outcome.result.seed, "nfe": outcome.result.nfe,
                        "random_weights": outcome.result.random_weights}
                if outcome.result.candidates:
                    row["candidate_seeds"] = [c.seed for c in outcome.result.candidates]
                    row["verdicts"] = [v.model_dump() for v in outcome.result.verdicts]
            row |= {"say": step.say, "intent": outcome.intent, "instruction": outcome.plan.instruction,
                    "reply": outcome.reply}
        row["output"] = None
        if turn is not None:
            output = out_dir / f"{n:02d}-{row['intent']}.png"
            output.write_bytes(store.image(turn.image_sha256))
            row |= {"cursor": turn.id, "image_sha256": turn.image_sha256, "output": str(output)}
        yield row
