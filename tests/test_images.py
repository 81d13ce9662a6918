"""Reading the images people hand us, and the canonical PNG bytes the store keeps and hashes."""

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from assistant.errors import UserError
from assistant.images import MAX_PIXELS, load_image
from sessions.identity import decode_png, encode_png, sha256

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NOT_AN_IMAGE = "not an image PIL can read (PNG, JPEG, WebP, ...)"


def test_a_png_loads_as_rgb_with_its_pixels(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.mode == "RGB" and img.size == (40, 30)
    assert np.array_equal(np.asarray(img), pixels)


def test_the_shipped_example_loads():
    img = load_image(EXAMPLES / "chelsea.png")
    assert img.mode == "RGB" and img.size == (451, 300)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (80, 40), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 40, 40))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rot.jpg")
    assert out.size == (40, 80)
    top, bottom = out.getpixel((20, 10)), out.getpixel((20, 70))
    assert top[0] > 200 and top[2] < 50  # the left half is now on top
    assert bottom[2] > 200 and bottom[0] < 50


def test_transparent_pixels_are_laid_on_white(tmp_path):
    img = Image.new("RGBA", (3, 1))
    img.putpixel((0, 0), (10, 20, 30, 0))
    img.putpixel((1, 0), (10, 20, 30, 255))
    img.putpixel((2, 0), (0, 0, 0, 128))
    img.save(tmp_path / "alpha.png")
    out = load_image(tmp_path / "alpha.png")
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (10, 20, 30)
    assert out.getpixel((2, 0)) == (127, 127, 127)


def test_a_palette_image_keeps_its_colours(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 128, 255] + [0] * 762)
    img.putpixel((1, 0), 1)
    img.save(tmp_path / "pal.png")
    out = load_image(tmp_path / "pal.png")
    assert out.mode == "RGB"
    assert [out.getpixel((0, 0)), out.getpixel((1, 0))] == [(255, 0, 0), (0, 128, 255)]


def test_a_palette_transparency_index_becomes_white(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((1, 0), 1)
    img.save(tmp_path / "paltrans.png", transparency=1)
    out = load_image(tmp_path / "paltrans.png")
    assert [out.getpixel((0, 0)), out.getpixel((1, 0))] == [(255, 0, 0), (255, 255, 255)]


def test_16_bit_grayscale_is_scaled_to_8_bits(tmp_path):
    img = Image.new("I;16", (3, 1))
    img.putpixel((0, 0), 65535)
    img.putpixel((1, 0), 0)
    img.putpixel((2, 0), 32768)
    img.save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    out = load_image(tmp_path / "g16.png")
    assert out.mode == "RGB"
    assert [out.getpixel((x, 0)) for x in range(3)] == [(255, 255, 255), (0, 0, 0), (128, 128, 128)]


def test_a_cmyk_jpeg_loads_as_rgb(tmp_path):
    Image.new("CMYK", (16, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    out = load_image(tmp_path / "cmyk.jpg")
    assert out.mode == "RGB" and out.size == (16, 8)
    r, g, b = out.getpixel((8, 4))
    assert r > 240 and g < 15 and b < 15


def test_an_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(tmp_path / "anim.gif").n_frames == 3
    out = load_image(tmp_path / "anim.gif")
    assert out.mode == "RGB" and out.size == (8, 8)
    assert out.getcolors() == [(64, (255, 0, 0))]


def _valid_png() -> bytes:
    return (EXAMPLES / "chelsea.png").read_bytes()


def _html(p: Path) -> None:
    p.write_text("<!doctype html>\n<html><head><title>Not Found</title></head><body>404</body></html>\n")


@pytest.mark.parametrize(
    ("name", "make", "expected"),
    [
        ("empty.png", lambda p: p.write_bytes(b""), "the file is empty"),
        ("text.png", lambda p: p.write_text("hello\nthis is not a picture\n"), NOT_AN_IMAGE),
        ("page.png", _html, NOT_AN_IMAGE),
        (
            "half.png",
            lambda p: p.write_bytes(_valid_png()[: len(_valid_png()) // 2]),
            "broken image (image file is truncated)",
        ),
    ],
)
def test_bad_files_are_one_line_user_errors(tmp_path, name, make, expected):
    path = tmp_path / name
    make(path)
    with pytest.raises(UserError) as e:
        load_image(path)
    assert str(e.value) == f"{path}: {expected}"
    assert "\n" not in str(e.value)
    assert e.value.exit_code == 2


def test_a_folder_is_refused(tmp_path):
    (tmp_path / "pics.png").mkdir()
    with pytest.raises(UserError) as e:
        load_image(tmp_path / "pics.png")
    assert str(e.value) == f"{tmp_path / 'pics.png'} is a folder, not an image"


def test_a_missing_path_is_refused(tmp_path):
    with pytest.raises(UserError) as e:
        load_image(tmp_path / "nosuch.png")
    assert str(e.value) == f"{tmp_path / 'nosuch.png'}: no such file"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read a chmod 000 file")
def test_an_unreadable_file_is_refused(tmp_path):
    path = tmp_path / "secret.png"
    path.write_bytes(_valid_png())
    path.chmod(0)
    try:
        with pytest.raises(UserError) as e:
            load_image(path)
    finally:
        path.chmod(0o644)
    assert str(e.value) == f"{path}: permission denied"


@pytest.mark.parametrize("size", [(20000, 20000), (9000, 8000)])  # 400 MP (PIL error), 72 MP (PIL warning)
def test_decompression_bombs_are_refused(tmp_path, size):
    assert size[0] * size[1] > MAX_PIXELS
    path = tmp_path / "bomb.png"
    Image.new("1", size).save(path)
    assert path.stat().st_size < 1_000_000  # small on disk, huge decoded
    with pytest.raises(UserError) as e:
        load_image(path)
    assert str(e.value) == f"{path}: image too large (over 64 megapixels)"


def test_just_under_the_pixel_limit_loads(tmp_path):
    path = tmp_path / "big.png"
    Image.new("1", (8000, 8000)).save(path)  # exactly 64 MP
    assert load_image(path).size == (8000, 8000)


def test_encode_png_is_deterministic_and_lossless():
    pixels = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    a, b = Image.fromarray(pixels), Image.fromarray(pixels.copy())
    assert encode_png(a) == encode_png(b)
    assert encode_png(a) == encode_png(a)
    assert np.array_equal(np.asarray(decode_png(encode_png(a))), pixels)
    c = pixels.copy()
    c[0, 0, 0] ^= 1
    assert encode_png(Image.fromarray(c)) != encode_png(a)
    assert sha256(encode_png(a)) == sha256(encode_png(b))


def test_encode_png_depends_only_on_pixels(tmp_path):
    """Metadata carried from a source file (ICC profile, text, dpi) must not change the stored bytes."""
    img = Image.new("RGB", (8, 8), (10, 200, 30))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    img.save(tmp_path / "icc.png", icc_profile=srgb, dpi=(300, 300))
    img.save(tmp_path / "plain.png")
    with_icc, plain = load_image(tmp_path / "icc.png"), load_image(tmp_path / "plain.png")
    assert with_icc.tobytes() == plain.tobytes()
    assert encode_png(with_icc) == encode_png(plain) == encode_png(img)


def test_a_cmyk_profile_is_not_carried_onto_the_rgb_png(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", icc_profile=b"a CMYK profile")
    data = encode_png(load_image(tmp_path / "c.jpg"))
    assert b"iCCP" not in data
    assert "icc_profile" not in Image.open(io.BytesIO(data)).info
