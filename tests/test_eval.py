"""`icedit eval`: the metrics on hand-made images, the evaluation loop with an engine that knows the answers,
the VIEScore judge with scripted answers, and the tiny preset end to end. Feature models are tiny random
CLIP and DINO built offline and loaded back from a folder, as real ones are.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from assistant import plugins
from assistant.cli import cli
from assistant.hookspecs import hookimpl
from assistant.models import EditResult, Example
from assistant.plugins import EngineSpec, get_plugin_manager
from assistant.settings import Settings
from plugins.evaluation import features
from plugins.evaluation.metrics import METRICS, MagicBrushScorer, means, pixel_distances, score
from plugins.evaluation.run import EvalConfig, evaluate
from plugins.qwen_vl import model as vlm_model
from plugins.qwen_vl.options import QwenVlOptions
from plugins.qwen_vl.vie_score import QwenVieScorer, parse_scores

TOY = Path(__file__).resolve().parent.parent / "examples" / "toy_edits"
ICEDIT = Path(sys.executable).with_name("icedit")
ROWS = [json.loads(line) for line in (TOY / "metadata.jsonl").read_text().splitlines()]


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="icedit")


def solid(value: int, size=(32, 32)) -> Image.Image:
    return Image.new("RGB", size, (value, value, value))


def toy(kind: str, i: int) -> Image.Image:
    return Image.open(TOY / kind / f"{i:02d}.png").convert("RGB")


@pytest.fixture(scope="session")
def feature_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """Tiny random CLIP (with tokenizer and image processor) and DINO ViT saved as model folders."""
    root = tmp_path_factory.mktemp("features")
    models = features.tiny()
    for part in (models.clip, models.clip_processor, models.tokenizer):
        part.save_pretrained(root / "clip")
    for part in (models.dino, models.dino_processor):
        part.save_pretrained(root / "dino")
    return root / "clip", root / "dino"


@pytest.fixture
def loaded(feature_dirs):
    """The registered `magicbrush` scorer's feature models, loaded from the folders its options name."""
    settings = Settings(preset="tiny", clip_model=str(feature_dirs[0]), dino_model=str(feature_dirs[1]))
    scorer = plugins.build("scorers", "magicbrush", settings)
    assert isinstance(scorer, MagicBrushScorer)
    assert scorer.models == {"clip": str(feature_dirs[0]), "dino": str(feature_dirs[1])}
    assert scorer.random_weights is False  # loaded from folders: nothing here says they are random
    return scorer.features


def test_pixel_distances_on_solid_colours():
    assert pixel_distances(solid(0), solid(0)) == (0.0, 0.0)
    assert pixel_distances(solid(0), solid(255)) == (1.0, 1.0)
    l1, l2 = pixel_distances(solid(51, (16, 16)), solid(0))  # the edit is resized to the reference
    assert (l1, l2) == (pytest.approx(0.2), pytest.approx(0.04))


def test_identical_images_score_perfectly_and_different_ones_do_not(loaded):
    a, b = toy("source", 0), toy("target", 0)
    same, other, unchanged = score(
        loaded,
        [
            Example("make it red", source=b, edit=a, target=a),
            Example(
                "make it blue",
                source=a,
                edit=b,
                target=a,
                source_caption="a red circle",
                target_caption="a blue circle",
            ),
            Example(
                "make it blue",
                source=a,
                edit=a,
                target=b,
                source_caption="a red circle",
                target_caption="a blue circle",
            ),
        ],
        batch_size=2,
    )
    assert (same["l1"], same["l2"]) == (0.0, 0.0)
    assert same["clip_i"] == pytest.approx(1, abs=1e-5) and same["dino"] == pytest.approx(1, abs=1e-5)
    assert same["clip_t"] is None and same["clip_dir"] is None  # no captions
    assert other["l1"] > 0.05 and other["l2"] > 0.01
    assert other["clip_i"] < 0.999 and other["dino"] < 0.999
    assert unchanged["src_l1"] == 0.0 and other["src_l1"] == other["l1"]  # other: the target is the source
    assert unchanged["src_clip_i"] == pytest.approx(1, abs=1e-5) and other["src_clip_i"] < 0.999
    assert unchanged["src_dino"] == pytest.approx(1, abs=1e-5) and other["src_dino"] < 0.999
    image, text = loaded.clip_images([b])[0], loaded.clip_texts(["a blue circle"])[0]
    assert other["clip_t"] == pytest.approx(float(image @ text), abs=1e-6)
    assert unchanged["clip_dir"] == 0.0  # an edit that moves nowhere has no direction
    assert other["clip_dir"] != 0.0


