"""Layers shared by the UNet and the VAE: convolution, group norm, attention, ResNet block,
down- and upsampling.

Legend for shape lines: B batch, H/W rows/columns, C channels, G norm groups, T query tokens,
S key/value tokens, N heads (in attention) and D channels per head.

This is the only module that will know about patches (DESIGN.md): each layer that looks beyond a
pixel's own row does so through one pure function, the seam where a patch-parallel mode exchanges
context. A 3x3 convolution's context is the rows of `conv2d`'s padding, group norm's is the
statistics of `group_moments`, self-attention's is the keys and values handed to `attention`.
Everything else (linear layers, 1x1 convolutions, cross-attention) is row-local.

Activations are NHWC. `dtype` is the compute dtype; norm statistics, attention logits and softmax
are always float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any
Padding = tuple[tuple[int, int], tuple[int, int]]


def conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding) -> jax.Array:
    """[B, H, W, C] * [k, k, C, O] -> [B, H', W', O], zero `padding` ((top, bottom), (left, right))."""
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def group_moments(x: jax.Array, num_groups: int) -> tuple[jax.Array, jax.Array]:
    """[B, H, W, C] -> mean, variance [B, G] over each group's pixels and channels, in float32.

    The variance is the mean of squared deviations from the mean (two passes), not
    E[x²] - E[x]², which cancels catastrophically when the mean is large.
    """
    b, h, w, c = x.shape
    xg = x.reshape(b, h * w, num_groups, c // num_groups).astype(jnp.float32)
    mean = xg.mean(axis=(1, 3))
    var = jnp.square(xg - mean[:, None, :, None]).mean(axis=(1, 3))
    return mean, var


def normalize_groups(x: jax.Array, mean: jax.Array, var: jax.Array, eps: float) -> jax.Array:
    """[B, H, W, C] with per-group [B, G] statistics -> normalised [B, H, W, C] float32."""
    b, h, w, c = x.shape
    g = mean.shape[-1]
    xg = x.reshape(b, h, w, g, c // g).astype(jnp.float32)
    xg = (xg - mean[:, None, None, :, None]) * lax.rsqrt(var + eps)[:, None, None, :, None]
    return xg.reshape(b, h, w, c)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int, is_causal: bool = False) -> jax.Array:
    """[B, T, N*D] queries over [B, S, N*D] keys and values -> [B, T, N*D]; `is_causal`: query
    t sees keys 0..t only (text encoders)."""
    b, t, inner = q.shape
    s = k.shape[1]
    d = inner // num_heads
    out = jax.nn.dot_product_attention(
        q.reshape(b, t, num_heads, d), k.reshape(b, s, num_heads, d), v.reshape(b, s, num_heads, d),
        is_causal=is_causal,
    )
    return out.reshape(b, t, inner)


def upsample_nearest(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, 2H, 2W, C], each pixel repeated (PyTorch's `interpolate(nearest)`)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Conv2d(nn.Module):
    """A k x k convolution with bias, parameters named like PyTorch's `Conv2d` (kernel HWIO)."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: Padding | None = None  # None: k // 2 on every side, the size-preserving padding
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features)
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        padding = self.padding if self.padding is not None else ((k // 2, k // 2),) * 2
        y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, padding)
        return y + bias.astype(self.dtype)


class GroupNorm(nn.Module):
    """PyTorch `GroupNorm` with an affine transform; statistics in float32."""

    num_groups: int
    epsilon: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean, var = group_moments(x, self.num_groups)
        y = normalize_groups(x, mean, var, self.epsilon) * scale + bias
        return y.astype(self.dtype)


class Attention(nn.Module):
    """diffusers `Attention`: multi-head attention over the tokens of `x`, or over `context`
    (cross-attention) when it is given. [B, T, C] -> [B, T, C]. `qkv_bias`: the VAE's
    projections have biases, the UNet's do not."""

    num_heads: int
    head_dim: int
    qkv_bias: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        inner = self.num_heads * self.head_dim
        source = x if context is None else context
        q = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_q")(x)
        k = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_k")(source)
        v = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_v")(source)
        out = attention(q, k, v, self.num_heads)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out)


class ResnetBlock(nn.Module):
    """diffusers `ResnetBlock2D` ("default" time-embedding shift, SiLU, output scale 1).

    [B, H, W, C] (+ time embedding [B, E]) -> [B, H, W, out_channels].
    """

    out_channels: int
    num_groups: int
    epsilon: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = nn.silu(GroupNorm(self.num_groups, self.epsilon, self.dtype, name="norm1")(x))
        h = Conv2d(self.out_channels, dtype=self.dtype, name="conv1")(h)
        if temb is not None:
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(GroupNorm(self.num_groups, self.epsilon, self.dtype, name="norm2")(h))
        h = Conv2d(self.out_channels, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = Conv2d(self.out_channels, kernel_size=1, dtype=self.dtype, name="conv_shortcut")(x)
        return x + h


class Downsample(nn.Module):
    """A stride-2 3x3 convolution. `padding=1` pads every side (UNet); `padding=0` pads only the
    bottom row and right column (VAE), as diffusers' `Downsample2D` does."""

    features: int
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = ((self.padding, self.padding),) * 2 if self.padding else ((0, 1), (0, 1))
        return Conv2d(self.features, stride=2, padding=pad, dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
    """2x nearest-neighbour upsampling followed by a 3x3 convolution."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return Conv2d(self.features, dtype=self.dtype, name="conv")(upsample_nearest(x))
