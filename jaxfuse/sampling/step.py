"""One noise prediction for one denoising step, the piece every sampling loop shares:

    noise, state = predict_noise(denoiser, sampling, schedule, i, latents, cond, guidance, state)

It scales the latents for the sampler, doubles them into the guidance batch (or, with
`cfg_parallel`, leaves each `CFG` group its half), sets the ControlNets' scales to the step's,
runs the denoiser (`sampling.denoiser`: the
UNet set to the step's kind, with the state of the step before), joins the two guidance halves,
and applies classifier-free guidance and its rescaling. It runs as it is on one device, or inside
`shard_map` on a device's rows.

Legend: B images, B' the UNet's batch (2B with guidance, B per group with `cfg_parallel`), C the
latent channels, h/w the latent rows (this device's) and columns.
"""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp

from jaxfuse import schedulers
from jaxfuse.config import ParallelConfig
from jaxfuse.parallel import patch as px
from jaxfuse.sampling.denoiser import Conditioning, Denoiser, ModelState


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


def predict_noise(denoiser: Denoiser, sampling: Sampling, schedule: schedulers.Schedule, i: jax.Array,
                  latents: jax.Array, cond: Conditioning, guidance: Guidance,
                  state: ModelState = ModelState()) -> tuple[jax.Array, ModelState]:
    """Latents [B, C, h, w] at step i ([], or [B]: each image at its own step) -> the guided noise
    prediction [B, C, h, w] float32 and the denoiser's state for the next step."""
    model_input = schedulers.scale_model_input(schedule, latents, i)
    timesteps = jnp.asarray(schedule.timesteps)[i]  # [] or, with one step index per image, [B]
    cfg_parallel = sampling.parallel.cfg_parallel
    if sampling.use_guidance and not cfg_parallel:
        model_input = jnp.concatenate([model_input, model_input])
        timesteps = jnp.concatenate([timesteps, timesteps]) if timesteps.ndim else timesteps
    if cond.control is not None:
        cond = cond.replace(control=cond.control.at_step(i, model_input.shape[0], sampling.use_guidance, cfg_parallel))
    noise, state = denoiser.apply(model_input, timesteps, cond, state)
    if cfg_parallel:
        noise = px.join_guidance_halves(noise)
    noise = noise.astype(jnp.float32)
    if sampling.use_guidance:
        noise = guide(noise, guidance, sampling)
    return noise, state
