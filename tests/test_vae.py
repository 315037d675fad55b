"""The Flax VAE against diffusers' AutoencoderKL on the same random weights, and VAEConfig."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import relative_error
from diffusers import AutoencoderKL as DiffusersVAE

from jaxfuse.config import ConfigError, VAEConfig
from jaxfuse.models.vae import AutoencoderKL, abstract_params, load_vae
from jaxfuse.weight_conversion import match_checkpoint

# Four levels, like SDXL's VAE (8 image pixels per latent pixel), with a channel change between
# levels (1x1 shortcuts) and mid-block attention.
SDXL_LIKE = dict(
    block_out_channels=(8, 16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=8,
    latent_channels=4,
    scaling_factor=0.13025,
)
# Three levels, another group count and latent width, no mid-block attention, no quant convs.
PLAIN = dict(
    block_out_channels=(12, 24, 24),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1,
    norm_num_groups=6,
    latent_channels=3,
    mid_block_add_attention=False,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
CASES = {"sdxl-like": SDXL_LIKE, "plain": PLAIN}

# The published `vae/config.json` of SDXL base 1.0 (no weights needed).
SDXL_VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.20.0.dev0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}




def run(vae, params, method, x):
    """`vae.method(x)`, compiled."""
    return jax.jit(lambda p, x: vae.apply({"params": p}, x, method=method))(params, x)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(pipeline folder holding `vae/`, latents, image, diffusers fp32 decode and encode)."""
    config = CASES[request.param]
    torch.manual_seed(0)
    model = DiffusersVAE(**config).eval()
    with torch.no_grad():  # every parameter perturbed, so no layer is an identity or zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder / "vae")

    factor = 2 ** (len(config["block_out_channels"]) - 1)
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((2, config["latent_channels"], 6, 4), dtype=np.float32)
    image = rng.uniform(-1, 1, (2, 3, 5 * factor, 7 * factor)).astype(np.float32)
    # The second image is nearly flat (a clear sky): there the groups' variance is small and the
    # norms' epsilon (1e-6, not the UNet's 1e-5) changes the output measurably.
    image[1] = 0.3 + 0.01 * image[1]
    with torch.no_grad():
        decoded = model.decode(torch.from_numpy(latents)).sample.numpy()
        dist = model.encode(torch.from_numpy(image)).latent_dist
    return folder, latents, image, decoded, (dist.mean.numpy(), dist.logvar.numpy())


def test_decode_fp32_equals_diffusers(case):
    folder, latents, _, ref, _ = case
    vae, params = load_vae(folder)
    out = run(vae, params, AutoencoderKL.decode, latents)
    assert out.shape == ref.shape and out.dtype == jnp.float32
    assert relative_error(out, ref) <= 2e-5  # measured 2.3e-6


def test_encode_fp32_equals_diffusers(case):
    folder, _, image, _, (ref_mean, ref_logvar) = case
    vae, params = load_vae(folder)
    mean, logvar = run(vae, params, AutoencoderKL.encode, image)
    assert mean.shape == logvar.shape == ref_mean.shape == (2, vae.cfg.latent_channels, 5, 7)
    assert relative_error(mean, ref_mean) <= 2e-5  # measured 1.5e-6
    assert relative_error(logvar, ref_logvar) <= 2e-5  # measured 1.5e-6


def test_decode_bf16_stays_close_to_diffusers_fp32(case):
    folder, latents, _, ref, _ = case
    vae, params = load_vae(folder, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    out = run(vae, params, AutoencoderKL.decode, latents)
    assert out.dtype == jnp.bfloat16
    # diffusers' own bf16 decode of the sdxl-like weights is already 3.09e-2 of the output's range
    # away from its fp32 one at the worst pixel. Ours moves between 3.1e-2 and 4.1e-2 with
    # equivalent float32 reduction orders in group norm (single bf16 rounding flips, amplified by
    # the decoder), while the mean error stays at 2.3-2.4e-3 of the range: both are bounded.
    assert relative_error(out, ref) <= 5e-2  # measured 4.1e-2
    assert np.abs(np.asarray(out, np.float32) - ref).mean() <= 3e-3 * np.abs(ref).max()  # measured 2.3e-3


def test_logvar_is_clamped_like_diffusers():
    """A quant_conv bias of -100 / +100 on the log-variance channels must come out as -30 / 20."""
    vae = AutoencoderKL(VAEConfig(block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1))
    image = jnp.zeros((1, 3, 4, 4))
    # All-zero weights: the encoder outputs zeros, so quant_conv's bias is the whole output.
    # (Not `init`: its truncated-normal initialisers take seconds to compile.)
    params = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), abstract_params(vae.cfg))
    for bias, bound in ((-100.0, -30.0), (100.0, 20.0)):
        params["quant_conv"]["bias"] = jnp.full((8,), bias)
        _, logvar = run(vae, params, AutoencoderKL.encode, image)
        np.testing.assert_array_equal(np.asarray(logvar), bound)


