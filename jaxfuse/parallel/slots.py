"""Where a stream's slots live (`jaxfuse.sampling.stream`): all n on one device, or one per device
along the mesh axis `SLOTS`, so that the stream is a pipeline over denoising steps and each call
hands every image to the next step's device with one `ppermute`.

A device holds the rows of its slots, slot-major, f rows a slot: all n f rows on one device, f
rows (its own slot) with the slots spread.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from jaxfuse.parallel.mesh import axis_mesh

SLOTS = "slots"  # mesh axis over which a stream's slots are spread


@dataclasses.dataclass(frozen=True)
class Slots:
    count: int  # n slots
    rows: int  # f rows a slot
    spread: bool = False  # one slot per device along SLOTS (inside shard_map)

    def of_rows(self) -> jax.Array:
        """[rows held] int32: the slot of each row this device holds."""
        if self.spread:
            return jnp.full((self.rows,), lax.axis_index(SLOTS), jnp.int32)
        return jnp.repeat(jnp.arange(self.count, dtype=jnp.int32), self.rows)

    def with_first(self, x: jax.Array, first: jax.Array) -> jax.Array:
        """The rows held [r, ...] with slot 0's replaced by `first` [f, ...]."""
        held = x.shape[0] // self.rows
        is_first = (self.of_rows() == 0).reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.where(is_first, jnp.tile(first, (held,) + (1,) * (x.ndim - 1)), x)

    def to_next(self, x: jax.Array) -> jax.Array:
        """Each slot's rows [r, ...] moved to the next slot (the last slot's to slot 0)."""
        if self.spread:
            return lax.ppermute(x, SLOTS, [(i, (i + 1) % self.count) for i in range(self.count)])
        return jnp.roll(x, self.rows, axis=0)

    def from_next(self, x: jax.Array) -> jax.Array:
        """Each slot's rows [r, ...] replaced by the next slot's (the last slot's by slot 0's)."""
        if self.spread:
            return lax.ppermute(x, SLOTS, [((i + 1) % self.count, i) for i in range(self.count)])
        return jnp.roll(x, -self.rows, axis=0)


def slots_mesh(count: int, devices: list | None = None) -> Mesh:
    """A one-axis mesh of `count` devices along SLOTS."""
    return axis_mesh(SLOTS, count, devices)


SLOT_ROWS = PartitionSpec(SLOTS)  # a stream's rows split by slot
