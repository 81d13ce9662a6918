"""Issue 19 part 5: a picture's identity is its pixels, so a session's own picture, re-saved however, is
still its turn; schema-3 stores and format-1 archives (named by PNG bytes) keep working."""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image, PngImagePlugin
from store_checks import check_store, env_for

from assistant.cli import cli
from sessions.identity import encode_png, pixel_digest, png_digest, sha256
from sessions.store import APPLICATION_ID, MIGRATIONS, Store

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ICEDIT = Path(sys.executable).with_name("icedit")


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="icedit")


def _level9(img: Image.Image, path: Path) -> None:
    img.save(path, "PNG", compress_level=9, optimize=True)


def _texts(img: Image.Image, path: Path) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat, seed 1")
    info.add_itxt("Comment", "réédité", zip=True)
    img.save(path, "PNG", pnginfo=info, compress_level=0)


def _opaque_rgba(img: Image.Image, path: Path) -> None:
    img.convert("RGBA").save(path, "PNG")


def _webp(img: Image.Image, path: Path) -> None:
    img.save(path, "WEBP", lossless=True, exact=True)


def _tiff(img: Image.Image, path: Path) -> None:
    img.save(path, "TIFF", compression="tiff_deflate")


RESAVES = {"level 9, optimized": _level9, "text chunks": _texts, "opaque RGBA": _opaque_rgba}
RESAVES |= {"lossless webp": _webp, "tiff": _tiff}