def test_sdxl_preset_matches_the_sdxl_checkpoint_layout():
    """Every tensor of diffusers' SDXL VAE lands on one of our parameters with its shape (the
    model is built on the meta device: no weights are allocated)."""
    cfg = VAEConfig.from_diffusers(SDXL_VAE_CONFIG)
    assert cfg == VAEConfig.sdxl() and cfg.downsample_factor == 8 and cfg.force_upcast
    with torch.device("meta"):
        model = DiffusersVAE(**{k: v for k, v in SDXL_VAE_CONFIG.items() if not k.startswith("_")})
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    plan = match_checkpoint(shapes, abstract_params(cfg))  # raises, listing any difference
    assert plan["decoder.mid_block.attentions.0.group_norm.weight"] == (
        "decoder", "mid_block", "attentions_0", "group_norm", "scale")
    assert plan["encoder.down_blocks.0.downsamplers.0.conv.weight"] == (
        "encoder", "down_blocks_0", "downsamplers_0", "conv", "kernel")


def test_config_reads_optional_fields():
    cfg = VAEConfig.from_diffusers({**SDXL_VAE_CONFIG, "latents_mean": [0.1, 0.2, 0.3, 0.4],
                                    "latents_std": [1.0, 2.0, 3.0, 4.0], "shift_factor": 0.5,
                                    "force_upcast": False, "sample_size": [512, 768]})
    assert cfg.latents_mean == (0.1, 0.2, 0.3, 0.4) and cfg.latents_std == (1.0, 2.0, 3.0, 4.0)
    assert cfg.shift_factor == 0.5 and not cfg.force_upcast and cfg.sample_size == (512, 768)
    hash(cfg)  # a Flax module attribute: must stay hashable


def test_missing_fields_take_diffusers_defaults():
    cfg = VAEConfig.from_diffusers({"block_out_channels": [32, 64],
                                    "down_block_types": ["DownEncoderBlock2D"] * 2,
                                    "up_block_types": ["UpDecoderBlock2D"] * 2})
    assert cfg.scaling_factor == 0.18215 and cfg.layers_per_block == 1 and cfg.latents_mean is None
    assert cfg.use_quant_conv and cfg.mid_block_add_attention and cfg.downsample_factor == 2


@pytest.mark.parametrize("field, value", [
    ("_class_name", "AutoencoderTiny"),
    ("act_fn", "gelu"),
    ("down_block_types", ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"]),
    ("up_block_types", ["UpDecoderBlock2D"] * 3),
    ("layers_per_block", [2, 2, 2, 2]),
    ("norm_num_groups", 48),
    ("latents_mean", [0.0] * 16),
])
def test_unsupported_setting_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        VAEConfig.from_diffusers({**SDXL_VAE_CONFIG, field: value})


@pytest.mark.parametrize("method, shape, message", [
    (AutoencoderKL.decode, (1, 3, 4, 4), r"latents must be NCHW with 4 channels, got shape \(1, 3, 4, 4\)"),
    (AutoencoderKL.encode, (1, 4, 4), "image must be NCHW with 3 channels"),
])
def test_bad_inputs_are_clear_errors(method, shape, message):
    vae = AutoencoderKL(VAEConfig.sdxl())
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda x: vae.apply({"params": abstract_params(vae.cfg)}, x, method=method),
                       jax.ShapeDtypeStruct(shape, jnp.float32))
