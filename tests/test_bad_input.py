"""Bad input wherever a person or a file can put it: one clear line, exit 2 (an error line in the chat),
no traceback, and the store exactly as before.

These extend the cases of test_cli, test_images, test_replay, test_agent and test_tui (not repeated
here): broken and odd image files on the command line, instructions, output paths, option values,
hub ids and adapter files, what a VLM cannot take, and the chat's slash commands.
"""

from __future__ import annotations

import builtins
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file
from store_checks import EXAMPLES, dump
from textual_image.widget import HalfcellImage

from assistant.cli import cli
from assistant.errors import UserError
from assistant.tui.app import make_app
from assistant.tui.widgets.chat_log import ChatLog
from assistant.tui.widgets.prompt_input import PromptInput
from plugins.icedit import moe_checkpoint
from plugins.icedit.presets import build_tiny
from plugins.qwen_vl.model import Vlm
from plugins.qwen_vl.vision import image_part

CHELSEA = EXAMPLES / "chelsea.png"
FAKE = ["--engine", "fake"]
TINY = ["--preset", "tiny", "--steps", "1"]


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="icedit")


@pytest.fixture
def demo(fake, icedit_home, tmp_path, monkeypatch):
    """Session 'demo': one fake edit of chelsea.png; the working directory is tmp_path."""
    monkeypatch.chdir(tmp_path)
    result = invoke(
        "edit",
        CHELSEA,
        "make it look like winter",
        *FAKE,
        "--session",
        "demo",
        "--seed",
        "1",
        "-o",
        tmp_path / "winter.png",
    )
    assert result.exit_code == 0, result.output
    return icedit_home


def outside_the_store(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if "home" not in p.relative_to(d).parts)


def _write(name: str, make):
    def build(d: Path) -> Path:
        path = d / name
        make(path)
        return path

    return build


def _truncated(path: Path) -> None:
    data = CHELSEA.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _moe_with(mutate):
    """A LoRA-MoE file for the tiny preset's transformer, changed by `mutate`."""

    def make(path: Path) -> None:
        state = moe_checkpoint.synthetic_checkpoint(build_tiny().transformer, num_experts=2, rank=2)
        mutate(state)
        save_file(state, path)

    return make