def test_means_use_the_examples_that_have_each_metric():
    rows = [
        dict.fromkeys((m.key for m in METRICS), None) | {"l1": 0.5, "clip_t": 0.25},
        dict.fromkeys((m.key for m in METRICS), None) | {"l1": 0.25},
    ]
    averaged = means(rows)
    assert (averaged["l1"], averaged["clip_t"], averaged["dino"]) == (0.375, 0.25, None)


class AnswerEngine:
    """Knows the toy targets: returns the target of the instruction it is given, records the seeds."""

    random_weights = False

    def __init__(self):
        self.targets = {r["instruction"]: toy("target", i) for i, r in enumerate(ROWS)}
        self.seeds = []

    def edit(self, request, events, cancel) -> EditResult:
        self.seeds.append(request.seed)
        image = self.targets[request.plan.instruction]
        return EditResult(image=image, seed=request.seed, prompt=request.plan.ic_prompt, nfe=request.steps)


@pytest.fixture
def answers():
    engine = AnswerEngine()

    class Plugin:
        @hookimpl
        def register_engines(self, register):
            register(EngineSpec("answers", lambda settings: engine, "returns the toy targets"))

    pm = get_plugin_manager()
    pm.register(Plugin(), name="answers")
    try:
        yield engine
    finally:
        pm.unregister(name="answers")


def test_evaluation_pairs_each_edit_with_its_own_target(answers, feature_dirs, tmp_path):
    settings = Settings(engine="answers", clip_model=str(feature_dirs[0]), dino_model=str(feature_dirs[1]))
    report = evaluate(
        EvalConfig(data=str(TOY), limit=5, seed=10, batch_size=2, out=tmp_path), settings, progress=False
    )
    assert report.count == 5 and answers.seeds == [10, 11, 12, 13, 14]
    assert [e.index for e in report.examples] == [0, 1, 2, 3, 4]
    assert report.metrics["l1"] == 0.0 and report.metrics["l2"] == 0.0
    assert report.metrics["clip_i"] == pytest.approx(1, abs=1e-5)
    assert report.metrics["dino"] == pytest.approx(1, abs=1e-5)
    assert report.metrics["src_l1"] > 0.05  # the colour changed
    assert Image.open(report.examples[3].edit).tobytes() == toy("target", 3).tobytes()
    assert json.loads(Path(report.report).read_text())["metrics"] == report.metrics
    table = Path(report.table).read_text().splitlines()
    assert table[0] == "| metric | compares | mean over 5 |"
    assert table[2] == "| L1 ↓ | edit vs target, pixels (MagicBrush) | 0.0000 |"
    assert Image.open(report.sheet).size == (3 * 144 + 268, 24 + 5 * 144)


class ScriptedVlm:
    """Answers from a queue; records each conversation it was asked."""

    def __init__(self, *answers: str):
        self.answers, self.asked = list(answers), []

    def generate(self, conversation, max_new_tokens, logits_processor=None) -> str:
        self.asked.append(conversation)
        return self.answers.pop(0)


