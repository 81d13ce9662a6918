"""ICEdit's LoRA-MoE layer on stock torch + peft, and the adapter a model carries.

Plain LoRA layers go through stock peft (adapter "icedit"); on the double blocks' ``ff.net.2`` and the
single blocks' ``proj_out``, `LoraMoeLinear` holds N experts and a router, stacked so a forward is two
matmuls and a gate, not N pairs (on a CPU it routes tokens instead; see `LoraMoeLinear`). The
published checkpoint format lives in `moe_checkpoint`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from assistant.errors import UserError

ADAPTER = "icedit"
PLAIN_TARGETS = (
    r"x_embedder",
    r"transformer_blocks\.\d+\.(norm1\.linear|attn\.to_q|attn\.to_k|attn\.to_v|attn\.to_out\.0)",
    r"single_transformer_blocks\.\d+\.(norm\.linear|proj_mlp|attn\.to_q|attn\.to_k|attn\.to_v)",
)
MOE_TARGETS = (r"transformer_blocks\.\d+\.ff\.net\.2", r"single_transformer_blocks\.\d+\.proj_out")
"""Where the LoRA-MoE puts experts. The normal LoRA (`RiverZ/normal-lora`) has plain LoRA there too: its
targets are PLAIN_TARGETS + MOE_TARGETS, the official `normal_lora.yaml`'s `target_modules`."""
Gate = Literal["topk", "switch"]
GATES: tuple[Gate, ...] = ("topk", "switch")
Init = Literal["gaussian", "uniform"]


