"""Untrusted files: weights (safetensors only, nothing unpickled, no remote code, pinned revisions) and
replay scripts (data only, inputs confined to their folder, outputs to --out, size limits)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file
from store_checks import EXAMPLES, dump

from assistant.cli import cli
from plugins.icedit import moe_checkpoint
from plugins.icedit.loading import flux_artifact, from_pretrained, load_pipeline
from plugins.icedit.options import IceditOptions
from plugins.icedit.presets import build_tiny
from plugins.qwen_vl.options import QwenVlOptions

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("assistant", "plugins", "prompts", "sessions")


def nothing_stored(home: Path) -> bool:
    """No store file, or one with no session, turn, image or chat line in it."""
    tables = dump(home) or {}
    return all(tables.get(t, []) == [] for t in ("sessions", "turns", "images", "log"))


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="icedit")


# ------------------------------------------------------------------------------------------------ weights


def test_no_code_path_unpickles_evaluates_or_trusts_remote_code():
    """The source itself: no torch.load / pickle / eval / exec calls and no trust_remote_code anywhere."""
    found = []
    for path in sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name in (
                    "torch.load",
                    "pickle.load",
                    "pickle.loads",
                    "eval",
                    "exec",
                    "yaml.load",
                    "torch.serialization.load",
                ) or name.endswith("Unpickler"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}(...)")
                found += [
                    f"{path.relative_to(ROOT)}:{node.lineno} trust_remote_code"
                    for k in node.keywords
                    if k.arg == "trust_remote_code"
                ]
            elif isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                found += [
                    f"{path.relative_to(ROOT)}:{node.lineno} import {n}"
                    for n in names
                    if n in ("pickle", "dill", "cloudpickle", "yaml")
                ]
    assert found == []


@pytest.fixture
def no_unpickling(monkeypatch):
    """torch.load, the one door to pickle in the weight loaders, fails the test if anything opens it."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError(f"torch.load called on {args[:1]}")

    monkeypatch.setattr(torch, "load", refuse)
    return calls


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_pickled_adapters_are_refused_without_being_opened(tmp_path, icedit_home, no_unpickling, layout):
    weights = {"transformer.x_embedder.lora_A.weight": torch.zeros(4, 4)}
    (tmp_path / "adapter").mkdir()
    path = tmp_path / "adapter" / "pytorch_lora_weights.bin"
    torch.save(weights, path)
    lora = path if layout == "file" else path.parent
    result = invoke(
        "edit",
        EXAMPLES / "chelsea.png",
        "add snow",
        "--preset",
        "tiny",
        "--steps",
        "1",
        "--lora",
        lora,
        "--session",
        "s",
        "-o",
        tmp_path / "x.png",
    )
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.output
    assert (
        result.stderr == f"Error: LoRA '{lora}' (--lora): pickle weights only (.bin/.pt/.ckpt): icedit loads "
        ".safetensors only, since pickle files can run code\n"
    )
    assert no_unpickling == []
    assert nothing_stored(icedit_home)


def _fake_hub(cache: Path, repo: str, revisions: dict[str, str], write) -> None:
    """A Hugging Face cache holding `repo` at several revisions: {ref name: commit}; write(folder, i) fills one."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    for i, (ref, commit) in enumerate(revisions.items()):
        write(root / "snapshots" / commit, i)
        (root / "refs" / ref).write_text(commit)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache and no network, for this process."""
    from huggingface_hub import constants

    cache = tmp_path / "hf"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


MAIN, V1 = "a" * 40, "b" * 40


def test_a_pinned_pipeline_revision_loads_that_revision(offline_cache):
    pipe = build_tiny()

    def write(folder: Path, i: int) -> None:
        with torch.no_grad():
            pipe.transformer.x_embedder.bias.fill_(i)
        pipe.save_pretrained(folder)

    _fake_hub(offline_cache, "someone/flux", {"main": MAIN, "v1": V1}, write)

    def fill(revision):
        from diffusers import FluxFillPipeline

        return from_pretrained(FluxFillPipeline, flux_artifact("someone/flux", revision), torch.float32)

    bias = {rev: float(fill(rev).transformer.x_embedder.bias.detach()[0]) for rev in (None, "v1", V1)}
    assert bias == {None: 0.0, "v1": 1.0, V1: 1.0}
    with pytest.raises(
        Exception,
        match=r"'someone/flux@v2' \(--model\): not in the Hugging Face cache and offline "
        r"mode is set .* --revision v2",
    ):
        fill("v2")


def test_a_pinned_lora_revision_loads_that_adapter(offline_cache):
    pipe = build_tiny()
    states = [
        moe_checkpoint.synthetic_checkpoint(pipe.transformer, num_experts=2, rank=2, seed=s) for s in (1, 2)
    ]
    _fake_hub(
        offline_cache,
        "someone/moe",
        {"main": MAIN, "v1": V1},
        lambda folder, i: (
            folder.mkdir(parents=True),
            save_file(states[i], folder / moe_checkpoint.WEIGHTS_NAME),
        ),
    )
    for revision, expected in [(None, states[0]), ("v1", states[1])]:
        got = moe_checkpoint.read_checkpoint("someone/moe", revision)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    # through the engine's loader: the adapter is recognised and placed from the pinned revision
    adapter = load_pipeline(
        IceditOptions(preset="tiny", lora="someone/moe", lora_revision="v1", device="cpu")
    ).adapter
    assert (adapter.kind, adapter.keys, adapter.num_experts) == ("lora-moe", len(states[1]), 2)
    assert len(adapter.revision) == 40 and adapter.revision != "v1"  # the commit the tag named: provenance


