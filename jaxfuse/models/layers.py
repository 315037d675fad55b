"""Layers shared by the UNet and the VAE: convolution, group norm, attention, ResNet block,
down- and upsampling.

Legend for shape lines: B batch, H/W rows/columns, C channels, G norm groups, T query tokens,
S key/value tokens, N heads (in attention) and D channels per head.

This is the only module that knows about patches (DESIGN.md). Inside `shard_map`, with a
`Patch` whose mode is not single, each layer that looks beyond its own rows gets that context
from the other patches (`jaxfuse.parallel.patch`): a 3x3 convolution the neighbours' edge rows in
place of its zero padding, group norm the whole image's statistics, self-attention every patch's
keys and values (pcpp: the two neighbours' nearest ones). `exchanged` decides per mode whether the
context is this step's or the previous step's (kept in the `stale` collection), as the table in
`jaxfuse.parallel.patch` says. Everything else (linear layers, 1x1 convolutions, cross-attention,
nearest upsampling) is row-local.

Activations are NHWC. `dtype` is the compute dtype; norm statistics, attention logits and softmax
are always float32.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxfuse.parallel import patch as px
from jaxfuse.parallel.patch import Patch
from jaxfuse.parallel_config import GroupNormMode, Mode

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
    E[x²] - E[x]², which cancels catastrophically when the mean is large. Both passes reduce
    over the pixels first, with the channels contiguous, then over the channels of a group:
    2-4x faster on CPU than one reduction over the grouped axes (benchmarks/RESULTS.md).
    """
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c).astype(jnp.float32)

    def per_group(channel_means: jax.Array) -> jax.Array:  # [B, C] -> [B, G]
        return channel_means.reshape(b, num_groups, c // num_groups).mean(axis=-1)

    mean = per_group(x.mean(axis=1))
    var = per_group(jnp.square(x - per_channel(mean, c)[:, None, :]).mean(axis=1))
    return mean, var


def per_channel(group_values: jax.Array, channels: int) -> jax.Array:
    """[B, G] -> [B, C]: each group's value repeated for its channels."""
    return jnp.repeat(group_values, channels // group_values.shape[-1], axis=-1)


def normalize_groups(x: jax.Array, mean: jax.Array, var: jax.Array, eps: float, scale: jax.Array,
                     bias: jax.Array) -> jax.Array:
    """[B, H, W, C] with per-group [B, G] statistics and per-channel [C] scale and bias ->
    (x - mean) / sqrt(var + eps) * scale + bias in float32, with per-channel [B, C] factors."""
    c = x.shape[-1]
    gain = per_channel(lax.rsqrt(var + eps), c) * scale.astype(jnp.float32)
    centred = x.astype(jnp.float32) - per_channel(mean, c)[:, None, None, :]
    return centred * gain[:, None, None, :] + bias.astype(jnp.float32)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int, is_causal: bool = False,
              key_mask: jax.Array | None = None) -> jax.Array:
    """[B, T, N*D] queries over [B, S, N*D] keys and values -> [B, T, N*D]; `is_causal`: query
    t sees keys 0..t only (text encoders); `key_mask` [S] bool: the keys every query sees.

    On CPU two einsums around a float32 softmax: measured 1.3-1.9x faster there than
    `jax.nn.dot_product_attention`, with the same result (benchmarks/RESULTS.md). Elsewhere
    `jax.nn.dot_product_attention`, which may pick a fused kernel (cuDNN on GPU)."""
    b, t, inner = q.shape
    s = k.shape[1]
    d = inner // num_heads
    q, k, v = q.reshape(b, t, num_heads, d), k.reshape(b, s, num_heads, d), v.reshape(b, s, num_heads, d)
    mask = None if key_mask is None else key_mask[None, None, None, :]  # broadcast to [B, N, T, S]
    if jax.default_backend() != "cpu":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal).reshape(b, t, inner)
    logits = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(d))
    if is_causal:
        causal = jnp.tril(jnp.ones((t, s), bool))
        mask = causal if mask is None else mask & causal
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnts,bsnd->btnd", weights, v).reshape(b, t, inner)


