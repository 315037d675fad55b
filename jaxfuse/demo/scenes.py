"""Procedural scenes for the demo text-to-image model: one to three coloured shapes on a muted
background, and a caption that names them ("a red circle at the top left and a blue star in the
centre").

A scene is laid out on a 3x3 grid. Every object owns one cell and stays inside it, so a caption
never has to describe overlaps and an object's cell is its position word. Objects are saturated and
backgrounds are not, which is what lets `jaxfuse.demo.detect` find the objects again.

Coordinates are fractions of the image side, x to the right and y down.
"""

from __future__ import annotations

import colorsys
import dataclasses
import itertools
import math
import re
from collections.abc import Sequence
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]

SHAPES = ("circle", "square", "triangle", "star")
# Saturated and spread around the hue circle: the closest pair (orange, yellow) is ~30 degrees
# apart; red leans to crimson to keep its distance from orange.
COLOURS: MappingProxyType[str, RGB] = MappingProxyType({
    "red": (225, 25, 55),
    "orange": (250, 120, 0),
    "yellow": (250, 240, 0),
    "green": (30, 170, 50),
    "blue": (30, 90, 220),
    "purple": (140, 50, 200),
})
# Row by row, so a position's index is 3 * row + column.
POSITIONS = (
    "top left", "top", "top right",
    "left", "centre", "right",
    "bottom left", "bottom", "bottom right",
)
GRID = 3
CELL = 1 / GRID
MAX_OBJECTS = 3

MIN_RADIUS, MAX_RADIUS = 0.09, 0.13
# Left clear between a shape and its cell's border, so shapes in neighbouring cells never touch.
MARGIN = 0.02
# Inner to outer radius of the star: 0.38 is the regular pentagram; a little fatter keeps the arms
# a few pixels wide at 64 x 64.
STAR_INNER_RATIO = 0.42
CIRCLE_VERTICES = 72
# Backgrounds stay below this HSV saturation, objects are far above it.
MAX_BACKGROUND_SATURATION = 0.12
MIN_BACKGROUND_VALUE, MAX_BACKGROUND_VALUE = 0.15, 0.95
# Shapes are drawn at this multiple of the size and box-filtered down: antialiased edges.
SUPERSAMPLING = 4


def _check_name(kind: str, name: str, names: tuple[str, ...]) -> None:
    if name not in names:
        raise ValueError(f"unknown {kind} {name!r}; expected one of {names}")


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """What a caption says about an object: its colour, shape and grid cell (names from
    COLOURS, SHAPES and POSITIONS)."""

    colour: str
    shape: str
    position: str

    def __post_init__(self):
        _check_name("colour", self.colour, tuple(COLOURS))
        _check_name("shape", self.shape, SHAPES)
        _check_name("position", self.position, POSITIONS)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where an object is drawn: its centre's offset from its cell's centre, and its radius (the
    shape lies within `radius` of its centre along each axis), as fractions of the image side."""

    dx: float
    dy: float
    radius: float


@dataclasses.dataclass(frozen=True)
class Background:
    """A linear gradient from `start` to `end`, top to bottom if `vertical`, else left to right;
    plain when `start == end`."""

    start: RGB
    end: RGB
    vertical: bool


@dataclasses.dataclass(frozen=True)
class Scene:
    """Objects in distinct cells, each drawn at the placement of the same index. A scene without
    objects is a bare background: it renders, but has no caption."""

    objects: tuple[SceneObject, ...]
    placements: tuple[Placement, ...]
    background: Background

    def __post_init__(self):
        if len(self.objects) != len(self.placements):
            raise ValueError(f"{len(self.objects)} objects but {len(self.placements)} placements")
        positions = [obj.position for obj in self.objects]
        if len(set(positions)) != len(positions):
            raise ValueError(f"objects must be in distinct cells, got {positions}")
        for placement in self.placements:
            if max(abs(placement.dx), abs(placement.dy)) + placement.radius > CELL / 2:
                raise ValueError(f"{placement} reaches out of its cell (half-width {CELL / 2:.4f})")


def cell(position: str) -> tuple[int, int]:
    """The grid cell (row, column) a position names."""
    _check_name("position", position, POSITIONS)
    return divmod(POSITIONS.index(position), GRID)


def outline(shape: str, radius: float = 1.0) -> np.ndarray:
    """Vertices of a shape centred on the origin, y down, as drawn: [V, 2] (x, y). Upright and
    axis-aligned; the square has the circle's area rather than filling the same box."""
    _check_name("shape", shape, SHAPES)
    if shape == "square":
        half_side = radius * math.sqrt(math.pi) / 2
        return np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)]) * half_side
    if shape == "triangle":
        return np.array([(0, -1), (1, 1), (-1, 1)]) * radius
    if shape == "circle":
        count, radii = CIRCLE_VERTICES, np.full(CIRCLE_VERTICES, radius)
    else:  # star: points alternate between the outer and the inner radius, the first pointing up
        count, radii = 10, np.tile([radius, radius * STAR_INNER_RATIO], 5)
    angles = 2 * np.pi * np.arange(count) / count - np.pi / 2
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=-1)


