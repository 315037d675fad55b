"""The diffusers scheduler settings jaxfuse implements: `SchedulerConfig`, read from the
`scheduler_config.json` of any scheduler class, and the choices it names (the sampler,
`SchedulerKind`; the timestep spacing, the prediction type and the beta schedule), with
diffusers' per-class defaults where the classes disagree.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from typing import Any

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
