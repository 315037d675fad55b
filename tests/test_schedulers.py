"""The samplers against diffusers' schedulers: timesteps, initial noise scale and whole denoising
loops driven by a stand-in model (the stochastic ones fed our step noise); the loop as a jitted
`lax.scan`; config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_matches, our_step_noise
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
)
from jax import lax

from jaxfuse import schedulers
from jaxfuse.scheduler_config import SchedulerKind

# diffusers' own schedulers warn about numpy 2's __array__ protocol; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# stabilityai/stable-diffusion-xl-base-1.0 `scheduler/scheduler_config.json`
SDXL_BASE = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}
DIFFUSERS = {
    SchedulerKind.EULER: EulerDiscreteScheduler,
    SchedulerKind.DDIM: DDIMScheduler,
    SchedulerKind.DPMPP_2M: DPMSolverMultistepScheduler,
    SchedulerKind.EULER_ANCESTRAL: EulerAncestralDiscreteScheduler,
    SchedulerKind.LCM: LCMScheduler,
}
SAMPLERS = [(SchedulerKind.EULER, False), (SchedulerKind.EULER, True), (SchedulerKind.DDIM, False),
            (SchedulerKind.DPMPP_2M, False), (SchedulerKind.DPMPP_2M, True), (SchedulerKind.EULER_ANCESTRAL, False),
            (SchedulerKind.LCM, False)]
SAMPLER_IDS = ["euler", "euler-karras", "ddim", "dpmpp-2m", "dpmpp-2m-karras", "euler-ancestral", "lcm"]
NOISE = np.random.default_rng(0).standard_normal((2, 4, 6, 8)).astype(np.float32)
SEEDS = [5, 6]  # one per image: the stochastic samplers' step noise
KEYS = schedulers.noise_keys(SEEDS)


def fake_model(x, t, xp):
    """A smooth stand-in for the UNet, written once for torch and jnp (`xp`): its output depends
    on the model input and the timestep, so errors in either show up downstream."""
    return 0.9 * xp.tanh(x) + 0.1 * xp.cos(0.5 * x + t / 250.0)


def reference_loop(scheduler, num_steps: int) -> np.ndarray:
    """diffusers' denoising loop (as in its pipelines) from NOISE -> final latents; a stochastic
    sampler's step draws our step noise."""
    scheduler.set_timesteps(num_steps)
    x = torch.from_numpy(NOISE) * scheduler.init_noise_sigma
    with our_step_noise(scheduler, SEEDS):
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(x, t)
            x = scheduler.step(fake_model(model_input, float(t), torch), t, x).prev_sample
    return x.numpy()


def loop_step(schedule, carry, i):
    x, state = carry
    model_input = schedulers.scale_model_input(schedule, x, i)
    output = fake_model(model_input, schedule.timesteps[i], jnp)
    noise = schedulers.step_noise(state.noise_keys, i, x.shape) if schedule.kind.stochastic else None
    return schedulers.step(schedule, state, i, output, x, noise), None


def our_loop(schedule) -> jax.Array:
    """The same loop, one eager step at a time."""
    x = jnp.asarray(NOISE) * schedule.init_noise_sigma
    carry = (x, schedulers.init_state(schedule, x, KEYS))
    for i in range(schedule.timesteps.shape[0]):
        carry, _ = loop_step(schedule, carry, jnp.int32(i))
    return carry[0]


@jax.jit
def scan_loop(schedule) -> jax.Array:
    """The same loop as one compiled `lax.scan` over a traced step index."""
    x = jnp.asarray(NOISE) * schedule.init_noise_sigma
    steps = jnp.arange(schedule.timesteps.shape[0], dtype=jnp.int32)
    carry = (x, schedulers.init_state(schedule, x, KEYS))
    (x, _), _ = lax.scan(lambda c, i: loop_step(schedule, c, i), carry, steps)
    return x


def ours_and_diffusers(kind, config, num_steps):
    """Our schedule and diffusers' scheduler (its timesteps not set yet) for one config dict."""
    schedule = schedulers.make_schedule(kind, schedulers.SchedulerConfig.from_diffusers(config), num_steps)
    return schedule, DIFFUSERS[kind].from_config(config)