def sample_scene(rng: np.random.Generator) -> Scene:
    """A random scene: 1 to MAX_OBJECTS objects of any colour and shape, in distinct cells."""
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = rng.choice(len(POSITIONS), size=count, replace=False)
    colour_names = tuple(COLOURS)
    objects = tuple(
        SceneObject(
            colour=colour_names[rng.integers(len(colour_names))],
            shape=SHAPES[rng.integers(len(SHAPES))],
            position=POSITIONS[index],
        )
        for index in cells
    )
    placements = tuple(_sample_placement(rng) for _ in objects)
    return Scene(objects, placements, _sample_background(rng))


def _sample_placement(rng: np.random.Generator) -> Placement:
    radius = rng.uniform(MIN_RADIUS, MAX_RADIUS)
    jitter = CELL / 2 - MARGIN - radius
    dx, dy = rng.uniform(-jitter, jitter, size=2)
    return Placement(float(dx), float(dy), float(radius))


def _sample_muted_colour(rng: np.random.Generator) -> RGB:
    hue = rng.uniform()
    saturation = rng.uniform(0, MAX_BACKGROUND_SATURATION)
    value = rng.uniform(MIN_BACKGROUND_VALUE, MAX_BACKGROUND_VALUE)
    red, green, blue = (round(255 * channel) for channel in colorsys.hsv_to_rgb(hue, saturation, value))
    return red, green, blue


def _sample_background(rng: np.random.Generator) -> Background:
    start, end = _sample_muted_colour(rng), _sample_muted_colour(rng)
    kind = rng.integers(3)  # plain, vertical gradient, horizontal gradient
    return Background(start, start if kind == 0 else end, vertical=bool(kind == 1))


def render(scene: Scene, size: int) -> np.ndarray:
    """The scene as a [size, size, 3] uint8 image."""
    ramp = np.linspace(0.0, 1.0, size)
    ramp = ramp[:, None, None] if scene.background.vertical else ramp[None, :, None]
    start, end = np.asarray(scene.background.start, float), np.asarray(scene.background.end, float)
    image = np.broadcast_to(start + ramp * (end - start), (size, size, 3)).copy()
    for obj, placement in zip(scene.objects, scene.placements):
        coverage = _coverage(obj, placement, size)[..., None]
        image += coverage * (np.asarray(COLOURS[obj.colour], float) - image)
    return np.rint(image).astype(np.uint8)


def _coverage(obj: SceneObject, placement: Placement, size: int) -> np.ndarray:
    """The fraction of each pixel the object covers: [size, size] float in [0, 1]."""
    return _polygon_coverage(outline(obj.shape, placement.radius) + _centre(obj, placement), size)


def _preposition(position: str) -> str:
    if position == "centre":
        return "in"
    return "at" if position.startswith(("top", "bottom")) else "on"


def _phrase(obj: SceneObject) -> str:
    article = "an" if obj.colour[0] in "aeiou" else "a"
    return f"{article} {obj.colour} {obj.shape} {_preposition(obj.position)} the {obj.position}"


def _join(phrases: list[str]) -> str:
    """'A', 'A and B', 'A, B and C'."""
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(scene: Scene) -> str:
    """The scene's objects in the order they were sampled: "a red circle at the top left, an
    orange square on the left and a yellow star in the centre"."""
    if not scene.objects:
        raise ValueError("a scene without objects has no caption")
    return _join([_phrase(obj) for obj in scene.objects])


