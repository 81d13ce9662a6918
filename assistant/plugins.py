"""The plugin manager: built-in plugins and third-party entry points, registered the same way."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, Generic, Literal, TypeVar, overload

import pluggy
from pydantic import BaseModel, ValidationError

from assistant import hookspecs
from assistant.errors import UserError
from assistant.protocols import Engine, Judge, Rewriter, Scorer
from assistant.settings import Settings

Made = TypeVar("Made")

BUILTIN_PLUGINS = (
    "plugins.icedit",
    "plugins.kontext",
    "plugins.qwen_vl",
    "plugins.rules",
    "plugins.evaluation",
)
ENTRY_POINT_GROUP = "icedit_assistant"


@dataclass(frozen=True)
class _FactorySpec(Generic[Made]):
    """factory(settings) builds the plugin's object (an `assistant.protocols` type; importing the plugin
    must stay cheap, so import heavy libraries inside the factory). artifacts(settings), if given, names
    the model weights it will load (`assistant.hub.Artifact`), so the host checks and fetches them all
    before any loads; memory(settings), if given, the ways its models can be placed
    (`assistant.memory.Part`, whose placements set the plugin's option keys). With `options`, every
    one of them is called as `hook(settings, options)`."""

    name: str
    factory: Callable[..., Made]
    description: str = ""
    artifacts: Callable[..., list[Any]] | None = None
    memory: Callable[..., list[Any]] | None = None
    options: type[BaseModel] | None = None
    """The plugin's own options (a pydantic model), validated from the values given as `--option
    KEY=VALUE` (or `NAME.KEY`, `KIND:NAME.KEY`), `ICEDIT_KEY`, `ICEDIT_OPTIONS__KEY`, `ICEDIT_OPTIONS=
    '{"key": ...}'` or the config file (the built-ins' also as flags: `--preset`); `icedit plugins
    --json` shows its JSON schema. Its keys may not be the host's (`steps`, `engine`, ...)."""


@dataclass(frozen=True)
class EngineSpec(_FactorySpec[Engine]):
    """An engine (`protocols.Engine`, optionally `CandidateEngine`); weights load lazily, on the first edit.

    describe(settings), if given, says cheaply (no weights loaded) what the engine would run.
    """

    describe: Callable[..., dict[str, Any]] | None = None


class RewriterSpec(_FactorySpec[Rewriter]):
    """A rewriter (`protocols.Rewriter`: message -> EditPlan)."""


class JudgeSpec(_FactorySpec[Judge]):
    """A judge (`protocols.Judge`: which candidate follows the instruction)."""


@dataclass(frozen=True)
class ScorerSpec(_FactorySpec[Scorer]):
    """A scorer for `icedit eval` (`protocols.Scorer`: numbers per finished edit)."""

    default: bool = False
    """Run when `icedit eval` names no `--scorer` (its models are `--with-eval-models`)."""


@dataclass(frozen=True)
class CommandSpec:
    """A slash command for the chat: run(chat, argument_text) returns the text to show (or None).

    `chat` is `assistant.tui.commands.Chat`: the agent, the options for the next edits, the chat's
    commands and what the screen does for a command. The built-in commands are specs like these."""

    name: str
    run: Callable[..., Any]
    help: str = ""
    usage: str = ""
    """How /help shows it, e.g. `/seed N|random` (default: `/NAME`)."""
    needs_store: bool = True
    """Refused while an edit runs (the worker owns the session until it finishes); False for commands
    that only change the options of the next edits."""


OPTION_KINDS = ("engines", "rewriters", "judges", "scorers")
"""The kinds whose specs may declare options."""
EDIT_KINDS = ("engines", "rewriters", "judges")
"""The kinds an edit runs (and whose built-ins' options are the edit commands' flags)."""

REGISTRATION_HOOKS = {
    "engines": "register_engines",
    "rewriters": "register_rewriters",
    "judges": "register_judges",
    "scorers": "register_scorers",
    "chat_commands": "register_chat_commands",
}


def _manager(entry_points: bool) -> pluggy.PluginManager:
    """Specs first, then entry points (when asked), then the built-ins, then a spelling check."""
    pm = pluggy.PluginManager("icedit_assistant")
    pm.add_hookspecs(hookspecs)
    if entry_points:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    pm.check_pending()
    return pm


@cache
def get_plugin_manager() -> pluggy.PluginManager:
    """Every plugin: third-party entry points (skipped under tests) and the built-ins."""
    return _manager(entry_points=not getattr(sys, "_called_from_test", False))


def announce(session: str, turns: list, png: Callable[[str], bytes]) -> list[str]:
    """Call every `turn_finished` observer for each committed turn, each on its own, so one that raises
    stops neither the others nor the command; returns one line per failure. `png(sha256)` is read only
    for observers that take it."""
    problems = []
    for turn in turns:
        for impl in get_plugin_manager().hook.turn_finished.get_hookimpls():
            given = {"session": session, "turn": turn}
            if "png" in impl.argnames:
                given["png"] = png(turn.image_sha256)
            try:
                impl.function(**{k: v for k, v in given.items() if k in impl.argnames})
            except Exception as e:  # noqa: BLE001 - an observer's bug must not undo or hide a stored turn
                text = (str(e).strip().splitlines() or [""])[0]
                problems.append(
                    f"plugin {impl.plugin_name} failed observing turn {turn.id} "
                    f"({type(e).__name__}{': ' + text if text else ''})"
                )
    return problems


def registrations(kind: str, pm: pluggy.PluginManager | None = None) -> dict[str, tuple[str, Any]]:
    """{spec name: (plugin name, spec)} for one kind; a name registered twice is an error."""
    pm = pm or get_plugin_manager()
    found: dict[str, tuple[str, Any]] = {}
    for impl in getattr(pm.hook, REGISTRATION_HOOKS[kind]).get_hookimpls():

        def register(spec: Any, plugin: str = impl.plugin_name) -> None:
            declared = getattr(spec, "options", None)  # chat commands have none
            taken = set(declared.model_fields) & set(Settings.model_fields) if declared else set()
            if taken:
                raise UserError(
                    f"{kind[:-1]} '{spec.name}' of {plugin} declares the option '{sorted(taken)[0]}', which is "
                    "a host setting: the plugin must name it otherwise"
                )
            if spec.name in found:
                raise UserError(
                    f"{kind[:-1]} '{spec.name}' is registered by both {found[spec.name][0]} and {plugin}"
                )
            found[spec.name] = (plugin, spec)

        impl.function(register=register)
    return found


@overload
def get(kind: Literal["engines"], name: str) -> EngineSpec: ...
@overload
def get(kind: Literal["rewriters"], name: str) -> RewriterSpec: ...
@overload
def get(kind: Literal["judges"], name: str) -> JudgeSpec: ...
@overload
def get(kind: Literal["scorers"], name: str) -> ScorerSpec: ...
@overload
def get(kind: Literal["chat_commands"], name: str) -> CommandSpec: ...
def get(kind: str, name: str) -> Any:
    """The spec registered under name, or a one-line error listing what there is."""
    found = registrations(kind)
    if name not in found:
        known = ", ".join(sorted(found)) or "none"
        raise UserError(f"unknown {kind[:-1]} '{name}' (available: {known})")
    return found[name][1]


def call(kind: str, name: str, hook: str, settings: Settings) -> Any:
    """Spec `hook` (factory, artifacts, memory, describe) of plugin `name`: `hook(settings)`, or
    `hook(settings, options)` with its validated options when it declares some; None without the hook."""
    spec = get(kind, name)  # type: ignore[call-overload]  # kind is checked by get itself
    run = getattr(spec, hook)
    if run is None:
        return None
    return run(settings) if spec.options is None else run(settings, options_for(kind, name, settings))


def build(kind: str, name: str, settings: Settings) -> Any:
    """The plugin object `name` of `kind`, made by its factory (with its validated options, if it has any)."""
    return call(kind, name, "factory", settings)


def _used(settings: Settings) -> dict[str, str]:
    """{kind: name} of the plugins these settings would build."""
    from assistant.preflight import rewriter_name

    used = {"engines": settings.engine, "rewriters": rewriter_name(settings)}
    if settings.candidates > 1:  # the judge runs only with the early filter (as preflight counts it)
        used["judges"] = settings.judge
    return used


def _in_use(settings: Settings) -> dict[tuple[str, str], type[BaseModel]]:
    """{(kind, name): options model} of the registered plugins these settings would build."""
    models = {}
    for kind, name in _used(settings).items():
        spec = registrations(kind).get(name, (None, None))[1]  # an unknown name fails where it is used
        if spec is not None and spec.options is not None:
            models[(kind, name)] = spec.options
    return models


def _declared() -> dict[tuple[str, str], set[str]]:
    """{(kind, plugin name): the option keys it declares} over every registered spec that has options."""
    return {
        (kind, name): set(spec.options.model_fields)
        for kind in OPTION_KINDS
        for name, (_, spec) in registrations(kind).items()
        if spec.options is not None
    }


def _owners(kind: str, name: str) -> tuple[str, ...]:
    """How an option may name its plugin, least specific first: `KEY`, `NAME.KEY`, `KIND:NAME.KEY`
    (`judge:qwen_vl.vlm_device=cpu` reaches the judge and not the rewriter of the same name)."""
    return ("", name, f"{kind.removesuffix('s')}:{name}")


def _values(settings: Settings, kind: str, name: str, model: type[BaseModel]) -> dict[str, Any]:
    """The options given that plugin `name` of `kind` declares; a more specific one wins."""
    owners = _owners(kind, name)
    found = []
    for raw, value in settings.options.items():
        owner, _, key = raw.rpartition(".")
        if key in model.model_fields and owner in owners:
            found.append((owners.index(owner), key, value))
    return {key: value for _, key, value in sorted(found, key=lambda f: f[0])}


def _check_known(settings: Settings) -> None:
    """A key no installed plugin declares (or `NAME.KEY` that plugin NAME does not) is one line naming
    what each plugin in use takes; one that an installed plugin not in use declares waits for it
    (ICEDIT_VLM stays set while the rules rewriter runs)."""
    declared = _declared()
    for raw in settings.options:
        owner, _, key = raw.rpartition(".")
        if any(key in keys and owner in _owners(kind, name) for (kind, name), keys in declared.items()):
            continue
        models = _in_use(settings)
        known = "; ".join(
            f"{name} takes {', '.join(model.model_fields)}" for (_, name), model in models.items()
        )
        in_use = {name for _, name in models} | set(_used(settings).values())
        idle = f"{owner} is not in use here; " if owner and owner.rpartition(":")[2] not in in_use else ""
        raise UserError(f"unknown option '{raw}' ({idle}{known or 'the plugins in use take no options'})")


def options_for(kind: str, name: str, settings: Settings) -> BaseModel:
    """Plugin `name`'s options model, validated from what was given; a bad value is one line naming it."""
    model = get(kind, name).options  # type: ignore[call-overload]
    if model is None:
        raise UserError(f"{kind[:-1]} '{name}' takes no options")
    try:
        return model(**_values(settings, kind, name, model))
    except ValidationError as e:
        first = e.errors()[0]
        why = first["msg"].removeprefix("Value error, ")
        where = f"option {name}.{'.'.join(map(str, first['loc']))}" if first["loc"] else f"options of {name}"
        raise UserError(f"bad {where}: {why}") from None


def option(kind: str, name: str, key: str, settings: Settings) -> Any:
    """The value plugin `name` runs with for its option `key`; None when it declares no such option
    (the host reads a few conventional ones: an engine's `preset` and `device`)."""
    model = get(kind, name).options  # type: ignore[call-overload]
    if model is None or key not in model.model_fields:
        return None
    return getattr(options_for(kind, name, settings), key)


def check_options(settings: Settings) -> None:
    """Refuse unknown option keys, and validate the options of every plugin in use, so a wrong one fails
    before anything loads."""
    _check_known(settings)
    for kind, name in _in_use(settings):
        options_for(kind, name, settings)


@cache
def _builtins_only() -> pluggy.PluginManager:
    return _manager(entry_points=False)


def builtin_options(kinds: tuple[str, ...] = OPTION_KINDS) -> list[type[BaseModel]]:
    """The options models of the built-in plugins of `kinds`, in registration order, without loading any
    third-party plugin: the CLI builds its familiar flags (`--preset`, `--vlm`) from them."""
    pm = _builtins_only()
    found: list[type[BaseModel]] = []
    for kind in kinds:
        for _, spec in registrations(kind, pm).values():
            if spec.options is not None and spec.options not in found:
                found.append(spec.options)
    return found


def describe(settings: Any = None) -> list[dict[str, Any]]:
    """Every plugin and what it registers, for `icedit plugins`; engines say what they would run."""
    pm = get_plugin_manager()
    rows: dict[str, dict[str, Any]] = {
        name: {"name": name, **{k: [] for k in REGISTRATION_HOOKS}} for name, _ in pm.list_name_plugin()
    }
    for kind in REGISTRATION_HOOKS:
        for spec_name, (plugin, spec) in registrations(kind, pm).items():
            rows[plugin][kind].append(spec_name)
            if getattr(spec, "options", None) is not None:
                rows[plugin].setdefault("options", {})[spec_name] = spec.options.model_json_schema()
            if kind == "engines" and settings is not None and spec.describe is not None:
                try:
                    described = call(kind, spec_name, "describe", settings)
                except UserError as e:  # these settings are another engine's (--preset moe): say so, go on
                    described = {"error": str(e)}
                rows[plugin].setdefault("engine_settings", {})[spec_name] = described
    for name, module in pm.list_name_plugin():
        rows[name]["hooks"] = sorted(h.name for h in pm.get_hookcallers(module) or [])
    return sorted(rows.values(), key=lambda r: r["name"])
