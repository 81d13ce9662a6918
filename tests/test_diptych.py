"""The in-context diptych geometry: panel size, canvas and mask, and cutting the edit back out."""

import numpy as np
import pytest
from PIL import Image

from assistant.errors import UserError
from plugins.icedit.diptych import MAX_ASPECT, PANEL_WIDTH, make_diptych, panel_size, right_panel


@pytest.mark.parametrize(
    ("size", "panel"),
    [
        ((512, 512), (512, 512)),
        ((451, 300), (512, 336)),  # 512 * 300 / 451 = 340.6 -> 21.3 sixteens -> 336
        ((1, 1), (512, 512)),
        ((1024, 768), (512, 384)),
        ((300, 451), (512, 768)),  # 512 * 451 / 300 = 769.7 -> 48.1 sixteens -> 768
        ((640, 427), (512, 336)),  # 341.6 -> 21.35 -> 336
        ((100, 67), (512, 336)),  # 343.0 -> 21.44 -> 336
        ((100, 68), (512, 352)),  # 348.2 -> 21.76 -> 352
        ((512, 128), (512, 128)),  # widest allowed, 1:4
        ((2048, 512), (512, 128)),
        ((512, 2048), (512, 2048)),  # tallest allowed, 4:1
        ((100, 400), (512, 2048)),
    ],
)
def test_panel_is_512_wide_and_its_height_the_nearest_multiple_of_16(size, panel):
    assert panel_size(*size) == panel
    w, h = panel
    assert w == PANEL_WIDTH and h % 16 == 0


def test_panel_height_never_goes_below_16():
    # With the default width the aspect limit keeps heights >= 128; a narrow panel reaches the floor.
    assert panel_size(100, 25, panel_width=16) == (16, 16)
    assert panel_size(100, 25, panel_width=32) == (32, 16)


@pytest.mark.parametrize(
    ("size", "word"),
    [
        ((10, 1000), "tall"),
        ((100, 401), "tall"),
        ((1000, 10), "wide"),
        ((401, 100), "wide"),
        ((600, 100), "wide"),
    ],
)
def test_extreme_aspect_ratios_are_refused_in_one_line(size, word):
    with pytest.raises(UserError) as e:
        panel_size(*size)
    bounds = f"between 1/{MAX_ASPECT:g} and {MAX_ASPECT:g}"
    assert str(e.value) == f"a {size[0]}x{size[1]} image is too {word}: height/width must be {bounds}"
    assert "\n" not in str(e.value)


def _gradient(w: int, h: int, mode: str = "RGB") -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.uint8)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=-1)).convert(mode)


def test_make_diptych_puts_the_resized_source_in_both_halves_and_masks_the_right(photo):
    canvas, mask = make_diptych(photo)  # 150x100 -> panel 512x336
    assert canvas.mode == "RGB" and canvas.size == (1024, 336)
    assert mask.mode == "L" and mask.size == (1024, 336)
    panel = photo.resize((512, 336), Image.Resampling.LANCZOS)
    pixels = np.asarray(canvas)
    assert np.array_equal(pixels[:, :512], np.asarray(panel))
    assert np.array_equal(pixels[:, 512:], np.asarray(panel))
    m = np.asarray(mask)
    assert (m[:, :512] == 0).all()
    assert (m[:, 512:] == 255).all()
    assert sorted(np.unique(m).tolist()) == [0, 255]


def test_make_diptych_converts_other_modes_to_rgb():
    source = _gradient(64, 64, "RGBA")
    canvas, _ = make_diptych(source)
    assert canvas.mode == "RGB" and canvas.size == (1024, 512)
    expected = source.convert("RGB").resize((512, 512), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(canvas)[:, :512], np.asarray(expected))


def test_make_diptych_refuses_what_panel_size_refuses():
    with pytest.raises(UserError, match="too wide"):
        make_diptych(Image.new("RGB", (1000, 10)))


def test_right_panel_is_the_right_half():
    left = Image.new("RGB", (512, 336), (255, 0, 0))
    right = _gradient(512, 336)
    painted = Image.new("RGB", (1024, 336))
    painted.paste(left, (0, 0))
    painted.paste(right, (512, 0))
    edit = right_panel(painted)
    assert edit.size == (512, 336)
    assert np.array_equal(np.asarray(edit), np.asarray(right))
    assert right_panel(painted, (512, 336)).tobytes() == right.tobytes()


def test_right_panel_resizes_to_the_requested_size():
    painted = Image.new("RGB", (1024, 336), (255, 0, 0))
    painted.paste(Image.new("RGB", (512, 336), (0, 0, 255)), (512, 0))
    edit = right_panel(painted, (451, 300))
    assert edit.size == (451, 300)
    assert set(edit.getcolors()) == {(451 * 300, (0, 0, 255))}  # nothing of the left half leaks in
    gradient = _gradient(512, 336)
    painted.paste(gradient, (512, 0))
    assert np.array_equal(
        np.asarray(right_panel(painted, (150, 100))),
        np.asarray(gradient.resize((150, 100), Image.Resampling.LANCZOS)),
    )


def test_diptych_round_trip_keeps_the_source_size(photo):
    canvas, _ = make_diptych(photo)
    assert right_panel(canvas, photo.size).size == photo.size
    assert right_panel(canvas).size == panel_size(*photo.size)
