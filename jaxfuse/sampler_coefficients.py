"""The samplers' host side: each sampler's formulas run once, in numpy, before tracing, into a
`Schedule` of per-step coefficients (p, q, a, b, c, d, e, f: the module docstring of
`jaxfuse.schedulers` says what each one multiplies). `make_schedule` for a whole run, `tail`
for image-to-image from a later step, `lcm_at` for the steps a stream picks.

Legend: n inference steps, T training timesteps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import struct

from jaxfuse.config import ConfigError
from jaxfuse.scheduler_config import BetaSchedule, PredictionType, SchedulerConfig, SchedulerKind, TimestepSpacing


@struct.dataclass
class Schedule:
    """A sampler for n steps: the UNet's timesteps and the per-step coefficients (`jaxfuse.schedulers`)."""

    timesteps: jax.Array  # [n] float32, the UNet's timestep at step i (diffusers' `timesteps`)
    input_scale: jax.Array  # [n] the UNet sees latents * input_scale[i] (1 but for Euler)
    x0_from_x: jax.Array  # [n] p
    x0_from_output: jax.Array  # [n] q
    next_from_x: jax.Array  # [n] a
    next_from_x0: jax.Array  # [n] b
    next_from_prev_x0: jax.Array  # [n] c
    next_from_noise: jax.Array  # [n] d
    sample_from_x0: jax.Array  # [n] e: step i's sample of a clean x0 and unit noise z is e x0 + f z
    sample_from_noise: jax.Array  # [n] f
    init_noise_sigma: jax.Array  # [] float32: initial latents = unit noise * init_noise_sigma
    kind: SchedulerKind = struct.field(pytree_node=False)


# Host side: numpy, float64 except where diffusers rounds to float32 (noted).


def train_alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    """[T] float32 cumulative products of 1 - beta, rounded as diffusers (PyTorch on CPU) does:
    betas in float32, the product accumulated in float64. `cfg` names its betas (`for_sampler`)."""
    t = cfg.num_train_timesteps
    if cfg.beta_schedule is BetaSchedule.SCALED_LINEAR:
        betas = np.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, t).astype(np.float32) ** 2
    else:
        betas = np.linspace(cfg.beta_start, cfg.beta_end, t).astype(np.float32)
    return np.cumprod((1 - betas).astype(np.float64)).astype(np.float32)


