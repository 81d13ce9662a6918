"""The offline rewriter: regular expressions, no model. The default, and the VLM's fallback."""

from __future__ import annotations

import re

from PIL import Image

import prompts
from assistant.models import MAX_STEPS, EditPlan, TurnSummary

_WORDS = r"[\s,.!?;:]*"
_LEADING = re.compile(
    r"^(?:(?:hey|hi|ok(?:ay)?|so|now|then|and|oh|oops|um+|hmm+|no|nope|also|kindly|please|pls"
    r"|(?:could|can|would|will) you(?: please)?|i(?:'d| would) like(?: you)? to|i want(?: you)? to"
    r"|let'?s|go ahead and|try to)\b" + _WORDS + r")+",
    re.IGNORECASE,
)
_TRAILING = re.compile(
    r"(?:"
    + _WORDS
    + r"\b(?:please|pls|thanks|thank you|thx|for me|if you can|if possible)\b)+"
    + _WORDS
    + r"$"
    r"|[\s.!?;:,]+$",
    re.IGNORECASE,
)
_INTENTS = [
    (
        "undo",
        re.compile(
            r"^(?:undo(?: (?:that|it|this|the last (?:edit|change|one)))?|go back|revert(?: that| it)?"
            r"|take (?:that|it) back|back|previous(?: one)?)$"
        ),
    ),
    ("redo", re.compile(r"^(?:redo(?: (?:that|it|this))?|go forward|put it back|bring it back|forward)$")),
    (
        "retry",
        re.compile(
            r"^(?:retry|re-?roll|again|(?:try|do it|do that) again(?: with .*)?|another one"
            r"|(?:try |use |with )?(?:an ?other|a different|a new|new|different) (?:seed|noise|sample|try)"
            r"|(?:try |give me )?(?:an ?other|a different) (?:version|variation|take)"
            r")$"
        ),
    ),
]
_WANT = re.compile(
    r"^(?:(?:i want|i'd like|i would like|i need) (?:it|this|the (?:image|photo|picture))(?: to)?"
    r"|(?:it|this|the (?:image|photo|picture)) (?:should|must|needs to|has to)) (be |look )?(.+)$",
    re.IGNORECASE,
)
_NOUN_PHRASE = re.compile(r"^(?:a|an|some) \S.*$", re.IGNORECASE)
_GO = (
    r"(?:(?:go|get|jump|move|skip) (?:back )?to|back to|return to|switch to|show(?: me)?|open|restore"
    r"|reset to|branch (?:off )?from|start (?:again |over )?(?:from|with))"
)
_TO_TURN = re.compile(rf"^(?:{_GO} )?(?:the )?(?:turn|version|step|picture|image|number|no\.?)? ?#?(\d+)$")
"""A move to a numbered turn: "go back to turn 2", "branch from #3" ("edit 7" stays an edit)."""
_TO_ORIGINAL = re.compile(
    rf"^(?:{_GO} )?the (?:original|first)(?: (?:image|picture|photo|one|version))?$|^start (?:again|over)$"
)

_THEN = r"(?<!back )(?<!since )(?<!until )(?<!till )(?<!by )(?<!from )(?<!just )then\b(?!\s*(?:[.!?]|$))"
""""then" as a sequence word: not the adverb of "like it did back then", "since then", "by then"."""
_SEQUENCE = re.compile(rf"\s*(?:;|,?\s*\b(?:and )?(?:{_THEN}|after that\b|afterwards\b),?)\s*", re.IGNORECASE)
"""Where a message asks for one change after another: "...; ...", "..., then ...", "... after that ..."
(only explicit sequence words: "add a hat and a scarf" is one edit, as the person wrote it)."""


def clean(message: str) -> str:
    """The request without greetings, politeness and end punctuation."""
    text = " ".join(message.replace("\u201c", '"').replace("\u201d", '"').split()).strip("\"'` ")
    previous = None
    while previous != text:
        previous = text
        text = _TRAILING.sub("", _LEADING.sub("", text)).strip("\"'` ")
    return text


