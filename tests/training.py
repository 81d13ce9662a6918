"""What the `icedit train` tests share: the CLI in-process, a run's metrics, inputs for the tiny transformer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from click.testing import CliRunner

from assistant.cli import cli

TOY = Path(__file__).resolve().parent.parent / "examples" / "toy_edits"
ICEDIT = Path(sys.executable).with_name("icedit")


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="icedit")


def train_json(*args: object) -> dict:
    """`icedit train ARGS --json`, which must succeed: its report."""
    result = invoke("train", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def transformer_inputs(transformer, seed: int = 0) -> dict:
    """Random inputs for the tiny transformer: 32 image tokens, 8 text tokens."""
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    return {
        "hidden_states": torch.randn(1, 32, cfg.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(1, 8, cfg.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=g),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([1.0]),
        "img_ids": torch.zeros(32, 3),
        "txt_ids": torch.zeros(8, 3),
    }
