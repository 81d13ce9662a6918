"""Slash commands: one table of `CommandSpec`s, the built-ins here and the plugins' beside them.

Plugins add commands through `register_chat_commands`; every command, built-in or not, runs as
`spec.run(chat, argument_text) -> text to show` with the `Chat` below: the agent (its session, store
and settings), the options for the next edits, the table itself, and the few things only the screen
can do (`ChatView`). The screen redraws from the store after each command.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from assistant.agent import Agent
from assistant.errors import UserError
from assistant.models import AttemptCount, CandidateCount, Guidance, Seed, Steps, bounds, int_bounds
from assistant.plugins import CommandSpec
from assistant.preflight import checks, require_on_disk
from assistant.protocols import AdapterScaling
from assistant.text import file_name
from sessions.history import History


class ChatView(Protocol):
    """What a command asks of the chat screen."""

    def retry(self) -> None:
        """Run the current edit again with a new seed, in the edit worker."""

    def switch_session(self, name: str) -> None:
        """Continue (or start) session `name`: its transcript, tree and picture."""

    def quit(self) -> None: ...


@dataclass
class ChatOptions:
    """Settings the person changed in the chat; None means the settings' default."""

    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    variations: int = 1
    candidates: int | None = None
    attempts: int | None = None
    accept: float | None = None
    check: bool | None = None


@dataclass
class Chat:
    """What a slash command sees of the chat."""

    agent: Agent
    options: ChatOptions = field(default_factory=ChatOptions)
    commands: dict[str, CommandSpec] = field(default_factory=dict)
    """Every command of this chat by name: the built-ins, then the plugins' (which cannot replace one)."""
    view: ChatView | None = None
    """The chat screen (None outside one, as in a plugin's own tests: what needs it says so)."""

    def screen(self, command: str) -> ChatView:
        if self.view is None:
            raise UserError(f"/{command} needs the chat screen")
        return self.view


def whole_number(text: str, usage: str, low: int, high: int) -> int:
    """`text` as an int in [low, high], or a one-line error quoting the usage."""
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"usage: {usage} (a whole number from {low} to {high})") from None
    if not low <= value <= high:
        raise UserError(f"usage: {usage} (a whole number from {low} to {high}; got {value})")
    return value


def history_text(history: History) -> str:
    """The tree as indented lines, as `icedit sessions show` prints it (without the image ids)."""
    return "\n".join(history.tree_lines())


def _path(argument: str, usage: str) -> tuple[Path, bool]:
    """`PATH [--force]`: the path and whether to replace a file already there."""
    if not argument:
        raise UserError(f"usage: {usage}")
    force = argument.endswith(" --force")
    return Path(argument.removesuffix(" --force").strip()).expanduser(), force


def _undo(chat: Chat, argument: str) -> str:
    turn = chat.agent.move("undo", "/undo")
    return f"undo: back at turn #{turn.id} ({turn.label})"


def _redo(chat: Chat, argument: str) -> str:
    turn = chat.agent.move("redo", "/redo")
    return f"redo: forward to turn #{turn.id} ({turn.label})"


def _retry(chat: Chat, argument: str) -> None:
    chat.screen("retry").retry()


def _seed(chat: Chat, argument: str) -> str:
    if argument.lower() in ("", "random"):
        chat.options.seed = None
        return "a random seed for each edit"
    chat.options.seed = whole_number(argument, "/seed N|random", *int_bounds(Seed))
    return f"seed {chat.options.seed} for the next edits"


def _steps(chat: Chat, argument: str) -> str:
    chat.options.steps = whole_number(argument, "/steps N", *int_bounds(Steps))
    return f"{chat.options.steps} steps for the next edits"


