"""Replay scripts through the CLI: reproducible runs, one-line validation errors, export -> replay."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from assistant.agent import Agent
from sessions.history import History
from sessions.identity import encode_png, png_digest
from sessions.store import Store

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def replay(*args: str):
    return CliRunner().invoke(cli_group(), ["replay", *map(str, args)])


def cli_group():
    from assistant.cli import cli

    return cli


def rows_of(result) -> list[dict]:
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


# ---------------------------------------------------------------------- the example, on the tiny model


@pytest.fixture(scope="module")
def winter_runs(tmp_path_factory):
    """examples/winter_walk.toml replayed twice on the tiny model: [(rows, out_dir), (rows, out_dir)]."""
    runs = []
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("ICEDIT_")]:
            mp.delenv(key)
        mp.setenv("ICEDIT_HOME", str(tmp_path_factory.mktemp("home")))
        for _ in range(2):
            out = tmp_path_factory.mktemp("winter")
            result = replay(EXAMPLES / "winter_walk.toml", "--out", out, "--preset", "tiny", "--json")
            assert "random weights" in result.stderr
            runs.append((rows_of(result), out))
    return runs


def test_the_example_replays_byte_identically(winter_runs):
    (rows1, out1), (rows2, out2) = winter_runs
    assert len(rows1) == len(rows2) == 5
    assert [r["image_sha256"] for r in rows1] == [r["image_sha256"] for r in rows2]
    names = sorted(p.name for p in out1.iterdir())
    assert names == ["01-edit.png", "02-edit.png", "03-undo.png", "04-edit.png", "05-retry.png"]
    assert sorted(p.name for p in out2.iterdir()) == names
    for row1, row2 in zip(rows1, rows2, strict=True):
        png1, png2 = Path(row1["output"]).read_bytes(), Path(row2["output"]).read_bytes()
        assert png1 == png2
        assert png_digest(png1) == row1["image_sha256"]


def test_the_example_rows_say_what_each_turn_did(winter_runs):
    rows, out = winter_runs[0]
    assert [r["intent"] for r in rows] == ["edit", "edit", "undo", "edit", "retry"]
    assert [r["turn"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r.get("seed") for r in rows] == [101, 7, None, 104, 105]  # seed + n unless the turn sets one
    assert [r.get("nfe") for r in rows] == [8, 8, None, 8, 8]  # steps = 8 in the script
    assert rows[4]["instruction"] == rows[3]["instruction"] == "make it a snowy night instead"
    assert all(r["random_weights"] for r in rows if "seed" in r)
    # the undo is back on turn 1's picture; the retry is a sibling of turn 4, not its child
    assert rows[2]["image_sha256"] == rows[0]["image_sha256"]
    assert rows[2]["cursor"] == rows[0]["cursor"]
    assert (out / "03-undo.png").read_bytes() == (out / "01-edit.png").read_bytes()
    assert (
        len(
            {
                rows[0]["image_sha256"],
                rows[1]["image_sha256"],
                rows[3]["image_sha256"],
                rows[4]["image_sha256"],
            }
        )
        == 4
    )


# ---------------------------------------------------------------------- validation: one line, exit 2


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "scripts"
    d.mkdir()
    (d / "cat.png").write_bytes((EXAMPLES / "chelsea.png").read_bytes())
    return d


def script(folder: Path, text: str) -> Path:
    path = folder / "s.toml"
    path.write_text(text, "utf-8")
    return path


OK_TURN = '[[turns]]\nsay = "add a hat"\n'


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            'source = "cat.png"\n[[turns]]\nsay =\n',
            "s.toml: not valid TOML: Invalid value (at line 3, column 6)",
        ),
        ('source = "cat.png"\ncolour = 1\n' + OK_TURN, "s.toml: colour: Extra inputs are not permitted"),
        (
            'source = "cat.png"\n' + OK_TURN + '[[turns]]\nsay = "x"\ncolur = "red"\n',
            "s.toml: turn 2: colur: Extra inputs are not permitted",
        ),
        (
            'source = "cat.png"\n[[turns]]\nsay = "x"\ncommand = "undo"\n',
            "s.toml: turn 1: Value error, a turn needs exactly one of say, command, open",
        ),
        (
            'source = "cat.png"\n[[turns]]\ncommand = "undo"\nseed = 3\n',
            "s.toml: turn 1: Value error, instruction, seed, steps, guidance, candidates and early_steps go with say",
        ),
        (
            'source = "cat.png"\n[[turns]]\ncommand = "jump"\n',
            "s.toml: turn 1: command: Input should be 'undo' or 'redo'",
        ),
        (
            'source = "cat.png"\nturns = []\n',
            "s.toml: turns: List should have at least 1 item after validation, not 0",
        ),
        ('source = "cat.png"\n', "s.toml: turns: Field required"),
        (OK_TURN, "s.toml: source: Field required"),
        (
            'source = "cat.png"\nsteps = 0\n' + OK_TURN,
            "s.toml: steps: Input should be greater than or equal to 1",
        ),
        (
            'source = "cat.png"\n[[turns]]\nsay = "x"\nsteps = 0\n',
            "s.toml: turn 1: steps: Input should be greater than or equal to 1",
        ),
        (
            'source = "../x.png"\n' + OK_TURN,
            "../x.png: replay scripts may only name files in their own folder",
        ),
        (
            'source = "sub/../../x.png"\n' + OK_TURN,
            "sub/../../x.png: replay scripts may only name files in their own folder",
        ),
        (
            'source = "/etc/passwd"\n' + OK_TURN,
            "/etc/passwd: replay scripts may only name files in their own folder",
        ),
        ('source = "missing.png"\n' + OK_TURN, "{folder}/missing.png: no such file"),
    ],
    ids=[
        "toml",
        "unknown-key",
        "unknown-turn-key",
        "say+command",
        "seed-on-command",
        "bad-command",
        "no-turns",
        "turns-missing",
        "source-missing",
        "steps-0",
        "turn-steps-0",
        "dotdot",
        "dotdot-inside",
        "absolute",
        "missing-file",
    ],
)
def test_script_errors_are_one_line_exit_2(folder, fake, text, error):
    out = folder / "out"
    result = replay(script(folder, text), "--out", out, "--engine", "fake", "--json")
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    if error.startswith("s.toml"):
        error = f"{folder}/{error}"
    assert result.stderr == f"Error: {error.format(folder=folder.resolve())}\n"
    assert not out.exists()  # nothing was run, so nothing was written
    assert fake.engine.calls == []


def test_a_link_leading_out_of_the_folder_is_refused(folder, tmp_path, fake):
    outside = tmp_path / "secret.png"
    outside.write_bytes((EXAMPLES / "chelsea.png").read_bytes())
    (folder / "link.png").symlink_to(outside)
    result = replay(
        script(folder, 'source = "link.png"\n' + OK_TURN), "--out", folder / "out", "--engine", "fake"
    )
    assert result.exit_code == 2
    assert result.stderr == "Error: link.png: leads outside the script's folder\n"
    assert fake.engine.calls == []


def test_a_missing_script_is_one_line(tmp_path):
    result = replay(tmp_path / "nope.toml", "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr == f"Error: {tmp_path / 'nope.toml'}: no such replay script\n"


def test_script_paths_are_relative_to_the_script_not_the_working_directory(
    folder, fake, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    result = replay(
        script(folder, 'source = "cat.png"\nseed = 10\n' + OK_TURN),
        "--out",
        "o",
        "--engine",
        "fake",
        "--json",
    )
    (row,) = rows_of(result)
    assert (row["intent"], row["seed"], row["instruction"]) == ("edit", 11, "add a hat")
    assert Path(row["output"]) == Path("o") / "01-edit.png"
    assert png_digest((tmp_path / "o" / "01-edit.png").read_bytes()) == row["image_sha256"]


def test_the_fake_engine_replays_identically_and_the_command_line_beats_the_script(folder, fake):
    text = 'source = "cat.png"\nsteps = 4\nengine = "nope"\n' + OK_TURN + '[[turns]]\nsay = "try again"\n'
    path = script(folder, text)
    first = rows_of(replay(path, "--out", folder / "a", "--engine", "fake", "--json"))
    second = rows_of(replay(path, "--out", folder / "b", "--engine", "fake", "--json"))
    assert [r["image_sha256"] for r in first] == [r["image_sha256"] for r in second]
    assert [r["intent"] for r in first] == ["edit", "retry"]
    assert [c.steps for c in fake.engine.calls] == [4, 4, 4, 4]
    assert [c.seed for c in fake.engine.calls] == [1, 2, 1, 2]
    # without --engine the script's engine is used
    result = replay(path, "--out", folder / "c", "--json")
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: unknown engine 'nope' (available: ")


# ---------------------------------------------------------------------- export -> replay


def shape(history: History, turn_id: int) -> tuple:
    """A turn and its subtree without ids: what must survive an export and a replay."""
    t = history.turn(turn_id)
    children = sorted((shape(history, c.id) for c in history.children(t.id)), key=repr)
    return (
        t.kind,
        t.message if t.kind == "edit" else None,
        (t.plan or {}).get("instruction"),
        t.seed,
        t.params.get("steps"),
        t.params.get("guidance"),
        t.image_sha256,
        tuple(children),
    )


def cursor_path(history: History) -> list[tuple]:
    return [
        (t.kind, t.message if t.kind == "edit" else None, t.image_sha256)
        for t in history.path(history.cursor)
    ]


def test_export_then_replay_rebuilds_the_same_tree(fake, fake_settings, photo, tmp_path):
    with Store(fake_settings.store_path) as store:
        agent = Agent(store, "walk", fake_settings)
        agent.turn("add a hat", source=(photo, "open cat"), seed=1)  # 1 open, 2
        agent.turn("make it winter", seed=2)  # 3
        agent.turn("undo")  # cursor 2
        agent.turn("make it a snowy night", seed=3, steps=5)  # 4, a branch under 2
        agent.turn("add a red scarf", seed=4)  # 5
        agent.turn("try another seed")  # 6, a sibling of 5, seed 5
        agent.turn("undo")  # cursor 4, which has two children
        original = store.history("walk")
    assert [(t.id, t.parent) for t in original.turns] == [(1, None), (2, 1), (3, 2), (4, 2), (5, 4), (6, 4)]
    assert original.cursor == 4
    assert original.turn(6).seed == 5

    exported = tmp_path / "exp" / "walk.toml"
    result = CliRunner().invoke(cli_group(), ["sessions", "export", "walk", str(exported)])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote {exported} and 1 image(s) beside it\n"
    assert sorted(p.name for p in exported.parent.iterdir()) == ["walk-1.png", "walk.toml"]
    assert png_digest((exported.parent / "walk-1.png").read_bytes()) == original.turn(1).image_sha256

    calls_before = len(fake.engine.calls)
    rows = rows_of(
        replay(exported, "--out", tmp_path / "out", "--session", "again", "--engine", "fake", "--json")
    )
    # depth first, the branch off the cursor's path first, each side branch closed by an undo
    assert [r["intent"] for r in rows] == ["edit", "edit", "undo", "edit", "edit", "undo", "edit", "undo"]
    assert len(fake.engine.calls) - calls_before == 5

    with Store(fake_settings.store_path) as store:
        again = store.history("again")
        assert store.history("walk") == original  # the replay left the original alone
    assert shape(again, again.children(None)[0].id) == shape(original, 1)
    assert cursor_path(again) == cursor_path(original)
    assert again.current().message == "make it a snowy night"
    assert len(again.children(again.cursor)) == 2
    # design note: the opened image is renamed after the exported file, so the root's message differs
    assert again.turn(again.children(None)[0].id).message == "open walk-1.png"


def test_exporting_an_unknown_session_is_one_line(tmp_path):
    result = CliRunner().invoke(cli_group(), ["sessions", "export", "ghost", str(tmp_path / "g.toml")])
    assert result.exit_code == 2
    assert result.stderr == "Error: no session named 'ghost' (see `icedit sessions list`)\n"
    assert not (tmp_path / "g.toml").exists()


def test_an_open_turn_opens_a_new_image_or_jumps_to_one_already_shown(folder, fake):
    from PIL import Image

    Image.new("RGB", (40, 32), (200, 10, 10)).save(folder / "red.png")
    text = (
        'source = "cat.png"\n' + OK_TURN + '[[turns]]\nopen = "red.png"\n[[turns]]\nsay = "add a dog"\n'
        '[[turns]]\nopen = "cat.png"\n'
    )
    rows = rows_of(
        replay(script(folder, text), "--out", folder / "out", "--session", "o", "--engine", "fake", "--json")
    )
    assert [r["intent"] for r in rows] == ["edit", "open", "edit", "open"]
    assert [r["cursor"] for r in rows] == [2, 3, 4, 1]  # the cat is turn 1 already: a jump, not a new turn
    with Store(Path(os.environ["ICEDIT_HOME"]) / "sessions.sqlite3") as store:
        h = store.history("o")
    assert [(t.id, t.parent, t.kind, t.message) for t in h.turns] == [
        (1, None, "open", "open cat.png"),
        (2, 1, "edit", "add a hat"),
        (3, 2, "open", "open red.png"),
        (4, 3, "edit", "add a dog"),
    ]
    assert h.cursor == 1
    red = encode_png(Image.open(folder / "red.png").convert("RGB"))
    assert h.turn(3).image_sha256 == png_digest(red)
    assert encode_png(fake.engine.calls[1].source) == red
