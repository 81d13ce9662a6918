"""The toy world of coloured shapes (`plugins/icedit/toy/`): its edits and split, the `toy` scorer, and
the script that trains a toy FLUX Fill on it (a few steps: that it trains and saves what loads)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from assistant.cli import cli
from assistant.models import Example
from plugins.icedit.toy import world
from plugins.icedit.toy.scorer import ColourScorer

ROOT = Path(__file__).resolve().parent.parent
HELD_OUT = ROOT / "examples" / "toy_world"


def test_edits_are_reproducible_and_held_out_pairs_never_train():
    assert [e.instruction for e in world.edits(3, 20)] == [e.instruction for e in world.edits(3, 20)]
    trained = {(e.obj, e.before, e.after) for e in world.edits(0, 2000, "train")}
    held = {(e.obj, e.before, e.after) for e in world.edits(0, 300, "heldout")}
    assert not trained & held
    for obj in world.OBJECTS:
        assert {(o, b, a) for o, b, a in held if o == obj} <= {(obj, *p) for p in world.HELDOUT_PAIRS[obj]}
        # every colour is still seen as a from and a to colour of every object in training
        assert (
            {b for o, b, _ in trained if o == obj}
            == {a for o, _, a in trained if o == obj}
            == set(world.COLOURS)
        )


def test_an_edit_changes_only_its_object_to_the_asked_colour():
    for e in world.edits(5, 40, "heldout"):
        source, target = (np.asarray(s.render(), np.int64) for s in (e.source, e.target))
        changed = np.abs(target - source).sum(-1) > 0
        assert changed.any(), e.instruction
        assert e.instruction.endswith(e.after) and e.obj in e.instruction
        names = world.nearest_colour(target[changed])
        assert world.COLOURS[np.bincount(names).argmax()] == e.after
        colours = [e.source.background, *(s.colour for s in e.source.shapes)]
        assert len(set(colours)) == len(colours) and e.after not in colours


def test_the_pink_split_asks_for_a_colour_outside_the_palette():
    for e in world.edits(1, 10, "pink"):
        assert e.after == "pink" and e.obj in world.SHAPES and "pink" not in world.PALETTE
        assert e.instruction == f"make the {e.obj} pink"


def test_the_scorer_hits_the_target_misses_the_source_and_says_why_without_a_region():
    e = world.edits(2, 1, "heldout")[0]
    source, target = e.source.render(), e.target.render()
    scorer = ColourScorer()
    got = scorer.score(
        [
            Example(e.instruction, source, target, target),  # the perfect edit
            Example(e.instruction, source, source, target),  # nothing changed
            Example(e.instruction, source, target.resize((256, 256)), target),  # at another size
            Example(e.instruction, source, source, source),  # a target that changes nothing
            Example(e.instruction, source, source),  # no target
        ]
    )
    assert got[0].values == {"l1": 0.0, "colour_hit": 1.0, "kept": 1.0}
    assert got[0].details == {"asked": e.after, "got": e.after}
    assert got[1].values["colour_hit"] == 0.0 and got[1].values["l1"] > 0 and got[1].values["kept"] == 1.0
    assert got[1].details == {"asked": e.after, "got": e.before}
    assert got[2].values["colour_hit"] == 1.0
    assert got[3].values["colour_hit"] is None and got[3].details == {"why": "the target changes nothing"}
    assert got[4].values == {"l1": None, "colour_hit": None, "kept": None}


def test_kept_sees_a_second_object_recoloured_that_colour_hit_does_not():
    e = next(e for e in world.edits(4, 50, "heldout") if e.obj != "background" and len(e.source.shapes) > 1)
    other = next(s for s in e.source.shapes if s.kind != e.obj)
    free = next(c for c in world.COLOURS if c not in e.source.caption().split() + [e.source.background])
    both = e.target.recoloured(other.kind, free).render()  # the asked change, and one more
    source, target = e.source.render(), e.target.render()
    (got,) = ColourScorer().score([Example(e.instruction, source, both, target)])
    assert got.values["colour_hit"] == 1.0
    share = (world.nearest_colour(np.asarray(target)) != world.nearest_colour(np.asarray(both))).mean()
    assert 0 < 1 - got.values["kept"] == pytest.approx(share, abs=0.02)


def test_icedit_eval_scores_the_shipped_held_out_edits_with_the_toy_scorer(tmp_path):
    rows = [json.loads(line) for line in (HELD_OUT / "metadata.jsonl").read_text().splitlines()]
    again = [(e.instruction, e.source.caption()) for e in world.edits(1, 64, "heldout")]
    assert [
        (r["instruction"], r["source_caption"]) for r in rows
    ] == again  # world.write_dataset(.., 1, 64, heldout)
    result = CliRunner().invoke(
        cli,
        ["eval", "--preset", "tiny", "--data", str(HELD_OUT), "--limit", "2", "--scorer", "toy", "--steps", "1",
         "--out", str(tmp_path), "--json"],
        prog_name="icedit",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["scorers"] == ["toy"] and report["count"] == 2
    assert set(report["metrics"]) == {"l1", "colour_hit", "kept"}
    assert all(r["details"]["toy"]["asked"] == rows[r["index"]]["after"] for r in report["examples"])


def test_the_toy_scripts_loss_weighs_the_edited_shape_and_the_other_shapes_above_the_background():
    from plugins.icedit.toy.make_toy import token_weights

    square, circle = world.Shape("square", "red", 4, 4, 16), world.Shape("circle", "white", 41, 41, 14)
    source = world.Scene("blue", (square, circle))
    shape_edit = world.Edit(source, source.recoloured("square", "green"), "square", "red", "green", "")
    background_edit = world.Edit(source, source.recoloured("background", "black"), "background", "blue",
                                 "black", "")  # fmt: skip
    weights = token_weights([shape_edit, background_edit], (16, 32, 64), changed=4, shapes=2)
    side = world.PANEL // 8  # factor 4 and FLUX's 2x2 packing: a token is 8 px square
    grid = weights.reshape(2, side, 2 * side).numpy()
    assert (grid[:, :, :side] == 1).all()  # the left half, given, weighs as before
    right = grid[0, :, side:]
    assert (right[:3, :3] == 5).all()  # the square (pixels 4..20) is recoloured
    assert (right[5:7, 5:7] == 3).all()  # the circle (pixels 41..55) keeps its colour
    rest = np.ones_like(right, bool)
    rest[:3, :3] = rest[5:7, 5:7] = False
    assert (right[rest] == 1).all()  # and so does the background
    background = grid[1, :, side:]  # a background edit changes every token but those inside a shape
    assert background[1, 1] == 3 and (np.delete(background.reshape(-1), 1 * side + 1) == 5).all()


@pytest.mark.slow
def test_the_toy_script_trains_and_saves_a_pipeline_the_loader_reads(tmp_path):
    script = ROOT / "plugins" / "icedit" / "toy" / "make_toy.py"
    args = ["--vae-steps", "2", "--steps", "2", "--batch", "2", "--log-every", "1"]
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["saved"]["bytes_total"] <= 20 * 2**20
    from diffusers import FluxFillPipeline

    pipe = FluxFillPipeline.from_pretrained(str(tmp_path / "run" / "pipeline"), use_safetensors=True)
    assert pipe.vae_scale_factor == 4 and not pipe.transformer.config.guidance_embeds
    prompt = "A diptych with two side-by-side images of the same scene. On the right, the scene is exactly the same as on the left but make the circle blue"
    pieces = pipe.tokenizer_2.convert_ids_to_tokens(pipe.tokenizer_2(prompt).input_ids)
    words = prompt.replace(",", " ,").replace(".", " .").split()
    assert pieces == [w if w in ",." else "\u2581" + w for w in words] + ["</s>"]  # a piece per word
    assert Image.open(tmp_path / "run" / "vae.png").size[0] > 0
