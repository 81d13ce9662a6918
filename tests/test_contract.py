"""The plugin contract kit (`assistant.testing`) on every built-in plugin, the suite's fakes and the sample
third-party package in examples/plugins/, which is also installed and run through its real entry point."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image
from tiny_qwen import save_tiny_qwen

from assistant.images import load_source
from assistant.models import EditRequest
from assistant.testing import EngineContract, FakeEngine, JudgeContract, RewriterContract, ScorerContract
from plugins.icedit.options import IceditOptions
from plugins.kontext.options import KontextOptions
from plugins.qwen_vl.options import QwenVlOptions
from sessions.identity import pixel_digest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "examples" / "plugins" / "icedit-posterize"
CHELSEA = ROOT / "examples" / "chelsea.png"
ICEDIT = Path(sys.executable).with_name("icedit")
sys.path.insert(0, str(SAMPLE))  # the sample's modules, in-process, without installing it

from icedit_posterize.engine import PosterizeEngine  # noqa: E402 - after the path it is found on
from icedit_posterize.rewriter import TidyRewriter  # noqa: E402

# ------------------------------------------------------------------------------------------------- engines


class TestIceditEngine(EngineContract):
    finish_tolerance = 1  # candidates run batched: the winner resumed rounds up to 1/255 off a lone run

    def make_engine(self):
        from plugins.icedit.engine import IceditEngine

        return IceditEngine(IceditOptions(preset="tiny"))


class TestKontextEngine(EngineContract):
    guidance = 2.5

    def make_engine(self):
        from plugins.kontext.engine import KontextEngine

        return KontextEngine(KontextOptions(preset="tiny"))


class TestFakeEngine(EngineContract):
    def make_engine(self):
        return FakeEngine()


class TestSamplePosterizeEngine(EngineContract):
    steps = 3
    candidates = 3

    def make_engine(self):
        return PosterizeEngine()


# ----------------------------------------------------------------------------------------------- rewriters


class TestRulesRewriter(RewriterContract):
    intents = (
        *RewriterContract.intents,
        ("redo", "redo"),
        ("try another seed", "retry"),
        ("please!", "clarify"),
    )

    def make_rewriter(self):
        from plugins.rules.rewriter import RulesRewriter

        return RulesRewriter()


class TestVerbatimRewriter(RewriterContract):
    intents = (("add a hat", "edit"), ("undo", "edit"), ("Make her hair dark green.", "edit"))
    """Every message is an edit whose instruction is the message."""

    def make_rewriter(self):
        from plugins.rules.rewriter import VerbatimRewriter

        return VerbatimRewriter()


class TestSampleTidyRewriter(RewriterContract):
    intents = (*RewriterContract.intents, ("Again!", "retry"), ("back", "undo"))

    def make_rewriter(self):
        return TidyRewriter()


# -------------------------------------------------------------------------------------------------- judges


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> str:
    return str(save_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen")))


class TestQwenJudge(JudgeContract):
    @pytest.fixture(scope="class")
    @classmethod
    def judge(cls, tiny_vlm):
        from plugins.qwen_vl.judge import QwenJudge

        return QwenJudge(
            QwenVlOptions(vlm=tiny_vlm, vlm_device="cpu", min_pixels=28 * 28, max_pixels=56 * 56)
        )


# ------------------------------------------------------------------------------------------------- scorers


class TestMagicBrushScorer(ScorerContract):
    def make_scorer(self):
        from plugins.evaluation import features
        from plugins.evaluation.metrics import MagicBrushScorer

        return MagicBrushScorer(features.tiny(), {"clip": "tiny (random)", "dino": "tiny (random)"})


class TestQwenVieScorer(ScorerContract):
    @pytest.fixture(scope="class")
    @classmethod
    def scorer(cls, tiny_vlm):
        from plugins.qwen_vl.vie_score import QwenVieScorer

        options = QwenVlOptions(
            vlm=tiny_vlm, vlm_device="cpu", min_pixels=28 * 28, max_pixels=56 * 56, vlm_max_new_tokens=8
        )
        return QwenVieScorer(options)


# ------------------------------------------------------------------------------------------ the kit itself


def test_importing_the_kit_imports_no_torch_and_the_package_no_pytest():
    code = (
        "import sys, assistant, assistant.models, assistant.plugins; before = 'pytest' in sys.modules; "
        "import assistant.testing; print(before, 'torch' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "False False\n"


def test_a_broken_engine_fails_the_contract():
    """The contract can fail: an engine that ignores its seed and cancel is caught by both tests."""

    class Careless(FakeEngine):
        def _paint(self, request, seed, steps, events, cancel):
            return super()._paint(request, 0, steps, events, threading.Event())

    contract = EngineContract()
    engine = Careless()
    with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"):
        contract.test_cancel_between_steps_raises_cancelled_and_stops(engine)
    results = {}

    def plain_edit(seed):
        if seed not in results:
            results[seed] = (engine.edit(contract.request(seed=seed), lambda e: None, threading.Event()), [])
        return results[seed]

    with pytest.raises(AssertionError):
        contract.test_same_seed_same_png_bytes_another_seed_another_image(engine, plain_edit)


# ------------------------------------------------------------------------------- the sample, installed for real


def test_the_sample_package_loads_through_its_entry_point_and_edits(tmp_path):
    """pip builds the sample from its pyproject.toml (offline, into a folder on PYTHONPATH); a plain
    `icedit` process, not under tests, then finds it through the `icedit_assistant` entry point."""
    source = shutil.copytree(
        SAMPLE,
        tmp_path / "src",
        ignore=shutil.ignore_patterns("__pycache__", ".*cache*", "build", "*.egg-info"),
    )
    site = tmp_path / "site"
    pip = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "--target",
            str(site),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert pip.returncode == 0, pip.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ICEDIT_", "PYTHON"))}
    env |= {"ICEDIT_HOME": str(tmp_path / "home"), "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}

    def icedit(*args):
        proc = subprocess.run(
            [str(ICEDIT), *map(str, args)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        return proc

    rows = {row["name"]: row for row in json.loads(icedit("plugins", "--json").stdout)}
    assert (rows["posterize"]["engines"], rows["posterize"]["rewriters"]) == (["posterize"], ["tidy"])
    assert {"register_engines", "register_rewriters"} <= set(rows["posterize"]["hooks"])
    assert rows["posterize"]["options"]["posterize"]["properties"]["bits"]["default"] == 3
    out = tmp_path / "hat.png"
    edited = icedit(
        "edit",
        CHELSEA,
        "Please add a hat!",
        "--engine",
        "posterize",
        "--rewriter",
        "tidy",
        "--seed",
        3,
        "--steps",
        4,
        "-o",
        out,
        "--json",
    )
    shown = json.loads(edited.stdout)
    assert {k: shown[k] for k in ("engine", "rewriter", "instruction", "seed", "nfe", "output")} == {
        "engine": "posterize",
        "rewriter": "tidy",
        "instruction": "please add a hat",
        "seed": 3,
        "nfe": 4,
        "output": str(out),
    }
    plan = TidyRewriter().rewrite(load_source(CHELSEA), "Please add a hat!", [])
    here = PosterizeEngine().edit(
        EditRequest(source=load_source(CHELSEA), plan=plan, seed=3, steps=4),
        lambda event: None,
        threading.Event(),
    )
    assert pixel_digest(Image.open(out)) == pixel_digest(
        here.image
    )  # the installed plugin painted what it paints here


@pytest.fixture
def sample_registered():
    """The sample package's module registered with the suite's plugin manager, as its entry point would."""
    import icedit_posterize

    from assistant.plugins import get_plugin_manager

    pm = get_plugin_manager()
    pm.register(icedit_posterize, name="posterize")
    yield
    pm.unregister(name="posterize")


def test_plugin_options_reach_the_sample_from_option_flags_and_the_environment(
    sample_registered, tmp_path, monkeypatch
):
    from click.testing import CliRunner

    from assistant.cli import cli

    monkeypatch.setenv("ICEDIT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    rows = {r["name"]: r for r in json.loads(CliRunner().invoke(cli, ["plugins", "--json"]).stdout)}
    schema = rows["posterize"]["options"]["posterize"]
    assert set(schema["properties"]) == {"bits", "strength"} and schema["properties"]["bits"]["maximum"] == 8

    def edit(*extra):
        args = ["edit", CHELSEA, "add a hat", "--engine", "posterize", "--rewriter", "tidy", "--seed", "3"]
        return CliRunner().invoke(cli, [*map(str, args), *extra])

    def painted(name, *extra):
        result = edit("-o", name, *extra)
        assert result.exit_code == 0, result.output
        return (tmp_path / name).read_bytes()

    plain, one_bit = painted("plain.png"), painted("one.png", "--option", "bits=1")
    assert one_bit != plain
    assert painted("named.png", "--option", "posterize.bits=1", "--option", "strength=0.35") == one_bit
    monkeypatch.setenv("ICEDIT_OPTIONS__BITS", "1")
    assert painted("env.png") == one_bit
    assert painted("flag-wins.png", "--option", "bits=3") == plain
    monkeypatch.delenv("ICEDIT_OPTIONS__BITS")
    for extra, line in [
        (("--option", "bitz=1"), "Error: unknown option 'bitz' (posterize takes bits, strength)"),
        (("--option", "tidy.bits=1"), "Error: unknown option 'tidy.bits' (posterize takes bits, strength)"),
        (
            ("--option", "kontext.bits=1"),
            "Error: unknown option 'kontext.bits' (kontext is not in use here; posterize takes bits, strength)",
        ),
        (
            ("--option", "bits=99"),
            "Error: bad option posterize.bits: Input should be less than or equal to 8",
        ),
        (
            ("--option", "bits=two"),
            "Error: bad option posterize.bits: Input should be a valid integer, unable to "
            "parse string as an integer",
        ),
        (
            ("--option", "bits"),
            "Error: --option 'bits': give it as KEY=VALUE (the keys: icedit plugins --json)",
        ),
    ]:
        result = edit("-o", "never.png", *extra)
        assert (result.exit_code, result.stderr.splitlines()) == (2, [line]), result.output
        assert not (tmp_path / "never.png").exists()
    # with another engine, posterize's key waits for it (as ICEDIT_VLM does while the rules rewriter runs);
    # named for a plugin that does not take it, it is refused
    waits = CliRunner().invoke(cli, ["plugins", "--preset", "tiny", "--option", "bits=1"])
    assert waits.exit_code == 0, waits.output
    refused = CliRunner().invoke(cli, ["plugins", "--preset", "tiny", "--option", "icedit.bits=1"])
    [line] = refused.stderr.splitlines()
    assert line.startswith(
        "Error: unknown option 'icedit.bits' (icedit takes preset, model, revision, lora, "
    )
