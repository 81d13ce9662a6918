"""What an `icedit` command is built from, the built-in ones and a plugin's (`register_cli_commands`).

Every command goes the same way: `settings(...)` from the options and ICEDIT_* variables (checked by
the chosen engine), `prepare(...)` to check and fetch every artifact before anything loads, `emit(...)`
for --json. Option types refuse NUL bytes and NaN in one line. A `UserError` raised inside a command
is printed as `Error: ...` with its exit code, no traceback (the `icedit` group does that).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, get_args

import click

from assistant.errors import UserError
from assistant.files import kind_problem

OFFLOAD_MODES = ["none", "encoders", "model", "sequential"]


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
        return click.IntRange(int(low), int(high))
    return FiniteRange(low, high, min_open=low_open, max_open=high_open)


def fail(message: str, exit_code: int) -> click.ClickException:
    """click's `Error: message` with our exit code (2 bad input, 130 interrupted, 1 partly done)."""
    err = click.ClickException(message)
    err.exit_code = exit_code  # type: ignore[misc]  # click types it a ClassVar, yet reads it per instance
    return err


def emit(data: Any) -> None:
    click.echo(json.dumps(data, ensure_ascii=False))


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
    spec = plugins.get("engines", settings.engine)
    if spec.describe is not None:
        spec.describe(settings)  # an unknown preset fails here, in one line
    plugins.check_options(settings)
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
