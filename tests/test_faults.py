"""Resource faults: a full disk, a read-only or impossible store folder, a GPU out of memory.

Each is one clear line with exit code 2 and nothing lost: the store is as before, or (when only the
output file could not be written) the line says where the kept turn is. The full and read-only
stores are real SQLite errors: the store's connection gets `max_page_count` / `query_only`.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import types
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from store_checks import EXAMPLES, dump

import sessions.store
from assistant.cli import cli
from assistant.errors import UserError

CHELSEA = EXAMPLES / "chelsea.png"


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="icedit")


@pytest.fixture
def demo(fake, icedit_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(
        "edit",
        CHELSEA,
        "make it look like winter",
        "--engine",
        "fake",
        "--session",
        "demo",
        "--seed",
        "1",
        "-o",
        "winter.png",
    )
    assert result.exit_code == 0, result.output
    return icedit_home


def on_open(monkeypatch, *pragmas: str) -> None:
    """Every connection the store opens from now on runs `pragmas` first."""
    real = sqlite3.connect

    def connect(*args, **kwargs):
        con = real(*args, **kwargs)
        for pragma in pragmas:
            if "{pages}" in pragma:
                pragma = pragma.format(pages=con.execute("PRAGMA page_count").fetchone()[0])
            con.execute(pragma)
        return con

    monkeypatch.setattr(
        sessions.store, "sqlite3", types.SimpleNamespace(**{**vars(sqlite3), "connect": connect})
    )


def test_a_full_disk_is_one_line_and_the_turn_is_not_half_saved(demo, tmp_path, monkeypatch):
    on_open(monkeypatch, "PRAGMA max_page_count = {pages}")  # the file may not grow: SQLite's SQLITE_FULL
    before = dump(demo)
    result = invoke(
        "edit", "winter.png", "add a red scarf", "--engine", "fake", "--session", "demo", "-o", "s.png"
    )
    assert result.exit_code == 2
    store = demo / "sessions.sqlite3"
    assert (
        result.stderr
        == f"Error: the disk holding the session store {store} is full: free some space and try again\n"
    )
    assert dump(demo) == before
    assert not (tmp_path / "s.png").exists()


def test_a_read_only_store_is_one_line(demo, tmp_path, monkeypatch):
    on_open(monkeypatch, "PRAGMA query_only = 1")  # as root chmod cannot make it read-only; SQLite can
    before = dump(demo)
    for args in (
        ["edit", "winter.png", "add a scarf", "--engine", "fake", "--session", "demo"],
        ["undo", "demo"],
    ):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert result.stderr == (
            f"Error: the session store {demo / 'sessions.sqlite3'} is read-only: make it "
            "writable, or set ICEDIT_HOME to a writable folder\n"
        )
    assert dump(demo) == before


def test_a_store_folder_that_cannot_exist_is_one_line(tmp_path, monkeypatch, fake):
    (tmp_path / "file").write_text("a file, not a folder")
    monkeypatch.setenv("ICEDIT_HOME", str(tmp_path / "file" / "icedit"))
    for args in (["sessions", "list"], ["edit", CHELSEA, "add snow", "--engine", "fake", "--session", "s"]):
        result = invoke(*args)
        assert (result.exit_code, result.stderr) == (
            2,
            f"Error: cannot create the store folder {tmp_path / 'file' / 'icedit'}: Not a directory\n",
        )
    assert fake.engine.calls == []


@pytest.fixture
def full_disk_for_pngs(monkeypatch, tmp_path):
    """Writing any PNG under tmp_path/work fails with ENOSPC (the store's own file is elsewhere and unaffected)."""
    real = Path.write_bytes

    def write_bytes(self, data):
        if self.suffix == ".png" and self.resolve().is_relative_to(tmp_path / "work"):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data)

    real_fsync = os.fsync

    def fsync(fd):  # files written atomically fail where the data would reach the disk
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if path.is_relative_to(tmp_path / "work") and (".png" in path.name):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    (tmp_path / "work").mkdir()
    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    monkeypatch.setattr(os, "fsync", fsync)
    return tmp_path / "work"


def test_a_full_disk_for_the_output_keeps_the_edit_and_says_where(demo, full_disk_for_pngs):
    result = invoke(
        "edit",
        "winter.png",
        "add a red scarf",
        "--engine",
        "fake",
        "--session",
        "demo",
        "-o",
        full_disk_for_pngs / "s.png",
    )
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: cannot write {full_disk_for_pngs / 's.png'}: No space left on device "
        "(the edit is kept as turn 3 of session demo)\n"
    )
    assert [row[4] for row in dump(demo)["turns"]] == [
        "open chelsea.png",
        "make it look like winter",
        "add a red scarf",
    ]


def test_a_full_disk_during_a_replay_names_the_turn(demo, full_disk_for_pngs, tmp_path):
    (full_disk_for_pngs / "s.toml").write_text('source = "../winter.png"\n[[turns]]\nsay = "add snow"\n')
    result = invoke(
        "replay",
        full_disk_for_pngs / "s.toml",
        "--out",
        full_disk_for_pngs / "out",
        "--engine",
        "fake",
        "--allow-outside",
    )
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: turn 1: cannot write {full_disk_for_pngs / 'out' / '01-edit.png'}: No space left on device\n"
    )


HINT = "try --offload encoders (or model, sequential), --quantize int8, or a smaller image"


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        (
            "plugins.icedit.sampler.FillSampler.denoise",
            f"out of memory for a 1024x336 diptych on cpu: {HINT}",
        ),
        ("plugins.icedit.loading.place", f"out of memory placing the model on cpu: {HINT}"),
    ],
    ids=["while denoising", "while placing the model"],
)
def test_gpu_out_of_memory_is_one_line_suggesting_offload(demo, monkeypatch, where, expected):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(where, out_of_memory)
    before = dump(demo)
    result = invoke(
        "edit", CHELSEA, "add a red scarf", "--preset", "tiny", "--steps", "1", "--session", "demo"
    )
    assert result.exit_code == 2
    assert result.stderr == f"Error: {expected}\n"
    assert "--offload encoders" in result.stderr and "Traceback" not in result.output
    assert dump(demo) == before


def test_a_damaged_store_is_one_line(demo):
    """The file cut short on disk: reading the store says it is damaged instead of raising sqlite's error."""
    path = demo / "sessions.sqlite3"
    with sqlite3.connect(path) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages, tables = (
            con.execute("PRAGMA page_count").fetchone()[0],
            con.execute(
                "SELECT name, rootpage FROM sqlite_master WHERE name IN ('sessions', 'turns')"
            ).fetchall(),
        )
    assert dict(tables) == {"sessions": 2, "turns": 6} and pages > 6
    path.write_bytes(path.read_bytes()[: 5 * 4096])  # the sessions table survives, the turns do not
    for args in (["sessions", "show", "demo"], ["sessions", "list"], ["undo", "demo"]):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert result.stderr == (
            f"Error: the session store {path} is damaged (database disk image is malformed): "
            "restore it from a backup\n"
        )


def test_the_vlm_out_of_memory_is_one_line(monkeypatch):
    from plugins.qwen_vl.model import Vlm

    class Model:
        device = "cuda:0"

        def generate(self, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(Vlm, "inputs", lambda self, conversations: {"input_ids": torch.zeros(1, 3)})
    with pytest.raises(UserError) as e:
        Vlm(model=Model(), processor=None).generate([], max_new_tokens=4)
    assert str(e.value) == (
        "out of memory running the VLM on cuda:0: set ICEDIT_VLM_DEVICE=cpu to run it on the CPU, "
        "or use --rewriter rules (no VLM)"
    )
