"""Typed boundary models: what crosses from the agent to plugins and back."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

Intent = Literal["edit", "undo", "redo", "retry", "answer", "clarify"]


class EditPlan(BaseModel):
    """What the rewriter understood: an intent and, for edits, the IC-prompt instruction."""

    intent: Intent
    instruction: str | None = Field(None, description='the clause after "... same as on the left but"')
    subject: str | None = None
    description: str | None = None
    ic_prompt: str | None = None
    rationale: str = ""
    fallback: str | None = Field(
        None, description="set by a rewriter that handed over to another: 'rules (why)'; shown as 'qwen_vl -> rules (why)'"
    )


class TurnSummary(BaseModel):
    """A past turn as the rewriter sees it, so "no, less" and "undo that" make sense."""

    message: str
    intent: Intent
    instruction: str | None = None


class EditRequest(BaseModel):
    """One edit for an engine: the source image, the plan, and the sampling parameters."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    source: Image.Image
    plan: EditPlan
    seed: int = Field(ge=0, lt=2**63)
    steps: int = Field(28, ge=1, le=200)
    guidance: float = Field(50.0, gt=0, le=200)
    native_size: bool = Field(False, description="keep the 512-wide panel instead of the source size")


class AdapterInfo(BaseModel):
    """The adapter an engine runs with, as `--json` and `icedit plugins` report it."""

    kind: Literal["lora", "lora-moe"]
    source: str
    keys: int = Field(description="checkpoint keys placed on the model (all of them, or loading failed)")
    num_experts: int = 0
    top_k: int | None = None
    scale: float = 1.0


class EditResult(BaseModel):
    """What an engine made: the edited image (right panel) and how."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    image: Image.Image
    seed: int
    ic_prompt: str
    nfe: int = Field(description="transformer evaluations spent")
    timings: dict[str, float] = {}
    random_weights: bool = False
    adapter: AdapterInfo | None = None


class Step(BaseModel):
    kind: Literal["step"] = "step"
    i: int
    n: int
    phase: str


class Candidates(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    kind: Literal["candidates"] = "candidates"
    previews: list[Any]


class Verdict(BaseModel):
    kind: Literal["verdict"] = "verdict"
    a: int
    b: int
    p: float


class Log(BaseModel):
    kind: Literal["log"] = "log"
    text: str


EngineEvent = Annotated[Step | Candidates | Verdict | Log, Field(discriminator="kind")]
