"""The VAE's decode and encode in tiles, equal to the untiled passes, at image sizes whose whole
activations do not fit a device.

    image = tiled_decode(vae, params, latents, tile=64)                     # numpy [B, 3, 8h, 8w]
    mean, logvar = tiled_encode(vae, params, images, tile=64, mesh=views_mesh(4))

`tile` counts latent pixels in both directions (64: 512 image pixels). The latent is cut into
tile x tile squares in raster order (tiles need not divide it: the last row and column may
overhang the image), and every activation of the network into the same squares scaled to its
resolution, so a tile owns the same part of the image at every layer.

Exact, not approximate. The network (`vae.encoder_blocks`, `vae.decoder_blocks`: the one
description the Flax modules follow too) runs as stages cut at its group norms, one pass over
every tile per stage: a ResNet is two stages, the mid-block attention two (every token's keys and
values, then each tile's queries over them), a convolution, an up- or a downsampling one. In a
stage a tile reads its inputs cropped with the halo its convolution needs (a row and a column on
each side; after, for the VAE's stride-2 convolution), positions outside the image acting as the
convolution's zero padding; normalises with the whole image's statistics, gathered in the stage
before from every tile's own pixels (each tile's mean and variance in float32 by two passes, as
the untiled group norm, pooled exactly on the host); computes up to the next group norm; and gives
back its own pixels and their statistics. Residual connections read the stage before's
activations. The result differs from the untiled pass by float rounding only: about 1e-6 of the
output's range, as far from a float64 decode as the untiled float32 one.

Memory. The whole activations between stages live on the host (numpy, in the compute dtype): at
most three at once (a ResNet's input, its hidden activation and its output), each with a border
of zeros and the last tiles' overhang. A device holds the VAE's parameters and at most two rounds
of tiles in flight (one computing, one coming back): their input crops, outputs and temporaries,
bounded by the tile and not by the image. Not bounded by the tile: the latents on their way in
and the encoder's output on its way out (latent resolution, a few channels), and the attention
stages, which hold every token's keys and values (two [B, h w, C], at latent resolution) and at
most `LOGITS_BYTES` of logits (on CPU; a fused kernel stores none). benchmarks/vae_memory.py
measures it for SDXL's VAE in float32 with 64-pixel tiles: 1.7 GB per device up to 2048², where
the untiled decode needs 35 GB (11 GB without its attention's logits); at 8192² 9.1 GB, all but
1.7 of it the attention's keys, values and logits, against 173 GB untiled without the logits,
with 138 GB on the host. The price is transfers: every stage sends its inputs to the devices and
its output back, so on an accelerator a tiled pass is bound by host-device bandwidth; use it where
the untiled pass does not fit.

Over devices (`mesh`, of this process's devices, any axes): a round runs one tile on each device.
The tiles of a round are independent and their statistics come back to the host with their
pixels, so no collective runs (`jaxfuse.parallel.tiles`).

Legend: B batch, h/w latent rows/columns, th/tw a tile's, s pixels per latent pixel of an
activation (1 at the latent, f = `cfg.downsample_factor` at the image), C channels, G groups,
T tiles, N tiles per round.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh

from jaxfuse.models.layers import Conv2d, Dtype, attention, normalize_groups, per_channel, upsample_nearest
from jaxfuse.models.vae import (
    HEAD_NAMES,
    NORM_EPS,
    AutoencoderKL,
    Block,
    BlockKind,
    check_nchw,
    decoder_blocks,
    encoder_blocks,
)
from jaxfuse.parallel.tiles import check_local, per_tile, place, round_size

# Zero rows and columns kept around a whole activation: the largest halo (3x3 convolutions).
MARGIN = 1
Halo = tuple[int, int]  # rows (and columns) of context before and after a tile
AROUND: Halo = (1, 1)  # a 3x3 convolution padded on every side
AFTER: Halo = (0, 1)  # the VAE's stride-2 convolution, padded on the bottom and right only
OWN: Halo = (0, 0)  # pointwise: residuals, attention
# The most float32 attention logits a tile computes at once (1024² with 64-pixel tiles: all of them
# in one go; 8192²: one row of queries at a time). A fused kernel (GPU) stores none.
LOGITS_BYTES = 2**28


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


@dataclasses.dataclass(frozen=True)
class TileOps:
    """The layers as one tile computes them, from the parameters of `models.layers`' modules."""

    groups: int
    dtype: Dtype

    def norm(self, p: Any, stats: Any, x: jax.Array) -> jax.Array:
        """`GroupNorm` with the whole image's statistics (mean, variance [B, G])."""
        return normalize_groups(x, *stats, NORM_EPS, p["scale"], p["bias"]).astype(self.dtype)

    def conv_input(self, p: Any, stats: Any, x: jax.Array, bounds: jax.Array) -> jax.Array:
        """Group norm and SiLU, zero outside the image: where the untiled convolution that
        follows pads with zeros."""
        return jnp.where(inside(x.shape, bounds), nn.silu(self.norm(p, stats, x)), 0)

    def conv(self, p: Any, x: jax.Array, stride: int = 1) -> jax.Array:
        """`Conv2d` without padding: the crop brings its context. [B, R, C, Ch] -> [B, R', C', O]"""
        k, _, _, features = p["kernel"].shape
        layer = Conv2d(features, k, stride, ((0, 0), (0, 0)), self.dtype)
        return layer.apply({"params": p}, x)

    def dense(self, p: Any, x: jax.Array) -> jax.Array:
        return nn.Dense(p["kernel"].shape[-1], dtype=self.dtype).apply({"params": p}, x)