# 4 and 20 steps fall either side of DPM++'s 15-step `lower_order_final` threshold.
@pytest.mark.parametrize("num_steps", [4, 20, 50])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("kind, karras", SAMPLERS, ids=SAMPLER_IDS)
def test_matches_diffusers(kind, karras, spacing, prediction_type, num_steps):
    config = dict(SDXL_BASE, timestep_spacing=spacing, prediction_type=prediction_type,
                  use_karras_sigmas=karras)
    schedule, reference = ours_and_diffusers(kind, config, num_steps)
    expected = reference_loop(reference, num_steps)
    # Euler's Karras timesteps are fractional, interpolated from sigmas that PyTorch's float32
    # betas can move by an ulp; every other timestep is exact.
    rtol = 1e-5 if kind is SchedulerKind.EULER and karras else 0  # measured 7.0e-7 (Euler Karras, EPYC), 0 (others)
    np.testing.assert_allclose(schedule.timesteps, reference.timesteps.numpy().astype(np.float32), rtol=rtol)
    np.testing.assert_allclose(schedule.init_noise_sigma, float(reference.init_noise_sigma),
                               rtol=2e-6)  # measured 1.7e-7
    assert_matches(our_loop(schedule), expected, tol=2e-5)  # measured 1.9e-6 (DDIM linspace v 50, EPYC)


@pytest.mark.parametrize("kind, karras", SAMPLERS, ids=SAMPLER_IDS)
def test_scan_loop_equals_python_loop(kind, karras):
    cfg = schedulers.SchedulerConfig.from_diffusers(SDXL_BASE)
    schedule = schedulers.make_schedule(kind, cfg, 12, use_karras_sigmas=karras)
    assert_matches(scan_loop(schedule), np.asarray(our_loop(schedule)), tol=5e-6)  # measured 4.5e-7 (DPM++ Karras)


@pytest.mark.parametrize("kind", list(SchedulerKind))
def test_another_class_config_as_from_config_reads_it(kind):
    """Switching samplers by name: keys the Euler config left at Euler's defaults (listed in
    `_use_default_values`) and keys it lacks take the new class's defaults (DDIM: "leading")."""
    source = EulerDiscreteScheduler.from_config({"clip_sample": False}).config
    schedule, reference = ours_and_diffusers(kind, dict(source), 20)
    expected = reference_loop(reference, 20)
    np.testing.assert_array_equal(schedule.timesteps, reference.timesteps.numpy().astype(np.float32))
    assert_matches(our_loop(schedule), expected, tol=5e-6)  # measured 4.4e-7 (DDIM)


@pytest.mark.parametrize("setting", [{"lower_order_final": False}, {"euler_at_final": True},
                                     {"solver_type": "bh2"}],
                         ids=["lower_order_final", "euler_at_final", "unipc-solver-type"])
def test_dpm_settings_read_without_effect(setting):
    config = dict(SDXL_BASE, **setting)
    schedule, reference = ours_and_diffusers(SchedulerKind.DPMPP_2M, config, 10)
    assert_matches(our_loop(schedule), reference_loop(reference, 10), tol=5e-6)  # measured 4.7e-7


def test_karras_argument_overrides_the_config():
    cfg = schedulers.SchedulerConfig.from_diffusers(dict(SDXL_BASE, use_karras_sigmas=True))
    plain_cfg = schedulers.SchedulerConfig.from_diffusers(SDXL_BASE)
    for kind in (SchedulerKind.EULER, SchedulerKind.DPMPP_2M):
        overridden = schedulers.make_schedule(kind, plain_cfg, 9, use_karras_sigmas=True)
        from_config = schedulers.make_schedule(kind, cfg, 9)
        jax.tree.map(np.testing.assert_array_equal, overridden, from_config)
        plain = schedulers.make_schedule(kind, cfg, 9, use_karras_sigmas=False)
        assert not np.array_equal(plain.timesteps, from_config.timesteps)


