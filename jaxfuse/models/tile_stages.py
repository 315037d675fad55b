"""A stage of a tiled VAE pass (`jaxfuse.models.vae_tiled`) and what runs it over every tile.

`Stage`: one function on every tile's crops; `TileOps`: the layers as one tile computes them;
`stage_program`: that function over a round of tiles, as one program; `HostRun`: runs a stage,
rounds of tiles on the device(s) and the whole activations on the host; `PlanRun`: runs none,
listing each stage's program and abstract arguments (`PlannedStage`) to compile and measure.

Legend: as `jaxfuse.models.vae_tiled`'s (N tiles per round).
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
from jax.sharding import Mesh

from jaxfuse.models.layers import Conv2d, Dtype, normalize_groups
from jaxfuse.models.tile_layout import Grid, Halo, Whole, inside, own_moments, pool_moments
from jaxfuse.models.vae import NORM_EPS
from jaxfuse.parallel.tiles import per_tile, place, round_size


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


def tokens(kv: Whole, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Keys and values side by side -> every token's keys and its values, [B, h w, C] each in
    raster order, apart (a device would copy them apart)."""
    image = kv.image(grid)
    tokens = image.reshape(image.shape[0], -1, image.shape[-1])
    return tuple(np.ascontiguousarray(half) for half in np.split(tokens, 2, axis=-1))


@dataclasses.dataclass(frozen=True)
class HostRun:
    """Runs a stage: rounds of tiles on the device(s), the whole activations on the host; at most
    two rounds in flight, so that one computes while the other's results come back. `run`: where
    the stages' programs compile, `run(name, program, *args)` (a `runtime.programs` runner, which
    keeps and measures them); None: each stage's own jitted program."""

    grid: Grid
    ops: TileOps
    mesh: Mesh | None
    run: Callable | None = None

    def __call__(self, stage: Stage) -> Whole:
        program = stage_program(stage.fn, self.ops, stage.moments, self.mesh)
        if self.run is not None:
            program = functools.partial(self.run, ("vae_tiles", stage.fn, self.ops, stage.moments, self.mesh), program)
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
