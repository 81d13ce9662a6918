"""What an `icedit` command is built from, the built-in ones and a plugin's (`register_cli_commands`).

Every command goes the same way: `settings(...)` from the options and ICEDIT_* variables (checked by
the chosen engine), `prepare(...)` to check and fetch every artifact before anything loads, `emit(...)`
for --json. Option types refuse NUL bytes and NaN in one line. A `UserError` raised inside a command
is printed as `Error: ...` with its exit code, no traceback (the `icedit` group does that).
"""

from __future__ import annotations

import io
import json
import math
import sys
import types
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import click
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from assistant.errors import UserError
from assistant.files import kind_problem


class FiniteRange(click.FloatRange):
    """click's FloatRange lets NaN through (every comparison with NaN is false) and infinity where a side
    is open-ended; neither is a setting, so both are refused here, once, for every float option."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


class PathArg(click.Path):
    """click's Path stats the value and lets the ValueError of a NUL byte escape; that is one line here."""

    def __init__(self) -> None:
        super().__init__(path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return super().convert(value, param, ctx)
        except ValueError:
            raise UserError(kind_problem(value, "bad name")) from None


def option_type(kind: object) -> click.ParamType:
    """The click type of a sampling range (`assistant.models.Steps`, ...), with the same bounds."""
    from assistant.models import bounds

    low, high, low_open, high_open = bounds(kind)
    if get_args(kind)[0] is int:
        return click.IntRange(
            int(low) if math.isfinite(low) else None, int(high) if math.isfinite(high) else None
        )
    return FiniteRange(low, high, min_open=low_open, max_open=high_open)


option_pairs = click.option(
    "--option",
    multiple=True,
    metavar="KEY=VALUE",
    help="a plugin's own option, repeatable; NAME.KEY or KIND:NAME.KEY for one plugin (icedit plugins --json)",
)
"""`--option KEY=VALUE`: every command that builds plugins takes it (`settings(option=...)` reads it)."""


def flag(key: str, field: FieldInfo) -> Callable[[Callable], Callable]:
    """The click option of one options-model field: `--lora-scale` with the field's bounds, a Literal as a
    choice, a bool as `--x/--no-x`; unset, it passes None, so the model's default stays."""
    kind = field.annotation
    if get_origin(kind) in (Union, types.UnionType):
        kind = next(arg for arg in get_args(kind) if arg is not type(None))
    name = "--" + key.replace("_", "-")
    help, shown = field.description or "", field.get_default()
    if shown is not None and kind is not bool and "default" not in help:
        help += f" (default {shown:g})" if isinstance(shown, float) else f" (default {shown})"
    if kind is bool:
        return click.option(f"{name}/--no-{name[2:]}", key, default=None, help=help)
    if get_origin(kind) is Literal:
        return click.option(name, key, type=click.Choice([str(v) for v in get_args(kind)]), help=help)
    if kind in (int, float):
        return click.option(name, key, type=option_type(Annotated[kind, field]), help=help)
    return click.option(name, key, help=help)


def plugin_flags(kinds: Iterable[str] | None = None):
    """A decorator adding the flags of the built-in plugins' options of `kinds` (default: what an edit
    runs) (`--preset`, `--vlm`, ...), one per key however many plugins declare it; none for a name the
    command or the host settings already use. Third-party plugins' options stay `--option` keys."""

    def add(fn: Callable) -> Callable:
        from assistant.plugins import EDIT_KINDS, builtin_options
        from assistant.settings import Settings

        taken = set(Settings.model_fields) | {p.name for p in getattr(fn, "__click_params__", [])}
        chosen: dict[str, FieldInfo] = {}
        for model in builtin_options(tuple(kinds or EDIT_KINDS)):
            for key, field in model.model_fields.items():
                if key not in taken:
                    chosen.setdefault(key, field)
        for key in reversed(list(chosen)):
            fn = flag(key, chosen[key])(fn)
        return fn

    return add


def model_flags(model: type[BaseModel], only: Iterable[str]):
    """A decorator adding the flags of some fields of one options model (a plugin's command's own)."""

    def add(fn: Callable) -> Callable:
        for key in reversed(list(only)):
            fn = flag(key, model.model_fields[key])(fn)
        return fn

    return add


def fail(message: str, exit_code: int) -> click.ClickException:
    """click's `Error: message` with our exit code (2 bad input, 130 interrupted, 1 partly done)."""
    err = click.ClickException(message)
    err.exit_code = exit_code  # type: ignore[misc]  # click types it a ClassVar, yet reads it per instance
    return err


def emit(data: Any) -> None:
    """One JSON document on stdout (also under `-q`: it is what was asked for)."""
    click.echo(json.dumps(data, ensure_ascii=False), file=_held[0] if _held else None)


def host_settings(**overrides: Any):
    """Settings from ICEDIT_* and the options, checked by their own model only: commands that do not edit
    (sessions, undo, redo) load no plugin, so a bad engine setting or a missing library cannot stop them."""
    from pydantic import ValidationError

    from assistant.settings import Settings

    given = _key_values(overrides.pop("option", None) or ())
    try:
        found = Settings(**{k: v for k, v in overrides.items() if v is not None})
        return found.model_copy(update={"options": found.options | given}) if given else found
    except ValidationError as e:
        first = e.errors()[0]
        why = first["msg"].removeprefix("Value error, ")
        raise UserError(f"bad setting {'.'.join(map(str, first['loc']))}: {why}") from None


def _key_values(pairs: tuple[str, ...]) -> dict[str, str]:
    """`--option KEY=VALUE` pairs (the last one given for a key wins)."""
    found = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key.strip():
            raise UserError(f"--option {pair!r}: give it as KEY=VALUE (the keys: icedit plugins --json)")
        found[key.strip()] = value
    return found


def settings(**overrides: Any):
    """`host_settings`, then the chosen engine and the plugins' options are checked before any model loads."""
    from assistant import plugins

    settings = host_settings(**overrides)
    plugins.check_options(settings)
    plugins.call(
        "engines", settings.engine, "describe", settings
    )  # an unknown preset fails here, in one line
    return settings


def prepare(settings, extra=None, *, quiet: bool = False, **needs: Any):
    """Check (and fetch) every artifact the command will load before anything loads; choose the rewriter."""
    from assistant import plugins, preflight

    prepared = preflight.prepare(settings, extra, **needs)
    plugins.check_options(prepared.settings)  # the rewriter may be another one now (rules for a missing VLM)
    if not quiet:
        for note in prepared.notes:
            click.echo(f"note: {note}", err=True)
    return prepared


def options(model, **values: Any):
    """A pydantic options model from the given values (None = its default); a bad one is one line naming it."""
    from pydantic import ValidationError

    try:
        return model(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        raise UserError(f"bad option --{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None


# ------------------------------------------------------------------------------------------ how much is said

LIBRARY_LOGGERS = ("diffusers", "transformers", "huggingface_hub", "accelerate", "peft", "torchao")


class _Dropped(io.TextIOBase):
    """A text stream that keeps nothing; its `buffer` (binary data: `-o -`) and what it says of the
    terminal (`isatty`, `fileno`) are the real one's."""

    def __init__(self, real: Any):
        self.real = real
        self.buffer = getattr(real, "buffer", None)

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return len(text)

    def isatty(self) -> bool:
        return self.real.isatty()

    def fileno(self) -> int:
        return self.real.fileno()


@contextmanager
def _quiet() -> Iterator[None]:
    """Only errors: what the command says on stdout and stderr goes nowhere while it runs, except its
    data (JSON through `emit`, a picture to stdout). click prints the error after this has ended."""
    global _held
    if _held is not None:  # -q given twice (`icedit -q edit ... -q`): one is enough
        yield
        return
    _held = (sys.stdout, sys.stderr)
    sys.stdout, sys.stderr = _Dropped(sys.stdout), _Dropped(sys.stderr)
    try:
        yield
    finally:
        speak()


def speak() -> None:
    """End `-q` (also when parsing failed after it began, where click closes no context)."""
    global _held
    if _held is not None:
        sys.stdout, sys.stderr = _held
        _held = None


_held: tuple[Any, Any] | None = None
"""stdout and stderr while `-q` holds them."""


def _one_of(ctx: click.Context, which: str) -> None:
    ctx.meta[which] = True  # meta is shared by the root's context and the command's
    if {"-q", "-v"} <= ctx.meta.keys():
        speak()  # the error must be seen
        raise click.UsageError("give -q (only errors) or -v (the libraries' logs too), not both", ctx)


def _set_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        _one_of(ctx, "-q")
        ctx.with_resource(_quiet())


def _set_verbose(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """Library logs on stderr: the libraries' own INFO lines and warnings, which icedit keeps quiet."""
    if not value:
        return
    _one_of(ctx, "-v")
    import logging
    import os
    import warnings

    for name in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY", "HF_HUB_VERBOSITY"):
        os.environ[name] = "info"  # read when the library is first imported, which is later
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    warnings.simplefilter("default")


def add_verbosity(command: click.Command) -> click.Command:
    """`-q` (only errors) and `-v` (library logs) on a command, after its own options."""
    names = {n for p in command.params for n in getattr(p, "opts", ())}
    if "-q" not in names:
        command.params.append(
            click.Option(
                ["-q", "--quiet"], is_flag=True, expose_value=False, callback=_set_quiet, help="only errors"
            )
        )
    if "-v" not in names:
        command.params.append(
            click.Option(
                ["-v", "--verbose"],
                is_flag=True,
                expose_value=False,
                callback=_set_verbose,
                help="the libraries' logs too (diffusers, transformers, huggingface_hub, ...)",
            )
        )
    return command
