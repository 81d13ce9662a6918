"""LoRA-MoE on stock diffusers + peft: the reference fixture, the spec, the format, full-size coverage."""

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file, save_file
from torch import nn

from assistant.errors import UserError
from plugins.icedit.moe import MOE_TARGETS, PLAIN_TARGETS, LoraMoeLinear, adapters_disabled
from plugins.icedit.moe_checkpoint import adapter_state, load_lora_moe, save_adapter, synthetic_checkpoint
from plugins.icedit.presets import FLUX_FILL_TRANSFORMER

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "icedit_moe_lora"
"""Saved by the reference ICEdit implementation (see its README.md); vendored, so no run skips it."""


def fixture_transformer():
    cfg = json.loads((FIXTURE / "transformer_config.json").read_text())
    model = FluxTransformer2DModel(**cfg).eval()
    model.load_state_dict(load_file(FIXTURE / "base_transformer.safetensors"))
    return model


def fixture_io():
    io = load_file(FIXTURE / "io.safetensors")
    return {k.removeprefix("input."): v for k, v in io.items() if k.startswith("input.")}, io


@pytest.mark.parametrize("route_min_features", [LoraMoeLinear.ROUTE_MIN_FEATURES, 0], ids=["dense", "routed"])
def test_reference_checkpoint_computes_the_reference_outputs(route_min_features, monkeypatch):
    monkeypatch.setattr(LoraMoeLinear, "ROUTE_MIN_FEATURES", route_min_features)
    model = fixture_transformer()
    inputs, io = fixture_io()
    report = load_lora_moe(model, FIXTURE / "moe_lora")
    assert (report.keys, report.plain_modules, report.moe_modules, report.num_experts) == (78, 21, 4, 4)
    with torch.no_grad():
        moe = model(**inputs).sample
        with adapters_disabled(model):
            base = model(**inputs).sample
        again = model(**inputs).sample
    assert (moe - io["expected.moe"]).abs().max() <= 2e-4
    assert (base - io["expected.base"]).abs().max() <= 2e-4
    assert torch.equal(moe, again)  # adapters are back on after the context
    assert (moe - base).abs().max() > 1e-2


def test_top_k_is_a_setting_and_changes_the_function():
    model = fixture_transformer()
    inputs, io = fixture_io()
    load_lora_moe(model, FIXTURE / "moe_lora", top_k=2)
    with torch.no_grad():
        assert (model(**inputs).sample - io["expected.moe"]).abs().max() > 1e-2


class LoopMoe(nn.Module):
    """The reference formulation, written from the spec: every expert on every token, weighted."""

    def __init__(self, base, experts_a, experts_b, route, top_k):
        super().__init__()
        self.base, self.a, self.b, self.route, self.top_k = base, experts_a, experts_b, route, top_k

    def forward(self, x):
        logits = x @ self.route.T
        top, idx = logits.topk(self.top_k, dim=-1)
        weights = torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top, dim=-1))
        out = self.base(x)
        for i, (a, b) in enumerate(zip(self.a, self.b, strict=True)):
            out = out + weights[..., i : i + 1] * ((x @ a.T) @ b.T)
        return out


def spec_reference(model, state, top_k):
    """The adapted model built independently: plain LoRA merged as W + B A, MoE layers as LoopMoe."""
    ref = copy.deepcopy(model)
    for key in {k.rsplit(".lora_", 1)[0] for k in state}:
        name = key.removeprefix("transformer.")
        parent_name, _, child = name.rpartition(".")
        linear = ref.get_submodule(name)
        if f"{key}.lora_route.weight" in state:
            n = state[f"{key}.lora_route.weight"].shape[0]
            a = [state[f"{key}.lora_A.expert_{i}.weight"] for i in range(n)]
            b = [state[f"{key}.lora_B.expert_{i}.weight"] for i in range(n)]
            setattr(
                ref.get_submodule(parent_name),
                child,
                LoopMoe(linear, a, b, state[f"{key}.lora_route.weight"], top_k),
            )
        else:
            with torch.no_grad():
                linear.weight += state[f"{key}.lora_B.weight"] @ state[f"{key}.lora_A.weight"]
    return ref


