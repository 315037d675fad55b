"""The image loop: a batch of images denoised step by step over the step plan, with the latents,
the sampler's state and the denoiser's state in a named carry.

    loop = Loop(sampling, Plan.of(parallel, steps), mesh)
    latents = denoise(loop, Denoiser(unet, params), latents, cond, schedule, guidance, noise_keys)

`denoise` is the one host driver every caller uses (the pipeline, the canvases, the tests): it runs
the loop as separate compiled programs, `initial_program` and then one `steps_program` per kind of
step (`Plan.phases`), whose step range is an argument. The host can then run one step at a time and
report progress between them with no host callback inside a program (a program with a host
callback never enters JAX's persistent compilation cache), and each kind compiles once however
often the plan returns to it. On a mesh each program runs inside `shard_map`, each device on its
rows of the latents (or, for a canvas's views, on its views: `Predictor`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import flax
import jax
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxfuse import schedulers
from jaxfuse.config import ConfigError
from jaxfuse.parallel.mesh import ROWS, mesh_key, place, place_as
from jaxfuse.parallel.patch import own_rows, vary_like
from jaxfuse.sampling.denoiser import Denoiser, ModelState, initial_state
from jaxfuse.sampling.plan import Plan
from jaxfuse.sampling.step import Guidance, Sampling, predict_noise


@flax.struct.dataclass
class ImageCarry:
    """What one step hands the next."""

    latents: jax.Array  # [B, C, h, w] this device's rows
    scheduler: schedulers.SchedulerState
    model: ModelState  # the denoiser's state (the stale context of displaced steps)


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


@dataclasses.dataclass(frozen=True)
class Loop:
    """What shapes the loop's compiled programs: the guidance settings and layout, the kind of
    every step, the mesh (None: one device) and what predicts the noise."""

    sampling: Sampling
    plan: Plan
    mesh: Mesh | None = None
    predictor: Predictor = Predictor()

    def __post_init__(self):
        if self.predictor.whole_latents and self.sampling.parallel.cfg_parallel:
            raise ConfigError("the views of a canvas split each view by rows, not its guidance batch; drop "
                              "cfg_parallel.")

    @property
    def key(self) -> Any:
        """What identifies the loop's programs among those a runner keeps (with their argument
        shapes): a canvas's predictor is a new function each run, named by what makes it."""
        return self.sampling, self.predictor.key, None if self.predictor.key is None else mesh_key(self.mesh)

    def input_specs(self, cond: Any) -> tuple:
        """`shard_map` in_specs of (denoiser, latents, cond, schedule, guidance, noise_keys): the
        latents split by rows (or whole, as the predictor says), the conditioning as the denoiser
        lays it out (whole with whole latents), the rest replicated."""
        cond_specs = P() if self.predictor.whole_latents else Denoiser.cond_specs(self.sampling.parallel, cond)
        return P(), self.predictor.latents_spec, cond_specs, P(), P(), P()

    def carry_specs(self) -> ImageCarry:
        """How the carry crosses a `shard_map` boundary; the denoiser's state, whatever it holds, as
        every device's own leaves stacked along their first axis."""
        latents = self.predictor.latents_spec
        return ImageCarry(latents, schedulers.SchedulerState(prev_x0=latents, noise_keys=P()), P(self.mesh.axis_names))

    def initial_carry(self, denoiser: Denoiser, latents: jax.Array, cond: Any, schedule: schedulers.Schedule,
                      guidance: Guidance, noise_keys: jax.Array) -> ImageCarry:
        """The carry before step 0: the latents, a fresh sampler state drawing its step noise from
        `noise_keys`, zero denoiser state shaped as the plan's first step that keeps any writes it."""
        state, kind = ModelState(), self.plan.state_kind
        if kind is not None:
            state = initial_state(lambda: self.predictor.predict(denoiser.of_kind(kind), self.sampling, schedule, 0,
                                                                 latents, cond, guidance)[1])
        return ImageCarry(latents, schedulers.init_state(schedule, latents, noise_keys), state)

    def run_steps(self, denoiser: Denoiser, carry: ImageCarry, cond: Any, schedule: schedulers.Schedule,
                  guidance: Guidance, start: Any, stop: Any) -> ImageCarry:
        """Steps start..stop-1 by `denoiser` (set to their kind). With Python int bounds the loop
        is a `lax.scan`; with traced ones one compiled program serves every range."""
        split = denoiser.kind.patch.split and not self.predictor.whole_latents

        def step(i, carry: ImageCarry) -> ImageCarry:
            noise, state = self.predictor.predict(denoiser, self.sampling, schedule, i, carry.latents, cond,
                                                  guidance, carry.model)
            fresh = sampler_noise(carry.scheduler, i, carry.latents, split) if schedule.kind.stochastic else None
            x, scheduler_state = schedulers.step(schedule, carry.scheduler, i, noise, carry.latents, fresh)
            return ImageCarry(x, scheduler_state, vary_like(state, carry.model))

        return lax.fori_loop(start, stop, step, carry)

    def initial_program(self) -> Callable:
        """`initial_carry` as a function of (denoiser, latents, cond, schedule, guidance,
        noise_keys); on the mesh, laid out as `input_specs` and `carry_specs` say."""
        if self.mesh is None:
            return self.initial_carry

        def program(denoiser, latents, cond, *args):
            return jax.shard_map(self.initial_carry, mesh=self.mesh, in_specs=self.input_specs(cond),
                                 out_specs=self.carry_specs())(denoiser, latents, cond, *args)

        return program

    def steps_program(self) -> Callable:
        """`run_steps` as a function of (denoiser, carry, cond, schedule, guidance, start, stop),
        the bounds traced; on the mesh, laid out as `input_specs` and `carry_specs` say."""
        if self.mesh is None:
            return self.run_steps

        def program(denoiser, carry, cond, *args):
            denoiser_spec, _, cond_spec, schedule, guidance, _ = self.input_specs(cond)
            specs = self.carry_specs()
            return jax.shard_map(self.run_steps, mesh=self.mesh, in_specs=(
                denoiser_spec, specs, cond_spec, schedule, guidance, P(), P()), out_specs=specs)(denoiser, carry, cond,
                                                                                                 *args)

        return program


