"""The SDXL VAE (diffusers `AutoencoderKL`) in Flax: encoder, decoder and their 1x1 quant convs.

Submodule names equal the diffusers parameter names with `.N` written `_N` (`decoder/up_blocks_0`,
`mid_block/attentions_0/to_out_0`, `encoder/down_blocks_0/downsamplers_0/conv`), so a checkpoint
converts by the converter's one renaming rule. NHWC inside; `AutoencoderKL.encode` and `.decode`
take and return NCHW like diffusers.

Legend for shape lines: B batch, H/W image rows/columns, h/w latent rows/columns (H = f h with
f = `cfg.downsample_factor`), C channels, L latent channels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxfuse.checkpoint import CONFIG_NAME, component_folder, load_params
from jaxfuse.config import VAEConfig
from jaxfuse.models.layers import Attention, Conv2d, Downsample, Dtype, GroupNorm, ResnetBlock, Upsample
from jaxfuse.parallel.patch import Patch

# Every group norm of diffusers' VAE (ResNets, mid-block attention, output norms) uses this
# epsilon; the config has no field for it.
NORM_EPS = 1e-6
# DiagonalGaussianDistribution clamps the log-variance to this range before anything uses it.
LOGVAR_RANGE = (-30.0, 20.0)


def vae_resnet(cfg: VAEConfig, channels: int, dtype: Dtype, patch: Patch, name: str) -> ResnetBlock:
    return ResnetBlock(channels, cfg.norm_num_groups, NORM_EPS, dtype, patch, name=name)


class AttentionBlock(nn.Module):
    """diffusers `Attention` as the VAE's mid block builds it: group norm, then one head over all
    channels with biased q/k/v/out projections, plus the input. [B, h, w, C] -> [B, h, w, C]."""

    num_groups: int
    dtype: Dtype = jnp.float32
    patch: Patch = Patch()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = GroupNorm(self.num_groups, NORM_EPS, self.dtype, self.patch, name="group_norm")(x)
        attn = Attention(num_heads=1, head_dim=c, qkv_bias=True, dtype=self.dtype, patch=self.patch)
        # The checkpoint keeps to_q/to_k/to_v/to_out beside group_norm in one module, so the
        # shared Attention's parameters live in this module's scope, not in a child's.
        nn.share_scope(self, attn)
        y = attn(y.reshape(b, h * w, c)).reshape(b, h, w, c)
        return x + y


class MidBlock(nn.Module):
    """`UNetMidBlock2D` without time embedding: ResNet, attention (unless the config drops it),
    ResNet, at the lowest resolution. [B, h, w, C] -> [B, h, w, C]."""

    cfg: VAEConfig
    dtype: Dtype = jnp.float32
    patch: Patch = Patch()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, channels = self.cfg, self.cfg.block_out_channels[-1]
        x = vae_resnet(cfg, channels, self.dtype, self.patch, "resnets_0")(x)
        if cfg.mid_block_add_attention:
            x = AttentionBlock(cfg.norm_num_groups, self.dtype, self.patch, name="attentions_0")(x)
        return vae_resnet(cfg, channels, self.dtype, self.patch, "resnets_1")(x)


class DownEncoderBlock(nn.Module):
    """`DownEncoderBlock2D` number `index`: ResNets, then (except at the last level) a stride-2
    convolution padded on the bottom and right only. [B, H', W', C] -> [B, H'/2, W'/2, C']."""

    cfg: VAEConfig
    index: int
    dtype: Dtype = jnp.float32
    patch: Patch = Patch()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, i = self.cfg, self.index
        channels = cfg.block_out_channels[i]
        for j in range(cfg.layers_per_block):
            x = vae_resnet(cfg, channels, self.dtype, self.patch, f"resnets_{j}")(x)
        if i < cfg.num_levels - 1:
            x = Downsample(channels, padding=0, dtype=self.dtype, patch=self.patch, name="downsamplers_0")(x)
        return x


class UpDecoderBlock(nn.Module):
    """`UpDecoderBlock2D` number `index`, mirroring encoder level `num_levels - 1 - index`: one
    ResNet more than the encoder's, then (except at the last block) 2x upsampling.
    [B, H', W', C] -> [B, 2H', 2W', C']."""

    cfg: VAEConfig
    index: int
    dtype: Dtype = jnp.float32
    patch: Patch = Patch()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        level = cfg.num_levels - 1 - self.index
        channels = cfg.block_out_channels[level]
        for j in range(cfg.layers_per_block + 1):
            x = vae_resnet(cfg, channels, self.dtype, self.patch, f"resnets_{j}")(x)
        if level > 0:
            x = Upsample(channels, self.dtype, self.patch, name="upsamplers_0")(x)
        return x


def output_head(cfg: VAEConfig, x: jax.Array, features: int, dtype: Dtype, patch: Patch) -> jax.Array:
    """Group norm, SiLU, 3x3 convolution: how the encoder and the decoder both end. Called from
    the caller's compact method, so the parameters are the caller's `conv_norm_out`/`conv_out`."""
    x = nn.silu(GroupNorm(cfg.norm_num_groups, NORM_EPS, dtype, patch, name="conv_norm_out")(x))
    return Conv2d(features, dtype=dtype, patch=patch, name="conv_out")(x)


class Encoder(nn.Module):
    """diffusers VAE `Encoder` (`double_z`): [B, H, W, C_in] -> [B, h, w, 2L], the latent
    distribution's mean and log-variance side by side on the channels."""

    cfg: VAEConfig
    dtype: Dtype = jnp.float32
    patch: Patch = Patch()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        x = Conv2d(cfg.block_out_channels[0], dtype=self.dtype, patch=self.patch, name="conv_in")(x)
        for i in range(cfg.num_levels):
            x = DownEncoderBlock(cfg, i, self.dtype, self.patch, name=f"down_blocks_{i}")(x)
        x = MidBlock(cfg, self.dtype, self.patch, name="mid_block")(x)
        return output_head(cfg, x, 2 * cfg.latent_channels, self.dtype, self.patch)


class Decoder(nn.Module):
    """diffusers VAE `Decoder` (group norms): [B, h, w, L] -> [B, H, W, C_out]."""

    cfg: VAEConfig
    dtype: Dtype = jnp.float32
    patch: Patch = Patch()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        x = Conv2d(cfg.block_out_channels[-1], dtype=self.dtype, patch=self.patch, name="conv_in")(x)
        x = MidBlock(cfg, self.dtype, self.patch, name="mid_block")(x)
        for i in range(cfg.num_levels):
            x = UpDecoderBlock(cfg, i, self.dtype, self.patch, name=f"up_blocks_{i}")(x)
        return output_head(cfg, x, cfg.out_channels, self.dtype, self.patch)


def check_nchw(x: jax.Array, channels: int, what: str) -> None:
    """Raises one clear ValueError unless `x` is NCHW with `channels` channels."""
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{what} must be NCHW with {channels} channels, got shape {x.shape}.")


class AutoencoderKL(nn.Module):
    """The VAE, with diffusers' `encode` and `decode` as methods (use `apply(..., method=...)`).

    `cfg.force_upcast` is the checkpoint's statement that it is not safe in float16 (SDXL's VAE
    overflows there): the caller should then build and load it with `dtype=jnp.float32` when its
    own dtype is of lower precision. The module itself runs in whatever `dtype` it is given.
    """

    cfg: VAEConfig
    dtype: Dtype = jnp.float32
    patch: Patch = Patch()

    def setup(self):
        cfg = self.cfg
        self.encoder = Encoder(cfg, self.dtype, self.patch)
        self.decoder = Decoder(cfg, self.dtype, self.patch)
        latent = cfg.latent_channels
        self.quant_conv = (Conv2d(2 * latent, kernel_size=1, dtype=self.dtype)
                           if cfg.use_quant_conv else None)
        self.post_quant_conv = (Conv2d(latent, kernel_size=1, dtype=self.dtype)
                                if cfg.use_post_quant_conv else None)

    def encode(self, image: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[B, C_in, H, W] in [-1, 1] -> the latent distribution's mean and log-variance, each
        [B, L, h, w], the log-variance clamped to `LOGVAR_RANGE` (diffusers'
        `encode(image).latent_dist.mean` and `.logvar`). The mean is not yet multiplied by
        `scaling_factor`."""
        check_nchw(image, self.cfg.in_channels, "image")
        h = self.encoder(jnp.transpose(image, (0, 2, 3, 1)).astype(self.dtype))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(jnp.transpose(h, (0, 3, 1, 2)), 2, axis=1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, latents: jax.Array) -> jax.Array:
        """[B, L, h, w] latents already divided by `scaling_factor` (as diffusers' `decode`
        expects) -> [B, C_out, f h, f w] image in about [-1, 1], not clamped."""
        check_nchw(latents, self.cfg.latent_channels, "latents")
        z = jnp.transpose(latents, (0, 2, 3, 1)).astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return jnp.transpose(self.decoder(z), (0, 3, 1, 2))

    def __call__(self, image: jax.Array) -> jax.Array:
        """Reconstruction through the mean (diffusers' forward with `sample_posterior=False`):
        [B, C_in, H, W] -> [B, C_out, H, W]. Touches every parameter, so `init` builds them all."""
        return self.decode(self.encode(image)[0])


def abstract_params(cfg: VAEConfig, dtype: Dtype = jnp.float32):
    """The parameter tree of `cfg` as `jax.ShapeDtypeStruct` leaves; nothing is allocated."""
    f = cfg.downsample_factor
    image = jax.ShapeDtypeStruct((1, cfg.in_channels, f, f), jnp.float32)
    tree = jax.eval_shape(AutoencoderKL(cfg).init, jax.random.key(0), image)["params"]
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, dtype), tree)


def load_vae(folder: str | Path, dtype: Dtype = jnp.float32, param_dtype: Dtype | None = None,
             variant: str | None = None) -> tuple[AutoencoderKL, Any]:
    """(module, params) from a diffusers `vae/` folder (or the pipeline folder holding one) or a
    converted folder (its config.json + orbax `params/`).

    `dtype` is the compute dtype, `param_dtype` (default: `dtype`) the one the parameters are
    stored in; `variant="fp16"` picks diffusers' `.fp16.safetensors` files. The config is
    checked before any weight is read; see `AutoencoderKL` for `cfg.force_upcast`.
    """
    folder = component_folder(folder, "vae")
    cfg = VAEConfig.from_diffusers(json.loads((folder / CONFIG_NAME).read_text()))
    params = load_params(folder, abstract_params(cfg, param_dtype or dtype), variant)
    return AutoencoderKL(cfg, dtype), params
