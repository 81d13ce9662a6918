"""Error paths that ended in tracebacks or said the wrong thing (issue 16, classes 5 and 6): text from the
file system, bounds that differed between two layers, settings that meant something else, lazily decoded
data, and numbers that went wrong while sampling. Each is one true line, exit 2, nothing stored.

Table cases for `icedit edit` (paths, adapters, session names, outputs in the way) are in test_bad_input.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import save_file
from store_checks import EXAMPLES, ICEDIT, dump, env_for

from assistant.cli import cli
from assistant.models import SEEDS, next_seed
from plugins.icedit import moe_checkpoint
from plugins.icedit.presets import build_tiny

CHELSEA = EXAMPLES / "chelsea.png"
TOY = EXAMPLES / "toy_edits"
TINY = ["--preset", "tiny", "--steps", "1"]


def invoke(*args: object, **kw):
    return CliRunner().invoke(
        cli, [a if isinstance(a, bytes) else str(a) for a in args], prog_name="icedit", **kw
    )


def run(*args: object, home: Path, cwd: Path, **kw) -> subprocess.CompletedProcess:
    """The real console script; bytes arguments pass through as the file system's bytes."""
    argv = [str(ICEDIT), *(a if isinstance(a, bytes) else str(a) for a in args)]
    env = kw.pop("env", env_for(home))
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, timeout=120, check=False, **kw)


def one_line(stderr: str | bytes) -> str:
    text = stderr.decode() if isinstance(stderr, bytes) else stderr
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if not line.startswith("note:")]
    assert len(lines) == 1, text
    return lines[0]


# ------------------------------------------------------------------------------------------ settings


@pytest.mark.parametrize("value", ["", "  "], ids=["empty", "blank"])
@pytest.mark.parametrize(
    "command",
    [["sessions", "list"], ["edit", CHELSEA, "add snow", *TINY, "--session", "s"]],
    ids=["sessions list", "edit"],
)
def test_icedit_home_set_but_empty_is_one_line_and_nothing_lands_in_the_working_folder(
    tmp_path, value, command
):
    cwd = tmp_path / "here"
    cwd.mkdir()
    result = run(*command, home=tmp_path, cwd=cwd, env=env_for(tmp_path) | {"ICEDIT_HOME": value}, text=True)
    assert result.returncode == 2
    assert one_line(result.stderr) == (
        "Error: bad setting home: ICEDIT_HOME is set but empty: unset it, or give "
        "the folder for the session store"
    )
    assert list(cwd.iterdir()) == []


def test_chat_without_a_terminal_is_one_line_instead_of_running_silently(tmp_path, icedit_home):
    inside = invoke("chat", CHELSEA, "--preset", "tiny")
    assert inside.exit_code == 2
    expected = (
        "Error: icedit chat needs a terminal (its input or output is a pipe or a file): run it in a "
        "terminal; scripts use icedit edit or icedit replay"
    )
    assert one_line(inside.stderr) == expected
    piped = run(
        "chat", "--preset", "tiny", home=icedit_home, cwd=tmp_path, input="make it winter\n", text=True
    )
    assert (piped.returncode, one_line(piped.stderr)) == (2, expected)
    assert dump(icedit_home) is None


# ------------------------------------------------------------------------------------------ seeds


def test_seeds_wrap_within_the_one_range_every_layer_accepts():
    assert next_seed(SEEDS - 1) == 0 and next_seed(SEEDS - 2, 3) == 1 and next_seed(5) == 6


def test_a_retry_after_the_largest_seed_takes_the_next_one_in_range(fake, icedit_home, tmp_path):
    first = invoke(
        "edit",
        CHELSEA,
        "add snow",
        "--engine",
        "fake",
        "--session",
        "s",
        "--seed",
        SEEDS - 1,
        "-o",
        tmp_path / "a.png",
        "--json",
    )
    assert first.exit_code == 0, first.output
    retry = invoke(
        "edit",
        tmp_path / "a.png",
        "try another seed",
        "--engine",
        "fake",
        "--session",
        "s",
        "-o",
        tmp_path / "b.png",
        "--json",
    )
    assert retry.exit_code == 0, retry.output
    assert json.loads(retry.stdout)["intent"] == "retry"
    assert [t[2] for t in dump(icedit_home)["turns"]] == [None, 1, 1]  # both edits hang under the open
    seeds = [json.loads(row[6])["seed"] for row in dump(icedit_home)["turns"][1:]]
    assert seeds == [SEEDS - 1, 0]


# ------------------------------------------------------------------------------------------ text from the file system


