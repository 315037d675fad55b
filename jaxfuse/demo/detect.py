"""A classical detector for images like those of `jaxfuse.demo.scenes`: the colour, shape and grid
cell of every saturated blob, to check whether a generated image follows its prompt.

1. Object pixels are those whose chroma is at least MIN_CHROMA. The chroma vector of a pixel is its
   colour projected on the plane orthogonal to grey: its angle is the hue, its length how far the
   colour is from grey (so dark and washed-out pixels are both short). Scene backgrounds are muted
   and stay well below the threshold.
2. Blobs are the 8-connected components of object pixels; those smaller than MIN_AREA_FRACTION of
   the image are noise.
3. A blob's colour is the named colour nearest in hue to the sum of its pixels' chroma vectors.
   Labelling blobs before naming colours keeps an object whole when its hue drifts across a named
   colour boundary (blurred edges over a tinted background, a generated image's uneven colour);
   the cost is that two touching objects make one blob, which scenes never draw.
4. A blob's shape follows from two features: solidity, area over convex-hull area, singles out the
   star (~1/2; the others 1); then fill ratio, area over bounding-box area, orders the rest
   (triangle 1/2, circle pi/4, square 1). Shapes are drawn upright and axis-aligned.
5. A blob's position is the grid cell of its centroid.

Legend: H, W image rows and columns; P the pixels of one blob.
"""

from __future__ import annotations

import collections
import math

import numpy as np

from jaxfuse.demo.scenes import COLOURS, GRID, POSITIONS, SceneObject, parse_caption

# Half the chroma of the dullest named colour (green, purple: ~0.5): an antialiased or blurred edge
# counts where the object covers about half of the pixel. Backgrounds stay below 0.12.
MIN_CHROMA = 0.25
# A third of the smallest star a scene draws (radius 0.09: ~1% of the image).
MIN_AREA_FRACTION = 0.003
# The chroma is averaged over 3x3 pixels once per this many pixels of image side (see `detect`).
SMOOTHING_SIDE = 128
# Shape thresholds. As `scenes.outline` draws them, the star's solidity is 0.52 and the others' 1;
# the fill ratios are triangle 0.5, circle pi/4, square 1. Pixels shift them: over sampled scenes
# at 64 to 512 pixels, clean or blurred and noisy, stars measured solidity 0.55-0.75 and the rest
# 0.87-1; fill ratios, triangles 0.50-0.62, circles 0.71-0.83, squares 0.89-1 (0.81 at worst at
# 64 x 64 blurred). Each threshold lies in the gap. The demo model's VAE blurs more: over 256
# decoded 256 x 256 scenes, stars measured solidity 0.74-0.91 (5th to 95th percentile, median 0.78)
# and triangles 0.91-0.97, so the star threshold sits at the top of the rendered gap.
STAR_MAX_SOLIDITY = 0.86
TRIANGLE_MAX_FILL = 0.66
CIRCLE_MAX_FILL = 0.86


def chroma_vectors(rgb: np.ndarray) -> np.ndarray:
    """Colours in [0, 1] projected on the plane orthogonal to grey: [..., 3] -> [..., 2]; red is
    along the first axis and a fully saturated primary has length 1."""
    red, green, blue = np.moveaxis(rgb, -1, 0)
    return np.stack([red - (green + blue) / 2, math.sqrt(3) / 2 * (green - blue)], axis=-1)


def _hue(vector: np.ndarray) -> np.ndarray:
    return np.arctan2(vector[..., 1], vector[..., 0])


_COLOUR_NAMES = tuple(COLOURS)
_COLOUR_HUES = _hue(chroma_vectors(np.array([COLOURS[name] for name in _COLOUR_NAMES]) / 255))


def _windows_3x3(array: np.ndarray, **pad) -> list[np.ndarray]:
    """The 9 shifted views of an array [H, W, ...] that put each pixel's 3x3 neighbourhood at the
    pixel; `pad` says what lies beyond the border (`np.pad`'s arguments)."""
    height, width = array.shape[:2]
    padded = np.pad(array, [(1, 1), (1, 1)] + [(0, 0)] * (array.ndim - 2), **pad)
    return [padded[dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3)]


def connected_components(mask: np.ndarray) -> np.ndarray:
    """8-connected components of a mask: [H, W] bool -> [H, W] int, each pixel of the mask labelled
    with the smallest flat index in its component, -1 elsewhere.

    Every label is the flat index of a pixel in the same component, so a pixel may take its
    neighbours' smallest label and then that pixel's own label (pointer jumping): labels fall to
    the component's minimum in a number of sweeps that grows with the log of its diameter rather
    than with the diameter.
    """
    height, width = mask.shape
    outside = height * width
    labels = np.where(mask, np.arange(outside).reshape(height, width), outside)
    while True:
        swept = np.where(mask, np.minimum.reduce(_windows_3x3(labels, constant_values=outside)), outside)
        swept[mask] = swept.ravel()[swept[mask]]
        if np.array_equal(swept, labels):
            return np.where(mask, labels, -1)
        labels = swept


