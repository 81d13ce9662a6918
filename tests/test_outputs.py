"""Issue 19 parts 2 and 3: outputs in the format their name asks for, never over a file, with unique
default names; the picture carries how it was made; every edit is logged; exports pin the weights."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image
from store_checks import dump, env_for

from assistant.cli import cli
from assistant.outputs import infotext, provenance
from sessions.archive import export_archive, import_archive
from sessions.history import Turn
from sessions.identity import encode_png, pixel_digest, png_digest
from sessions.store import NewTurn, Store

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ICEDIT = Path(sys.executable).with_name("icedit")
FAKE = ["--engine", "fake"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def invoke(*args: object, **kw):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="icedit", **kw)


def short(instruction: str) -> str:
    return hashlib.sha256(instruction.encode()).hexdigest()[:6]


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    Image.open(EXAMPLES / "chelsea.png").convert("RGB").resize((96, 64)).save(tmp_path / "photo.png")
    return tmp_path


def turn_of(home: Path, session: str, turn: int | None = None) -> Turn:
    with Store(home / "sessions.sqlite3") as store:
        history = store.history(session)
    return history.cursor_turn() if turn is None else history.turn(turn)


# ------------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize("name", ["out.png", "out.jpg", "OUT.JPEG", "out.webp"])
def test_the_name_says_the_format_and_the_picture_says_how_it_was_made(work, fake, icedit_home, name):
    result = invoke(
        "edit", "photo.png", "add snow", *FAKE, "--session", "s", "--seed", "7", "--steps", "3", "-o", name
    )
    assert result.exit_code == 0, result.output
    turn = turn_of(icedit_home, "s")
    with Image.open(work / name) as img:
        assert (
            img.format
            == {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}[Path(name).suffix.lower()]
        )
        if img.format == "PNG":
            img.load()
            text, data = img.text["parameters"], json.loads(img.text["icedit"])
            assert pixel_digest(img) == turn.image_sha256  # lossless: the turn's own pixels
        else:
            exif = img.getexif()
            comment = exif.get_ifd(0x8769)[0x9286]
            assert comment.startswith(b"UNICODE\0")  # as A1111 writes (and reads) it
            text, data = comment[8:].decode("utf-16-be"), json.loads(exif[0x010E])
    prompt, line = text.split("\n")
    assert prompt == turn.plan["ic_prompt"] == data["prompt"]
    assert line.startswith("Steps: 3, Guidance: 50.0, Seed: 7, Size: 96x64, ")
    assert "Instruction: add snow, Engine: fake, Version: icedit-assistant " in line
    assert {k: data[k] for k in ("seed", "steps", "guidance", "instruction", "engine", "image_sha256")} == {
        "seed": 7, "steps": 3, "guidance": 50.0, "instruction": "add snow", "engine": "fake",
        "image_sha256": turn.image_sha256,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["-o", "out.gif"], "out.gif: give -o a name ending in .png, .jpg or .webp"),
        (["-o", "out"], "out: give -o a name ending in .png, .jpg or .webp"),
        (["-o", "out.png", "--quality", "80"], "--quality is for .jpg and .webp (a PNG is lossless)"),
        (["--quality", "80"], "--quality is for -o names ending in .jpg or .webp"),
        (["-o", "-", "--quality", "80"], "--quality is for .jpg and .webp: -o - writes a PNG"),
        (["-o", "-", "--json"], "-o - and --json both write to stdout: give -o a file name"),
        (["-o", "a.png", "--output-dir", "d"], "give -o (one file) or --output-dir (a folder for default names), not both"),
        (["--output-dir", "photo.png"], "photo.png is not a folder: give --output-dir a folder"),
        (["--output-dir", "no/such/d"], "cannot create the --output-dir no/such/d: No such file or directory"),
        (["-o", "out.jpg", "--quality", "0"], None),
    ],
)  # fmt: skip
def test_output_flags_that_cannot_be_are_one_line_before_anything_runs(work, fake, icedit_home, args, said):
    before = sorted(p.name for p in work.iterdir())
    result = invoke("edit", "photo.png", "add snow", *FAKE, "--session", "s", *args)
    assert result.exit_code == 2
    if said is not None:
        assert result.stderr == f"Error: {said}\n"
    assert fake.engine.calls == [] and dump(icedit_home) is None
    assert sorted(p.name for p in work.iterdir()) == before


def test_webp_at_quality_100_is_lossless_and_jpeg_quality_matters(work, fake, icedit_home):
    sizes = {}
    for quality in ("100", "30"):
        for ext in ("webp", "jpg"):
            name = f"q{quality}.{ext}"
            result = invoke(
                "edit",
                "photo.png",
                "add snow",
                *FAKE,
                "--session",
                "s",
                "--seed",
                "1",
                "-o",
                name,
                "--quality",
                quality,
            )
            assert result.exit_code == 0, result.output
            sizes[name] = (work / name).stat().st_size
    with Image.open(work / "q100.webp") as img:
        assert pixel_digest(img.convert("RGB")) == turn_of(icedit_home, "s").image_sha256
    assert sizes["q30.jpg"] < sizes["q100.jpg"] and sizes["q30.webp"] < sizes["q100.webp"]


def test_o_dash_writes_only_the_png_to_stdout(work):
    proc = subprocess.run(
        [str(ICEDIT), "edit", "photo.png", "add snow", "--preset", "tiny", "--steps", "1", "--seed", "2", "-o", "-"],
        cwd=work, env=env_for(work / "home"), capture_output=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    img = Image.open(io.BytesIO(proc.stdout))
    img.load()
    assert (img.format, img.size, "Seed: 2" in img.text["parameters"]) == ("PNG", (96, 64), True)
    lines = proc.stderr.decode().splitlines()
    assert lines[1].startswith("wrote a PNG to stdout  (seed 2, 96x64, sha256 ")
    assert lines[1].endswith(f"{hashlib.sha256(proc.stdout).hexdigest()[:12]})")
    assert sorted(p.name for p in work.iterdir()) == ["home", "photo.png"]


# ------------------------------------------------------------------------------------------ names


def test_default_names_hold_the_seed_and_the_instruction_and_never_replace(work, fake, icedit_home):
    for instruction in ("add snow", "add a hat", "add snow"):
        result = invoke("edit", "photo.png", instruction, *FAKE, "--seed", "7", "--output-dir", "out")
        assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (work / "out").iterdir())
    assert names == sorted(
        [
            f"photo-7-{short('add snow')}.png",
            f"photo-7-{short('add a hat')}.png",
            f"photo-7-{short('add snow')}-2.png",
        ]
    )
    retried = invoke("retry", turn_of_day(icedit_home), *FAKE, "--output-dir", "out", "--json")
    assert retried.exit_code == 0, retried.output
    assert json.loads(retried.stdout)["output"].startswith("out/")


def turn_of_day(home: Path) -> str:
    with Store(home / "sessions.sqlite3") as store:
        (name,) = [s.name for s in store.sessions()]
    return name


# ------------------------------------------------------------------------------------------ the log


def test_every_edit_is_logged_and_icedit_log_finds_it(work, fake, icedit_home):
    for instruction in ("add snow", "add a hat"):
        assert invoke("edit", "photo.png", instruction, *FAKE, "--seed", "3").exit_code == 0
    day = turn_of_day(icedit_home)
    assert day.startswith("edits-")
    with Store(icedit_home / "sessions.sqlite3") as store:
        kinds = [(t.id, t.parent, t.kind) for t in store.history(day).turns]
    assert kinds == [(1, None, "open"), (2, 1, "edit"), (3, 1, "edit")]  # the photo opened once
    listed = invoke("log")
    assert listed.exit_code == 0
    assert [line.split("  ", 1)[1] for line in listed.stdout.splitlines()] == [
        f"{day} #3  seed 3  add a hat",
        f"{day} #2  seed 3  add snow",
    ]
    found = invoke("log", "SNOW", "--json")
    assert [(f["session"], f["turn"], f["instruction"]) for f in json.loads(found.stdout)] == [
        (day, 2, "add snow")
    ]
    assert json.loads(invoke("log", "-n", "1", "--json").stdout)[0]["turn"] == 3
    assert invoke("log", "zebra").stdout == "no edit's message or instruction contains 'zebra'\n"


def test_the_log_can_be_turned_off(work, fake, icedit_home, tmp_path, monkeypatch):
    (tmp_path / "config.toml").write_text("log = false\n")  # the conftest's ICEDIT_CONFIG
    assert invoke("edit", "photo.png", "add snow", *FAKE).exit_code == 0
    monkeypatch.setenv("ICEDIT_LOG", "true")  # a variable beats the file
    assert invoke("edit", "photo.png", "add a hat", *FAKE).exit_code == 0
    with Store(icedit_home / "sessions.sqlite3") as store:
        assert [t.message for t in store.history(turn_of_day(icedit_home)).turns] == [
            "open photo.png",
            "add a hat",
        ]


# ------------------------------------------------------------------------------------------ provenance


def _turn(params: dict, plan: dict | None = None) -> Turn:
    return Turn(
        id=4, parent=3, kind="edit", message="please, a hat", plan=plan or {"intent": "edit", "instruction": "add a hat, red",
        "ic_prompt": "A diptych ... add a hat, red"}, params=params, image_sha256="ab" * 32, created="T",
    )  # fmt: skip


def test_the_infotext_names_the_weights_with_their_commits_and_the_early_filter():
    facts = provenance(
        _turn(
            {
                "seed": 6, "steps": 28, "guidance": 50.0, "engine": "icedit", "preset": "moe",
                "model": {"source": "black-forest-labs/FLUX.1-Fill-dev", "revision": COMMIT},
                "adapter": {"kind": "lora-moe", "source": "sanaka87/ICEdit-MoE-LoRA", "keys": 9, "num_experts": 4,
                            "top_k": 1, "scale": 0.8, "revision": COMMIT[::-1]},
                "candidates": 3, "early_steps": 4, "candidate_seeds": [5, 6, 7],
            }
        )
    )  # fmt: skip
    text = infotext(facts, (512, 336))
    assert text.split("\n") == [
        "A diptych ... add a hat, red",
        f"Steps: 28, Guidance: 50.0, Seed: 6, Size: 512x336, Model: black-forest-labs/FLUX.1-Fill-dev@{COMMIT}, "
        f"Preset: moe, Lora: sanaka87/ICEdit-MoE-LoRA@{COMMIT[::-1]}, Lora scale: 0.8, Top-k: 1, Candidates: 5 6 7, "
        f'Winner: 6, Instruction: "add a hat, red", Engine: icedit, Version: icedit-assistant {facts["icedit"]}',
    ]
    assert (facts["winner"], facts["early_steps"], facts["message"]) == (6, 4, "please, a hat")


def _session_with(store: Store, name: str, params: list[dict]) -> None:
    picture = Image.new("RGB", (40, 32), (9, 9, 9))
    drafts = [
        NewTurn(
            kind="open",
            message="open a.png",
            png=encode_png(picture),
            image_sha256=pixel_digest(picture),
            size=(40, 32),
        )
    ]
    for i, p in enumerate(params, start=1):
        img = Image.new("RGB", (40, 32), (i * 20, 0, 0))
        drafts.append(
            NewTurn(kind="edit", message=f"edit {i}", png=encode_png(img), image_sha256=png_digest(encode_png(img)),
                    size=(40, 32), plan={"intent": "edit", "instruction": f"do {i}", "rationale": ""}, params=p)
        )  # fmt: skip
    store.add_turns(name, None, drafts)


WEIGHTS = {
    "seed": 1, "steps": 28, "guidance": 50.0, "engine": "icedit", "preset": "default",
    "model": {"source": "black-forest-labs/FLUX.1-Fill-dev", "revision": COMMIT},
    "adapter": {"kind": "lora", "source": "RiverZ/normal-lora", "keys": 10, "num_experts": 0, "top_k": None,
                "scale": 0.7, "revision": COMMIT[::-1]},
}  # fmt: skip


def test_an_exported_script_pins_the_weights_every_edit_ran_with(icedit_home, tmp_path):
    with Store(icedit_home / "sessions.sqlite3") as store:
        _session_with(store, "s", [WEIGHTS, WEIGHTS | {"seed": 2}])
        _session_with(store, "mixed", [WEIGHTS, WEIGHTS | {"adapter": None}])
    assert invoke("sessions", "export", "s", tmp_path / "s.toml").exit_code == 0
    script = tomllib.loads((tmp_path / "s.toml").read_text())
    assert script["options"] == {
        "model": "black-forest-labs/FLUX.1-Fill-dev", "revision": COMMIT, "lora": "RiverZ/normal-lora",
        "lora_revision": COMMIT[::-1], "lora_scale": 0.7,
    }  # fmt: skip
    from sessions.scripts import load_script

    assert load_script(tmp_path / "s.toml").settings()["lora_scale"] == 0.7  # replay runs with them
    assert invoke("sessions", "export", "mixed", tmp_path / "m.toml").exit_code == 0
    mixed = tomllib.loads((tmp_path / "m.toml").read_text())
    assert mixed["options"] == {
        "model": "black-forest-labs/FLUX.1-Fill-dev",
        "revision": COMMIT,
    }  # lora differs


def test_an_archive_keeps_plans_checks_weights_and_extras(icedit_home, tmp_path):
    checked = WEIGHTS | {
        "plan_step": [2, 3], "extras": {"working_size": "512x336"},
        "check": {"score": 0.25, "accept": 0.5, "attempt": 1, "attempts": 3, "judge": "qwen_vl", "note": "why"},
    }  # fmt: skip
    with Store(icedit_home / "sessions.sqlite3") as store:
        _session_with(store, "s", [checked, WEIGHTS | {"plan_step": [3, 3]}])
        export_archive(store, "s", tmp_path / "s.zip")
        imported = import_archive(store, tmp_path / "s.zip", "copy").history
        original = store.history("s")
    assert [t.params for t in imported.turns] == [t.params for t in original.turns]
    assert imported.turns[1].params["check"]["score"] == 0.25


def test_a_replay_of_an_export_paints_the_same_pictures_with_the_adapter_it_ran_with(work, icedit_home):
    """Edited with a LoRA-MoE at scale 0.5 and top-k 2, exported, replayed with no flags: the same pixels."""
    edited = invoke(
        "edit", EXAMPLES / "chelsea.png", "add snow", "--preset", "tiny", "--steps", "1", "--seed", "4", "--session", "s",
        "--lora", "tiny-moe", "--lora-scale", "0.5", "--top-k", "2", "-o", "a.png",
    )  # fmt: skip
    assert edited.exit_code == 0, edited.output
    assert invoke("sessions", "export", "s", "s.toml").exit_code == 0
    assert tomllib.loads((work / "s.toml").read_text())["options"] == {
        "lora": "tiny-moe",
        "lora_scale": 0.5,
        "top_k": 2,
    }
    replayed = invoke("replay", "s.toml", "--out", "out", "--json")  # this process: the same thread count
    assert replayed.exit_code == 0, replayed.output
    last = json.loads(replayed.stdout.splitlines()[-1])
    assert last["image_sha256"] == png_digest((work / "a.png").read_bytes())
