"""The published ICEdit LoRA-MoE checkpoint format: read, check, place on a model, save.

The published adapter (``pytorch_lora_weights.safetensors``) holds plain LoRA layers
(``transformer.<module>.lora_A.weight`` / ``lora_B.weight``) and, on the double blocks' ``ff.net.2``
and the single blocks' ``proj_out``, N experts and a router
(``lora_A.expert_<i>.weight`` [r, in], ``lora_B.expert_<i>.weight`` [out, r], ``lora_route.weight`` [N, in]).
No alphas are stored: every scaling is 1. The normal LoRA (`RiverZ/normal-lora`) is the same file
without experts and routers: diffusers' own LoRA keys, which stock `load_lora_weights` reads.

How it routes is not in the published file: a checkpoint `icedit train` wrote names its gate and top-k
in its safetensors metadata (`GATE_KEY`, `TOP_K_KEY`), and loading honours them (an explicit `--top-k`
wins); without them, a checkpoint gets the published `topk` gate with k = 1.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from pydantic import BaseModel
from torch import nn

from assistant.errors import UserError
from assistant.files import write_file
from plugins.icedit.loading import WEIGHTS_NAME
from plugins.icedit.moe import ADAPTER, GATES, MOE_TARGETS, PLAIN_TARGETS, Gate, LoraMoeLinear, moe_layers

GATE_KEY = "icedit_moe_gate"
TOP_K_KEY = "icedit_moe_top_k"


class Routing(NamedTuple):
    """How a checkpoint's experts were trained to route (the published ones: topk, k = 1)."""

    gate: Gate = "topk"
    top_k: int = 1


_KEY = re.compile(
    r"^transformer\.(?P<module>.+?)\.(?:lora_(?P<ab>[AB])(?:\.expert_(?P<expert>\d+))?|(?P<route>lora_route))\.weight$"
)


class LoadReport(BaseModel):
    """What `load_lora_moe` placed: every key of the checkpoint, or it raised."""

    keys: int
    plain_modules: int
    moe_modules: int
    num_experts: int
    top_k: int
    gate: Gate


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
        raise _unreadable(path, e) from None


def read_routing(path_or_hub_id: str | Path, revision: str | None = None) -> Routing:
    """The gate and top-k a checkpoint's metadata names; the published ones where it names none."""
    from safetensors import SafetensorError, safe_open

    path = _resolve(path_or_hub_id, revision)
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise _unreadable(path, e) from None
    gate = metadata.get(GATE_KEY, "topk")
    if gate not in GATES:
        raise UserError(f"{path}: its metadata names the gate '{gate}', which this version does not know")
    top_k = metadata.get(TOP_K_KEY, "1")
    if not (top_k.isdigit() and 1 <= int(top_k) <= 64):
        raise UserError(f"{path}: its metadata names top-k '{top_k}', not a number of experts")
    return Routing(gate, int(top_k))


