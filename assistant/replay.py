"""Replay: a script's turns run headless through the agent, reproducibly (the scripts: `sessions.scripts`).

Outputs are written as new files in --out (nothing planted there is opened or written through), and
the size of the run is capped: MAX_TOTAL_NFE transformer evaluations, MAX_IMAGE_PIXELS per image.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from assistant.agent import Agent
from assistant.errors import Cancelled, Stopped, UserError
from assistant.files import leftover, write_file
from assistant.images import load_source
from assistant.protocols import Engine, Events
from assistant.settings import Settings
from assistant.text import path_text
from sessions.history import Turn
from sessions.scripts import PATH_SAID, ReplayScript, ReplayTurn, confined, what_is
from sessions.store import Store

MAX_TOTAL_NFE = 20_000
"""Transformer evaluations of all edits together: n steps per edit, M*m + n - m with the early filter."""
MAX_IMAGE_PIXELS = 16_000_000
"""Images a script opens: at most 16 megapixels each (the assistant edits at 512 pixels wide anyway)."""


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
    found = what_is(out_dir)
    if found not in ("folder", "missing"):
        raise UserError(f"{path_text(out_dir)}: {PATH_SAID.get(found, 'a file')}; --out must be a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        entries = sorted(out_dir.iterdir())
    except OSError as e:
        raise UserError(f"cannot create {out_dir}: {e.strerror}") from None
    for entry in entries:
        if leftover(entry):  # a run killed mid-write left a second name for an output it wrote
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry)
            continue
        found = what_is(entry, out_dir)
        if found == "file" or (found == "folder" and not OUTPUT_NAME.fullmatch(entry.name)):
            continue
        said = f"a link leading outside {out_dir}" if found == "outside" else PATH_SAID[found]
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
    """n steps, or M*m + n - m when M > 1 candidates run m early steps each (assistant/early_filter.py),
    for each self-check attempt it may take."""
    steps = turn.steps or settings.steps
    candidates = turn.candidates or settings.candidates
    early = turn.early_steps or settings.early_steps
    once = steps if candidates == 1 else candidates * early + steps - early
    return once * settings.attempts


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
    engine: Engine | None = None,
) -> Iterator[dict[str, Any]]:
    """Run each turn through the agent; yield one JSON-able row per turn after writing its PNG.

    Each turn commits on its own: an error or Ctrl+C in turn n keeps turns 1..n-1 and nothing of n but
    the steps or attempts of it that landed before (a plan's, the self-check's).
    """
    base = script_path.parent
    agent = Agent(store, session, settings, engine)
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
        except Stopped:
            raise
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
    if outcome.stopped:  # the steps or attempts that landed stay in the session; the replay stops
        raise Stopped(f"turn {n}: {outcome.stopped} (what landed before it is kept)", outcome.exit_code)
    turn = outcome.turn or (agent.current() if agent.history() else None)
    if outcome.result is not None:
        row |= {
            "seed": outcome.result.seed,
            "nfe": outcome.nfe,
            "random_weights": outcome.result.random_weights,
        }
        if outcome.planned:
            row["plan"] = outcome.planned
        if outcome.attempts:
            row["attempts"] = [a.model_dump() for a in outcome.attempts]
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