ROUTE = "transformer.single_transformer_blocks.0.proj_out.lora_route.weight"
CASES = {
    # id: (make the image path (None: chelsea), instruction, extra args built in the folder, the error line)
    "truncated png": (
        _write("half.png", _truncated),
        "add snow",
        lambda d: FAKE,
        "{img}: broken image (image file is truncated)",
    ),
    "html as png": (
        _write("page.png", lambda p: p.write_text("<!doctype html><html><body>404</body></html>")),
        "add snow",
        lambda d: FAKE,
        "{img}: not an image PIL can read (PNG, JPEG, WebP, ...)",
    ),
    "decompression bomb": (
        _write("bomb.png", lambda p: Image.new("1", (9000, 8000)).save(p)),
        "add snow",
        lambda d: FAKE,
        "{img}: image too large (over 64 megapixels)",
    ),
    "too wide": (
        _write("wide.png", lambda p: Image.new("RGB", (2000, 40)).save(p)),
        "add snow",
        lambda d: TINY,
        "a 2000x40 image is too wide: height/width must be between 1/4 and 4",
    ),
    "too tall": (
        _write("tall.png", lambda p: Image.new("RGB", (32, 400)).save(p)),
        "add snow",
        lambda d: TINY,
        "a 32x400 image is too tall: height/width must be between 1/4 and 4",
    ),
    "one pixel": (
        _write("dot.png", lambda p: Image.new("RGB", (1, 1)).save(p)),
        "add snow",
        lambda d: FAKE,
        "{img}: 1x1 is too small to edit (at least 32 pixels on each side)",
    ),
    "31 pixels wide": (
        _write("narrow.png", lambda p: Image.new("RGB", (31, 100)).save(p)),
        "add snow",
        lambda d: FAKE,
        "{img}: 31x100 is too small to edit (at least 32 pixels on each side)",
    ),
    "31 pixels tall, as a JPEG": (
        _write("low.jpg", lambda p: Image.new("RGB", (120, 31)).save(p)),
        "add snow",
        lambda d: FAKE,
        "{img}: 120x31 is too small to edit (at least 32 pixels on each side)",
    ),
    "guidance nan": (
        None,
        "add snow",
        lambda d: [*FAKE, "--guidance", "nan"],
        "Invalid value for '--guidance': 'nan' is not a finite number. (see `icedit edit --help`)",
    ),
    "guidance NaN, other case": (
        None,
        "add snow",
        lambda d: [*FAKE, "--guidance", "NaN"],
        ("Invalid value for '--guidance': 'NaN' is not a finite number. (see `icedit edit --help`)"),
    ),
    "lora scale nan": (
        None,
        "add snow",
        lambda d: [*FAKE, "--lora-scale", "nan"],
        "Invalid value for '--lora-scale': 'nan' is not a finite number. (see `icedit edit --help`)",
    ),
    "10 MB instruction": (
        None,
        "x" * 10_000_000,
        lambda d: FAKE,
        "the instruction is 10000000 characters long; at most 2000 are accepted",
    ),
    "escape sequence": (
        None,
        "add \x1b[31ma red hat",
        lambda d: FAKE,
        "the instruction contains a control character ('\\x1b'): type plain text",
    ),
    "unknown judge": (
        None,
        "add snow",
        lambda d: [*FAKE, "--candidates", "2", "--judge", "nope"],
        "unknown judge 'nope' (available: qwen_vl)",
    ),
    "output is a folder": (
        None,
        "add snow",
        lambda d: [*FAKE, "-o", d],
        "{d} is a folder: give -o a file name ending in .png, .jpg or .webp",
    ),
    "output of a type not written": (
        None,
        "add snow",
        lambda d: [*FAKE, "-o", d / "x.gif"],
        "{d}/x.gif: give -o a name ending in .png, .jpg or .webp",
    ),
    "output folder missing": (
        None,
        "add snow",
        lambda d: [*FAKE, "-o", d / "nope" / "x.png"],
        "{d}/nope: no such folder for -o",
    ),
    "seed not a number": (
        None,
        "add snow",
        lambda d: [*FAKE, "--seed", "abc"],
        ("Invalid value for '--seed': 'abc' is not a valid integer range. (see `icedit edit --help`)"),
    ),
    "guidance zero": (
        None,
        "add snow",
        lambda d: [*FAKE, "--guidance", "0"],
        "Invalid value for '--guidance': 0.0 is not in the range 0<x<=200. (see `icedit edit --help`)",
    ),
    "invalid hub id": (
        None,
        "add snow",
        lambda d: ["--model", "not a/valid id", "--steps", "1"],
        "the FLUX.1 Fill pipeline 'not a/valid id' is neither a local path nor a hub id (owner/name)",
    ),
    "invalid vlm id": (
        None,
        "add snow",
        lambda d: [*FAKE, "--rewriter", "qwen_vl", "--vlm", "bad id!"],
        "the VLM 'bad id!' is neither a local path nor a hub id (owner/name)",
    ),
    "vlm folder missing": (
        None,
        "add snow",
        lambda d: [*FAKE, "--rewriter", "qwen_vl", "--vlm", "../../etc"],
        (
            "VLM '../../etc' (--vlm): no such file or folder; check the path, or give --vlm a hub id "
            "(owner/name)"
        ),
    ),
    "uncached lora at a revision": (
        None,
        "add snow",
        lambda d: [*TINY, "--lora", "nobody/nothing", "--lora-revision", "abc123"],
        (
            "LoRA 'nobody/nothing@abc123' (--lora): not in the Hugging Face cache and "
            "offline mode is set (HF_HUB_OFFLINE); unset HF_HUB_OFFLINE to download it, or "
            "fetch it elsewhere with `hf download nobody/nothing --revision abc123 --include "
            "'*.safetensors'`"
        ),
    ),
    "adapter of the wrong shape": (
        None,
        "add snow",
        lambda d: [*TINY, "--lora", _adapter(d, lambda s: s.__setitem__(ROUTE, torch.zeros(2, 32)))],
        (
            "transformer.single_transformer_blocks.0.proj_out.lora_route.weight: shape "
            "(2, 32) does not fit the model (expected (2, 160))"
        ),
    ),
    "adapter with foreign keys": (
        None,
        "add snow",
        lambda d: [
            *TINY,
            "--lora",
            _adapter(
                d, lambda s: s.__setitem__("transformer.x_embedder.lora_route.weight", torch.zeros(2, 16))
            ),
        ],
        (
            "transformer.x_embedder.lora_route.weight: experts and routers belong on ff.net.2 / proj_out, not on "
            "'x_embedder'"
        ),
    ),
    "adapter not safetensors inside": (
        None,
        "add snow",
        lambda d: [*TINY, "--lora", _garbage(d / "junk.safetensors")],
        (
            "cannot load the LoRA from {d}/junk.safetensors: Error while deserializing "
            "header: header too large"
        ),
    ),
    # paths the file system answers oddly for: one word from assistant.files.kind, one line each
    "a NUL byte in the path": (
        lambda d: Path(f"{d}/a\x00b.png"),
        "add snow",
        lambda d: FAKE,
        "{d}/a\\x00b.png: not a usable file name (a NUL byte, or too long)",
    ),
    "a name too long for the file system": (
        lambda d: d / ("x" * 300 + ".png"),
        "add snow",
        lambda d: FAKE,
        "{img}: not a usable file name (a NUL byte, or too long)",
    ),
    "a loop of symbolic links": (
        lambda d: _loop(d / "loop.png"),
        "add snow",
        lambda d: FAKE,
        "{img}: a loop of symbolic links",
    ),
    "a link to nothing": (
        _write("gone.png", lambda p: p.symlink_to(p.parent / "nowhere.png")),
        "add snow",
        lambda d: FAKE,
        "{img}: no such file",
    ),
    "a device that gives nothing": (
        lambda d: Path("/dev/null"),
        "add snow",
        lambda d: FAKE,
        ("/dev/null: nothing came through (an empty pipe or device): pass a picture's bytes or a file"),
    ),
    "lora is a device": (
        None,
        "add snow",
        lambda d: [*TINY, "--lora", "/dev/zero"],
        "LoRA '/dev/zero' (--lora): a device, pipe or socket, not a file",
    ),
    "lora is a loop of links": (
        None,
        "add snow",
        lambda d: [*TINY, "--lora", _loop(d / "a.safetensors")],
        "LoRA '{d}/a.safetensors' (--lora): a loop of symbolic links",
    ),
    "adapter with NaN weights": (
        None,
        "add snow",
        lambda d: [*TINY, "--lora", _adapter(d, lambda s: s[ROUTE].fill_(float("nan")))],
        (
            f"the adapter {{d}}/adapter.safetensors has NaN or infinite weights ({ROUTE}): it is "
            "damaged or its training diverged; nothing was loaded"
        ),
    ),
    "adapter with an infinite weight": (
        None,
        "add snow",
        lambda d: [*TINY, "--lora", _adapter(d, lambda s: s[ROUTE].view(-1).__setitem__(3, float("-inf")))],
        (
            f"the adapter {{d}}/adapter.safetensors has NaN or infinite weights ({ROUTE}): it is damaged or its "
            "training diverged; nothing was loaded"
        ),
    ),
    # session names: the same rule wherever a name comes in (assistant.text.check_name)
    "empty session name": (
        None,
        "add snow",
        lambda d: [*FAKE, "--session", ""],
        "the session name is empty: give a name, e.g. --session trip",
    ),
    "blank session name": (
        None,
        "add snow",
        lambda d: [*FAKE, "--session", "   "],
        "the session name is empty: give a name, e.g. --session trip",
    ),
    "session name that sets the window title": (
        None,
        "add snow",
        lambda d: [*FAKE, "--session", "a\x1b]0;x\x07"],
        ("the session name contains a control character ('\\x1b'): use plain text"),
    ),
    "session name with a newline": (
        None,
        "add snow",
        lambda d: [*FAKE, "--session", "a\nb"],
        "the session name contains a control character ('\\n'): use plain text",
    ),
    "session name of 201 characters": (
        None,
        "add snow",
        lambda d: [*FAKE, "--session", "n" * 201],
        "the session name is 201 characters long; at most 200 are accepted",
    ),
    # outputs in the way: refused before the edit runs
    "-o onto the source": (
        _write("me.png", lambda p: p.write_bytes(CHELSEA.read_bytes())),
        "add snow",
        lambda d: [*FAKE, "-o", d / "me.png"],
        "{img} is the picture being edited: give -o another name, or pass --force to replace it",
    ),
    "-o onto a hard link of the source": (
        _write("me.png", lambda p: p.write_bytes(CHELSEA.read_bytes())),
        "add snow",
        lambda d: [*FAKE, "-o", _hard_link(d / "me.png", d / "me2.png")],
        ("{d}/me2.png is the picture being edited: give -o another name, or pass --force to replace it"),
    ),
    "-o onto a file of the person's": (
        None,
        "add snow",
        lambda d: [*FAKE, "-o", _taken(d / "mine.png")],
        ("{d}/mine.png already exists: choose another name, or pass --force to replace it"),
    ),
    "-o onto a link to nothing": (
        None,
        "add snow",
        lambda d: [*FAKE, "-o", _dangling(d / "ln.png")],
        "{d}/ln.png already exists: choose another name, or pass --force to replace it",
    ),
}


