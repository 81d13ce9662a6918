"""The `icedit` command. Heavy libraries (torch, diffusers) load inside the commands that need them."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from assistant import command_kit as kit
from assistant.errors import Stopped, UserError
from assistant.models import AttemptCount, CandidateCount, EarlySteps, Guidance, Probability, Seed, Steps
from assistant.text import printable

RANDOM_WEIGHTS_NOTE = "note: the tiny preset has random weights: its pictures are noise, not edits"


class _Group(click.Group):
    """Turns our one-line errors into click's `Error: ...` and their exit code; no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            if e.ctx is None or isinstance(e, click.exceptions.NoArgsIsHelpError):
                raise
            raise kit.fail(f"{e.format_message()} (see `{e.ctx.command_path} --help`)", 2) from None
        except UserError as e:
            raise kit.fail(
                printable(str(e), lines=True), e.exit_code
            ) from None  # a path in it may hold controls
        except KeyboardInterrupt:
            raise kit.fail("interrupted: nothing was saved", 130) from None
        finally:
            _Progress.end()
            kit.speak()  # the error, if any, is printed after this


def _session_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--session given: a valid name, checked before anything runs (an empty one would store nothing)."""
    from assistant.text import check_name

    return None if value is None else check_name(value)


def _store(settings=None):
    """The session store of `settings` (default: the host settings alone)."""
    from sessions.store import Store

    return Store((settings or kit.host_settings()).store_path)


@contextmanager
def _cancel_on_sigint() -> Iterator[threading.Event]:
    """First Ctrl+C asks the engine to stop between steps; a second one interrupts at once."""
    cancel = threading.Event()

    def handler(signum, frame):
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        click.echo("\nstopping after this step (Ctrl+C again to stop now)...", err=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield cancel
    finally:
        signal.signal(signal.SIGINT, previous)


class _Progress:
    """One self-overwriting status line on a terminal's stderr; `end` closes it before other output."""

    open = False

    @classmethod
    def show(cls, event) -> None:
        """A step on the status line; a plan, a landed step and a self-check verdict as lines of their own."""
        if event.kind in ("plan", "landed", "checked"):
            from assistant.agent import progress_line

            cls.end()
            click.echo(progress_line(event), err=True)
        elif sys.stderr.isatty() and event.kind == "step":
            text = f"{event.phase}..." if event.i == 0 else f"{event.phase} step {event.i}/{event.n}"
            click.echo(f"\r{text:<30}", err=True, nl=False)
            cls.open = True

    @classmethod
    def end(cls) -> None:
        if cls.open:
            click.echo(err=True)
            cls.open = False


HELP_SECTIONS: list[tuple[str, tuple[str, ...]]] = [
    (
        "Everyday",
        ("output", "output_dir", "quality", "force", "variations", "seed", "steps", "guidance", "lora_scale",
         "session", "json_"),
    ),
    (
        "The agent",
        ("rewriter", "attempts", "accept", "check", "candidates", "early_steps", "judge", "save_candidates",
         "native_size"),
    ),
    (
        "Model",
        ("engine", "preset", "model", "revision", "lora", "lora_revision", "lora_weight_name", "top_k", "option"),
    ),
    ("Memory and speed", ("device", "dtype", "quantize", "offload", "compile", "gpu_memory")),
    (
        "VLM (rewriter and judge)",
        ("vlm", "vlm_revision", "vlm_device", "vlm_dtype", "attn_implementation", "min_pixels", "max_pixels",
         "vlm_max_new_tokens", "vlm_grammar"),
    ),
]  # fmt: skip
"""How `--help` groups a command's options, everyday ones first; the rest follow under "Options"."""


class _Command(click.Command):
    """A command whose help groups its options (HELP_SECTIONS) and which takes -q and -v."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        kit.add_verbosity(self)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        records = {p.name: r for p in self.get_params(ctx) if (r := p.get_help_record(ctx))}
        placed: set[str | None] = set()
        for title, names in HELP_SECTIONS:
            if shown := [records[n] for n in names if n in records]:
                with formatter.section(title):
                    formatter.write_dl(shown)
            placed.update(names)
        if rest := [r for n, r in records.items() if n not in placed]:
            with formatter.section("Options"):
                formatter.write_dl(rest)


_Group.command_class = _Command


class _Root(_Group):
    """The `icedit` group: plugins' commands (`register_cli_commands`) join it only when a command is not
    a built-in one or help lists them all, so `icedit sessions list` loads no plugin at all."""

    _plugins_added = False
    _builtins: dict[str, click.Command] = {}

    def _add_plugin_commands(self) -> None:
        if self._plugins_added:
            return
        self._plugins_added = True
        from assistant.plugins import get_plugin_manager

        builtins, owners = dict(self.commands), dict[str, str]()
        self._builtins = builtins
        for impl in get_plugin_manager().hook.register_cli_commands.get_hookimpls():
            before = dict(self.commands)
            try:
                impl.function(cli=self)
            except Exception as e:  # noqa: BLE001 - one plugin's bug must not take the other commands down
                click.echo(
                    f"warning: plugin {impl.plugin_name} failed adding its commands ({type(e).__name__}: "
                    f"{printable(str(e))})",
                    err=True,
                )
            for name, command in list(self.commands.items()):
                if before.get(name) is command:
                    continue
                kit.add_verbosity(command)
                if name in builtins:
                    click.echo(
                        f"warning: a plugin's command '{name}' is ignored: icedit has its own", err=True
                    )
                    self.commands[name] = builtins[name]
                elif name in owners:
                    click.echo(
                        f"warning: plugin {impl.plugin_name}'s command '{name}' is ignored: plugin "
                        f"{owners[name]} adds one by that name",
                        err=True,
                    )
                    self.commands[name] = before[name]
                else:
                    owners[name] = impl.plugin_name

    def forget_plugin_commands(self) -> None:
        """Drop the plugins' commands; the next lookup asks the plugins again (`assistant.testing`)."""
        if self._plugins_added:
            self.commands = dict(self._builtins)
            self._plugins_added = False

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands:
            self._add_plugin_commands()
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._add_plugin_commands()
        return super().list_commands(ctx)


