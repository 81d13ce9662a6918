"""Replay never writes outside --out and never hangs on what it reads (issue 16, classes 2 and 5): planted hard
links, loops, FIFOs and devices; scripts read by what is read, not by stat(); deep TOML; the cost in
transformer evaluations."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image
from store_checks import EXAMPLES, ICEDIT, env_for
from test_untrusted import nothing_stored

from assistant.cli import cli
from assistant.errors import UserError
from assistant.hookspecs import hookimpl
from assistant.plugins import JudgeSpec, get_plugin_manager
from assistant.protocols import PairwiseJudge
from assistant.replay import _prepare_out, _write
from sessions.scripts import load_script

PRECIOUS = b"a person's file, not replay's"
SHOWN = "replay scripts are files"
IMAGES_ONLY = "replay scripts open image files only"


@pytest.fixture(autouse=True)
def no_hang():
    """A FIFO opened by mistake blocks forever: the alarm fails the test instead."""

    def hung(signum, frame):
        raise TimeoutError("replay hung (a FIFO opened for reading or writing?)")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def folder(tmp_path, fake):
    d = tmp_path / "scripts"
    d.mkdir()
    Image.open(EXAMPLES / "chelsea.png").convert("RGB").resize((48, 32)).save(d / "cat.png")
    (d / "s.toml").write_text('source = "cat.png"\n[[turns]]\nsay = "add a hat"\n')
    return d


@pytest.fixture
def victim(tmp_path) -> Path:
    """A file outside every folder replay may write to."""
    path = tmp_path / "victim.png"
    path.write_bytes(PRECIOUS)
    return path


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="icedit")


def replay(script: Path, *args: object):
    return invoke(
        "replay", script, "--out", script.parent / "out", "--engine", "fake", "--session", "r", *args
    )


def refused(result, error: str) -> None:
    """Exit code 2, this one `Error:` line on stderr and nothing else, no traceback."""
    assert result.exit_code == 2, result.output
    assert result.stderr == f"Error: {error}\n"
    assert result.stdout == "" and "Traceback" not in result.output


def listing(d: Path) -> dict[str, bytes | str]:
    """Each entry of a folder: a link's target, a file's bytes, or its kind."""
    out: dict[str, bytes | str] = {}
    for p in sorted(d.iterdir()):
        if p.is_symlink():
            out[p.name] = f"-> {os.readlink(p)}"
        elif p.is_file():
            out[p.name] = p.read_bytes()
        else:
            out[p.name] = "folder" if p.is_dir() else "special"
    return out


# ------------------------------------------------------------------------------------ what --out holds


def _loop(out: Path) -> str:
    (out / "01-edit.png").symlink_to(out / "01-edit.png")
    return "a loop of symbolic links"


def _two_step_loop(out: Path) -> str:
    (out / "a").symlink_to(out / "b")
    (out / "b").symlink_to(out / "a")
    return "a loop of symbolic links"


PLANTED = {
    "hard link named like the output": (
        lambda out, v: os.link(v, out / "01-edit.png"),
        "01-edit.png",
        "a hard link (the file has another name, maybe outside this folder)",
    ),
    "hard link under another name": (
        lambda out, v: os.link(v, out / "keep.png"),
        "keep.png",
        "a hard link (the file has another name, maybe outside this folder)",
    ),
    "link inside to a hard link": (
        lambda out, v: (os.link(v, out / "z.png"), (out / "01-edit.png").symlink_to("z.png")),
        "01-edit.png",
        "a hard link (the file has another name, maybe outside this folder)",
    ),
    "symlink loop": (lambda out, v: _loop(out), "01-edit.png", "a loop of symbolic links"),
    "two-link loop": (lambda out, v: _two_step_loop(out), "a", "a loop of symbolic links"),
    "fifo named like the output": (
        lambda out, v: os.mkfifo(out / "01-edit.png"),
        "01-edit.png",
        "a device, pipe or socket, not a file",
    ),
    "fifo under another name": (
        lambda out, v: os.mkfifo(out / "pipe"),
        "pipe",
        "a device, pipe or socket, not a file",
    ),
    "dangling link inside": (
        lambda out, v: (out / "01-edit.png").symlink_to(out / "nothing.png"),
        "01-edit.png",
        "a link to nothing",
    ),
    "dangling link outside": (
        lambda out, v: (out / "01-edit.png").symlink_to(v.parent / "new.png"),
        "01-edit.png",
        "a link leading outside {out}",
    ),
    "link to /dev/zero": (
        lambda out, v: (out / "01-edit.png").symlink_to("/dev/zero"),
        "01-edit.png",
        "a link leading outside {out}",
    ),
    "folder named like an output": (lambda out, v: (out / "01-edit.png").mkdir(), "01-edit.png", "a folder"),
}


@pytest.mark.parametrize(("plant", "entry", "said"), PLANTED.values(), ids=PLANTED.keys())
def test_anything_planted_in_out_is_refused_before_a_turn_runs(
    folder, victim, icedit_home, fake, plant, entry, said
):
    out = folder / "out"
    out.mkdir()
    plant(out, victim)
    before = listing(out)
    result = replay(folder / "s.toml")
    refused(result, f"{out / entry}: {said.format(out=out)}; replay writes only into --out")
    assert victim.read_bytes() == PRECIOUS and not (victim.parent / "new.png").exists()
    assert listing(out) == before
    assert fake.engine.calls == [] and nothing_stored(icedit_home)


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (lambda out: os.mkfifo(out), "a device, pipe or socket, not a file"),
        (lambda out: out.symlink_to(out), "a loop of symbolic links"),
        (lambda out: out.symlink_to(out.parent / "gone"), "a link to nothing"),
        (lambda out: out.write_bytes(PRECIOUS), "a file"),
    ],
    ids=["fifo", "loop", "dangling", "file"],
)
def test_an_out_that_is_not_a_folder_is_one_line(folder, icedit_home, fake, make, said):
    out = folder / "out"
    make(out)
    refused(replay(folder / "s.toml"), f"{out}: {said}; --out must be a folder")
    assert fake.engine.calls == [] and nothing_stored(icedit_home)
    assert not (folder / "gone").exists()


def test_paths_with_a_nul_byte_are_one_line(folder):
    """No shell can pass a NUL byte, but a caller of the module can; the line shows it as \\x00."""
    with pytest.raises(UserError) as script:
        load_script(folder / "s\0.toml")
    with pytest.raises(UserError) as out:
        _prepare_out(folder / "o\0ut")
    assert (
        str(script.value)
        == f"{folder}/s\\x00.toml: not a usable file name (a NUL byte, or too long); {SHOWN}"
    )
    assert str(out.value) == (
        f"{folder}/o\\x00ut: not a usable file name (a NUL byte, or too long); --out must be a folder"
    )


def test_a_rerun_replaces_its_own_outputs_and_a_persons_hard_link_keeps_its_bytes(folder, tmp_path, fake):
    out = folder / "out"
    assert replay(folder / "s.toml").exit_code == 0
    first = (out / "01-edit.png").read_bytes()
    (folder / "s.toml").write_text('source = "cat.png"\nseed = 7\n[[turns]]\nsay = "add a hat"\n')
    again = replay(folder / "s.toml")
    assert again.exit_code == 0, again.output
    second = (out / "01-edit.png").read_bytes()
    assert second != first and sorted(listing(out)) == ["01-edit.png"]
    assert os.stat(out / "01-edit.png").st_nlink == 1
    # a person keeps the second picture by a hard link: the next run refuses, and both names keep it
    os.link(out / "01-edit.png", tmp_path / "kept.png")
    (folder / "s.toml").write_text('source = "cat.png"\nseed = 9\n[[turns]]\nsay = "add a hat"\n')
    refused(
        replay(folder / "s.toml"),
        f"{out / '01-edit.png'}: a hard link (the file has another name, maybe "
        "outside this folder); replay writes only into --out",
    )
    assert (tmp_path / "kept.png").read_bytes() == second == (out / "01-edit.png").read_bytes()


@pytest.mark.parametrize(
    "plant",
    [
        lambda out, v: os.link(v, out / "01-edit.png"),
        lambda out, v: (out / "01-edit.png").symlink_to(v),
        lambda out, v: os.mkfifo(out / "01-edit.png"),
    ],
    ids=["hard link", "symlink", "fifo"],
)
def test_an_output_is_a_new_file_whatever_took_its_name_meanwhile(tmp_path, victim, plant):
    """What appears after the check is unlinked, not opened: the victim keeps its bytes, nothing blocks."""
    out = tmp_path / "out"
    out.mkdir()
    plant(out, victim)
    assert _write(out, "01-edit.png", b"new picture") == out / "01-edit.png"
    assert (out / "01-edit.png").read_bytes() == b"new picture" and os.stat(out / "01-edit.png").st_nlink == 1
    assert victim.read_bytes() == PRECIOUS and os.stat(victim).st_nlink == 1


def test_a_full_disk_leaves_no_half_output(folder, monkeypatch, fake):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    out = folder / "out"
    refused(replay(folder / "s.toml"), f"turn 1: cannot write {out / '01-edit.png'}: No space left on device")
    assert listing(out) == {}


# ------------------------------------------------------------------------------------ the script itself


def test_a_script_that_is_not_a_regular_file_is_one_line(folder, tmp_path, icedit_home, fake):
    cases = {
        "zero.toml": (lambda p: p.symlink_to("/dev/zero"), f"a device, pipe or socket, not a file; {SHOWN}"),
        "loop.toml": (lambda p: p.symlink_to(p), f"a loop of symbolic links; {SHOWN}"),
        "dangling.toml": (lambda p: p.symlink_to(tmp_path / "gone.toml"), "no such replay script"),
    }
    for name, (make, said) in cases.items():
        make(folder / name)
        refused(replay(folder / name), f"{folder / name}: {said}")
    assert not (folder / "out").exists() and fake.engine.calls == [] and nothing_stored(icedit_home)


NESTED = {
    "arrays 100k deep": "a = " + "[" * 100_000 + "]" * 100_000,
    "inline tables 100k deep": "a = " + "{b = " * 100_000 + "1" + "}" * 100_000,
    "turns nested": 'source = "cat.png"\nturns = ' + "[" * 50_000 + "]" * 50_000,
    "tables in arrays": "a = " + "[{b = " * 30_000 + "1" + "}]" * 30_000,
}


@pytest.mark.parametrize("text", NESTED.values(), ids=NESTED.keys())
def test_deeply_nested_toml_is_one_line(folder, icedit_home, fake, text):
    (folder / "s.toml").write_text(text)
    refused(replay(folder / "s.toml"), f"{folder / 's.toml'}: not valid TOML: nested too deeply")
    assert not (folder / "out").exists() and fake.engine.calls == [] and nothing_stored(icedit_home)


def test_nesting_tomllib_can_parse_is_a_validation_line(folder, fake):
    (folder / "s.toml").write_text('source = "cat.png"\nturns = ' + "[" * 100 + "]" * 100)
    result = replay(folder / "s.toml")
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"Error: {folder / 's.toml'}: turn 1: ")


# ------------------------------------------------------------------------------------ the images it names


OPENS_X = 'source = "cat.png"\n[[turns]]\nsay = "add snow"\n[[turns]]\nopen = "x.png"'
IMAGES = {
    "fifo source": (
        lambda d: os.mkfifo(d / "x.png"),
        'source = "x.png"',
        (),
        f"x.png: a device, pipe or socket, not a file; {IMAGES_ONLY}",
    ),
    "/dev/zero link": (
        lambda d: (d / "x.png").symlink_to("/dev/zero"),
        'source = "x.png"',
        (),
        "x.png: leads outside the script's folder",
    ),
    "/dev/zero link, allowed outside": (
        lambda d: (d / "x.png").symlink_to("/dev/zero"),
        'source = "x.png"',
        ("--allow-outside",),
        f"x.png: a device, pipe or socket, not a file; {IMAGES_ONLY}",
    ),
    "loop source": (
        lambda d: (d / "x.png").symlink_to(d / "x.png"),
        'source = "x.png"',
        (),
        f"x.png: a loop of symbolic links; {IMAGES_ONLY}",
    ),
    "loop in the path": (
        lambda d: (d / "sub").symlink_to(d / "sub"),
        'source = "sub/x.png"',
        (),
        f"sub/x.png: a loop of symbolic links; {IMAGES_ONLY}",
    ),
    "nul in the name": (
        lambda d: None,
        'source = "x\\u0000.png"',
        (),
        f"x\\x00.png: not a usable file name (a NUL byte, or too long); {IMAGES_ONLY}",
    ),
    "folder source": (
        lambda d: (d / "x.png").mkdir(),
        'source = "x.png"',
        (),
        "{folder}/x.png is a folder, not an image",
    ),
    "fifo opened in turn 2": (
        lambda d: os.mkfifo(d / "x.png"),
        OPENS_X,
        (),
        f"turn 2: x.png: a device, pipe or socket, not a file; {IMAGES_ONLY}",
    ),
    "loop opened in turn 2": (
        lambda d: (d / "x.png").symlink_to(d / "x.png"),
        OPENS_X,
        (),
        f"turn 2: x.png: a loop of symbolic links; {IMAGES_ONLY}",
    ),
}


@pytest.mark.parametrize(("make", "head", "args", "error"), IMAGES.values(), ids=IMAGES.keys())
def test_an_image_that_is_not_a_regular_file_is_refused_unopened(
    folder, icedit_home, fake, make, head, args, error
):
    make(folder)
    (folder / "s.toml").write_text(f'{head}\n[[turns]]\nsay = "add a hat"\n')
    refused(replay(folder / "s.toml", *args), error.format(folder=folder.resolve()))
    assert not (folder / "out").exists() and fake.engine.calls == [] and nothing_stored(icedit_home)


# ------------------------------------------------------------------------------------ the cost in evaluations


@pytest.fixture
def judge():
    class Plugin:
        @hookimpl
        def register_judges(self, register):
            register(JudgeSpec("first", lambda settings: FirstJudge(), "the first image wins"))

    class FirstJudge(PairwiseJudge):
        def compare(self, instruction, source, a, b):
            return 1.0

    pm = get_plugin_manager()
    pm.register(Plugin(), name="first-judge")
    yield
    pm.unregister(name="first-judge")


EARLY_FILTER_TURN = (
    '[[turns]]\nsay = "add a hat"\ncandidates = 16\nearly_steps = 120\n'  # 16*120 + 200 - 120 = 2000
)


def test_the_cap_counts_transformer_evaluations_up_to_exactly_20000(folder, icedit_home, judge, fake):
    head = 'source = "cat.png"\nsteps = 200\njudge = "first"\n'
    (folder / "s.toml").write_text(head + EARLY_FILTER_TURN * 10 + '[[turns]]\nsay = "x"\nsteps = 1\n')
    refused(
        replay(folder / "s.toml"),
        f"{folder / 's.toml'}: the edits ask for 20001 transformer evaluations in "
        "all; at most 20000 are accepted",
    )
    assert fake.engine.calls == [] and nothing_stored(icedit_home)
    (folder / "s.toml").write_text(head + EARLY_FILTER_TURN * 10)
    result = replay(folder / "s.toml")
    assert result.exit_code == 0, result.output
    assert [(r.steps, r.candidates, r.early_steps) for r in fake.engine.calls] == [(200, 16, 120)] * 10


def test_the_early_filter_from_the_command_line_counts_too(folder, icedit_home, judge, fake):
    (folder / "s.toml").write_text('source = "cat.png"\nsteps = 200\n' + '[[turns]]\nsay = "x"\n' * 7)
    refused(
        replay(folder / "s.toml", "--candidates", "16", "--early-steps", "199", "--judge", "first"),
        f"{folder / 's.toml'}: the edits ask for 22295 transformer evaluations in all; at most 20000 are accepted",
    )
    assert fake.engine.calls == [] and nothing_stored(icedit_home)


# ------------------------------------------------------------------------------------ the real console script


def run_icedit(*args: object, home: Path, cwd: Path) -> subprocess.CompletedProcess:
    """`icedit` as a person runs it; the timeout fails the test instead of hanging on a FIFO."""
    return subprocess.run(
        [str(ICEDIT), *map(str, args)],
        cwd=cwd,
        env=env_for(home),
        text=True,
        capture_output=True,
        timeout=60,
        check=False,
    )


def test_fifos_never_hang_the_console_script(folder, icedit_home):
    os.mkfifo(folder / "pipe.toml")
    script = run_icedit("replay", "pipe.toml", "--out", "out", home=icedit_home, cwd=folder)
    said = "a device, pipe or socket, not a file"
    assert (script.returncode, script.stderr) == (2, f"Error: pipe.toml: {said}; {SHOWN}\n")
    os.mkfifo(folder / "pipe.png")
    (folder / "s.toml").write_text('source = "pipe.png"\nsteps = 1\n[[turns]]\nsay = "add a hat"\n')
    image = run_icedit(
        "replay", "s.toml", "--out", "out", "--preset", "tiny", "--session", "r", home=icedit_home, cwd=folder
    )
    assert (image.returncode, image.stderr) == (2, f"Error: pipe.png: {said}; {IMAGES_ONLY}\n")
    assert (
        script.stdout == image.stdout == "" and not (folder / "out").exists() and nothing_stored(icedit_home)
    )


def test_a_hard_link_in_out_is_refused_by_the_console_script(folder, victim, icedit_home):
    digest = hashlib.sha256(victim.read_bytes()).hexdigest()
    (folder / "out").mkdir()
    os.link(victim, folder / "out" / "01-edit.png")
    (folder / "s.toml").write_text('source = "cat.png"\nsteps = 1\n[[turns]]\nsay = "add a hat"\n')
    result = run_icedit(
        "replay", "s.toml", "--out", "out", "--preset", "tiny", "--session", "r", home=icedit_home, cwd=folder
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "Error: out/01-edit.png: a hard link (the file has another name, maybe outside this "
        "folder); replay writes only into --out\n"
    )
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == digest and nothing_stored(icedit_home)


def test_retries_count_what_they_really_cost(folder, fake, icedit_home):
    """A retry repeats the steps of the turn it retries, which the count before the run cannot know: the run
    stops, keeping what it did, once the edits have used the cap (200 + 99 retries x 200 = 20 000)."""
    script = folder / "retry.toml"
    script.write_text(
        'source = "cat.png"\n[[turns]]\nsay = "add a hat"\nsteps = 200\n'
        + '[[turns]]\nsay = "try another seed"\n' * 120
    )
    result = replay(script, "--json")
    assert result.exit_code == 2
    assert result.stderr == (
        "Error: turn 101: the turns before it used 20000 transformer evaluations, the most a "
        "replay may use: it stops here (the turns before it are kept)\n"
    )
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert (
        len(rows) == 100
        and {r["intent"] for r in rows[1:]} == {"retry"}
        and sum(r["nfe"] for r in rows) == 20_000
    )


def test_a_temporary_name_left_by_a_killed_write_is_dropped_and_nothing_else_is(
    folder, tmp_path, victim, fake
):
    """kill -9 between linking an output into place and unlinking its temporary name leaves
    `.01-edit.png.XXXXXXXX.part` as a second name of 01-edit.png: the next run drops that name. A
    `.part` that is any other file's second name is still refused."""
    out = folder / "out"
    assert replay(folder / "s.toml").exit_code == 0
    os.link(out / "01-edit.png", out / ".01-edit.png.k1ll3d00.part")
    again = replay(folder / "s.toml")
    assert again.exit_code == 0, again.output
    assert sorted(listing(out)) == ["01-edit.png"] and os.stat(out / "01-edit.png").st_nlink == 1
    for planted, other in [
        (".01-edit.png.ab12cd34.part", victim),  # a second name of a file outside
        (".keep.png.ab12cd34.part", out / "01-edit.png"),  # named for another output than it is
    ]:
        os.link(other, out / planted)
        refused(
            replay(folder / "s.toml"),
            f"{out / planted}: a hard link (the file has another name, maybe outside this folder); "
            "replay writes only into --out",
        )
        os.unlink(out / planted)
