"""Input pictures: every Pillow mode read at its real values, and one error naming the file for
whatever cannot be read."""

import io

import numpy as np
import pytest
from conftest import png_declaring
from PIL import Image

from jaxfuse.images import ImageError, decode_image, read_image

# Every test runs in its own folder: nothing lands where pytest was started.
pytestmark = pytest.mark.usefixtures("in_tmp_path")


def saved(tmp_path, image, name):
    path = tmp_path / name
    image.save(path)
    return path


def test_16_bit_grey_is_read_at_its_value_not_as_white(tmp_path):
    """Pillow's convert("RGB") clips 16-bit grey to 255: 30000 of 65535 became white."""
    path = saved(tmp_path, Image.fromarray(np.full((4, 5), 30000, np.uint16)), "grey16.png")
    with Image.open(path) as image:
        assert image.mode.startswith("I")
    np.testing.assert_allclose(read_image(path, "--image"), np.full((4, 5, 3), 30000 / 65535), rtol=1e-6)


@pytest.mark.parametrize("mode, value, name, expected", [
    ("L", 128, "grey.png", (128, 128, 128)),
    ("LA", (128, 7), "grey-alpha.png", (128, 128, 128)),  # alpha dropped
    ("RGBA", (10, 20, 30, 0), "rgba.png", (10, 20, 30)),  # even where fully transparent
    ("CMYK", (0, 255, 255, 0), "cmyk.tif", (255, 0, 0)),
    ("RGB", (10, 20, 30), "rgb.png", (10, 20, 30)),
], ids=["L", "LA", "RGBA", "CMYK", "RGB"])
def test_eight_bit_modes(tmp_path, mode, value, name, expected):
    path = saved(tmp_path, Image.new(mode, (5, 4), value), name)
    with Image.open(path) as image:
        assert image.mode == mode
    image = read_image(path, "--image")
    assert image.shape == (4, 5, 3) and image.dtype == np.float32
    np.testing.assert_allclose(image, np.broadcast_to(np.float32(expected) / 255, (4, 5, 3)))


def test_a_palette_image_reads_its_colours(tmp_path):
    image = Image.new("P", (5, 4), 1)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * (256 * 3 - 6))
    path = saved(tmp_path, image, "palette.png")
    np.testing.assert_allclose(read_image(path, "--image"), np.broadcast_to(np.float32([10, 20, 30]) / 255, (4, 5, 3)))


def test_a_float_image_is_taken_as_it_is_and_refused_outside_0_1(tmp_path):
    path = saved(tmp_path, Image.fromarray(np.full((4, 5), 0.25, np.float32)), "float.tif")
    np.testing.assert_allclose(read_image(path, "--image"), np.full((4, 5, 3), 0.25))
    bright = saved(tmp_path, Image.fromarray(np.full((4, 5), 3.0, np.float32)), "bright.tif")
    with pytest.raises(ImageError, match=rf"--image {bright}: a floating-point \(mode F\) image must hold"):
        read_image(bright, "--image")


def whole_png(tmp_path):
    return (saved(tmp_path, Image.new("RGB", (64, 48), (1, 2, 3)), "whole.png")).read_bytes()


@pytest.mark.parametrize("case, content, message", [
    ("truncated", lambda tmp: whole_png(tmp)[:60], "cannot be decoded"),
    ("random bytes", lambda tmp: np.random.default_rng(0).bytes(2000), "is not an image file Pillow can read"),
    ("text", lambda tmp: b"not a picture", "is not an image file Pillow can read"),
    ("decompression bomb", lambda tmp: png_declaring(20000, 20000), "declares more than"),
])
def test_unreadable_files_are_named(tmp_path, case, content, message):
    path = tmp_path / f"{case.replace(' ', '-')}.png"
    path.write_bytes(content(tmp_path))
    with pytest.raises(ImageError, match=message) as e:
        read_image(path, "--image")
    assert str(e.value).startswith(f"--image {path}")
    assert "\n" not in str(e.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ImageError, match=f"--input {tmp_path / 'gone.png'}: no such file"):
        read_image(tmp_path / "gone.png", "--input")


def test_bytes_decode_as_a_file_does(tmp_path):
    data = whole_png(tmp_path)
    np.testing.assert_array_equal(decode_image(data, "a frame"), read_image(tmp_path / "whole.png", "--image"))
    with pytest.raises(ImageError, match="^a frame cannot be decoded"):
        decode_image(data[:60], "a frame")


def test_a_picture_above_a_callers_bound_is_refused_from_its_header():
    """A server's bound on what one client can make it hold: 5000 x 5000 (under Pillow's own limit,
    a 300 MB float copy) is refused before a pixel is decoded; at the bound it reads."""
    with pytest.raises(ImageError, match="a frame: 5000x5000 is 25,000,000 pixels, more than the 16,777,216 taken"):
        decode_image(png_declaring(5000, 5000), "a frame", 4096 * 4096)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48)).save(buffer, "PNG")
    assert decode_image(buffer.getvalue(), "a frame", 64 * 48).shape == (48, 64, 3)