# What one tile computes in a stage: fn(ops, params, stats of crops[0], shared, crops, bounds of
# crops[0]) -> the tile's output [B, s th, s tw, C].

def plain_conv(ops: TileOps, p: Any, stats: Any, shared: Any, crops: tuple, bounds: jax.Array) -> jax.Array:
    """conv_in: a crop with `AROUND` halo, zeros outside the image already."""
    return ops.conv(p, crops[0])


def norm_conv(ops: TileOps, p: Any, stats: Any, shared: Any, crops: tuple, bounds: jax.Array) -> jax.Array:
    """Group norm, SiLU, 3x3 convolution (`p`: norm, conv): a ResNet's first half, the head."""
    return ops.conv(p["conv"], ops.conv_input(p["norm"], stats, crops[0], bounds))


def norm_conv_add(ops: TileOps, p: Any, stats: Any, shared: Any, crops: tuple, bounds: jax.Array) -> jax.Array:
    """A ResNet's second half: group norm, SiLU, 3x3 convolution of the hidden crop, plus the
    block's input (crops[1], through the 1x1 `shortcut` when `p` has one)."""
    x = crops[1] if "shortcut" not in p else ops.conv(p["shortcut"], crops[1])
    return x + norm_conv(ops, p, stats, shared, crops, bounds)


def keys_values(ops: TileOps, p: Any, stats: Any, shared: Any, crops: tuple, bounds: jax.Array) -> jax.Array:
    """The attention block's keys and values of a tile's tokens, side by side [B, th, tw, 2 C]."""
    y = ops.norm(p["group_norm"], stats, crops[0])
    return jnp.concatenate([ops.dense(p["to_k"], y), ops.dense(p["to_v"], y)], axis=-1)


