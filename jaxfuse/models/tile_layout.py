"""Where a tile of a tiled VAE pass (`jaxfuse.models.vae_tiled`) lies at every resolution, and
the whole image's group statistics from its tiles'.

`Grid`: the tiles of a latent, each one's crop and its pixels inside the image at any scale;
`Whole`: a whole activation on the host with its border of zeros, which tiles are cropped from
and written into; `own_moments` (on a device) and `pool_moments` (on the host): a tile's group
statistics over its own pixels, and the whole image's pooled exactly from them.

Legend: as `jaxfuse.models.vae_tiled`'s (B batch, h/w latent rows/columns, th/tw a tile's, s pixels
per latent pixel of an activation, C channels, G groups, T tiles).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxfuse.models.layers import per_channel

# Zero rows and columns kept around a whole activation: the largest halo (3x3 convolutions).
MARGIN = 1
Halo = tuple[int, int]  # rows (and columns) of context before and after a tile
AROUND: Halo = (1, 1)  # a 3x3 convolution padded on every side
AFTER: Halo = (0, 1)  # the VAE's stride-2 convolution, padded on the bottom and right only
OWN: Halo = (0, 0)  # pointwise: residuals, attention


@dataclasses.dataclass(frozen=True)
class Grid:
    """The tiles of an h x w latent: th x tw squares in raster order, the last row and column
    possibly overhanging the latent."""

    size: tuple[int, int]  # (h, w)
    tile: tuple[int, int]  # (th, tw)

    @classmethod
    def of(cls, size: tuple[int, int], tile: int) -> Grid:
        """A tile larger than the latent shrinks to it: one tile along that side, no overhang."""
        return cls(size, (min(tile, size[0]), min(tile, size[1])))

    @property
    def per_side(self) -> tuple[int, int]:
        """Tiles along the rows and along the columns."""
        return tuple(-(-n // t) for n, t in zip(self.size, self.tile))

    @functools.cached_property
    def corners(self) -> np.ndarray:
        """[T, 2] each tile's (top, left) latent pixel."""
        rows, cols = self.per_side
        th, tw = self.tile
        return np.asarray([(i * th, j * tw) for i in range(rows) for j in range(cols)])

    def own(self, corner: np.ndarray, scale: int) -> np.ndarray:
        """[2] rows and columns of a tile's pixels at `scale` that lie inside the image."""
        return scale * np.minimum(self.tile, np.subtract(self.size, corner))

    def extent(self, scale: int) -> tuple[int, int]:
        """Rows and columns of a whole activation at `scale` with its border and overhang."""
        return tuple(scale * n * t + 2 * MARGIN for n, t in zip(self.per_side, self.tile))

    def origin(self, corner: np.ndarray, scale: int) -> np.ndarray:
        """[2] where a tile's first row and column lie in a whole activation with its border."""
        return MARGIN + scale * np.asarray(corner)

    def crop_box(self, corner: np.ndarray, scale: int, halo: Halo) -> tuple[slice, slice]:
        """The rows and columns of a whole activation (border included) that a tile reads."""
        before, after = halo
        return tuple(slice(o - before, o + scale * t + after) for o, t in zip(self.origin(corner, scale), self.tile))

    def bounds(self, corner: np.ndarray, scale: int, halo: Halo) -> np.ndarray:
        """[2, 2] int32: the rows [lo, hi) and columns of a tile's crop that lie inside the image."""
        before = halo[0]
        return np.asarray([(before - scale * c, before + scale * (n - c)) for c, n in zip(corner, self.size)],
                          np.int32)


@dataclasses.dataclass
class Whole:
    """A whole activation [B, s h, s w, C] at `scale`, kept with a border of `MARGIN` zeros and
    the last tiles' overhang (zeros too): [B, extent rows, extent columns, C]. `stats`: its
    group statistics (mean, variance [B, G]) when a group norm reads it. `data` is a
    `jax.ShapeDtypeStruct` in a plan (`plan_decode`)."""

    data: Any
    scale: int
    stats: Any = None

    @classmethod
    def of(cls, grid: Grid, x: np.ndarray, scale: int) -> Whole:
        """[B, s h, s w, C] -> the whole activation with its border."""
        data = np.zeros((x.shape[0], *grid.extent(scale), x.shape[-1]), x.dtype)
        data[:, MARGIN:MARGIN + x.shape[1], MARGIN:MARGIN + x.shape[2]] = x
        return cls(data, scale)

    def image(self, grid: Grid) -> np.ndarray:
        """[B, s h, s w, C] without the border."""
        rows, cols = (self.scale * n for n in grid.size)
        return self.data[:, MARGIN:MARGIN + rows, MARGIN:MARGIN + cols]

    def crop_shape(self, grid: Grid, halo: Halo) -> tuple[int, ...]:
        """[B, s th + halo, s tw + halo, C]"""
        return (self.data.shape[0], *(self.scale * t + sum(halo) for t in grid.tile), self.data.shape[-1])

    def crop(self, grid: Grid, corner: np.ndarray, halo: Halo) -> np.ndarray:
        return self.data[(slice(None), *grid.crop_box(corner, self.scale, halo))]

    def write(self, grid: Grid, corner: np.ndarray, tile: np.ndarray) -> None:
        """Sets a tile's own pixels inside the image from its output [B, s th, s tw, C]."""
        (top, left), (rows, cols) = grid.origin(corner, self.scale), grid.own(corner, self.scale)
        self.data[:, top:top + rows, left:left + cols] = tile[:, :rows, :cols]


def inside(shape: tuple[int, ...], bounds: jax.Array) -> jax.Array:
    """[B, R, C, Ch] shape, [2, 2] rows [lo, hi) and columns -> [1, R, C, 1] bool, inside them."""
    rows, cols = (jnp.arange(n) for n in shape[1:3])
    keep = [(index >= lo) & (index < hi) for index, (lo, hi) in zip((rows, cols), bounds)]
    return (keep[0][:, None] & keep[1][None, :])[None, :, :, None]


def own_moments(y: jax.Array, own: jax.Array, groups: int) -> jax.Array:
    """[B, R, C, Ch] a tile's output, [2] its rows and columns inside the image -> each group's
    (mean, variance) over them [B, 2, G] in float32: two passes, as `layers.group_moments`."""
    b, _, _, c = y.shape
    keep = inside(y.shape, jnp.stack([jnp.zeros_like(own), own], axis=1))
    count = own[0] * own[1] * (c // groups)

    def group_mean(v: jax.Array) -> jax.Array:  # [B, R, C, Ch] -> [B, G]
        return jnp.where(keep, v, 0).sum(axis=(1, 2)).reshape(b, groups, -1).sum(axis=-1) / count

    y = y.astype(jnp.float32)
    mean = group_mean(y)
    var = group_mean(jnp.square(y - per_channel(mean, c)[:, None, None, :]))
    return jnp.stack([mean, var], axis=1)


def pool_moments(moments: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[T, B, 2, G] the tiles' (mean, variance), [T] their pixel counts -> the whole image's mean
    and variance [B, G] in float32: Chan's combination of unequal parts (the mean of the variances
    plus the variance of the means, each weighted by its count), in float64."""
    m = moments.astype(np.float64)
    weights = (counts / counts.sum())[:, None, None]
    mean = (weights * m[:, :, 0]).sum(axis=0)
    var = (weights * (m[:, :, 1] + np.square(m[:, :, 0] - mean))).sum(axis=0)
    return mean.astype(np.float32), var.astype(np.float32)