def small_flux(**kw):
    torch.manual_seed(1)
    cfg = {
        "patch_size": 1,
        "in_channels": 24,
        "out_channels": 8,
        "num_layers": 2,
        "num_single_layers": 3,
        "attention_head_dim": 8,
        "num_attention_heads": 3,
        "joint_attention_dim": 16,
        "pooled_projection_dim": 12,
        "guidance_embeds": True,
        "axes_dims_rope": (2, 2, 4),
    }
    return FluxTransformer2DModel(**cfg | kw).eval()


def small_inputs(tokens=10, text=5):
    g = torch.Generator().manual_seed(2)
    return {
        "hidden_states": torch.randn(2, tokens, 24, generator=g),
        "encoder_hidden_states": torch.randn(2, text, 16, generator=g),
        "pooled_projections": torch.randn(2, 12, generator=g),
        "timestep": torch.tensor([0.3, 0.8]),
        "guidance": torch.tensor([50.0, 50.0]),
        "img_ids": torch.randn(tokens, 3, generator=g),
        "txt_ids": torch.zeros(text, 3),
    }


@pytest.mark.parametrize(("experts", "rank", "top_k"), [(4, 4, 1), (3, 2, 2), (5, 3, 3), (2, 6, 2)])
def test_any_size_and_top_k_matches_the_spec_written_independently(experts, rank, top_k):
    model = small_flux()
    state = synthetic_checkpoint(model, num_experts=experts, rank=rank, seed=experts, scale=0.3)
    ref = spec_reference(model, state, top_k)
    report = load_lora_moe(model, state, top_k=top_k)
    assert report.keys == len(state)
    inputs = small_inputs()
    with torch.no_grad():
        ours, theirs = model(**inputs).sample, ref(**inputs).sample
    assert (ours - theirs).abs().max() <= 1e-5
    assert (ours - theirs).abs().max() < (
        ours - spec_reference(small_flux(), state, 1 + top_k % experts)(**inputs).sample
    ).abs().max()


def test_gates_are_softmax_over_top_k_only():
    layer = LoraMoeLinear(nn.Linear(3, 2), num_experts=4, rank=1, top_k=2)
    with torch.no_grad():
        layer.lora_route.copy_(torch.eye(4, 3))
    gates = layer.gates(torch.tensor([[3.0, 1.0, 0.0]]))
    expected = torch.softmax(torch.tensor([3.0, 1.0]), 0)
    assert torch.allclose(gates, torch.tensor([[expected[0], expected[1], 0.0, 0.0]]))


def random_moe(num_experts, rank, top_k, fan_in=24, fan_out=10, seed=0):
    torch.manual_seed(seed)
    layer = LoraMoeLinear(nn.Linear(fan_in, fan_out), num_experts, rank, top_k)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B, layer.lora_route):
            p.normal_()
    return layer


@pytest.mark.parametrize(("num_experts", "top_k"), [(4, 1), (4, 2), (3, 2), (5, 3)])
def test_routed_and_dense_agree_in_values_and_gradients(num_experts, top_k, monkeypatch):
    layer = random_moe(num_experts, rank=3, top_k=top_k)
    monkeypatch.setattr(LoraMoeLinear, "ROUTE_BLOCK", 7)  # 2 x 20 tokens: blocks cross the batch boundary
    x = torch.randn(2, 20, 24, requires_grad=True)
    results = []
    for delta in (layer.routed_delta, layer.dense_delta):
        out = delta(x)
        grads = torch.autograd.grad(
            (out * torch.arange(10.0)).sum(), [x, layer.lora_A, layer.lora_B, layer.lora_route]
        )
        results.append((out, grads))
    (routed, routed_grads), (dense, dense_grads) = results
    assert routed.shape == dense.shape == (2, 20, 10)
    assert torch.allclose(routed, dense, atol=1e-5)
    for r, d in zip(routed_grads, dense_grads, strict=True):
        assert torch.allclose(r, d, atol=1e-4)
    assert (
        dense_grads[3].abs().sum() > 0 if top_k > 1 else dense_grads[3].abs().sum() == 0
    )  # top-1: gate is 1


