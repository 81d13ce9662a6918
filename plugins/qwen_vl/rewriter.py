"""The VLM rewriter: image + request + recent turns -> JSON -> EditPlan; one retry, then the rules."""

from __future__ import annotations

import json
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

import prompts
from assistant.models import EditPlan, Intent, TurnSummary
from plugins.qwen_vl import model
from plugins.qwen_vl.options import QwenVlOptions
from plugins.qwen_vl.vision import image_part
from plugins.rules.rewriter import RulesRewriter

RETRY = "That answer is not valid ({error}). Reply again with only the JSON object, nothing else."


class PlanAnswer(BaseModel):
    """The plan for one request: the EditPlan fields a model can fill (the IC prompt is rendered from it)."""

    model_config = ConfigDict(extra="forbid")

    intent: Intent
    instruction: str | None = Field(
        None, description='for "edit": the clause after "... same as on the left but"'
    )
    turn: int | None = Field(None, description='for "jump": the id of the turn to go to')
    subject: str | None = Field(None, description="what the edit is about, if one thing")
    description: str | None = Field(None, description="what the picture shows now, briefly")
    rationale: str = Field(min_length=1, max_length=300, description="one line for the person")

    @model_validator(mode="after")
    def _edit_has_instruction(self) -> PlanAnswer:
        if self.intent == "edit" and not (self.instruction or "").strip():
            raise ValueError('intent "edit" needs a non-empty instruction')
        if self.intent == "jump" and self.turn is None:
            raise ValueError('intent "jump" needs the turn to go to')
        return self


def system_prompt() -> str:
    return prompts.render("rewrite.md", schema=json.dumps(PlanAnswer.model_json_schema()))


def request_text(message: str, context: list[TurnSummary], turns: list[TurnSummary] | None = None) -> str:
    """The request after a short, numbered summary of the turns that led to the current image, and the
    session's turns by id (what a jump may name)."""
    lines = [
        f'{i}. "{t.message}" -> {t.intent}' + (f": {t.instruction}" if t.instruction else "")
        for i, t in enumerate(context, 1)
    ]
    history = "Recent turns (oldest first):\n" + "\n".join(lines) if lines else "No earlier turns."
    if turns:
        listed = [
            f"#{t.id} "
            + (f"from #{t.parent}: {t.instruction or t.message}" if t.parent else f"opened: {t.message}")
            + (" (current)" if t.current else "")
            for t in turns
        ]
        history += "\nTurns of this session:\n" + "\n".join(listed)
    return f"{history}\nRequest: {message}"


def parse(answer: str) -> EditPlan:
    """The plan in a model's answer (the outermost {...}, code fences and chatter around it ignored)."""
    start, end = answer.find("{"), answer.rfind("}")
    fields = PlanAnswer.model_validate_json(answer[start : end + 1] if 0 <= start < end else answer)
    ic_prompt = (
        prompts.render("ic_edit.txt", instruction=fields.instruction) if fields.intent == "edit" else None
    )
    return EditPlan(**fields.model_dump(), ic_prompt=ic_prompt)


def short_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(map(str, first["loc"]))
    return f"{where}: {first['msg']}" if where else first["msg"]


class QwenRewriter:
    """Greedy JSON answers from the shared VLM; a `LogitsProcessorList` may steer decoding (tests script answers)."""

    def __init__(self, options: QwenVlOptions, logits_processor: Any = None):
        self.options = options
        self.logits_processor = logits_processor

    def rewrite(
        self,
        image: Image.Image,
        message: str,
        context: list[TurnSummary],
        turns: list[TurnSummary] | None = None,
    ) -> EditPlan:
        if self.options.vlm == "none":
            return self._fallback(image, message, context, turns, "no VLM: --vlm none")
        vlm = model.load(self.options)
        conversation: list[dict[str, Any]] = [
            {"role": "system", "content": system_prompt()},
            {
                "role": "user",
                "content": [
                    image_part(image, self.options.min_pixels, self.options.max_pixels),
                    {"type": "text", "text": request_text(message, context, turns)},
                ],
            },
        ]
        for _ in range(2):
            answer = vlm.generate(conversation, self.options.vlm_max_new_tokens, self.logits_processor)
            try:
                return parse(answer)
            except ValidationError as e:
                error = short_error(e)
            conversation += [
                {"role": "assistant", "content": answer},
                {"role": "user", "content": RETRY.format(error=error)},
            ]
        return self._fallback(image, message, context, turns, f"invalid answer twice: {error[:80]}")

    def _fallback(
        self,
        image: Image.Image,
        message: str,
        context: list[TurnSummary],
        turns: list[TurnSummary] | None,
        why: str,
    ) -> EditPlan:
        plan = RulesRewriter().rewrite(image, message, context, turns)
        return plan.model_copy(update={"fallback": f"rules ({why})"})
