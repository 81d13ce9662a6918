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


class LoraMoeLinear(nn.Module):
    """`base(x) + sum_i w_i(x) B_i A_i x`, with w the softmax over each token's top-k router logits.

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
    """

    ROUTE_BLOCK = 512
    ROUTE_MIN_FEATURES = 1024

    def __init__(self, base: nn.Linear, num_experts: int, rank: int, top_k: int = 1):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise UserError(f"top_k must be between 1 and the number of experts ({num_experts}), not {top_k}")
        self.base = base
        self.num_experts, self.rank, self.top_k = num_experts, rank, top_k
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.zeros(num_experts * rank, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, num_experts * rank, **kw))
        self.lora_route = nn.Parameter(torch.zeros(num_experts, base.in_features, **kw))
        self.enabled = True
        self.scale = 1.0

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """[..., N] expert weights per token: softmax over the top-k logits, zero elsewhere."""
        logits = F.linear(x, self.lora_route)
        top, index = logits.topk(self.top_k, dim=-1)
        return torch.zeros_like(logits).scatter(-1, index, top.softmax(dim=-1))

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
        for start in range(0, len(flat), self.ROUTE_BLOCK):
            xb, ob = flat[start : start + self.ROUTE_BLOCK], out[start : start + self.ROUTE_BLOCK]
            top, experts = F.linear(xb, self.lora_route).topk(self.top_k, dim=-1)
            weights = top.softmax(dim=-1)
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
        delta = self.delta(x)
        return out + (delta if self.scale == 1.0 else self.scale * delta)


def set_scale(transformer: nn.Module, scale: float) -> None:
    """Adapter strength for plain and MoE layers alike (1 = the published function)."""
    if getattr(transformer, "peft_config", None) and ADAPTER in transformer.peft_config:
        transformer.set_adapters([ADAPTER], weights=[scale])
    for layer in transformer.modules():
        if isinstance(layer, LoraMoeLinear):
            layer.scale = scale


@contextmanager
def adapters_disabled(transformer: nn.Module) -> Iterator[None]:
    """Run the base model: peft layers and MoE layers both switched off, then back on."""
    moe = [m for m in transformer.modules() if isinstance(m, LoraMoeLinear)]
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


def _uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """nn.Linear's (and peft's) default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn on the CPU."""
    bound = shape[1] ** -0.5
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def add_lora_moe(transformer: nn.Module, num_experts: int = 4, rank: int = 32, top_k: int = 1, seed: int = 0):
    """Freeze the model and give it a fresh, trainable adapter that `save_lora_moe` writes in the published format.

    Plain LoRA (stock peft, alpha = rank) on PLAIN_TARGETS and `LoraMoeLinear` on MOE_TARGETS. Every A and
    router starts as nn.Linear does, every B at zero, so the model's function is unchanged at step 0. The
    draws come from a CPU generator seeded with `seed`: the same adapter on every device and process.
    Returns the trainable parameters.
    """
    from peft import LoraConfig

    transformer.requires_grad_(False)
    generator = torch.Generator("cpu").manual_seed(seed)
    linears = [(n, m) for n, m in transformer.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in linears:
        if any(re.fullmatch(p, name) for p in MOE_TARGETS):
            parent_name, _, child = name.rpartition(".")
            layer = LoraMoeLinear(linear, num_experts, rank, top_k)
            with torch.no_grad():
                layer.lora_A.copy_(_uniform(tuple(layer.lora_A.shape), generator))
                layer.lora_route.copy_(_uniform(tuple(layer.lora_route.shape), generator))
            setattr(transformer.get_submodule(parent_name), child, layer)
    plain = [n for n, _ in linears if any(re.fullmatch(p, n) for p in PLAIN_TARGETS)]
    if plain:
        pattern = "|".join(f"(?:{p})" for p in PLAIN_TARGETS)
        transformer.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, target_modules=pattern), adapter_name=ADAPTER
        )
        with torch.no_grad():
            for name in plain:
                a = transformer.get_submodule(name).lora_A[ADAPTER].weight
                a.copy_(_uniform(tuple(a.shape), generator))
    return [p for p in transformer.parameters() if p.requires_grad]
