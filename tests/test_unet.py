"""The Flax UNet against diffusers' UNet2DConditionModel on the same random weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import relative_error

import jaxfuse
from jaxfuse.models.unet import UNet2DConditionModel
from jaxfuse.oracle import CASES, random_unet, reference_output, unet_inputs


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(diffusers folder, inputs, diffusers fp32 output) for one SDXL-shaped config."""
    config, num_time_ids = CASES[request.param]
    model = random_unet(config)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    inputs = unet_inputs(config, num_time_ids)  # batch 2, a 16x24 latent
    return folder, inputs, reference_output(model, inputs)


def apply(unet, params, inputs):
    return jax.jit(unet.apply)(
        {"params": params}, inputs["sample"], inputs["timesteps"], inputs["encoder_hidden_states"],
        text_embeds=inputs["text_embeds"], time_ids=inputs["time_ids"],
    )




def test_fp32_equals_diffusers(case):
    folder, inputs, ref = case
    unet, params = jaxfuse.load_unet(folder)
    out = apply(unet, params, inputs)
    assert out.shape == ref.shape and out.dtype == jnp.float32
    assert relative_error(out, ref) <= 1e-5  # measured 1.4e-6


def test_bf16_stays_close_to_diffusers_fp32(case):
    folder, inputs, ref = case
    unet, params = jaxfuse.load_unet(folder, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    out = apply(unet, params, inputs)
    assert out.dtype == jnp.bfloat16
    assert relative_error(out, ref) <= 3e-2  # measured 2.3e-2


@pytest.mark.slow
def test_scalar_timestep_is_broadcast_over_the_batch(case):
    folder, inputs, _ = case
    unet, params = jaxfuse.load_unet(folder)
    per_sample = apply(unet, params, {**inputs, "timesteps": np.array([321.0, 321.0], np.float32)})
    scalar = apply(unet, params, {**inputs, "timesteps": np.float32(321.0)})
    np.testing.assert_array_equal(np.asarray(scalar), np.asarray(per_sample))


@pytest.mark.parametrize("change, message", [
    (dict(text_embeds=None), "pass text_embeds .* and time_ids"),
    (dict(sample=jnp.zeros((1, 4, 13, 8))), "latent size 13x8 must be a multiple of 4 .* nearest valid: 12x8"),
    (dict(sample=jnp.zeros((1, 3, 8, 8))), "4 channels"),
    (dict(encoder_hidden_states=jnp.zeros((1, 3, 16))), "cross_attention_dim is 32"),
    (dict(time_ids=jnp.zeros((1, 5))), "give 72 features; this UNet takes 80"),
])
def test_bad_inputs_are_clear_errors(change, message):
    cfg = jaxfuse.UNetConfig.tiny()  # 3 levels: the latent halves twice
    inputs = dict(sample=jnp.zeros((1, 4, 8, 8)), timesteps=1.0, encoder_hidden_states=jnp.zeros((1, 3, 32)),
                  text_embeds=jnp.zeros((1, 32)), time_ids=jnp.zeros((1, 6)))
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(UNet2DConditionModel(cfg).init, jax.random.key(0), **{**inputs, **change})