def _loop(path: Path) -> Path:
    path.symlink_to(path.with_name(path.name + ".2"))
    path.with_name(path.name + ".2").symlink_to(path)
    return path


def _hard_link(source: Path, link: Path) -> Path:
    link.hardlink_to(source)
    return link


def _taken(path: Path) -> Path:
    path.write_bytes(b"the person's own file")
    return path


def _dangling(path: Path) -> Path:
    path.symlink_to(path.with_name("nowhere"))
    return path


def _adapter(d: Path, mutate) -> Path:
    path = d / "adapter.safetensors"
    _moe_with(mutate)(path)
    return path


def _garbage(path: Path) -> Path:
    path.write_bytes(b"this is not a safetensors file, only some text")
    return path


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_edit_input_is_one_line_exit_2_and_the_store_is_untouched(
    demo, tmp_path, fake, monkeypatch, case
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make, instruction, extra, expected = CASES[case]
    image = make(tmp_path) if make else CHELSEA
    args = extra(tmp_path)
    before, files = dump(demo), outside_the_store(tmp_path)
    result = invoke("edit", image, instruction, "--session", "demo", "--seed", "3", *args)
    assert result.exit_code == 2, result.output
    assert result.stderr == "Error: " + expected.format(img=image, d=tmp_path) + "\n"
    assert result.stdout == "" and "Traceback" not in result.output
    assert dump(demo) == before
    assert outside_the_store(tmp_path) == files  # no PNG written either
    assert fake.engine.calls[1:] == []


def test_an_unreadable_file_is_one_line(demo, tmp_path, fake, monkeypatch):
    """As root chmod 000 does not stop reading, so the refusal comes from open() itself."""
    secret = tmp_path / "secret.png"
    secret.write_bytes(CHELSEA.read_bytes())
    real_open = builtins.open

    def guarded(file, *args, **kwargs):
        if str(file) == str(secret):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    before = dump(demo)
    result = invoke("edit", secret, "add snow", *FAKE, "--session", "demo")
    assert (result.exit_code, result.stderr) == (2, f"Error: {secret}: permission denied\n")
    assert dump(demo) == before


@pytest.mark.parametrize(
    ("size", "mode"),
    [((32, 32), "RGB"), ((128, 32), "RGBA"), ((33, 131), "L")],
    ids=["32x32, the smallest", "4:1 with alpha", "odd sides, grey"],
)
def test_odd_but_valid_images_are_edited_at_their_own_size(fake, icedit_home, tmp_path, size, mode):
    """The tiny engine runs them through the diptych and back: the edit has the source's size, in RGB.

    (Modes, EXIF orientation and animation are converted by load_image: see test_images.)
    """
    source = tmp_path / "src.png"
    Image.new(mode, size).save(source)
    result = invoke("edit", source, "add snow", *TINY, "--seed", "1", "-o", tmp_path / "out.png")
    assert result.exit_code == 0, result.output
    out = Image.open(tmp_path / "out.png")
    assert (out.size, out.mode) == (size, "RGB")


def test_an_image_the_vlm_cannot_size_is_one_line():
    class Template:
        def apply_chat_template(self, conversation, **kwargs):
            return ""

    conversation = [{"role": "user", "content": [image_part(Image.new("RGB", (600, 2)), 784, 3136)]}]
    with pytest.raises(UserError) as e:
        Vlm(model=None, processor=Template()).inputs([conversation])
    assert (
        str(e.value)
        == "the VLM cannot take this image: absolute aspect ratio must be smaller than 200, got 300.0"
    )


# ------------------------------------------------------------------------------------------------ the chat


@pytest.fixture
def chat(fake_settings, fake, tmp_path, photo):
    """Session 's' with an open turn and one edit, in the chat app."""
    photo.save(tmp_path / "cat.png")
    (tmp_path / "page.png").write_text("<html>not a picture</html>")
    (tmp_path / "pics").mkdir()
    return make_app(fake_settings, session="s", image=tmp_path / "cat.png", renderer=HalfcellImage)


CHAT_CASES = [
    ("/steps abc", "usage: /steps N (a whole number from 1 to 200)"),
    ("/steps 0", "usage: /steps N (a whole number from 1 to 200; got 0)"),
    ("/seed -5", f"usage: /seed N|random (a whole number from 0 to {2**63 - 1}; got -5)"),
    ("/candidates 99", "usage: /candidates N (a whole number from 1 to 16; got 99)"),
    ("/branch 999", "session 's' has no turn 999"),
    ("/branch two", f"usage: /branch N (a whole number from 1 to {2**63 - 1})"),
    ("/open", "usage: /open PATH"),
    ("/open {d}/pics", "{d}/pics is a folder, not an image"),
    ("/open {d}/page.png", "{d}/page.png: not an image PIL can read (PNG, JPEG, WebP, ...)"),
    ("/save {d}/nope/out.png", "cannot write {d}/nope/out.png: No such file or directory"),
    ("/sheet", "usage: /sheet PATH [--force]"),
    ("add a \x07 bell", "the instruction contains a control character ('\\x07'): type plain text"),
    ("x" * 10_000_000, "the instruction is 10000000 characters long; at most 2000 are accepted"),
]


async def test_bad_chat_input_is_an_error_line_the_text_comes_back_and_nothing_is_stored(
    chat, fake_settings, tmp_path
):
    async with chat.run_test(size=(120, 40)) as pilot:
        prompt = chat.screen.query_one(PromptInput)
        prompt.value = "make it look like winter"
        await pilot.press("enter")
        await chat.workers.wait_for_complete()
        await pilot.pause()
        before = dump(fake_settings.home)
        for text, error in CHAT_CASES:
            text, error = text.format(d=tmp_path), error.format(d=tmp_path)
            prompt.value = text
            await pilot.press("enter")
            await chat.workers.wait_for_complete()
            await pilot.pause()
            assert chat.screen.query_one(ChatLog).lines[-1] == ("error", error), text[:40]
            assert prompt.value == text.strip()
            prompt.value = ""
            assert dump(fake_settings.home) == before, text[:40]
        prompt.value = "/undo"
        await pilot.press("enter")
        await pilot.pause()
        undone = dump(fake_settings.home)
        for text, error in [
            ("/undo", "nothing to undo in session 's'"),
            ("/retry", "nothing to retry: the current image is not an edit"),
        ]:
            prompt.value = text
            await pilot.press("enter")
            await chat.workers.wait_for_complete()
            await pilot.pause()
            assert chat.screen.query_one(ChatLog).lines[-1] == ("error", error)
            assert prompt.value == text
            prompt.value = ""
        assert dump(fake_settings.home) == undone