@pytest.fixture
def edited(fake, icedit_home, tmp_path, monkeypatch) -> Path:
    """Session 's': open chelsea (1) -> fake edit (2), its picture written to tmp/first.png."""
    monkeypatch.chdir(tmp_path)
    result = invoke(
        "edit", EXAMPLES / "chelsea.png", "add snow", "--engine", "fake", "--session", "s", "--seed", "1",
        "-o", tmp_path / "first.png",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return tmp_path / "first.png"


@pytest.mark.parametrize("resave", list(RESAVES), ids=list(RESAVES))
def test_a_turns_picture_resaved_continues_from_its_turn(edited, icedit_home, tmp_path, resave):
    picture = Image.open(edited).convert("RGB")
    other = tmp_path / f"resaved{ {'lossless webp': '.webp', 'tiff': '.tif'}.get(resave, '.png') }"
    RESAVES[resave](picture, other)
    assert other.read_bytes() != edited.read_bytes()
    with Store(icedit_home / "sessions.sqlite3") as store:  # the cursor elsewhere: back on the root
        store.move_cursor("s", 1)
    result = invoke("edit", other, "add a hat", "--engine", "fake", "--session", "s", "--json")
    assert result.exit_code == 0, result.output
    with Store(icedit_home / "sessions.sqlite3") as store:
        history = store.history("s")
    assert [(t.id, t.parent, t.kind) for t in history.turns] == [
        (1, None, "open"),
        (2, 1, "edit"),
        (3, 2, "edit"),
    ]
    assert json.loads(result.stdout)["image_sha256"] == history.turn(3).image_sha256


def test_one_changed_pixel_is_another_picture(edited, icedit_home, tmp_path):
    picture = Image.open(edited).convert("RGB")
    picture.putpixel((5, 5), tuple((v + 1) % 256 for v in picture.getpixel((5, 5))))
    picture.save(tmp_path / "touched.png")
    result = invoke("edit", tmp_path / "touched.png", "add a hat", "--engine", "fake", "--session", "s")
    assert result.exit_code == 0, result.output
    with Store(icedit_home / "sessions.sqlite3") as store:
        kinds = [(t.id, t.parent, t.kind) for t in store.history("s").turns]
    assert kinds == [(1, None, "open"), (2, 1, "edit"), (3, 2, "open"), (4, 3, "edit")]


def test_the_digest_covers_mode_size_samples_and_palette():
    rgb = Image.new("RGB", (4, 3), (10, 20, 30))
    assert pixel_digest(rgb) == pixel_digest(rgb.copy()) == png_digest(encode_png(rgb))
    assert pixel_digest(rgb) != sha256(encode_png(rgb))  # never a file's checksum
    assert pixel_digest(rgb) != pixel_digest(Image.new("RGB", (3, 4), (10, 20, 30)))  # same bytes, other size
    assert pixel_digest(rgb) != pixel_digest(rgb.convert("RGBA"))
    grey = Image.new("L", (6, 6), 7)
    assert pixel_digest(grey) != pixel_digest(Image.frombytes("P", (6, 6), grey.tobytes()))
    red, blue = (Image.new("P", (2, 2), 0) for _ in range(2))
    red.putpalette([255, 0, 0] * 256)
    blue.putpalette([0, 0, 255] * 256)
    assert red.tobytes() == blue.tobytes() and pixel_digest(red) != pixel_digest(blue)


# ------------------------------------------------------------------------------- a store of schema 3


def _schema3_store(path: Path, pngs: list[bytes]) -> None:
    """A store as schema 3 wrote it: session 'old', one open turn per PNG (each under the one before),
    images named by the sha256 of their bytes."""
    con = sqlite3.connect(path)
    for script in MIGRATIONS[:3]:
        con.executescript(script)
    con.execute("PRAGMA user_version = 3")
    con.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    con.execute("INSERT INTO sessions (id, name, created, updated) VALUES (1, 'old', 'T', 'T')")
    for i, png in enumerate(pngs, start=1):
        img = Image.open(io.BytesIO(png))
        digest = hashlib.sha256(png).hexdigest()
        con.execute("INSERT OR IGNORE INTO images VALUES (?, ?, ?, ?)", (digest, png, *img.size))
        con.execute(
            "INSERT INTO turns VALUES (?, 1, ?, 'open', ?, NULL, '{}', ?, '{}', 'T')",
            (i, i - 1 or None, f"open {i}", digest),
        )
    con.execute(f"UPDATE sessions SET cursor = {len(pngs)}")
    con.commit()
    con.close()


def test_a_schema_3_store_renames_its_images_by_pixels_and_merges_two_encodings(icedit_home, photo):
    icedit_home.mkdir()
    path = icedit_home / "sessions.sqlite3"
    other = Image.new("RGB", (40, 30), (200, 10, 10))
    buf = io.BytesIO()
    photo.save(buf, "PNG", compress_level=9)
    rotten = bytearray(encode_png(other))
    rotten[len(rotten) // 2] ^= 0xFF
    _schema3_store(path, [encode_png(photo), buf.getvalue(), bytes(rotten)])
    with Store(path) as store:
        assert store.db.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),) == (4,)
        history = store.history("old")
        names = [t.image_sha256 for t in history.turns]
        assert names[0] == names[1] == pixel_digest(photo)  # two encodings, one picture
        assert names[2] == hashlib.sha256(rotten).hexdigest()  # undecodable: kept as it was, read as damaged
        assert store.db.execute("SELECT COUNT(*) FROM images").fetchone() == (2,)
        assert store.picture(names[0]).tobytes() == photo.tobytes()
        with pytest.raises(Exception, match="is damaged"):
            store.image(names[2])
    result = invoke("sessions", "show", "old")
    assert result.exit_code == 0 and result.stdout.splitlines()[0] == "session old (cursor at #3)"


def test_an_upgraded_store_matches_its_pictures_by_pixels(icedit_home, photo, fake_settings):
    from assistant.agent import Agent

    icedit_home.mkdir()
    path = icedit_home / "sessions.sqlite3"
    _schema3_store(path, [encode_png(photo)])
    with Store(path) as store:
        outcome = Agent(store, "old", fake_settings).turn(
            "add a dog", source=(photo.copy(), "open again"), seed=2
        )
        assert (outcome.turn.parent, [t.kind for t in store.history("old").turns]) == (1, ["open", "edit"])
    check_store(path)


# ------------------------------------------------------------------------------- archives of format 1


