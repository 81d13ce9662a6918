"""The VLM rewriter: image + request + recent turns -> JSON -> EditPlan.

The JSON is written under a schema built for the request (`answer_schema`, `plugins.qwen_vl.grammar`):
only the intents that can apply now, a jump only to a listed turn, an edit only with an instruction,
every string capped, so even a model with random weights answers a plan the agent can carry out.
An answer that still does not parse (grammar off, or cut short by the token limit) is retried once
quoting the error, then the rules read the message. An answer that parses but names what cannot
apply now (a turn the session lacks, an undo with nothing to undo) is retried once too; if the
retry does no better the plan goes to the agent as it is, whose check says so in one line: a move
the person asked for is never turned into an edit by guessing.
"""

from __future__ import annotations

import json
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

import prompts
from assistant.models import MAX_STEPS, Choices, EditPlan, Intent, TurnSummary
from plugins.qwen_vl import grammar, model
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
    then: list[str] = Field(
        [], max_length=MAX_STEPS - 1, description='for "edit" of several changes: the later ones, in order'
    )
    subject: str | None = Field(None, description="what the edit is about, if one thing")
    description: str | None = Field(None, description="what the picture shows now, briefly")
    rationale: str = Field(min_length=1, max_length=300, description="one line for the person")

    @model_validator(mode="after")
    def _edit_has_instruction(self) -> PlanAnswer:
        if self.intent == "edit" and not (self.instruction or "").strip():
            raise ValueError('intent "edit" needs a non-empty instruction')
        if self.intent == "jump" and self.turn is None:
            raise ValueError('intent "jump" needs the turn to go to')
        if any(not step.strip() for step in self.then):
            raise ValueError('every step in "then" needs an instruction')
        return self


TEXT_CHARS = {"instruction": 120, "subject": 60, "description": 160, "rationale": 200}
"""Caps on what the model writes under the grammar: an instruction is one short clause (ICEdit's are a
few words), a rationale one line. They bound an answer: a plan of 8 steps fits `vlm_max_new_tokens`."""
_WORDS = r"^\S(.*\S)?$"
"""A string that is not empty and neither starts nor ends with whitespace."""


def answer_schema(choices: Choices) -> dict[str, Any]:
    """The JSON schema one answer is written under: one branch per intent that can apply now, each
    naming exactly what that intent needs (an edit its instruction, a jump one of the listed turns)."""

    def text(field: str) -> dict[str, Any]:
        return {"type": "string", "minLength": 1, "maxLength": TEXT_CHARS[field], "pattern": _WORDS}

    def branch(intent: str, needs: dict[str, Any], may: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {"intent": {"const": intent}, **needs, **may, "rationale": text("rationale")},
            "required": ["intent", *needs, "rationale"],
            "additionalProperties": False,
        }

    steps = {"type": "array", "items": text("instruction"), "maxItems": MAX_STEPS - 1}
    branches = []
    for intent in dict.fromkeys([*choices.intents, "clarify"]):  # a question back is always possible
        if intent == "edit":
            may = {"then": steps, "subject": text("subject"), "description": text("description")}
            branches.append(branch(intent, {"instruction": text("instruction")}, may))
        elif intent == "jump":
            if choices.turns:
                branches.append(branch(intent, {"turn": {"enum": choices.turns}}, {}))
        else:
            branches.append(branch(intent, {}, {"description": text("description")}))
    return {"anyOf": branches}


def unusable(plan: EditPlan, choices: Choices | None) -> str | None:
    """Why a parsed plan cannot be carried out now (None: it can)."""
    if choices is None:
        return None
    if plan.intent not in choices.intents:
        return f'intent "{plan.intent}" cannot apply now: choose one of {", ".join(choices.intents)}'
    if plan.intent == "jump" and plan.turn not in choices.turns:
        return f"turn {plan.turn} is not one of this session's turns: {', '.join(map(str, choices.turns))}"
    return None


def system_prompt() -> str:
    return prompts.render("rewrite.md", schema=json.dumps(PlanAnswer.model_json_schema()))


def request_text(
    message: str,
    context: list[TurnSummary],
    turns: list[TurnSummary] | None = None,
    choices: Choices | None = None,
) -> str:
    """The request after a short, numbered summary of the turns that led to the current image, and the
    session's turns by id (what a jump may name); then what can apply now, so the model can say so when
    the person asks for what cannot (the grammar leaves out the rest)."""
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
    text = f"{history}\nRequest: {message}"
    if choices is not None:
        text += "\nPossible now: " + ", ".join(choices.intents)
    return text


def parse(answer: str) -> EditPlan:
    """The plan in a model's answer (the outermost {...}, code fences and chatter around it ignored)."""
    start, end = answer.find("{"), answer.rfind("}")
    fields = PlanAnswer.model_validate_json(answer[start : end + 1] if 0 <= start < end else answer)
    ic_prompt = (
        prompts.render("ic_edit.txt", instruction=fields.instruction)
        if fields.intent == "edit" and not fields.then
        else None
    )
    steps = {"then": fields.then if fields.intent == "edit" else []}  # only an edit has steps
    return EditPlan(**fields.model_dump() | steps, ic_prompt=ic_prompt)


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
        choices: Choices | None = None,
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
                    {"type": "text", "text": request_text(message, context, turns, choices)},
                ],
            },
        ]
        schema = answer_schema(choices or Choices.anything())
        unfit: EditPlan | None = None
        for _ in range(2):
            try:
                answer = vlm.generate(
                    conversation, self.options.vlm_max_new_tokens, self._steering(vlm, schema)
                )
            except grammar.GrammarError as e:  # the constraint itself failed: a free answer is all there is
                answer, error = "", str(e)
            else:
                try:
                    plan = parse(answer)
                except ValidationError as e:
                    error = short_error(e)
                else:
                    if (error := unusable(plan, choices) or "") == "":
                        return plan
                    unfit = plan
            conversation += [
                {"role": "assistant", "content": answer},
                {"role": "user", "content": RETRY.format(error=error)},
            ]
        if unfit is not None:  # the agent's own check tells the person what cannot be done
            return unfit
        return self._fallback(image, message, context, turns, f"invalid answer twice: {error[:80]}")

    def _steering(self, vlm: model.Vlm, schema: dict[str, Any]) -> Any:
        """The logits processors of one answer: the schema's constraint (unless `vlm_grammar` is off),
        then any given one (tests script answers through it)."""
        from transformers import LogitsProcessorList

        given = list(self.logits_processor or [])
        if not self.options.vlm_grammar:
            return LogitsProcessorList(given)
        vocab = vlm.model.config.get_text_config().vocab_size
        eos = vlm.stop_ids()
        try:
            constraint = grammar.SchemaConstraint(
                grammar.tokenizer_of(vlm.processor.tokenizer, vocab, eos), schema, vocab, eos
            )
        except grammar.GrammarError:  # a tokenizer llguidance cannot read: decode freely, parse, retry
            return LogitsProcessorList(given)
        return LogitsProcessorList([constraint, *given])

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
