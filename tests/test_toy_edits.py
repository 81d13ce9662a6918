"""The toy preset edits (issue 20, part 4): its shipped weights recolour what the instruction names and
keep the rest on held-out scenes, and meet the issue's figures; the early filter and the self-check,
with a judge that reads colours, choose and reject by what was painted."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from assistant import early_filter
from assistant.agent import Agent
from assistant.cli import cli
from assistant.hookspecs import hookimpl
from assistant.models import EditPlan, EditRequest
from assistant.plugins import JudgeSpec
from assistant.protocols import PairwiseJudge
from assistant.settings import Settings
from assistant.testing import registered
from plugins.icedit.engine import IceditEngine
from plugins.icedit.options import IceditOptions
from plugins.icedit.toy import world

HELD_OUT = Path(__file__).resolve().parent.parent / "examples" / "toy_world"
STEPS = 20
NAMES = (*world.COLOURS, *world.NEW_COLOURS)


@pytest.fixture(scope="module")
def toy() -> IceditEngine:
    return IceditEngine(IceditOptions(preset="toy"))


def paint(engine, source: Image.Image, instruction: str, seed: int = 0) -> Image.Image:
    plan = EditPlan(intent="edit", instruction=instruction)
    request = EditRequest(source=source, plan=plan, seed=seed, steps=STEPS)
    return engine.edit(request, lambda event: None, threading.Event()).image


def names(image: Image.Image) -> np.ndarray:
    """Each pixel's nearest named colour (the palette and pink), as an index into NAMES."""
    return world.nearest_colour(np.asarray(image.convert("RGB")), NAMES)


def asked(instruction: str) -> int:
    return NAMES.index(instruction.split()[-1])


def share(instruction: str, source: Image.Image, edit: Image.Image) -> float:
    """How much of what changed (by colour name) is the asked colour: 0 when nothing changed."""
    before, after = names(source.resize(edit.size)), names(edit)
    changed = before != after
    return float((after[changed] == asked(instruction)).mean()) if changed.sum() >= 16 else 0.0


class ColourJudge(PairwiseJudge):
    """A judge without a model: the candidate whose change is more of the asked colour is better, and
    an edit passes its check by the share of its change in that colour."""

    def compare(self, instruction, source, a, b) -> float:
        left, right = share(instruction, source, a), share(instruction, source, b)
        return 1.0 if left > right else 0.0 if left < right else 0.5

    def check(self, instruction, source, edit) -> float:
        return share(instruction, source, edit)


class Judges:
    @hookimpl
    def register_judges(self, register):
        register(
            JudgeSpec("colour", lambda settings: ColourJudge(), "the asked colour's share of the change")
        )


def regions(edit: world.Edit) -> tuple[np.ndarray, np.ndarray]:
    """The edited object's pixels and the rest's, at the panel's size; pixels on an outline, blends of
    two colours, are in neither."""
    before, after = names(edit.source.render()), names(edit.target.render())
    inside = (before == NAMES.index(edit.before)) & (after == NAMES.index(edit.after))
    return inside, before == after


def held_out(kind: str, count: int) -> list[world.Edit]:
    """Held-out edits of new scenes (not examples/toy_world's): `count` of a kind, shape or background."""
    found = [e for e in world.edits(23, 200, "heldout") if (e.obj == "background") == (kind == "background")]
    return found[:count]


def carried_out(engine, e: world.Edit, seed: int = 0) -> tuple[float, float]:
    """(share of the object's pixels painted the asked colour, share of the rest kept its colour)."""
    got = names(paint(engine, e.source.render(), e.instruction, seed))
    inside, outside = regions(e)
    return (got[inside] == asked(e.instruction)).mean(), (
        got[outside] == names(e.source.render())[outside]
    ).mean()


def test_edits_paint_the_asked_colour_where_asked_and_keep_the_rest(toy):
    shapes = [carried_out(toy, e) for e in held_out("shape", 24)]
    backgrounds = [carried_out(toy, e) for e in held_out("background", 4)]
    assert sum(inside >= 0.5 for inside, _ in shapes) >= 15  # 17 here: a shape is harder than a background
    assert all(inside >= 0.9 for inside, _ in backgrounds)
    assert np.mean([kept for _, kept in shapes + backgrounds]) >= 0.85


def test_the_same_background_takes_whichever_colour_is_asked(toy):
    e = held_out("background", 1)[0]
    inside, _ = regions(e)
    used = {e.source.background, *(s.colour for s in e.source.shapes)}
    for colour in [c for c in world.COLOURS if c not in used]:
        instruction = f"turn the background {colour}"
        got = names(paint(toy, e.source.render(), instruction, seed=3))
        assert (got[inside] == NAMES.index(colour)).mean() >= 0.9, instruction


def test_the_same_shape_takes_whichever_colour_is_asked(toy):
    """Each scene's shape asked in every colour its scene does not use: the word decides the paint."""
    hits = []
    for e in held_out("shape", 4):
        inside, _ = regions(e)
        used = {e.source.background, *(s.colour for s in e.source.shapes)}
        for colour in [c for c in world.COLOURS if c not in used]:
            got = names(paint(toy, e.source.render(), f"make the {e.obj} {colour}", seed=3))
            hits.append((got[inside] == NAMES.index(colour)).mean() >= 0.5)
    assert len(hits) == 20 and sum(hits) >= 14


