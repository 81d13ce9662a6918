"""`icedit eval`: run any engine over a dataset of edits and score the results with the chosen scorers
(`--scorer`, from the registry: `magicbrush` by default, `vie` from the qwen_vl plugin, or a plugin's).

Under `accelerate launch` / `torchrun` every process edits its share of the examples
(`split_between_processes`) and the main process gathers the results and writes them: `metrics.json`
(means and per example), `metrics.md` (the table), `sheet.png` (the first rows as a contact sheet).
Each process writes its edits to `edits/` itself, so several nodes need a shared output folder.
Example i is edited with seed `seed + i`, whatever the number of processes.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field

from assistant import plugins
from assistant.errors import UserError
from assistant.files import save_image, write_file
from assistant.models import (
    EditPlan,
    EditRequest,
    Example,
    Guidance,
    Metric,
    Scores,
    Seed,
    Steps,
    next_seed,
)
from assistant.protocols import Scorer
from assistant.settings import Settings
from plugins.evaluation.data import example, load_edits
from plugins.evaluation.metrics import means
from plugins.evaluation.scorecard import contact_sheet, markdown_table

SHEET_ROWS = 16
"""The contact sheet shows the first examples only: a picture of thousands of rows helps nobody."""


class EvalConfig(BaseModel):
    data: str
    columns: dict[str, str] = {}
    split: str = "train"
    limit: int | None = Field(None, ge=1)
    out: Path = Path("icedit-eval")
    seed: Seed = Field(0, description="example i is edited with seed + i")
    steps: Steps | None = Field(None, description="default: the settings' steps (28)")
    guidance: Guidance | None = None
    batch_size: int = Field(
        8, ge=1, description="examples per round: edited one by one, then scored in one batch"
    )
    scorers: list[str] = Field(default_factory=list, description="scorer plugins (default: the default ones)")


class ExampleResult(BaseModel):
    index: int
    instruction: str
    seed: int
    edit: str
    metrics: dict[str, float | None]
    details: dict[str, Any] = Field(
        default_factory=dict, description="what each scorer kept beside its numbers"
    )


class EvalReport(BaseModel):
    metrics: dict[str, float | None] = Field(description="mean of each metric over the examples that have it")
    scorers: list[str]
    count: int
    examples: list[ExampleResult]
    table: str
    sheet: str
    report: str
    num_processes: int
    random_weights: bool = Field(description="the engine or a scorer's models had random weights (tiny)")
    models: dict[str, str] = Field(description="the models the scorers ran")


def scorer_names(config: EvalConfig) -> list[str]:
    """The scorers asked for, or the registered default ones; an unknown name is one line."""
    if not config.scorers:
        return [name for name, (_, spec) in plugins.registrations("scorers").items() if spec.default]
    for name in config.scorers:
        plugins.get("scorers", name)
    return list(dict.fromkeys(config.scorers))


def _metrics(scorers: dict[str, Scorer]) -> list[Metric]:
    """Every scorer's metrics in order; two scorers giving one key would overwrite each other: one line."""
    found: dict[str, tuple[str, Metric]] = {}
    for name, scorer in scorers.items():
        for metric in scorer.metrics:
            if metric.key in found:
                raise UserError(
                    f"scorers {found[metric.key][0]} and {name} both give '{metric.key}': run one of them"
                )
            found[metric.key] = (name, metric)
    return [metric for _, metric in found.values()]


def _scored(name: str, scorer: Scorer, examples: list[Example]) -> list[Scores]:
    """The scorer's scores, held to its contract: one per edit, only the metrics it declares."""
    found = scorer.score(examples)
    if len(found) != len(examples):
        raise UserError(f"scorer {name} gave {len(found)} scores for {len(examples)} edits (a bug in it)")
    declared = {m.key for m in scorer.metrics}
    for scores in found:
        if extra := set(scores.values) - declared:
            raise UserError(
                f"scorer {name} gave {sorted(extra)[0]!r}, which it does not declare (a bug in it)"
            )
    return found