def test_vie_score_takes_the_minimum_of_each_pair_and_their_geometric_mean(monkeypatch):
    vlm = ScriptedVlm('{"score": [8, 6], "reasoning": "ok"}', 'Sure! {"score": [9, 4.5]}')
    monkeypatch.setattr(vlm_model, "load", lambda settings: vlm)
    source, edit = toy("source", 0), toy("target", 0)
    verdict = QwenVieScorer(QwenVlOptions()).rate("the red circle is blue", source, edit)
    assert (verdict.sc, verdict.pq, verdict.sc_scores, verdict.pq_scores) == (
        6.0,
        4.5,
        [8.0, 6.0],
        [9.0, 4.5],
    )
    assert verdict.overall == pytest.approx(math.sqrt(27)) and verdict.error is None
    sc_chat, pq_chat = vlm.asked
    assert sc_chat[0]["content"].startswith("You rate image edits, in the manner of VIEScore.")
    images = [part["image"] for part in sc_chat[1]["content"] if part["type"] == "image"]
    assert images == [source, edit]
    assert sc_chat[1]["content"][-1]["text"] == "Instruction: the red circle is blue"
    assert [part["image"] for part in pq_chat[1]["content"] if part["type"] == "image"] == [edit]


@pytest.mark.parametrize("answer", ['{"score": [11, 2]}', '{"score": [3]}', "seven", '{"score": [true, 2]}'])
def test_answers_that_are_not_two_scores_are_refused(answer):
    with pytest.raises(ValueError, match="not two 0-10 scores"):
        parse_scores(answer)


def test_a_judge_answer_that_fails_leaves_its_score_missing(answers, feature_dirs, tmp_path, monkeypatch):
    vlm = ScriptedVlm('{"score": [10, 8]}', '{"score": [5, 6]}', "no idea", '{"score": [2, 4]}')
    monkeypatch.setattr(vlm_model, "load", lambda settings: vlm)
    settings = Settings(engine="answers", clip_model=str(feature_dirs[0]), dino_model=str(feature_dirs[1]))
    report = evaluate(
        EvalConfig(data=str(TOY), limit=2, out=tmp_path, scorers=["magicbrush", "qwen_vl"]),
        settings,
        progress=False,
    )
    first, second = (e.details["qwen_vl"] for e in report.examples)
    assert (first["sc"], first["pq"], first["overall"]) == (8.0, 5.0, pytest.approx(math.sqrt(40)))
    assert (second["sc"], second["pq"], second["overall"]) == (None, 2.0, None)
    assert second["error"] == "sc: not two 0-10 scores: 'no idea'"
    means_of_vie = {k: report.metrics[f"vie_{k}"] for k in ("sc", "pq", "overall")}
    assert means_of_vie == {"sc": 8.0, "pq": 3.5, "overall": pytest.approx(math.sqrt(40))}
    assert [e.metrics["vie_sc"] for e in report.examples] == [8.0, None]
    assert report.scorers == ["magicbrush", "qwen_vl"] and report.metrics["l1"] == 0.0
    assert "| VIE PQ ↑ | Qwen2.5-VL rating, 0-10 | 3.50 |" in Path(report.table).read_text()


