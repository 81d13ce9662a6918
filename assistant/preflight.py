"""Before a command loads any weights: which artifacts it needs, all checked (and fetched) at once.

The engine, the rewriter and the judge name their weights through their specs' `artifacts`; the
command adds its own (the eval feature models). With real weights the VLM rewrites requests by
default; when its weights cannot be had now, the rules rewriter runs instead and the person is
told once (`Prepared.notes`). Anything else missing stops the command before anything loads, with
every missing artifact on its own line (`hub.preflight`).

On a CUDA machine the memory plan (`assistant.memory`, over the parts the specs' `memory` name)
then places each model by setting the plugins' placement options; the options the person gave
explicitly (flags, `--option`, ICEDIT_* variables) are kept as they are, so any placement can still
be forced.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict

from assistant import hub, plugins
from assistant.errors import UserError, WeightsMissing
from assistant.hub import Artifact, ArtifactStatus
from assistant.memory import MemoryPlan, Part
from assistant.settings import Settings

VLM_REWRITER, RULES_REWRITER = "qwen_vl", "rules"
UNCHECKED = "each edit once, unchecked"
"""What runs when the self-check's judge cannot: the attempts' fallback."""


class Prepared(BaseModel):
    """Settings ready to run (rewriter chosen), where each artifact stands, and what to tell the person."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    settings: Settings
    statuses: list[ArtifactStatus] = []
    notes: list[str] = []
    plan: MemoryPlan | None = None


ModelKind = Literal["engines", "rewriters", "judges", "scorers"]
"""The plugin kinds that load weights."""


def _artifacts(kind: ModelKind, name: str, settings: Settings) -> list[Artifact]:
    return list(plugins.call(kind, name, "artifacts", settings) or [])


def engine_has_weights(settings: Settings) -> bool:
    """Whether the engine runs a real model: it names weights besides adapters (a tiny preset names none)."""
    return any(not a.adapter for a in _artifacts("engines", settings.engine, settings))


def default_rewriter(settings: Settings) -> str:
    """The VLM when the engine runs a real model, the rules with random weights."""
    return VLM_REWRITER if engine_has_weights(settings) else RULES_REWRITER


def rewriter_name(settings: Settings) -> str:
    return settings.rewriter or default_rewriter(settings)


def checks(settings: Settings, attempts: int | None = None, check: bool | None = None) -> bool:
    """Whether edits are self-checked: as `check` says (given, else the settings'), and when neither
    says, whenever more than one attempt may run (`attempts` given, else the settings')."""
    check = settings.check if check is None else check
    return (attempts or settings.attempts) > 1 if check is None else check


def check_variations(variations: int, candidates: int, checked: bool) -> None:
    """-n N paints N pictures to choose from: not with what picks one picture itself (one line)."""
    if variations > 1 and (candidates > 1 or checked):
        what = "--candidates" if candidates > 1 else "the self-check (--attempts, --check)"
        raise UserError(
            f"-n {variations} paints {variations} pictures to choose from; {what} picks one itself: "
            "use one or the other"
        )


def runs_judge(settings: Settings, judge: bool | None) -> bool:
    """Whether the judge runs: asked for (`judge`), or (None) for the early filter or the self-check."""
    return bool(judge) or (judge is None and (settings.candidates > 1 or checks(settings)))


def needs(
    settings: Settings,
    *,
    engine: bool = True,
    rewriter: bool = True,
    judge: bool | None = None,
    scorers: Sequence[str] = (),
) -> list[Artifact]:
    """Every artifact these settings will load; the default rewriter's are optional (rules instead).
    `judge` None: the judge is needed when the early filter runs (candidates > 1) or the self-check
    (whose judge is optional: without it each edit runs once, unchecked); `scorers`: those `icedit
    eval` runs."""
    found = _artifacts("engines", settings.engine, settings) if engine else []
    if rewriter:
        chosen = _artifacts("rewriters", rewriter_name(settings), settings)
        if settings.rewriter is None:
            chosen = [
                a.model_copy(update={"required": False, "fallback": f"the {RULES_REWRITER} rewriter"})
                for a in chosen
            ]
        found += chosen
    if runs_judge(settings, judge):
        chosen = _artifacts("judges", settings.judge, settings)
        if judge is None and settings.candidates == 1:  # the self-check alone: it can be left out
            chosen = [a.model_copy(update={"required": False, "fallback": UNCHECKED}) for a in chosen]
        found += chosen
    for name in scorers:
        found += _artifacts("scorers", name, settings)
    return found


def require_on_disk(
    settings: Settings, *, engine: bool = True, rewriter: bool = True, judge: bool | None = None
) -> None:
    """One line when something `needs(settings, ...)` names is not complete on disk: a running chat
    turning on the early filter downloads nothing in the middle of the conversation."""
    for artifact in needs(settings, engine=engine, rewriter=rewriter, judge=judge):
        found = hub.status(artifact)
        if not found.cached:
            if found.problem is None:
                found.problem, found.fix = "not downloaded yet", "`icedit download --with-vlm` fetches it"
            raise WeightsMissing(found.line())