def evaluate(config: EvalConfig, settings: Settings, progress: bool = True) -> EvalReport | None:
    """Edit and score every example; the report on the main process, None on the others."""
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    asked = plugins.option("engines", settings.engine, "device", settings)
    state = PartialState(cpu=asked == "cpu" or not torch.accelerator.is_available())
    with state.main_process_first():
        edits = load_edits(config.data, config.columns, config.split, config.limit, need_target=False)
    run_settings = settings.with_options(device=str(state.device))
    names = scorer_names(config)
    scorers = {name: plugins.build("scorers", name, run_settings) for name in names}
    metrics = _metrics(scorers)
    engine = plugins.build("engines", settings.engine, run_settings)
    steps, guidance = config.steps or settings.steps, config.guidance or settings.guidance
    edits_dir = config.out / "edits"
    try:
        edits_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to {config.out}: {e.strerror or e}") from None

    results, sheet = [], []
    random_weights = any(scorer.random_weights for scorer in scorers.values())
    with state.split_between_processes(list(range(len(edits)))) as mine:
        bar = tqdm(total=len(mine), desc="eval", disable=not (progress and state.is_main_process))
        for start in range(0, len(mine), config.batch_size):
            chunk = mine[start : start + config.batch_size]
            rows = [example(edits, i) for i in chunk]
            made = []
            for i, row in zip(chunk, rows, strict=True):
                plan = EditPlan(intent="edit", instruction=row["instruction"])
                request = EditRequest(
                    source=row["source"].convert("RGB"),
                    plan=plan,
                    seed=next_seed(config.seed, i),
                    steps=steps,
                    guidance=guidance,
                )
                made.append(engine.edit(request, lambda event: None, threading.Event()))
                bar.update(1)
            examples = [
                Example(
                    row["instruction"],
                    row["source"],
                    result.image,
                    row.get("target"),
                    row.get("source_caption"),
                    row.get("target_caption"),
                )
                for row, result in zip(rows, made, strict=True)
            ]
            scored = {name: _scored(name, scorer, examples) for name, scorer in scorers.items()}
            for n, (i, row, result) in enumerate(zip(chunk, rows, made, strict=True)):
                path = edits_dir / f"{i:05d}.png"
                save_image(result.image, path, force=True)  # the run's own folder: a rerun replaces its edits
                random_weights |= result.random_weights
                results.append(
                    ExampleResult(
                        index=i,
                        instruction=row["instruction"],
                        seed=result.seed,
                        edit=str(path),
                        metrics={k: v for scores in scored.values() for k, v in scores[n].values.items()},
                        details={
                            name: s[n].details for name, s in scored.items() if s[n].details is not None
                        },
                    )
                )
                if i < SHEET_ROWS:
                    sheet.append((i, row["source"], result.image, row.get("target"), row["instruction"]))
        bar.close()
    results = sorted(gather_object(results), key=lambda r: r.index)
    sheet = sorted(gather_object(sheet), key=lambda r: r[0])
    random_weights = any(gather_object([random_weights]))
    if not state.is_main_process:
        return None

    averages = means([r.metrics for r in results], metrics)
    table, sheet_path, report_path = (
        config.out / "metrics.md",
        config.out / "sheet.png",
        config.out / "metrics.json",
    )
    write_file(table, markdown_table(averages, len(results), metrics).encode(), force=True)
    save_image(contact_sheet([row[1:] for row in sheet]), sheet_path, force=True)
    report = EvalReport(
        metrics=averages,
        scorers=names,
        count=len(results),
        examples=results,
        table=str(table),
        sheet=str(sheet_path),
        report=str(report_path),
        num_processes=state.num_processes,
        random_weights=random_weights,
        models={k: v for scorer in scorers.values() for k, v in scorer.models.items()},
    )
    write_file(report_path, (json.dumps(report.model_dump(), indent=2) + "\n").encode(), force=True)
    return report
