"""Where the views of a large canvas are predicted (`jaxfuse.sampling.tiled`): all on one device,
or spread along the mesh axis `VIEWS`, each device its share of the views, the canvas replicated;
and each view whole, or split by rows along `PATCH` (patch parallelism inside every view). One
`psum` of the merge's two sums a step, over the axes in use, joins the devices' shares.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh

from jaxfuse.parallel.mesh import axis_mesh
from jaxfuse.parallel.patch import PATCH

VIEWS = "views"  # mesh axis over which the views of a canvas are spread


@dataclasses.dataclass(frozen=True)
class Views:
    spread: bool = False  # the views spread along VIEWS (inside shard_map)
    split: bool = False  # each view split by rows along PATCH (inside shard_map)

    def mine(self, boxes: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """[V, 2] boxes -> this device's share [S, 2] and how much each counts [S] (1, or 0 for
        the copies of the first view that pad V to a multiple of the devices)."""
        devices = lax.axis_size(VIEWS) if self.spread else 1
        share = -(-len(boxes) // devices)
        padded = np.concatenate([boxes, np.repeat(boxes[:1], share * devices - len(boxes), axis=0)])
        counts = (np.arange(len(padded)) < len(boxes)).astype(np.float32)
        if not self.spread:
            return jnp.asarray(padded), jnp.asarray(counts)
        start = lax.axis_index(VIEWS) * share
        return (lax.dynamic_slice_in_dim(jnp.asarray(padded), start, share),
                lax.dynamic_slice_in_dim(jnp.asarray(counts), start, share))

    def first_row(self, rows: int) -> jax.Array | int:
        """Where this device's rows start in a view of `rows` rows (0 when views are whole)."""
        return lax.axis_index(PATCH) * (rows // lax.axis_size(PATCH)) if self.split else 0

    def own_rows(self, x: jax.Array, axis: int) -> jax.Array:
        """A whole view's array (rows along `axis`) -> this device's rows of it."""
        if not self.split:
            return x
        rows = x.shape[axis] // lax.axis_size(PATCH)
        return lax.dynamic_slice_in_dim(x, self.first_row(x.shape[axis]), rows, axis=axis)

    def join(self, sums: Any) -> Any:
        """Every device's sums added (the same on all of them)."""
        axes = (VIEWS,) * self.spread + (PATCH,) * self.split
        return lax.psum(sums, axes) if axes else sums


def views_mesh(count: int, devices: list | None = None, patches: int = 1) -> Mesh:
    """`count` devices along VIEWS, or with `patches` > 1 a (VIEWS, PATCH) grid of count x patches."""
    if patches == 1:
        return axis_mesh(VIEWS, count, devices)
    grid = np.asarray(axis_mesh(VIEWS, count * patches, devices).devices).reshape(count, patches)
    return Mesh(grid, (VIEWS, PATCH), axis_types=(AxisType.Auto,) * 2)