def _as_format_1(archive: Path, dest: Path, damage: bool = False) -> Path:
    """`archive` rewritten as format 1 wrote it: each image named by the sha256 of its bytes."""
    with zipfile.ZipFile(archive) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    data = json.loads(members.pop("session.json"))
    names = {}
    for name in [n for n in members if n.startswith("images/")]:
        png = members.pop(name)
        names[name[7:-4]] = old = hashlib.sha256(png).hexdigest()
        members[f"images/{old}.png"] = png + (b"x" if damage else b"")
    data["format"] = "icedit-session/1"
    for turn in data["turns"]:
        turn["image_sha256"] = names[turn["image_sha256"]]
    with zipfile.ZipFile(dest, "w") as zf:
        zf.writestr("session.json", json.dumps(data))
        for name, png in members.items():
            zf.writestr(name, png)
    return dest


def test_an_archive_of_format_1_imports_under_pixel_names(edited, icedit_home, tmp_path):
    assert invoke("sessions", "export", "s", tmp_path / "s.zip").exit_code == 0
    assert (
        json.loads(zipfile.ZipFile(tmp_path / "s.zip").read("session.json"))["format"] == "icedit-session/2"
    )
    old = _as_format_1(tmp_path / "s.zip", tmp_path / "old.zip")
    result = invoke("sessions", "import", old, "--as", "copy")
    assert result.exit_code == 0, result.output
    with Store(icedit_home / "sessions.sqlite3") as store:
        original, copy = store.history("s"), store.history("copy")
    assert [t.image_sha256 for t in copy.turns] == [t.image_sha256 for t in original.turns]
    # exporting the copy gives format 2, byte for byte the same images under the same names
    assert invoke("sessions", "export", "copy", tmp_path / "copy.zip").exit_code == 0
    with zipfile.ZipFile(tmp_path / "s.zip") as a, zipfile.ZipFile(tmp_path / "copy.zip") as b:
        images = sorted(n for n in a.namelist() if n.startswith("images/"))
        assert images == sorted(n for n in b.namelist() if n.startswith("images/"))
        assert all(a.read(n) == b.read(n) for n in images)


def test_a_format_1_image_not_matching_its_byte_name_is_refused(edited, icedit_home, tmp_path):
    assert invoke("sessions", "export", "s", tmp_path / "s.zip").exit_code == 0
    old = _as_format_1(tmp_path / "s.zip", tmp_path / "old.zip", damage=True)
    result = invoke("sessions", "import", old, "--as", "copy")
    assert result.exit_code == 2
    assert "does not hash to its name: the archive is damaged: nothing was imported" in result.stderr
    with Store(icedit_home / "sessions.sqlite3") as store:
        assert not store.exists("copy")


def test_the_console_script_continues_from_a_resaved_turn(tmp_path, icedit_home, monkeypatch):
    """As a person would: edit, re-save the written picture with other PNG settings, edit that (the second
    edit through the console script)."""
    monkeypatch.chdir(tmp_path)
    tiny = ["--preset", "tiny", "--steps", "1", "--session", "s", "--json"]
    first = invoke("edit", EXAMPLES / "chelsea.png", "add snow", "--seed", "3", "-o", "a.png", *tiny)
    assert first.exit_code == 0, first.output
    _level9(Image.open(tmp_path / "a.png"), tmp_path / "b.png")
    proc = subprocess.run(
        [str(ICEDIT), "edit", "b.png", "add a hat", "--seed", "4", *tiny],
        cwd=tmp_path, env=env_for(icedit_home), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with Store(icedit_home / "sessions.sqlite3") as store:
        history = store.history("s")
    assert [(t.id, t.parent, t.kind) for t in history.turns] == [
        (1, None, "open"),
        (2, 1, "edit"),
        (3, 2, "edit"),
    ]
    said = (json.loads(first.stdout)["image_sha256"], json.loads(proc.stdout)["image_sha256"])
    assert said == (history.turn(2).image_sha256, history.turn(3).image_sha256)