def _number(text: str, usage: str, low: float, high: float) -> float:
    """`text` as a finite number in [low, high], or a one-line error quoting the usage."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not low <= value <= high:  # NaN fails too
        raise UserError(f"usage: {usage} (a number from {low:g} to {high:g})")
    return value


def _guidance(chat: Chat, argument: str) -> str:
    low, high, _, _ = bounds(Guidance)
    value = _number(argument, "/guidance G", low, high)
    if value == low:  # the bound is open: guidance must be above it
        raise UserError(f"usage: /guidance G (a number above {low:g}, at most {high:g})")
    chat.options.guidance = value
    return f"guidance {value:g} for the next edits"


def _lora_scale(chat: Chat, argument: str) -> str:
    """The adapter's strength: set on the loaded pipeline when the engine can, else on the next load."""
    value = _number(argument, "/lora-scale S", 0, 4)
    agent = chat.agent
    agent.settings = agent.settings.with_options(lora_scale=value)
    engine = agent.loaded_engine
    if isinstance(engine, AdapterScaling):
        engine.set_adapter_scale(value)
        return f"adapter scale {value:g} for the next edits"
    agent.drop_engine()
    return f"adapter scale {value:g} for the next edits (the engine loads again for the next edit)"


def _variations(chat: Chat, argument: str) -> str:
    n = whole_number(argument, "/variations N", 1, 16)
    chat.options.variations = n
    return (
        "one picture per edit"
        if n == 1
        else f"{n} finished pictures per edit (seeds S..S+{n - 1}): click one, or /branch N, to go on from it"
    )


def _candidates(chat: Chat, argument: str) -> str:
    n = whole_number(argument, "/candidates N", *int_bounds(CandidateCount))
    if n > 1:  # the judge's weights must be here already
        settings = chat.agent.settings.model_copy(update={"candidates": n})
        require_on_disk(settings, engine=False, rewriter=False, judge=True)
    chat.options.candidates = n
    return (
        "early filter off: one noise per edit" if n == 1 else f"{n} candidates per edit; the judge keeps one"
    )


def self_check(chat: Chat) -> str:
    """The self-check as the next edits will run it, in a few words (the status line, the commands)."""
    settings = chat.agent.settings
    attempts = chat.options.attempts or settings.attempts
    accept = settings.accept if chat.options.accept is None else chat.options.accept
    if not checks(settings, chat.options.attempts, chat.options.check):
        return "check off"
    return f"check ≥ {accept:g}" + (f", {attempts} attempts" if attempts > 1 else "")


def _judge_ready(chat: Chat) -> None:
    """The judge's weights must be here already: a chat downloads nothing mid-conversation."""
    require_on_disk(chat.agent.settings, engine=False, rewriter=False, judge=True)


def _attempts(chat: Chat, argument: str) -> str:
    n = whole_number(argument, "/attempts N", *int_bounds(AttemptCount))
    if n > 1:
        _judge_ready(chat)
    chat.options.attempts = n
    if n > 1 and chat.options.check is False:
        chat.options.check = None  # asking for attempts asks for the verdicts they need
    return (
        f"{self_check(chat)}: below the bar, the next seed runs"
        if n > 1
        else f"one attempt per edit ({self_check(chat)})"
    )


def _accept(chat: Chat, argument: str) -> str:
    try:
        value = float(argument)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise UserError("usage: /accept P (the judge's P(yes) an edit needs, from 0 to 1)")
    chat.options.accept = value
    return f"{self_check(chat)} for the next edits"


def _check(chat: Chat, argument: str) -> str:
    if argument.lower() not in ("on", "off"):
        raise UserError(f"usage: /check on|off (now {self_check(chat)})")
    if argument.lower() == "on":
        _judge_ready(chat)
    chat.options.check = argument.lower() == "on"
    return f"{self_check(chat)} for the next edits"


def _open(chat: Chat, argument: str) -> str:
    from assistant.images import load_source

    if not argument:
        raise UserError("usage: /open PATH")
    path = Path(argument).expanduser()
    image = load_source(path)
    turn = chat.agent.open(image, f"open {file_name(path)}")
    return f"opened {path} ({image.width}x{image.height}) as turn #{turn.id}"


def _save(chat: Chat, argument: str) -> str:
    from assistant.files import save_image
    from sessions.identity import decode_png

    path, force = _path(argument, "/save PATH [--force]")
    turn = chat.agent.current()
    save_image(decode_png(chat.agent.store.image(turn.image_sha256)), path, force)
    return f"wrote {path} (turn #{turn.id})"


def _history(chat: Chat, argument: str) -> str:
    history = chat.agent.history()
    return "no turns yet" if history is None else history_text(history)


