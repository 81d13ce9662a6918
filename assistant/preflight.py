"""Before a command loads any weights: which artifacts it needs, all checked (and fetched) at once.

The engine, the rewriter and the judge name their weights through their specs' `artifacts`; the
command adds its own (the eval feature models). With real weights the VLM rewrites requests by
default; when its weights cannot be had now, the rules rewriter runs instead and the person is
told once (`Prepared.notes`). Anything else missing stops the command before anything loads, with
every missing artifact on its own line (`hub.preflight`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from assistant import hub, plugins
from assistant.hub import Artifact, ArtifactStatus
from assistant.settings import Settings

VLM_REWRITER, RULES_REWRITER = "qwen_vl", "rules"


class Prepared(BaseModel):
    """Settings ready to run (rewriter chosen), where each artifact stands, and what to tell the person."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    settings: Settings
    statuses: list[ArtifactStatus] = []
    notes: list[str] = []


def _artifacts(kind: str, name: str, settings: Settings) -> list[Artifact]:
    spec = plugins.get(kind, name)
    return list(spec.artifacts(settings)) if spec.artifacts else []


def default_rewriter(settings: Settings) -> str:
    """The VLM when the engine runs a real model (it names one besides adapters), the rules with random ones."""
    real = any(not a.adapter for a in _artifacts("engines", settings.engine, settings))
    return VLM_REWRITER if real else RULES_REWRITER


def rewriter_name(settings: Settings) -> str:
    return settings.rewriter or default_rewriter(settings)


def needs(settings: Settings, *, engine: bool = True, rewriter: bool = True, judge: bool | None = None) -> list[Artifact]:
    """Every artifact these settings will load; the default rewriter's are optional (rules instead).
    `judge` None: the judge is needed when the early filter runs (candidates > 1)."""
    found = _artifacts("engines", settings.engine, settings) if engine else []
    if rewriter:
        chosen = _artifacts("rewriters", rewriter_name(settings), settings)
        if settings.rewriter is None:
            chosen = [a.model_copy(update={"required": False, "fallback": f"the {RULES_REWRITER} rewriter"})
                      for a in chosen]
        found += chosen
    if judge or (judge is None and settings.candidates > 1):
        found += _artifacts("judges", settings.judge, settings)
    return found


def prepare(settings: Settings, extra: list[Artifact] | None = None, *, engine: bool = True, rewriter: bool = True,
            judge: bool | None = None, fetch: bool = True) -> Prepared:
    """Check every artifact (one report of all that are missing), fetch the missing ones, choose the rewriter."""
    statuses = hub.preflight([*needs(settings, engine=engine, rewriter=rewriter, judge=judge), *(extra or [])],
                             fetch=fetch)
    notes = []
    if rewriter and settings.rewriter is None:
        name = default_rewriter(settings)
        lacking = [s for s in statuses if not s.usable and not s.artifact.required]
        if lacking:
            notes.append(f"the VLM rewriter cannot run ({lacking[0].artifact.name}: {lacking[0].problem}): "
                         f"the {RULES_REWRITER} rewriter reads your requests instead (`icedit download --with-vlm` "
                         "fetches the VLM)")
            name = RULES_REWRITER
        settings = settings.model_copy(update={"rewriter": name})
    return Prepared(settings=settings, statuses=statuses, notes=notes)
