"""The SDXL UNet (diffusers `UNet2DConditionModel`) in Flax.

Submodule names equal the diffusers parameter names with `.N` written `_N` (`down_blocks_1`,
`attentions_0`, `to_out_0`, `ff/net_0/proj`), so a checkpoint converts by one renaming rule.
NHWC inside; `UNet2DConditionModel.__call__` takes and returns NCHW like diffusers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxfuse.checkpoint import CONFIG_NAME, component_folder, load_params
from jaxfuse.config import UNetConfig
from jaxfuse.models.layers import Attention, Conv2d, Downsample, Dtype, GroupNorm, ResnetBlock, Upsample
from jaxfuse.parallel.patch import Patch
from jaxfuse.step_cache import DEEP_CACHE, CacheStep

# diffusers' Transformer2DModel normalises its input with this epsilon, whatever the UNet's.
TRANSFORMER_NORM_EPS = 1e-6
LAYER_NORM_EPS = 1e-5


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """[B] -> [B, dim] sinusoidal embedding in float32 (diffusers `get_timestep_embedding`)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    angles = t.astype(jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> linear. [B, in] -> [B, features]."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x.astype(self.dtype))
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(x))


class GEGLU(nn.Module):
    """[B, T, C] -> [B, T, features]: one projection split into a value and an exact-GELU gate."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = jnp.split(nn.Dense(2 * self.features, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers `FeedForward` with GEGLU and a 4x inner width. [B, T, C] -> [B, T, C]."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        h = GEGLU(4 * dim, dtype=self.dtype, name="net_0")(x)
        return nn.Dense(dim, dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, feed-forward; each pre-norm and residual."""

    num_heads: int
    dtype: Dtype = jnp.float32
    patch: Patch = Patch()

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        head_dim = x.shape[-1] // self.num_heads

        def norm(name):
            return nn.LayerNorm(LAYER_NORM_EPS, dtype=self.dtype, use_fast_variance=False, name=name)

        x = x + Attention(self.num_heads, head_dim, dtype=self.dtype, patch=self.patch, name="attn1")(norm("norm1")(x))
        x = x + Attention(self.num_heads, head_dim, dtype=self.dtype, name="attn2")(norm("norm2")(x), context)
        return x + FeedForward(self.dtype, name="ff")(norm("norm3")(x))


class Transformer2D(nn.Module):
    """diffusers `Transformer2DModel` (continuous input) at UNet level `level`, with that
    level's heads and depth. [B, H, W, C] -> [B, H, W, C]."""

    cfg: UNetConfig
    level: int
    dtype: Dtype = jnp.float32
    patch: Patch = Patch()

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        # A 1x1 convolution and a linear layer on the channels are the same map; the
        # checkpoint's choice decides only the kernel's shape.
        def projection(name):
            if self.cfg.use_linear_projection:
                return nn.Dense(c, dtype=self.dtype, name=name)
            return Conv2d(c, kernel_size=1, dtype=self.dtype, name=name)

        y = GroupNorm(self.cfg.norm_num_groups, TRANSFORMER_NORM_EPS, self.dtype, self.patch, name="norm")(x)
        y = projection("proj_in")(y).reshape(b, h * w, c)
        heads = self.cfg.num_attention_heads[self.level]
        for i in range(self.cfg.transformer_layers_per_block[self.level]):
            y = BasicTransformerBlock(heads, self.dtype, self.patch, name=f"transformer_blocks_{i}")(y, context)
        return x + projection("proj_out")(y.reshape(b, h, w, c))


def unet_resnet(cfg: UNetConfig, channels: int, dtype: Dtype, patch: Patch, name: str) -> ResnetBlock:
    return ResnetBlock(channels, cfg.norm_num_groups, cfg.norm_eps, dtype, patch, name=name)