def convex_hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of points [P, 2] (Andrew's monotone chain, then the shoelace)."""
    ordered = sorted(set(map(tuple, points.tolist())))

    def half_hull(sequence):
        hull = []
        for point in sequence:
            while len(hull) >= 2 and _cross(hull[-2], hull[-1], point) <= 0:
                hull.pop()
            hull.append(point)
        return hull[:-1]

    hull = np.array(half_hull(ordered) + half_hull(reversed(ordered)))
    return _polygon_area(hull) if len(hull) >= 3 else 0.0


def _cross(origin, a, b) -> float:
    return (a[0] - origin[0]) * (b[1] - origin[1]) - (a[1] - origin[1]) * (b[0] - origin[0])


def _polygon_area(vertices: np.ndarray) -> float:
    x, y = vertices[:, 0], vertices[:, 1]
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2


def _blob_features(rows: np.ndarray, columns: np.ndarray) -> tuple[float, float]:
    """(fill ratio, solidity) of a blob from its pixels' coordinates [P], in row-major order.

    The hull goes through each row's outer edges at the row's middle, and through the outer
    corners of the first and last rows: a polygon whose area about matches the pixel count of a
    convex blob, where the hull of pixel corners would overestimate it by half the perimeter, which is no
    small part of a blob at 64 x 64.
    """
    area = len(rows)
    height, width = np.ptp(rows) + 1, np.ptp(columns) + 1
    first = np.flatnonzero(np.diff(rows, prepend=-1))  # the leftmost pixel of each row
    last = np.append(first[1:] - 1, area - 1)  # the rightmost
    left, right, y = columns[first] - 0.5, columns[last] + 0.5, rows[first].astype(float)
    ends = [(left[0], y[0] - 0.5), (right[0], y[0] - 0.5), (left[-1], y[-1] + 0.5), (right[-1], y[-1] + 0.5)]
    points = np.concatenate([np.stack([left, y], -1), np.stack([right, y], -1), np.array(ends)])
    return area / (height * width), area / convex_hull_area(points)


def _shape(fill_ratio: float, solidity: float) -> str:
    if solidity < STAR_MAX_SOLIDITY:
        return "star"
    if fill_ratio < TRIANGLE_MAX_FILL:
        return "triangle"
    return "circle" if fill_ratio < CIRCLE_MAX_FILL else "square"


def _nearest_colour(chroma_sum: np.ndarray) -> str:
    hue_difference = np.angle(np.exp(1j * (_COLOUR_HUES - _hue(chroma_sum))))
    return _COLOUR_NAMES[int(np.argmin(np.abs(hue_difference)))]


def _unit_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    if image.dtype == np.uint8:
        return image / 255
    return np.clip(image.astype(float), 0.0, 1.0)


def detect(image: np.ndarray) -> list[SceneObject]:
    """The objects in an image [H, W, 3], uint8 or float in [0, 1], in row-major order of their
    first pixels."""
    rgb = _unit_rgb(image)
    height, width, _ = rgb.shape
    chroma = chroma_vectors(rgb)
    # Noise makes a blurred edge ragged where it crosses the threshold, and raggedness enlarges
    # bounding boxes and hulls. A 3x3 mean per SMOOTHING_SIDE pixels of side smooths the same
    # fraction of any image; none at 64 x 64, where it would fill in a star's arms.
    for _ in range(max(height, width) // SMOOTHING_SIDE):
        chroma = sum(_windows_3x3(chroma, mode="edge")) / 9
    mask = np.hypot(chroma[..., 0], chroma[..., 1]) >= MIN_CHROMA
    rows, columns = np.nonzero(mask)
    _, blob_of_pixel, blob_areas = np.unique(
        connected_components(mask)[mask], return_inverse=True, return_counts=True
    )
    objects = []
    for blob in np.flatnonzero(blob_areas >= MIN_AREA_FRACTION * height * width):
        in_blob = blob_of_pixel == blob
        blob_rows, blob_columns = rows[in_blob], columns[in_blob]
        grid_row = min(int(GRID * (blob_rows.mean() + 0.5) / height), GRID - 1)
        grid_column = min(int(GRID * (blob_columns.mean() + 0.5) / width), GRID - 1)
        objects.append(SceneObject(
            colour=_nearest_colour(chroma[blob_rows, blob_columns].sum(axis=0)),
            shape=_shape(*_blob_features(blob_rows, blob_columns)),
            position=POSITIONS[GRID * grid_row + grid_column],
        ))
    return objects


def prompt_accuracy(caption: str, image: np.ndarray, with_shape: bool = True) -> float:
    """The fraction of the caption's objects found in the image with the same colour, shape and
    position (colour and position only unless `with_shape`); each detected object matches at
    most one of the caption's (a multiset intersection). Recall only: objects the caption does
    not name cost nothing."""

    def key(obj: SceneObject) -> tuple[str, ...]:
        return (obj.colour, obj.shape, obj.position) if with_shape else (obj.colour, obj.position)

    named = collections.Counter(map(key, parse_caption(caption)))
    found = collections.Counter(map(key, detect(image)))
    return sum((named & found).values()) / sum(named.values())
