"""The SDXL VAE (diffusers `AutoencoderKL`) in Flax: encoder, decoder and their 1x1 quant convs.

Submodule names equal the diffusers parameter names with `.N` written `_N` (`decoder/up_blocks_0`,
`mid_block/attentions_0/to_out_0`, `encoder/down_blocks_0/downsamplers_0/conv`), so a checkpoint
converts by the converter's one renaming rule. NHWC inside; `AutoencoderKL.encode` and `.decode`
take and return NCHW like diffusers.

`encoder_blocks` and `decoder_blocks` describe the network once, as a list of blocks: `Blocks`
builds the Flax modules from it, and `jaxfuse.models.vae_tiled` runs it tile by tile.

Legend for shape lines: B batch, H/W image rows/columns, h/w latent rows/columns (H = f h with
f = `cfg.downsample_factor`), C channels, L latent channels.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
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


class BlockKind(str, enum.Enum):
    CONV = "conv"  # a 3x3 convolution (conv_in)
    RESNET = "resnet"
    ATTENTION = "attention"  # the mid block's one-head self-attention over every token
    DOWNSAMPLE = "downsample"  # a stride-2 3x3 convolution padded on the bottom and right only
    UPSAMPLE = "upsample"  # nearest 2x, then a 3x3 convolution
    HEAD = "head"  # group norm, SiLU, 3x3 convolution: how the encoder and the decoder end


# The head's parameters lie in the encoder's or decoder's own scope, not in a child's.
HEAD_NAMES = ("conv_norm_out", "conv_out")


@dataclasses.dataclass(frozen=True)
class Block:
    """One step of the encoder or the decoder: its kind, the scope of its parameters below the
    coder's (`("mid_block", "resnets_0")`; the head's is `()`, see `HEAD_NAMES`) and its output
    channels. `encoder_blocks` and `decoder_blocks` are the one description of the network, which
    the Flax modules (`Blocks`) and the tiled passes (`jaxfuse.models.vae_tiled`) both follow."""

    kind: BlockKind
    path: tuple[str, ...]
    features: int


def mid_blocks(cfg: VAEConfig) -> tuple[Block, ...]:
    """`UNetMidBlock2D` without time embedding: ResNet, attention (unless the config drops it),
    ResNet, at the lowest resolution."""
    def block(kind: BlockKind, name: str) -> Block:
        return Block(kind, ("mid_block", name), cfg.block_out_channels[-1])

    attention = (block(BlockKind.ATTENTION, "attentions_0"),) if cfg.mid_block_add_attention else ()
    return block(BlockKind.RESNET, "resnets_0"), *attention, block(BlockKind.RESNET, "resnets_1")


def encoder_blocks(cfg: VAEConfig) -> tuple[Block, ...]:
    """diffusers VAE `Encoder` (`double_z`): [B, H, W, C_in] -> [B, h, w, 2L], the latent
    distribution's mean and log-variance side by side on the channels. `DownEncoderBlock2D`
    number i: ResNets, then (except at the last level) the stride-2 convolution."""
    blocks = [Block(BlockKind.CONV, ("conv_in",), cfg.block_out_channels[0])]
    for i, channels in enumerate(cfg.block_out_channels):
        scope = f"down_blocks_{i}"
        blocks += [Block(BlockKind.RESNET, (scope, f"resnets_{j}"), channels) for j in range(cfg.layers_per_block)]
        if i < cfg.num_levels - 1:
            blocks.append(Block(BlockKind.DOWNSAMPLE, (scope, "downsamplers_0"), channels))
    return (*blocks, *mid_blocks(cfg), Block(BlockKind.HEAD, (), 2 * cfg.latent_channels))


def decoder_blocks(cfg: VAEConfig) -> tuple[Block, ...]:
    """diffusers VAE `Decoder` (group norms): [B, h, w, L] -> [B, H, W, C_out]. `UpDecoderBlock2D`
    number i mirrors encoder level `num_levels - 1 - i`: one ResNet more than the encoder's, then
    (except at the last block) 2x upsampling."""
    blocks = [Block(BlockKind.CONV, ("conv_in",), cfg.block_out_channels[-1]), *mid_blocks(cfg)]
    for i in range(cfg.num_levels):
        level = cfg.num_levels - 1 - i
        channels, scope = cfg.block_out_channels[level], f"up_blocks_{i}"
        blocks += [Block(BlockKind.RESNET, (scope, f"resnets_{j}"), channels) for j in range(cfg.layers_per_block + 1)]
        if level > 0:
            blocks.append(Block(BlockKind.UPSAMPLE, (scope, "upsamplers_0"), channels))
    return (*blocks, Block(BlockKind.HEAD, (), cfg.out_channels))


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


class Blocks(nn.Module):
    """`blocks` in order, each in the scope its path names below this module's: the encoder and
    the decoder, and (one `Blocks` per shared first name) their mid, down and up blocks.
    [B, H, W, C] -> [B, H', W', C']."""

    cfg: VAEConfig
    blocks: tuple[Block, ...]
    dtype: Dtype = jnp.float32
    patch: Patch = Patch()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for scope, group in itertools.groupby(self.blocks, key=lambda block: block.path[:1]):
            group = tuple(group)
            if not scope:
                x = self.head(x, group[0].features)
            elif len(group[0].path) == 1:
                x = self.layer(group[0], scope[0])(x)
            else:
                inner = tuple(dataclasses.replace(block, path=block.path[1:]) for block in group)
                x = Blocks(self.cfg, inner, self.dtype, self.patch, name=scope[0])(x)
        return x

    def layer(self, block: Block, name: str) -> nn.Module:
        cfg, c, dtype, patch = self.cfg, block.features, self.dtype, self.patch
        if block.kind == BlockKind.CONV:
            return Conv2d(c, dtype=dtype, patch=patch, name=name)
        if block.kind == BlockKind.RESNET:
            return ResnetBlock(c, cfg.norm_num_groups, NORM_EPS, dtype, patch, name=name)
        if block.kind == BlockKind.ATTENTION:
            return AttentionBlock(cfg.norm_num_groups, dtype, patch, name=name)
        if block.kind == BlockKind.DOWNSAMPLE:
            return Downsample(c, padding=0, dtype=dtype, patch=patch, name=name)
        return Upsample(c, dtype, patch, name=name)

    def head(self, x: jax.Array, features: int) -> jax.Array:
        """Group norm, SiLU, 3x3 convolution, with this module's `HEAD_NAMES` parameters."""
        norm, conv = HEAD_NAMES
        x = nn.silu(GroupNorm(self.cfg.norm_num_groups, NORM_EPS, self.dtype, self.patch, name=norm)(x))
        return Conv2d(features, dtype=self.dtype, patch=self.patch, name=conv)(x)


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
        self.encoder = Blocks(cfg, encoder_blocks(cfg), self.dtype, self.patch)
        self.decoder = Blocks(cfg, decoder_blocks(cfg), self.dtype, self.patch)
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
        return self.latent_distribution(self.encoder(self.encoder_input(image)))

    def encoder_input(self, image: jax.Array) -> jax.Array:
        """[B, C_in, H, W] -> [B, H, W, C_in] in the compute dtype, what the encoder takes."""
        check_nchw(image, self.cfg.in_channels, "image")
        return jnp.transpose(image, (0, 2, 3, 1)).astype(self.dtype)

    def latent_distribution(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The encoder's output [B, h, w, 2L] -> `encode`'s mean and log-variance [B, L, h, w]."""
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(jnp.transpose(h, (0, 3, 1, 2)), 2, axis=1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, latents: jax.Array) -> jax.Array:
        """[B, L, h, w] latents already divided by `scaling_factor` (as diffusers' `decode`
        expects) -> [B, C_out, f h, f w] image in about [-1, 1], not clamped."""
        return jnp.transpose(self.decoder(self.decoder_input(latents)), (0, 3, 1, 2))

    def decoder_input(self, latents: jax.Array) -> jax.Array:
        """[B, L, h, w] -> [B, h, w, L] in the compute dtype after `post_quant_conv`, what the
        decoder takes."""
        check_nchw(latents, self.cfg.latent_channels, "latents")
        z = jnp.transpose(latents, (0, 2, 3, 1)).astype(self.dtype)
        return z if self.post_quant_conv is None else self.post_quant_conv(z)

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
