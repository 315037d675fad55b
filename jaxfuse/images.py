"""Image files in: any picture Pillow opens, as RGB floats at its real values, or one error that
names the picture and what is wrong with it.

    image = read_image(Path("in.png"), "--image")          # [H, W, 3] float32 in [0, 1]
    frame = decode_image(data, "a frame from the page")    # the same from bytes

Pillow's `convert("RGB")` is wrong for some modes: a 16-bit grey PNG (mode I;16 or I) is clipped
to 255 and reads as white, a 32-bit float one (F) is clipped the same way. Here every mode is
read at its own range: 8-bit modes through Pillow's conversion (grey, palette, CMYK, YCbCr, LAB,
HSV and their alpha forms), 16-bit integers divided by 65535, floats taken as they are (and
refused outside [0, 1]). Alpha is dropped, as diffusers' `load_image` and Pillow's conversion do.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import PIL.Image


class ImageError(ValueError):
    """An input picture that cannot be read; the message names it and the fix."""


WIDE_MODES = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535}  # integer range


def read_image(path: Path, name: str) -> np.ndarray:
    """An image file -> [H, W, 3] float32 in [0, 1]; errors say "`name` `path`: why"."""
    what = f"{name} {path}"
    if not path.is_file():
        raise ImageError(f"{what}: no such file.")
    return decode_image(path.read_bytes(), what)


def decode_image(data: bytes, what: str, max_pixels: int | None = None) -> np.ndarray:
    """The bytes of an image file -> [H, W, 3] float32 in [0, 1]; errors start with `what`. A
    picture of more than `max_pixels` is refused from its header, before any pixel is decoded (a
    server's bound on what one client can make it hold)."""
    with warnings.catch_warnings():
        # Pillow warns from 89M pixels and refuses from twice that (its decompression-bomb guard,
        # raised from the header alone, before any pixel is decoded): the refusal is the limit.
        warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
        try:
            with PIL.Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageError(f"{what}: {width}x{height} is {width * height:,} pixels, more than the "
                                     f"{max_pixels:,} taken here; send a smaller picture.")
                image.load()  # a truncated file fails here, not later
                return image_array(image, what)
        except PIL.Image.DecompressionBombError:
            raise ImageError(f"{what}: its header declares more than {2 * PIL.Image.MAX_IMAGE_PIXELS:,} pixels, "
                             "more than Pillow decodes (a guard against decompression bombs); resize it "
                             "first.") from None
        except PIL.UnidentifiedImageError:
            raise ImageError(f"{what} is not an image file Pillow can read (PNG, JPEG, WebP, ...).") from None
        except ImageError:
            raise
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"{what} cannot be decoded ({e}): the file is damaged or cut short; save it "
                             "again.") from None


def image_array(image: PIL.Image.Image, what: str) -> np.ndarray:
    """A loaded Pillow image in any mode -> [H, W, 3] float32 in [0, 1], alpha dropped."""
    mode = image.mode
    if mode in WIDE_MODES:
        grey = np.asarray(image).astype(np.float32) / WIDE_MODES[mode]
        if grey.min() < 0 or grey.max() > 1:
            raise ImageError(f"{what}: a {mode} image holds values outside 0..65535; save it as 8- or 16-bit.")
        return np.repeat(grey[..., None], 3, axis=-1)
    if mode == "F":
        grey = np.asarray(image, np.float32)
        if not np.isfinite(grey).all() or grey.min() < 0 or grey.max() > 1:
            raise ImageError(f"{what}: a floating-point (mode F) image must hold finite values in [0, 1], got "
                             f"[{np.nanmin(grey)}, {np.nanmax(grey)}].")
        return np.repeat(grey[..., None], 3, axis=-1)
    if mode in ("RGB;16", "BGR;16", "RGBA;16"):  # not opened from files by today's Pillow; refused by name
        raise ImageError(f"{what}: Pillow's mode {mode} is not read here; save it as an 8- or 16-bit PNG.")
    try:
        rgb = image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"{what}: Pillow cannot convert its mode {mode} to RGB ({e}); save it as PNG or "
                         "JPEG.") from None
    return np.asarray(rgb, np.float32) / 255