def test_cli_eval_on_the_tiny_preset_runs_offline_in_one_process_or_two(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["eval", "--preset", "tiny", "--data", TOY, "--limit", 4, "--steps", 2, "--json"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"l1", "clip_i", "dino", "clip_t", "clip_dir"} <= {
        k for k, v in report["metrics"].items() if v is not None
    }
    assert 0 < report["metrics"]["l1"] < 1
    assert [e["seed"] for e in report["examples"]] == [0, 1, 2, 3]
    assert report["random_weights"] is True and report["models"]["clip"] == "tiny (random)"
    assert sorted(p.name for p in (tmp_path / "icedit-eval").iterdir()) == [
        "edits",
        "metrics.json",
        "metrics.md",
        "sheet.png",
    ]
    assert result.stderr.endswith(
        "note: random weights (tiny preset): the numbers check the pipeline, not editing quality\n"
    )

    env = {k: v for k, v in os.environ.items() if not k.startswith(("ICEDIT_", "ACCELERATE_"))}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "--no-python",
            str(ICEDIT),
            *map(str, args),
            "--out",
            "two",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
        env=env | {"OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(proc.stdout)  # gathered on the main process, which alone prints
    assert two["num_processes"] == 2 and [e["index"] for e in two["examples"]] == [0, 1, 2, 3]
    for one_example, two_example in zip(report["examples"], two["examples"], strict=True):
        assert two_example["seed"] == one_example["seed"]
        assert two_example["metrics"] == pytest.approx(one_example["metrics"], abs=1e-3)
    assert sorted(p.name for p in (tmp_path / "two" / "edits").iterdir()) == [
        f"{i:05d}.png" for i in range(4)
    ]


def test_default_models_offline_are_reported_together_before_anything_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke("eval", "--data", TOY, "--out", tmp_path)  # the default preset: real feature models
    assert result.exit_code == 2
    summary, *lines = result.stderr.splitlines()
    assert summary.startswith(
        "Error: 4 of the 4 model artifacts this command needs cannot be had now (offline mode "
        "is set: HF_HUB_OFFLINE)"
    )
    assert [line.split(": not in the Hugging Face cache and offline mode is set")[0] for line in lines] == [
        "  FLUX.1 Fill pipeline 'black-forest-labs/FLUX.1-Fill-dev' (--model)",
        "  LoRA 'RiverZ/normal-lora' (--lora)",
        "  CLIP model 'openai/clip-vit-base-patch32' (--clip-model)",
        "  DINO model 'facebook/dino-vits16' (--dino-model)",
    ]
    assert (
        "`hf download openai/clip-vit-base-patch32 --include '*.json' --include '*.safetensors'" in lines[2]
    )
    assert list(tmp_path.iterdir()) == []


def test_the_tiny_feature_models_are_the_same_on_every_build():
    a, b = features.tiny(), features.tiny()
    image = [toy("source", 1)]
    assert torch.equal(a.clip_images(image), b.clip_images(image))
    assert torch.equal(a.dino_images(image), b.dino_images(image))


class OddScorer:
    """A scorer plugin with a bug of the kind given: a key another scorer gives, or too few scores."""

    random_weights = False
    models: dict = {}

    def __init__(self, bug: str):
        from assistant.models import Metric

        self.bug = bug
        self.metrics = [
            Metric(
                key="l1" if bug == "duplicate" else "odd", label="odd", compares="x", higher_is_better=True
            )
        ]

    def score(self, examples):
        from assistant.models import Scores

        if self.bug == "short":
            return [Scores(values={"odd": 1.0})]
        return [Scores(values={"odd": 1.0, "undeclared": 2.0}) for _ in examples]


@pytest.mark.parametrize(
    ("bug", "line"),
    [
        ("duplicate", "scorers magicbrush and odd both give 'l1': run one of them"),
        ("short", "scorer odd gave 1 scores for 2 edits (a bug in it)"),
        ("undeclared", "scorer odd gave 'undeclared', which it does not declare (a bug in it)"),
    ],
)
def test_a_scorer_that_breaks_its_contract_is_one_line(answers, feature_dirs, tmp_path, bug, line):
    from assistant.errors import UserError
    from assistant.plugins import ScorerSpec
    from assistant.testing import registered

    class Plugin:
        @hookimpl
        def register_scorers(self, register):
            register(ScorerSpec("odd", lambda settings: OddScorer(bug), "breaks its contract"))

    settings = Settings(engine="answers", clip_model=str(feature_dirs[0]), dino_model=str(feature_dirs[1]))
    config = EvalConfig(data=str(TOY), limit=2, out=tmp_path, scorers=["magicbrush", "odd"])
    with registered(Plugin(), "odd"), pytest.raises(UserError) as e:
        evaluate(config, settings, progress=False)
    assert str(e.value) == line
