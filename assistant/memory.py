"""Where each model of a chat goes on one GPU: the placements of least cost whose peak fits.

Each plugin describes its models as `Part`s, each with the `Placement`s it supports (on the GPU,
quantized, offloaded, on the CPU); `plan_memory` picks one per part. The phases of a turn run one
after another (rewrite, encode, denoise, decode, judge), so the peak is what stays resident plus the
largest single phase. Engine-neutral host code: torch is imported only to ask about the GPU.
"""

from __future__ import annotations

import itertools
from typing import Any

from pydantic import BaseModel, Field, computed_field

GiB = 2**30
HEADROOM = 0.10
"""Share of the GPU a plan leaves free: the CUDA context with cuBLAS/cuDNN workspaces (0.5-1 GiB) and
the caching allocator's fragmentation (a few % of what it holds): 2.4 GiB of a 24 GiB card."""
ASSUMED_CAPABILITY = (8, 9)
"""CUDA compute capability assumed for a GPU planned by its size alone (`--gpu-memory`): Ada or Hopper."""

GPU_FLOPS = 4e14
"""The reference GPU that costs are in: bf16 matmuls at ~40% of an H100's 990 TFLOP/s."""
GPU_BYTES_PER_S = 3e12
"""Its memory bandwidth (H100 HBM3: 3.35 TB/s): a generated token reads every weight once."""
CPU_FLOPS = 1e12
"""The reference CPU: 16 cores with AVX-512, ~1 TFLOP/s reached in fp32 or bf16 matmuls."""
CPU_BYTES_PER_S = 5e10
"""Its memory bandwidth (dual-channel DDR5, ~50 GB/s reached)."""
HOST_TO_GPU_BYTES_PER_S = 8e9
"""CPU -> GPU copies from pageable memory, as accelerate's offload hooks make them (PCIe 4 x16 reaches
~25 GB/s only from pinned memory)."""


class Placement(BaseModel):
    """One way to run a part: what it holds where, and how slow a chat turn is with it."""

    label: str = Field(description="short, e.g. 'int8, prompt encoders on the CPU'")
    resident_gpu: int = Field(0, description="bytes held on the GPU all session")
    transient_gpu: int = Field(0, description="bytes brought onto the GPU only while it runs (offload)")
    activation_gpu: int = Field(0, description="peak working memory on the GPU while it runs")
    cpu: int = Field(0, description="bytes in CPU memory")
    cost: float = Field(description="estimated seconds of a chat turn on the reference machine below")
    settings: dict[str, Any] = Field(
        default_factory=dict, description="the plugin options it sets (`Settings.with_options`)"
    )
    requires: tuple[int, int] | None = Field(None, description="least CUDA compute capability it runs on")
    cpu_fallback: bool = Field(
        False,
        description="for a machine without a GPU: with one, chosen only when "
        "the forced settings leave nothing else (e.g. an engine on the CPU)",
    )
    note: str | None = None

    @property
    def on_gpu(self) -> bool:
        return bool(self.resident_gpu or self.transient_gpu or self.activation_gpu)


class Part(BaseModel):
    """A model (or a pipeline of models) that one plugin loads, with the placements it supports."""

    name: str = Field(description="key of the plan's choices: 'flux', 'vlm'")
    title: str = Field(description="'FLUX.1 Fill', 'Qwen2.5-VL-7B'")
    weights: int = Field(description="bytes of its weights as they sit on a GPU")
    options: list[Placement]
    alternatives: list[Part] = Field(
        default_factory=list,
        description="smaller models to suggest when it "
        "does not fit on the GPU (the plan checks that they would)",
    )
    switch: dict[str, Any] = Field(
        default_factory=dict,
        description="the options that choose this part instead of the configured one (for an alternative)",
    )