class LoraMoeLinear(nn.Module):
    """`base(x) + sum_i w_i(x) B_i A_i x`, with w the gate's weights of each token's top-k experts.

    Experts are stacked: A is [N*r, in], B is [out, N*r]. Two ways to compute the same sum, picked
    by measurement (`benchmarks/moe.py`, figures in `benchmarks/RESULTS.md`):

    - dense (CUDA, and under `torch.compile`): the gate scales the N rank-r slices of A x and one
      matmul with B sums the chosen experts. Every expert sees every token, as in DESIGN.md's
      two-matmul layout; it has no host syncs and fixed shapes, and on a GPU the adapter is bound
      by reading x, not by FLOPs.
    - routed (CPU, when fewer than half the experts are chosen): each expert runs only on the
      tokens that chose it, so top-k of N does k/N of the FLOPs. A CPU is compute-bound here, and
      this is what gets the CPU past the issue's 2x over the reference loop at top-1 (the dense
      form does the reference's FLOPs and tops out near 1.5-1.8x at 512 tokens). Each chosen
      expert costs a gather of its tokens' rows of x, and rank-r matmuls run less efficiently
      than one N*r-wide matmul, so at k = N/2 (top-2 of 4) routed measured no faster than dense:
      there dense is kept. Tokens go in blocks of `ROUTE_BLOCK` so each gathered slice stays small.
      Layers narrower than `ROUTE_MIN_FEATURES` stay dense: there the per-expert Python loop
      costs more than the FLOPs it saves (the tiny preset's edit is 8% slower routed).

    Gates (`gate`): `topk`, the published one, weighs the chosen k experts by the softmax of their
    logits, so at k = 1 the weight is exactly 1 and the router gets no gradient; `switch` (Switch
    Transformer) weighs each chosen expert by its softmax probability over all N, which a top-1 router
    can learn from, and in training leaves the load-balancing term N * sum_i f_i P_i of each forward in
    `balance` (f_i: share of tokens sent to expert i, P_i: mean router probability of i).

    `counts`, when set to a zero int64 tensor of N, adds up the tokens each expert was chosen for
    (the trainer's per-expert token shares; with top-k, each token counts k times).
    """

    ROUTE_BLOCK = 512
    ROUTE_MIN_FEATURES = 1024

    def __init__(self, base: nn.Linear, num_experts: int, rank: int, top_k: int = 1, gate: Gate = "topk"):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise UserError(f"top_k must be between 1 and the number of experts ({num_experts}), not {top_k}")
        if gate not in GATES:
            raise UserError(f"unknown gate '{gate}' (known: {', '.join(GATES)})")
        self.base = base
        self.num_experts, self.rank, self.top_k, self.gate = num_experts, rank, top_k, gate
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.zeros(num_experts * rank, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, num_experts * rank, **kw))
        self.lora_route = nn.Parameter(torch.zeros(num_experts, base.in_features, **kw))
        self.enabled = True
        self.scale = 1.0
        self.counts: torch.Tensor | None = None
        self.balance: list[torch.Tensor] = []

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([..., k] weights, [..., k] expert indices) of each token, by the layer's gate.

        Under gradient checkpointing the forward runs again inside the backward pass; that rerun
        neither counts tokens nor leaves a balance term (the first run's are the step's)."""
        logits = F.linear(x, self.lora_route)
        first_run = torch._C._current_graph_task_id() == -1  # -1: not inside a backward pass
        if self.gate == "switch":
            probs = logits.float().softmax(dim=-1)
            top, experts = probs.topk(self.top_k, dim=-1)
            weights = top.to(x.dtype)
            if self.training and torch.is_grad_enabled():  # computed in the rerun too: it must save the same
                chosen = F.one_hot(experts, self.num_experts).float().flatten(0, -2).mean(0)
                term = self.num_experts * (chosen * probs.flatten(0, -2).mean(0)).sum()
                if first_run:
                    self.balance.append(term)
        else:
            top, experts = logits.topk(self.top_k, dim=-1)
            weights = top.softmax(dim=-1)
        if self.counts is not None and first_run:
            self.counts += torch.bincount(experts.flatten(), minlength=self.num_experts)
        return weights, experts

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """[..., N] expert weights per token, zero for the experts not chosen."""
        weights, experts = self.route(x)
        return weights.new_zeros(*weights.shape[:-1], self.num_experts).scatter(-1, experts, weights)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The experts' contribution, routed or dense as the class doc says (equal up to float rounding)."""
        if (
            x.device.type == "cpu"
            and 2 * self.top_k < self.num_experts
            and self.in_features >= self.ROUTE_MIN_FEATURES
            and not torch.compiler.is_compiling()
        ):
            return self.routed_delta(x)
        return self.dense_delta(x)

    def dense_delta(self, x: torch.Tensor) -> torch.Tensor:
        """Gate the N rank-r slices of A x, then one matmul with B."""
        hidden = F.linear(x, self.lora_A).unflatten(-1, (self.num_experts, self.rank))
        return F.linear((hidden * self.gates(x).unsqueeze(-1)).flatten(-2), self.lora_B)

    def routed_delta(self, x: torch.Tensor) -> torch.Tensor:
        """Per block of tokens, each expert's A and B on just the tokens whose top-k chose it."""
        flat = x.reshape(-1, self.in_features)
        a = self.lora_A.view(self.num_experts, self.rank, self.in_features)
        b = self.lora_B.view(self.out_features, self.num_experts, self.rank)
        out = flat.new_zeros(len(flat), self.out_features)
        all_weights, all_experts = self.route(flat)
        for start in range(0, len(flat), self.ROUTE_BLOCK):
            xb, ob = flat[start : start + self.ROUTE_BLOCK], out[start : start + self.ROUTE_BLOCK]
            weights = all_weights[start : start + self.ROUTE_BLOCK]
            experts = all_experts[start : start + self.ROUTE_BLOCK]
            for e in range(self.num_experts):
                token, slot = (experts == e).nonzero(as_tuple=True)
                if len(token):
                    hidden = F.linear(xb.index_select(0, token), a[e]) * weights[token, slot].unsqueeze(-1)
                    ob.index_add_(0, token, F.linear(hidden, b[:, e]).to(ob.dtype))  # autocast may narrow it
        return out.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        delta = self.delta(x.to(self.lora_A.dtype)).to(out.dtype)  # bf16 experts on an fp32 base (training)
        return out + (delta if self.scale == 1.0 else self.scale * delta)


def moe_layers(transformer: nn.Module) -> dict[str, LoraMoeLinear]:
    """The model's LoRA-MoE layers by module name."""
    return {n: m for n, m in transformer.named_modules() if isinstance(m, LoraMoeLinear)}