def exchanged(module: nn.Module, name: str, patch: Patch, exchange: Callable[[], Any], fresh: bool = False,
              keep: Callable[[Any], Any] | None = None) -> Any:
    """The context `module` uses this step under the stale entry `name`: `exchange()`'s result in
    sync steps (or when `fresh`), the value kept from the previous step in displaced and pcpp
    ones. A step that writes stale context keeps this step's exchange (or the part `keep` takes of
    it) for the next; in a displaced step nothing this step computes waits on it, so it overlaps
    the step's compute."""
    result = exchange()
    used = result
    if patch.reads_stale and not fresh:
        if not module.has_variable(px.STALE, name):
            raise ValueError(f"{module.name}: a {patch.mode.value} step needs the previous step's '{name}' "
                             "context; run at least one synchronous warm-up step first.")
        used = module.get_variable(px.STALE, name)
    if patch.writes_stale:
        module.put_variable(px.STALE, name, result if keep is None else keep(result))
    return used


def apply_with_state(module: nn.Module, params: Any, state: Mapping[str, Any], writes: Collection[str], *args,
                     **kwargs) -> tuple[Any, dict[str, Any]]:
    """`module.apply` with the variable collections of `state` (None ones left out): (output, each
    collection of `state` after the call, as the module wrote it for those in `writes`, as given
    for the others). A written collection holds every entry it was given, updated or not."""
    variables = {"params": params} | {name: value for name, value in state.items() if value is not None}
    if not writes:
        return module.apply(variables, *args, **kwargs), dict(state)
    out, written = module.apply(variables, *args, mutable=list(writes), **kwargs)
    return out, {**state, **written}


def apply_patched(module: nn.Module, patch: Patch, params: Any, stale: Any, *args, **kwargs) -> tuple[Any, Any]:
    """`module.apply` as one step under `patch`: (output, the stale context for the next step),
    which is this step's exchanges when it writes them and `stale` as given otherwise."""
    out, state = apply_with_state(module.clone(patch=patch), params, {px.STALE: stale},
                                  [px.STALE] if patch.writes_stale else [], *args, **kwargs)
    return out, state[px.STALE]


