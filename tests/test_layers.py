"""Each shared layer against its diffusers/PyTorch counterpart, weights through the converter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_matches
from diffusers.models.attention_processor import Attention as TorchAttention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from safetensors.torch import save_file

from jaxfuse.models import layers
from jaxfuse.weight_conversion import SafetensorsCheckpoint, convert_checkpoint


def flax_params(torch_module, flax_module, *inputs, tmp_path):
    """`torch_module`'s perturbed weights in `flax_module`'s tree, via the production converter."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in torch_module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in torch_module.state_dict().items()}, tmp_path / "w.safetensors")
    abstract = jax.eval_shape(flax_module.init, jax.random.key(0), *inputs)["params"]
    return convert_checkpoint(SafetensorsCheckpoint([tmp_path / "w.safetensors"]), abstract)


def nhwc(x):
    return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


X = torch.randn(2, 32, 10, 12, generator=torch.Generator().manual_seed(1))
TEMB = torch.randn(2, 24, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("out_channels", [32, 48], ids=["same-channels", "1x1-shortcut"])
def test_resnet_block(out_channels, tmp_path):
    ref = ResnetBlock2D(in_channels=32, out_channels=out_channels, temb_channels=24, groups=8, eps=1e-5).eval()
    ours = layers.ResnetBlock(out_channels, 8, 1e-5)
    params = flax_params(ref, ours, nhwc(X), jnp.asarray(TEMB.numpy()), tmp_path=tmp_path)
    out = ours.apply({"params": params}, nhwc(X), jnp.asarray(TEMB.numpy()))
    assert_matches(out, ref(X, TEMB).permute(0, 2, 3, 1), tol=5e-6)  # measured 5.0e-7


def test_resnet_block_without_time_embedding(tmp_path):
    ref = ResnetBlock2D(in_channels=32, out_channels=32, temb_channels=None, groups=4, eps=1e-6).eval()
    ours = layers.ResnetBlock(32, 4, 1e-6)
    params = flax_params(ref, ours, nhwc(X), tmp_path=tmp_path)
    assert_matches(ours.apply({"params": params}, nhwc(X)), ref(X, None).permute(0, 2, 3, 1),
                   tol=5e-6)  # measured 4.4e-7


@pytest.mark.parametrize("padding", [1, 0], ids=["unet-pad-1", "vae-pad-bottom-right"])
def test_downsample(padding, tmp_path):
    ref = Downsample2D(32, use_conv=True, out_channels=32, padding=padding, name="op").eval()
    ours = layers.Downsample(32, padding)
    params = flax_params(ref, ours, nhwc(X), tmp_path=tmp_path)
    out = ours.apply({"params": params}, nhwc(X))
    assert out.shape == (2, 5, 6, 32)
    assert_matches(out, ref(X).permute(0, 2, 3, 1), tol=5e-6)  # measured 5.6e-7


def test_upsample(tmp_path):
    ref = Upsample2D(32, use_conv=True, out_channels=32).eval()
    ours = layers.Upsample(32)
    params = flax_params(ref, ours, nhwc(X), tmp_path=tmp_path)
    out = ours.apply({"params": params}, nhwc(X))
    assert out.shape == (2, 20, 24, 32)
    assert_matches(out, ref(X).permute(0, 2, 3, 1), tol=5e-6)  # measured 3.8e-7


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_attention(cross, tmp_path):
    tokens = torch.randn(2, 30, 32, generator=torch.Generator().manual_seed(3))
    context = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(4)) if cross else None
    ref = TorchAttention(32, cross_attention_dim=16 if cross else None, heads=4, dim_head=8, out_bias=True).eval()
    ours = layers.Attention(4, 8)
    args = (jnp.asarray(tokens.numpy()),) + ((jnp.asarray(context.numpy()),) if cross else ())
    params = flax_params(ref, ours, *args, tmp_path=tmp_path)
    assert_matches(ours.apply({"params": params}, *args), ref(tokens, encoder_hidden_states=context),
                   tol=5e-6)  # measured 3.5e-7


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_attention_path_equals_dot_product_attention(is_causal, dtype):
    """The einsum path chosen on CPU against `jax.nn.dot_product_attention`, the path elsewhere."""
    rng = np.random.default_rng(7)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 12, 4 * 8)), dtype) for _ in range(3))
    out = layers.attention(q, k, v, 4, is_causal=is_causal)
    ref = jax.nn.dot_product_attention(*(x.reshape(2, 12, 4, 8) for x in (q, k, v)), is_causal=is_causal)
    # measured 0 (bit-equal) in both dtypes; kept: logits / sqrt(d) here, * (1 / sqrt(d)) there may round
    # differently by a float32 ulp, which can flip a bf16 rounding (one bf16 ulp: 4e-3 to 8e-3 relative)
    tolerance = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref.reshape(2, 12, 32), np.float32),
                               atol=tolerance, rtol=tolerance)


def test_group_norm_equals_torch():
    x = torch.randn(2, 32, 6, 5, generator=torch.Generator().manual_seed(5))
    scale, bias = (torch.randn(32, generator=torch.Generator().manual_seed(s)) for s in (6, 7))
    mean, var = layers.group_moments(nhwc(x), 8)
    out = layers.normalize_groups(nhwc(x), mean, var, 1e-5, jnp.asarray(scale.numpy()), jnp.asarray(bias.numpy()))
    assert_matches(out, torch.nn.functional.group_norm(x, 8, scale, bias, eps=1e-5).permute(0, 2, 3, 1),
                   tol=1e-6)  # measured 7.3e-8


def test_group_moments_keep_precision_far_from_zero():
    """A large offset would wipe out the variance if it were computed as E[x²] - E[x]²."""
    rng = np.random.default_rng(0)
    x = (3000.0 + rng.standard_normal((1, 16, 16, 8))).astype(np.float32)
    _, var = layers.group_moments(jnp.asarray(x), 2)
    exact = x.astype(np.float64).reshape(1, 256, 2, 4).var(axis=(1, 3))
    np.testing.assert_allclose(np.asarray(var), exact, rtol=1e-6)  # measured 8.3e-8
    naive = (x**2).reshape(1, 256, 2, 4).mean(axis=(1, 3)) - x.reshape(1, 256, 2, 4).mean(axis=(1, 3)) ** 2
    assert np.abs(naive - exact).max() > 0.1  # what the two-pass form avoids