def set_scale(transformer: nn.Module, scale: float) -> None:
    """Adapter strength for plain and MoE layers alike (1 = the published function)."""
    if getattr(transformer, "peft_config", None) and ADAPTER in transformer.peft_config:
        transformer.set_adapters([ADAPTER], weights=[scale])
    for layer in moe_layers(transformer).values():
        layer.scale = scale


@contextmanager
def adapters_disabled(transformer: nn.Module) -> Iterator[None]:
    """Run the base model: peft layers and MoE layers both switched off, then back on."""
    moe = list(moe_layers(transformer).values())
    has_peft = bool(getattr(transformer, "peft_config", None))
    for m in moe:
        m.enabled = False
    if has_peft:
        transformer.disable_adapters()
    try:
        yield
    finally:
        for m in moe:
            m.enabled = True
        if has_peft:
            transformer.enable_adapters()


def _initial(shape: tuple[int, int], init: Init, rank: int, generator: torch.Generator) -> torch.Tensor:
    """A LoRA A matrix drawn on the CPU: `gaussian` is peft's `init_lora_weights="gaussian"` (std 1/r, the
    official trainer's), `uniform` nn.Linear's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (peft's default)."""
    if init == "gaussian":
        return torch.randn(shape, generator=generator) / rank
    bound = shape[1] ** -0.5
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def add_lora_moe(
    transformer: nn.Module,
    num_experts: int = 4,
    rank: int = 32,
    top_k: int = 1,
    seed: int = 0,
    init: Init = "gaussian",
    gate: Gate = "topk",
):
    """Freeze the model and give it a fresh, trainable LoRA-MoE that `moe_checkpoint.save_adapter` writes
    in the published format: plain LoRA (stock peft, alpha = rank) on PLAIN_TARGETS, `LoraMoeLinear` on
    MOE_TARGETS. Every A as `init` says, every router as nn.Linear starts (the official config names no
    router init), every B at zero, so the model's function is unchanged at step 0. The draws come from a
    CPU generator seeded with `seed`: the same adapter on every device and process. Returns the
    trainable parameters.
    """
    transformer.requires_grad_(False)
    generator = torch.Generator("cpu").manual_seed(seed)
    _add_plain(transformer, PLAIN_TARGETS, rank, init, generator)  # first: peft freezes what it did not add
    for name, linear in _linears(transformer, MOE_TARGETS):
        parent_name, _, child = name.rpartition(".")
        layer = LoraMoeLinear(linear, num_experts, rank, top_k, gate)
        with torch.no_grad():
            layer.lora_A.copy_(_initial(tuple(layer.lora_A.shape), init, rank, generator))
            layer.lora_route.copy_(_initial(tuple(layer.lora_route.shape), "uniform", rank, generator))
        setattr(transformer.get_submodule(parent_name), child, layer)
    return [p for p in transformer.parameters() if p.requires_grad]


def add_lora(transformer: nn.Module, rank: int = 32, seed: int = 0, init: Init = "gaussian"):
    """Freeze the model and give it a fresh, trainable normal LoRA (the `RiverZ/normal-lora` layout: plain
    LoRA on PLAIN_TARGETS + MOE_TARGETS, alpha = rank), drawn as `add_lora_moe` draws. Returns the
    trainable parameters."""
    transformer.requires_grad_(False)
    _add_plain(transformer, PLAIN_TARGETS + MOE_TARGETS, rank, init, torch.Generator("cpu").manual_seed(seed))
    return [p for p in transformer.parameters() if p.requires_grad]


def _linears(transformer: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
    return [
        (n, m)
        for n, m in transformer.named_modules()
        if isinstance(m, nn.Linear) and any(re.fullmatch(p, n) for p in targets)
    ]


def _add_plain(
    transformer: nn.Module, targets: tuple[str, ...], rank: int, init: Init, generator: torch.Generator
) -> None:
    """Stock peft LoRA (adapter ADAPTER, alpha = rank) on the Linear layers `targets` match."""
    from peft import LoraConfig

    names = [n for n, _ in _linears(transformer, targets)]
    if not names:
        return
    pattern = "|".join(f"(?:{p})" for p in targets)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=pattern), adapter_name=ADAPTER)
    with torch.no_grad():
        for name in names:
            a = transformer.get_submodule(name).lora_A[ADAPTER].weight
            a.copy_(_initial(tuple(a.shape), init, rank, generator))