def prepare(
    settings: Settings,
    extra: list[Artifact] | None = None,
    *,
    engine: bool = True,
    rewriter: bool = True,
    judge: bool | None = None,
    scorers: Sequence[str] = (),
    plan: bool = True,
) -> Prepared:
    """Check every artifact (one report of all that are missing), fetch the missing ones, choose the
    rewriter, and on a CUDA machine place the models (`plan`: False where the command places them
    itself, as training does)."""
    statuses = hub.preflight(
        [*needs(settings, engine=engine, rewriter=rewriter, judge=judge, scorers=scorers), *(extra or [])]
    )
    notes = []
    if rewriter and settings.rewriter is None:
        name = default_rewriter(settings)
        lacking = _lacking(statuses, "rewriters", name, settings)
        if lacking:
            notes.append(
                f"the VLM rewriter cannot run ({lacking[0].artifact.name}: {lacking[0].problem}): "
                f"the {RULES_REWRITER} rewriter reads your requests instead (`icedit download --with-vlm` "
                "fetches the VLM)"
            )
            name = RULES_REWRITER
        settings = settings.model_copy(update={"rewriter": name})
    if judge is None and settings.candidates == 1 and checks(settings):
        lacking = _lacking(statuses, "judges", settings.judge, settings)
        if lacking:
            notes.append(
                f"the self-check cannot run ({lacking[0].artifact.name}: {lacking[0].problem}): "
                f"{UNCHECKED} (`icedit download --with-vlm` fetches the judge's VLM)"
            )
            settings = settings.model_copy(update={"check": False, "attempts": 1})
    placed = None
    if plan and _on_gpu(settings):
        placed = memory_plan(settings, engine=engine, rewriter=rewriter, judge=judge, scorers=scorers)
        settings = settings.with_options(**placed.settings_update())
        notes += placed.notes
    return Prepared(settings=settings, statuses=statuses, notes=notes, plan=placed)


def _lacking(
    statuses: list[ArtifactStatus], kind: ModelKind, name: str, settings: Settings
) -> list[ArtifactStatus]:
    """The statuses of the artifacts plugin `name` of `kind` names that cannot be had now."""

    def key(artifact: Artifact) -> tuple:
        return (artifact.ref, artifact.revision, artifact.layout, artifact.filename)

    wanted = {key(a) for a in _artifacts(kind, name, settings)}
    return [s for s in statuses if not s.usable and key(s.artifact) in wanted]


def _on_gpu(settings: Settings) -> bool:
    """A CUDA GPU is there and the person did not send the engine elsewhere (--device cpu)."""
    import torch

    return torch.cuda.is_available() and (
        plugins.option("engines", settings.engine, "device", settings) or "cuda"
    ).startswith("cuda")


def memory_plan(
    settings: Settings,
    gpu_memory_gib: float | None = None,
    *,
    engine: bool = True,
    rewriter: bool = True,
    judge: bool | None = None,
    scorers: Sequence[str] = (),
) -> MemoryPlan:
    """Where each model these settings run goes on this machine's GPU (or on one of `gpu_memory_gib`);
    the parts are those `needs` would check. Only placement settings the person gave are forced. Plugins
    that share a part (the Qwen rewriter, judge and scorer: one VLM) share its placement."""
    from assistant.memory import plan_for, plan_memory

    chosen: list[tuple[ModelKind, str]] = [("engines", settings.engine)] if engine else []
    chosen += [("rewriters", rewriter_name(settings))] if rewriter else []
    chosen += [("judges", settings.judge)] if runs_judge(settings, judge) else []
    chosen += [("scorers", name) for name in scorers]
    parts: dict[str, Part] = {}
    owners: dict[str, list[str]] = {}
    forced: dict[str, object] = {}
    for kind, name in chosen:
        for part in plugins.call(kind, name, "memory", settings) or []:
            parts.setdefault(part.name, part)  # the rewriter and the judge share one VLM
            owners.setdefault(part.name, []).append(f"{kind.removesuffix('s')}:{name}")
        if plugins.get(kind, name).options is not None:
            given = plugins.options_for(kind, name, settings)
            forced |= {k: getattr(given, k) for k in given.model_fields_set}
    keys = {k for part in parts.values() for option in part.options for k in option.settings}
    forced = {k: v for k, v in forced.items() if k in keys}
    device = plugins.option("engines", settings.engine, "device", settings)
    if gpu_memory_gib is None and device and not device.startswith("cuda"):
        plan = plan_memory(list(parts.values()), None, forced)
    else:
        plan = plan_for(list(parts.values()), gpu_memory_gib, forced, device=device)
    return plan.model_copy(update={"owners": owners})
