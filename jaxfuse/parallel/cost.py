"""What one denoising step costs each device, read from the compiled program.

    cost = step_cost(UNetConfig.sdxl_base(), ParallelConfig(8, "displaced"), 1024, 1024, jnp.bfloat16)

The step is one UNet call on a device's rows (plus, with `cfg_parallel`, the exchange that joins
the two guidance halves), as the pipeline's denoising loop makes it. Parameters and inputs are
abstract (`jax.ShapeDtypeStruct`): nothing is allocated and no weights are read, so SDXL at 3840²
compiles on a small machine. Per device:

    flops       XLA's cost analysis of the compiled per-device program
    received    bytes by collective kind (`hlo.collective_bytes`) of the program as written, in
                its own dtypes. The CPU backend widens bf16 collectives to f32 when it compiles;
                for f32 programs the compiled and written counts are equal (tested).
    memory      the compiled program's arguments (parameters, latents, stale context),
                outputs and temporaries, less what outputs share with donated arguments.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxfuse.config import UNetConfig
from jaxfuse.models.layers import apply_patched
from jaxfuse.models.unet import UNet2DConditionModel, abstract_params
from jaxfuse.parallel.hlo import collective_bytes
from jaxfuse.parallel.mesh import ROWS, ParallelConfig, make_mesh
from jaxfuse.parallel.patch import CFG, PATCH, Mode, Patch, join_guidance_halves


def unet_step(unet: UNet2DConditionModel, patch: Patch, cfg_parallel: bool = False) -> Callable:
    """One UNet call: (params, sample [B, 4, h, w], conditioning kwargs[, stale]) -> noise[, new
    stale]. With `cfg_parallel` the device holds its guidance half of the conditioning and the
    two halves' predictions are joined."""

    def step(params, sample, conditioning, stale=None):
        noise, new_stale = apply_patched(unet, patch, params, stale, sample, **conditioning)
        if cfg_parallel:
            noise = join_guidance_halves(noise)
        return (noise, new_stale) if patch.writes_stale else noise

    return step


def step_specs(conditioning: dict[str, Any], patch: Patch, cfg_parallel: bool, with_stale: bool):
    """`shard_map` specs of `unet_step`: (in_specs, out_specs). The stale tree crosses the
    `shard_map` boundary stacked over every device along its first axis."""
    stacked = P((CFG, PATCH)) if cfg_parallel else P(PATCH)
    cond = {k: P(CFG) if cfg_parallel and jnp.ndim(v) else P() for k, v in conditioning.items()}
    in_specs = (P(), ROWS, cond) + ((stacked,) if with_stale else ())
    return in_specs, ((ROWS, stacked) if patch.writes_stale else ROWS)


def sharded_step(unet: UNet2DConditionModel, patch: Patch, mesh, conditioning: dict[str, Any],
                 cfg_parallel: bool = False, with_stale: bool = False) -> Callable:
    """`unet_step` over `mesh`, each device on its rows."""
    in_specs, out_specs = step_specs(conditioning, patch, cfg_parallel, with_stale)
    return jax.shard_map(unet_step(unet, patch, cfg_parallel), mesh=mesh, in_specs=in_specs,
                         out_specs=out_specs)


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

    @property
    def received_bytes(self) -> int:
        return sum(self.received.values())

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "received_bytes": self.received_bytes}


def abstract_inputs(cfg: UNetConfig, batch: int, height: int, width: int, dtype: Any) -> tuple[Any, dict]:
    """ShapeDtypeStructs of a `batch` of latents for a height x width image and of the
    conditioning (77 text tokens, SDXL's six time ids)."""
    latent = (batch, cfg.in_channels, height // 8, width // 8)
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    conditioning = dict(
        timesteps=jax.ShapeDtypeStruct((), jnp.float32),
        encoder_hidden_states=jax.ShapeDtypeStruct((batch, 77, cfg.cross_attention_dim), dtype),
        text_embeds=jax.ShapeDtypeStruct((batch, pooled), dtype),
        time_ids=jax.ShapeDtypeStruct((batch, 6), jnp.float32),
    )
    return jax.ShapeDtypeStruct(latent, dtype), conditioning


def nbytes(tree: Any) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def build_step(cfg: UNetConfig, parallel: ParallelConfig, height: int, width: int, dtype: Any = jnp.float32,
               batch: int = 2) -> tuple[Callable, list, dict[str, int]]:
    """The jitted step of `parallel.mode` (displaced, pcpp: a step after warm-up) for a guidance batch
    of `batch` at height x width, with its abstract arguments: (step, args, sizes) where sizes
    holds the per-device bytes of the parameters and of the stale context."""
    unet = UNet2DConditionModel(cfg, dtype)
    params = abstract_params(cfg, dtype)
    sample, conditioning = abstract_inputs(cfg, batch, height, width, dtype)
    sizes = {"params": nbytes(params), "stale": 0}
    if not parallel.split:
        return jax.jit(unet_step(unet, Patch())), [params, sample, conditioning], sizes

    mesh = make_mesh(parallel)
    cfg_parallel = parallel.cfg_parallel
    if cfg_parallel:  # each device computes its guidance half
        sample = jax.ShapeDtypeStruct((batch // 2,) + sample.shape[1:], dtype)
    args = [params, sample, conditioning]
    patch = parallel.patch()
    if patch.displaced:  # what the warm-up steps leave for it
        record = sharded_step(unet, parallel.patch(Mode.SYNC, record=True), mesh, conditioning, cfg_parallel)
        stale = jax.eval_shape(record, *args)[1]
        sizes["stale"] = nbytes(stale) // parallel.devices
        args.append(stale)
    with_stale = len(args) == 4
    fn = sharded_step(unet, patch, mesh, conditioning, cfg_parallel, with_stale)
    return jax.jit(fn, donate_argnums=(3,) if with_stale else ()), args, sizes


def compile_step(cfg: UNetConfig, parallel: ParallelConfig, height: int, width: int, dtype: Any = jnp.float32,
                 batch: int = 2) -> tuple[jax.stages.Lowered, jax.stages.Compiled, dict[str, int]]:
    """`build_step`'s step lowered and compiled: (lowered, compiled, sizes)."""
    step, args, sizes = build_step(cfg, parallel, height, width, dtype, batch)
    lowered = step.lower(*args)
    return lowered, lowered.compile(), sizes


def step_cost(cfg: UNetConfig, parallel: ParallelConfig, height: int, width: int, dtype: Any = jnp.float32,
              batch: int = 2) -> StepCost:
    """One device's FLOPs, bytes received and memory in one step (see the module docstring)."""
    lowered, compiled, sizes = compile_step(cfg, parallel, height, width, dtype, batch)
    memory = compiled.memory_analysis()
    return StepCost(
        flops=int(compiled.cost_analysis()["flops"]),
        received=dict(collective_bytes(lowered.as_text(dialect="hlo"))),
        params_bytes=sizes["params"],
        stale_bytes=sizes["stale"],
        argument_bytes=memory.argument_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes,
        peak_bytes=(memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                    - memory.alias_size_in_bytes),
    )
