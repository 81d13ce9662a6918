"""ICEdit's LoRA-MoE on stock torch + peft, loading and saving the published checkpoint format.

The published adapter (``pytorch_lora_weights.safetensors``) holds plain LoRA layers
(``transformer.<module>.lora_A.weight`` / ``lora_B.weight``) and, on the double blocks' ``ff.net.2``
and the single blocks' ``proj_out``, N experts and a router
(``lora_A.expert_<i>.weight`` [r, in], ``lora_B.expert_<i>.weight`` [out, r], ``lora_route.weight`` [N, in]).
No alphas are stored: every scaling is 1. Plain layers go through stock peft; MoE layers through
`LoraMoeLinear`, which stacks the experts so a forward is two matmuls and a gate, not N pairs
(on a CPU it routes tokens instead; see `LoraMoeLinear`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn

from assistant.errors import UserError
from assistant.files import write_file
from plugins.icedit.loading import WEIGHTS_NAME

ADAPTER = "icedit"
PLAIN_TARGETS = (
    r"x_embedder",
    r"transformer_blocks\.\d+\.(norm1\.linear|attn\.to_q|attn\.to_k|attn\.to_v|attn\.to_out\.0)",
    r"single_transformer_blocks\.\d+\.(norm\.linear|proj_mlp|attn\.to_q|attn\.to_k|attn\.to_v)",
)
MOE_TARGETS = (r"transformer_blocks\.\d+\.ff\.net\.2", r"single_transformer_blocks\.\d+\.proj_out")
_KEY = re.compile(
    r"^transformer\.(?P<module>.+?)\.(?:lora_(?P<ab>[AB])(?:\.expert_(?P<expert>\d+))?|(?P<route>lora_route))\.weight$"
)


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


class LoadReport(BaseModel):
    """What `load_lora_moe` placed: every key of the checkpoint, or it raised."""

    keys: int
    plain_modules: int
    moe_modules: int
    num_experts: int
    top_k: int


def _resolve(path_or_hub_id: str | Path, revision: str | None = None) -> Path:
    """A local .safetensors file, a folder holding the published file name, or a hub repo id (at `revision`)."""
    from assistant import hub
    from plugins.icedit.loading import lora_artifact

    return hub.locate(lora_artifact(str(path_or_hub_id), revision))


def read_checkpoint(path_or_hub_id: str | Path, revision: str | None = None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _resolve(path_or_hub_id, revision)
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None


def is_lora_moe(state: Mapping[str, torch.Tensor]) -> bool:
    return any(".lora_route." in k for k in state)


def _linear(transformer: nn.Module, module: str, key: str) -> nn.Linear:
    try:
        found = transformer.get_submodule(module)
    except AttributeError:
        raise UserError(f"{key}: the model has no module '{module}'") from None
    if isinstance(found, LoraMoeLinear) or (hasattr(found, "base_layer") and hasattr(found, "lora_A")):
        raise UserError(f"{key}: module '{module}' already carries an adapter")
    if not isinstance(found, nn.Linear):
        raise UserError(f"{key}: module '{module}' is a {type(found).__name__}, not a Linear layer")
    return found


def _check(key: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise UserError(f"{key}: shape {tuple(tensor.shape)} does not fit the model (expected {shape})")


def plan_placement(transformer: nn.Module, state: Mapping[str, torch.Tensor]):
    """Check every key against the model before anything changes; the first misfit is the error.

    Returns ({plain module: (A, B)}, {moe module: (A stacked, B stacked, router)}).
    """
    plain: dict[str, dict[str, tuple[str, torch.Tensor]]] = defaultdict(dict)
    moe: dict[str, dict] = defaultdict(lambda: {"A": {}, "B": {}, "route": None})
    for key in sorted(state):
        m = _KEY.match(key)
        if m is None:
            raise UserError(f"{key}: not a key of the ICEdit LoRA-MoE format")
        module = m["module"]
        if m["route"] or m["expert"] is not None:
            if not any(re.fullmatch(p, module) for p in MOE_TARGETS):
                raise UserError(f"{key}: experts and routers belong on ff.net.2 / proj_out, not on '{module}'")
            slot = moe[module]
            if m["route"]:
                slot["route"] = (key, state[key])
            else:
                slot[m["ab"]][int(m["expert"])] = (key, state[key])
        else:
            plain[module][m["ab"]] = (key, state[key])

    placed_plain = {}
    for module, parts in plain.items():
        first = next(iter(parts.values()))[0]
        linear = _linear(transformer, module, first)
        if set(parts) != {"A", "B"}:
            missing = f"transformer.{module}.lora_{({'A', 'B'} - set(parts)).pop()}.weight"
            raise UserError(f"{missing}: missing (its partner {first} is there)")
        (key_a, a), (key_b, b) = parts["A"], parts["B"]
        rank = a.shape[0] if a.ndim == 2 else -1
        _check(key_a, a, (rank, linear.in_features))
        _check(key_b, b, (linear.out_features, rank))
        placed_plain[module] = (a, b)

    placed_moe = {}
    for module, slot in moe.items():
        any_key = (slot["route"] or next(iter({**slot["A"], **slot["B"]}.values())))[0]
        linear = _linear(transformer, module, any_key)
        if slot["route"] is None:
            raise UserError(f"transformer.{module}.lora_route.weight: missing (the experts of {module} need it)")
        route_key, route = slot["route"]
        count = route.shape[0] if route.ndim == 2 else -1
        _check(route_key, route, (count, linear.in_features))
        for ab in "AB":
            for i in range(count):
                if i not in slot[ab]:
                    raise UserError(f"transformer.{module}.lora_{ab}.expert_{i}.weight: missing expert")
            if extra := sorted(set(slot[ab]) - set(range(count))):
                raise UserError(
                    f"transformer.{module}.lora_{ab}.expert_{extra[0]}.weight: the router has only {count} experts"
                )
        rank = slot["A"][0][1].shape[0]
        for i in range(count):
            _check(slot["A"][i][0], slot["A"][i][1], (rank, linear.in_features))
            _check(slot["B"][i][0], slot["B"][i][1], (linear.out_features, rank))
        a = torch.cat([slot["A"][i][1] for i in range(count)], dim=0)
        b = torch.cat([slot["B"][i][1] for i in range(count)], dim=1)
        placed_moe[module] = (a, b, route)
    counts = {route.shape[0] for _, _, route in placed_moe.values()}
    if len(counts) > 1:
        raise UserError(f"the MoE layers disagree on the number of experts ({sorted(counts)})")
    return placed_plain, placed_moe


def load_lora_moe(
    transformer: nn.Module, path_or_hub_id: str | Path | Mapping[str, torch.Tensor], top_k: int = 1
) -> LoadReport:
    """Place every key of a published LoRA-MoE checkpoint on a FluxTransformer2DModel.

    Plain layers become a stock peft adapter named "icedit" (alpha = rank: scaling 1); MoE
    layers replace their Linear with `LoraMoeLinear`. All keys are checked first: a misfit
    raises one line naming the key and leaves the model untouched.
    """
    from peft import LoraConfig, set_peft_model_state_dict

    state = path_or_hub_id if isinstance(path_or_hub_id, Mapping) else read_checkpoint(path_or_hub_id)
    plain, moe = plan_placement(transformer, state)
    num_experts = next(iter(moe.values()))[2].shape[0] if moe else 0
    if moe and not 1 <= top_k <= num_experts:
        raise UserError(f"top_k must be between 1 and the number of experts ({num_experts}), not {top_k}")

    for module, (a, b, route) in moe.items():
        parent_name, _, child = module.rpartition(".")
        parent = transformer.get_submodule(parent_name)
        layer = LoraMoeLinear(getattr(parent, child), route.shape[0], a.shape[0] // route.shape[0], top_k)
        with torch.no_grad():
            for param, value in ((layer.lora_A, a), (layer.lora_B, b), (layer.lora_route, route)):
                param.copy_(value)
        setattr(parent, child, layer)

    if plain:
        ranks = {m: a.shape[0] for m, (a, _) in plain.items()}
        rank = max(set(ranks.values()), key=list(ranks.values()).count)
        config = LoraConfig(
            r=rank,
            lora_alpha=rank,
            target_modules="|".join(re.escape(m) for m in plain),
            rank_pattern={f"^{re.escape(m)}$": r for m, r in ranks.items() if r != rank},
            alpha_pattern={f"^{re.escape(m)}$": r for m, r in ranks.items() if r != rank},
        )
        transformer.add_adapter(config, adapter_name=ADAPTER)
        peft_state = {f"{m}.lora_{ab}.weight": t for m, (a, b) in plain.items() for ab, t in (("A", a), ("B", b))}
        result = set_peft_model_state_dict(transformer, peft_state, adapter_name=ADAPTER)
        if result.unexpected_keys:
            raise UserError(f"transformer.{result.unexpected_keys[0]}: peft did not place this key")
    return LoadReport(
        keys=len(state), plain_modules=len(plain), moe_modules=len(moe), num_experts=num_experts, top_k=top_k
    )


def adapter_state(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The loaded adapter in the published key format (experts unstacked, `transformer.` prefix)."""
    from peft import get_peft_model_state_dict

    state = {}
    if getattr(transformer, "peft_config", None) and ADAPTER in transformer.peft_config:
        for key, value in get_peft_model_state_dict(transformer, adapter_name=ADAPTER).items():
            state[f"transformer.{key}"] = value
    for name, layer in transformer.named_modules():
        if isinstance(layer, LoraMoeLinear):
            prefix = f"transformer.{name}"
            for i, (a, b) in enumerate(
                zip(layer.lora_A.split(layer.rank, dim=0), layer.lora_B.split(layer.rank, dim=1), strict=True)
            ):
                state[f"{prefix}.lora_A.expert_{i}.weight"] = a
                state[f"{prefix}.lora_B.expert_{i}.weight"] = b
            state[f"{prefix}.lora_route.weight"] = layer.lora_route
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_lora_moe(transformer: nn.Module, path: str | Path) -> Path:
    """Write the adapter in the published format (safetensors); a folder gets the published file name."""
    from safetensors.torch import save

    path = Path(path)
    if path.is_dir() or not path.suffix:
        path.mkdir(parents=True, exist_ok=True)
        path = path / WEIGHTS_NAME
    state = adapter_state(transformer)
    if not state:
        raise UserError("the model carries no LoRA-MoE adapter to save")
    return write_file(path, save(state, metadata={"format": "pt"}), force=True)


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


