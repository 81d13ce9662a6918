"""The offline rewriters: a plain request in, an EditPlan in ICEdit's instruction form out."""

import pytest
from PIL import Image

import prompts
from plugins.rules.rewriter import RulesRewriter, VerbatimRewriter

IC_PREFIX = (
    "A diptych with two side-by-side images of the same scene. "
    "On the right, the scene is exactly the same as on the left but "
)


def rewrite(message: str):
    return RulesRewriter().rewrite(None, message, [])


@pytest.mark.parametrize(
    ("message", "instruction"),
    [
        ("Please make it look like winter!", "make it look like winter"),
        ("make it look like winter, please!", "make it look like winter"),
        ("Please make it look like winter please", "make it look like winter"),
        ("could you add a red scarf, thanks", "add a red scarf"),
        ("hey, can you please make it snowy?", "make it snowy"),
        ("Let's add a hat", "add a hat"),
        ("a red scarf", "add a red scarf"),
        ("A red scarf", "add a red scarf"),
        ("an owl on the branch", "add an owl on the branch"),
        ("Some snow on the roof", "add some snow on the roof"),
        ("I want it to look like autumn", "make it look like autumn"),
        ("I would like it to be snowy", "make it snowy"),
        ("it should be brighter.", "make it brighter"),
        ("The image needs to be sharper", "make it sharper"),
        ("This should look like a painting", "make it look like a painting"),
        ("Make the sky PINK", "make the sky PINK"),
        ("NASA logo on the shirt", "NASA logo on the shirt"),
        ('"add snow"', "add snow"),
        ("  add   snow  ", "add snow"),
    ],
)
def test_a_request_becomes_an_instruction_and_its_ic_prompt(message, instruction):
    plan = rewrite(message)
    assert plan.intent == "edit"
    assert plan.instruction == instruction
    assert plan.ic_prompt == prompts.render("ic_edit.txt", instruction=instruction)
    assert plan.ic_prompt == IC_PREFIX + instruction
    assert plan.rationale == "rules: used your request as the edit instruction"


def test_the_ic_prompt_template_is_icedits_diptych_sentence():
    assert prompts.render("ic_edit.txt", instruction="add a hat") == IC_PREFIX + "add a hat"
    assert rewrite("add a hat").ic_prompt.startswith(IC_PREFIX)


@pytest.mark.parametrize(
    ("message", "intent"),
    [
        ("undo that", "undo"),
        ("no, undo that please", "undo"),
        ("Undo.", "undo"),
        ("go back", "undo"),
        ("oops, go back", "undo"),
        ("revert it", "undo"),
        ("redo", "redo"),
        ("Redo please", "redo"),
        ("put it back", "redo"),
        ("try another seed", "retry"),
        ("another seed please", "retry"),
        ("Try again", "retry"),
        ("Reroll", "retry"),
        ("give me a different version", "retry"),
    ],
)
def test_history_moves_and_retries_are_read_as_such_without_an_instruction(message, intent):
    plan = rewrite(message)
    assert plan.intent == intent
    assert plan.instruction is None
    assert plan.ic_prompt is None
    assert plan.rationale == f"rules: read this as {intent}"


@pytest.mark.parametrize("message", ["please", "Please!", "thank you", "Hey!", "no", "   ", ""])
def test_nothing_but_politeness_asks_what_to_change(message):
    plan = rewrite(message)
    assert plan.intent == "clarify"
    assert plan.instruction is None
    assert plan.ic_prompt is None
    assert plan.rationale == "What would you like to change in the picture?"


def test_undo_inside_a_longer_request_is_an_edit_not_a_history_move():
    plan = rewrite("undo the snow and add rain")
    assert plan.intent == "edit"
    assert plan.instruction == "undo the snow and add rain"


@pytest.mark.parametrize(
    "message",
    [
        "Make her hair dark green and her clothes checked.",
        "undo",
        "  please   add a hat!  ",
        "try another seed",
    ],
)
def test_verbatim_passes_the_message_unchanged_as_the_edit_instruction(message):
    plan = VerbatimRewriter().rewrite(Image.new("RGB", (8, 8)), message, [])
    assert (plan.intent, plan.instruction) == ("edit", message)
    assert plan.ic_prompt == prompts.render("ic_edit.txt", instruction=message)


def _turns():
    """A session: #1 the photo, #2 and #3 edits of it, #4 another photo opened, #5 its edit (current)."""
    from assistant.models import TurnSummary

    return [
        TurnSummary(message="open cat.png", id=1),
        TurnSummary(message="add a hat", intent="edit", instruction="add a hat", id=2, parent=1),
        TurnSummary(message="add snow", intent="edit", instruction="add snow", id=3, parent=2),
        TurnSummary(message="open dog.png", id=4),
        TurnSummary(
            message="add a scarf", intent="edit", instruction="add a scarf", id=5, parent=4, current=True
        ),
    ]


@pytest.mark.parametrize(
    ("message", "turn"),
    [
        ("go back to turn 2", 2),
        ("Go back to turn 2, please", 2),
        ("branch from turn 3", 3),
        ("branch off from #3", 3),
        ("jump to 1", 1),
        ("turn 4", 4),
        ("show me version 2", 2),
        ("start again from the original", 4),  # the original of the picture shown now, not the first photo
        ("back to the original image", 4),
        ("start over", 4),
        ("restore the original", 4),
    ],
)
def test_a_numbered_turn_or_the_original_is_a_jump(message, turn):
    plan = RulesRewriter().rewrite(None, message, [], _turns())
    assert (plan.intent, plan.turn, plan.instruction) == ("jump", turn, None)


@pytest.mark.parametrize("message", ["2", "add 2 hats", "make it 3d", "go back", "give it turn signals"])
def test_numbers_in_edits_and_a_bare_number_are_not_jumps(message):
    assert RulesRewriter().rewrite(None, message, [], _turns()).intent != "jump"


def test_the_original_without_the_sessions_turns_asks_which_picture():
    plan = RulesRewriter().rewrite(None, "start over", [])
    assert (plan.intent, plan.rationale) == ("clarify", "Which picture? Say 'turn N' (see the history).")
