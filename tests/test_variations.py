"""Issue 19 part 1: many results from one process: -n N variations, several images with one pipeline
load, and under torchrun / accelerate launch the processes share the images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from store_checks import dump, env_for

from assistant.cli import cli
from assistant.errors import UserError
from sessions.identity import png_digest
from sessions.store import Store

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ICEDIT = Path(sys.executable).with_name("icedit")
FAKE = ["--engine", "fake"]


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="icedit")


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name, size in (("a.png", (96, 64)), ("b.png", (64, 96)), ("c.png", (80, 80))):
        Image.open(EXAMPLES / "chelsea.png").convert("RGB").resize(size).save(tmp_path / name)
    return tmp_path


def day(home: Path):
    with Store(home / "sessions.sqlite3") as store:
        (name,) = [s.name for s in store.sessions()]
        return store.history(name)


def test_n_3_makes_three_sibling_turns_and_three_files_in_one_process(tmp_path):
    proc = subprocess.run(
        [str(ICEDIT), "edit", EXAMPLES / "chelsea.png", "add snow", "--preset", "tiny", "--steps", "2",
         "--seed", "7", "-n", "3", "--session", "s", "--output-dir", "out", "--json"],
        cwd=tmp_path, env=env_for(tmp_path / "home"), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    said = json.loads(proc.stdout)  # one document for one image
    with Store(tmp_path / "home" / "sessions.sqlite3") as store:
        history = store.history("s")
    edits = [t for t in history.turns if t.kind == "edit"]
    assert [(t.parent, t.seed) for t in edits] == [(1, 7), (1, 8), (1, 9)]  # siblings under the open
    assert [v["seed"] for v in said["variations"]] == [7, 8, 9] and said["nfe"] == 6
    files = sorted((tmp_path / "out").iterdir())
    assert [v["output"] for v in said["variations"]] == [f"out/{f.name}" for f in files]
    assert [png_digest(f.read_bytes()) for f in files] == [t.image_sha256 for t in edits]
    assert len({t.image_sha256 for t in edits}) == 3  # three different pictures


def test_variations_without_batching_run_each_seed_through_edit(work, fake, icedit_home):
    result = invoke("edit", "a.png", "add snow", *FAKE, "--seed", "4", "-n", "3", "--json")
    assert result.exit_code == 0, result.output
    assert [r.seed for r in fake.engine.calls] == [4, 5, 6]
    said = json.loads(result.stdout)
    edits = [t for t in day(icedit_home).turns if t.kind == "edit"]
    assert [(t.parent, t.seed) for t in edits] == [(1, 4), (1, 5), (1, 6)]
    assert said["turn"] == edits[0].id and [v["turn"] for v in said["variations"]] == [t.id for t in edits]


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["a.png", "add snow", "-n", "2", "-o", "x.png"], "-o names one file: for several pictures give --output-dir, or neither (default names)"),
        (["a.png", "b.png", "add snow", "-o", "x.png"], "-o names one file: for several pictures give --output-dir, or neither (default names)"),
        (["a.png", "add snow", "-n", "2", "--candidates", "3"], "-n 2 paints 2 pictures to choose from; --candidates picks one itself: use one or the other"),
        (["a.png", "add snow", "-n", "2", "--attempts", "3"], "-n 2 paints 2 pictures to choose from; the self-check (--attempts, --check) picks one itself: use one or the other"),
        (["a.png", "add snow", "-n", "17"], None),
        (["a.png", "nope.png", "add snow"], "nope.png: no such file"),
        (["a.png"], 'give a picture and what to change: icedit edit a.png "add snow" (see `icedit edit --help`)'),
        (["a.png", "add snow, then add a hat", "-n", "2"], "-n 2 paints variations of one change; this message asks for 2 in a row: ask for one, or leave out -n"),
    ],
)  # fmt: skip
def test_what_cannot_be_is_one_line_and_nothing_is_kept(work, fake, icedit_home, args, said):
    before = sorted(p.name for p in work.iterdir())
    result = invoke("edit", *args, *FAKE)
    assert result.exit_code == 2
    if said is not None:
        assert result.stderr == f"Error: {said}\n"
    assert fake.engine.calls == [] and sorted(p.name for p in work.iterdir() if p.name != "home") == before
    kept = dump(icedit_home)
    assert kept is None or kept["turns"] == []


def test_several_images_load_the_pipeline_once(work, icedit_home, monkeypatch):
    import plugins.icedit.engine as engine_module

    loads = []
    real = engine_module.load_pipeline
    monkeypatch.setattr(engine_module, "load_pipeline", lambda options: loads.append(1) or real(options))
    result = invoke(
        "edit",
        "a.png",
        "b.png",
        "c.png",
        "add snow",
        "--preset",
        "tiny",
        "--steps",
        "1",
        "--seed",
        "2",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert loads == [1]
    rows = [json.loads(line) for line in result.stdout.splitlines()]  # one JSON line per image
    assert [r["size"] for r in rows] == [[96, 64], [64, 96], [80, 80]] and {r["seed"] for r in rows} == {2}
    assert [line for line in result.stderr.splitlines() if line.startswith("image ")] == [
        "image 1 of 3: a.png", "image 2 of 3: b.png", "image 3 of 3: c.png",
    ]  # fmt: skip
    assert sorted(p.name for p in work.iterdir() if p.name.endswith(".png") and "-2-" in p.name) == sorted(
        Path(r["output"]).name for r in rows
    )


def test_a_failure_after_the_first_image_keeps_what_was_done(work, fake, icedit_home, monkeypatch):
    real = fake.engine.edit

    def second_fails(request, events, cancel):
        if len(fake.engine.calls) == 1:
            fake.engine.calls.append(request)
            raise UserError("out of memory for a 64x96 diptych")
        return real(request, events, cancel)

    monkeypatch.setattr(fake.engine, "edit", second_fails)
    result = invoke("edit", "a.png", "b.png", "c.png", "add snow", *FAKE, "--seed", "1")
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == (
        "Error: image 2 of 3 (b.png): out of memory for a 64x96 diptych (the 1 before it are written)"
    )
    assert len(fake.engine.calls) == 2  # c.png never ran
    assert [t.kind for t in day(icedit_home).turns] == ["open", "edit"]
    assert len([p for p in work.iterdir() if p.name.startswith("a-1-")]) == 1


def test_two_processes_share_the_images_and_make_what_one_makes(work, icedit_home):
    args = [
        "edit",
        "a.png",
        "b.png",
        "c.png",
        "add snow",
        "--preset",
        "tiny",
        "--steps",
        "1",
        "--seed",
        "3",
        "--json",
    ]
    one = invoke(*args, "--output-dir", "one")  # one process: this one
    assert one.exit_code == 0, one.output
    env = {k: v for k, v in env_for(work / "two-home").items() if not k.startswith("ACCELERATE_")}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
         str(ICEDIT), *args, "--output-dir", "two"],
        cwd=work, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    names = sorted(p.name for p in (work / "one").iterdir())
    assert len(names) == 3 and sorted(p.name for p in (work / "two").iterdir()) == names
    for name in names:  # the same pictures, whichever process painted them
        a, b = (np.asarray(Image.open(work / d / name), dtype=int) for d in ("one", "two"))
        assert np.abs(a - b).max() <= 2, name
    assert len(two.stdout.splitlines()) == 3  # each image's line, from the process that edited it
    turns = day(work / "two-home").turns
    assert sorted(t.kind for t in turns) == ["edit"] * 3 + ["open"] * 3


# ------------------------------------------------------------------------------------------ replay a folder


def test_replay_runs_a_folder_of_scripts_with_one_engine(work, fake, icedit_home, monkeypatch):
    from assistant import plugins

    for name, image in (("one", "a.png"), ("two", "b.png")):
        assert (
            invoke("edit", image, f"add snow to {name}", *FAKE, "--session", name, "--seed", "3").exit_code
            == 0
        )
        assert invoke("sessions", "export", name, work / "scripts" / f"{name}.toml").exit_code == 0
    built = []
    real = plugins.build
    monkeypatch.setattr(plugins, "build", lambda kind, *a: built.append(kind) or real(kind, *a))
    result = invoke("replay", work / "scripts", "--out", "out", *FAKE, "--session", "again", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(Path(r["script"]).name, r["turn"], r["output"]) for r in rows] == [
        ("one.toml", 1, "out/one/01-edit.png"),
        ("two.toml", 1, "out/two/01-edit.png"),
    ]
    assert built.count("engines") == 1  # the scripts share their settings: one engine
    with Store(icedit_home / "sessions.sqlite3") as store:
        for name in ("one", "two"):
            original, again = store.history(name), store.history(f"again-{name}")
            assert [t.image_sha256 for t in again.turns] == [t.image_sha256 for t in original.turns]


def test_replay_of_a_folder_without_scripts_is_one_line(work):
    (work / "empty").mkdir()
    result = invoke("replay", work / "empty", "--out", "out")
    assert (result.exit_code, result.stderr) == (
        2,
        f"Error: {work / 'empty'}: no replay scripts (*.toml) in the folder\n",
    )


def test_variations_painted_one_by_one_are_kept_as_they_land(work, fake, icedit_home, monkeypatch):
    real = fake.engine.edit

    def third_fails(request, events, cancel):
        if len(fake.engine.calls) == 2:
            fake.engine.calls.append(request)
            raise UserError("out of memory for a 96x64 diptych")
        return real(request, events, cancel)

    monkeypatch.setattr(fake.engine, "edit", third_fails)
    result = invoke("edit", "a.png", "add snow", *FAKE, "--seed", "4", "-n", "4", "--output-dir", "out")
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == (
        "Error: stopped at variation 3 of 4: out of memory for a 96x64 diptych (what landed before it is kept)"
    )
    assert [t.seed for t in day(icedit_home).turns if t.kind == "edit"] == [4, 5]
    assert len(list((work / "out").iterdir())) == 2  # the two that landed are written


def test_a_session_name_with_a_slash_makes_a_plain_default_name(work, fake, icedit_home):
    assert (
        invoke("edit", "a.png", "add snow", *FAKE, "--session", "trips/paris", "--seed", "1").exit_code == 0
    )
    result = invoke("retry", "trips/paris", *FAKE, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["output"].startswith("trips_paris-2-")