def sampler_noise(state: schedulers.SchedulerState, i: jax.Array, latents: jax.Array, split: bool) -> jax.Array:
    """Step i's unit noise for `latents` [B, C, h, w], this device's rows when `split`: each device
    draws the whole image's and keeps its own, so a split image gets the one device's noise exactly."""
    def draw(shape):
        return schedulers.step_noise(state.noise_keys, i, shape)

    return own_rows(draw, latents.shape, axis=2) if split else draw(latents.shape)


class Runner(Protocol):
    """Where a loop's programs compile and run: `runtime.programs.Programs` keeps them, times them
    and places parameters once per mesh; `Direct` compiles every call afresh."""

    def run(self, name: Any, fn: Callable, *args, donate: int | None = None) -> Any: ...

    def replicated(self, name: str, tree: Any, mesh: Mesh) -> Any: ...


class Direct:
    """A `Runner` that jits each program where it is called and keeps nothing (tests, scripts)."""

    @staticmethod
    def run(name: Any, fn: Callable, *args, donate: int | None = None) -> Any:
        return jax.jit(fn, donate_argnums=() if donate is None else (donate,))(*args)

    @staticmethod
    def replicated(name: str, tree: Any, mesh: Mesh) -> Any:
        return place(tree, NamedSharding(mesh, P()))


def denoise(loop: Loop, denoiser: Denoiser, latents: jax.Array, cond: Any, schedule: schedulers.Schedule,
            guidance: Guidance, noise_keys: jax.Array, runner: Runner = Direct(),
            progress: Callable[[int, int, jax.Array], None] | None = None) -> jax.Array:
    """Initial latents [B, C, h, w] -> denoised latents; on the loop's mesh, laid out as its
    predictor says (split by rows, or a canvas's views spread). With a progress callback the host
    runs one step at a time (the same compiled program as a phase's whole range) and reports each
    when it is done: `progress(step, total, latents)`, the latents as that step left them."""
    args = (latents, cond, schedule, guidance, noise_keys)
    if loop.mesh is not None:
        denoiser = runner.replicated("unet", denoiser, loop.mesh)
        args = [place_as(a, loop.mesh, spec) for a, spec in zip(args, loop.input_specs(cond)[1:])]
    _, cond, schedule, guidance, _ = args
    carry = runner.run(("initial", *loop.key, loop.plan.state_kind), loop.initial_program(), denoiser, *args)
    total = len(loop.plan.kinds)
    # Every process of a multi-host run must launch the same programs in the same order,
    # whichever of them reports progress: across processes the host always steps.
    stepwise = progress is not None or jax.process_count() > 1
    steps = loop.steps_program()
    for kind, start, stop in loop.plan.phases():
        bounds = [(i, i + 1) for i in range(start, stop)] if stepwise else [(start, stop)]
        for first, end in bounds:
            carry = runner.run(("steps", *loop.key, kind), steps, denoiser.of_kind(kind), carry, cond, schedule,
                               guidance, np.int32(first), np.int32(end), donate=1)
            if progress is not None:
                jax.block_until_ready(carry.latents)
                progress(end, total, carry.latents)
    return carry.latents
