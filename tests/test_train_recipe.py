"""`icedit train`'s official recipe (River-Zhang/ICEdit `train/`) and its options: what each setting does,
the normal LoRA in the format stock diffusers loads, and a switch-gated router that learns and reloads.

Runs use the tiny preset, 64-pixel panels and rank 4, so each takes seconds on a CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import training
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from training import ICEDIT, TOY, invoke, metrics, transformer_inputs

from plugins.icedit import moe, moe_checkpoint
from plugins.icedit.data import Diptychs, training_diptych
from plugins.icedit.loading import WEIGHTS_NAME
from plugins.icedit.presets import build_tiny
from plugins.icedit.sampler import FillSampler
from plugins.icedit.train import TrainConfig, digest, encode, flow_matching_loss

TINY = ["--preset", "tiny", "--data", TOY, "--panel-width", 64, "--rank", 4, "--seed", 0]
"""The official recipe as it is: only the model's size is made small."""


def train_json(*args: object) -> dict:
    return training.train_json(*TINY, *args)


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> tuple[dict, Path]:
    """A 120-step run with every default: Prodigy needs its first steps to find its step size."""
    out = tmp_path_factory.mktemp("official")
    return train_json("--steps", 120, "--checkpoint-every", 1000, "--out", out), out


def test_the_defaults_are_the_official_recipe_and_train_config_records_them(official):
    report, out = official
    recorded = json.loads((out / "train_config.json").read_text())
    assert {k: recorded[k] for k in OFFICIAL} == OFFICIAL
    assert recorded["mixed_precision"] == "no"  # a CPU: the resolved value, not null
    assert recorded["panel_width"] == 64
    assert recorded["engine"] == {
        "preset": "tiny",
        "model": None,
        "revision": None,
        "max_sequence_length": 512,
    }
    state = load_file(report["adapter"])
    assert {t.dtype for t in state.values()} == {torch.bfloat16}  # the official model is bf16, LoRA included


OFFICIAL = {
    "adapter": "moe",
    "optimizer": "prodigy",
    "lr": 1.0,
    "weight_decay": 0.01,
    "max_grad_norm": 0.5,
    "loss_region": "full",
    "adapter_dtype": "bfloat16",
    "text_dropout": 0.1,
    "init": "gaussian",
    "latents": "sample",
    "panels": "square",
    "bottom_crop": 0.0,
    "gate": "topk",
    "top_k": 1,
    "experts": 4,
    "batch_size": 1,  # moe_lora.yaml: batch 1, accumulated over 2
    "grad_accum": 2,
    "gradient_checkpointing": False,
}


def test_prodigy_finds_its_step_size_and_lowers_the_loss(official):
    report, out = official
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 121))
    assert rows[0]["d"] == pytest.approx(1e-6)  # Prodigy's d0
    assert rows[-1]["d"] > 100 * rows[0]["d"]
    assert report["loss_last"] < 0.9 * report["loss_first"], report


def test_metrics_report_each_moe_layer_s_token_share_per_expert(official):
    _, out = official
    rows = metrics(out)
    layers = {"transformer_blocks.0.ff.net.2", "single_transformer_blocks.0.proj_out"}
    for row in rows:
        assert set(row["experts"]) == layers
        for shares in row["experts"].values():
            assert len(shares) == 4 and all(0 <= s <= 1 for s in shares)
            assert sum(shares) == pytest.approx(1, abs=1e-3)
        # each step: 2 micro-batches of one 128x64 diptych, 32 image tokens; the single blocks add T5's 512
        assert row["tokens"] == {
            "transformer_blocks.0.ff.net.2": 64,
            "single_transformer_blocks.0.proj_out": 1088,
        }
    assert "balance" not in rows[0]  # the published gate has no load-balancing loss


