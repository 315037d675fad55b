"""The image loop: a batch of images denoised step by step, with the latents, the sampler's state
and the stale context in a named carry. Each phase (`Sampling.phases`: a displaced or pcpp run's
synchronous warm-up, then its displaced steps) is one loop over its steps; on a mesh it runs
inside `shard_map`, each device on its rows of the latents.

`denoise` is the whole loop as one function (one `lax.scan` per phase). The pipeline runs the same
pieces as separate programs (`initial_program`, then `steps_program` per phase) whose step range
is an argument: the host can then run one step at a time and report progress between them, with
no host callback inside a program; a program with a host callback never enters JAX's persistent
compilation cache.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxfuse import schedulers
from jaxfuse.parallel.mesh import ROWS
from jaxfuse.parallel.patch import CFG, Patch, own_rows, vary_like
from jaxfuse.sampling.step import Conditioning, Guidance, Sampling, initial_stale, predict_noise


@flax.struct.dataclass
class ImageCarry:
    """What one step hands the next."""

    latents: jax.Array  # [B, C, h, w] this device's rows
    scheduler: schedulers.SchedulerState
    stale: Any  # the previous step's exchanges (`jaxfuse.parallel.patch`); None when no step keeps any


@dataclasses.dataclass(frozen=True)
class Predictor:
    """What predicts each step's noise, and how the loop's latents lie on the mesh: `predict_noise`
    on this device's rows (an image split by rows), or a function of its signature on latents
    whole on every device (`whole_latents`: the views of a canvas, `tiled.view_predictor`, which
    split each view inside)."""

    predict: Callable = predict_noise
    whole_latents: bool = False
    key: Any = None  # what makes `predict` the function it is: compiled programs are kept by it

    @property
    def latents_spec(self) -> P:
        return P() if self.whole_latents else ROWS


def initial_carry(unet: Any, params: Any, latents: jax.Array, cond: Conditioning, schedule: schedulers.Schedule,
                  guidance: Guidance, noise_keys: jax.Array, sampling: Sampling,
                  predictor: Predictor = Predictor()) -> ImageCarry:
    """The carry before step 0: the latents, a fresh sampler state drawing its step noise from
    `noise_keys`, zero stale context shaped as the predictor writes it."""
    return ImageCarry(latents, schedulers.init_state(schedule, latents, noise_keys),
                      initial_stale(unet, params, sampling, schedule, latents, cond, guidance, predictor.predict))


def sampler_noise(state: schedulers.SchedulerState, i: jax.Array, latents: jax.Array, split: bool) -> jax.Array:
    """Step i's unit noise for `latents` [B, C, h, w], this device's rows when `split`: each device
    draws the whole image's and keeps its own, so a split image gets the one device's noise exactly."""
    def draw(shape):
        return schedulers.step_noise(state.noise_keys, i, shape)

    return own_rows(draw, latents.shape, axis=2) if split else draw(latents.shape)


def run_steps(unet: Any, sampling: Sampling, patch: Patch, params: Any, carry: ImageCarry, cond: Conditioning,
              schedule: schedulers.Schedule, guidance: Guidance, start: Any, stop: Any,
              predictor: Predictor = Predictor()) -> ImageCarry:
    """Steps start..stop-1, each layer seeing the other patches as `patch` says. With Python int
    bounds the loop is a `lax.scan`; with traced ones one compiled program serves every range."""

    def step(i, carry: ImageCarry) -> ImageCarry:
        noise, stale = predictor.predict(unet, params, sampling, patch, schedule, i, carry.latents, cond, guidance,
                                         carry.stale)
        split = patch.split and not predictor.whole_latents
        fresh = sampler_noise(carry.scheduler, i, carry.latents, split) if schedule.kind.stochastic else None
        x, state = schedulers.step(schedule, carry.scheduler, i, noise, carry.latents, fresh)
        return ImageCarry(x, state, vary_like(stale, carry.stale))

    return lax.fori_loop(start, stop, step, carry)


def denoise(unet: Any, params: Any, latents: jax.Array, cond: Conditioning, schedule: schedulers.Schedule,
            guidance: Guidance, noise_keys: jax.Array, sampling: Sampling,
            predictor: Predictor = Predictor()) -> jax.Array:
    """The whole sampling loop: latents [B, C, h, w] -> denoised latents."""
    carry = initial_carry(unet, params, latents, cond, schedule, guidance, noise_keys, sampling, predictor)
    for patch, start, stop in sampling.phases(schedule.timesteps.shape[0]):
        carry = run_steps(unet, sampling, patch, params, carry, cond, schedule, guidance, start, stop, predictor)
    return carry.latents


def loop_specs(sampling: Sampling, predictor: Predictor = Predictor()) -> tuple:
    """`shard_map` in_specs of `denoise`'s (params, latents, cond, schedule, guidance, noise_keys):
    the latents split by rows (or whole, as the predictor says), the conditioning by guidance half
    with `cfg_parallel`, the rest replicated."""
    return P(), predictor.latents_spec, P(CFG) if sampling.parallel.cfg_parallel else P(), P(), P(), P()


def stale_spec(mesh: Mesh) -> P:
    """How the stale tree crosses a `shard_map` boundary: every device's own leaves stacked along
    their first axis."""
    return P(mesh.axis_names)


def carry_specs(sampling: Sampling, mesh: Mesh, predictor: Predictor = Predictor()) -> ImageCarry:
    latents = predictor.latents_spec
    return ImageCarry(latents, schedulers.SchedulerState(prev_x0=latents, noise_keys=P()),
                      stale_spec(mesh) if sampling.keeps_stale else None)


def image_loop(unet: Any, sampling: Sampling, mesh: Mesh | None, predictor: Predictor = Predictor()) -> Callable:
    """`denoise` as a function of (params, latents, cond, schedule, guidance, noise_keys); on `mesh`, over its
    devices with the inputs laid out as `loop_specs` says."""
    loop = functools.partial(denoise, unet, sampling=sampling, predictor=predictor)
    if mesh is None:
        return loop
    return jax.shard_map(loop, mesh=mesh, in_specs=loop_specs(sampling, predictor), out_specs=predictor.latents_spec)


def initial_program(unet: Any, sampling: Sampling, mesh: Mesh | None, predictor: Predictor = Predictor()) -> Callable:
    """`initial_carry` as a function of (params, latents, cond, schedule, guidance, noise_keys); on `mesh`,
    laid out as `loop_specs` and `carry_specs` say."""
    first = functools.partial(initial_carry, unet, sampling=sampling, predictor=predictor)
    if mesh is None:
        return first
    return jax.shard_map(first, mesh=mesh, in_specs=loop_specs(sampling, predictor),
                         out_specs=carry_specs(sampling, mesh, predictor))


def steps_program(unet: Any, sampling: Sampling, patch: Patch, mesh: Mesh | None,
                  predictor: Predictor = Predictor()) -> Callable:
    """`run_steps` of one phase as a function of (params, carry, cond, schedule, guidance, start,
    stop), the bounds traced; on `mesh`, laid out as `loop_specs` and `carry_specs` say."""
    steps = functools.partial(run_steps, unet, sampling, patch, predictor=predictor)
    if mesh is None:
        return steps
    params, _, cond, schedule, guidance, _ = loop_specs(sampling, predictor)
    carry = carry_specs(sampling, mesh, predictor)
    return jax.shard_map(steps, mesh=mesh, in_specs=(params, carry, cond, schedule, guidance, P(), P()),
                         out_specs=carry)