def synthetic_checkpoint(
    transformer: nn.Module, num_experts: int = 4, rank: int = 4, seed: int = 0, scale: float = 0.1
) -> dict[str, torch.Tensor]:
    """A random adapter in the published format for this model's shapes (tiny-moe, tests)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    device = next(transformer.parameters()).device

    def rand(*shape: int) -> torch.Tensor:
        if device.type == "meta":
            return torch.empty(*shape, device="meta")
        return torch.randn(*shape, generator=generator) * scale

    state = {}
    for name, module in transformer.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        key = f"transformer.{name}"
        if any(re.fullmatch(p, name) for p in PLAIN_TARGETS):
            state[f"{key}.lora_A.weight"] = rand(rank, module.in_features)
            state[f"{key}.lora_B.weight"] = rand(module.out_features, rank)
        elif any(re.fullmatch(p, name) for p in MOE_TARGETS):
            for i in range(num_experts):
                state[f"{key}.lora_A.expert_{i}.weight"] = rand(rank, module.in_features)
                state[f"{key}.lora_B.expert_{i}.weight"] = rand(module.out_features, rank)
            state[f"{key}.lora_route.weight"] = rand(num_experts, module.in_features)
    return state


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
        transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=pattern), adapter_name=ADAPTER)
        with torch.no_grad():
            for name in plain:
                a = transformer.get_submodule(name).lora_A[ADAPTER].weight
                a.copy_(_uniform(tuple(a.shape), generator))
    return [p for p in transformer.parameters() if p.requires_grad]


def restore_adapter(transformer: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a published-format state into the adapter the model already carries (resuming training).

    The keys must be exactly those `adapter_state` gives for this model, with the same shapes.
    """
    current = adapter_state(transformer)
    if missing := sorted(set(current) - set(state)):
        raise UserError(f"{missing[0]}: missing from the checkpoint")
    if extra := sorted(set(state) - set(current)):
        raise UserError(f"{extra[0]}: the model's adapter has no such weight")
    for key, value in state.items():
        _check(key, value, tuple(current[key].shape))
    with torch.no_grad():
        for name, layer in transformer.named_modules():
            prefix = f"transformer.{name}"
            if isinstance(layer, LoraMoeLinear):
                experts = range(layer.num_experts)
                layer.lora_A.copy_(torch.cat([state[f"{prefix}.lora_A.expert_{i}.weight"] for i in experts]))
                layer.lora_B.copy_(torch.cat([state[f"{prefix}.lora_B.expert_{i}.weight"] for i in experts], 1))
                layer.lora_route.copy_(state[f"{prefix}.lora_route.weight"])
            elif isinstance(getattr(layer, "lora_A", None), nn.ModuleDict) and ADAPTER in layer.lora_A:
                layer.lora_A[ADAPTER].weight.copy_(state[f"{prefix}.lora_A.weight"])
                layer.lora_B[ADAPTER].weight.copy_(state[f"{prefix}.lora_B.weight"])
