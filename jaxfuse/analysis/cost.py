"""What one denoising step costs each device, read from the compiled program.

    cost = step_cost(UNetConfig.sdxl_base(), ParallelConfig(8, "displaced"), 1024, 1024, jnp.bfloat16)

The step is the sampling loops' own noise prediction (`jaxfuse.sampling.step.predict_noise`) for
one image with classifier-free guidance (a UNet batch of 2) on a device's rows, with the exchange
that joins the two guidance halves under `cfg_parallel`. Parameters and inputs are abstract
(`jax.ShapeDtypeStruct`): nothing is allocated and no weights are read, so SDXL at 3840² compiles
on a small machine. Per device:

    flops       XLA's cost analysis of the compiled per-device program
    received    bytes by collective kind (`hlo.collective_bytes`) of the program as written, in
                its own dtypes. The CPU backend widens bf16 collectives to f32 when it compiles;
                for f32 programs the compiled and written counts are equal (tested).
    memory      the compiled program's arguments (parameters, latents, stale context),
                outputs and temporaries, less what outputs share with donated arguments.

With a DeepCache step (`cache`, a `step_cache.CacheStep`) the program is that step, full or
shallow at its branch, and takes the denoiser's state as the image loop carries it: the features a
full step keeps (which a shallow one reads in place of its deep layers) and, in displaced and pcpp
modes, the stale context, shaped as the run's first step (a full one) writes them.

With `controlnets` (one `ControlNetConfig` per ControlNet) the ControlNets run beside the UNet as
the denoiser runs them: each reads a control image of the request's size, split by rows as the
latents (`Denoiser.cond_specs`), exchanges its own context (stale in displaced steps: part of the
state) and hands the UNet its residuals. Their parameters and stale context are counted in
`params_bytes` and `stale_bytes`, and on their own in `control_params_bytes` and
`control_stale_bytes`:

    cost = step_cost(UNetConfig.sdxl_base(), ParallelConfig(4, "displaced"), 1024, 1024, jnp.bfloat16,
                     controlnets=(ControlNetConfig(UNetConfig.sdxl_base()),))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxfuse import schedulers
from jaxfuse.analysis.hlo import collective_bytes
from jaxfuse.config import ControlNetConfig, UNetConfig
from jaxfuse.models import controlnet
from jaxfuse.models.unet import UNet2DConditionModel, abstract_params
from jaxfuse.parallel.mesh import ROWS, make_mesh
from jaxfuse.parallel_config import ParallelConfig
from jaxfuse.sampling.denoiser import Conditioning, Control, ControlNet, Denoiser, ModelState
from jaxfuse.sampling.image import Loop
from jaxfuse.sampling.plan import Plan, StepKind
from jaxfuse.sampling.step import Guidance, Sampling, predict_noise
from jaxfuse.step_cache import CacheStep


def step_fn(sampling: Sampling, kind: StepKind) -> Callable:
    """The first step of a schedule as a function: (denoiser, latents [B, 4, h, w], cond, schedule,
    guidance[, state]) -> noise[, the denoiser's state it writes]."""

    def step(denoiser, latents, cond, schedule, guidance, state=ModelState()):
        noise, written = predict_noise(denoiser.of_kind(kind), sampling, schedule, 0, latents, cond, guidance, state)
        return (noise, written) if kind.writes_state else noise

    return step


def sharded_step(sampling: Sampling, kind: StepKind, mesh, with_state: bool = False,
                 cond: Conditioning | None = None) -> Callable:
    """`step_fn` over `mesh`, each device on its rows, inputs laid out as the image loop's: the
    conditioning as the denoiser lays out `cond` (abstract or not; None: one without control images).
    The denoiser's state crosses the `shard_map` boundary stacked over every device along its first axis."""
    loop = Loop(sampling, Plan((kind,)), mesh)
    stacked = loop.carry_specs().model
    cond = Conditioning(None, None, None) if cond is None else cond
    in_specs = loop.input_specs(cond)[:5] + ((stacked,) if with_state else ())  # no noise keys: no sampler step
    out_specs = (ROWS, stacked) if kind.writes_state else ROWS
    return jax.shard_map(step_fn(sampling, kind), mesh=mesh, in_specs=in_specs, out_specs=out_specs)


@dataclasses.dataclass(frozen=True)
class StepCost:
    """One device's share of one step; bytes and FLOPs as integers."""

    flops: int
    received: dict[str, int]  # bytes by collective kind
    params_bytes: int
    stale_bytes: int  # the previous step's context the device keeps (displaced mode)
    argument_bytes: int
    temp_bytes: int
    peak_bytes: int  # arguments + outputs + temporaries - aliased
    deep_bytes: int = 0  # DeepCache's kept features the device holds (with a cache step)
    control_params_bytes: int = 0  # the ControlNets' share of params_bytes
    control_stale_bytes: int = 0  # the ControlNets' share of stale_bytes

    @property
    def received_bytes(self) -> int:
        return sum(self.received.values())

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "received_bytes": self.received_bytes}