def _spaced_timesteps(spacing: TimestepSpacing, n: int, t: int, steps_offset: int) -> np.ndarray:
    """n descending timesteps in [0, T) (fractional for "linspace"), as diffusers spaces them."""
    if spacing is TimestepSpacing.LINSPACE:
        return np.linspace(0, t - 1, n)[::-1]
    if spacing is TimestepSpacing.LEADING:
        return (np.arange(n) * (t // n))[::-1] + float(steps_offset)
    timesteps = np.round(np.arange(t, 0, -t / n)) - 1
    if len(timesteps) != n:  # arange's floating-point stop: n + 1 values, the last one -1
        valid = [m for m in range(n - 3, n + 4) if len(np.arange(t, 0, -t / m)) == m]
        raise ConfigError(
            f"num_steps: {n} with timestep_spacing 'trailing' makes diffusers schedule {len(timesteps)} "
            f"timesteps, the last one -1; nearby step counts that work: {valid}."
        )
    return timesteps


def _karras_sigmas(sigma_max: float, sigma_min: float, n: int) -> np.ndarray:
    """[n] noise levels from sigma_max to sigma_min, evenly spaced in sigma^(1/7) (Karras et al.)."""
    rho = 7.0
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (hi + np.linspace(0, 1, n) * (lo - hi)) ** rho


def _sigma_to_timestep(sigmas: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """[n] noise levels -> [n] fractional timesteps, interpolating log sigma over the [T] training
    levels (clamped to [0, T - 1])."""
    return np.interp(np.log(sigmas), np.log(train_sigmas), np.arange(len(train_sigmas)))


def _x0_coefficients(alpha: np.ndarray, sigma: np.ndarray, prediction: PredictionType):
    """(p, q), each like `alpha`: x0 = p x + q model_output for samples x = alpha x0 + sigma noise."""
    if prediction is PredictionType.EPSILON:
        return 1 / alpha, -sigma / alpha
    return alpha, -sigma  # v = alpha noise - sigma x0


def _first_order(alpha: np.ndarray, sigma: np.ndarray, alpha_next: np.ndarray, sigma_next: np.ndarray):
    """(a, b), each like `alpha`: x_next = a x + b x0 = alpha_next x0 + sigma_next noise, with the
    noise estimated as (x - alpha x0) / sigma (DDIM, DPM-Solver++ order 1, Euler)."""
    a = sigma_next / sigma
    return a, alpha_next - a * alpha


def _vp_levels(sigmas: np.ndarray):
    """Noise-to-signal ratios sigma -> (alpha, sigma) of x = alpha x0 + sigma noise, alpha^2 + sigma^2 = 1."""
    alpha = 1 / np.sqrt(sigmas**2 + 1)
    return alpha, sigmas * alpha


def _schedule(kind: SchedulerKind, timesteps: np.ndarray, x0_coefficients, next_coefficients, levels,
              prev_x0_coefficient: Any = 0.0, noise_coefficient: Any = 0.0, input_scale: Any = 1.0,
              init_noise_sigma: float = 1.0) -> Schedule:
    """A `Schedule` from host arrays ([n] or scalars broadcast to [n]), as float32 numpy arrays
    (building one starts no JAX backend, so a request is checked before the processes join);
    `levels`: (e, f), each step's sample e x0 + f noise."""

    def per_step(v):
        return np.array(np.broadcast_to(v, timesteps.shape), np.float32)

    (p, q), (a, b) = x0_coefficients, next_coefficients
    return Schedule(
        timesteps=per_step(timesteps),
        input_scale=per_step(input_scale),
        x0_from_x=per_step(p),
        x0_from_output=per_step(q),
        next_from_x=per_step(a),
        next_from_x0=per_step(b),
        next_from_prev_x0=per_step(prev_x0_coefficient),
        next_from_noise=per_step(noise_coefficient),
        sample_from_x0=per_step(levels[0]),
        sample_from_noise=per_step(levels[1]),
        init_noise_sigma=np.float32(init_noise_sigma),
        kind=kind,
    )


def _euler(cfg: SchedulerConfig, n: int, spacing: TimestepSpacing, karras: bool, ancestral: bool) -> Schedule:
    """Euler steps on x = x0 + sigma noise; the UNet sees alpha x (the sample it was trained on).
    `ancestral`: each step goes down to sigma_down and adds sigma_up of fresh noise, where
    sigma_up^2 + sigma_down^2 = sigma_next^2 and sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2."""
    alphas_cumprod = train_alphas_cumprod(cfg)
    train_sigmas = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)  # float32, as diffusers
    t = cfg.num_train_timesteps
    timesteps = _spaced_timesteps(spacing, n, t, cfg.steps_offset).astype(np.float32)
    sigmas = np.interp(timesteps, np.arange(t), train_sigmas)
    if karras:  # between the sigmas of the first and last spaced timesteps
        sigmas = _karras_sigmas(sigmas[0], sigmas[-1], n)
        timesteps = _sigma_to_timestep(sigmas, train_sigmas).astype(np.float32)
    sigmas = np.append(sigmas, 0.0).astype(np.float32).astype(np.float64)
    init_noise_sigma = sigmas.max()
    if spacing is TimestepSpacing.LEADING:  # diffusers' rule for "leading" only; kept for equal outputs
        init_noise_sigma = math.sqrt(init_noise_sigma**2 + 1)
    alpha, vp_sigma = _vp_levels(sigmas[:-1])
    p, q = _x0_coefficients(alpha, vp_sigma, cfg.prediction_type)
    ones = np.ones(n)
    sigma, target = sigmas[:-1], sigmas[1:]
    up = np.sqrt(target**2 * (sigma**2 - target**2) / sigma**2) if ancestral else np.zeros(n)
    return _schedule(
        SchedulerKind.EULER_ANCESTRAL if ancestral else SchedulerKind.EULER,
        timesteps,
        (p * alpha, q),  # Euler's sample is the VP sample divided by alpha
        _first_order(ones, sigma, ones, np.sqrt(target**2 - up**2)),
        (ones, sigma),
        noise_coefficient=up,
        input_scale=alpha,
        init_noise_sigma=init_noise_sigma,
    )


def _ddim(cfg: SchedulerConfig, n: int, spacing: TimestepSpacing) -> Schedule:
    """DDIM (eta = 0) from each timestep t to t - T // n: diffusers' target even where that is not
    the next scheduled timestep ("linspace", "trailing")."""
    alphas_cumprod = train_alphas_cumprod(cfg).astype(np.float64)
    t = cfg.num_train_timesteps
    timesteps = np.round(_spaced_timesteps(spacing, n, t, cfg.steps_offset)).astype(np.int64)
    targets = timesteps - t // n
    final = alphas_cumprod[0] if cfg.set_alpha_to_one is False else 1.0  # None: DDIM's default
    target_cumprod = np.where(targets >= 0, alphas_cumprod[np.maximum(targets, 0)], final)
    alpha, sigma = np.sqrt(alphas_cumprod[timesteps]), np.sqrt(1 - alphas_cumprod[timesteps])
    return _schedule(
        SchedulerKind.DDIM,
        timesteps,
        _x0_coefficients(alpha, sigma, cfg.prediction_type),
        _first_order(alpha, sigma, np.sqrt(target_cumprod), np.sqrt(1 - target_cumprod)),
        (alpha, sigma),
    )


def _dpmpp_2m(cfg: SchedulerConfig, n: int, spacing: TimestepSpacing, karras: bool) -> Schedule:
    """DPM-Solver++(2M) with the midpoint rule: the first-order update plus a correction from the
    change of x0 between steps, weighted by the ratio of the steps' log-SNR increments."""
    alphas_cumprod = train_alphas_cumprod(cfg)
    train_sigmas = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)  # float32, as diffusers
    t = cfg.num_train_timesteps
    if karras:  # between the extreme training sigmas, unlike Euler's
        sigmas = _karras_sigmas(float(train_sigmas[-1]), float(train_sigmas[0]), n)
        timesteps = np.round(_sigma_to_timestep(sigmas, train_sigmas))
    else:  # diffusers spaces n + 1 points and drops the last, except for "trailing"
        if spacing is TimestepSpacing.TRAILING:
            timesteps = _spaced_timesteps(spacing, n, t, cfg.steps_offset)
        else:
            timesteps = _spaced_timesteps(spacing, n + 1, t, cfg.steps_offset)[:-1]
        timesteps = np.round(timesteps).astype(np.int64)
        sigmas = train_sigmas[timesteps]
    sigmas = np.append(sigmas, 0.0).astype(np.float32).astype(np.float64)
    alpha, sigma = _vp_levels(sigmas)
    a, b = _first_order(alpha[:-1], sigma[:-1], alpha[1:], sigma[1:])
    log_snr = np.log(alpha[:-1]) - np.log(sigma[:-1])  # finite: the final zero sigma is left out
    h = np.diff(log_snr)  # h[i]: the increment of step i, i < n - 1
    # Second order needs a previous x0, so not at step 0; and diffusers takes first order for the
    # last step, which lands on sigma 0 (that rule makes `lower_order_final` moot for 2M).
    second = np.arange(1, n - 1)
    weight = np.zeros(n)
    weight[second] = 0.5 * h[second] / h[second - 1]
    return _schedule(
        SchedulerKind.DPMPP_2M,
        timesteps,
        _x0_coefficients(alpha[:-1], sigma[:-1], cfg.prediction_type),
        (a, b * (1 + weight)),
        (alpha[:-1], sigma[:-1]),
        prev_x0_coefficient=-b * weight,
    )


def _lcm_timesteps(cfg: SchedulerConfig, n: int) -> np.ndarray:
    """LCM's n timesteps: evenly spaced picks of the `original_inference_steps` distillation ones."""
    original, t = cfg.original_inference_steps, cfg.num_train_timesteps
    if not 1 <= original <= t:
        raise ConfigError(f"original_inference_steps: {original} must be in [1, {t}].")
    if n > original:
        raise ConfigError(f"num_steps: LCM takes at most original_inference_steps = {original} steps, got {n}.")
    origin = (np.arange(1, original + 1) * (t // original) - 1)[::-1]
    return origin[np.floor(np.linspace(0, original, n, endpoint=False)).astype(np.int64)]


def _lcm(cfg: SchedulerConfig, timesteps: np.ndarray) -> Schedule:
    """LCM at `timesteps`: each step's x0 the boundary-conditioned c_skip x + c_out x0_model (sigma_data
    0.5), noised to the next timestep but for the last step, which returns it."""
    alphas_cumprod = train_alphas_cumprod(cfg).astype(np.float64)
    alpha, sigma = np.sqrt(alphas_cumprod[timesteps]), np.sqrt(1 - alphas_cumprod[timesteps])
    p, q = _x0_coefficients(alpha, sigma, cfg.prediction_type)
    scaled = timesteps * cfg.timestep_scaling
    c_skip, c_out = 0.25 / (scaled**2 + 0.25), scaled / np.sqrt(scaled**2 + 0.25)
    next_cumprod = np.append(alphas_cumprod[timesteps[1:]], 1.0)  # the last step: x0, no noise
    return _schedule(
        SchedulerKind.LCM,
        timesteps,
        (c_out * p + c_skip, c_out * q),
        (0.0, np.sqrt(next_cumprod)),
        (alpha, sigma),
        noise_coefficient=np.sqrt(1 - next_cumprod),
    )


def make_schedule(kind: SchedulerKind, cfg: SchedulerConfig, num_steps: int,
                  use_karras_sigmas: bool | None = None) -> Schedule:
    """The schedule of `kind` for `num_steps` steps; `use_karras_sigmas` None follows `cfg`.

    Host-side numpy, run once before tracing; raises `ConfigError` (a ValueError) for a setting
    this sampler cannot honour.
    """
    kind = SchedulerKind(kind)
    karras = cfg.use_karras_sigmas if use_karras_sigmas is None else use_karras_sigmas
    if not 1 <= num_steps <= cfg.num_train_timesteps:
        raise ConfigError(f"num_steps: {num_steps} must be in [1, {cfg.num_train_timesteps}].")
    cfg = cfg.for_sampler(kind)
    spacing = cfg.timestep_spacing
    if kind is SchedulerKind.EULER:
        return _euler(cfg, num_steps, spacing, karras, ancestral=False)
    if kind is SchedulerKind.DPMPP_2M:
        return _dpmpp_2m(cfg, num_steps, spacing, karras)
    if karras:
        raise ConfigError(
            f"use_karras_sigmas: {kind.value} has no Karras sigmas; pass use_karras_sigmas=False or pick "
            "euler or dpmpp-2m."
        )
    if kind is SchedulerKind.EULER_ANCESTRAL:
        return _euler(cfg, num_steps, spacing, karras, ancestral=True)
    if kind is SchedulerKind.LCM:
        return _lcm(cfg, _lcm_timesteps(cfg, num_steps))
    if cfg.clip_sample is None:
        raise ConfigError(
            "clip_sample: absent from the config, so diffusers' DDIM would clip x0 to [-1, 1] "
            "(its default), which jaxfuse does not implement; set clip_sample to false."
        )
    return _ddim(cfg, num_steps, spacing)


def start_step(num_steps: int, strength: float) -> int:
    """Image-to-image: the step a run of `num_steps` at `strength` (0, 1] starts at, as diffusers
    counts it (`int(num_steps * strength)` steps run, at least one: see `PipelineSpec.request`)."""
    return num_steps - min(int(num_steps * strength), num_steps)


def steps_before(kind: SchedulerKind, cfg: SchedulerConfig, num_steps: int, fraction: float) -> int:
    """How many of the schedule's first steps lie before `fraction` of the noise is removed, as
    diffusers' `denoising_end`/`denoising_start` count them: the steps whose timestep is at least
    round((1 - fraction) T)."""
    cutoff = int(round(cfg.num_train_timesteps - fraction * cfg.num_train_timesteps))  # diffusers' rounding
    return int(np.sum(np.asarray(make_schedule(kind, cfg, num_steps).timesteps) >= cutoff))


def head(schedule: Schedule, stop: int) -> Schedule:
    """The schedule's first `stop` steps (a model that hands its latents on to another)."""
    return jax.tree.map(lambda v: np.array(v[:stop] if np.ndim(v) else v), schedule)


def tail(schedule: Schedule, start: int) -> Schedule:
    """The schedule from step `start` on. Its first step has no previous x0, so a second-order
    step there falls back to first order (DPM++ from a noised image, as diffusers does): the
    history term's weight folds into x0's."""
    rest = jax.tree.map(lambda v: np.array(v[start:] if np.ndim(v) else v), schedule)
    rest.next_from_x0[0] += rest.next_from_prev_x0[0]
    rest.next_from_prev_x0[0] = 0.0
    return rest


def lcm_at(cfg: SchedulerConfig, num_steps: int, indices: Sequence[int]) -> Schedule:
    """LCM stepping through the steps `indices` (ascending) of its `num_steps`-step schedule only,
    each noised to the next listed step's timestep (StreamDiffusion's `t_index_list`)."""
    cfg = cfg.for_sampler(SchedulerKind.LCM)
    timesteps = _lcm_timesteps(cfg, num_steps)
    if not indices or list(indices) != sorted(set(indices)) or not 0 <= indices[0] <= indices[-1] < num_steps:
        raise ConfigError(f"t_index_list: {list(indices)} must be distinct steps of 0..{num_steps - 1} in "
                          "ascending order, e.g. [32, 45].")
    return _lcm(cfg, timesteps[np.asarray(indices)])