def test_a_bigger_picture_is_edited_at_the_panel_size_and_returned_at_its_own(toy):
    e = held_out("background", 2)[1]
    big = e.source.render().resize((256, 256), Image.Resampling.NEAREST)
    edit = paint(toy, big, e.instruction)
    assert edit.size == (256, 256)
    assert share(e.instruction, big, edit) >= 0.8


def test_the_readmes_first_edit_turns_the_circle_blue_and_keeps_the_square(tmp_path):
    """README's quick start, as typed (28 steps): the red circle of examples/shapes.png turns blue, the
    green square and the white background stay. (Other seeds recolour the square too: a known limit.)"""
    source = Image.open(HELD_OUT.parent / "shapes.png").convert("RGB")
    out = tmp_path / "blue.png"
    args = ["edit", str(HELD_OUT.parent / "shapes.png"), "make the circle blue", "--preset", "toy",
            "--seed", "3", "-o", str(out)]  # fmt: skip
    result = CliRunner().invoke(cli, args, prog_name="icedit")
    assert result.exit_code == 0, result.output
    before, after = names(source), names(Image.open(out))
    for colour, becomes in (("red", "blue"), ("green", "green"), ("white", "white")):
        region = before == NAMES.index(colour)
        assert region.sum() > 1000 and (after[region] == NAMES.index(becomes)).mean() >= 0.85, (
            colour
        )  # 0.92+ here


def test_eval_meets_the_figures_against_the_untrained_tiny_preset(tmp_path):
    def evaluate(preset: str, *limit: str) -> dict:
        result = CliRunner().invoke(
            cli,
            ["eval", "--preset", preset, "--data", str(HELD_OUT), "--scorer", "toy", "--steps", str(STEPS),
             "--out", str(tmp_path / preset), "--json", *limit],
            prog_name="icedit",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    toy_report = evaluate("toy")
    assert toy_report["count"] == 64 and toy_report["random_weights"] is False
    assert toy_report["metrics"]["colour_hit"] >= 0.8
    assert toy_report["metrics"]["kept"] >= 0.9  # 0.93 here: most of what should stay does
    tiny = evaluate("tiny", "--limit", "16")  # tiny paints 512-px panels: its first 16 are its figure
    same = np.mean([r["metrics"]["l1"] for r in toy_report["examples"][:16]])
    assert same <= 0.5 * tiny["metrics"]["l1"]
    assert toy_report["metrics"]["l1"] <= 0.5 * tiny["metrics"]["l1"]


def test_the_early_filter_finishes_the_candidate_with_the_most_asked_colour(toy):
    e = held_out("shape", 2)[1]
    source = e.source.render()
    request = EditRequest(
        source=source,
        plan=EditPlan(intent="edit", instruction=e.instruction),
        seed=5,
        steps=STEPS,
        candidates=4,
        early_steps=6,
    )
    result = early_filter.run(toy, request, ColourJudge(), lambda event: None, threading.Event())
    shares = {c.seed: share(e.instruction, source, c.preview) for c in result.candidates}
    assert len(shares) == 4 and shares[result.seed] == max(shares.values())
    assert share(e.instruction, source, result.image) >= 0.5


def test_the_self_check_passes_the_asked_colour_and_rejects_what_the_toy_cannot_paint(toy, store):
    e = held_out("shape", 3)[2]
    source = e.source.render()
    settings = Settings(engine="icedit", rewriter="rules", judge="colour", steps=STEPS, attempts=2)
    with registered(Judges(), "colour-judge"):
        agent = Agent(store, "s", settings, engine=toy)
        done = agent.turn(e.instruction, source=(source, "open shapes"), seed=0)
        kept = done.attempts[-1]
        assert kept.score >= settings.accept and store.history("s").cursor == kept.turn
        # pink is outside the palette it learned: both seeds are painted, judged and rejected
        pink = agent.turn(f"make the {e.obj} pink", seed=0)
    assert [a.score < settings.accept for a in pink.attempts] == [True, True]
    edits = [t for t in store.history("s").turns if t.kind == "edit"]
    assert [t.parent for t in edits] == [1] * len(done.attempts) + [kept.turn] * 2  # siblings


def test_a_lora_taught_a_colour_the_toy_never_saw_lowers_its_eval_l1(tmp_path):
    """Pink is outside the world's palette: the toy leaves shapes about as they were; a normal LoRA
    trained on the pink split paints nearer the targets of pink edits it did not train on."""
    train = world.write_dataset(tmp_path / "pink-train", seed=5, n=64, split="pink")
    test = world.write_dataset(tmp_path / "pink-test", seed=6, n=16, split="pink")
    run = CliRunner().invoke(
        cli,
        ["train", "--preset", "toy", "--adapter", "lora", "--data", str(train), "--steps", "200",
         "--loss-region", "right", "--optimizer", "adamw", "--lr", "3e-3", "--adapter-dtype", "float32",
         "--out", str(tmp_path / "run"), "--json"],
        prog_name="icedit",
    )  # fmt: skip
    assert run.exit_code == 0, run.output

    def l1(lora: str) -> float:
        result = CliRunner().invoke(
            cli,
            ["eval", "--preset", "toy", "--lora", lora, "--data", str(test), "--scorer", "toy",
             "--steps", str(STEPS), "--out", str(tmp_path / f"eval-{len(lora)}"), "--json"],
            prog_name="icedit",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["metrics"]["l1"]

    assert l1(str(tmp_path / "run" / "adapter")) <= 0.95 * l1("none")  # 0.86x here