class DownBlock(nn.Module):
    """`DownBlock2D` or `CrossAttnDownBlock2D` number `index`; returns the output and the skips.
    `make`: run only the layers that make its first `make` skips (a DeepCache shallow step)."""

    cfg: UNetConfig
    index: int
    dtype: Dtype = jnp.float32
    patch: Patch = Patch()
    make: int | None = None

    @nn.compact
    def __call__(self, x, temb, context):
        cfg, i = self.cfg, self.index
        channels = cfg.block_out_channels[i]
        layers = cfg.layers_per_block[i]
        make = layers + 1 if self.make is None else self.make
        skips = []
        for j in range(min(layers, make)):
            x = unet_resnet(cfg, channels, self.dtype, self.patch, f"resnets_{j}")(x, temb)
            if cfg.down_block_types[i] == "CrossAttnDownBlock2D":
                x = Transformer2D(cfg, i, self.dtype, self.patch, name=f"attentions_{j}")(x, context)
            skips.append(x)
        if i < cfg.num_levels - 1 and make > layers:
            x = Downsample(channels, cfg.downsample_padding, self.dtype, self.patch, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """`UNetMidBlock2DCrossAttn`: ResNet, transformer, ResNet at the lowest resolution."""

    cfg: UNetConfig
    dtype: Dtype = jnp.float32
    patch: Patch = Patch()

    @nn.compact
    def __call__(self, x, temb, context):
        cfg = self.cfg
        channels = cfg.block_out_channels[-1]
        x = unet_resnet(cfg, channels, self.dtype, self.patch, "resnets_0")(x, temb)
        x = Transformer2D(cfg, cfg.num_levels - 1, self.dtype, self.patch, name="attentions_0")(x, context)
        return unet_resnet(cfg, channels, self.dtype, self.patch, "resnets_1")(x, temb)


class UpBlock(nn.Module):
    """`UpBlock2D` or `CrossAttnUpBlock2D` number `index`, mirroring down block
    `num_levels - 1 - index`; consumes one skip per ResNet, last in first out. Returns the output
    and the input of layer `keep` (None without one): DeepCache's features. `first`: the first
    layer that runs (a DeepCache shallow step runs the last ones only)."""

    cfg: UNetConfig
    index: int
    dtype: Dtype = jnp.float32
    patch: Patch = Patch()
    first: int = 0
    keep: int | None = None

    @nn.compact
    def __call__(self, x, skips, temb, context):
        cfg, i = self.cfg, self.index
        level = cfg.num_levels - 1 - i
        channels = cfg.block_out_channels[level]
        kept = None
        for j in range(self.first, cfg.layers_per_block[level] + 1):
            if j == self.keep:
                kept = x
            x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = unet_resnet(cfg, channels, self.dtype, self.patch, f"resnets_{j}")(x, temb)
            if cfg.up_block_types[i] == "CrossAttnUpBlock2D":
                x = Transformer2D(cfg, level, self.dtype, self.patch, name=f"attentions_{j}")(x, context)
        if level > 0:
            x = Upsample(channels, self.dtype, self.patch, name="upsamplers_0")(x)
        return x, kept


def check_inputs(cfg: UNetConfig, sample, encoder_hidden_states, text_embeds, time_ids) -> None:
    """Raises one clear ValueError for inputs the UNet cannot take (checked while tracing,
    before anything is compiled)."""
    if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
        raise ValueError(f"sample must be NCHW with {cfg.in_channels} channels, got shape {sample.shape}.")
    f = cfg.downsample_factor
    h, w = sample.shape[2:]
    if h % f or w % f:
        def nearest(n):
            return f * max(1, round(n / f))

        raise ValueError(
            f"latent size {h}x{w} must be a multiple of {f} (the UNet halves it {cfg.num_levels - 1} "
            f"times); nearest valid: {nearest(h)}x{nearest(w)} (x8 for the image size)."
        )
    if encoder_hidden_states.shape[-1] != cfg.cross_attention_dim:
        raise ValueError(
            f"encoder_hidden_states has {encoder_hidden_states.shape[-1]} channels; this UNet's "
            f"cross_attention_dim is {cfg.cross_attention_dim}."
        )
    if cfg.addition_embed_type == "text_time":
        if text_embeds is None or time_ids is None:
            raise ValueError(
                "This UNet uses SDXL micro-conditioning (addition_embed_type 'text_time'): pass "
                "text_embeds (the pooled text embedding) and time_ids."
            )
        width = text_embeds.shape[-1] + time_ids.shape[-1] * cfg.addition_time_embed_dim
        if width != cfg.projection_class_embeddings_input_dim:
            raise ValueError(
                f"text_embeds ({text_embeds.shape[-1]}) plus {time_ids.shape[-1]} time ids x "
                f"{cfg.addition_time_embed_dim} give {width} features; this UNet takes "
                f"{cfg.projection_class_embeddings_input_dim}."
            )


@flax.struct.dataclass
class Residuals:
    """What a ControlNet adds to a UNet: one residual per skip [B, h, w, C] (NHWC, the skip's shape)
    and one for the middle block's output."""

    down: tuple[jax.Array, ...]
    middle: jax.Array


def inputs(cfg: UNetConfig, dtype: Dtype, patch: Patch, sample, timesteps, encoder_hidden_states, text_embeds,
           time_ids) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The first layers of a UNet or ControlNet, made in the calling module (`time_embedding`,
    `add_embedding`, `conv_in`): sample [B, C, H, W] -> (conv_in's output [B, H, W, C0], the time
    embedding [B, E], the text context [B, S, context]) in `dtype`."""
    b = sample.shape[0]
    x = jnp.transpose(sample, (0, 2, 3, 1)).astype(dtype)
    if cfg.center_input_sample:
        x = 2 * x - 1
    t = jnp.broadcast_to(jnp.ravel(jnp.asarray(timesteps)), (b,))
    t_emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
    temb = TimestepEmbedding(cfg.time_embed_dim, dtype, name="time_embedding")(t_emb)
    if cfg.addition_embed_type == "text_time":
        time_embeds = timestep_embedding(
            jnp.ravel(time_ids), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift
        ).reshape(b, -1)
        added = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1)
        temb = temb + TimestepEmbedding(cfg.time_embed_dim, dtype, name="add_embedding")(added)
    x = Conv2d(cfg.block_out_channels[0], dtype=dtype, patch=patch.fresh(), name="conv_in")(x)
    return x, temb, encoder_hidden_states.astype(dtype)


def down_path(cfg: UNetConfig, dtype: Dtype, patch: Patch, x, temb, context,
              made: int | None = None) -> tuple[jax.Array, list[jax.Array]]:
    """The down blocks, made in the calling module (`down_blocks_i`): conv_in's output ->
    (the last block's output, the skips: conv_in's, then one per layer). `made`: run only the
    layers that make the first `made` skips (a DeepCache shallow step); None: all."""
    made = cfg.num_skips if made is None else made
    skips = [x]
    for i in range(cfg.num_levels):
        if len(skips) < made:
            x, block_skips = DownBlock(cfg, i, dtype, patch, made - len(skips), name=f"down_blocks_{i}")(x, temb,
                                                                                                         context)
            skips += block_skips
    return x, skips


class UNet2DConditionModel(nn.Module):
    """The SDXL UNet. `__call__` mirrors diffusers' forward:

    sample [B, C_in, H, W] (NCHW), timesteps [] or [B], encoder_hidden_states [B, S, context],
    text_embeds [B, pooled] and time_ids [B, K] (SDXL micro-conditioning) -> [B, C_out, H, W].

    `cache`: a DeepCache step (`jaxfuse.step_cache`): a full one writes the features at its
    branch to the `DEEP_CACHE` collection, a shallow one reads them in place of its deep layers.
    `control`: a ControlNet's residuals (`models.controlnet`), added to the skips and to the middle
    block's output (diffusers' `down_block_additional_residuals`, `mid_block_additional_residual`).
    """

    cfg: UNetConfig
    dtype: Dtype = jnp.float32
    patch: Patch = Patch()
    cache: CacheStep | None = None

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, text_embeds=None, time_ids=None,
                 control: Residuals | None = None):
        cfg = self.cfg
        check_inputs(cfg, sample, encoder_hidden_states, text_embeds, time_ids)
        x, temb, context = inputs(cfg, self.dtype, self.patch, sample, timesteps, encoder_hidden_states, text_embeds,
                                  time_ids)
        total, cache = cfg.num_skips, self.cache
        branch = None if cache is None else min(cache.branch, total - 1)  # past the last: the middle block alone
        shallow = cache is not None and not cache.full
        made = branch + 1 if shallow else total  # the skips this step makes: 0..made-1
        x, skips = down_path(cfg, self.dtype, self.patch, x, temb, context, made)
        if control is not None:  # a ControlNet's residuals join the skips the up path reads (zip: those made)
            skips = [skip + residual.astype(skip.dtype) for skip, residual in zip(skips, control.down)]
        if shallow:
            x = self.get_variable(DEEP_CACHE, "features")
        else:
            x = MidBlock(cfg, self.dtype, self.patch, name="mid_block")(x, temb, context)
            if control is not None:
                x = x + control.middle.astype(x.dtype)
        done = 0  # up layers before this block; layer m reads skip total - 1 - m
        for i in range(cfg.num_levels):
            layers = cfg.layers_per_block[cfg.num_levels - 1 - i] + 1
            first = max(0, total - made - done)
            keep = total - 1 - branch - done if cache is not None and cache.full else None
            if first < layers:
                x, kept = UpBlock(cfg, i, self.dtype, self.patch, first, keep if keep in range(layers) else None,
                                  name=f"up_blocks_{i}")(x, skips, temb, context)
                if kept is not None:
                    self.put_variable(DEEP_CACHE, "features", kept)
            done += layers

        x = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, self.dtype, self.patch, name="conv_norm_out")(x))
        x = Conv2d(cfg.out_channels, dtype=self.dtype, patch=self.patch, name="conv_out")(x)
        return jnp.transpose(x, (0, 3, 1, 2))


def abstract_params(cfg: UNetConfig, dtype: Dtype = jnp.float32):
    """The parameter tree of `cfg` as `jax.ShapeDtypeStruct` leaves; nothing is allocated."""
    f = cfg.downsample_factor
    sample = jax.ShapeDtypeStruct((1, cfg.in_channels, f, f), jnp.float32)
    context = jax.ShapeDtypeStruct((1, 1, cfg.cross_attention_dim), jnp.float32)
    extra = {}
    if cfg.addition_embed_type == "text_time":
        # Only the sum of the pooled width and K time ids x addition_time_embed_dim is fixed by
        # the weights; one time id stands in for the K of the real model.
        pooled = cfg.projection_class_embeddings_input_dim - cfg.addition_time_embed_dim
        extra = {"text_embeds": jax.ShapeDtypeStruct((1, pooled), jnp.float32),
                 "time_ids": jax.ShapeDtypeStruct((1, 1), jnp.float32)}

    def init(sample, context, **extra):
        return UNet2DConditionModel(cfg).init(jax.random.key(0), sample, jnp.zeros(()), context, **extra)

    tree = jax.eval_shape(init, sample, context, **extra)["params"]
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, dtype), tree)


def load_unet(folder: str | Path, dtype: Dtype = jnp.float32, param_dtype: Dtype | None = None,
              variant: str | None = None) -> tuple[UNet2DConditionModel, Any]:
    """(module, params) from a diffusers `unet/` folder (or the pipeline folder holding one)
    or a folder made by `checkpoints_conversion.convert_diffusers`.

    `dtype` is the compute dtype, `param_dtype` (default: `dtype`) the one the parameters are
    stored in; `variant="fp16"` picks diffusers' `.fp16.safetensors` files. The config is
    checked before any weight is read.
    """
    folder = component_folder(folder, "unet")
    cfg = UNetConfig.from_diffusers(json.loads((folder / CONFIG_NAME).read_text()))
    params = load_params(folder, abstract_params(cfg, param_dtype or dtype), variant)
    return UNet2DConditionModel(cfg, dtype), params
