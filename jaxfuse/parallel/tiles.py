"""Where the tiles of a tiled pass run (`jaxfuse.models.vae_tiled`): one at a time on the default
device, or one on each device of a mesh per round, the mesh's axes taken together as one axis of
tiles. The tiles of a round are independent: a round needs no collective.

Legend: N tiles in a round (the mesh's devices, or 1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def round_size(mesh: Mesh | None) -> int:
    """How many tiles run at once: one per device of `mesh`, or one without a mesh."""
    return 1 if mesh is None else mesh.size


def check_local(mesh: Mesh | None) -> None:
    """Raises one clear ValueError unless this process drives every device of `mesh`: the tiled
    passes keep the whole activations in this process's memory."""
    if mesh is not None and len(mesh.local_devices) < mesh.size:
        processes = len({device.process_index for device in mesh.devices.flat})
        raise ValueError(f"a tiled VAE pass keeps the whole activations in this process's memory, so its mesh must "
                         f"hold this process's devices only (jax.local_devices()); got a mesh over {processes} "
                         "processes.")


def per_tile(fn: Callable, shared: int, mesh: Mesh | None) -> Callable:
    """`fn(*shared_args, *tile_args)` of one tile -> a jitted program of the same arguments where
    every tile argument (and every output) leads with the round's tiles [N, ...]: the first
    `shared` arguments are the same for every tile (replicated over the mesh), and each device
    runs its own tile."""

    def batched(*args):
        return jax.vmap(fn, in_axes=(None,) * shared + (0,) * (len(args) - shared))(*args)

    if mesh is None:
        return jax.jit(batched)
    tiles = P(mesh.axis_names)

    def spread(*args):
        specs = (P(),) * shared + (tiles,) * (len(args) - shared)
        return jax.shard_map(batched, mesh=mesh, in_specs=specs, out_specs=tiles)(*args)

    return jax.jit(spread)


def place(tree: Any, mesh: Mesh | None, stacked: bool) -> Any:
    """Host arrays -> device arrays: on the default device, or over `mesh` split along the first
    axis (`stacked`: a round's tiles, one per device) or replicated."""
    if mesh is None:
        return jax.device_put(tree)
    return jax.device_put(tree, NamedSharding(mesh, P(mesh.axis_names) if stacked else P()))
