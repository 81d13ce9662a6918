"""`icedit train`, which the icedit plugin adds to the `icedit` command (`register_cli_commands`): it
trains this engine's adapter, so it lives with it. Its data options are `icedit eval`'s."""

from __future__ import annotations

from pathlib import Path

import click

from assistant import command_kit as kit
from assistant import plugins
from plugins.evaluation.command import with_data_options
from plugins.icedit.options import IceditOptions


@click.command("train", short_help="Fine-tune the ICEdit adapter on (source, target, instruction) data")
@with_data_options
@kit.model_flags(IceditOptions, ["preset", "model", "device"])
@click.option("--out", required=True, type=kit.PathArg(), help="folder for checkpoints and the adapter")
@click.option("--steps", type=click.IntRange(1), help="optimizer steps (default 1000)")
@click.option(
    "--adapter", type=click.Choice(["moe", "lora"]), help="moe: the LoRA-MoE (default); lora: the normal LoRA"
)
@click.option("--experts", type=click.IntRange(1, 64), help="LoRA-MoE experts (default 4)")
@click.option("--rank", type=click.IntRange(1, 1024), help="LoRA and expert rank (default 32)")
@click.option("--top-k", type=click.IntRange(1, 64), help="experts per token (default 1)")
@click.option(
    "--gate",
    type=click.Choice(["topk", "switch"]),
    help="router gate: topk (published; a top-1 router gets no gradient) or switch (learns)",
)
@click.option(
    "--balance-weight", type=kit.FiniteRange(0), help="switch gate: load-balancing loss weight (default 0.01)"
)
@click.option(
    "--loss-region",
    type=click.Choice(["full", "right"]),
    help="loss over the full diptych (default) or its right half",
)
@click.option(
    "--optimizer", type=click.Choice(["prodigy", "adamw"]), help="prodigy (default, as official) or adamw"
)
@click.option(
    "--lr",
    type=kit.FiniteRange(0, min_open=True),
    help="learning rate (default: 1 for prodigy, 1e-4 for adamw)",
)
@click.option("--weight-decay", type=kit.FiniteRange(0), help="weight decay (default 0.01)")
@click.option("--warmup-steps", type=click.IntRange(0), help="linear learning-rate warm-up (default 0)")
@click.option(
    "--max-grad-norm", type=kit.FiniteRange(0, min_open=True), help="gradient clipping (default 0.5)"
)
@click.option(
    "--adapter-dtype",
    type=click.Choice(["bfloat16", "float32"]),
    help="adapter weights' dtype (default bfloat16)",
)
@click.option(
    "--text-dropout", type=kit.FiniteRange(0, 1), help="chance a prompt is replaced by ' ' (default 0.1)"
)
@click.option(
    "--init",
    type=click.Choice(["gaussian", "uniform"]),
    help="LoRA A init: gaussian std 1/r (default) or uniform",
)
@click.option(
    "--latents", type=click.Choice(["sample", "mean"]), help="VAE latents: posterior sample (default) or mean"
)
@click.option(
    "--panels",
    type=click.Choice(["square", "keep-aspect"]),
    help="square: pictures stretched to square panels (default, as official); keep-aspect: the engine's",
)
@click.option(
    "--bottom-crop",
    type=kit.FiniteRange(0, 0.5, max_open=True),
    help="share of each picture's height cut off its bottom (default 1/32 for osunlp/MagicBrush, else 0)",
)
@click.option("--batch-size", type=click.IntRange(1), help="examples per process and step (default 1)")
@click.option("--grad-accum", type=click.IntRange(1), help="gradient accumulation steps (default 1)")
@click.option(
    "--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), help="default: bf16 on CUDA, else no"
)
@click.option(
    "--gradient-checkpointing", is_flag=True, default=None, help="recompute activations to save memory"
)
@click.option(
    "--panel-width",
    type=click.IntRange(16),
    help="diptych panel width, a multiple of 16 (default: the preset's, 512)",
)
@click.option(
    "--guidance", type=kit.FiniteRange(0, min_open=True), help="FLUX guidance embedding (default 1)"
)
@click.option("--checkpoint-every", type=click.IntRange(1), help="save_state every N steps (default 500)")
@click.option("--resume", help="continue from a checkpoint folder, or 'latest' under OUT/checkpoints")
@click.option("--json", "json_", is_flag=True, help="print the report as JSON")
def train_cmd(data, columns, preset, model, device, json_, **options) -> None:
    """Fine-tune the ICEdit LoRA-MoE (or normal LoRA) on (source, target, instruction) edits with the official
    recipe; many GPUs: `accelerate launch`."""
    from plugins.evaluation.data import parse_columns
    from plugins.icedit.train import TrainConfig, train

    settings = kit.settings(engine="icedit", preset=preset, model=model, device=device, lora="none")
    config = kit.options(TrainConfig, data=data, columns=parse_columns(columns), **options)
    kit.prepare(settings, rewriter=False, judge=False, plan=False)  # accelerate places each process
    report = train(config, plugins.options_for("engines", "icedit", settings))
    if report is None:  # not the main process
        return
    if json_:
        kit.emit(report.model_dump())
    else:
        click.echo(
            f"trained to step {report.steps} on {report.num_processes} process(es): "
            f"loss {report.loss_first:.4f} -> {report.loss_last:.4f}"
        )
        click.echo(f"adapter {report.adapter} (icedit edit IMAGE TEXT --lora {Path(report.adapter).parent})")
        click.echo(f"metrics {report.metrics}; checkpoints {', '.join(report.checkpoints) or 'none'}")
    if report.random_weights:
        click.echo(
            "note: the tiny preset has random weights: this checks the training loop, not quality", err=True
        )


def register(cli: click.Group) -> None:
    cli.add_command(train_cmd)