def test_the_bottom_crop_defaults_per_dataset_and_contradictions_are_one_line(tmp_path):
    def crop(data: str, **kw) -> float | None:
        return TrainConfig(data=data, out=tmp_path, **kw).resolved("no").bottom_crop

    assert crop("osunlp/MagicBrush") == 1 / 32
    assert crop("someone/other-edits") == 0.0
    assert crop("osunlp/MagicBrush", bottom_crop=0.0) == 0.0
    assert TrainConfig(data="x", out=tmp_path, optimizer="adamw").resolved("no").lr == 1e-4
    lora = TrainConfig(data="x", out=tmp_path, adapter="lora").resolved("no")
    assert (lora.batch_size, lora.grad_accum, lora.gradient_checkpointing) == (2, 1, True)  # normal_lora.yaml
    for flag, value in (("--gate", "switch"), ("--top-k", 2), ("--experts", 8), ("--balance-weight", 0.1)):
        result = invoke("train", *TINY, "--adapter", "lora", flag, value, "--out", tmp_path / "x")
        assert result.exit_code == 2, result.output
        assert result.stderr == f"Error: {flag} shapes the LoRA-MoE's experts: --adapter lora has none\n"
    for args, said in (
        (["--top-k", 3, "--experts", 2], "--top-k 3 asks for more experts than --experts 2"),
        (
            ["--balance-weight", 0.1],
            "--balance-weight weighs the switch gate's load-balancing loss: add --gate switch",
        ),
    ):
        result = invoke("train", *TINY, *args, "--out", tmp_path / "x")
        assert result.exit_code == 2, result.output
        assert result.stderr == f"Error: {said}\n"
    assert not (tmp_path / "x").exists()


def test_square_panels_stretch_and_the_bottom_crop_removes_the_strip():
    source = Image.new("RGB", (96, 64), (0, 0, 255))
    source.paste((255, 0, 0), (0, 62, 96, 64))  # a 2-row strip: 64 // 32
    target = source.copy()
    canvas, mask, wanted = training_diptych(source, target, 32, square=True, bottom_crop=1 / 32)
    assert canvas.size == wanted.size == mask.size == (64, 32)
    pixels = np.asarray(wanted).reshape(-1, 3)
    assert pixels[:, 0].max() < 40  # no red left anywhere
    kept, _, _ = training_diptych(source, target, 32)
    assert kept.size == (64, 16)  # keep-aspect: the engine's 3:2 panels
    assert np.asarray(kept)[-1, :, 0].max() > 100  # the strip is still there
    dataset = Diptychs([{"source": source, "target": target, "instruction": "x"}], 32, square=True)
    assert dataset[0]["canvas"].size == (64, 32)


def test_text_dropout_and_latent_sampling_are_drawn_from_the_step_s_generator():
    pipe = build_tiny()
    sampler = FillSampler(pipe)
    canvas, mask, target = training_diptych(
        Image.open(TOY / "source" / "00.png"), Image.open(TOY / "target" / "00.png"), 64
    )
    batch = [{"canvas": canvas, "mask": mask, "target": target, "instruction": "make it blue"}]

    def run(seed: int | None, dropout: float, sample: bool) -> dict:
        g = None if seed is None else torch.Generator().manual_seed(seed)
        return encode(sampler, batch, 1.0, g, dropout, sample_latents=sample)

    plain, dropped = run(None, 0.0, False), run(0, 1.0, False)
    blank = sampler.prepare(canvas, mask, " ", 1, 1.0).prompt_embeds
    assert torch.equal(dropped["prompt_embeds"], blank)
    assert not torch.equal(plain["prompt_embeds"], blank)
    assert torch.equal(dropped["x0"], plain["x0"])  # the posterior mean without sampling
    first, again, other = run(1, 0.0, True), run(1, 0.0, True), run(2, 0.0, True)
    assert torch.equal(first["x0"], again["x0"]) and torch.equal(first["condition"], again["condition"])
    assert not torch.equal(first["x0"], other["x0"])
    assert not torch.equal(first["x0"], plain["x0"])
    assert torch.equal(first["prompt_embeds"], plain["prompt_embeds"])