class MemoryPlan(BaseModel):
    """One placement per part, the peak they reach together on the GPU, and why."""

    capacity: int | None = Field(description="GPU bytes; None: no GPU")
    headroom: float
    choices: dict[str, Placement]
    titles: dict[str, str]
    remarks: dict[str, str] = Field(default_factory=dict, description="per part, a few words for explain()")
    estimated_peak: int = Field(description="GPU bytes at the busiest phase, headroom not included")
    cpu: int = Field(description="CPU bytes the choices hold")
    fits: bool
    forced: dict[str, Any] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)
    owners: dict[str, list[str]] = Field(
        default_factory=dict,
        description="per part, the plugins whose options its placement sets ('engine:icedit'); none: plain keys",
    )

    @computed_field  # type: ignore[prop-decorator]  # mypy refuses decorators over @property
    @property
    def usable(self) -> int | None:
        """What the parts may take: the capacity less the headroom."""
        return None if self.capacity is None else int(self.capacity * (1 - self.headroom))

    def settings_update(self) -> dict[str, Any]:
        """The options the choices set, each as its part's owners' own key (`engine:icedit.offload`), so a
        placement reaches no other plugin that happens to take the same key; a setting the person gave
        keeps its value ('cuda:1', not 'cuda')."""
        update = {}
        for part, choice in self.choices.items():
            for key, value in choice.settings.items():
                for owner in self.owners.get(part) or [""]:
                    update[f"{owner}.{key}" if owner else key] = self.forced.get(key, value)
        return update

    def explain(self) -> str:
        """One line for a status bar."""
        where = "no GPU" if self.capacity is None else f"{self.capacity / GiB:.0f} GiB GPU"
        parts = "; ".join(
            f"{self.titles[name]} {choice.label}"
            + (f" ({self.remarks[name]})" if name in self.remarks else "")
            for name, choice in self.choices.items()
        )
        line = f"{where}: {parts}"
        if self.capacity is not None:
            line += f"; peak ~{self.estimated_peak / GiB:.1f} GiB"
            if not self.fits and self.usable is not None:  # usable is None only without a capacity
                line += f", over the {self.usable / GiB:.1f} GiB usable"
        return line


def _agrees(placement: dict[str, Any], forced: dict[str, Any]) -> bool:
    """Whether a placement keeps every forced setting; a device 'cuda:1' agrees with 'cuda'."""

    def same(a: Any, b: Any) -> bool:
        return a == b or (isinstance(a, str) and isinstance(b, str) and a.split(":")[0] == b.split(":")[0])

    return all(same(v, forced[k]) for k, v in placement.items() if k in forced)


def _runs(option: Placement, capacity: int | None, capability: tuple[int, int] | None) -> bool:
    if capacity is None:
        return not option.on_gpu
    return option.requires is None or (capability is not None and capability >= option.requires)


def _why_not(option: Placement, capacity: int | None, capability: tuple[int, int] | None) -> str:
    if capacity is None or option.requires is None:  # with no `requires`, only a missing GPU stops it
        return "needs a CUDA GPU"
    have = "" if capability is None else f" (this GPU: {capability[0]}.{capability[1]})"
    return f"needs CUDA compute capability {option.requires[0]}.{option.requires[1]}{have}"


def _peak(choices: tuple[Placement, ...]) -> int:
    busiest = max((c.transient_gpu + c.activation_gpu for c in choices), default=0)
    return sum(c.resident_gpu for c in choices) + busiest


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def plan_memory(
    parts: list[Part],
    capacity: int | None,
    forced: dict[str, Any] | None = None,
    headroom: float = HEADROOM,
    capability: tuple[int, int] | None = None,
) -> MemoryPlan:
    """The combination of options of least cost whose peak fits `capacity` less `headroom`.

    `forced` holds the settings the person gave: options that contradict them are left out, and if
    what remains does not fit the plan keeps it anyway and says so. Options that need a compute
    capability above `capability` (None: unknown, so none is assumed) are skipped unless forced.
    """
    forced = forced or {}
    usable = None if capacity is None else capacity * (1 - headroom)
    notes: list[str] = []
    candidates = []
    for part in parts:
        allowed = [o for o in part.options if _agrees(o.settings, forced)]
        if not allowed:
            notes.append(f"{part.title}: the settings given match none of its placements; all are considered")
            allowed = part.options
        if capacity is not None:
            allowed = [o for o in allowed if not o.cpu_fallback] or allowed
        runnable = [o for o in allowed if _runs(o, capacity, capability)]
        if not runnable:
            runnable = allowed
            notes += [
                f"{part.title} {o.label} {_why_not(o, capacity, capability)}: loading it will fail"
                for o in allowed
            ]
        candidates.append(runnable)

    def fits(combo: tuple[Placement, ...]) -> bool:
        if usable is None:
            return not any(c.on_gpu for c in combo)
        return _peak(combo) <= usable

    combos = list(itertools.product(*candidates))
    fitting = [c for c in combos if fits(c)]
    if fitting:
        best = min(fitting, key=lambda c: (sum(o.cost for o in c), _peak(c)))
    else:
        best = min(combos, key=lambda c: (_peak(c), sum(o.cost for o in c)))
    peak = _peak(best)
    titles = {part.name: part.title for part in parts}
    remarks: dict[str, str] = {}
    if capacity is None or usable is None:  # the one is None when the other is
        notes.insert(0, "no CUDA GPU: every model runs on the CPU, slowly")
    elif not fitting:
        given = ", ".join(f"{k}={v}" for k, v in forced.items())
        what = f"the settings given ({given})" if given else "no placement"
        notes.insert(
            0,
            f"{what} need ~{_gib(peak)} of GPU memory, more than the {_gib(usable)} usable of "
            f"this {capacity / GiB:.0f} GiB GPU: expect out-of-memory errors",
        )
    else:
        for i, (part, choice) in enumerate(zip(parts, best, strict=True)):
            if not choice.on_gpu and any(o.on_gpu for o in candidates[i]):
                remarks[part.name] = _on_the_cpu(parts, i, fitting, best, capacity, notes)
                remarks[part.name] += _alternative(parts, i, capacity, forced, headroom, capability, notes)
    notes += [f"{titles[p.name]}: {c.note}" for p, c in zip(parts, best, strict=True) if c.note]
    held = [f"{titles[p.name]} {_gib(c.cpu)}" for p, c in zip(parts, best, strict=True) if c.cpu]
    if held:
        notes.append(f"CPU memory for weights: ~{_gib(sum(c.cpu for c in best))} ({', '.join(held)})")
    return MemoryPlan(
        capacity=capacity,
        headroom=headroom,
        choices={p.name: c for p, c in zip(parts, best, strict=True)},
        titles=titles,
        remarks=remarks,
        estimated_peak=peak,
        cpu=sum(c.cpu for c in best),
        fits=bool(fitting),
        forced=forced,
        notes=notes,
    )


