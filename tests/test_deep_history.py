"""Sessions thousands of turns deep or wide, and images rotten in the store: `sessions show`, the TOML
export and the contact sheet walk them without recursion, keep their output bounded, and name the
damaged turns while doing the rest.

Sessions are built in one transaction through `Store.restore` (any tree shape, no engine): a turn
at a time through `add_turns` reads the whole history back per call, quadratic at these sizes.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw, ImageFont
from store_checks import ICEDIT, env_for

from assistant.cli import cli
from sessions.export import LeftOut, export_script
from sessions.history import MAX_INDENT, Turn
from sessions.identity import encode_png, png_digest
from sessions.sheet import (
    CELL_H,
    CELL_W,
    DAMAGED,
    HEADER,
    MAX_SIDE,
    PATH_COLUMNS,
    THUMB,
    _fit,
    cursor_path,
    layout,
    thumb_origin,
)
from sessions.store import SessionInfo, Store

NOW = "2025-01-01T00:00:00.000+00:00"


def colour(n: int) -> tuple[int, int, int]:
    return n % 251, n // 251 % 251, 90


def build(home: Path, name: str, parents: list[int | None], cursor: int | None = None, opens=()) -> Store:
    """Session `name` with turn i under parents[i - 1]: roots and the turns in `opens` opened, the rest
    edits, each turn with its own 32x32 picture; the cursor on `cursor` (default the last turn)."""
    turns, images = [], {}
    for i, parent in enumerate(parents, start=1):
        png = encode_png(Image.new("RGB", (32, 32), colour(i)))
        images[png_digest(png)] = (png, 32, 32)
        edit = parent is not None and i not in opens
        turns.append(
            Turn(
                id=i,
                parent=parent,
                kind="edit" if edit else "open",
                message=f"turn {i}",
                plan={"intent": "edit", "instruction": f"do {i}", "rationale": ""} if edit else None,
                params={"seed": i, "steps": 1} if edit else {},
                image_sha256=png_digest(png),
                created=NOW,
            )
        )
    info = SessionInfo(name=name, cursor=cursor or len(turns), turns=len(turns), created=NOW, updated=NOW)
    with Store(home / "sessions.sqlite3") as store:
        history = store.restore(name, info, turns, [], images.__getitem__)
    assert [t.id for t in history.turns] == list(range(1, len(turns) + 1))  # a fresh store numbers from 1
    return history


def chain(n: int) -> list[int | None]:
    return [None, *range(1, n)]


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="icedit")


def replayed(script: Path) -> tuple[set[tuple[int, int]], int]:
    """The tree a replay of `script` grows, as (parent, child) turn numbers, and the turn it ends on.

    `say` adds a child under where the replay stands, `open` too (the exported file is `x-N.png`
    for turn N), `undo` climbs back one; the original's turn numbers come back from the messages.
    """
    data = tomllib.loads(script.read_text())
    stand = [int(data["source"].rsplit("-", 1)[1].removesuffix(".png"))]
    edges = set()
    for step in data["turns"]:
        if step == {"command": "undo"}:
            stand.pop()
            continue
        turn = int(step["say"].split()[1]) if "say" in step else int(step["open"].rsplit("-", 1)[1][:-4])
        edges.add((stand[-1], turn))
        stand.append(turn)
    return edges, stand[-1]


def edges_of(parents: list[int | None], without: set[int] = frozenset()) -> set[tuple[int, int]]:
    return {(p, i) for i, p in enumerate(parents, start=1) if p is not None and i not in without}


def damage(home: Path, *turn_ids: int) -> None:
    """Flip a bit in these turns' stored PNGs with plain sqlite3: SQLite's own checks still pass."""
    con = sqlite3.connect(home / "sessions.sqlite3")
    with con:
        for turn_id in turn_ids:
            sha, png = con.execute(
                "SELECT i.sha256, i.png FROM turns t JOIN images i ON i.sha256 = t.image_sha256 "
                "WHERE t.id = ?",
                (turn_id,),
            ).fetchone()
            rotten = bytearray(png)
            rotten[len(rotten) // 2] ^= 1
            con.execute("UPDATE images SET png = ? WHERE sha256 = ?", (bytes(rotten), sha))
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    con.close()


# ------------------------------------------------------------------------------------------ deep and wide


def test_a_3000_turn_chain_is_shown_exported_and_drawn(icedit_home, tmp_path):
    history = build(icedit_home, "deep", chain(3000))
    started = time.perf_counter()

    shown = invoke("sessions", "show", "deep")
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert len(lines) == 3001 and lines[0] == "session deep (cursor at #3000)"
    sha = history.turn(3000).image_sha256[:12]
    assert lines[-1] == f"* {'  ' * MAX_INDENT}(2999) #3000 edit: turn 3000  seed 3000  [{sha}]"
    assert lines[MAX_INDENT + 1].startswith(f"  {'  ' * MAX_INDENT}#{MAX_INDENT + 1} edit")
    assert max(map(len, lines)) < 2 * MAX_INDENT + 60

    as_json = invoke("sessions", "show", "deep", "--json")
    assert as_json.exit_code == 0
    assert [t["parent"] for t in json.loads(as_json.output)["turns"]] == chain(3000)

    script = tmp_path / "out" / "deep.toml"
    exported = invoke("sessions", "export", "deep", script)
    assert (exported.exit_code, exported.output) == (0, f"wrote {script} and 1 image(s) beside it\n")
    assert replayed(script) == (edges_of(chain(3000)), 3000)

    sheet = tmp_path / "deep.png"
    drawn = invoke("sessions", "sheet", "deep", sheet)
    # the last 600 turns of the path, 20 to a row
    assert (drawn.exit_code, drawn.output) == (
        0,
        f"wrote {sheet} ({PATH_COLUMNS * CELL_W}x{HEADER + 30 * CELL_H})\n",
    )
    assert Image.open(sheet).size == (PATH_COLUMNS * CELL_W, HEADER + 30 * CELL_H)
    assert [t.id for t in cursor_path(history)] == list(range(2401, 3001))
    assert time.perf_counter() - started < 30


def test_6000_branches_under_one_root_draw_the_cursors_path(icedit_home, tmp_path):
    parents = [None] + [1] * 6000
    history = build(icedit_home, "wide", parents, cursor=3000)

    shown = invoke("sessions", "show", "wide")
    assert shown.exit_code == 0
    assert shown.output.splitlines()[1:4] == [
        f"  #1 open: turn 1  [{history.turn(1).image_sha256[:12]}]",
        f"    #2 edit: turn 2  seed 2  [{history.turn(2).image_sha256[:12]}]",
        f"    #3 edit: turn 3  seed 3  [{history.turn(3).image_sha256[:12]}]",
    ]
    assert len(shown.output.splitlines()) == 6002

    assert max(r for _, r in layout(history).values()) == 5999  # one row per branch: 1.3 million pixels high
    assert [t.id for t in cursor_path(history)] == [1, 3000]  # the cursor's turn has no children
    sheet = tmp_path / "wide.webp"
    drawn = invoke("sessions", "sheet", "wide", sheet)
    assert (drawn.exit_code, drawn.output) == (
        0,
        f"wrote {sheet} ({PATH_COLUMNS * CELL_W}x{HEADER + CELL_H})\n",
    )
    x, y = thumb_origin((1, 0), (32, 32))
    assert Image.open(sheet).convert("RGB").getpixel((x + 16, y + 16)) == pytest.approx(colour(3000), abs=8)

    script = tmp_path / "wide.toml"
    assert invoke("sessions", "export", "wide", script).exit_code == 0
    assert replayed(script) == (edges_of(parents), 3000)
    assert script.read_text().count('command = "undo"') == 5999  # every branch but the cursor's is closed


def test_a_wide_and_deep_tree_exports_a_script_that_rebuilds_it(icedit_home, tmp_path):
    """A 1200-turn trunk; every 100th trunk turn grows a 30-turn side branch that opens a picture on
    the way; 300 siblings hang under turn 600; the cursor sits half way, with branches after it."""
    parents: list[int | None] = chain(1200)
    opens = set()
    for fork in range(100, 1201, 100):
        parents += [fork, *range(len(parents) + 1, len(parents) + 30)]
        opens.add(len(parents) - 15)
    parents += [600] * 300
    history = build(icedit_home, "mixed", parents, cursor=850, opens=opens)

    script = tmp_path / "mixed.toml"
    exported = invoke("sessions", "export", "mixed", script)
    assert exported.output == f"wrote {script} and {1 + len(opens)} image(s) beside it\n"
    assert replayed(script) == (edges_of(parents), 850)

    shown = invoke("sessions", "show", "mixed")
    assert shown.exit_code == 0 and len(shown.output.splitlines()) == len(parents) + 1
    cursor_line = next(line for line in shown.output.splitlines() if line.startswith("*"))
    assert cursor_line.startswith(f"* {'  ' * MAX_INDENT}(849) #850 edit: turn 850")

    newest = [*range(851, 901), *range(1441, 1471)]  # redo's way down the trunk, then into 900's side branch
    assert [t.id for t in history.newest_below(850)] == newest
    assert [t.id for t in cursor_path(history)] == [*range(1, 851), *newest][-600:]
    sheet = tmp_path / "mixed.png"
    drawn = invoke("sessions", "sheet", "mixed", sheet)
    assert (drawn.exit_code, drawn.output) == (
        0,
        f"wrote {sheet} ({PATH_COLUMNS * CELL_W}x{HEADER + 30 * CELL_H})\n",
    )


def test_a_deep_chain_through_the_console_script(icedit_home, tmp_path):
    build(icedit_home, "deep", chain(5000))
    for args in (["sessions", "show", "deep"], ["sessions", "sheet", "deep", tmp_path / "deep.png"]):
        run = subprocess.run(
            [ICEDIT, *map(str, args)],
            cwd=tmp_path,
            env=env_for(icedit_home),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert (run.returncode, run.stderr) == (0, "")
    assert run.stdout == f"wrote {tmp_path / 'deep.png'} ({PATH_COLUMNS * CELL_W}x{HEADER + 30 * CELL_H})\n"


def test_a_sheet_stays_bounded_near_the_caps():
    """Just under the caps the whole tree is drawn; one more level and the path is: never past MAX_SIDE."""
    from sessions.sheet import _too_big

    assert not _too_big(MAX_SIDE // CELL_W, 600 // (MAX_SIDE // CELL_W))
    assert _too_big(MAX_SIDE // CELL_W + 1, 1) and _too_big(1, (MAX_SIDE - HEADER) // CELL_H + 1)
    assert _too_big(30, 21)  # 630 cells


def test_walk_is_depth_first_and_can_put_chosen_branches_last(icedit_home):
    history = build(icedit_home, "w", [None, 1, 2, 1, 4, 2])
    assert [(t.id, d) for t, d in history.walk()] == [(1, 0), (2, 1), (3, 2), (6, 2), (4, 1), (5, 2)]
    assert [t.id for t, _ in history.walk(last={1, 2, 3})] == [1, 4, 5, 2, 6, 3]
    assert layout(history) == {1: (0, 0), 2: (1, 0), 3: (2, 0), 6: (2, 1), 4: (1, 2), 5: (2, 2)}


def test_a_5_megabyte_message_is_cut_to_its_caption_quickly():
    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    font = ImageFont.load_default(size=11)
    started = time.perf_counter()
    cut = _fit(draw, "winter " * 750_000, font, THUMB)
    assert time.perf_counter() - started < 0.5
    assert cut.endswith("…") and draw.textlength(cut, font=font) <= THUMB
    assert draw.textlength(cut[:-1] + "w…", font=font) > THUMB  # the longest prefix that fits
    assert _fit(draw, "short", font, THUMB) == "short"


# ------------------------------------------------------------------------------------------------ bit rot

ROT = [None, 1, 2, 3, 4, 2, 6, 7]
"""1 opened; 2, 3 edits; 4 opens another picture, 5 edits it; 6 is a branch under 2, 7 opens, 8 (cursor)."""


def test_damaged_images_are_grey_boxes_and_named(icedit_home, tmp_path):
    build(icedit_home, "rot", ROT, opens={4, 7})
    damage(icedit_home, 4, 6)
    sheet = tmp_path / "rot.png"
    run = subprocess.run(
        [ICEDIT, "sessions", "sheet", "rot", sheet],
        cwd=tmp_path,
        env=env_for(icedit_home),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (run.returncode, run.stdout) == (1, f"wrote {sheet} ({5 * CELL_W}x{HEADER + 2 * CELL_H})\n")
    assert run.stderr == (
        'warning: turns 4, 6: their images are damaged in the store; drawn as grey "damaged" '
        "boxes (restore the store from a backup)\n"
    )
    with Store(icedit_home / "sessions.sqlite3") as store:
        places = layout(store.history("rot"))
    drawn = Image.open(sheet).convert("RGB")
    for turn in (4, 6):
        x, y = thumb_origin(places[turn], (THUMB, THUMB))
        assert drawn.getpixel((x + 5, y + 5)) == DAMAGED
    for turn in (1, 5, 8):
        x, y = thumb_origin(places[turn], (32, 32))
        assert drawn.getpixel((x + 16, y + 16)) == colour(turn)


def test_the_export_leaves_out_the_branch_under_a_damaged_open(icedit_home, tmp_path):
    build(icedit_home, "rot", ROT, opens={4, 7})
    damage(icedit_home, 4, 6)  # 6 is an edit: a replay repeats it, its image is not needed
    script = tmp_path / "out" / "x.toml"
    with Store(icedit_home / "sessions.sqlite3") as store, pytest.raises(LeftOut) as left_out:
        export_script(store, "rot", script)
    assert str(left_out.value) == (
        "turn 4: its opened image is damaged in the store; left out of the script with "
        "the 1 turn(s) below it (restore the store from a backup)"
    )
    written = [script, script.with_name("x-1.png"), script.with_name("x-7.png")]
    assert (left_out.value.turns, left_out.value.written) == ([4], written)
    assert sorted(script.parent.iterdir()) == sorted(written)
    assert replayed(script) == (edges_of(ROT, without={4, 5}), 8)


def test_the_export_command_warns_of_left_out_turns_and_exits_1(icedit_home, tmp_path):
    build(icedit_home, "rot", ROT, opens={4, 7})
    damage(icedit_home, 4)
    script = tmp_path / "x.toml"
    result = invoke("sessions", "export", "rot", script)
    assert (result.exit_code, result.stdout) == (1, f"wrote {script} and 2 image(s) beside it\n")
    warning = (
        "warning: turn 4: its opened image is damaged in the store; left out of the script with the 1 "
        "turn(s) below it (restore the store from a backup)\n"
    )
    assert result.stderr == warning


def test_a_damaged_first_image_cannot_be_exported(icedit_home, tmp_path):
    history = build(icedit_home, "rot", ROT, opens={4, 7})
    damage(icedit_home, 1)
    result = invoke("sessions", "export", "rot", tmp_path / "out" / "x.toml")
    store = icedit_home / "sessions.sqlite3"
    error = (
        f"Error: cannot export session 'rot': turn 1's image {history.turn(1).image_sha256[:12]} in the session "
        f"store {store} is damaged (its bytes no longer match their hash): restore the store from a backup\n"
    )
    assert (result.exit_code, result.stderr) == (2, error)
    assert not (tmp_path / "out").exists()


def test_a_damaged_edit_image_does_not_stop_the_export(icedit_home, tmp_path):
    build(icedit_home, "rot", ROT, opens={4, 7})
    damage(icedit_home, 3, 8)
    script = tmp_path / "x.toml"
    result = invoke("sessions", "export", "rot", script)
    assert (result.exit_code, result.output) == (0, f"wrote {script} and 3 image(s) beside it\n")
    assert replayed(script) == (edges_of(ROT), 8)