def test_the_full_loss_counts_the_left_half_and_the_right_loss_does_not():
    """A model that predicts the true velocity on the right half and nothing on the left."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 8, 4, generator=g)
    right = torch.tensor([[0.0] * 4 + [1.0] * 4])

    def model(hidden_states, timestep, **_):
        x_t = hidden_states[..., :4]
        velocity = (x_t - x0) / timestep.view(-1, 1, 1)  # x_t = (1 - s) x0 + s noise => noise - x0
        return (velocity * right.unsqueeze(-1),)

    inputs = {"x0": x0, "condition": torch.zeros(1, 8, 0), "token_mask": right}
    inputs |= dict.fromkeys(("pooled", "prompt_embeds", "text_ids", "image_ids"))
    full = flow_matching_loss(model, inputs, torch.Generator().manual_seed(1), None, "full")
    half = flow_matching_loss(model, inputs, torch.Generator().manual_seed(1), None, "right")
    assert half.item() == pytest.approx(0, abs=1e-8)
    assert full.item() > 0.1


def test_a_sigma_shift_moves_the_same_draws_towards_the_noise_end():
    seen: dict[float, torch.Tensor] = {}

    def model(hidden_states, timestep, **_):
        seen[shift] = timestep
        return (torch.zeros_like(hidden_states[..., :4]),)

    inputs = {"x0": torch.zeros(64, 2, 4), "condition": torch.zeros(64, 2, 0), "token_mask": None}
    inputs |= dict.fromkeys(("pooled", "prompt_embeds", "text_ids", "image_ids"))
    for shift in (1.0, 4.0):
        flow_matching_loss(model, inputs, torch.Generator().manual_seed(3), None, "full", shift)
    plain, shifted = seen[1.0], seen[4.0]
    assert torch.allclose(shifted, 4 * plain / (1 + 3 * plain))
    assert (shifted > plain).all() and plain.median() == pytest.approx(0.5, abs=0.15)
    assert (shifted > 0.75).float().mean() > 0.4 > (plain > 0.75).float().mean()


def test_every_weight_of_a_new_lora_moe_trains():
    """peft's add_adapter freezes what it did not add: the experts and routers must come after it."""
    model = build_tiny().transformer
    params = moe.add_lora_moe(model, num_experts=2, rank=2, seed=0)
    trainable = {id(p) for p in params}
    layers = moe.moe_layers(model)
    assert len(layers) == 2
    for layer in layers.values():
        assert {id(layer.lora_A), id(layer.lora_B), id(layer.lora_route)} <= trainable
    assert len(params) == 2 * 11 + 3 * 2  # plain A and B of 11 modules, A, B, router of 2 MoE layers


def test_gaussian_init_draws_a_with_std_one_over_r():
    for init in ("gaussian", "uniform"):
        model = build_tiny().transformer
        moe.add_lora_moe(model, num_experts=2, rank=8, init=init, seed=0)
        plain = model.transformer_blocks[0].attn.to_q.lora_A[moe.ADAPTER].weight
        experts = model.single_transformer_blocks[0].proj_out.lora_A
        for a in (plain, experts):
            # uniform: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), whose std is that bound / sqrt(3)
            expected = 1 / 8 if init == "gaussian" else a.shape[1] ** -0.5 / 3**0.5
            assert float(a.detach().std()) == pytest.approx(expected, rel=0.1), init


def test_the_normal_lora_is_diffusers_format_and_stock_load_lora_weights_uses_it(tmp_path):
    report = train_json("--adapter", "lora", "--steps", 3, "--out", tmp_path / "run")
    state = load_file(report["adapter"])
    assert not any("lora_route" in k or ".expert_" in k for k in state)
    modules = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in state}
    assert {"transformer_blocks.0.ff.net.2", "single_transformer_blocks.0.proj_out", "x_embedder"} <= modules
    assert len(state) == 2 * 13  # the official target modules of one double and one single block, x_embedder

    pipe = build_tiny()
    inputs = transformer_inputs(pipe.transformer)
    with torch.no_grad():
        before = pipe.transformer(**inputs).sample
        pipe.load_lora_weights(str(tmp_path / "run" / "adapter"), weight_name=WEIGHTS_NAME, adapter_name="x")
        after = pipe.transformer(**inputs).sample
    assert (after - before).abs().max() > 1e-4  # every B moved off zero

    edit = invoke(
        "edit", TOY / "source" / "00.png", "make it blue", "--preset", "tiny", "--steps", 1,
        "--lora", tmp_path / "run", "-o", tmp_path / "e.png", "--json",
    )  # fmt: skip
    assert edit.exit_code == 0, edit.output
    adapter = json.loads(edit.stdout)["adapter"]
    assert (adapter["kind"], adapter["keys"], adapter["gate"]) == ("lora", len(state), None)