def test_a_pinned_vlm_revision_loads_that_model(offline_cache):
    from tiny_qwen import save_tiny_qwen

    from plugins.qwen_vl import model

    _fake_hub(
        offline_cache, "someone/vlm", {"main": MAIN, "v1": V1}, lambda folder, i: save_tiny_qwen(folder, i)
    )
    options = QwenVlOptions(vlm="someone/vlm", vlm_device="cpu")
    weights = {
        rev: next(model.load(options.model_copy(update={"vlm_revision": rev})).model.parameters())
        for rev in (None, "v1", MAIN)
    }
    assert torch.equal(weights[None], weights[MAIN]) and not torch.equal(weights[None], weights["v1"])


# ------------------------------------------------------------------------------------------------ replay


@pytest.fixture
def folder(tmp_path, fake):
    d = tmp_path / "scripts"
    d.mkdir()
    Image.open(EXAMPLES / "chelsea.png").convert("RGB").resize((48, 32)).save(d / "cat.png")
    return d


def replay(script: Path, *args: object):
    return invoke(
        "replay", script, "--out", script.parent / "out", "--engine", "fake", "--session", "r", *args
    )


def test_allow_outside_lets_a_trusted_script_read_beside_its_folder(folder, tmp_path, fake):
    (tmp_path / "dog.png").write_bytes((folder / "cat.png").read_bytes())
    script = folder / "s.toml"
    script.write_text(
        f'source = "../dog.png"\n[[turns]]\nsay = "add a hat"\n[[turns]]\nopen = "{tmp_path}/dog.png"\n'
    )
    refused = replay(script)
    assert (refused.exit_code, refused.stderr) == (
        2,
        "Error: ../dog.png: replay scripts may only name files in their own folder\n",
    )
    allowed = replay(script, "--allow-outside", "--json")
    assert allowed.exit_code == 0, allowed.output
    assert [json.loads(line)["intent"] for line in allowed.stdout.splitlines()] == ["edit", "open"]


def test_outputs_stay_in_the_out_folder(folder, tmp_path, icedit_home, fake):
    """A link planted in --out that leads elsewhere is refused before any turn runs; nothing is written there."""
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"precious")
    (folder / "out").mkdir()
    (folder / "out" / "01-edit.png").symlink_to(victim)
    script = folder / "s.toml"
    script.write_text('source = "cat.png"\n[[turns]]\nsay = "add a hat"\n')
    result = replay(script)
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: {folder / 'out' / '01-edit.png'}: a link leading outside {folder / 'out'}; "
        "replay writes only into --out\n"
    )
    assert victim.read_bytes() == b"precious"
    assert nothing_stored(icedit_home) and fake.engine.calls == []


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (
            lambda d: (d / "s.toml").write_text("# " + "x" * 1_000_000 + '\nsource = "cat.png"\n'),
            "{script}: 1000022 bytes; replay scripts of at most 1000000 bytes are accepted",
        ),
        (
            lambda d: (d / "s.toml").write_text(
                'source = "cat.png"\nsteps = 200\n' + '[[turns]]\nsay = "x"\n' * 101
            ),
            "{script}: the edits ask for 20200 transformer evaluations in all; at most 20000 are accepted",
        ),
        (
            lambda d: (
                Image.new("1", (5000, 4000)).save(d / "big.png"),
                (d / "s.toml").write_text('source = "big.png"\n[[turns]]\nsay = "x"\n'),
            ),
            "big.png: a 5000x4000 image; replay scripts may open images of at most 16 megapixels",
        ),
        (
            lambda d: (d / "s.toml").write_text(
                'source = "cat.png"\n[[turns]]\nsay = "x"\n[[turns]]\nsay = ""\n'
            ),
            (
                '{script}: turn 2: say: Value error, the instruction is empty: say what to change, e.g. "make it look '
                'like winter"'
            ),
        ),
        (
            lambda d: (d / "s.toml").write_text(
                'source = "cat.png"\n[[turns]]\nsay = "add\\u001b[31m a hat"\n'
            ),
            (
                "{script}: turn 1: say: Value error, the instruction contains a control character ('\\x1b'): type plain "
                "text"
            ),
        ),
        (
            lambda d: (d / "s.toml").write_text(
                f'source = "cat.png"\n[[turns]]\nsay = "x"\ninstruction = "{"y" * 2001}"\n'
            ),
            (
                "{script}: turn 1: instruction: Value error, the instruction is 2001 characters long; at most 2000 are "
                "accepted"
            ),
        ),
        (
            lambda d: (d / "s.toml").write_bytes(b'source = "cat.png"\n\xff\xfe[[turns]]\n'),
            "{script}: cannot read ('utf-8' codec can't decode byte 0xff in position 19: invalid start byte)",
        ),
        (lambda d: (d / "s.toml").mkdir(), "{script}: no replay scripts (*.toml) in the folder"),
    ],
    ids=[
        "script-over-1MB",
        "too-many-steps",
        "image-over-16MP",
        "empty-say-in-turn-2",
        "control-character",
        "instruction-too-long",
        "not-utf8",
        "script-is-a-folder",
    ],
)
def test_script_limits_are_one_line_before_anything_runs(folder, icedit_home, fake, make, error):
    make(folder)
    script = folder / "s.toml"
    result = replay(script)
    assert result.exit_code == 2, result.output
    assert result.stderr == f"Error: {error.format(script=script)}\n"
    assert result.stdout == "" and "Traceback" not in result.output
    assert not (folder / "out").exists() and fake.engine.calls == []
    assert nothing_stored(icedit_home)