def _on_the_cpu(
    parts: list[Part],
    i: int,
    fitting: list[tuple[Placement, ...]],
    best: tuple[Placement, ...],
    capacity: int,
    notes: list[str],
) -> str:
    """Why part i runs on the CPU although it has GPU placements: they fit beside the others at no cost, or
    only at more."""
    others = " and ".join(p.title for j, p in enumerate(parts) if j != i)
    beside = f" beside {others}" if others else ""
    on_gpu = [c for c in fitting if c[i].on_gpu]
    if not on_gpu:
        notes.append(
            f"{parts[i].title} runs on the CPU: it does not fit on this {capacity / GiB:.0f} GiB GPU{beside}"
        )
        return f"does not fit{beside}"
    rival = min(on_gpu, key=lambda c: sum(o.cost for o in c))
    slower = sum(o.cost for o in rival) - sum(o.cost for o in best)
    how = " and ".join(
        f"{p.title} {c.label}"
        for j, (p, c) in enumerate(zip(parts, rival, strict=True))
        if j != i and c != best[j]
    )
    notes.append(
        f"{parts[i].title} runs on the CPU: on this {capacity / GiB:.0f} GiB GPU it fits only with "
        f"{how}, ~{slower:.0f} s slower a turn"
    )
    return f"~{slower:.0f} s a turn slower on the GPU"


def _alternative(
    parts: list[Part],
    i: int,
    capacity: int,
    forced: dict[str, Any],
    headroom: float,
    capability: tuple[int, int] | None,
    notes: list[str],
) -> str:
    """The first of part i's alternatives that the plan would put on the GPU, as a remark and a note."""
    for alt in parts[i].alternatives:
        trial = plan_memory(
            [alt if j == i else p for j, p in enumerate(parts)], capacity, forced, headroom, capability
        )
        if trial.fits and trial.choices[alt.name].on_gpu:
            how = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in alt.switch.items())
            others = " and ".join(
                f"{trial.titles[n]} {c.label}" for n, c in trial.choices.items() if n != alt.name
            )
            beside = f" beside {others}" if others else ""
            notes.append(f"{alt.title} ({_gib(alt.weights)}) would run on the GPU{beside}: {how}")
            return f"; {alt.title} would"
    return ""


def gpu_capacity(device: str | int | None = None) -> tuple[int | None, tuple[int, int] | None]:
    """(total bytes, compute capability) of a CUDA device (default: the current one); (None, None) without."""
    import torch

    if not torch.cuda.is_available():
        return None, None
    props = torch.cuda.get_device_properties(torch.cuda.current_device() if device is None else device)
    return props.total_memory, (props.major, props.minor)


def plan_for(
    parts: list[Part],
    gpu_memory_gib: float | None = None,
    forced: dict[str, Any] | None = None,
    capability: tuple[int, int] | None = None,
    device: str | int | None = None,
) -> MemoryPlan:
    """The plan for a GPU of `gpu_memory_gib` (`--gpu-memory`; compute capability ASSUMED_CAPABILITY unless
    given), or, without it, for this machine's GPU (`device`), or for the CPU when there is none."""
    if gpu_memory_gib is not None:
        return plan_memory(
            parts, int(gpu_memory_gib * GiB), forced, capability=capability or ASSUMED_CAPABILITY
        )
    capacity, found = gpu_capacity(device)
    return plan_memory(parts, capacity, forced, capability=capability or found)