def test_a_top_1_router_gets_a_gradient_under_the_switch_gate_only():
    grads = {}
    for gate in ("topk", "switch"):
        model = build_tiny().transformer
        moe.add_lora_moe(model, num_experts=4, rank=4, seed=0, gate=gate)
        for layer in moe.moe_layers(model).values():
            torch.nn.init.normal_(layer.lora_B, std=0.1)  # trained experts: their outputs differ
        model(**transformer_inputs(model)).sample.square().mean().backward()
        grads[gate] = model.single_transformer_blocks[0].proj_out.lora_route.grad
    assert grads["topk"] is not None and not grads["topk"].any()  # the one gate is exactly 1
    assert grads["switch"].abs().max() > 0


def _router(path: Path) -> torch.Tensor:
    return load_file(path)["transformer.single_transformer_blocks.0.proj_out.lora_route.weight"].float()


def _fresh_router() -> torch.Tensor:
    model = build_tiny().transformer
    moe.add_lora_moe(model, num_experts=4, rank=4, seed=0, gate="switch")
    return model.single_transformer_blocks[0].proj_out.lora_route.detach().to(torch.bfloat16).float()


def test_a_switch_gated_top_1_router_learns_and_its_checkpoint_reloads_to_the_same_function(tmp_path):
    args = ["--steps", 40, "--optimizer", "adamw", "--lr", 3e-3, "--weight-decay", 0, "--top-k", 1]
    switch = train_json(*args, "--gate", "switch", "--balance-weight", 0.05, "--out", tmp_path / "switch")
    assert (_router(Path(switch["adapter"])) - _fresh_router()).abs().max() > 1e-3
    rows = metrics(tmp_path / "switch")
    assert all(0 < r["balance"] <= 4 for r in rows)  # N sum f_i P_i: 1 when balanced, N when collapsed

    path = Path(switch["adapter"])
    with safe_open(str(path), "pt") as f:
        assert f.metadata()[moe_checkpoint.GATE_KEY] == "switch"
    inputs = transformer_inputs(build_tiny().transformer)
    reloaded = build_tiny().transformer
    report = moe_checkpoint.load_lora_moe(reloaded, path)
    as_trained = build_tiny().transformer  # the trainer's model: the same adapter, gated as trained
    moe.add_lora_moe(as_trained, num_experts=4, rank=4, seed=0, gate="switch")
    moe_checkpoint.restore_adapter(as_trained, load_file(path))
    published = build_tiny().transformer
    moe_checkpoint.load_lora_moe(published, path, gate="topk")
    with torch.no_grad():
        outputs = [m.eval()(**inputs).sample for m in (reloaded, as_trained, published)]
    assert report.gate == "switch"
    assert torch.allclose(outputs[0], outputs[1], atol=1e-6)
    assert (outputs[0] - outputs[2]).abs().max() > 1e-5  # the gate changes the function: honouring it matters

    edit = invoke(
        "edit", TOY / "source" / "00.png", "make it blue", "--preset", "tiny", "--steps", 1,
        "--lora", tmp_path / "switch", "-o", tmp_path / "e.png", "--json",
    )  # fmt: skip
    assert edit.exit_code == 0, edit.output
    assert json.loads(edit.stdout)["adapter"]["gate"] == "switch"


def test_resume_takes_exactly_the_uninterrupted_steps_under_the_official_recipe(tmp_path):
    common = ["--steps", 4, "--checkpoint-every", 2, "--grad-accum", 2, "--batch-size", 2, "--gate", "switch"]
    whole = train_json(*common, "--out", tmp_path / "whole")
    resumed = train_json(
        *common, "--out", tmp_path / "resumed", "--resume", tmp_path / "whole" / "checkpoints" / "step-000002"
    )
    assert metrics(tmp_path / "resumed") == metrics(tmp_path / "whole")[2:]
    assert resumed["adapter_sha256"] == whole["adapter_sha256"]


