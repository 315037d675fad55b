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

import dataclasses
import enum
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxfuse.config import ConfigError


class SchedulerKind(str, enum.Enum):
    EULER = "euler"
    DDIM = "ddim"
    DPMPP_2M = "dpmpp-2m"
    EULER_ANCESTRAL = "euler-ancestral"
    LCM = "lcm"

    @property
    def stochastic(self) -> bool:
        """Each step draws fresh noise."""
        return self in (SchedulerKind.EULER_ANCESTRAL, SchedulerKind.LCM)


class TimestepSpacing(str, enum.Enum):
    LINSPACE = "linspace"
    LEADING = "leading"
    TRAILING = "trailing"


class PredictionType(str, enum.Enum):
    EPSILON = "epsilon"
    V_PREDICTION = "v_prediction"


class BetaSchedule(str, enum.Enum):
    LINEAR = "linear"
    SCALED_LINEAR = "scaled_linear"


# diffusers' defaults where the classes disagree; `from_config` gives each class its own. (LCM
# reads no spacing: its timesteps are a subset of its original schedule's.)
_DEFAULT_SPACING = {
    SchedulerKind.EULER: TimestepSpacing.LINSPACE,
    SchedulerKind.DDIM: TimestepSpacing.LEADING,
    SchedulerKind.DPMPP_2M: TimestepSpacing.LINSPACE,
    SchedulerKind.EULER_ANCESTRAL: TimestepSpacing.LINSPACE,
    SchedulerKind.LCM: TimestepSpacing.LEADING,
}
# (beta_start, beta_end, beta_schedule): DDPM's, but for LCM, whose class defaults to SD's.
_DEFAULT_BETAS = (0.0001, 0.02, BetaSchedule.LINEAR)
_LCM_BETAS = (0.00085, 0.012, BetaSchedule.SCALED_LINEAR)

# Settings read but implemented only at these values (the first is diffusers' default). They are
# refused whichever sampler is later picked, so that switching samplers never meets a late error.
# diffusers reads the DEIS and UniPC solver types as "midpoint". Keys named nowhere are ignored,
# as `from_config` ignores other schedulers' keys: among them `lower_order_final` and
# `euler_at_final` (no effect on 2M once the last sigma is zero) and the thresholding and
# clipping ranges (used only when thresholding or clipping is on).
_FIXED: dict[str, tuple[Any, ...]] = {
    "trained_betas": (None,),
    "rescale_betas_zero_snr": (False,),
    "thresholding": (False,),
    "timestep_type": ("discrete",),
    "interpolation_type": ("linear",),
    "final_sigmas_type": ("zero",),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
    "sigma_min": (None,),
    "sigma_max": (None,),
    "lambda_min_clipped": (-math.inf,),
    "variance_type": (None,),
    "solver_order": (2,),
    "algorithm_type": ("dpmsolver++",),
    "solver_type": ("midpoint", "logrho", "bh1", "bh2"),
}


def _unsupported(name: str, value: Any, supported: Any) -> ConfigError:
    return ConfigError(f"{name}: {value!r} is not supported; supported: {supported}.")


def _choice(config: Mapping[str, Any], name: str, choices: type[enum.Enum], default: Any) -> Any:
    """config[name] as a member of the str Enum `choices`; `default` when absent or null."""
    value = config.get(name)
    if value is None:
        return default
    try:
        return choices(value)
    except ValueError:
        raise _unsupported(name, value, [c.value for c in choices]) from None


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The diffusers scheduler settings jaxfuse implements, one config for all the samplers.

    Defaults are diffusers'. Where the samplers' diffusers defaults differ, an absent key is kept
    as None and `make_schedule` applies the chosen sampler's default: the betas (LCM's are SD's
    scaled-linear 0.00085-0.012, the others DDPM's linear 0.0001-0.02), `timestep_spacing` (DDIM
    "leading", Euler and DPM++ "linspace"), `set_alpha_to_one` (DDIM only, default True) and
    `clip_sample` (DDIM only, default True, which is not supported, so DDIM refuses a config
    without it; an explicit True is refused when read).
    """

    num_train_timesteps: int = 1000
    beta_start: float | None = None
    beta_end: float | None = None
    beta_schedule: BetaSchedule | None = None
    prediction_type: PredictionType = PredictionType.EPSILON
    timestep_spacing: TimestepSpacing | None = None
    steps_offset: int = 0
    use_karras_sigmas: bool = False
    set_alpha_to_one: bool | None = None
    clip_sample: bool | None = None
    original_inference_steps: int = 50  # LCM: the distillation schedule its timesteps come from
    timestep_scaling: float = 10.0  # LCM: the timestep scale of its boundary condition

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> SchedulerConfig:
        """Reads a diffusers `scheduler_config.json` dict of any scheduler class; raises
        `ConfigError` (a ValueError) naming the field of an unsupported setting."""
        # Keys diffusers filled with the saving class's defaults: another class uses its own.
        defaulted = set(config.get("_use_default_values", ()))
        config = {k: v for k, v in config.items() if k not in defaulted}
        for name, supported in _FIXED.items():
            value = config.get(name, supported[0])
            if value not in supported:
                raise _unsupported(name, value, list(supported))
        if config.get("clip_sample"):
            raise _unsupported("clip_sample", True, [False])
        return cls(
            num_train_timesteps=int(config.get("num_train_timesteps", cls.num_train_timesteps)),
            beta_start=None if config.get("beta_start") is None else float(config["beta_start"]),
            beta_end=None if config.get("beta_end") is None else float(config["beta_end"]),
            beta_schedule=_choice(config, "beta_schedule", BetaSchedule, None),
            prediction_type=_choice(config, "prediction_type", PredictionType, cls.prediction_type),
            timestep_spacing=_choice(config, "timestep_spacing", TimestepSpacing, None),
            steps_offset=int(config.get("steps_offset", cls.steps_offset)),
            use_karras_sigmas=bool(config.get("use_karras_sigmas", cls.use_karras_sigmas)),
            set_alpha_to_one=config.get("set_alpha_to_one"),
            clip_sample=config.get("clip_sample"),
            original_inference_steps=int(config.get("original_inference_steps", cls.original_inference_steps)),
            timestep_scaling=float(config.get("timestep_scaling", cls.timestep_scaling)),
        )

    def for_sampler(self, kind: SchedulerKind) -> SchedulerConfig:
        """This config with the betas and spacing it left out at `kind`'s diffusers defaults."""
        start, end, schedule = _LCM_BETAS if kind is SchedulerKind.LCM else _DEFAULT_BETAS
        return dataclasses.replace(
            self,
            beta_start=start if self.beta_start is None else self.beta_start,
            beta_end=end if self.beta_end is None else self.beta_end,
            beta_schedule=self.beta_schedule or schedule,
            timestep_spacing=self.timestep_spacing or _DEFAULT_SPACING[kind],
        )


@struct.dataclass
class Schedule:
    """A sampler for n steps: the UNet's timesteps and the per-step coefficients (module doc)."""

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


@struct.dataclass
class SchedulerState:
    prev_x0: jax.Array  # like the latents, float32: the previous step's x0 (DPM++'s history)
    noise_keys: jax.Array  # [1, 2] or [B, 2] uint32 key data: step i's noise for the batch, or each image's


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


def noise_keys(seeds: Sequence[int]) -> jax.Array:
    """K seeds -> [K, 2] uint32 key data (plain arrays, which any layout takes): one key for a
    whole batch, or one per image."""
    return jax.random.key_data(jnp.stack([jax.random.key(s) for s in seeds]))


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
