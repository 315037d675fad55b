"""Where the views of a large canvas are predicted (`jaxfuse.sampling.tiled`): all on one device,
or spread along the mesh axis `VIEWS`, each device its share of the views, the canvas replicated,
and one `psum` of the merge's two sums a step joining them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh

from jaxfuse.parallel.mesh import axis_mesh

VIEWS = "views"  # mesh axis over which the views of a canvas are spread


@dataclasses.dataclass(frozen=True)
class Views:
    spread: bool = False  # the views spread along VIEWS (inside shard_map)

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

    def join(self, sums: Any) -> Any:
        """Every device's sums added (the same on all of them)."""
        return lax.psum(sums, VIEWS) if self.spread else sums


def views_mesh(count: int, devices: list | None = None) -> Mesh:
    """A one-axis mesh of `count` devices along VIEWS."""
    return axis_mesh(VIEWS, count, devices)
