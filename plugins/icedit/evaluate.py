"""`icedit eval`: run the engine over a dataset of edits and score the results (MagicBrush, Emu Edit, VIEScore).

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
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, Field

from assistant.errors import UserError
from assistant.files import save_image, write_file
from assistant.models import EditPlan, EditRequest, Guidance, Seed, Steps, next_seed
from assistant.settings import Settings
from plugins.icedit import features as feature_models
from plugins.icedit.data import example, load_edits
from plugins.icedit.loading import feature_refs
from plugins.icedit.metrics import Example, means, score
from plugins.icedit.options import IceditOptions
from plugins.icedit.scorecard import contact_sheet, markdown_table

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
    judge: Literal["qwen_vl"] | None = None


class ExampleResult(BaseModel):
    index: int
    instruction: str
    seed: int
    edit: str
    metrics: dict[str, float | None]
    judge: dict | None = None


class EvalReport(BaseModel):
    metrics: dict[str, float | None] = Field(description="mean of each metric over the examples that have it")
    judge: dict[str, float | None] | None = Field(
        None, description="mean VIE sc, pq and overall (with --judge)"
    )
    count: int
    examples: list[ExampleResult]
    table: str
    sheet: str
    report: str
    num_processes: int
    random_weights: bool = Field(description="the engine or the feature models had random weights (tiny)")
    feature_models: dict[str, str]


def load_features(options: IceditOptions, device: str):
    """The CLIP and DINO of the options; random tiny ones for the tiny preset unless a model is named."""
    chosen = feature_refs(options)
    if chosen is None:
        return feature_models.tiny(device), {"clip": "tiny (random)", "dino": "tiny (random)"}
    clip, dino = chosen
    return feature_models.load(clip, dino, device), {"clip": clip, "dino": dino}


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def evaluate(config: EvalConfig, settings: Settings, progress: bool = True) -> EvalReport | None:
    """Edit and score every example; the report on the main process, None on the others."""
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    from assistant import plugins

    own = plugins.options_for("engines", "icedit", settings)  # the feature models are icedit's options
    asked = plugins.option("engines", settings.engine, "device", settings)
    state = PartialState(cpu=asked == "cpu" or not torch.accelerator.is_available())
    with state.main_process_first():
        edits = load_edits(config.data, config.columns, config.split, config.limit, need_target=False)
    device = str(state.device)
    features, feature_names = load_features(own, device)
    scorer = None
    if config.judge:
        from plugins.qwen_vl.vie_score import QwenVieScorer

        scorer = QwenVieScorer(plugins.options_for("judges", "qwen_vl", settings))
    run_settings = settings.with_options(device=device)
    engine = plugins.build("engines", settings.engine, run_settings)
    steps, guidance = config.steps or settings.steps, config.guidance or settings.guidance
    edits_dir = config.out / "edits"
    try:
        edits_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to {config.out}: {e.strerror or e}") from None

    results, sheet, random_weights = [], [], features.random_weights
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
                    row["source"],
                    result.image,
                    row.get("target"),
                    row.get("source_caption"),
                    row.get("target_caption"),
                )
                for row, result in zip(rows, made, strict=True)
            ]
            for i, row, result, metrics in zip(
                chunk, rows, made, score(features, examples, config.batch_size), strict=True
            ):
                path = edits_dir / f"{i:05d}.png"
                save_image(result.image, path, force=True)  # the run's own folder: a rerun replaces its edits
                random_weights |= result.random_weights
                verdict = scorer.score(row["instruction"], row["source"], result.image) if scorer else None
                results.append(
                    ExampleResult(
                        index=i,
                        instruction=row["instruction"],
                        seed=result.seed,
                        edit=str(path),
                        metrics=metrics,
                        judge=verdict.model_dump() if verdict else None,
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

    judge = None
    if scorer:
        judge = {k: _mean([r.judge[k] for r in results]) for k in ("sc", "pq", "overall")}
    averages = means([r.metrics for r in results])
    table, sheet_path, report_path = (
        config.out / "metrics.md",
        config.out / "sheet.png",
        config.out / "metrics.json",
    )
    write_file(table, markdown_table(averages, len(results), judge).encode(), force=True)
    save_image(contact_sheet([row[1:] for row in sheet]), sheet_path, force=True)
    report = EvalReport(
        metrics=averages,
        judge=judge,
        count=len(results),
        examples=results,
        table=str(table),
        sheet=str(sheet_path),
        report=str(report_path),
        num_processes=state.num_processes,
        random_weights=random_weights,
        feature_models=feature_names,
    )
    write_file(report_path, (json.dumps(report.model_dump(), indent=2) + "\n").encode(), force=True)
    return report