def test_a_file_name_that_is_not_utf8_is_edited_and_kept(tmp_path, icedit_home):
    """The edit used to run, then saving "open <name>" failed and the edit was lost."""
    name = b"caf\xe9.png"
    shutil.copy(CHELSEA, os.path.join(os.fsencode(tmp_path), name))
    result = run(
        "edit", name, "add snow", *TINY, "--seed", "4", "--session", "s", home=icedit_home, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    short = hashlib.sha256(b"add snow").hexdigest()[:6]
    assert result.stdout.decode().splitlines()[-1].startswith(f"wrote caf\ufffd-4-{short}.png  (seed 4")
    assert (tmp_path / os.fsdecode(b"caf\xe9-4-" + short.encode() + b".png")).is_file()  # the person's bytes
    shown = run("sessions", "show", "s", "--json", home=icedit_home, cwd=tmp_path)
    assert [t["message"] for t in json.loads(shown.stdout)["turns"]] == ["open caf\ufffd.png", "add snow"]


def test_a_piped_picture_is_read_and_a_device_without_end_is_refused(tmp_path, icedit_home):
    piped = run(
        "edit",
        "/dev/stdin",
        "add snow",
        *TINY,
        "--seed",
        "2",
        "-o",
        tmp_path / "out.png",
        home=icedit_home,
        cwd=tmp_path,
        input=CHELSEA.read_bytes(),
    )
    assert piped.returncode == 0, piped.stderr
    assert (tmp_path / "out.png").stat().st_size > 0
    endless = invoke("edit", "/dev/zero", "add snow", *TINY)
    assert (endless.exit_code, one_line(endless.stderr)) == (
        2,
        "Error: /dev/zero: over 256 MiB came through: not a picture",
    )


# ------------------------------------------------------------------------------------------ lazily decoded data


@pytest.fixture
def bad_dataset(tmp_path) -> Path:
    """The toy edits with example 2's source replaced by text and example 3's target cut short."""
    data = tmp_path / "data"
    shutil.copytree(TOY, data)
    (data / "source" / "01.png").write_text("not a picture")
    target = data / "target" / "02.png"
    target.write_bytes(target.read_bytes()[:100])
    return data


def test_eval_names_the_example_that_is_not_an_image(bad_dataset, tmp_path, icedit_home):
    result = invoke(
        "eval",
        "--preset",
        "tiny",
        "--data",
        bad_dataset,
        "--limit",
        3,
        "--steps",
        1,
        "--out",
        tmp_path / "ev",
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.count("Error: ") == 1  # after the progress bar
    assert (
        f"Error: example 2 of the dataset cannot be read: cannot identify image file '{bad_dataset}/source/01.png'"
        in result.stderr
    )


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        (2, "example 2 of the dataset cannot be read: cannot identify image file"),
        (3, "example 3 of the dataset cannot be read: image file is truncated"),
    ],
    ids=["a source that is text", "a target cut short"],
)
def test_train_names_the_example_that_is_not_an_image(bad_dataset, tmp_path, icedit_home, limit, expected):
    if limit == 3:
        (bad_dataset / "source" / "01.png").write_bytes((TOY / "source" / "01.png").read_bytes())
    result = invoke(
        "train",
        "--preset",
        "tiny",
        "--data",
        bad_dataset,
        "--limit",
        limit,
        "--panel-width",
        64,
        "--rank",
        4,
        "--steps",
        6,
        "--out",
        tmp_path / "tr",
    )
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.stderr.count("Error: ") == 1
    assert f"Error: {expected}" in result.stderr


# ------------------------------------------------------------------------------------------ numbers


def test_latents_that_go_non_finite_stop_the_edit_and_commit_nothing(tmp_path, icedit_home, fake):
    """Finite but absurd adapter weights pass the load check; the sampler's check catches what they do."""
    state = moe_checkpoint.synthetic_checkpoint(build_tiny().transformer, num_experts=2, rank=2)
    save_file({k: v * 1e30 if "lora_B" in k else v for k, v in state.items()}, tmp_path / "huge.safetensors")
    first = invoke(
        "edit", CHELSEA, "add snow", "--engine", "fake", "--session", "s", "-o", tmp_path / "a.png"
    )
    assert first.exit_code == 0, first.output
    before = dump(icedit_home)
    result = invoke(
        "edit",
        CHELSEA,
        "add rain",
        "--preset",
        "tiny",
        "--steps",
        2,
        "--lora",
        tmp_path / "huge.safetensors",
        "--session",
        "s",
        "-o",
        tmp_path / "b.png",
    )
    assert result.exit_code == 2, result.output
    assert one_line(result.stderr) == (
        "Error: the edit went numerically wrong at step 1 of 2 (NaN or infinity in "
        "the latents): nothing was saved; try another --dtype or adapter"
    )
    assert dump(icedit_home) == before and not (tmp_path / "b.png").exists()