def test_step_is_elementwise():
    """A device stepping its own rows gets the rows of the whole image's step (DPM++: with state)."""
    cfg = schedulers.SchedulerConfig.from_diffusers(SDXL_BASE)
    schedule = schedulers.make_schedule(SchedulerKind.DPMPP_2M, cfg, 8)
    x = jnp.asarray(NOISE)
    rows = x[:, :, 2:5]
    whole = (x, schedulers.init_state(schedule, x, KEYS))
    part = (rows, schedulers.init_state(schedule, rows, KEYS))
    for i in range(3):
        whole, _ = loop_step(schedule, whole, i)
        part, _ = loop_step(schedule, part, i)
    np.testing.assert_array_equal(part[0], whole[0][:, :, 2:5])


@pytest.mark.parametrize("start", [1, 5])
@pytest.mark.parametrize("kind, karras", SAMPLERS, ids=SAMPLER_IDS)
def test_a_loop_from_a_noised_image_matches_diffusers(kind, karras, start):
    """Image-to-image: x0 noised to step `start`'s level, then the rest of the schedule, as
    diffusers' img2img pipelines drive a scheduler (`set_begin_index`, `add_noise`)."""
    config = dict(SDXL_BASE, use_karras_sigmas=karras)
    schedule, reference = ours_and_diffusers(kind, config, 8)
    x0, noise = np.tanh(NOISE), np.random.default_rng(1).standard_normal(NOISE.shape).astype(np.float32)
    reference.set_timesteps(8)
    if hasattr(reference, "set_begin_index"):  # as the pipelines call it (DDIM has none)
        reference.set_begin_index(start)
    first = reference.timesteps[start:start + 1]
    x = reference.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), first)
    with our_step_noise(reference, SEEDS):  # counted from `start`, the scheduler's begin_index
        for t in reference.timesteps[start:]:
            out = fake_model(reference.scale_model_input(x, t), float(t), torch)
            x = reference.step(out, t, x).prev_sample

    rest = schedulers.tail(schedule, start)
    np.testing.assert_allclose(rest.timesteps, reference.timesteps[start:].numpy().astype(np.float32),
                               rtol=1e-5)  # Euler Karras's fractional ones: measured 1.4e-7; the others 0
    ours = schedulers.noised_sample(schedule, jnp.asarray(x0), jnp.asarray(noise), start)
    carry = (ours, schedulers.init_state(rest, ours, KEYS))
    for i in range(8 - start):
        carry, _ = loop_step(rest, carry, jnp.int32(i))
    assert_matches(carry[0], x.numpy(), tol=1e-5)  # measured 5.9e-7 (DPM++ Karras from step 1)


def test_start_step_counts_as_diffusers():
    assert [schedulers.start_step(8, s) for s in (1.0, 0.8, 0.5, 0.13, 0.125)] == [0, 2, 4, 7, 7]


def test_step_noise_per_image_equals_a_one_image_run():
    """[B] keys: image b's noise is a one-image draw from key b; [1] key: one draw for the batch;
    each step's differs."""
    per_image = schedulers.step_noise(KEYS, 3, (2, 4, 6, 8))
    np.testing.assert_array_equal(per_image[1:], schedulers.step_noise(KEYS[1:], 3, (1, 4, 6, 8)))
    batch = schedulers.step_noise(KEYS[:1], 3, (2, 4, 6, 8))
    assert batch.shape == (2, 4, 6, 8) and not np.allclose(batch[0], batch[1])
    assert not np.allclose(per_image, schedulers.step_noise(KEYS, 4, (2, 4, 6, 8)))
    assert abs(float(per_image.std()) - 1) < 0.1  # 384 unit Gaussian draws: about 3 sigma; measured 0.990