def test_routed_delta_runs_only_the_experts_tokens_chose():
    layer = random_moe(4, rank=2, top_k=1)
    with torch.no_grad():
        layer.lora_route.zero_()
        layer.lora_route[2, 0] = 1.0  # x[0] > 0: every token's top logit is expert 2's
        expected = layer.dense_delta(x := torch.randn(16, 24).abs())
        layer.lora_A[[0, 1, 2, 3, 6, 7]] = float("nan")  # the other experts: running one would spread NaN
        assert torch.isnan(layer.dense_delta(x)).all()
        torch.testing.assert_close(layer.routed_delta(x), expected, atol=1e-5, rtol=0)


def test_delta_routes_on_cpu_only_where_it_saves_work(monkeypatch):
    picked = []
    monkeypatch.setattr(
        LoraMoeLinear, "routed_delta", lambda self, x: picked.append(self.top_k) or self.dense_delta(x)
    )
    monkeypatch.setattr(LoraMoeLinear, "ROUTE_MIN_FEATURES", 24)
    x = torch.randn(3, 24)
    random_moe(4, rank=2, top_k=1).delta(x)
    random_moe(5, rank=2, top_k=2).delta(x)
    random_moe(2, rank=2, top_k=2).delta(x)  # every expert on every token: nothing to skip
    random_moe(4, rank=2, top_k=2).delta(x)  # half the experts: the gathers cost what the FLOPs save
    random_moe(4, rank=2, top_k=1, fan_in=23).delta(
        x[:, :23]
    )  # too narrow: the loop costs more than it saves
    assert picked == [1, 2]


def test_save_then_load_round_trips_exactly(tmp_path):
    model = small_flux()
    state = synthetic_checkpoint(model, num_experts=3, rank=2, seed=7)
    load_lora_moe(model, state, top_k=2)
    path = save_adapter(model, tmp_path / "adapter")
    assert path.name == "pytorch_lora_weights.safetensors"
    saved = load_file(path)
    assert set(saved) == set(state) and all(torch.equal(saved[k], state[k]) for k in state)
    again = small_flux()
    load_lora_moe(again, tmp_path / "adapter", top_k=2)
    inputs = small_inputs()
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, again(**inputs).sample)
    assert all(torch.equal(v, adapter_state(again)[k]) for k, v in adapter_state(model).items())


def test_saving_the_reference_checkpoint_gives_back_its_tensors(tmp_path):
    model = fixture_transformer()
    load_lora_moe(model, FIXTURE / "moe_lora")
    original = load_file(FIXTURE / "moe_lora" / "pytorch_lora_weights.safetensors")
    saved = load_file(save_adapter(model, tmp_path / "x.safetensors"))
    assert set(saved) == set(original) and all(torch.equal(saved[k], original[k]) for k in original)


def broken(mutate):
    model = small_flux()
    state = synthetic_checkpoint(model, num_experts=2, rank=2)
    mutate(state)
    return model, state