def test_two_processes_keep_identical_adapters_under_the_official_recipe(tmp_path):
    out = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ICEDIT_", "ACCELERATE_"))}
    proc = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "--no-python", str(ICEDIT), "train", *map(str, TINY), "--steps", "4", "--gate", "switch",
            "--out", str(out), "--json",
        ],
        check=False, capture_output=True, text=True, timeout=180, env=env | {"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["num_processes"] == 2
    first, second = report["adapter_sha256"]
    assert first == second == digest(load_file(report["adapter"]))
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all("d" in r and "balance" in r for r in rows)
    assert all(sum(s) == pytest.approx(1, abs=1e-3) for r in rows for s in r["experts"].values())
    # tokens of both processes: 2 processes x 2 micro-batches x 32 image tokens (+ 512 T5 tokens in single blocks)
    assert all(
        r["tokens"] == {"transformer_blocks.0.ff.net.2": 128, "single_transformer_blocks.0.proj_out": 2176}
        for r in rows
    )


def test_a_checkpoint_without_a_gate_is_the_published_gate_and_an_unknown_one_is_one_line(tmp_path):
    from safetensors.torch import save_file

    from assistant.errors import UserError

    state = moe_checkpoint.synthetic_checkpoint(build_tiny().transformer, num_experts=2, rank=2)
    save_file(state, tmp_path / "published.safetensors", metadata={"format": "pt"})
    save_file(
        state,
        tmp_path / "odd.safetensors",
        metadata={"format": "pt", moe_checkpoint.GATE_KEY: "expert-choice"},
    )
    assert moe_checkpoint.read_routing(tmp_path / "published.safetensors") == ("topk", 1)
    report = moe_checkpoint.load_lora_moe(build_tiny().transformer, tmp_path / "published.safetensors")
    assert (report.gate, report.top_k) == ("topk", 1)
    model = build_tiny().transformer
    with pytest.raises(UserError) as raised:
        moe_checkpoint.load_lora_moe(model, tmp_path / "odd.safetensors")
    assert str(raised.value) == (
        f"{tmp_path / 'odd.safetensors'}: its metadata names the gate 'expert-choice', which this version does not know"
    )
    assert not moe.moe_layers(model)  # nothing was placed


def test_top_k_rides_in_the_checkpoint_and_an_explicit_top_k_wins(tmp_path):
    report = train_json("--steps", 1, "--top-k", 2, "--out", tmp_path / "run")
    path = Path(report["adapter"])
    assert moe_checkpoint.read_routing(path) == ("topk", 2)
    assert moe_checkpoint.load_lora_moe(build_tiny().transformer, path).top_k == 2
    assert moe_checkpoint.load_lora_moe(build_tiny().transformer, path, top_k=1).top_k == 1
    edit = invoke(
        "edit", TOY / "source" / "00.png", "make it blue", "--preset", "tiny", "--steps", 1,
        "--lora", tmp_path / "run", "-o", tmp_path / "e.png", "--json",
    )  # fmt: skip
    assert edit.exit_code == 0, edit.output
    assert json.loads(edit.stdout)["adapter"]["top_k"] == 2


def test_a_resume_with_other_settings_is_one_line_before_anything_loads(tmp_path):
    train_json("--steps", 2, "--checkpoint-every", 1, "--gate", "switch", "--out", tmp_path / "run")
    where = tmp_path / "run" / "checkpoints" / "step-000002"
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    for args, said in (
        ([], '--gate: the run in {where} was trained with "switch", not "topk"'),
        (
            ["--gate", "switch", "--text-dropout", 0.5],
            "--text-dropout: the run in {where} was trained with 0.1, not 0.5",
        ),
    ):
        result = invoke("train", *TINY, "--steps", 3, *args, "--out", tmp_path / "run", "--resume", "latest")
        assert result.exit_code == 2, result.output
        assert result.stderr == (
            "Error: "
            + said.format(where=where)
            + ": resume with its settings, or start a new run in another --out\n"
        )
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before  # nothing was touched
    resumed = train_json("--steps", 3, "--gate", "switch", "--out", tmp_path / "run", "--resume", "latest")
    assert resumed["resumed_from"] == 2


def test_gradient_checkpointing_computes_the_same_steps_and_counts_each_token_once(tmp_path):
    args = ["--steps", 3, "--gate", "switch", "--adapter-dtype", "float32"]
    plain = train_json(*args, "--out", tmp_path / "plain")
    checkpointed = train_json(*args, "--gradient-checkpointing", "--out", tmp_path / "ckpt")
    for a, b in zip(metrics(tmp_path / "plain"), metrics(tmp_path / "ckpt"), strict=True):
        assert (a["experts"], a["tokens"]) == (b["experts"], b["tokens"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["balance"] == pytest.approx(b["balance"], rel=1e-4)
    for report in (plain, checkpointed):
        assert {t.dtype for t in load_file(report["adapter"]).values()} == {torch.float32}
