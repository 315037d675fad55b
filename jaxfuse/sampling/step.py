"""One UNet prediction for one denoising step, the piece every sampling loop shares:

    noise, stale = predict_noise(unet, params, sampling, patch, schedule, i, latents, cond, guidance, stale)

It scales the latents for the sampler, doubles them into the guidance batch (or, with
`cfg_parallel`, leaves each `CFG` group its half), runs the UNet under `patch` with the previous
step's stale context, joins the two guidance halves, and applies classifier-free guidance and its
rescaling. It runs as it is on one device, or inside `shard_map` on a device's rows.

Legend: B images, B' the UNet's batch (2B with guidance, B per group with `cfg_parallel`), C the
latent channels, h/w the latent rows (this device's) and columns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp

from jaxfuse import schedulers
from jaxfuse.config import Mode, ParallelConfig
from jaxfuse.models.layers import apply_patched
from jaxfuse.parallel import patch as px
from jaxfuse.parallel.patch import Patch


@flax.struct.dataclass
class Conditioning:
    """What the UNet reads besides the latents: [B', 77, context], [B', pooled], [B', 6]. With
    classifier-free guidance B' = 2B, the unconditional half first (diffusers' order)."""

    context: jax.Array
    text_embeds: jax.Array
    time_ids: jax.Array


@flax.struct.dataclass
class Guidance:
    """Classifier-free guidance as data, so a new value compiles nothing."""

    scale: jax.Array  # [] float32
    rescale: jax.Array  # [] float32, 0: no rescaling


@dataclasses.dataclass(frozen=True)
class Sampling:
    """The settings that shape the compiled denoising program (the rest are array arguments)."""

    use_guidance: bool  # guidance scale > 1: the UNet sees the unconditional and conditional batch
    use_rescale: bool  # guidance rescale > 0
    parallel: ParallelConfig = ParallelConfig()

    def phases(self, num_steps: int) -> list[tuple[Patch, int, int]]:
        """(the layers' view, first step, end step) of each run of steps alike: displaced (and
        pcpp) runs its warm-up steps synchronously, recording their context for the steps after."""
        p = self.parallel
        if p.mode.reads_stale:
            warm = min(p.warmup_steps, num_steps)
            return [(Patch.of(p, Mode.SYNC, record=True), 0, warm), (Patch.of(p), warm, num_steps)]
        return [(Patch.of(p), 0, num_steps)]

    @property
    def keeps_stale(self) -> bool:
        """Some step of the loop writes stale context, so the loop carries it."""
        return self.parallel.mode.reads_stale


def guide(noise: jax.Array, guidance: Guidance, sampling: Sampling) -> jax.Array:
    """Classifier-free guidance on [2B, ...] predictions (unconditional half first) -> [B, ...].

    Rescaling mixes in the prediction rescaled to the conditional one's standard deviation
    (Lin et al. 2023, sec. 3.4), as diffusers' `guidance_rescale` does.
    """
    uncond, cond = jnp.split(noise.astype(jnp.float32), 2)
    guided = uncond + guidance.scale * (cond - uncond)
    if not sampling.use_rescale:
        return guided
    split = sampling.parallel.split
    per_sample = (-1,) + (1,) * (noise.ndim - 1)
    ratio = (px.image_std(cond, split) / px.image_std(guided, split)).reshape(per_sample)
    return guidance.rescale * guided * ratio + (1 - guidance.rescale) * guided


def predict_noise(unet: Any, params: Any, sampling: Sampling, patch: Patch, schedule: schedulers.Schedule,
                  i: jax.Array, latents: jax.Array, cond: Conditioning, guidance: Guidance,
                  stale: Any = None) -> tuple[jax.Array, Any]:
    """Latents [B, C, h, w] at step i ([], or [B]: each image at its own step) -> the guided noise
    prediction [B, C, h, w] float32 and the stale context for the next step (this step's exchanges
    when `patch` writes them, `stale` as given otherwise)."""
    model_input = schedulers.scale_model_input(schedule, latents, i)
    timesteps = jnp.asarray(schedule.timesteps)[i]  # [] or, with one step index per image, [B]
    if sampling.use_guidance and not sampling.parallel.cfg_parallel:
        model_input = jnp.concatenate([model_input, model_input])
        timesteps = jnp.concatenate([timesteps, timesteps]) if timesteps.ndim else timesteps
    noise, stale = apply_patched(unet, patch, params, stale, model_input, timesteps, cond.context,
                                 text_embeds=cond.text_embeds, time_ids=cond.time_ids)
    if sampling.parallel.cfg_parallel:
        noise = px.join_guidance_halves(noise)
    noise = noise.astype(jnp.float32)
    if sampling.use_guidance:
        noise = guide(noise, guidance, sampling)
    return noise, stale


def initial_stale(unet: Any, params: Any, sampling: Sampling, schedule: schedulers.Schedule, latents: jax.Array,
                  cond: Any, guidance: Guidance, predict: Callable = predict_noise) -> Any:
    """The stale context a loop starts with: zeros shaped like what its first recording step
    (`predict`, default `predict_noise`) writes, found by tracing that step abstractly
    (`jax.eval_shape`, nothing runs), so the loop compiles one UNet body per phase. None when no
    step keeps context."""
    if not sampling.keeps_stale:
        return None
    record, _, _ = sampling.phases(1)[0]
    shapes = jax.eval_shape(
        lambda: predict(unet, params, sampling, record, schedule, 0, latents, cond, guidance)[1])
    return px.zeros_like_shapes(shapes)
