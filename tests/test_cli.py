"""The `icedit` command: in-process through CliRunner (fake engine), and the real console script.

Subprocess runs use the real tiny preset (random weights, CPU); they are few and share results.
"""

from __future__ import annotations

import hashlib
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image
from store_checks import dump

import prompts
from assistant.cli import RANDOM_WEIGHTS_NOTE, cli
from plugins.icedit.diptych import panel_size
from sessions.store import Store

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CHELSEA = EXAMPLES / "chelsea.png"
ICEDIT = Path(sys.executable).with_name("icedit")
WINTER = "make it look like winter"
WINTER_ASKED = "Please make it look like winter!"
NOT_AN_IMAGE = "not an image PIL can read (PNG, JPEG, WebP, ...)"


# -------------------------------------------------------------------------------------------------- helpers


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="icedit")


def env_for(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICEDIT_")}
    return env | {"ICEDIT_HOME": str(home)} | extra


def icedit(*args: object, home: Path, cwd: Path, timeout: float = 120, **extra: str):
    assert ICEDIT.is_file(), f"console script missing: {ICEDIT}"
    return subprocess.run(
        [str(ICEDIT), *map(str, args)],
        cwd=cwd,
        env=env_for(home, **extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def default_png(stem: str, seed: int, instruction: str) -> str:
    """The name an edit gets without -o: stem, seed and a short hash of the instruction."""
    return f"{stem}-{seed}-{hashlib.sha256(instruction.encode()).hexdigest()[:6]}.png"


def sha(path: Path) -> str:
    """The file's checksum (what `wrote ...` prints)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def picture_id(path: Path) -> str:
    """The store's identity of the picture in the file."""
    from sessions.identity import png_digest

    return png_digest(path.read_bytes())


@pytest.fixture
def demo(fake, icedit_home, tmp_path, monkeypatch):
    """Session 'demo' with one fake edit of chelsea.png (turn 1 open, turn 2 edit, cursor 2); cwd is tmp."""
    monkeypatch.chdir(tmp_path)
    result = invoke(
        "edit",
        CHELSEA,
        WINTER,
        "--engine",
        "fake",
        "--session",
        "demo",
        "--seed",
        "1",
        "-o",
        tmp_path / "winter.png",
    )
    assert result.exit_code == 0, result.output
    assert dump(icedit_home)["sessions"][0][1:3] == ("demo", 2)
    return icedit_home


# -------------------------------------------------------------------------------------------- help, imports


def test_help_lists_the_commands(tmp_path):
    proc = icedit("--help", home=tmp_path / "home", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "Usage: icedit [OPTIONS] COMMAND [ARGS]..."
    assert "icedit: edit images by telling it what you want." in proc.stdout
    commands = proc.stdout.split("Commands:")[1].split()
    for name in ("edit", "plugins", "redo", "replay", "sessions", "undo"):
        assert name in commands
    assert proc.stderr == ""
    assert not (tmp_path / "home").exists()  # --help creates no store
    inproc = invoke("--help")
    assert inproc.exit_code == 0
    assert inproc.stdout.splitlines()[0] == "Usage: icedit [OPTIONS] COMMAND [ARGS]..."


def test_importing_the_cli_does_not_import_torch():
    code = "import assistant.cli, sys; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "False False\n"


# ------------------------------------------------------------------------------------------------ bad input


def _bad_file(name: str, content: bytes | None):
    def make(d: Path) -> Path:
        path = d / name
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content)
        return path

    return make


EMPTY = 'Error: the instruction is empty: say what to change, e.g. "make it look like winter"'
FAKE = ["--engine", "fake"]
BAD_INPUTS = {
    # id: (make the image path, or None for chelsea; instruction; extra args; the error line, {img} filled in)
    "missing file": (lambda d: d / "nosuch.png", "add snow", FAKE, "Error: {img}: no such file"),
    "directory": (_bad_file("pics.png", None), "add snow", FAKE, "Error: {img} is a folder, not an image"),
    "zero-byte file": (_bad_file("empty.png", b""), "add snow", FAKE, "Error: {img}: the file is empty"),
    "text as png": (_bad_file("notes.png", b"text\n"), "add snow", FAKE, "Error: {img}: " + NOT_AN_IMAGE),
    "empty instruction": (None, "", FAKE, EMPTY),
    "whitespace instruction": (None, "   ", FAKE, EMPTY),
    "unknown preset": (
        None,
        "add snow",
        ["--preset", "nope"],
        "Error: unknown preset 'nope' (available: default, moe, tiny, toy)",
    ),
    "unknown engine": (
        None,
        "add snow",
        ["--engine", "nope"],
        "Error: unknown engine 'nope' (available: fake, icedit, kontext)",
    ),
    "unknown rewriter": (
        None,
        "add snow",
        [*FAKE, "--rewriter", "nope"],
        "Error: unknown rewriter 'nope' (available: qwen_vl, rules, verbatim)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_edit_input_is_one_error_line_exit_2_and_changes_nothing(demo, tmp_path, fake, case):
    make, instruction, extra, expected = BAD_INPUTS[case]
    image = make(tmp_path) if make else CHELSEA
    before, files = dump(demo), sorted(tmp_path.iterdir())
    result = invoke("edit", image, instruction, "--session", "demo", "--seed", "3", *extra)
    assert result.exit_code == 2, result.output
    assert result.stderr == expected.format(img=image) + "\n"
    assert result.stdout == ""
    assert "Traceback" not in result.output
    assert dump(demo) == before
    assert sorted(tmp_path.iterdir()) == files  # no PNG written either
    assert fake.engine.calls[1:] == []  # only the fixture's edit reached the engine


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["sessions", "show", "nosuch"], "Error: no session named 'nosuch' (see `icedit sessions list`)"),
        (["undo", "nosuch"], "Error: no session named 'nosuch' (see `icedit sessions list`)"),
        (["redo", "nosuch"], "Error: no session named 'nosuch' (see `icedit sessions list`)"),
        (["redo", "demo"], "Error: nothing to redo in session 'demo'"),
    ],
)
def test_session_commands_on_what_is_not_there_fail_in_one_line(demo, args, expected):
    before = dump(demo)
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert result.stderr == expected + "\n"
    assert result.stdout == ""
    assert dump(demo) == before


def test_undo_at_the_root_says_nothing_to_undo_and_changes_nothing(demo):
    result = invoke("undo", "demo")
    assert result.exit_code == 0, result.output
    assert result.stdout == "demo: cursor at #1 (open chelsea.png)\n"
    before = dump(demo)
    assert before["sessions"][0][2] == 1
    result = invoke("undo", "demo")
    assert result.exit_code == 2
    assert result.stderr == "Error: nothing to undo in session 'demo'\n"
    assert result.stdout == ""
    assert dump(demo) == before
    result = invoke("redo", "demo", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {
        "session": "demo",
        "cursor": 2,
        "message": WINTER,
        "image_sha256": before["turns"][1][7],
    }


def test_retry_paints_the_current_edit_again_with_the_next_seed_as_a_sibling(
    demo, fake, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    result = invoke("retry", "demo", "--engine", "fake", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["intent"], data["instruction"], data["turn"], data["seed"]) == ("retry", WINTER, 3, 2)
    assert picture_id(tmp_path / data["output"]) == data["image_sha256"]
    assert data["output"] == default_png("demo", 2, WINTER)
    assert fake.engine.calls[-1].plan.instruction == WINTER
    show = json.loads(invoke("sessions", "show", "demo", "--json").stdout)
    assert [t["parent"] for t in show["turns"]] == [None, 1, 1] and show["cursor"] == 3
    invoke("undo", "demo")
    before = dump(demo)
    result = invoke("retry", "demo", "--engine", "fake")
    assert (result.exit_code, result.stderr) == (
        2,
        "Error: nothing to retry: the current image is not an edit\n",
    )
    assert dump(demo) == before


def test_retry_takes_the_early_filter_settings_given_on_its_command_line(demo, fake, tmp_path):
    from assistant.hookspecs import hookimpl
    from assistant.plugins import JudgeSpec, get_plugin_manager
    from assistant.testing import BrighterJudge

    class Judges:
        @hookimpl
        def register_judges(self, register):
            register(JudgeSpec("brighter", lambda settings: BrighterJudge(), "the brighter wins"))

    get_plugin_manager().register(Judges(), name="brighter")
    try:
        filtered = invoke(
            "retry",
            "demo",
            "--engine",
            "fake",
            "--candidates",
            "3",
            "--early-steps",
            "2",
            "--judge",
            "brighter",
            "--json",
        )
        assert filtered.exit_code == 0, filtered.output
        assert [c["seed"] for c in json.loads(filtered.stdout)["candidates"]] == [2, 3, 4]
        invoke("undo", "demo")
        invoke("redo", "demo")  # back on the filtered retry: its 3 candidates are the default now
        plain = invoke("retry", "demo", "--engine", "fake", "--candidates", "1", "--json")
        assert plain.exit_code == 0, plain.output
        assert "candidates" not in json.loads(plain.stdout) and fake.engine.calls[-1].candidates == 1
    finally:
        get_plugin_manager().unregister(name="brighter")


def test_steps_out_of_range_is_a_usage_error_exit_2_and_changes_nothing(demo, tmp_path):
    before = dump(demo)
    result = invoke("edit", CHELSEA, "add snow", "--engine", "fake", "--session", "demo", "--steps", "0")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "Error: Invalid value for '--steps': 0 is not in the range 1<=x<=200. (see `icedit edit --help`)"
    ]
    assert "Traceback" not in result.output
    assert dump(demo) == before


# ----------------------------------------------------------------------------------------- in-process edits


def test_edit_without_output_writes_stem_seed_png_and_reports_it(fake, icedit_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("edit", CHELSEA, WINTER_ASKED, "--engine", "fake", "--seed", "42")
    assert result.exit_code == 0, result.output
    out = tmp_path / default_png("chelsea", 42, WINTER)
    assert Image.open(out).size == (451, 300)
    assert result.stdout.splitlines() == [
        "rules: used your request as the edit instruction",
        f"wrote {out.name}  (seed 42, 451x300, sha256 {sha(out)[:12]})",
    ]
    assert result.stderr == ""  # the fake engine has real weights: no random-weights note
    assert fake.engine.calls[0].plan.instruction == WINTER
    assert fake.engine.calls[0].steps == 28
    kept = dump(icedit_home)  # without --session the edit is kept in the day's session
    assert [row[1][:6] for row in kept["sessions"]] == ["edits-"]
    assert [(row[3], row[4]) for row in kept["turns"]] == [
        ("open", "open chelsea.png"),
        ("edit", WINTER_ASKED),
    ]


def test_sessions_show_after_two_edits(demo, tmp_path):
    second = tmp_path / "scarf.png"
    result = invoke(
        "edit",
        tmp_path / "winter.png",
        "add a red scarf",
        *FAKE,
        "--session",
        "demo",
        "--seed",
        "7",
        "--steps",
        "2",
        "-o",
        second,
    )
    assert result.exit_code == 0, result.output
    shown = invoke("sessions", "show", "demo", "--json")
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)
    assert set(data) == {"name", "cursor", "turns"}
    assert data["name"] == "demo" and data["cursor"] == 3
    turns = [
        {k: t[k] for k in ("id", "parent", "kind", "message", "instruction", "seed", "steps")}
        for t in data["turns"]
    ]
    assert turns == [
        {
            "id": 1,
            "parent": None,
            "kind": "open",
            "message": "open chelsea.png",
            "instruction": None,
            "seed": None,
            "steps": None,
        },
        {
            "id": 2,
            "parent": 1,
            "kind": "edit",
            "message": WINTER,
            "instruction": WINTER,
            "seed": 1,
            "steps": 28,
        },
        {
            "id": 3,
            "parent": 2,
            "kind": "edit",
            "message": "add a red scarf",
            "instruction": "add a red scarf",
            "seed": 7,
            "steps": 2,
        },
    ]
    shas = [t["image_sha256"] for t in data["turns"]]
    assert shas[1] == picture_id(tmp_path / "winter.png") and shas[2] == picture_id(second)
    # the same through the real console script (no engine needed to read the store)
    proc = icedit("sessions", "show", "demo", "--json", home=demo, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == data
    text = invoke("sessions", "show", "demo").stdout.splitlines()
    assert text == [
        "session demo (cursor at #3)",
        f"  #1 open: open chelsea.png  [{shas[0][:12]}]",
        f"    #2 edit: {WINTER}  seed 1  [{shas[1][:12]}]",
        f"*     #3 edit: add a red scarf  seed 7  [{shas[2][:12]}]",
    ]


# -------------------------------------------------------------------------------------- real console script


TINY_EDIT = [CHELSEA, WINTER, "--preset", "tiny", "--steps", "2", "--seed", "5"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The same tiny edit twice (A.png, B.png) and once with --native-size (N.png), run side by side."""
    cwd = tmp_path_factory.mktemp("tiny")
    env = env_for(cwd / "home", OMP_NUM_THREADS="1")  # three at once: one thread each is faster on few cores
    runs = {
        "A": [*TINY_EDIT, "-o", "A.png", "--json"],
        "B": [*TINY_EDIT, "-o", "B.png", "--json"],
        "N": [*TINY_EDIT, "-o", "N.png", "--native-size"],
    }
    procs = {
        k: subprocess.Popen(
            [str(ICEDIT), "edit", *map(str, args)],
            cwd=cwd,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for k, args in runs.items()
    }
    results = {}
    for k, p in procs.items():
        out, err = p.communicate(timeout=180)
        results[k] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return cwd, results


def test_tiny_edits_are_byte_identical_at_the_source_size(tiny):
    cwd, runs = tiny
    for k in "AB":
        assert runs[k].returncode == 0, runs[k].stderr
    a, b = (cwd / "A.png").read_bytes(), (cwd / "B.png").read_bytes()
    assert a == b
    assert Image.open(cwd / "A.png").size == Image.open(CHELSEA).size == (451, 300)
    # without --session the three edits, made at once, are kept in the day's session under one open
    with Store(cwd / "home" / "sessions.sqlite3") as store:
        (name,) = [info.name for info in store.sessions()]
        day = store.history(name)
    assert re.fullmatch(r"edits-\d{4}-\d\d-\d\d", name)
    assert sorted((t.kind, t.parent) for t in day.turns) == [
        ("edit", 1),
        ("edit", 1),
        ("edit", 1),
        ("open", None),
    ]


def test_native_size_keeps_the_panel_size(tiny):
    cwd, runs = tiny
    assert runs["N"].returncode == 0, runs["N"].stderr
    assert panel_size(451, 300) == (512, 336)
    assert Image.open(cwd / "N.png").size == (512, 336)
    lines = runs["N"].stdout.splitlines()
    assert lines == [
        "rules: used your request as the edit instruction",
        f"wrote N.png  (seed 5, 512x336, sha256 {sha(cwd / 'N.png')[:12]})",
    ]


def test_tiny_json_describes_the_edit(tiny):
    cwd, runs = tiny
    data = json.loads(runs["A"].stdout)
    assert {
        "seed",
        "ic_prompt",
        "nfe",
        "rewriter",
        "engine",
        "output",
        "image_sha256",
        "timings",
        "random_weights",
    } <= set(data)
    assert data["seed"] == 5
    assert data["nfe"] == data["steps"] == 2
    assert data["ic_prompt"] == prompts.render("ic_edit.txt", instruction=WINTER)
    assert data["instruction"] == WINTER
    assert data["rewriter"] == "rules" and data["engine"] == "icedit"
    assert data["output"] == "A.png"
    assert data["random_weights"] is True
    assert data["size"] == [451, 300]
    assert data["image_sha256"] == picture_id(cwd / "A.png")
    timings = data["timings"]
    assert {"rewrite", "agent", "total"} < set(timings)  # plus the engine's own phases
    assert all(isinstance(v, float) and v >= 0 for v in timings.values())
    assert timings["total"] >= max(v for k, v in timings.items() if k != "total") > 0
    b = json.loads(runs["B"].stdout)
    assert b["image_sha256"] == data["image_sha256"] and b["output"] == "B.png"


def test_tiny_edits_say_their_weights_are_random_on_stderr_only(tiny):
    _, runs = tiny
    for run in runs.values():
        assert run.stderr.splitlines() == [RANDOM_WEIGHTS_NOTE]
        assert RANDOM_WEIGHTS_NOTE not in run.stdout


def test_offline_and_nothing_cached_names_offline_mode_and_every_missing_artifact_at_once(tmp_path):
    started = time.monotonic()
    proc = icedit(
        "edit",
        CHELSEA,
        "add snow",
        "--session",
        "real",
        home=tmp_path / "home",
        cwd=tmp_path,
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_OFFLINE="1",
    )
    assert proc.returncode == 2
    assert time.monotonic() - started < 30  # no retries, nothing loaded
    assert proc.stdout == ""
    summary, *lines = proc.stderr.splitlines()
    assert summary.startswith(
        "Error: 2 of the 3 model artifacts this command needs (and 1 optional) cannot be had "
        "now (offline mode is set: HF_HUB_OFFLINE)"
    )
    assert "`icedit download`" in summary and "--preset tiny" in summary
    assert [line.split(" (")[0].strip() for line in lines] == [
        "FLUX.1 Fill pipeline 'black-forest-labs/FLUX.1-Fill-dev'",
        "LoRA 'RiverZ/normal-lora'",
        "VLM 'Qwen/Qwen2.5-VL-7B-Instruct'",
    ]
    assert all(
        ": not in the Hugging Face cache and offline mode is set (HF_HUB_OFFLINE); unset HF_HUB_OFFLINE to "
        "download it, or fetch it elsewhere with `hf download " in line
        for line in lines
    )
    assert "--include 'model_index.json' --include '*/*.json'" in lines[0]
    assert lines[2].endswith("(optional: without it the rules rewriter runs)")
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no store opened, no cache made, no picture written


def test_verbatim_paints_what_the_official_inference_script_paints(tmp_path):
    """scripts/inference.py of River-Zhang/ICEdit, on the tiny pipeline: its diptych, mask, call and crop."""
    import numpy as np
    import torch

    from plugins.icedit.presets import build_tiny

    instruction = "Make her hair dark green and her clothes checked."
    result = invoke(
        "edit",
        EXAMPLES / "astronaut.png",
        instruction,
        "--rewriter",
        "verbatim",
        "--preset",
        "tiny",
        "--seed",
        "42",
        "--native-size",
        "-o",
        tmp_path / "ours.png",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rewriter"] == "verbatim"

    image = Image.open(EXAMPLES / "astronaut.png").convert("RGB")
    assert image.size[0] == 512
    prompt = (
        "A diptych with two side-by-side images of the same scene. On the right, the scene is exactly the "
        f"same as on the left but {instruction}"
    )
    width, height = image.size
    combined = Image.new("RGB", (width * 2, height))
    combined.paste(image, (0, 0))
    combined.paste(image, (width, 0))
    mask_array = np.zeros((height, width * 2), dtype=np.uint8)
    mask_array[:, width:] = 255
    official = (
        build_tiny()(
            prompt=prompt,
            image=combined,
            mask_image=Image.fromarray(mask_array),
            height=height,
            width=width * 2,
            guidance_scale=50,
            num_inference_steps=28,
            generator=torch.Generator("cpu").manual_seed(42),
        )
        .images[0]
        .crop((width, 0, width * 2, height))
    )
    assert json.loads(result.stdout)["ic_prompt"] == prompt
    assert Image.open(tmp_path / "ours.png").convert("RGB").tobytes() == official.tobytes()


def test_ctrl_c_while_denoising_exits_130_and_saves_nothing(icedit_home, tmp_path):
    """SIGINT once denoising has started (seen on a pty, where progress is printed): stop, keep nothing."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [
            str(ICEDIT),
            "edit",
            str(CHELSEA),
            WINTER,
            "--preset",
            "tiny",
            "--steps",
            "200",
            "--seed",
            "1",
            "--session",
            "s",
            "-o",
            "S.png",
        ],
        cwd=tmp_path,
        env=env_for(icedit_home),
        stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    err, sent = b"", False
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                err += chunk
            if not sent and b"denoise step 2/200" in err:
                proc.send_signal(signal.SIGINT)
                sent = True
        code = proc.wait(timeout=60)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    assert sent, err.decode(errors="replace")
    assert code == 130
    lines = [line.strip() for line in err.decode().replace("\r", "\n").split("\n") if line.strip()]
    assert "denoise step 200/200" not in lines
    assert [line for line in lines if "nothing was saved" in line] == [
        "Error: edit cancelled between steps: nothing was saved"
    ]
    assert lines[-1] == "Error: edit cancelled between steps: nothing was saved"
    assert "Traceback" not in err.decode()
    assert proc.stdout.read() == b""
    assert not (tmp_path / "S.png").exists()
    listed = icedit("sessions", "list", "--json", home=icedit_home, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []


NO_EDIT = """
import json, sys
from assistant.cli import cli
codes = []
for args in (["sessions", "list", "--json"], ["sessions", "show", "walk"], ["undo", "walk"], ["redo", "walk"]):
    try:
        cli(args, prog_name="icedit")
    except SystemExit as done:
        codes.append(done.code)
heavy = [m for m in ("torch", "huggingface_hub", "diffusers", "transformers", "safetensors") if m in sys.modules]
print(json.dumps({"codes": codes, "heavy": heavy}))
"""


def test_commands_that_do_not_edit_import_no_torch_and_check_no_engine(tmp_path):
    """A store of sessions is readable whatever the engine settings say and whichever libraries are broken."""
    home = tmp_path / "home"
    home.mkdir()
    fixture = Path(__file__).resolve().parent / "fixtures" / "store-v1.sqlite3"
    (home / "sessions.sqlite3").write_bytes(fixture.read_bytes())
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICEDIT_")}
    proc = subprocess.run(
        [sys.executable, "-c", NO_EDIT],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env
        | {"ICEDIT_HOME": str(home), "ICEDIT_PRESET": "no-such-preset", "ICEDIT_ENGINE": "no-such-engine"},
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result == {"codes": [0, 0, 0, 0], "heavy": []}
    assert proc.stderr == ""


def test_edit_reads_a_move_to_an_earlier_turn_in_words(demo, fake, tmp_path):
    """`icedit edit` with "go back to turn 1" moves the session's cursor and paints nothing."""
    moved = invoke("edit", CHELSEA, "go back to turn 1", "--engine", "fake", "--session", "demo", "--json")
    assert moved.exit_code == 0, moved.output
    report = json.loads(moved.stdout)
    assert (report["intent"], report["turn"], report["output"]) == ("jump", 1, None)
    assert dump(demo)["sessions"][0][1:3] == ("demo", 1)
    before = dump(demo)
    missing = invoke("edit", CHELSEA, "branch from turn 7", "--engine", "fake", "--session", "demo")
    assert (missing.exit_code, missing.stderr) == (2, "Error: session 'demo' has no turn 7\n")
    assert dump(demo) == before


@pytest.mark.parametrize("args", [["-h"], ["edit", "-h"], ["sessions", "list", "-h"], ["eval", "-h"]])
def test_dash_h_is_help_everywhere(args):
    result = CliRunner().invoke(cli, args, prog_name="icedit")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"Usage: icedit {' '.join(args[:-1])}".rstrip() + " ")
    assert result.stdout == CliRunner().invoke(cli, [*args[:-1], "--help"], prog_name="icedit").stdout