def abstract_inputs(cfg: UNetConfig, images: int, height: int, width: int, dtype: Any, controls: int = 0) -> tuple:
    """The step's (latents, conditioning, schedule, guidance) for `images` guided images of
    height x width: abstract latents and conditioning (77 text tokens and SDXL's six time ids for
    each of the 2 x images rows of the guidance batch; with `controls` ControlNets, one control
    image [images, 3, height, width] each and their scales), a one-step Euler schedule."""
    batch = 2 * images
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    latents = jax.ShapeDtypeStruct((images, cfg.in_channels, height // 8, width // 8), jnp.float32)
    control = None
    if controls:
        control = Control(images=(jax.ShapeDtypeStruct((images, 3, height, width), dtype),) * controls,
                          scales=jax.ShapeDtypeStruct((controls, 1), jnp.float32))
    cond = Conditioning(context=jax.ShapeDtypeStruct((batch, 77, cfg.cross_attention_dim), dtype),
                        text_embeds=jax.ShapeDtypeStruct((batch, pooled), dtype),
                        time_ids=jax.ShapeDtypeStruct((batch, 6), jnp.float32), control=control)
    schedule = schedulers.make_schedule(schedulers.SchedulerKind.EULER, schedulers.SchedulerConfig(), 1)
    return latents, cond, schedule, Guidance(jnp.float32(5.0), jnp.float32(0.0))


def nbytes(tree: Any) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def abstract_controlnets(cfg: UNetConfig, controlnets: tuple[ControlNetConfig, ...], dtype: Any) -> tuple:
    """`ControlNet`s of abstract parameters for the UNet of `cfg`; each must make residuals of the
    shapes of its skips."""
    skips = controlnet.skip_channels(ControlNetConfig(cfg))
    for i, net in enumerate(controlnets):
        if controlnet.skip_channels(net) != skips:
            raise ValueError(f"controlnets[{i}] makes residuals of {controlnet.skip_channels(net)} channels, the "
                             f"UNet's skips have {skips}: give a ControlNet of this UNet (ControlNetConfig(unet=cfg)).")
    return tuple(ControlNet(controlnet.ControlNetModel(net, dtype), controlnet.abstract_params(net, dtype))
                 for net in controlnets)


def build_step(cfg: UNetConfig, parallel: ParallelConfig, height: int, width: int, dtype: Any = jnp.float32,
               images: int = 1, cache: CacheStep | None = None, controlnets: tuple[ControlNetConfig, ...] = ()
               ) -> tuple[Callable, list, dict[str, int]]:
    """The jitted step of `parallel.mode` (displaced, pcpp: a step after warm-up) for `images`
    guided images at height x width, with its abstract arguments: (step, args, sizes) where sizes
    holds the per-device bytes of the parameters, of the stale context and of DeepCache's kept
    features, and the ControlNets' share of the first two. With `cache` the step is that DeepCache
    step and its last argument the denoiser's state, donated when the step writes it; with
    `controlnets` the ControlNets run beside the UNet on a control image each."""
    nets = abstract_controlnets(cfg, tuple(controlnets), dtype)
    denoiser = Denoiser(UNet2DConditionModel(cfg, dtype), abstract_params(cfg, dtype), controlnets=nets)
    sampling = Sampling(use_guidance=True, use_rescale=False, parallel=parallel)
    args = [denoiser, *abstract_inputs(cfg, images, height, width, dtype, len(nets))]
    control_params = nbytes([net.params for net in nets])
    sizes = {"params": nbytes(denoiser.params) + control_params, "stale": 0, "deep": 0,
             "control_params": control_params, "control_stale": 0}
    if not parallel.split and cache is None:
        return jax.jit(step_fn(sampling, StepKind())), args, sizes

    mesh = make_mesh(parallel) if parallel.split else None
    first = kind = StepKind()
    if parallel.split:
        plan = Plan.of(parallel, parallel.warmup_steps + 1)
        first, kind = plan.kinds[0], plan.kinds[-1]
    if cache is not None:  # the run's first step is full: it writes the state the loop carries
        first = StepKind(first.patch, dataclasses.replace(cache, full=True))
        kind = StepKind(kind.patch, cache)

    def program(kind: StepKind, with_state: bool = False) -> Callable:
        return step_fn(sampling, kind) if mesh is None else sharded_step(sampling, kind, mesh, with_state, args[2])

    carries = kind.patch.reads_stale or cache is not None
    if carries:  # what the warm-up steps (or the last full step) leave for it, on every device
        state = jax.eval_shape(program(first), *args)[1]
        sizes["control_stale"] = nbytes(state.control) // parallel.devices
        sizes["stale"] = nbytes(state.stale) // parallel.devices + sizes["control_stale"]
        sizes["deep"] = nbytes(state.deep) // parallel.devices
        args.append(state)
    donate = (len(args) - 1,) if carries and kind.writes_state else ()
    return jax.jit(program(kind, with_state=carries), donate_argnums=donate), args, sizes


def compile_step(cfg: UNetConfig, parallel: ParallelConfig, height: int, width: int, dtype: Any = jnp.float32,
                 images: int = 1, cache: CacheStep | None = None, controlnets: tuple[ControlNetConfig, ...] = ()
                 ) -> tuple[jax.stages.Lowered, jax.stages.Compiled, dict[str, int]]:
    """`build_step`'s step lowered and compiled: (lowered, compiled, sizes)."""
    step, args, sizes = build_step(cfg, parallel, height, width, dtype, images, cache, controlnets)
    lowered = step.lower(*args)
    return lowered, lowered.compile(), sizes


def step_cost(cfg: UNetConfig, parallel: ParallelConfig, height: int, width: int, dtype: Any = jnp.float32,
              images: int = 1, cache: CacheStep | None = None, controlnets: tuple[ControlNetConfig, ...] = ()
              ) -> StepCost:
    """One device's FLOPs, bytes received and memory in one step (see the module docstring)."""
    lowered, compiled, sizes = compile_step(cfg, parallel, height, width, dtype, images, cache, controlnets)
    memory = compiled.memory_analysis()
    return StepCost(
        flops=int(compiled.cost_analysis()["flops"]),
        received=dict(collective_bytes(lowered.as_text(dialect="hlo"))),
        params_bytes=sizes["params"],
        stale_bytes=sizes["stale"],
        argument_bytes=memory.argument_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes,
        peak_bytes=peak_bytes(compiled),
        deep_bytes=sizes["deep"],
        control_params_bytes=sizes["control_params"],
        control_stale_bytes=sizes["control_stale"],
    )


def peak_bytes(compiled: jax.stages.Compiled) -> int:
    """A compiled program's peak memory per device: its arguments, outputs and temporaries, less
    the outputs that reuse argument buffers."""
    memory = compiled.memory_analysis()
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
            - memory.alias_size_in_bytes)
