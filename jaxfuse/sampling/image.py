"""The image loop: a batch of images denoised step by step, as one `lax.scan` per phase
(`Sampling.phases`: a displaced or pcpp run's synchronous warm-up, then its displaced steps),
with the latents, the sampler's state and the stale context in a named carry. On a mesh it runs
inside `shard_map`, each device on its rows of the latents, from the first step to the last.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxfuse import schedulers
from jaxfuse.parallel.mesh import ROWS
from jaxfuse.parallel.patch import CFG
from jaxfuse.sampling.step import Conditioning, Guidance, Sampling, initial_stale, predict_noise


@flax.struct.dataclass
class ImageCarry:
    """What one step hands the next."""

    latents: jax.Array  # [B, C, h, w] this device's rows
    scheduler: schedulers.SchedulerState
    stale: Any  # the previous step's exchanges (`jaxfuse.parallel.patch`); None when no step keeps any


def denoise(unet: Any, params: Any, latents: jax.Array, cond: Conditioning, schedule: schedulers.Schedule,
            guidance: Guidance, sampling: Sampling, progress: Callable[..., None] | None = None) -> jax.Array:
    """The whole sampling loop: latents [B, C, h, w] -> denoised latents. `progress(i, total=n)`
    is called on the host after step i."""
    num_steps = schedule.timesteps.shape[0]

    def one_step(patch, carry: ImageCarry, i) -> ImageCarry:
        noise, stale = predict_noise(unet, params, sampling, patch, schedule, i, carry.latents, cond, guidance,
                                     carry.stale)
        x, state = schedulers.step(schedule, carry.scheduler, i, noise, carry.latents)
        if progress is not None:
            jax.debug.callback(functools.partial(progress, total=num_steps), i)
        return ImageCarry(x, state, stale)

    carry = ImageCarry(latents, schedulers.init_state(schedule, latents),
                       initial_stale(unet, params, sampling, schedule, latents, cond, guidance))
    for patch, start, stop in sampling.phases(num_steps):
        step = functools.partial(one_step, patch)
        carry, _ = lax.scan(lambda c, i: (step(c, i), None), carry, jnp.arange(start, stop))
    return carry.latents


def loop_specs(sampling: Sampling) -> tuple:
    """`shard_map` in_specs of `denoise`'s (params, latents, cond, schedule, guidance): the latents
    split by rows, the conditioning by guidance half with `cfg_parallel`, the rest replicated."""
    return P(), ROWS, P(CFG) if sampling.parallel.cfg_parallel else P(), P(), P()


def image_loop(unet: Any, sampling: Sampling, mesh: Mesh | None,
               progress: Callable[..., None] | None = None) -> Callable:
    """`denoise` as a function of (params, latents, cond, schedule, guidance); on `mesh`, over its
    devices with the inputs laid out as `loop_specs` says."""
    loop = functools.partial(denoise, unet, sampling=sampling, progress=progress)
    if mesh is None:
        return loop
    return jax.shard_map(loop, mesh=mesh, in_specs=loop_specs(sampling), out_specs=ROWS)
