"""The tidy rewriter: a few keywords move through the history, anything else is the edit instruction."""

from __future__ import annotations

from PIL import Image

from assistant.models import EditPlan, TurnSummary

KEYWORDS = {
    "undo": "undo",
    "back": "undo",
    "redo": "redo",
    "forward": "redo",
    "retry": "retry",
    "again": "retry",
}
"""A message that is one of these words (any case, end punctuation ignored) is that intent."""


class TidyRewriter:
    """Whitespace collapsed, end punctuation dropped, the first letter lower-cased: "Add a hat!" edits
    with the instruction "add a hat". An empty message asks what to change."""

    def rewrite(self, image: Image.Image, message: str, context: list[TurnSummary]) -> EditPlan:
        text = " ".join("".join(c if c.isprintable() else " " for c in message).split()).rstrip(".!?,;: ")
        if not text:
            return EditPlan(intent="clarify", rationale="What would you like to change in the picture?")
        if intent := KEYWORDS.get(text.lower()):
            return EditPlan(intent=intent, rationale=f"tidy: read this as {intent}")
        instruction = text[0].lower() + text[1:]
        return EditPlan(
            intent="edit", instruction=instruction, rationale="tidy: your message, tidied, is the edit"
        )
