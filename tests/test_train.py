"""`icedit train` on the tiny preset and the toy edits: the loss falls, the adapter is the published format and
changes the model, a resumed run takes exactly the uninterrupted run's steps, two processes stay in sync.

Runs use 64-pixel panels and rank 4 so that each takes seconds on a CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import training
from safetensors.torch import load_file
from training import ICEDIT, TOY, invoke, metrics, transformer_inputs

from plugins.evaluation.data import COLUMNS, load_edits, parse_columns
from plugins.icedit import moe, moe_checkpoint
from plugins.icedit.loading import WEIGHTS_NAME
from plugins.icedit.presets import build_tiny
from plugins.icedit.train import digest

SMALL = [
    "--preset",
    "tiny",
    "--data",
    TOY,
    "--panel-width",
    64,
    "--rank",
    4,
    "--optimizer",
    "adamw",
    "--lr",
    3e-3,
    "--seed",
    0,
]


def train_json(*args: object) -> dict:
    return training.train_json(*SMALL, *args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[dict, Path]:
    """One 30-step run shared by the tests that only read its results."""
    out = tmp_path_factory.mktemp("run")
    return train_json("--steps", 30, "--out", out), out


def test_training_lowers_the_loss_on_the_toy_edits(trained):
    report, out = trained
    assert (report["steps"], report["num_processes"], report["resumed_from"]) == (30, 1, None)
    assert report["loss_last"] < 0.85 * report["loss_first"], report
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert {r["lr"] for r in rows} == {3e-3}
    assert report["loss_first"] == pytest.approx(sum(r["loss"] for r in rows[:3]) / 3)
    assert report["checkpoints"] == [str(out / "checkpoints" / "step-000030")]
    assert report["random_weights"] is True


def test_the_adapter_is_the_published_format_and_changes_the_output(trained):
    report, out = trained
    state = load_file(report["adapter"])
    assert report["adapter"] == str(out / "adapter" / WEIGHTS_NAME)
    assert report["adapter_sha256"] == [digest(state)]
    base = build_tiny().transformer
    assert set(state) == set(moe_checkpoint.synthetic_checkpoint(base, num_experts=4, rank=4))
    inputs = transformer_inputs(base)
    with torch.no_grad():
        before = base(**inputs).sample
        loaded = moe_checkpoint.load_lora_moe(base, out / "adapter")
        after = base(**inputs).sample
    assert (loaded.keys, loaded.plain_modules, loaded.moe_modules, loaded.num_experts) == (40, 11, 2, 4)
    assert (after - before).abs().max() > 1e-3


def test_the_engine_edits_with_the_trained_adapter(trained, tmp_path):
    _, out = trained
    args = [
        "edit",
        TOY / "source" / "00.png",
        "the red circle is blue",
        "--preset",
        "tiny",
        "--steps",
        2,
        "--seed",
        3,
        "--json",
    ]
    plain = json.loads(invoke(*args, "-o", tmp_path / "a.png", "--lora", "none").stdout)
    tuned = json.loads(invoke(*args, "-o", tmp_path / "b.png", "--lora", out / "adapter").stdout)
    assert tuned["adapter"]["kind"] == "lora-moe" and tuned["adapter"]["keys"] == 40
    assert tuned["image_sha256"] != plain["image_sha256"]


def test_a_fresh_adapter_starts_as_the_base_model_and_is_seeded():
    model = build_tiny().transformer
    inputs = transformer_inputs(model)
    with torch.no_grad():
        before = model(**inputs).sample
    params = moe.add_lora_moe(model, num_experts=3, rank=2, top_k=2, seed=5)
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, before)  # every B starts at zero
    assert all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora" not in n)
    state = moe_checkpoint.adapter_state(model)
    again, other = build_tiny().transformer, build_tiny().transformer
    published = moe_checkpoint.synthetic_checkpoint(again, num_experts=3, rank=2)
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in published.items()}
    moe.add_lora_moe(again, num_experts=3, rank=2, top_k=2, seed=5)
    moe.add_lora_moe(other, num_experts=3, rank=2, top_k=2, seed=6)
    assert (
        digest(moe_checkpoint.adapter_state(again))
        == digest(state)
        != digest(moe_checkpoint.adapter_state(other))
    )


def test_resume_takes_exactly_the_steps_of_the_uninterrupted_run(tmp_path):
    common = ["--steps", 4, "--checkpoint-every", 2, "--grad-accum", 2, "--batch-size", 2]
    whole = train_json(*common, "--out", tmp_path / "whole")
    resumed = train_json(
        *common, "--out", tmp_path / "resumed", "--resume", tmp_path / "whole" / "checkpoints" / "step-000002"
    )
    assert resumed["resumed_from"] == 2
    assert metrics(tmp_path / "resumed") == metrics(tmp_path / "whole")[2:]
    assert resumed["adapter_sha256"] == whole["adapter_sha256"]
    assert load_file(tmp_path / "whole" / "checkpoints" / "step-000002" / WEIGHTS_NAME)  # a usable adapter

    again = invoke("train", *SMALL, *common, "--out", tmp_path / "whole", "--resume", "latest")
    assert again.exit_code == 2
    assert again.stderr == (
        f"Error: nothing to do: {tmp_path / 'whole' / 'checkpoints' / 'step-000004'} is at "
        "step 4 already (ask for more with --steps)\n"
    )


def test_two_processes_end_with_identical_adapters(tmp_path):
    out = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ICEDIT_", "ACCELERATE_"))}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "--no-python",
            str(ICEDIT),
            "train",
            *map(str, SMALL),
            "--steps",
            "4",
            "--out",
            str(out),
            "--json",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
        env=env | {"OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # only the main process prints
    assert (report["num_processes"], report["distributed_type"]) == (2, "MULTI_CPU")
    first, second = report["adapter_sha256"]
    assert first == second == digest(load_file(report["adapter"]))
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]


def test_bad_data_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    names = ", ".join(COLUMNS)
    empty = tmp_path / "empty"
    cases = [
        (
            ["--data", empty],
            f"Error: {empty}: no metadata.jsonl in it (see examples/toy_edits/ for the layout)",
        ),
        (
            ["--data", TOY, "--columns", "picture=img"],
            f"Error: --columns: 'picture=img' is not NAME=COLUMN with NAME one of {names}",
        ),
        (
            ["--data", TOY, "--columns", "target=after"],
            f"Error: {TOY} has no column 'after' for the target (columns: {names}); map it with --columns target=COLUMN",
        ),
        (
            ["--data", TOY, "--panel-width", 100],
            "Error: bad option --panel-width: Input should be a multiple of 16",
        ),
    ]
    for args, expected in cases:
        result = invoke("train", "--preset", "tiny", "--out", tmp_path / "out", *args)
        assert result.exit_code == 2, result.output
        assert result.stderr == expected + "\n"


def test_an_uncached_hub_dataset_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke("train", "--preset", "tiny", "--data", "nobody/no-such-edits", "--out", tmp_path)
    assert result.exit_code == 2
    assert result.stderr == (
        "Error: the dataset 'nobody/no-such-edits' is not in the Hugging Face cache and offline mode is set "
        "(HF_HUB_OFFLINE): "
        "download it on a machine with internet (`hf download --repo-type dataset nobody/no-such-edits`) or pass "
        "a local folder\n"
    )


def test_columns_map_a_dataset_s_own_names(tmp_path):
    rows = [json.loads(line) for line in (TOY / "metadata.jsonl").read_text().splitlines()[:3]]
    for kind in ("source", "target"):
        shutil.copytree(TOY / kind, tmp_path / kind)
    (tmp_path / "metadata.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "before_file_name": r["source_file_name"],
                    "after_file_name": r["target_file_name"],
                    "edit": r["instruction"],
                }
            )
            + "\n"
            for r in rows
        )
    )
    edits = load_edits(str(tmp_path), parse_columns("source=before, target=after,instruction=edit"), limit=2)
    assert edits.column_names == ["source", "target", "instruction"]
    assert [e["instruction"] for e in edits] == [r["instruction"] for r in rows[:2]]
    assert edits[1]["target"].tobytes() == load_edits(str(TOY))[1]["target"].tobytes()