def upsample_nearest(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, 2H, 2W, C], each pixel repeated (PyTorch's `interpolate(nearest)`)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Conv2d(nn.Module):
    """A k x k convolution with bias, parameters named like PyTorch's `Conv2d` (kernel HWIO).

    On a patch of rows, output row j reads input rows s j - top .. s j - top + k - 1, so the
    patch needs `top` rows of the patch above and k - s - top of the one below (3x3: one and
    one; stride 2 with padding 1: one above, none below; the VAE's (0, 1) padding: one below).
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: Padding | None = None  # None: k // 2 on every side, the size-preserving padding
    dtype: Dtype = jnp.float32
    patch: Patch = Patch()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s = self.kernel_size, self.stride
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        padding = self.padding if self.padding is not None else ((k // 2, k // 2),) * 2
        x = x.astype(self.dtype)
        above, below = padding[0][0], k - s - padding[0][0]
        if self.patch.split and (above or below):
            x = self.with_context_rows(x, above, below)
            padding = ((0, 0), padding[1])
        y = conv2d(x, kernel.astype(self.dtype), s, padding)
        return y + bias.astype(self.dtype)

    def with_context_rows(self, x: jax.Array, above: int, below: int) -> jax.Array:
        """[B, h, W, C] -> [B, above + h + below, W, C]: the patch between its neighbours' rows
        (zeros in naive mode and at the image's borders)."""
        if self.patch.mode == Mode.NAIVE:
            b, _, w, c = x.shape
            top, bottom = jnp.zeros((b, above, w, c), x.dtype), jnp.zeros((b, below, w, c), x.dtype)
        else:
            top, bottom = exchanged(self, px.HALO, self.patch, lambda: px.neighbour_rows(x, above, below))
        return jnp.concatenate([top, x, bottom], axis=1)


class GroupNorm(nn.Module):
    """PyTorch `GroupNorm` with an affine transform; statistics in float32, of the whole image
    when the image is split (see `GroupNormMode` for displaced steps)."""

    num_groups: int
    epsilon: float
    dtype: Dtype = jnp.float32
    patch: Patch = Patch()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean, var = group_moments(x, self.num_groups)
        if self.patch.split:
            mean, var = self.image_moments(mean, var)
        y = normalize_groups(x, mean, var, self.epsilon, scale, bias)
        return y.astype(self.dtype)

    def image_moments(self, mean: jax.Array, var: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The patch's statistics [B, G] -> the ones this step normalises with."""
        gn, displaced = self.patch.gn, self.patch.reads_stale
        if self.patch.mode == Mode.NAIVE or (displaced and gn == GroupNormMode.SEPARATE):
            return mean, var
        fresh = displaced and gn == GroupNormMode.SYNC
        moments = exchanged(self, px.MOMENTS, self.patch, lambda: px.gather_moments(mean, var), fresh)
        if displaced and gn == GroupNormMode.CORRECTED:
            moments = px.with_own_moments(moments, mean, var)
        elif displaced and gn == GroupNormMode.CORRECTED_DISTRIFUSION:
            return px.distrifusion_moments(moments, mean, var)
        return px.combine_moments(moments)


class Attention(nn.Module):
    """diffusers `Attention`: multi-head attention over the tokens of `x`, or over `context`
    (cross-attention) when it is given. [B, T, C] -> [B, T, C]. `qkv_bias`: the VAE's
    projections have biases, the UNet's do not. On a split image, self-attention's queries are
    the patch's own tokens and its keys and values those of every patch (naive: its own; pcpp:
    its own and the windows of its two neighbours)."""

    num_heads: int
    head_dim: int
    qkv_bias: bool = False
    dtype: Dtype = jnp.float32
    patch: Patch = Patch()

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        inner = self.num_heads * self.head_dim
        source = x if context is None else context
        q = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_q")(x)
        k = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_k")(source)
        v = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_v")(source)
        key_mask = None
        if context is None and self.patch.split and self.patch.mode != Mode.NAIVE:
            kv, key_mask = self.patch_keys_values(jnp.concatenate([k, v], axis=-1))  # one exchange for both
            k, v = jnp.split(kv, 2, axis=-1)
        out = attention(q, k, v, self.num_heads, key_mask=key_mask)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out)

    def patch_keys_values(self, local: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """The patch's keys and values [B, T, 2 inner] -> the ones its queries see [B, S, 2 inner]
        and which of them count ([S] bool; None: all)."""
        patch = self.patch
        if patch.context is None:  # sync, displaced: every patch's
            kv = exchanged(self, px.KV, patch, lambda: px.gather_rows(local))
            return (px.own_rows_fresh(kv, local) if patch.reads_stale else kv), None
        tokens = local.shape[1]
        count = px.window_tokens(patch.context, tokens)
        if patch.mode == Mode.PCPP:  # the neighbours' windows from the previous step, own tokens fresh
            above, below = exchanged(self, px.KV_WINDOW, patch, lambda: px.neighbour_rows(local, count, count))
            return jnp.concatenate([above, local, below], axis=1), px.window_mask(tokens, count)
        # A pcpp run's synchronous warm-up: every patch's keys now; the windows, cut from them
        # without another exchange, kept for the first pcpp step.
        return exchanged(self, px.KV_WINDOW, patch, lambda: px.gather_rows(local),
                         keep=lambda kv: px.window_of(kv, tokens, count)), None


class ResnetBlock(nn.Module):
    """diffusers `ResnetBlock2D` ("default" time-embedding shift, SiLU, output scale 1).

    [B, H, W, C] (+ time embedding [B, E]) -> [B, H, W, out_channels].
    """

    out_channels: int
    num_groups: int
    epsilon: float
    dtype: Dtype = jnp.float32
    patch: Patch = Patch()

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        def norm(name):
            return GroupNorm(self.num_groups, self.epsilon, self.dtype, self.patch, name=name)

        h = nn.silu(norm("norm1")(x))
        h = Conv2d(self.out_channels, dtype=self.dtype, patch=self.patch, name="conv1")(h)
        if temb is not None:
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(norm("norm2")(h))
        h = Conv2d(self.out_channels, dtype=self.dtype, patch=self.patch, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = Conv2d(self.out_channels, kernel_size=1, dtype=self.dtype, name="conv_shortcut")(x)
        return x + h


class Downsample(nn.Module):
    """A stride-2 3x3 convolution. `padding=1` pads every side (UNet); `padding=0` pads only the
    bottom row and right column (VAE), as diffusers' `Downsample2D` does."""

    features: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    patch: Patch = Patch()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = ((self.padding, self.padding),) * 2 if self.padding else ((0, 1), (0, 1))
        return Conv2d(self.features, stride=2, padding=pad, dtype=self.dtype, patch=self.patch, name="conv")(x)


class Upsample(nn.Module):
    """2x nearest-neighbour upsampling followed by a 3x3 convolution."""

    features: int
    dtype: Dtype = jnp.float32
    patch: Patch = Patch()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return Conv2d(self.features, dtype=self.dtype, patch=self.patch, name="conv")(upsample_nearest(x))
