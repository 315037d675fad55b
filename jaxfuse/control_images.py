"""Control images made from pictures, by name, as ControlNet users make them before the pipeline
reads them (`load_pipeline(..., controlnets=...)`, `control_image=`):

    edges = preprocess("canny", picture)       # white edges on black: the canny ControlNets' input
    shapes = preprocess("grey", photo)         # luma in three equal channels: the demo ControlNet's

`picture` is a PIL image or an array [H, W, 3] (or [H, W]), uint8 or floats in [0, 1]; the result
is uint8 [H, W, 3] at the picture's own size (the request resizes it to the output's, as diffusers
does). Canny needs OpenCV, an optional extra: pip install "jaxfuse[control]".

A leaf: numpy and Pillow only; OpenCV is imported when an edge map is made.
"""

from __future__ import annotations

import enum
import math
from typing import Any

import numpy as np
import PIL.Image

# The thresholds of diffusers' and ControlNet's canny examples (`cv2.Canny(image, 100, 200)`).
CANNY_LOW, CANNY_HIGH = 100, 200
CANNY_OPTIONS = ("low_threshold", "high_threshold")
# ITU-R BT.601 luma, the weights of Pillow's and OpenCV's RGB-to-grey conversions.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])
INSTALL_CONTROL = 'pip install "jaxfuse[control]"'


class ControlImageError(ValueError):
    """A picture or a preprocessor that cannot make a control image; the message names the fix."""


class Preprocessor(str, enum.Enum):
    CANNY = "canny"  # Canny edges, white on black
    GREY = "grey"  # greyscale (luma) in three equal channels
    NONE = "none"  # the picture as it is

    @classmethod
    def named(cls, name: str | Preprocessor) -> Preprocessor:
        """The preprocessor `name` names, or one `ControlImageError` listing them."""
        try:
            return cls(name)
        except ValueError:
            raise ControlImageError(f"no preprocessor {name!r}; choose one of "
                                    f"{', '.join(p.value for p in cls)}.") from None


def rgb_array(image: Any) -> np.ndarray:
    """A PIL image, or an array [H, W, 3] or [H, W] of uint8 or floats in [0, 1] -> uint8 [H, W, 3]."""
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ControlImageError(f"a picture to preprocess must be [H, W, 3] (RGB, channels last) or [H, W], got "
                                f"shape {array.shape}.")
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise ControlImageError(f"a picture to preprocess must hold uint8 or floats in [0, 1], got dtype "
                                f"{array.dtype}.")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise ControlImageError(f"a picture to preprocess must hold finite floats in [0, 1], got values in "
                                f"[{array.min()}, {array.max()}] (scale 0..255 pictures by 1/255, or pass uint8).")
    return np.round(array * 255).astype(np.uint8)


def canny(image: Any, low_threshold: float = CANNY_LOW, high_threshold: float = CANNY_HIGH) -> np.ndarray:
    """Canny edges of the RGB picture (OpenCV's `Canny`, gradients over the three channels), white
    on black: -> uint8 [H, W, 3], each pixel 0 or 255, three equal channels."""
    for name, value in (("low_threshold", low_threshold), ("high_threshold", high_threshold)):
        if not isinstance(value, (int, float, np.number)) or not math.isfinite(value) or value < 0:
            raise ControlImageError(f"canny's {name} must be a finite number at least 0, got {value!r}.")
    rgb = rgb_array(image)
    try:
        import cv2
    except ImportError:
        raise ControlImageError(f"the canny preprocessor needs OpenCV: {INSTALL_CONTROL}.") from None
    edges = cv2.Canny(np.ascontiguousarray(rgb), low_threshold, high_threshold)
    return np.repeat(edges[..., None], 3, axis=-1)


def grey(image: Any) -> np.ndarray:
    """The picture's luma (0.299 R + 0.587 G + 0.114 B, rounded) in three equal channels: -> uint8 [H, W, 3]."""
    luma = np.round(rgb_array(image).astype(np.float64) @ LUMA_WEIGHTS).astype(np.uint8)
    return np.repeat(luma[..., None], 3, axis=-1)


def preprocess(name: str | Preprocessor, image: Any, **options: Any) -> np.ndarray:
    """The control image the preprocessor `name` makes of `image` -> uint8 [H, W, 3]; `options`
    are the preprocessor's own (canny: `low_threshold`, `high_threshold`)."""
    kind = Preprocessor.named(name)
    takes = CANNY_OPTIONS if kind is Preprocessor.CANNY else ()
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise ControlImageError(f"the {kind.value} preprocessor takes no option {', '.join(unknown)}"
                                + (f"; its options: {', '.join(takes)}." if takes else "."))
    if kind is Preprocessor.CANNY:
        return canny(image, **options)
    return grey(image) if kind is Preprocessor.GREY else rgb_array(image)