ROUTE = "transformer.single_transformer_blocks.1.proj_out.lora_route.weight"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda s: s.__setitem__("transformer.x_embedder.lora_A.weight", torch.zeros(2, 5)),
            r"^transformer\.x_embedder\.lora_A\.weight: shape \(2, 5\) does not fit the model \(expected \(2, 24\)\)$",
        ),
        (
            lambda s: s.__setitem__("transformer.nope.lora_A.weight", torch.zeros(2, 5)),
            r"^transformer\.nope\.lora_A\.weight: the model has no module 'nope'$",
        ),
        (
            lambda s: s.pop("transformer.transformer_blocks.1.ff.net.2.lora_B.expert_1.weight"),
            r"^transformer\.transformer_blocks\.1\.ff\.net\.2\.lora_B\.expert_1\.weight: missing expert$",
        ),
        (
            lambda s: s.pop(ROUTE),
            r"^transformer\.single_transformer_blocks\.1\.proj_out\.lora_route\.weight: missing",
        ),
        (
            lambda s: s.__setitem__(ROUTE, torch.zeros(3, 32)),
            r"lora_route\.weight: shape \(3, 32\).*expected",
        ),
        (
            lambda s: s.pop("transformer.x_embedder.lora_B.weight"),
            r"^transformer\.x_embedder\.lora_B\.weight: missing",
        ),
        (
            lambda s: s.__setitem__("transformer.x_embedder.alpha", torch.zeros(1)),
            r"^transformer\.x_embedder\.alpha: not a key of the ICEdit LoRA-MoE format$",
        ),
        (
            lambda s: s.__setitem__("transformer.x_embedder.lora_route.weight", torch.zeros(2, 24)),
            r"belong on ff\.net\.2 / proj_out, not on 'x_embedder'",
        ),
        (
            lambda s: s.__setitem__("transformer.norm_out.lora_A.weight", torch.zeros(2, 24)),
            r"module 'norm_out' is a AdaLayerNormContinuous, not a Linear layer",
        ),
    ],
)
def test_a_misfit_names_the_first_bad_key_and_leaves_the_model_untouched(mutate, message):
    model, state = broken(mutate)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match=message) as e:
        load_lora_moe(model, state)
    assert "\n" not in str(e.value)
    assert not any(isinstance(m, LoraMoeLinear) for m in model.modules())
    assert not getattr(model, "peft_config", None)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_pickle_files_and_bad_top_k_are_refused(tmp_path):
    model = small_flux()
    torch.save({"x": torch.zeros(1)}, tmp_path / "adapter.bin")
    with pytest.raises(
        UserError, match=r"pickle weights only \(\.bin/\.pt/\.ckpt\): icedit loads \.safetensors only"
    ):
        load_lora_moe(model, tmp_path / "adapter.bin")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_lora_moe(model, tmp_path / "junk.safetensors")
    save_file(synthetic_checkpoint(model, num_experts=2, rank=2), tmp_path / "ok.safetensors")
    with pytest.raises(UserError, match=r"top_k must be between 1 and the number of experts \(2\), not 3"):
        load_lora_moe(model, tmp_path / "ok.safetensors", top_k=3)


def test_full_size_flux_fill_checkpoint_is_placed_entirely_on_the_meta_device():
    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_FILL_TRANSFORMER)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 11.90  # FLUX.1's published size
    state = synthetic_checkpoint(model, num_experts=4, rank=32)
    report = load_lora_moe(model, state)
    plain = 1 + 19 * 5 + 38 * 5
    moe = 19 + 38
    assert (report.keys, report.plain_modules, report.moe_modules) == (len(state), plain, moe)
    assert len(state) == plain * 2 + moe * (4 * 2 + 1)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraMoeLinear)}
    assert sorted(layers) == sorted(
        n.removeprefix("transformer.").rsplit(".lora_", 1)[0]
        for n in state
        if n.endswith("lora_route.weight")
    )
    assert layers["transformer_blocks.0.ff.net.2"].lora_A.shape == (4 * 32, 12288)
    assert layers["single_transformer_blocks.37.proj_out"].lora_B.shape == (3072, 4 * 32)
    peft_layers = [n for n, m in model.named_modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")]
    assert len(peft_layers) == plain
    assert all(any(re.fullmatch(p, n) for p in PLAIN_TARGETS) for n in peft_layers)
    assert not any(any(re.fullmatch(p, n) for p in MOE_TARGETS) for n in peft_layers)


def test_routed_delta_runs_under_cpu_autocast():
    layer = random_moe(4, rank=3, top_k=1)
    x = torch.randn(2, 20, 24)
    with torch.no_grad():
        expected = layer.dense_delta(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the experts' matmuls come out in bf16
            routed = layer.routed_delta(x)
    assert routed.dtype == x.dtype
    assert ((routed - expected).norm() / expected.norm()).item() < 2e-2
