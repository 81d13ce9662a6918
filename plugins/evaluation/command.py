"""`icedit eval`, which the evaluation plugin adds to the `icedit` command, and the dataset options it
shares with `icedit train`."""

from __future__ import annotations

from pathlib import Path

import click

from assistant import command_kit as kit
from assistant.models import Guidance, Steps

data_options = [
    click.option(
        "--data", required=True, help="folder (metadata.jsonl: source, target, instruction) or hub dataset id"
    ),
    click.option(
        "--columns", help="map our columns to the dataset's: source=source_img,target=target_img,..."
    ),
    click.option("--split", help="dataset split (default train)"),
    click.option("--limit", type=click.IntRange(1), help="use the first N examples only"),
    click.option("--seed", type=click.IntRange(0, 2**32 - 1), help="seed (default 0)"),
]


def with_data_options(fn):
    for option in reversed(data_options):
        fn = option(fn)
    return fn


@click.command("eval", short_help="Edit a dataset with any engine and score the edits")
@with_data_options
@click.option("--out", type=kit.PathArg(), help="folder for edits, metrics and sheet (default icedit-eval)")
@click.option("--steps", type=kit.option_type(Steps), help="denoising steps (default 28)")
@click.option("--guidance", type=kit.option_type(Guidance), help="guidance (default 50)")
@click.option("--batch-size", type=click.IntRange(1), help="examples per scoring round (default 8)")
@click.option(
    "--scorer",
    "scorers",
    multiple=True,
    metavar="NAME",
    help="a scorer, repeatable: magicbrush (default), qwen_vl (VIEScore ratings), a plugin's (icedit plugins)",
)
@click.option("--engine", help="engine plugin (see `icedit plugins`)")
@kit.plugin_flags(kinds=["engines"])
@kit.plugin_flags(kinds=["scorers"])
@kit.option_pairs
@click.option("--json", "json_", is_flag=True, help="print the report (means and per example) as JSON")
def eval_cmd(
    data, columns, split, limit, seed, out, steps, guidance, batch_size, scorers, json_, **options
) -> None:
    """Edit every example of a dataset with any engine and score the edits (MagicBrush, Emu Edit, VIEScore)."""
    from plugins.evaluation.data import parse_columns
    from plugins.evaluation.run import EvalConfig, evaluate, scorer_names

    settings = kit.settings(**options)
    config = kit.options(
        EvalConfig,
        data=data,
        columns=parse_columns(columns),
        split=split,
        limit=limit,
        seed=seed,
        out=out,
        steps=steps,
        guidance=guidance,
        batch_size=batch_size,
        scorers=list(scorers),
    )
    settings = kit.prepare(settings, rewriter=False, judge=False, scorers=scorer_names(config)).settings
    report = evaluate(config, settings)
    if report is None:  # not the main process
        return
    if json_:
        kit.emit(report.model_dump())
    else:
        click.echo(Path(report.table).read_text(), nl=False)
        click.echo(f"wrote {report.report}, {report.table}, {report.sheet} and {report.count} edits")
    if report.random_weights:
        click.echo(
            "note: random weights (tiny preset): the numbers check the pipeline, not editing quality",
            err=True,
        )