def caption_without_places(scene: Scene) -> str:
    """The scene's objects without their places: "a red circle, an orange square and a yellow star"
    (what a live page's user types when a control image says where)."""
    return _join([_phrase(obj).split(f" {_preposition(obj.position)} the ")[0] for obj in scene.objects])


def moved_to(scene: Scene, positions: Sequence[str]) -> Scene:
    """The scene with its objects (in order) in `positions`, each keeping its placement in its cell."""
    return dataclasses.replace(scene, objects=tuple(dataclasses.replace(obj, position=position)
                                                    for obj, position in zip(scene.objects, positions, strict=True)))


_PHRASE = re.compile(rf"an? ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) (?:at|on|in) the ({'|'.join(POSITIONS)})")


def parse_caption(text: str) -> tuple[SceneObject, ...]:
    """The objects a caption names; the inverse of `caption`. Raises ValueError naming the part
    of the text that is not a caption."""
    phrases = re.split(r", | and ", text)
    objects = []
    for phrase in phrases:
        match = _PHRASE.fullmatch(phrase)
        if match is None:
            raise ValueError(
                f"cannot read {phrase!r} in {text!r}: expected 'a(n) <colour> <shape> <at|on|in> the <position>' "
                f"with a colour from {tuple(COLOURS)}, a shape from {SHAPES}, a position from {POSITIONS}"
            )
        obj = SceneObject(*match.groups())
        # The grammar above accepts any article and preposition; each object has exactly one phrase.
        if _phrase(obj) != phrase:
            raise ValueError(f"in {text!r}: {phrase!r} should read {_phrase(obj)!r}")
        objects.append(obj)
    if _join(phrases) != text:
        raise ValueError(f"in {text!r}: objects are joined as 'A', 'A and B' or 'A, B and C'")
    return tuple(objects)


# Every word of every caption, with the comma as a word of its own: those of every phrase, and
# the words that join phrases.
VOCABULARY = tuple(sorted({
    *(
        word
        for colour, shape, position in itertools.product(COLOURS, SHAPES, POSITIONS)
        for word in _phrase(SceneObject(colour, shape, position)).split()
    ),
    "and", ",",
}))


def make_batch(seed: int, count: int, size: int) -> tuple[np.ndarray, list[str]]:
    """`count` random scenes from `seed`: images [count, size, size, 3] uint8 and their captions.
    The same seed gives the same batch."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(count)]
    return np.stack([render(scene, size) for scene in scenes]), [caption(scene) for scene in scenes]


# --- Control images: where a scene's objects are, drawn as a camera sees dark objects on a light ground

# A control image is grey: each object a silhouette of a dark level, on a light background that
# runs linearly between two levels (uneven light), blurred and noisy; levels in [0, 1], 0 black.
# The shapes stay darker than the background by at least the gap between these ranges.
SILHOUETTE_LEVELS = (0.0, 0.4)
CONTROL_BACKGROUND_LEVELS = (0.55, 1.0)
MAX_CONTROL_GRADIENT = 0.15  # the most the background's level changes across the image
MAX_CONTROL_BLUR = 0.006  # the Gaussian blur's standard deviation, a fraction of the side: 1.5 pixels at 256
MAX_CONTROL_NOISE = 0.04  # the standard deviation of the noise added to each pixel
# The share of objects drawn as a rough blob of about their extent instead of their outline, so
# that the caption, not the control, decides the shape. A blob is an ellipse whose axes are the
# shape's extent times 1 +- BLOB_JITTER, its radius rippled by two harmonics of up to BLOB_RIPPLE each.
BLOB_FRACTION = 1 / 3
BLOB_JITTER = 0.08
BLOB_RIPPLE = 0.04
BLOB_VERTICES = 48


@dataclasses.dataclass(frozen=True)
class ControlStyle:
    """How `control_image` draws a scene: each object's grey level, whether it is a rough blob (both
    by the object's index), the background's levels at its two ends (top to bottom if `vertical`,
    else left to right), the blur's standard deviation (a fraction of the image side), the noise's,
    and the seed of the blobs' outlines and of the noise."""

    shape_levels: tuple[float, ...]
    blobs: tuple[bool, ...]
    background: tuple[float, float]
    vertical: bool
    blur: float
    noise: float
    seed: int


