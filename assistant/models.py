"""Typed boundary models: what crosses from the agent to plugins and back."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

import annotated_types
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

Intent = Literal["edit", "undo", "redo", "retry", "jump", "answer", "clarify"]
SEEDS = 2**63
"""Seeds are 0 <= seed < SEEDS everywhere (torch's generators take 64 bits; JSON and SQLite integers 63)."""


Seed = Annotated[int, Field(ge=0, lt=SEEDS)]
Steps = Annotated[int, Field(ge=1, le=200)]
Guidance = Annotated[float, Field(gt=0, le=200)]
CandidateCount = Annotated[int, Field(ge=1, le=16)]
EarlySteps = Annotated[int, Field(ge=1, le=199)]
AttemptCount = Annotated[int, Field(ge=1, le=16)]
Probability = Annotated[float, Field(ge=0, le=1)]
"""The sampling ranges, defined once: the models, settings, replay scripts, archives, the CLI's option
types (`command_kit.option_type`) and the chat's commands (`int_bounds`) all take them from here."""


def int_bounds(kind: object) -> tuple[int, int]:
    """The inclusive (low, high) of an integer range above."""
    low, high, _, _ = bounds(kind)
    return int(low), int(high)


def bounds(kind: object) -> tuple[Any, Any, bool, bool]:
    """(low, high, low_open, high_open) of a range above; an integer's open ends are closed one step in."""
    base, *meta = get_args(kind)
    low: Any = -math.inf  # the rules' bounds: ints stay ints (a seed's 2**63 - 1 is no float)
    high: Any = math.inf
    low_open = high_open = False
    for info in meta:
        for rule in getattr(info, "metadata", []):
            if isinstance(rule, annotated_types.Ge):
                low = rule.ge
            elif isinstance(rule, annotated_types.Gt):
                low, low_open = rule.gt, True
            elif isinstance(rule, annotated_types.Le):
                high = rule.le
            elif isinstance(rule, annotated_types.Lt):
                high, high_open = rule.lt, True
    if base is int:
        low, low_open = (low + 1, False) if low_open else (low, False)
        high, high_open = (high - 1, False) if high_open else (high, False)
    return low, high, low_open, high_open


def probability(value: object) -> float:
    """`value` as a probability, or a ValueError: what a judge answers is held to [0, 1] (bool is no number)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 <= value <= 1
    ):
        raise ValueError(f"judge returned {value!r}, not a probability")
    return float(value)


MAX_STEPS = 8
"""Edits one message may plan: more is a request to split up, not a plan to run unattended."""


def next_seed(seed: int, k: int = 1) -> int:
    """The k-th seed after `seed`, wrapping at SEEDS, so "try another seed" never leaves the range."""
    return (seed + k) % SEEDS


class EditPlan(BaseModel):
    """What the rewriter understood: an intent and, for edits, the IC-prompt instruction."""

    intent: Intent
    instruction: str | None = Field(None, description='the clause after "... same as on the left but"')
    subject: str | None = None
    description: str | None = None
    ic_prompt: str | None = Field(
        None,
        description="the prompt the engine ran with (ICEdit: the in-context diptych prompt); a rewriter may "
        "propose one, the agent stores the engine's own (`EditResult.prompt`). The name stays for stored sessions.",
    )
    turn: int | None = Field(None, description='for "jump": the id of the turn to go to')
    then: list[str] = Field(
        [],
        max_length=MAX_STEPS - 1,
        description='for "edit" of several changes: the instructions of the steps after `instruction`, in '
        "order; each step edits the one before's result and is its own turn",
    )
    rationale: str = ""
    fallback: str | None = Field(
        None,
        description="set by a rewriter that handed over to another: 'rules (why)'; shown as 'qwen_vl -> rules (why)'",
    )

    def steps(self) -> list[EditPlan]:
        """An edit's single-change steps, in order: itself when it has no `then`."""
        if not self.then:
            return [self]
        instructions = [self.instruction or "", *self.then]
        return [
            EditPlan(
                intent="edit",
                instruction=text,
                subject=self.subject if i == 0 else None,
                rationale=f"step {i + 1} of {len(instructions)}: {text}",
            )
            for i, text in enumerate(instructions)
        ]


class TurnSummary(BaseModel):
    """A past turn as the rewriter sees it, so "no, less", "undo that" and "back to turn 2" make sense."""

    message: str
    intent: Intent | None = Field(None, description="None for an opened image")
    instruction: str | None = None
    id: int | None = None
    parent: int | None = Field(None, description="the turn it was made from (None: an opened image)")
    current: bool = Field(False, description="the picture the person sees now")


class Choices(BaseModel):
    """What a rewriter may answer now: the intents that can apply to the session as it stands (no undo
    with nothing to undo, no redo with nothing undone, no retry before an edit, no jump with nowhere
    to go) and the turns a jump may name."""

    intents: list[Intent]
    turns: list[int] = Field([], description='ids a "jump" may name: the listed turns but the current one')

    @classmethod
    def anything(cls) -> Choices:
        """Every intent and no turn: a message read without a session (`icedit rewrite`)."""
        return cls(intents=[i for i in get_args(Intent) if i != "jump"])


class EditRequest(BaseModel):
    """One edit for an engine: the source image, the plan, and the sampling parameters."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    source: Image.Image
    plan: EditPlan
    seed: Seed
    steps: Steps = 28
    guidance: Guidance = 50.0
    native_size: bool = Field(False, description="keep the 512-wide panel instead of the source size")
    candidates: CandidateCount = Field(
        1, description="early filter: noises tried (seeds seed .. seed+M-1); the host runs it"
    )
    early_steps: EarlySteps = Field(4, description="early filter: steps run for every candidate")


class AdapterInfo(BaseModel):
    """The adapter an engine runs with, as `--json` and `icedit plugins` report it."""

    kind: str = Field(description="what the engine calls it: icedit's are 'lora' and 'lora-moe'")
    source: str
    keys: int = Field(description="checkpoint keys placed on the model (all of them, or loading failed)")
    num_experts: int = 0
    top_k: int | None = None
    gate: str | None = Field(None, description="a LoRA-MoE's router gate: 'topk' (published) or 'switch'")
    scale: float = 1.0
    revision: str | None = Field(None, description="the hub commit it was read from (None: a local file)")


class WeightsInfo(BaseModel):
    """The base model an engine painted with, as a replay elsewhere fetches the same weights again."""

    source: str = Field(description="hub id or local folder; for in-process random weights, the preset")
    revision: str | None = Field(None, description="the hub commit it was read from (None: not from the hub)")


class CandidateInfo(BaseModel):
    """One early-filter candidate: its seed, its x0 preview after the early steps, how it fared."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    seed: int
    preview: Image.Image = Field(exclude=True)
    preview_sha256: str
    wins: int = 0
    score: float = Field(0.0, description="sum over its matches of the probability it was the better one")


class VerdictInfo(BaseModel):
    """One tournament match: p = P(a follows the instruction better than b), both orders averaged."""

    a: int = Field(description="seed of the current best")
    b: int = Field(description="seed of the challenger")
    p: float
    p_ab: float | None = None
    p_ba: float | None = None
    winner: int
    note: str | None = Field(None, description="set when the judge failed and seed order decided")


class EditResult(BaseModel):
    """What an engine made: the edited image (right panel) and how."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    image: Image.Image
    seed: int
    prompt: str | None = Field(None, description="the prompt the engine ran with, as it ran it")
    nfe: int = Field(description="transformer evaluations spent")
    timings: dict[str, float] = {}
    random_weights: bool = False
    model: WeightsInfo | None = None
    adapter: AdapterInfo | None = None
    candidates: list[CandidateInfo] = []
    verdicts: list[VerdictInfo] = []
    extras: dict[str, str | int | float | bool | None] = Field(
        {}, description="engine-specific facts worth recording (stored with the turn's parameters)"
    )


class Step(BaseModel):
    kind: Literal["step"] = "step"
    i: int
    n: int
    phase: str


class Candidates(BaseModel):
    """The early filter's x0 previews (right panels), one per seed, before the judge looks."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    kind: Literal["candidates"] = "candidates"
    seeds: list[int]
    previews: list[Image.Image]


class Verdict(BaseModel):
    kind: Literal["verdict"] = "verdict"
    a: int
    b: int
    p: float


class Log(BaseModel):
    kind: Literal["log"] = "log"
    text: str


class Planned(BaseModel):
    """The agent split a message into several edits, run in this order (before the first runs)."""

    kind: Literal["plan"] = "plan"
    steps: list[str]


class Landed(BaseModel):
    """Step `step` of a plan of `of` steps is committed as `turn`: its picture and the one it was made
    from, so the chat shows each step as it lands."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    kind: Literal["landed"] = "landed"
    step: int
    of: int
    turn: int
    instruction: str
    image: Image.Image = Field(exclude=True)
    source: Image.Image = Field(exclude=True)


class Checked(BaseModel):
    """The self-check judged attempt `attempt` of at most `attempts` (score None: it could not)."""

    kind: Literal["checked"] = "checked"
    attempt: int
    attempts: int
    seed: int
    turn: int
    score: float | None
    accepted: bool


EngineEvent = Annotated[
    Step | Candidates | Verdict | Log | Planned | Landed | Checked, Field(discriminator="kind")
]
"""What a running turn reports: the engine's steps, previews, verdicts and logs, the agent's plan
steps and self-check scores."""


class Metric(BaseModel):
    """One number a scorer gives each edit, and how the report shows it."""

    model_config = ConfigDict(frozen=True)

    key: str = Field(description="its key in the scores and the report: 'l1', 'vie_sc'")
    label: str = Field(description="its name in the table: 'L1', 'VIE SC'")
    compares: str = Field(description="what it measures: 'edit vs target, pixels (MagicBrush)'")
    higher_is_better: bool
    digits: int = Field(4, description="decimals in the table")


@dataclass(frozen=True)
class Example:
    """One evaluated edit: the source, what the engine made of it, and what the dataset says it should be."""

    instruction: str
    source: Image.Image
    edit: Image.Image
    target: Image.Image | None = None
    source_caption: str | None = None
    target_caption: str | None = None


class Scores(BaseModel):
    """What a scorer says of one edit: a value (or None: not measurable here) per metric it declares,
    and anything worth keeping beside them (a VLM's raw answers, why a score is missing)."""

    values: dict[str, float | None]
    details: dict[str, Any] | None = None