@click.group(cls=_Root, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="icedit-assistant")
def cli() -> None:
    """icedit: edit images by telling it what you want.

    Shell completion: eval "$(_ICEDIT_COMPLETE=bash_source icedit)" in ~/.bashrc (zsh_source, fish_source
    for the others)."""


kit.add_verbosity(cli)


class _Registered(click.Option):
    """An option naming a plugin's engine, rewriter or judge; its help lists those installed (asked only
    when help is shown: listing them loads the plugins)."""

    def __init__(self, *args: Any, kind: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kind = kind

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        from assistant.plugins import registrations

        record = super().get_help_record(ctx)
        if record is None:
            return None
        try:
            names = ", ".join(sorted(registrations(self.kind)))
        except UserError:
            return record
        return record[0], f"{record[1]}; installed: {names}"


host_options = [
    click.option("--engine", cls=_Registered, kind="engines", help="engine plugin (default icedit)"),
    click.option(
        "--rewriter",
        cls=_Registered,
        kind="rewriters",
        help="default qwen_vl with real weights, rules with random ones",
    ),
    click.option(
        "--candidates",
        type=kit.option_type(CandidateCount),
        help="early filter: noises to try (default 1 = off)",
    ),
    click.option(
        "--early-steps",
        type=kit.option_type(EarlySteps),
        help="early filter: steps before judging (default 4)",
    ),
    click.option(
        "--judge",
        cls=_Registered,
        kind="judges",
        help="judge plugin for the early filter and the self-check (default qwen_vl)",
    ),
    click.option(
        "--attempts",
        type=kit.option_type(AttemptCount),
        help="self-check: seeds to try per edit until the judge passes one (default 1; more turns the check on)",
    ),
    click.option(
        "--accept",
        type=kit.option_type(Probability),
        help="self-check: the judge's P(yes) an edit needs to pass (default 0.5)",
    ),
    click.option(
        "--check/--no-check",
        default=None,
        help="self-check every edit, also a single attempt (reports its score)",
    ),
    kit.option_pairs,
]


def with_engine_options(fn):
    """The host's flags, then one per option of the built-in plugins (`--preset`, `--lora`, `--vlm`, ...)."""
    fn = kit.plugin_flags()(fn)
    for option in reversed(host_options):
        fn = option(fn)
    return fn


output_options = [
    click.option(
        "-o",
        "--output",
        type=kit.PathArg(),
        help="the file to write: .png, .jpg or .webp; - for a PNG on stdout",
    ),
    click.option(
        "--output-dir",
        type=kit.PathArg(),
        help="folder for the default names (STEM-SEED-HASH.png), made if missing",
    ),
    click.option(
        "--quality",
        type=click.IntRange(1, 100),
        help="JPEG and WebP quality (default 95; WebP 100 is lossless)",
    ),
    click.option("--force", is_flag=True, help="let -o replace a file that is already there"),
]


def with_output_options(fn):
    for option in reversed(output_options):
        fn = option(fn)
    return fn


def _log_session(settings) -> str | None:
    """The session an edit made without --session is kept in: one per day (`edits-YYYY-MM-DD`, local
    date), as llm logs every prompt; None when the log is off (`log = false`)."""
    import datetime

    return f"edits-{datetime.date.today().isoformat()}" if settings.log else None


@cli.command(short_help="Edit images as an instruction says")
@click.argument("images", nargs=-1, type=kit.PathArg(), metavar="IMAGE...")
@click.argument("instruction")
@with_output_options
@click.option(
    "-n",
    "--variations",
    type=click.IntRange(1, 16),
    default=1,
    help="paint N finished pictures, seeds S..S+N-1 batched, each a sibling turn and a file",
)
@click.option(
    "--session",
    callback=_session_name,
    help="add the edit to this named session (default: today's edits-DATE)",
)
@click.option("--seed", type=kit.option_type(Seed), help="noise seed (default: random, printed)")
@click.option("--steps", type=kit.option_type(Steps), help="denoising steps (default 28)")
@click.option("--guidance", type=kit.option_type(Guidance), help="guidance (default 50)")
@click.option(
    "--native-size",
    is_flag=True,
    help="keep the size the engine works at (icedit: the 512-wide panel) instead of the source's",
)
@click.option("--save-candidates", type=kit.PathArg(), help="folder for the early filter's previews")
@with_engine_options
@click.option("--json", "json_", is_flag=True, help="print the result as JSON (one line per image)")
def edit(
    images,
    instruction,
    output,
    output_dir,
    quality,
    force,
    variations,
    session,
    seed,
    steps,
    guidance,
    native_size,
    save_candidates,
    json_,
    **options,
) -> None:
    """Edit each IMAGE as INSTRUCTION says, e.g. icedit edit cat.png "make it look like winter".

    Several images are edited one after another with one pipeline load; under `accelerate launch`
    (or torchrun) each process takes its share of them."""
    from assistant.agent import Agent
    from assistant.images import load_source
    from assistant.preflight import check_variations, checks
    from assistant.text import check_message, file_name, path_text
    from sessions.store import Store

    if not images:  # one word given: click took it for the instruction
        raise click.UsageError(
            f'give a picture and what to change: icedit edit {printable(instruction)} "add snow"'
        )
    settings = kit.settings(**options)
    check_message(instruction)
    if output is not None and (len(images) > 1 or variations > 1):
        raise UserError(
            "-o names one file: for several pictures give --output-dir, or neither (default names)"
        )
    _check_outputs(output, output_dir, images[0], force, quality, json_)
    check_variations(variations, settings.candidates, checks(settings))
    sources = [load_source(image) for image in images]  # every path checked before any weights load
    mine, settings = _my_share(len(images), settings)
    settings = kit.prepare(settings).settings
    session = session or _log_session(settings)
    store = _store(settings) if session else Store(":memory:")
    agent = Agent(store, session or "edit", settings)
    for done, k in enumerate(mine):
        if len(images) > 1:
            _Progress.end()
            click.echo(f"image {k + 1} of {len(images)}: {path_text(images[k])}", err=True)
        try:
            with _cancel_on_sigint() as cancel:
                outcome = agent.turn(
                    instruction,
                    source=(sources[k], f"open {file_name(images[k])}"),
                    seed=seed,
                    steps=steps,
                    guidance=guidance,
                    native_size=native_size,
                    variations=variations,
                    events=_Progress.show,
                    cancel=cancel,
                )
        except UserError as e:
            if not done:
                raise
            raise Stopped(
                f"image {k + 1} of {len(images)} ({path_text(images[k])}): {e} (the {done} before it are "
                "written)",
                e.exit_code,
            ) from None
        _report(
            outcome,
            agent,
            store,
            output=output,
            output_dir=output_dir,
            quality=quality,
            stem=images[k].stem,
            force=force,
            session=session,
            save_candidates=save_candidates,
            json_=json_,
        )


def _my_share(n: int, settings):
    """(the inputs this process edits, its settings). Under `accelerate launch` or torchrun (WORLD_SIZE
    > 1) accelerate splits them, as `icedit eval` splits examples, and each process runs on its device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return list(range(n)), settings
    import torch
    from accelerate import PartialState

    from assistant import plugins

    asked = plugins.option("engines", settings.engine, "device", settings)
    state = PartialState(cpu=asked == "cpu" or not torch.accelerator.is_available())
    with state.split_between_processes(list(range(n))) as mine:
        return list(mine), settings.with_options(device=str(state.device))


def _report(
    outcome,
    agent,
    store,
    *,
    output: Path | None,
    output_dir: Path | None,
    quality: int | None,
    stem: str,
    force: bool,
    session: str | None,
    save_candidates: Path | None = None,
    json_: bool = False,
) -> None:
    """Write an edit's pictures (to `output` or free default names) and say what the turn did."""
    from assistant import outputs
    from assistant.agent import describe
    from assistant.files import in_the_way
    from assistant.text import path_text
    from sessions.identity import sha256

    to_stdout = output == outputs.STDOUT
    painted = [] if outcome.result is None else (outcome.variations or [outcome])  # undo/answer: none
    written: list[tuple[Path, bytes]] = []
    for one in painted:
        turn = one.turn
        picture, facts = store.picture(turn.image_sha256), outputs.provenance(turn)
        for _ in range(8):  # a default name another process took meanwhile: the next free one
            path = output or outputs.default_name(output_dir, stem, one.result.seed, one.plan.instruction)
            try:
                written.append(
                    (path, outputs.write_picture(path, picture, facts, quality=quality, force=force))
                )
                break
            except UserError as e:
                if output is None and in_the_way(path):
                    continue
                kept = f" (the edit is kept as turn {turn.id} of session {session})" if session else ""
                raise UserError(f"{e}{kept}") from None
        else:
            raise UserError(f"no free name for turn {turn.id}'s picture: other processes take them; give -o")
    if save_candidates and outcome.result is not None and outcome.result.candidates:
        _save_candidates(save_candidates, outcome.result.candidates)
    if json_:
        said = describe(outcome, session=session, output=str(written[0][0]) if written else None)
        for variation, (path, _) in zip(said.get("variations", []), written, strict=False):
            variation["output"] = str(path)
        kit.emit(said)
    else:
        click.echo(outcome.reply, err=to_stdout)
        for one, (path, data) in zip(painted, written, strict=True):
            click.echo(
                f"wrote {'a PNG to stdout' if to_stdout else path_text(path)}  (seed {one.result.seed}, "
                f"{one.result.image.size[0]}x{one.result.image.size[1]}, sha256 {sha256(data)[:12]})",
                err=to_stdout,
            )
    if outcome.result is not None and outcome.result.random_weights:
        click.echo(RANDOM_WEIGHTS_NOTE, err=True)
    _fallback_note(outcome.rewriter)
    for note in outcome.notes:
        click.echo(f"note: {printable(note)}", err=True)
    _warn(agent.problems)
    if outcome.stopped:  # what landed is written (and kept in the session); the command still failed
        kept = "what landed before it is kept" if session else "only the last picture that landed is written"
        raise Stopped(f"stopped at {outcome.stopped} ({kept})", outcome.exit_code)


@cli.command(short_help="Paint a session's current edit again with another seed")
@click.argument("name", callback=_session_name)
@with_output_options
@click.option("--seed", type=kit.option_type(Seed), help="noise seed (default: the retried turn's seed + 1)")
@with_engine_options
@click.option("--json", "json_", is_flag=True, help="print the result as JSON")
def retry(name, output, output_dir, quality, force, seed, json_, **options) -> None:
    """Paint session NAME's current edit again with another seed, as a sibling turn (like /retry)."""
    from assistant.agent import Agent

    settings = kit.settings(**options)
    _check_outputs(output, output_dir, None, force, quality, json_)
    store = _store(settings)
    agent = Agent(store, name, settings)
    given = {k: options[k] for k in ("candidates", "early_steps") if options.get(k) is not None}
    candidates = given.get("candidates") or agent.current().params.get("candidates") or settings.candidates
    settings = kit.prepare(settings, judge=candidates > 1).settings  # the judge the retried turn needs
    agent.settings = settings
    with _cancel_on_sigint() as cancel:
        outcome = agent.retry(
            f"icedit retry{'' if seed is None else f' --seed {seed}'}",
            seed=seed,
            events=_Progress.show,
            cancel=cancel,
            **given,
        )
    _report(
        outcome,
        agent,
        store,
        output=output,
        output_dir=output_dir,
        quality=quality,
        stem=name,
        force=force,
        session=name,
        json_=json_,
    )


def _warn(problems: list[str]) -> None:
    """Observers that failed: one stderr line each; what was stored and written stands (exit 0)."""
    for problem in problems:
        click.echo(f"warning: {printable(problem)}", err=True)


def _check_outputs(
    output: Path | None,
    folder: Path | None,
    source: Path | None,
    force: bool,
    quality: int | None,
    json_: bool,
) -> None:
    """The output flags, checked before the edit runs (and is kept): one line for what cannot be."""
    from assistant import outputs

    if output is not None and folder is not None:
        raise UserError("give -o (one file) or --output-dir (a folder for default names), not both")
    if output == outputs.STDOUT and json_:
        raise UserError("-o - and --json both write to stdout: give -o a file name")
    outputs.check_target(output, source, force, quality)
    outputs.check_folder(folder)


def _save_candidates(folder: Path, candidates) -> None:
    """The early filter's previews, each under a name no file holds yet."""
    from assistant.files import save_image
    from assistant.outputs import free_name

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {folder}: {e.strerror or e}") from None
    for c in candidates:
        save_image(c.preview, free_name(folder / f"candidate-{c.seed}.png"))


def _fallback_note(rewriter: str) -> None:
    """Say on stderr when the chosen rewriter handed the message to another ("qwen_vl -> rules (why)")."""
    if " -> " in rewriter:
        click.echo(f"note: rewriter {rewriter}", err=True)


@cli.command(short_help="Show the plan a rewriter makes of a request")
@click.argument("image", type=kit.PathArg())
@click.argument("request")
@click.option("--rewriter", help="qwen_vl (default), rules, verbatim or another registered one")
@kit.plugin_flags(kinds=["rewriters"])
@kit.option_pairs
@click.option("--json", "json_", is_flag=True, help="print the plan as JSON")
def rewrite(image, request, rewriter, json_, **options) -> None:
    """Show the plan a rewriter makes of REQUEST for IMAGE; nothing is edited or stored."""
    from assistant import plugins
    from assistant.images import load_source
    from assistant.text import check_message

    settings = kit.settings(rewriter=rewriter, **options)
    message = check_message(request)
    source = load_source(image)
    settings = kit.prepare(settings, engine=False, judge=False).settings
    plan = plugins.build("rewriters", settings.rewriter, settings).rewrite(source, message, [])
    label = settings.rewriter + (f" -> {plan.fallback}" if plan.fallback else "")
    if json_:
        kit.emit(plan.model_dump() | {"rewriter": label})
    else:
        click.echo(
            f"{plan.intent}: {plan.instruction}" if plan.instruction else f"{plan.intent}: {plan.rationale}"
        )
        for i, step in enumerate(plan.then, 2):
            click.echo(f"then {i}: {step}")
        if plan.ic_prompt:
            click.echo(f"IC prompt: {plan.ic_prompt}")
        click.echo(f"why: {plan.rationale}")
    _fallback_note(label)


@cli.group(cls=_Group, short_help="List, show, search, export, import and manage sessions")
def sessions() -> None:
    """List, show, search, export, import, rename and delete stored sessions; get a turn's picture; gc."""


@sessions.command("list", short_help="Every session, most recent first")
@click.option("--json", "json_", is_flag=True)
def sessions_list(json_) -> None:
    """Every session in the store, most recent first."""
    with _store() as store:
        rows = store.sessions()
    if json_:
        kit.emit([r.model_dump() for r in rows])
        return
    if not rows:
        click.echo("no sessions yet (icedit edit IMAGE TEXT --session NAME starts one)")
    for r in rows:
        click.echo(f"{printable(r.name)}\t{r.turns} turns\tcursor {r.cursor}\tupdated {r.updated}")


@sessions.command("show", short_help="A session's turns as a tree")
@click.argument("name")
@click.option("--json", "json_", is_flag=True)
def sessions_show(name, json_) -> None:
    """A session's turns as a tree; * marks the cursor. Past 40 levels the indent stops and the depth shows."""
    with _store() as store:
        history = store.history(name)
    if json_:
        kit.emit(
            {
                "name": history.name,
                "cursor": history.cursor,
                "turns": [
                    {
                        "id": t.id,
                        "parent": t.parent,
                        "kind": t.kind,
                        "message": t.message,
                        "instruction": (t.plan or {}).get("instruction"),
                        "seed": t.seed,
                        "steps": t.params.get("steps"),
                        "image_sha256": t.image_sha256,
                        "created": t.created,
                    }
                    for t in history.turns
                ],
            }
        )
        return
    for line in history.tree_lines(images=True):
        click.echo(line)


@sessions.command("export", short_help="Write a session as a replay script or an archive")
@click.argument("name")
@click.argument("script", type=kit.PathArg())
@click.option("--force", is_flag=True, help="replace files that are already there")
def sessions_export(name, script, force) -> None:
    """Write NAME as a replay script (TOML, plus the opened images beside it), or whole as an archive (.zip)."""
    from sessions.archive import export_archive
    from sessions.export import LeftOut, export_script
    from sessions.history import numbered

    with _store() as store:
        if script.suffix.lower() == ".zip":
            archived, damaged = export_archive(store, name, script, force)
            images = {t.image_sha256 for t in archived.turns if t.n not in damaged}
            click.echo(f"wrote {script} (session {name}: {len(archived.turns)} turns, {len(images)} images)")
            if damaged:  # the rest is saved; exit 1 so a script notices the archive is not whole
                their = "their images are" if len(damaged) > 1 else "its image is"
                click.echo(
                    f"warning: {numbered(damaged)}: {their} damaged in the store and not in the archive "
                    "(icedit sessions import --partial restores the rest)",
                    err=True,
                )
                click.get_current_context().exit(1)
            return
        try:
            written, left_out = export_script(store, name, script, force), None
        except LeftOut as e:
            written, left_out = e.written, e
    click.echo(f"wrote {script} and {len(written) - 1} image(s) beside it")
    if left_out:  # the rest is written; exit 1 so a script notices the export is not whole
        click.echo(f"warning: {left_out}", err=True)
        click.get_current_context().exit(1)


@sessions.command("import", short_help="Restore a session from an archive")
@click.argument("archive", type=kit.PathArg())
@click.option("--as", "name", help="import under this name (default: the name in the archive)")
@click.option(
    "--partial",
    is_flag=True,
    help="restore what can be when images are missing or damaged (their turns and the edits below them "
    "are left out); --json then lists them as dropped",
)
@click.option("--json", "json_", is_flag=True)
def sessions_import(archive, name, partial, json_) -> None:
    """Add the session in ARCHIVE (a .zip from `icedit sessions export NAME FILE.zip`) to the store."""
    from assistant.plugins import announce
    from sessions.archive import import_archive
    from sessions.history import numbered

    with _store() as store:
        history, damaged, dropped = import_archive(store, archive, name, partial)
        problems = announce(history.name, history.turns, store.image)
    if json_:
        kit.emit(
            {
                "session": history.name,
                "turns": len(history.turns),
                "cursor": history.cursor,
                "archive": str(archive),
            }
            | ({"dropped": dropped} if partial else {})
        )
    else:
        click.echo(
            f"imported session {history.name} ({len(history.turns)} turns, cursor at #{history.cursor}) "
            f"from {archive}"
        )
    if dropped:
        images = "image of" if len(damaged) == 1 else "images of"
        click.echo(
            f"warning: {numbered(dropped)} of the archive not restored: the {images} {numbered(damaged)} "
            f"{'is' if len(damaged) == 1 else 'are'} missing or damaged, and an edit needs the picture it was "
            "made from",
            err=True,
        )
    _warn(problems)


@sessions.command("sheet", short_help="A contact sheet of a session's pictures")
@click.argument("name")
@click.argument("output", type=kit.PathArg())
@click.option("--force", is_flag=True, help="replace OUTPUT if it is already there")
def sessions_sheet(name, output, force) -> None:
    """Write a contact sheet of NAME: every turn's image with its message, one row per branch.

    A tree too big for one picture shows the cursor's path. Damaged images are drawn as grey boxes,
    named in a warning, and the exit code is 1.
    """
    from sessions.sheet import damaged_note, write_sheet

    with _store() as store:
        sheet = write_sheet(store, name, output, force)
    click.echo(f"wrote {output} ({sheet.width}x{sheet.height})")
    if sheet.info["damaged"]:
        click.echo(f"warning: {damaged_note(sheet.info['damaged'])}", err=True)
        click.get_current_context().exit(1)


@sessions.command("rm", short_help="Delete sessions")
@click.argument("names", metavar="NAME...", nargs=-1, required=True)
@click.option("--yes", is_flag=True, help="delete without asking (needed when stdin is not a terminal)")
def sessions_rm(names, yes) -> None:
    """Delete sessions NAME... with their turns and chat lines, all in one go or none.

    Their pictures stay in the store until `icedit sessions gc`, also those no other turn shows.
    """
    names = tuple(dict.fromkeys(names))
    with _store() as store:
        what = ", ".join(f"{printable(i.name)} ({i.turns} turns)" for i in map(store.info, names))
        what = f"session {what}" if len(names) == 1 else f"sessions {what}"
        if not yes:
            if not sys.stdin.isatty():
                raise UserError(f"{what} not deleted: stdin is not a terminal to ask on; pass --yes")
            kit.speak()  # a question asked under -q must be seen
            if not click.confirm(f"delete {what}?"):
                click.echo("nothing deleted")
                click.get_current_context().exit(1)
        deleted = store.delete_sessions(names)
    for name, turns in deleted.items():
        click.echo(
            f"deleted session {printable(name)} ({turns} turns); icedit sessions gc frees their images"
        )


@sessions.command("rename", short_help="Rename a session")
@click.argument("old")
@click.argument("new")
def sessions_rename(old, new) -> None:
    """Rename session OLD to NEW (a name no session has)."""
    with _store() as store:
        store.rename(old, new)
    click.echo(f"renamed session {printable(old)} to {printable(new)}")


def _turn_id(ctx: click.Context, param: click.Parameter, value: str) -> int | None:
    """TURN: a turn id, or `cursor` (None) for the cursor's turn."""
    if value == "cursor":
        return None
    if not value.isascii() or not value.isdigit():
        raise click.BadParameter(
            f"{value!r}: give a turn id (icedit sessions show NAME lists them) or cursor"
        )
    return int(value)


@sessions.command("get", short_help="Write one turn's picture to a file")
@click.argument("name")
@click.argument("turn", callback=_turn_id)
@click.option(
    "-o",
    "--output",
    required=True,
    type=kit.PathArg(),
    help="FILE.png, .jpg or .webp, or - for a PNG on stdout",
)
@click.option(
    "--quality", type=click.IntRange(1, 100), help="JPEG and WebP quality (default 95; WebP 100 is lossless)"
)
@click.option("--force", is_flag=True, help="replace FILE if it is already there")
def sessions_get(name, turn, output, quality, force) -> None:
    """Write the picture of turn TURN (an id, or cursor) of session NAME, with how it was made inside."""
    from assistant import outputs
    from assistant.text import path_text

    outputs.check_target(output, None, force, quality)
    with _store() as store:
        history = store.history(name)
        shown = history.cursor_turn() if turn is None else history.turn(turn)
        picture = store.picture(shown.image_sha256)
    outputs.write_picture(output, picture, outputs.provenance(shown), quality=quality, force=force)
    to_stdout = output == outputs.STDOUT
    click.echo(
        f"wrote {'a PNG to stdout' if to_stdout else path_text(output)} (session {printable(name)} turn "
        f"{shown.id}, {picture.width}x{picture.height})",
        err=to_stdout,
    )


@sessions.command("search", short_help="Find turns by their message or instruction")
@click.argument("text")
@click.option(
    "-n", "limit", type=click.IntRange(min=1), default=20, show_default=True, help="at most this many turns"
)
@click.option("--json", "json_", is_flag=True)
def sessions_search(text, limit, json_) -> None:
    """Turns of every session whose message or instruction contains TEXT (any case), newest first."""
    with _store() as store:
        found = store.search(text, limit)
    if json_:
        kit.emit([f.model_dump() for f in found])
        return
    if not found:
        click.echo(f"no turn's message or instruction contains '{printable(text)}'")
    for f in found:
        instruction = "" if f.instruction is None else f"  ({printable(f.instruction)})"
        click.echo(f"{printable(f.session)} #{f.turn}  {printable(f.message)}{instruction}")


@cli.command("log", short_help="Every edit, newest first; search them")
@click.argument("query", required=False, default="")
@click.option(
    "-n", "limit", type=click.IntRange(min=1), default=20, show_default=True, help="at most this many edits"
)
@click.option("--json", "json_", is_flag=True, help="one JSON array")
def log_cmd(query, limit, json_) -> None:
    """Every edit, newest first, also those made without --session (kept in edits-DATE); QUERY searches
    their messages and instructions. `icedit sessions get SESSION TURN -o FILE` gets one's picture."""
    with _store() as store:
        found = store.search(query, limit, edits_only=True)
    if json_:
        kit.emit([f.model_dump() for f in found])
        return
    if not found:
        click.echo(
            f"no edit's message or instruction contains '{printable(query)}'" if query else "no edits yet"
        )
    for f in found:
        said = f"  ({printable(f.message)})" if f.message != f.instruction else ""
        click.echo(
            f"{f.created[:16].replace('T', ' ')}  {printable(f.session)} #{f.turn}  seed {f.seed}  "
            f"{printable(f.instruction or '')}{said}"
        )


@sessions.command("gc", short_help="Free the pictures no turn shows; shrink the store")
@click.option("--json", "json_", is_flag=True)
def sessions_gc(json_) -> None:
    """Delete the pictures no turn shows (left by `icedit sessions rm`) and shrink the store file."""
    from assistant.text import path_text

    with _store() as store:
        freed = store.collect_garbage()
    if json_:
        kit.emit(freed.model_dump())
        return
    click.echo(
        f"freed {freed.images} images, {freed.bytes_freed} bytes (store {path_text(store.path)}: "
        f"{freed.before} -> {freed.after})"
    )
    if not freed.shrunk:
        click.echo(
            "note: another icedit is reading the store, so the file could not shrink now: run "
            "icedit sessions gc again when it is done",
            err=True,
        )


def _move(name: str, intent: str, json_: bool) -> None:
    from assistant.agent import Agent

    settings = kit.host_settings()
    with _store(settings) as store:
        turn = Agent(store, name, settings).move(intent)
    if json_:
        kit.emit(
            {"session": name, "cursor": turn.id, "message": turn.message, "image_sha256": turn.image_sha256}
        )
    else:
        click.echo(f"{name}: cursor at #{turn.id} ({turn.label})")


@cli.command(short_help="Move a session's cursor to the parent turn")
@click.argument("name")
@click.option("--json", "json_", is_flag=True)
def undo(name, json_) -> None:
    """Move session NAME's cursor to the parent turn."""
    _move(name, "undo", json_)


@cli.command(short_help="Move a session's cursor to its newest child turn")
@click.argument("name")
@click.option("--json", "json_", is_flag=True)
def redo(name, json_) -> None:
    """Move session NAME's cursor to its newest child turn."""
    _move(name, "redo", json_)


@cli.command(short_help="Run replay scripts headless")
@click.argument("script", type=kit.PathArg())
@click.option("--out", "out_dir", required=True, type=kit.PathArg(), help="folder for the PNGs")
@click.option("--session", callback=_session_name, help="also keep the run as this named session")
@click.option("--allow-outside", is_flag=True, help="let a script you trust read images outside its folder")
@with_engine_options
@click.option("--json", "json_", is_flag=True, help="one JSON line per turn")
def replay(script, out_dir, session, allow_outside, json_, **options) -> None:
    """Run a replay script (TOML) headless; the same script gives the same images.

    SCRIPT may be a folder: each *.toml in it runs, into OUT/<its name>/ (and session NAME-<its name>),
    with one pipeline load for the scripts that share their settings; under `accelerate launch` (or
    torchrun) each process runs its share of them."""
    from assistant import plugins
    from assistant.replay import run_script
    from assistant.text import path_text
    from sessions.scripts import load_script
    from sessions.store import Store

    folder = script.is_dir()
    scripts = sorted(script.glob("*.toml")) if folder else [script]
    if not scripts:
        raise UserError(f"{script}: no replay scripts (*.toml) in the folder")
    parsed = [load_script(s) for s in scripts]  # every script checked before any runs
    given = {k: v for k, v in options.items() if v is not None}
    mine, shared = _my_share(len(scripts), kit.host_settings())
    device = (
        {"device": shared.options["device"]} if "device" in shared.options and "device" not in given else {}
    )
    engines: dict[str, Any] = {}
    random_weights = False
    for k in mine:
        settings = kit.settings(**(parsed[k].settings() | device | given))
        settings = kit.prepare(settings, judge=parsed[k].needs_judge() or None).settings
        key = json.dumps([settings.engine, settings.options], sort_keys=True, default=str)
        if key not in engines:  # one engine (and its loaded pipeline) at a time
            engines = {key: plugins.build("engines", settings.engine, settings)}
        name = f"{session}-{scripts[k].stem}" if session and folder else session
        store = _store(settings) if name else Store(":memory:")
        if folder and not json_:
            click.echo(f"script {k + 1} of {len(scripts)}: {path_text(scripts[k])}", err=True)
        with _cancel_on_sigint() as cancel:
            for row in run_script(
                parsed[k],
                scripts[k],
                out_dir / scripts[k].stem if folder else out_dir,
                store,
                name or "replay",
                settings,
                cancel,
                allow_outside,
                _Progress.show,
                engines[key],
            ):
                _Progress.end()
                random_weights |= bool(row.get("random_weights"))
                if json_:
                    kit.emit({"script": str(scripts[k])} | row if folder else row)
                else:
                    click.echo(f"{row['turn']:>3} {row['intent']:<6} {row['output']}  {row['reply']}")
                _warn(row.get("warnings", []))
    if random_weights:
        click.echo(RANDOM_WEIGHTS_NOTE, err=True)


@cli.command("plugins", short_help="Installed plugins and what they register")
@with_engine_options
@click.option("--json", "json_", is_flag=True)
def plugins_cmd(json_, **options) -> None:
    """Installed plugins, what each registers, and what the engines would run with these options."""
    from assistant.plugins import describe

    rows = describe(kit.settings(**options))
    if json_:
        kit.emit(rows)
        return
    for row in rows:
        parts = [
            f"{kind}: {', '.join(row[kind])}"
            for kind in ("engines", "rewriters", "judges", "scorers", "chat_commands")
            if row[kind]
        ]
        click.echo(f"{row['name']}\t{'; '.join(parts) or 'hooks: ' + ', '.join(row['hooks'])}")
        for engine, info in row.get("engine_settings", {}).items():
            click.echo(f"  {engine}: " + ", ".join(f"{k} {v}" for k, v in info.items()))


def _model_rows(settings, with_vlm: bool, with_eval: bool) -> list[tuple[list[str], Any]]:
    """[(what needs it, artifact)] for `models` and `download`, one row per artifact."""
    from assistant import plugins
    from assistant.preflight import needs

    groups = [("edit", needs(settings, rewriter=False, judge=False))]
    if with_vlm:
        groups += [
            ("rewriter", needs(settings, engine=False, judge=False)),
            ("early filter", needs(settings, engine=False, rewriter=False, judge=True)),
        ]
    if with_eval:  # the default scorers of icedit eval
        defaults = [name for name, (_, spec) in plugins.registrations("scorers").items() if spec.default]
        groups.append(("eval", needs(settings, engine=False, rewriter=False, judge=False, scorers=defaults)))
    rows: dict[tuple, tuple[list[str], Any]] = {}
    for purpose, found in groups:
        for a in found:
            key = (a.ref, a.revision, a.layout, a.filename)
            rows.setdefault(key, ([], a.model_copy(update={"required": True, "fallback": None})))[0].append(
                purpose
            )
    return list(rows.values())


def _models_report(rows, remote: bool) -> dict[str, Any]:
    from assistant import hub

    statuses = [(purposes, hub.status(a, remote=remote)) for purposes, a in rows]
    return {
        "cache": str(hub.cache_folder()),
        "offline_mode": hub.offline_mode(),
        "artifacts": [
            {
                "for": purposes,
                "role": s.artifact.role,
                "ref": s.artifact.ref,
                "revision": s.artifact.revision,
                "option": s.artifact.option,
                **s.model_dump(exclude={"artifact"}),
            }
            for purposes, s in statuses
        ],
    }


def _print_models(report: dict[str, Any]) -> None:
    from assistant.hub import gib

    mode = "offline mode: HF_HUB_OFFLINE is set" if report["offline_mode"] else "HF_HUB_OFFLINE not set"
    click.echo(f"Hugging Face cache: {report['cache']} ({mode})")
    for row in report["artifacts"]:
        state = "cached" if row["cached"] else "missing"
        facts = [state, f"{gib(row['size_on_disk'])} on disk"]
        if row["commit"]:
            facts.append(f"revision {row['commit'][:12]}")
        if row["to_download"]:
            facts.append(f"{gib(row['to_download'])} to download")
        if row["gated"]:
            facts.append(
                "gated, "
                + {True: "access granted", False: "no access", None: "access unknown"}[row["access"]]
            )
        name = row["ref"] + (f"@{row['revision']}" if row["revision"] else "")
        click.echo(f"{row['role']} ({', '.join(row['for'])}): {name}: {', '.join(facts)}")
        if row["problem"]:
            click.echo(f"  {row['problem']}" + (f"; {row['fix']}" if row["fix"] else ""))
        elif not row["cached"]:
            click.echo(f"  get it: icedit download (or {row['download_command']})")
    if report.get("plan"):
        click.echo(f"memory plan: {report['plan']['explain']}")
        for note in report["plan"]["notes"]:
            click.echo(f"  {note}")


@cli.command(short_help="The weights these options need, and the memory plan")
@with_engine_options
@click.option(
    "--gpu-memory", type=kit.FiniteRange(1, 4096), help="plan for a GPU of this many GiB (default: this one)"
)
@click.option("--json", "json_", is_flag=True, help="print the report as JSON")
def models(gpu_memory, json_, **options) -> None:
    """The model weights these options need: cached or not, sizes, access, how to download; the memory plan."""
    from assistant import hub
    from assistant.preflight import memory_plan

    settings = kit.settings(**options)
    report = _models_report(
        _model_rows(settings, with_vlm=True, with_eval=True), remote=not hub.offline_mode()
    )
    plan = memory_plan(settings, gpu_memory, judge=True)
    report["plan"] = plan.model_dump(mode="json") | {"explain": plan.explain()}
    if json_:
        kit.emit(report)
    else:
        _print_models(report)


@cli.command(short_help="Fetch the weights these options need")
@with_engine_options
@click.option("--with-vlm", is_flag=True, help="also the Qwen2.5-VL (rewriter and judge)")
@click.option("--with-eval-models", is_flag=True, help="also the models of icedit eval's default scorers")
@click.option("--json", "json_", is_flag=True, help="print what `icedit models` then says, as JSON")
def download(with_vlm, with_eval_models, json_, **options) -> None:
    """Fetch exactly the files the pipeline loads (free space checked first, interrupted downloads resumed)."""
    from assistant import hub

    settings = kit.settings(**options)
    rows = _model_rows(settings, with_vlm=with_vlm, with_eval=with_eval_models)
    hub.preflight([a for _, a in rows])
    report = _models_report(rows, remote=False)
    if json_:
        kit.emit(report)
    else:
        _print_models(report)


@cli.group(cls=_Group, short_help="Where the config file is, what it sets, set a key")
def config() -> None:
    """The config file: TOML, the same keys as the ICEDIT_* variables in lower case, a table per plugin.
    A flag beats a variable, which beats the file."""


@config.command("path", short_help="The config file's path")
def config_path_cmd() -> None:
    """The config file's path ($ICEDIT_CONFIG, else config.toml in the user's config folder)."""
    from assistant.settings import config_path
    from assistant.text import path_text

    click.echo(path_text(config_path()))


@config.command("show", short_help="Every setting and where its value comes from")
@click.option("--json", "json_", is_flag=True)
def config_show(json_) -> None:
    """Every setting commands run with (flags aside) and where it comes from: an ICEDIT_* variable, the
    config file or the default."""
    from assistant.settings import ENV_PREFIX, config_path, read_config
    from assistant.text import path_text

    path = config_path()
    in_file = read_config(path)
    settings = kit.host_settings()
    shown = settings.model_dump(mode="json", exclude={"options"}) | settings.options

    def source(key: str) -> str:
        plain = key.rpartition(".")[2]
        for variable in (ENV_PREFIX + plain.upper(), f"{ENV_PREFIX}OPTIONS__{plain.upper()}"):
            if variable in os.environ:
                return variable
        table, _, name = key.rpartition(".")
        held = in_file.get(table, {}) if table else in_file
        return "config file" if name in held or name in in_file.get("options", {}) else "default"

    rows = {key: {"value": value, "from": source(key)} for key, value in shown.items()}
    if json_:
        kit.emit({"path": str(path), "exists": path.is_file(), "settings": rows})
        return
    click.echo(
        f"# {path_text(path)}" + ("" if path.is_file() else " (not there yet: icedit config set KEY VALUE)")
    )
    for key, row in rows.items():
        click.echo(f"{key} = {json.dumps(row['value'], ensure_ascii=False)}  # {row['from']}")


@config.command("set", short_help="Set one key in the config file")
@click.argument("key")
@click.argument("value")
def config_set(key, value) -> None:
    """Set KEY (a setting, a plugin option, or TABLE.KEY for one plugin's) to VALUE in the config file,
    its comments and other lines kept. The file is checked whole before it is written."""
    import tempfile

    from assistant.config_file import parse_value, with_value
    from assistant.files import write_file
    from assistant.settings import CONFIG_VARIABLE, config_path
    from assistant.text import path_text

    path = config_path()
    try:
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path}: {getattr(e, 'strerror', None) or e}") from None
    new = with_value(text, key, parse_value(value))
    with tempfile.TemporaryDirectory() as scratch:  # the settings as they would be, before the file changes
        trial = Path(scratch) / "config.toml"
        trial.write_text(new, encoding="utf-8")
        before = os.environ.get(CONFIG_VARIABLE)
        os.environ[CONFIG_VARIABLE] = str(trial)
        try:
            kit.settings()
        except UserError as e:
            raise UserError(
                f"{key} = {value}: {str(e).replace(str(trial), str(path))}; the file is unchanged"
            ) from None
        finally:
            if before is None:
                os.environ.pop(CONFIG_VARIABLE)
            else:
                os.environ[CONFIG_VARIABLE] = before
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {path.parent}: {e.strerror or e}") from None
    write_file(Path(os.path.realpath(path)), new.encode(), force=True)  # a linked config stays linked
    click.echo(f"{path_text(path)}: {key} = {json.dumps(parse_value(value), ensure_ascii=False)}")