def _unreadable(path: Path, e: Exception) -> UserError:
    return UserError(f"{path}: not a readable safetensors file ({e})")


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
                raise UserError(
                    f"{key}: experts and routers belong on ff.net.2 / proj_out, not on '{module}'"
                )
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
            raise UserError(
                f"transformer.{module}.lora_route.weight: missing (the experts of {module} need it)"
            )
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
    transformer: nn.Module,
    path_or_hub_id: str | Path | Mapping[str, torch.Tensor],
    top_k: int | None = None,
    gate: Gate | None = None,
    routing: Routing | None = None,
) -> LoadReport:
    """Place every key of a published LoRA-MoE checkpoint on a FluxTransformer2DModel.

    Plain layers become a stock peft adapter named "icedit" (alpha = rank: scaling 1); MoE
    layers replace their Linear with `LoraMoeLinear`, routed with `top_k` experts through `gate`;
    each None takes the checkpoint's `routing` (by default: a file's metadata, the published
    routing for a state given as tensors). All keys are checked first: a misfit raises one line
    naming the key and leaves the model untouched.
    """
    from peft import LoraConfig, set_peft_model_state_dict

    if isinstance(path_or_hub_id, Mapping):
        state, stored = path_or_hub_id, routing or Routing()
    else:
        state, stored = read_checkpoint(path_or_hub_id), routing or read_routing(path_or_hub_id)
    gate, top_k = gate or stored.gate, top_k or stored.top_k
    plain, moe = plan_placement(transformer, state)
    num_experts = next(iter(moe.values()))[2].shape[0] if moe else 0
    if moe and not 1 <= top_k <= num_experts:
        raise UserError(f"top_k must be between 1 and the number of experts ({num_experts}), not {top_k}")

    for module, (a, b, route) in moe.items():
        parent_name, _, child = module.rpartition(".")
        parent = transformer.get_submodule(parent_name)
        layer = LoraMoeLinear(
            getattr(parent, child), route.shape[0], a.shape[0] // route.shape[0], top_k, gate
        )
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
        peft_state = {
            f"{m}.lora_{ab}.weight": t for m, (a, b) in plain.items() for ab, t in (("A", a), ("B", b))
        }
        result = set_peft_model_state_dict(transformer, peft_state, adapter_name=ADAPTER)
        if result.unexpected_keys:
            raise UserError(f"transformer.{result.unexpected_keys[0]}: peft did not place this key")
    return LoadReport(
        keys=len(state),
        plain_modules=len(plain),
        moe_modules=len(moe),
        num_experts=num_experts,
        top_k=top_k,
        gate=gate,
    )


def adapter_state(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The loaded adapter in the published key format (experts unstacked, `transformer.` prefix)."""
    from peft import get_peft_model_state_dict

    state = {}
    if getattr(transformer, "peft_config", None) and ADAPTER in transformer.peft_config:
        for key, value in get_peft_model_state_dict(transformer, adapter_name=ADAPTER).items():
            state[f"transformer.{key}"] = value
    for name, layer in moe_layers(transformer).items():
        prefix = f"transformer.{name}"
        for i, (a, b) in enumerate(
            zip(layer.lora_A.split(layer.rank, dim=0), layer.lora_B.split(layer.rank, dim=1), strict=True)
        ):
            state[f"{prefix}.lora_A.expert_{i}.weight"] = a
            state[f"{prefix}.lora_B.expert_{i}.weight"] = b
        state[f"{prefix}.lora_route.weight"] = layer.lora_route
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_adapter(transformer: nn.Module, path: str | Path) -> Path:
    """Write the adapter in the published format (safetensors), a LoRA-MoE or a normal LoRA: the keys and
    metadata diffusers' `save_lora_weights` writes, plus the gate of a LoRA-MoE. A folder gets the
    published file name."""
    from safetensors.torch import save

    path = Path(path)
    if path.is_dir() or not path.suffix:
        path.mkdir(parents=True, exist_ok=True)
        path = path / WEIGHTS_NAME
    state = adapter_state(transformer)
    if not state:
        raise UserError("the model carries no adapter to save")
    metadata = {"format": "pt"}
    routings = {(m.gate, m.top_k) for m in moe_layers(transformer).values()}
    if len(routings) > 1:
        raise UserError(
            f"the MoE layers route in different ways ({sorted(routings)}): one file cannot say so"
        )
    if routings:
        gate, top_k = routings.pop()
        metadata |= {GATE_KEY: gate, TOP_K_KEY: str(top_k)}
    return write_file(path, save(state, metadata=metadata), force=True)


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
                layer.lora_B.copy_(
                    torch.cat([state[f"{prefix}.lora_B.expert_{i}.weight"] for i in experts], 1)
                )
                layer.lora_route.copy_(state[f"{prefix}.lora_route.weight"])
            elif isinstance(getattr(layer, "lora_A", None), nn.ModuleDict) and ADAPTER in layer.lora_A:
                layer.lora_A[ADAPTER].weight.copy_(state[f"{prefix}.lora_A.weight"])
                layer.lora_B[ADAPTER].weight.copy_(state[f"{prefix}.lora_B.weight"])