def sample_control_style(rng: np.random.Generator, count: int) -> ControlStyle:
    """A random style for a scene of `count` objects."""
    start = rng.uniform(*CONTROL_BACKGROUND_LEVELS)
    end = np.clip(start + rng.uniform(-MAX_CONTROL_GRADIENT, MAX_CONTROL_GRADIENT), *CONTROL_BACKGROUND_LEVELS)
    return ControlStyle(
        shape_levels=tuple(float(v) for v in rng.uniform(*SILHOUETTE_LEVELS, size=count)),
        blobs=tuple(bool(b) for b in rng.uniform(size=count) < BLOB_FRACTION),
        background=(float(start), float(end)),
        vertical=bool(rng.integers(2)),
        blur=float(rng.uniform(0, MAX_CONTROL_BLUR)),
        noise=float(rng.uniform(0, MAX_CONTROL_NOISE)),
        seed=int(rng.integers(2**31)),
    )


def blob_outline(shape: str, radius: float, rng: np.random.Generator) -> np.ndarray:
    """A rough blob over a shape's extent, as `outline` (centred as the shape is drawn): [V, 2]."""
    vertices = outline(shape, radius)
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    axes = (high - low) / 2 * rng.uniform(1 - BLOB_JITTER, 1 + BLOB_JITTER, size=2)
    angles = 2 * np.pi * np.arange(BLOB_VERTICES) / BLOB_VERTICES
    ripple = sum(rng.uniform(0, BLOB_RIPPLE) * np.cos(k * angles + rng.uniform(0, 2 * np.pi)) for k in (2, 3))
    return (low + high) / 2 + (1 + ripple)[:, None] * axes * np.stack([np.cos(angles), np.sin(angles)], axis=-1)


def control_image(scene: Scene, size: int, style: ControlStyle) -> np.ndarray:
    """The scene's objects as dark silhouettes on a light background, as `style` says: a grey RGB
    image [size, size, 3] float32 in [0, 1] (three equal channels), what a camera frame of dark
    objects becomes after a conversion to grey."""
    if not len(style.shape_levels) == len(style.blobs) == len(scene.objects):
        raise ValueError(f"a style for {len(style.blobs)} objects cannot draw a scene of {len(scene.objects)}")
    rng = np.random.default_rng(style.seed)
    ramp = np.linspace(*style.background, size)
    image = np.broadcast_to(ramp[:, None] if style.vertical else ramp[None, :], (size, size)).copy()
    for obj, placement, level, blob in zip(scene.objects, scene.placements, style.shape_levels, style.blobs):
        if blob:
            vertices = blob_outline(obj.shape, placement.radius, rng)
            coverage = _polygon_coverage(vertices + _centre(obj, placement), size)
        else:
            coverage = _coverage(obj, placement, size)
        image += coverage * (level - image)
    image = _gaussian_blur(image, style.blur * size) + rng.normal(0, style.noise, (size, size))
    return np.repeat(np.clip(image, 0, 1).astype(np.float32)[..., None], 3, axis=-1)


def _centre(obj: SceneObject, placement: Placement) -> np.ndarray:
    """Where an object is drawn, (x, y) as fractions of the image side."""
    row, column = cell(obj.position)
    return np.array([(column + 0.5) * CELL + placement.dx, (row + 0.5) * CELL + placement.dy])


def _polygon_coverage(vertices: np.ndarray, size: int) -> np.ndarray:
    """The fraction of each pixel a polygon (vertices [V, 2] as fractions of the side) covers: [size, size]."""
    scale = size * SUPERSAMPLING
    mask = Image.new("L", (scale, scale))
    ImageDraw.Draw(mask).polygon([tuple(vertex) for vertex in vertices * scale], fill=255)
    return np.asarray(mask.reduce(SUPERSAMPLING), float) / 255


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """A [H, W] image blurred by a Gaussian of `sigma` pixels (three of them either side), its
    border extended."""
    reach = math.ceil(3 * sigma)
    if reach == 0:
        return image
    weights = np.exp(-0.5 * (np.arange(-reach, reach + 1) / sigma) ** 2)
    weights /= weights.sum()
    for axis in (0, 1):
        padded = np.pad(image, [(reach, reach) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
        length = image.shape[axis]
        image = sum(w * np.take(padded, np.arange(i, i + length), axis=axis) for i, w in enumerate(weights))
    return image
