"""Samplers of the denoising loop as pure functions that fit a `lax.scan`.

- `SchedulerKind.EULER` is diffusers' `EulerDiscreteScheduler` (deterministic, `s_churn = 0`),
  with or without Karras sigmas.
- `SchedulerKind.DDIM` is `DDIMScheduler` with `eta = 0`.
- `SchedulerKind.DPMPP_2M` is `DPMSolverMultistepScheduler` with `algorithm_type="dpmsolver++"`,
  `solver_order=2`, `solver_type="midpoint"` (DPM-Solver++(2M); "DPM++ 2M Karras" with Karras
  sigmas).
- `SchedulerKind.EULER_ANCESTRAL` is `EulerAncestralDiscreteScheduler` (SDXL-Turbo's sampler):
  an Euler step to a lower noise level, then fresh noise up to the next one.
- `SchedulerKind.LCM` is `LCMScheduler`: a consistency model's denoised estimate, noised afresh to
  the next timestep (LCM-LoRA, 2-8 steps).

Every sampler-specific formula runs once, on the host, in `make_schedule`. What is left for the
loop is the same pair of linear combinations for all five, with scalar coefficients per step i:

    x0     = p[i] * x + q[i] * model_output                         the denoised estimate
    x_next = a[i] * x + b[i] * x0 + c[i] * x0_prev + d[i] * z       z: the step's unit noise

with c = 0 but in DPM++'s second-order steps and d = 0 but for the two stochastic samplers, so
`step` has no branches, indexes its coefficients with a traced step index and is elementwise in
the latents (a device updates its own rows of the image, and its rows of z). The first-order
update (`a`, `b`) is shared: keep the noise estimate (x - alpha x0) / sigma and move to the next
noise level. Euler is that update for samples x = x0 + sigma noise (alpha = 1); DDIM and DPM++
for samples x = alpha x0 + sigma noise. Euler ancestral moves to a lower level sigma_down and adds
sigma_up z; LCM's x0 is its boundary-conditioned estimate c_skip x + c_out x0_model and its next
sample alpha_next x0 + sigma_next z.

Image-to-image starts at a later step k from a clean x0 noised to that step's level,
e[k] x0 + f[k] z (diffusers' `add_noise`), and runs the schedule's `tail(k)`.

Legend: n inference steps, T training timesteps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

# Re-exported for the modules that reach the whole sampler API through `jaxfuse.schedulers`: the
# settings (`jaxfuse.scheduler_config`) and the host side (`jaxfuse.sampler_coefficients`).
from jaxfuse.sampler_coefficients import Schedule as Schedule
from jaxfuse.sampler_coefficients import head as head
from jaxfuse.sampler_coefficients import lcm_at as lcm_at
from jaxfuse.sampler_coefficients import make_schedule as make_schedule
from jaxfuse.sampler_coefficients import start_step as start_step
from jaxfuse.sampler_coefficients import steps_before as steps_before
from jaxfuse.sampler_coefficients import tail as tail
from jaxfuse.sampler_coefficients import train_alphas_cumprod as train_alphas_cumprod
from jaxfuse.scheduler_config import PredictionType as PredictionType
from jaxfuse.scheduler_config import SchedulerConfig as SchedulerConfig
from jaxfuse.scheduler_config import SchedulerKind as SchedulerKind


@struct.dataclass
class SchedulerState:
    prev_x0: jax.Array  # like the latents, float32: the previous step's x0 (DPM++'s history)
    noise_keys: jax.Array  # [1, 2] or [B, 2] uint32 key data: step i's noise for the batch, or each image's


# Device side: elementwise in the latents, any shape, float32, jit/scan-safe in the step index. The
# step index i is a scalar, or [B] for one step per image (a stream batch, whose rows are at
# different steps); `coefficient_at` then shapes the coefficients [B, 1, ...] to broadcast over each row.


def coefficient_at(coefficients: jax.Array, i: jax.Array, like: jax.Array) -> jax.Array:
    """Step i's coefficient: [] for a scalar i, [B, 1, ...] (as many dims as `like`) for i [B]."""
    c = jnp.asarray(coefficients)[i]
    return c.reshape(c.shape + (1,) * (like.ndim - c.ndim)) if c.ndim else c


