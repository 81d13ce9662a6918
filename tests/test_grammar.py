"""Plans valid by construction (issue 18, part 4): the VLM writes its JSON under a schema built for the
request, so even the tiny random model answers a plan the agent can carry out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from tiny_qwen import make_tokenizer, save_tiny_qwen

from assistant.agent import Agent
from assistant.cli import cli
from assistant.hookspecs import hookimpl
from assistant.models import Choices, EditPlan
from assistant.plugins import RewriterSpec
from assistant.settings import Settings
from assistant.testing import registered
from plugins.qwen_vl import grammar
from plugins.qwen_vl.options import QwenVlOptions
from plugins.qwen_vl.rewriter import TEXT_CHARS, QwenRewriter, answer_schema, unusable

CHELSEA = Path(__file__).resolve().parent.parent / "examples" / "chelsea.png"
SMALL = {"vlm_device": "cpu", "min_pixels": 28 * 28, "max_pixels": 56 * 56}
EVERYTHING = Choices(intents=["edit", "undo", "redo", "retry", "jump", "answer", "clarify"], turns=[1, 3])


@pytest.fixture(scope="module")
def tiny_vlms(tmp_path_factory) -> list[str]:
    """Two tiny random models (weights from seeds 0 and 1)."""
    return [str(save_tiny_qwen(tmp_path_factory.mktemp(f"tiny-qwen-{seed}"), seed=seed)) for seed in (0, 1)]


@pytest.fixture
def cat() -> Image.Image:
    return Image.open(CHELSEA).convert("RGB")


def constraint(schema: dict) -> tuple[grammar.SchemaConstraint, object]:
    tokenizer = make_tokenizer()
    eos = [tokenizer.eos_token_id]
    info = grammar.tokenizer_of(tokenizer, len(tokenizer), eos)
    return grammar.SchemaConstraint(info, schema, len(tokenizer), eos), tokenizer


def allowed_after(text: str, schema: dict) -> tuple[set[str], object]:
    """The characters the schema allows right after `text` (the tiny tokenizer's tokens are bytes)."""
    check, tokenizer = constraint(schema)
    ids = [tokenizer.eos_token_id, *tokenizer.encode(text, add_special_tokens=False)]
    check(torch.tensor([ids[:1]]), torch.zeros(1, len(tokenizer)))  # the prompt
    scores = check(torch.tensor([ids]), torch.zeros(1, len(tokenizer)))
    return {
        tokenizer.convert_ids_to_tokens(i) for i in torch.nonzero(scores[0] == 0).flatten().tolist()
    }, tokenizer


# ----------------------------------------------------------------------------------------------- schema


def test_the_schema_offers_only_what_can_apply_now():
    schema = answer_schema(Choices(intents=["edit", "jump", "answer", "clarify"], turns=[1, 4]))
    branches = {b["properties"]["intent"]["const"]: b for b in schema["anyOf"]}
    assert list(branches) == ["edit", "jump", "answer", "clarify"]
    assert branches["jump"]["properties"]["turn"] == {"enum": [1, 4]}
    assert branches["jump"]["required"] == ["intent", "turn", "rationale"]
    assert branches["edit"]["required"] == ["intent", "instruction", "rationale"]
    assert all(b["additionalProperties"] is False for b in branches.values())
    # no jump without a turn to go to; a question back is always there, so the schema never empties
    assert [
        b["properties"]["intent"]["const"] for b in answer_schema(Choices(intents=["jump"]))["anyOf"]
    ] == ["clarify"]


@pytest.mark.parametrize(
    ("text", "allows", "refuses"),
    [
        ('{"intent": "', {"e", "u", "r", "j", "a", "c"}, {"p", "x"}),  # the seven intents' first letters
        ('{"intent": "jump", "turn": ', {"1", "3"}, {"2", "9", "-"}),  # only the listed turns
        ('{"intent": "edit", "instruction": "', set(), {" ", '"'}),  # no empty or blank instruction
        ('{"intent": "undo", ', {'"'}, set()),
        ('{"intent": "undo", "', {"r", "d"}, {"i", "t"}),  # an undo has no instruction, no steps
    ],
)
def test_the_mask_lets_through_only_what_the_schema_allows(text, allows, refuses):
    allowed, _ = allowed_after(text, answer_schema(EVERYTHING))
    assert allows <= allowed and not refuses & allowed, sorted(allowed)[:20]


def test_a_capped_string_must_close_and_a_finished_answer_only_ends():
    cap = TEXT_CHARS["rationale"]
    allowed, _ = allowed_after('{"intent": "undo", "rationale": "' + "x" * cap, answer_schema(EVERYTHING))
    assert allowed == {'"'}
    done, tokenizer = allowed_after('{"intent": "undo", "rationale": "back"}', answer_schema(EVERYTHING))
    assert done == {tokenizer.decode([tokenizer.eos_token_id])}
    control, _ = allowed_after('{"intent": "undo", "rationale": "a', answer_schema(EVERYTHING))
    assert not {chr(c) for c in range(32)} & control  # a raw control character is no JSON


@pytest.mark.parametrize(
    ("plan", "why"),
    [
        (EditPlan(intent="jump", turn=2), "turn 2 is not one of this session's turns: 1, 3"),
        (EditPlan(intent="redo"), 'intent "redo" cannot apply now: choose one of edit, undo, jump'),
        (EditPlan(intent="jump", turn=3), None),
    ],
)
def test_a_parsed_plan_is_held_to_the_choices(plan, why):
    assert unusable(plan, Choices(intents=["edit", "undo", "jump"], turns=[1, 3])) == why


# ---------------------------------------------------------------------------------- what the agent offers


class Offered:
    """A rewriter that records the choices it is given and edits."""

    def __init__(self):
        self.seen: list[Choices] = []

    def rewrite(self, image, message, context, choices):
        self.seen.append(choices)
        return EditPlan(intent="edit", instruction=message)

    @hookimpl
    def register_rewriters(self, register):
        register(RewriterSpec("offered", lambda settings: self))


def test_the_agent_offers_the_intents_the_session_allows(fake, store, photo):
    offered = Offered()
    agent = Agent(store, "s", Settings(engine="fake", rewriter="offered", steps=2))
    with registered(offered, "offered"):
        agent.turn("add a hat", source=(photo, "open cat"), seed=1)  # a new session
        agent.turn("add a scarf", seed=2)  # at #2, an edit of the opened #1
        agent.move("undo")
        agent.turn("make it night", seed=3)  # at #2 again (undone): #3 below it to redo
    first, second, third = offered.seen
    assert first == Choices(intents=["edit", "answer", "clarify"])
    assert second == Choices(intents=["edit", "undo", "retry", "jump", "answer", "clarify"], turns=[1])
    assert third == Choices(
        intents=["edit", "undo", "redo", "retry", "jump", "answer", "clarify"], turns=[1, 3]
    )


# ------------------------------------------------------------------------------ real decoding, random model


@pytest.mark.parametrize(
    ("message", "model", "choices"),
    [
        ("make it look like winter", 0, Choices(intents=["edit", "answer", "clarify"])),
        ("undo that", 1, EVERYTHING),
        ("go back to the first one", 0, Choices(intents=["edit", "undo", "jump"], turns=[2])),
    ],
)
def test_the_random_model_answers_a_usable_plan_without_fallback(tiny_vlms, cat, message, model, choices):
    options = QwenVlOptions(vlm=tiny_vlms[model], **SMALL)
    plan = QwenRewriter(options).rewrite(cat, message, [], choices=choices)
    assert plan.fallback is None
    assert unusable(plan, choices) is None
    if plan.intent == "edit":
        assert all((step.instruction or "").strip() for step in plan.steps())


def test_icedit_rewrite_and_edit_report_the_vlm_with_no_fallback(tiny_vlms, fake, tmp_path, cat):
    """The issue's second "done when", through the command line."""
    cat.save(tmp_path / "cat.png")
    runner = CliRunner()
    said = runner.invoke(
        cli,
        [
            "rewrite",
            str(tmp_path / "cat.png"),
            "make it snowy",
            "--rewriter",
            "qwen_vl",
            "--vlm",
            tiny_vlms[1],
            "--json",
        ],
    )
    assert said.exit_code == 0, said.output
    assert json.loads(said.stdout)["rewriter"] == "qwen_vl"
    edited = runner.invoke(
        cli,
        ["edit", str(tmp_path / "cat.png"), "add a hat", "--engine", "fake", "--rewriter", "qwen_vl",
         "--vlm", tiny_vlms[0], "--json", "-o", str(tmp_path / "o.png")],
    )  # fmt: skip
    assert edited.exit_code == 0, edited.output
    assert json.loads(edited.stdout)["rewriter"] == "qwen_vl"
    assert "fell back" not in edited.stderr and "rules" not in edited.stderr


def test_logits_past_the_tokenizer_are_refused_and_one_answer_at_a_time():
    """Qwen2.5-VL's 151,936 logits are padded past its tokenizer's ids: those never get through."""
    tokenizer = make_tokenizer()
    wide = len(tokenizer) + 37
    eos = [tokenizer.eos_token_id]
    check = grammar.SchemaConstraint(
        grammar.tokenizer_of(tokenizer, wide, eos), answer_schema(EVERYTHING), wide, eos
    )
    scores = check(torch.tensor([eos]), torch.zeros(1, wide + 5))  # wider still than the bitmask
    assert torch.isinf(scores[0, len(tokenizer) :]).all() and (scores[0, : len(tokenizer)] == 0).any()
    with pytest.raises(grammar.GrammarError, match="one answer at a time"):
        check(torch.tensor([eos, eos]), torch.zeros(2, wide))


def test_a_constraint_that_fails_is_an_invalid_answer_and_an_unreadable_tokenizer_decodes_freely(
    tiny_vlms, cat, monkeypatch
):
    options = QwenVlOptions(vlm=tiny_vlms[0], **SMALL)

    def refuses(self, input_ids, scores):
        raise grammar.GrammarError("the grammar refused token 7: no")

    monkeypatch.setattr(grammar.SchemaConstraint, "__call__", refuses)
    plan = QwenRewriter(options).rewrite(cat, "add a hat", [], choices=EVERYTHING)
    assert plan.fallback == "rules (invalid answer twice: the grammar refused token 7: no)"
    assert plan.instruction == "add a hat"

    monkeypatch.undo()
    built = []

    def unreadable(*args):
        built.append(args)
        raise grammar.GrammarError("llguidance cannot read this tokenizer: only fast tokenizers")

    monkeypatch.setattr(grammar, "tokenizer_of", unreadable)
    plan = QwenRewriter(options.model_copy(update={"vlm_max_new_tokens": 16})).rewrite(cat, "add a hat", [])
    assert len(built) == 2  # asked twice, answered freely both times: the random model's garbage
    assert plan.fallback.startswith("rules (invalid answer twice: ")