def _branch(chat: Chat, argument: str) -> str:
    turn_id = whole_number(argument, "/branch N", 1, 2**63 - 1)
    turn = chat.agent.jump(turn_id, f"/branch {turn_id}")
    return f"at turn #{turn.id} ({turn.label}); an edit from here starts a branch"


def _session(chat: Chat, argument: str) -> None:
    if not argument:
        raise UserError("usage: /session NAME")
    chat.screen("session").switch_session(argument)


def _sheet(chat: Chat, argument: str) -> str:
    from sessions.sheet import damaged_note, write_sheet

    path, force = _path(argument, "/sheet PATH [--force]")
    sheet = write_sheet(chat.agent.store, chat.agent.session, path, force)
    damaged = sheet.info.get("damaged")
    return f"wrote {path} ({sheet.width}x{sheet.height})" + (f"; {damaged_note(damaged)}" if damaged else "")


def _help(chat: Chat, argument: str) -> str:
    rows = [f"{spec.usage or '/' + spec.name:<16} {spec.help}" for spec in chat.commands.values()]
    keys = (
        "keys: Escape cancels an edit · Ctrl+Z undo · Ctrl+Y redo · Ctrl+T tree · Ctrl+B before/after · "
        "Ctrl+P every command · Up/Down earlier lines"
    )
    return "\n".join(
        [*rows, keys, "anything else is a request for the picture, e.g. make it look like winter"]
    )


def _quit(chat: Chat, argument: str) -> None:
    chat.screen("quit").quit()


BUILTINS: dict[str, CommandSpec] = {
    spec.name: spec
    for spec in [
        CommandSpec("undo", _undo, "back to the previous image (nothing is deleted)", "/undo"),
        CommandSpec("redo", _redo, "forward again, to the newest edit made from here", "/redo"),
        CommandSpec("retry", _retry, "the same edit again with a new seed", "/retry"),
        CommandSpec(
            "seed",
            _seed,
            "noise seed for the next edits (default: random)",
            "/seed N|random",
            needs_store=False,
        ),
        CommandSpec("steps", _steps, "denoising steps for the next edits", "/steps N", needs_store=False),
        CommandSpec(
            "guidance",
            _guidance,
            "guidance for the next edits (default 50)",
            "/guidance G",
            needs_store=False,
        ),
        CommandSpec(
            "lora-scale",
            _lora_scale,
            "the adapter's strength for the next edits (1 as trained)",
            "/lora-scale S",
        ),  # needs_store: not while an edit runs on the adapter
        CommandSpec(
            "variations",
            _variations,
            "finished pictures per edit, each a turn to pick from (1 = one)",
            "/variations N",
            needs_store=False,
        ),
        CommandSpec(
            "candidates",
            _candidates,
            "early filter: noises tried per edit, the judge keeps one",
            "/candidates N",
            needs_store=False,
        ),
        CommandSpec(
            "attempts",
            _attempts,
            "self-check: seeds tried per edit until the judge passes one (1 = no retries)",
            "/attempts N",
            needs_store=False,
        ),
        CommandSpec(
            "accept",
            _accept,
            "self-check: the judge's P(yes) an edit needs to pass (default 0.5)",
            "/accept P",
            needs_store=False,
        ),
        CommandSpec(
            "check",
            _check,
            "self-check each edit (its score is shown), or not",
            "/check on|off",
            needs_store=False,
        ),
        CommandSpec("open", _open, "open an image (the next edit starts from it)", "/open PATH"),
        CommandSpec(
            "save",
            _save,
            "write the current image to PATH (.png, .jpg, .webp, ...); --force replaces a file",
            "/save PATH [--force]",
        ),
        CommandSpec("history", _history, "the session's turns as a tree; * marks where you are", "/history"),
        CommandSpec("branch", _branch, "jump to turn N; an edit from there starts a branch", "/branch N"),
        CommandSpec(
            "session", _session, "switch to session NAME (a new name starts a new one)", "/session NAME"
        ),
        CommandSpec(
            "sheet",
            _sheet,
            "write a contact sheet of the session (a PNG of every turn)",
            "/sheet PATH [--force]",
        ),
        CommandSpec("help", _help, "this list", "/help", needs_store=False),
        CommandSpec(
            "quit",
            _quit,
            "leave (the session is kept: icedit chat --session NAME)",
            "/quit",
            needs_store=False,
        ),
    ]
}