def init_state(schedule: Schedule, latents: jax.Array, noise_keys: jax.Array) -> SchedulerState:
    """The scan carry's scheduler part before step 0 (DPM++ has no history yet); `noise_keys`
    (`noise_keys(seeds)`) draw the stochastic samplers' step noise (`step_noise`)."""
    del schedule  # the same state for every kind keeps the carry's structure kind-independent
    # zeros_like, not zeros(shape): inside shard_map the state then varies over the mesh axes
    # the latents vary over, as the scan carry must.
    return SchedulerState(prev_x0=jnp.zeros_like(latents, jnp.float32), noise_keys=noise_keys)


def noise_keys(seeds: Sequence[int], stream: int = 0) -> jax.Array:
    """K seeds -> [K, 2] uint32 key data (plain arrays, which any layout takes): one key for a
    whole batch, or one per image. Another `stream` gives other keys from the same seeds (a
    second model's steps)."""
    return jax.random.key_data(jnp.stack([jax.random.fold_in(jax.random.key(s), stream) if stream
                                          else jax.random.key(s) for s in seeds]))


def step_noise(key_data: jax.Array, i: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Step i's unit Gaussian noise [B, ...] float32 for the whole image: from one key for the
    batch ([1, 2] key data) or one per image ([B, 2]), so that each image's equals a one-image run's."""
    keys = jax.random.wrap_key_data(key_data)
    if keys.shape[0] == 1:
        return jax.random.normal(jax.random.fold_in(keys[0], i), shape, jnp.float32)
    return jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, i), shape[1:], jnp.float32))(keys)


def noised_sample(schedule: Schedule, x0: jax.Array, noise: jax.Array, i: Any) -> jax.Array:
    """A clean x0 [...] at step i's noise level with unit `noise` [...] (diffusers' `add_noise`)."""
    e, f = (coefficient_at(v, i, x0) for v in (schedule.sample_from_x0, schedule.sample_from_noise))
    return e * x0 + f * noise


def scale_model_input(schedule: Schedule, latents: jax.Array, i: jax.Array) -> jax.Array:
    """latents [...] -> the UNet's input [...] at step i (same dtype)."""
    return (latents.astype(jnp.float32) * coefficient_at(schedule.input_scale, i, latents)).astype(latents.dtype)


def predicted_x0(schedule: Schedule, i: jax.Array, model_output: jax.Array, latents: jax.Array) -> jax.Array:
    """The denoised estimate [...] float32 of `latents` [...] at step i from the UNet's output [...]."""
    p, q = (coefficient_at(v, i, latents) for v in (schedule.x0_from_x, schedule.x0_from_output))
    return p * latents.astype(jnp.float32) + q * model_output.astype(jnp.float32)


def step(schedule: Schedule, state: SchedulerState, i: jax.Array, model_output: jax.Array,
         latents: jax.Array, noise: jax.Array | None = None) -> tuple[jax.Array, SchedulerState]:
    """One sampler step: latents [...] at step i and the UNet's output [...] -> latents of step
    i + 1 (same dtype, computed in float32) and the new state. `noise` [...]: the step's unit
    noise, which a stochastic sampler needs (`step_noise`, the same rows as the latents)."""
    if schedule.kind.stochastic and noise is None:
        raise ValueError(f"the {schedule.kind.value} sampler draws fresh noise every step: pass `noise`.")
    x = latents.astype(jnp.float32)
    x0 = predicted_x0(schedule, i, model_output, x)
    a, b, c, d = (coefficient_at(v, i, x) for v in (schedule.next_from_x, schedule.next_from_x0,
                                                   schedule.next_from_prev_x0, schedule.next_from_noise))
    x_next = a * x + b * x0 + c * state.prev_x0
    if schedule.kind.stochastic:
        x_next = x_next + d * noise
    return x_next.astype(latents.dtype), state.replace(prev_x0=x0)