@pytest.mark.parametrize("original, scaling", [(50, 10.0), (20, 5.0), (8, 10.0)])
def test_lcm_original_steps_and_timestep_scaling(original, scaling):
    config = dict(SDXL_BASE, original_inference_steps=original, timestep_scaling=scaling)
    schedule, reference = ours_and_diffusers(SchedulerKind.LCM, config, 4)
    expected = reference_loop(reference, 4)
    np.testing.assert_array_equal(schedule.timesteps, reference.timesteps.numpy().astype(np.float32))
    assert_matches(our_loop(schedule), expected, tol=1e-5)  # measured 1.9e-7 (as the other loops' bounds)


def test_lcm_refuses_more_steps_than_its_original_schedule():
    cfg = schedulers.SchedulerConfig.from_diffusers(dict(SDXL_BASE, original_inference_steps=8))
    with pytest.raises(ValueError, match="^num_steps: LCM takes at most original_inference_steps = 8"):
        schedulers.make_schedule(SchedulerKind.LCM, cfg, 9)


def test_a_stochastic_step_without_noise_is_refused():
    cfg = schedulers.SchedulerConfig.from_diffusers(SDXL_BASE)
    schedule = schedulers.make_schedule(SchedulerKind.EULER_ANCESTRAL, cfg, 4)
    x = jnp.asarray(NOISE)
    with pytest.raises(ValueError, match="euler-ancestral sampler draws fresh noise"):
        schedulers.step(schedule, schedulers.init_state(schedule, x, KEYS), 0, x, x)


@pytest.mark.parametrize("field, value", [
    ("beta_schedule", "squaredcos_cap_v2"),
    ("prediction_type", "sample"),
    ("timestep_spacing", "uniform"),
    ("timestep_type", "continuous"),
    ("thresholding", True),
    ("clip_sample", True),
    ("trained_betas", [0.01] * 1000),
    ("rescale_betas_zero_snr", True),
    ("interpolation_type", "log_linear"),
    ("final_sigmas_type", "sigma_min"),
    ("use_exponential_sigmas", True),
    ("algorithm_type", "sde-dpmsolver++"),
    ("solver_order", 3),
    ("solver_type", "heun"),
])
def test_unsupported_setting_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}: "):
        schedulers.SchedulerConfig.from_diffusers(dict(SDXL_BASE, **{field: value}))


@pytest.mark.parametrize("kind", [SchedulerKind.DDIM, SchedulerKind.EULER_ANCESTRAL, SchedulerKind.LCM])
def test_samplers_without_karras_sigmas_refuse_them(kind):
    cfg = schedulers.SchedulerConfig.from_diffusers(SDXL_BASE)
    with pytest.raises(ValueError, match=f"^use_karras_sigmas: {kind.value} has no Karras sigmas"):
        schedulers.make_schedule(kind, cfg, 10, use_karras_sigmas=True)


def test_ddim_refuses_a_config_without_clip_sample():
    """diffusers' DDIM clips x0 when the key is absent; the other samplers have no such setting."""
    assert DDIMScheduler.from_config({}).config.clip_sample
    cfg = schedulers.SchedulerConfig.from_diffusers({})
    with pytest.raises(ValueError, match="^clip_sample: "):
        schedulers.make_schedule(SchedulerKind.DDIM, cfg, 10)
    schedulers.make_schedule(SchedulerKind.EULER, cfg, 10)


def test_step_counts_diffusers_cannot_schedule():
    cfg = schedulers.SchedulerConfig.from_diffusers(dict(SDXL_BASE, timestep_spacing="trailing"))
    with pytest.raises(ValueError, match="^num_steps: "):
        schedulers.make_schedule(SchedulerKind.EULER, cfg, 0)
    # 61 trailing steps: diffusers' rounding schedules 62 timesteps, the last one -1.
    reference = DDIMScheduler.from_config(dict(SDXL_BASE, timestep_spacing="trailing"))
    reference.set_timesteps(61)
    assert len(reference.timesteps) == 62
    with pytest.raises(ValueError, match=r"^num_steps: 61 .* 60, 62"):
        schedulers.make_schedule(SchedulerKind.DDIM, cfg, 61)


def test_unknown_sampler_name():
    with pytest.raises(ValueError, match="heun"):
        SchedulerKind("heun")