@cli.command(short_help="Chat about an image in a terminal app")
@click.argument("image", required=False, type=kit.PathArg())
@click.option(
    "--session", callback=_session_name, help="session to continue or start (default: a new chat-<timestamp>)"
)
@with_engine_options
def chat(image, session, **options) -> None:
    """Chat about IMAGE (optional; /open PATH later) in a terminal app; the session is kept."""
    from assistant.images import load_source
    from assistant.tui.app import make_app

    settings = kit.settings(**options)
    if image is not None:
        load_source(image)  # a bad path is one line before any weights are looked for
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UserError(
            "icedit chat needs a terminal (its input or output is a pipe or a file): run it in a "
            "terminal; scripts use icedit edit or icedit replay"
        )
    prepared = kit.prepare(settings, quiet=True)
    app = make_app(
        prepared.settings,
        session=session,
        image=image,
        notes=prepared.notes,
        memory=prepared.plan.explain() if prepared.plan else None,
    )
    app.run()
    if app.store.exists(app.session):
        click.echo(f"session {app.session} is kept: icedit chat --session {app.session}")
    app.store.close()


def main() -> None:
    """The `icedit` command. Under torchrun / `accelerate launch` (WORLD_SIZE > 1) each process
    leaves at once when its command is done, output flushed, instead of through Python's shutdown:
    gloo's worker threads outlive the process group (libraries keep references to it), and one
    that still frees a tensor then needs the GIL; Python ends such a thread, which aborts the whole
    process (SIGABRT) and fails the launch."""
    try:
        cli(prog_name="icedit")
    except SystemExit as done:
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            raise
        code = done.code or 0
        if not isinstance(code, int):  # a message: Python would print it and exit 1
            print(code, file=sys.stderr)
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