def instruction_clause(text: str) -> str:
    """Fit a cleaned request after "... exactly the same as on the left but "."""
    if m := _WANT.match(text):
        verb = "look " if (m.group(1) or "").startswith("look") else ""
        text = f"make it {verb}{m.group(2)}"
    elif _NOUN_PHRASE.match(text):
        text = f"add {text[0].lower()}{text[1:]}"  # "A red scarf" -> "add a red scarf"
    first = text.split(" ", 1)[0]
    if first != "I" and not first.isupper():
        text = text[0].lower() + text[1:]
    return text


def steps_of(text: str, turns: list[TurnSummary] | None) -> list[str] | None:
    """The edits a cleaned request lists in order, or None when it is one request (or names something
    other than edits, like "add snow, then undo": that stays one message to read as a whole)."""
    pieces = [piece for piece in map(clean, _SEQUENCE.split(text)) if piece]
    if len(pieces) < 2 or any(intent_of(p) != "edit" or jump_of(p, turns) for p in pieces):
        return None
    return [instruction_clause(piece) for piece in pieces]


def intent_of(text: str) -> str:
    lowered = text.lower()
    for intent, pattern in _INTENTS:
        if pattern.match(lowered):
            return intent
    return "edit"


def original(turns: list[TurnSummary]) -> int | None:
    """The id of the picture the current one was made from, at the root of its path."""
    parents = {t.id: t.parent for t in turns}
    at = next((t.id for t in turns if t.current), None)
    while at is not None and parents.get(at) is not None:
        at = parents[at]
    return at


def jump_of(text: str, turns: list[TurnSummary] | None) -> EditPlan | None:
    """A move to a numbered turn ("go back to turn 2", "branch from #3") or to the original, or None."""
    lowered = text.lower()
    if (m := _TO_TURN.match(lowered)) and not lowered.isdigit():  # a bare "2" says too little
        return EditPlan(intent="jump", turn=int(m.group(1)), rationale=f"rules: go to turn {m.group(1)}")
    if _TO_ORIGINAL.match(lowered):
        root = original(turns or [])
        if root is None:
            return EditPlan(intent="clarify", rationale="Which picture? Say 'turn N' (see the history).")
        return EditPlan(intent="jump", turn=root, rationale=f"rules: back to the original (turn {root})")
    return None


class RulesRewriter:
    """Turns a plain request into an EditPlan without a model."""

    def rewrite(
        self,
        image: Image.Image,
        message: str,
        context: list[TurnSummary],
        turns: list[TurnSummary] | None = None,
    ) -> EditPlan:
        text = clean(message)
        if not text:
            return EditPlan(intent="clarify", rationale="What would you like to change in the picture?")
        if jump := jump_of(text, turns):
            return jump
        if steps := steps_of(text, turns):
            if len(steps) > MAX_STEPS:
                return EditPlan(
                    intent="clarify",
                    rationale=f"That is {len(steps)} edits: ask for at most {MAX_STEPS} in one message.",
                )
            return EditPlan(
                intent="edit",
                instruction=steps[0],
                then=steps[1:],
                rationale=f"rules: {len(steps)} edits, one after another",
            )
        intent = intent_of(text)
        if intent != "edit":
            return EditPlan(intent=intent, rationale=f"rules: read this as {intent}")
        instruction = instruction_clause(text)
        return EditPlan(
            intent="edit",
            instruction=instruction,
            ic_prompt=prompts.render("ic_edit.txt", instruction=instruction),
            rationale="rules: used your request as the edit instruction",
        )


class VerbatimRewriter:
    """Every message is an edit whose instruction is the message itself: no case, wording or punctuation
    changed, so `--rewriter verbatim` paints what the official inference script paints for the same text."""

    def rewrite(self, image: Image.Image, message: str, context: list[TurnSummary]) -> EditPlan:
        return EditPlan(
            intent="edit",
            instruction=message,
            ic_prompt=prompts.render("ic_edit.txt", instruction=message),
            rationale="verbatim: your message is the instruction",
        )