def attend(ops: TileOps, p: Any, stats: Any, kv: tuple, crops: tuple, bounds: jax.Array) -> jax.Array:
    """The attention block on a tile: its tokens' queries over every token's keys and values
    (`kv`, two [B, h w, C]), plus the input, as `vae.AttentionBlock`; the queries a few rows at a
    time (`query_rows`), one chunk's logits in memory at once."""
    x = crops[0]
    b, rows, cols, c = x.shape
    k, v = kv
    step = query_rows(rows, cols, k.shape[1])

    def chunk(y: jax.Array) -> jax.Array:  # [B, step, cols, C] normalised rows -> their attention output
        q = ops.dense(p["to_q"], y.reshape(b, step * cols, c))
        return ops.dense(p["to_out_0"], attention(q, k, v, num_heads=1)).reshape(y.shape)

    y = ops.norm(p["group_norm"], stats, x).reshape(b, rows // step, step, cols, c)
    return x + jnp.moveaxis(lax.map(chunk, jnp.moveaxis(y, 1, 0)), 0, 1).reshape(x.shape)


def query_rows(rows: int, cols: int, keys: int) -> int:
    """The most of a tile's `rows` (a divisor of them, at least one) whose queries' float32
    logits over `keys` keys fit `LOGITS_BYTES`."""
    fits = [d for d in range(1, rows + 1) if rows % d == 0 and d * cols * keys * 4 <= LOGITS_BYTES]
    return max(fits, default=1)


def upsampled_conv(ops: TileOps, p: Any, stats: Any, shared: Any, crops: tuple, bounds: jax.Array) -> jax.Array:
    """Nearest 2x, then 3x3 convolution: an `AROUND` crop doubles to two context rows a side,
    of which the convolution needs one."""
    return ops.conv(p, upsample_nearest(crops[0])[:, 1:-1, 1:-1])


def strided_conv(ops: TileOps, p: Any, stats: Any, shared: Any, crops: tuple, bounds: jax.Array) -> jax.Array:
    """The stride-2 3x3 convolution of an `AFTER` crop."""
    return ops.conv(p, crops[0], stride=2)


@functools.cache
def stage_program(fn: Callable, ops: TileOps, moments: bool, mesh: Mesh | None) -> Callable:
    """`fn` as a program over a round of tiles: (params, stats, shared, crops, bounds, own) -> the
    tiles' outputs [N, B, s th, s tw, C] and, with `moments`, their statistics [N, B, 2, G]."""

    def one(params, stats, shared, crops, bounds, own):
        y = fn(ops, params, stats, shared, crops, bounds)
        return (y, own_moments(y, own, ops.groups)) if moments else y

    return per_tile(one, 3, mesh)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One pass over every tile: `fn` on its `inputs`, each cropped with its halo (a group norm
    normalises the first); the output at `scale`; `moments`: a group norm reads the output;
    `shared`: the whole keys and values `attend` reads."""

    fn: Callable
    params: Any
    inputs: tuple[tuple[Whole, Halo], ...]
    scale: int
    moments: bool = True
    shared: Whole | None = None


def run_block(block: Block, p: Any, x: Whole, run: Callable[[Stage], Whole]) -> Whole:
    """`block` (its parameters `p`) on the whole activation `x`, stage by stage through `run`."""
    if block.kind == BlockKind.CONV:
        return run(Stage(plain_conv, p, ((x, AROUND),), x.scale))
    if block.kind == BlockKind.RESNET:
        hidden = run(Stage(norm_conv, {"norm": p["norm1"], "conv": p["conv1"]}, ((x, AROUND),), x.scale))
        second = {"norm": p["norm2"], "conv": p["conv2"]}
        if "conv_shortcut" in p:
            second["shortcut"] = p["conv_shortcut"]
        return run(Stage(norm_conv_add, second, ((hidden, AROUND), (x, OWN)), x.scale))
    if block.kind == BlockKind.ATTENTION:
        kv = run(Stage(keys_values, p, ((x, OWN),), x.scale, moments=False))
        return run(Stage(attend, p, ((x, OWN),), x.scale, shared=kv))
    if block.kind == BlockKind.DOWNSAMPLE:
        return run(Stage(strided_conv, p["conv"], ((x, AFTER),), x.scale // 2))
    if block.kind == BlockKind.UPSAMPLE:
        return run(Stage(upsampled_conv, p["conv"], ((x, AROUND),), 2 * x.scale))
    norm, conv = HEAD_NAMES
    return run(Stage(norm_conv, {"norm": p[norm], "conv": p[conv]}, ((x, AROUND),), x.scale, moments=False))


def run_blocks(blocks: tuple[Block, ...], params: Any, x: Whole, run: Callable[[Stage], Whole]) -> Whole:
    """The encoder's or decoder's `blocks` with its parameters."""
    for block in blocks:
        p = params
        for name in block.path:
            p = p[name]
        x = run_block(block, p, x, run)
    return x


def tokens(kv: Whole, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Keys and values side by side -> every token's keys and its values, [B, h w, C] each in
    raster order, apart (a device would copy them apart)."""
    image = kv.image(grid)
    tokens = image.reshape(image.shape[0], -1, image.shape[-1])
    return tuple(np.ascontiguousarray(half) for half in np.split(tokens, 2, axis=-1))


@dataclasses.dataclass(frozen=True)
class HostRun:
    """Runs a stage: rounds of tiles on the device(s), the whole activations on the host; at most
    two rounds in flight, so that one computes while the other's results come back."""

    grid: Grid
    ops: TileOps
    mesh: Mesh | None

    def __call__(self, stage: Stage) -> Whole:
        program = stage_program(stage.fn, self.ops, stage.moments, self.mesh)
        shared = None if stage.shared is None else place(tokens(stage.shared, self.grid), self.mesh, stacked=False)
        fixed = (stage.params, stage.inputs[0][0].stats, shared)
        whole, moments, pending = None, [], collections.deque()
        for tiles, real in self.rounds():
            pending.append((real, program(*fixed, *place(self.tile_arguments(stage, tiles), self.mesh, True))))
            if len(pending) == 2:
                whole = self.collect(stage, whole, moments, *pending.popleft())
        while pending:
            whole = self.collect(stage, whole, moments, *pending.popleft())
        if stage.moments:
            pixels = np.asarray([np.prod(self.grid.own(c, 1)) for c in self.grid.corners], np.float64)
            whole.stats = pool_moments(np.stack(moments), pixels)
        return whole

    def rounds(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each round's tile indices, and those of them that count: the last round is filled up
        with copies of tile 0, computed and left out."""
        n, count = round_size(self.mesh), len(self.grid.corners)
        order = np.concatenate([np.arange(count), np.zeros(-count % n, int)])
        return [(order[i:i + n], order[i:min(i + n, count)]) for i in range(0, len(order), n)]

    def tile_arguments(self, stage: Stage, tiles: np.ndarray) -> tuple:
        """(crops of each input [N, B, s th + halo, s tw + halo, C], bounds [N, 2, 2], own [N, 2])"""
        corners = self.grid.corners[tiles]
        crops = tuple(np.stack([x.crop(self.grid, c, halo) for c in corners]) for x, halo in stage.inputs)
        x, halo = stage.inputs[0]
        bounds = np.stack([self.grid.bounds(c, x.scale, halo) for c in corners])
        own = np.stack([self.grid.own(c, stage.scale) for c in corners]).astype(np.int32)
        return crops, bounds, own

    def collect(self, stage: Stage, whole: Whole | None, moments: list, real: np.ndarray, result: Any) -> Whole:
        """Writes a round's tiles that count into the output (made at the first round) and adds
        their statistics to `moments`."""
        y, tile_moments = (np.asarray(r) for r in result) if stage.moments else (np.asarray(result), None)
        if whole is None:
            whole = Whole(np.zeros((y.shape[1], *self.grid.extent(stage.scale), y.shape[-1]), y.dtype), stage.scale)
        for k, t in enumerate(real):
            whole.write(self.grid, self.grid.corners[t], y[k])
            if stage.moments:
                moments.append(tile_moments[k])
        return whole


@dataclasses.dataclass(frozen=True)
class PlannedStage:
    """A stage of a plan: the program a round runs, its abstract arguments (params, stats,
    shared, crops, bounds, own), and the bytes of the whole activations the host holds while it
    runs (the stage's inputs and output)."""

    name: str
    program: Callable
    args: tuple
    host_bytes: int


def nbytes(tree: Any) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass
class PlanRun:
    """Runs no stage: lists each one in `stages` with abstract arguments (`jax.ShapeDtypeStruct`)
    and returns its output as an abstract whole activation."""

    grid: Grid
    ops: TileOps
    mesh: Mesh | None
    stages: list[PlannedStage] = dataclasses.field(default_factory=list)

    def __call__(self, stage: Stage) -> Whole:
        n = round_size(self.mesh)
        x, _ = stage.inputs[0]
        shared = None
        if stage.shared is not None:
            b, *_, c = stage.shared.data.shape
            half = jax.ShapeDtypeStruct((b, self.grid.size[0] * self.grid.size[1], c // 2), stage.shared.data.dtype)
            shared = (half, half)
        crops = tuple(jax.ShapeDtypeStruct((n, *w.crop_shape(self.grid, h)), w.data.dtype) for w, h in stage.inputs)
        args = (stage.params, x.stats, shared, crops,
                jax.ShapeDtypeStruct((n, 2, 2), jnp.int32), jax.ShapeDtypeStruct((n, 2), jnp.int32))
        program = stage_program(stage.fn, self.ops, stage.moments, self.mesh)
        result = jax.eval_shape(program, *args)
        y = result[0] if stage.moments else result
        stats = jax.ShapeDtypeStruct((y.shape[1], self.ops.groups), jnp.float32)
        out = Whole(jax.ShapeDtypeStruct((y.shape[1], *self.grid.extent(stage.scale), y.shape[-1]), y.dtype),
                    stage.scale, (stats, stats) if stage.moments else None)
        wholes = {id(w.data): w.data for w, _ in stage.inputs} | {id(out.data): out.data}
        if stage.shared is not None:
            wholes[id(stage.shared.data)] = stage.shared.data
        self.stages.append(PlannedStage(stage.fn.__name__, program, args, nbytes(list(wholes.values()))))
        return out


def check_tile(tile: int) -> None:
    """Raises one clear ValueError unless `tile` is a positive whole number of latent pixels."""
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 1:
        raise ValueError(f"tile must be a positive whole number of latent pixels (64 is 512 image pixels), "
                         f"got {tile!r}.")


def tiled_decode(vae: AutoencoderKL, params: Any, latents: Any, tile: int, mesh: Mesh | None = None) -> np.ndarray:
    """`vae.decode` in tiles of `tile` x `tile` latent pixels (see the module docstring):
    [B, L, h, w] -> [B, C_out, f h, f w], a numpy array on the host, where it was assembled.
    `mesh`: one tile on each of its devices at a time."""
    check_tile(tile)
    check_nchw(latents, vae.cfg.latent_channels, "latents")
    check_local(mesh)
    grid = Grid.of(latents.shape[2:], tile)
    z = vae.apply({"params": params}, jnp.asarray(latents), method=AutoencoderKL.decoder_input)
    x = Whole.of(grid, np.asarray(z), 1)
    run = HostRun(grid, TileOps(vae.cfg.norm_num_groups, vae.dtype), mesh)
    out = run_blocks(decoder_blocks(vae.cfg), place(params["decoder"], mesh, False), x, run)
    return np.transpose(out.image(grid), (0, 3, 1, 2))


def tiled_encode(vae: AutoencoderKL, params: Any, image: Any, tile: int,
                 mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array]:
    """`vae.encode` in tiles of `tile` x `tile` latent pixels, `f tile` image pixels (see the
    module docstring): [B, C_in, H, W] with H and W multiples of f -> the latent distribution's
    mean and log-variance [B, L, H / f, W / f]. `mesh`: one tile on each of its devices at a time."""
    cfg = vae.cfg
    f = cfg.downsample_factor
    check_tile(tile)
    check_nchw(image, cfg.in_channels, "image")
    if image.shape[2] % f or image.shape[3] % f:
        raise ValueError(f"a tiled encode needs image sides that are multiples of {f} (the VAE's downsampling), got "
                         f"{image.shape[2]} x {image.shape[3]}; crop or pad the image to "
                         f"{image.shape[2] // f * f} x {image.shape[3] // f * f} or "
                         f"{-(-image.shape[2] // f) * f} x {-(-image.shape[3] // f) * f}.")
    check_local(mesh)
    grid = Grid.of((image.shape[2] // f, image.shape[3] // f), tile)
    # encoder_input's transpose and cast, here on the host: the whole image never goes to a device.
    x = Whole.of(grid, np.transpose(np.asarray(image), (0, 2, 3, 1)).astype(vae.dtype), f)
    run = HostRun(grid, TileOps(cfg.norm_num_groups, vae.dtype), mesh)
    h = run_blocks(encoder_blocks(cfg), place(params["encoder"], mesh, False), x, run)
    return vae.apply({"params": params}, jnp.asarray(h.image(grid)), method=AutoencoderKL.latent_distribution)


def plan_decode(vae: AutoencoderKL, params: Any, latents: jax.ShapeDtypeStruct, tile: int,
                mesh: Mesh | None = None) -> list[PlannedStage]:
    """The stages `tiled_decode` runs, with their programs and abstract arguments, to compile and
    measure without computing; `params` may be abstract (`vae.abstract_params`)."""
    check_tile(tile)
    grid = Grid.of(latents.shape[2:], tile)
    z = jax.eval_shape(lambda p, x: vae.apply({"params": p}, x, method=AutoencoderKL.decoder_input), params, latents)
    run = PlanRun(grid, TileOps(vae.cfg.norm_num_groups, vae.dtype), mesh)
    whole = jax.ShapeDtypeStruct((z.shape[0], *grid.extent(1), z.shape[-1]), z.dtype)
    run_blocks(decoder_blocks(vae.cfg), params["decoder"], Whole(whole, 1), run)
    return run.stages
