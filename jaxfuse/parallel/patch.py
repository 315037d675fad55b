"""Patch parallelism: what a layer knows of a step (`Patch`), the stale contract, and the pure
exchanges a layer makes with the other patches.

The latent is split by rows over the mesh axis `PATCH`: device p holds rows [p h, (p + 1) h) of
every activation. Three kinds of layer look beyond their own rows (DESIGN.md):

    3x3 convolution   rows of the neighbouring patches    `neighbour_rows`  (ppermute)
    self-attention    keys and values of every patch      `gather_rows`     (all_gather)
                      (pcpp: the neighbours' nearest      `neighbour_rows`  (ppermute)
                      tokens only)
    group norm        statistics of the whole image       `gather_moments`  (all_gather)

These functions run inside `shard_map` and are called only from `models/layers.py` (and, for the
guidance batch, from the sampling loops through `join_guidance_halves` and `image_std`).

The stale contract. A step that reads stale context finds the previous step's exchanges in the
Flax collection `STALE`, one entry per layer under the exchange's name below; a step that writes
it leaves this step's there. Per mode and layer, what the layer uses (and what it writes):

    layer, exchange             sync     warm-up (sync,     displaced             pcpp                 naive
                                         `record`)
    conv_in, none kept          fresh    fresh              fresh                 fresh                zeros
    other 3x3 conv, HALO        fresh    fresh; writes      stale; writes         stale; writes        zeros
    self-attention, KV          fresh    fresh (displaced   stale, own fresh;     -                    own only
                                         run); writes       writes
    self-attention, KV_WINDOW   -        fresh (pcpp run);  -                     stale windows, own   own only
                                         writes windows                           fresh; writes
    group norm, MOMENTS         fresh    fresh; writes      by `GroupNormMode`;   as displaced         own only
                                                            writes

`conv_in` reads its neighbours' latent rows fresh in every mode (a few KB; `Patch.fresh`), and
`GroupNormMode.SYNC` makes a displaced step's statistics fresh. Every stale leaf leads with the
batch, so the stale state can be sliced or rolled per image:

    HALO       (rows above [B, a, W, C], rows below [B, b, W, C])
    KV         [B, S, 2 C]                          keys and values side by side
    KV_WINDOW  (above [B, w, 2 C], below [B, w, 2 C])
    MOMENTS    [B, N, 2, G]                         every patch's (mean, variance)

PCPP's window: a patch of T tokens (h rows of W) sees, of the patch above and of the patch below,
the `window_tokens(p, T)` = p x T tokens nearest to it, rounded to the nearest token (halves up):
whole rows first, then the rest of a row in raster order (the row's end above, its start below).
So the window is p x h rows exactly whenever p x h is whole, and to the token otherwise.

Legend: B batch, h local rows, W columns, C channels, G groups, N patches, S all tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxfuse.parallel_config import GroupNormMode, Mode, ParallelConfig

PATCH = "patch"  # mesh axis over which the image rows are split
CFG = "cfg"  # mesh axis over which the guidance batch halves are split
STALE = "stale"  # Flax collection holding the previous step's exchanged context
# The stale entries, one per layer that exchanges (the table above).
HALO = "halo"
KV = "kv"
KV_WINDOW = "kv_window"
MOMENTS = "moments"


@dataclasses.dataclass(frozen=True)
class Patch:
    """What a layer knows about patches in one denoising step.

    `record`: a synchronous step that also writes its exchanges to `STALE`, for displaced steps to
    come (the warm-up steps of a displaced or pcpp run). `context`: in a pcpp run (its warm-up
    steps too), the fraction p of each neighbour patch that self-attention sees; None otherwise.
    """

    mode: Mode = Mode.SINGLE
    gn: GroupNormMode = GroupNormMode.CORRECTED
    record: bool = False
    context: float | None = None

    @classmethod
    def of(cls, parallel: ParallelConfig, mode: Mode | None = None, record: bool = False) -> Patch:
        """The layers' view of one step of `parallel` in `mode` (default: its own mode)."""
        return cls(mode or parallel.mode, parallel.gn, record,
                   parallel.context if parallel.mode == Mode.PCPP else None)

    @property
    def split(self) -> bool:
        return self.mode != Mode.SINGLE

    @property
    def reads_stale(self) -> bool:
        """The step uses the previous step's context (displaced and pcpp)."""
        return self.mode.reads_stale

    @property
    def writes_stale(self) -> bool:
        return self.reads_stale or (self.record and self.mode == Mode.SYNC)

    def fresh(self) -> Patch:
        """The same step with a fresh exchange that is not kept: the first convolution reads its
        neighbours' latent rows (a few KB) as they are now, in every mode but naive."""
        mode = Mode.SYNC if self.reads_stale else self.mode
        return dataclasses.replace(self, mode=mode, record=False)


def neighbour_rows(x: jax.Array, above: int, below: int) -> tuple[jax.Array, jax.Array]:
    """[B, h, W, C] -> the last `above` rows of the patch above [B, above, W, C] and the first
    `below` rows of the patch below [B, below, W, C]; zeros past the image's top and bottom,
    which is the unsplit convolution's zero padding. Tokens [B, T, C] in raster order work the
    same way, a token for a row."""
    n = lax.axis_size(PATCH)
    down = [(p, p + 1) for p in range(n - 1)]  # each patch sends its last rows to the next one
    up = [(p + 1, p) for p in range(n - 1)]
    h = x.shape[1]
    from_above = lax.ppermute(x[:, h - above:], PATCH, down) if above else x[:, :0]
    from_below = lax.ppermute(x[:, :below], PATCH, up) if below else x[:, :0]
    return from_above, from_below


def gather_rows(tokens: jax.Array) -> jax.Array:
    """[B, h W, C] local tokens -> [B, S, C] every patch's tokens, in image order."""
    return lax.all_gather(tokens, PATCH, axis=1, tiled=True)


def window_tokens(context: float, tokens: int) -> int:
    """How many of a neighbour's `tokens` a pcpp self-attention sees: context x tokens rounded to
    the nearest token, halves up (the product is rounded to 9 decimals first, so that 0.3 x 15
    counts as the 4.5 it is and not as float's 4.4999...)."""
    return math.floor(round(context * tokens, 9) + 0.5)


def window_of(gathered: jax.Array, tokens: int, count: int) -> tuple[jax.Array, jax.Array]:
    """[B, S, C] every patch's tokens in image order -> this patch's windows, the last `count`
    tokens of the patch above and the first `count` of the patch below ([B, count, C] each), as
    `neighbour_rows` exchanges them, but read from an all-gather already made. At the image's
    top and bottom they hold other tokens, which `window_mask` masks."""
    start = lax.axis_index(PATCH) * tokens
    above = lax.dynamic_slice_in_dim(gathered, start - count, count, axis=1)
    below = lax.dynamic_slice_in_dim(gathered, start + tokens, count, axis=1)
    return above, below


def window_mask(tokens: int, count: int) -> jax.Array:
    """[count + tokens + count] bool: which of (window above, own tokens, window below) a pcpp
    self-attention sees; the top patch has nothing above it, the bottom one nothing below."""
    p, n = lax.axis_index(PATCH), lax.axis_size(PATCH)
    return jnp.concatenate([jnp.full(count, p > 0), jnp.ones(tokens, bool), jnp.full(count, p < n - 1)])


def own_rows(draw: Callable[[tuple[int, ...]], jax.Array], shape: tuple[int, ...], axis: int) -> jax.Array:
    """This patch's rows (`shape`, rows along `axis`) of `draw(whole image's shape)`: what a patch
    takes of an array made for the whole image, such as a sampler's noise."""
    rows = shape[axis]
    whole = (*shape[:axis], rows * lax.axis_size(PATCH), *shape[axis + 1:])
    return lax.dynamic_slice_in_dim(draw(whole), lax.axis_index(PATCH) * rows, rows, axis=axis)


def own_rows_fresh(gathered: jax.Array, local: jax.Array) -> jax.Array:
    """[B, S, C] gathered (stale) tokens with this patch's slice replaced by `local` [B, T, C]."""
    start = lax.axis_index(PATCH) * local.shape[1]
    return lax.dynamic_update_slice_in_dim(gathered, local.astype(gathered.dtype), start, axis=1)


def gather_moments(mean: jax.Array, var: jax.Array) -> jax.Array:
    """Local group statistics [B, G] twice -> every patch's [B, N, 2, G] (mean, variance)."""
    return lax.all_gather(jnp.stack([mean, var], axis=1), PATCH, axis=1)


def combine_moments(moments: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[B, N, 2, G] per-patch (mean, variance) of equal-size patches -> whole-image mean and
    variance [B, G]. Chan's combination: the variance is the mean of the patch variances plus
    the variance of the patch means, with no E[x^2] - E[x]^2 cancellation."""
    means, variances = moments[:, :, 0], moments[:, :, 1]
    mean = means.mean(axis=1)
    return mean, (variances + jnp.square(means - mean[:, None])).mean(axis=1)


def with_own_moments(moments: jax.Array, mean: jax.Array, var: jax.Array) -> jax.Array:
    """[B, N, 2, G] with this patch's entry replaced by its fresh (mean, variance) [B, G]."""
    return moments.at[:, lax.axis_index(PATCH)].set(jnp.stack([mean, var], axis=1))


def distrifusion_moments(stale: jax.Array, mean: jax.Array, var: jax.Array) -> tuple[jax.Array, jax.Array]:
    """DistriFusion's corrected asynchronous statistics, as its code computes them: the stale
    whole-image E[x] and E[x^2] plus the change of the own patch's, not divided by N; where the
    variance comes out negative, the own patch's variance is used. [B, N, 2, G] and [B, G]
    twice -> [B, G] twice."""
    own = stale[:, lax.axis_index(PATCH)]  # [B, 2, G]
    means, squares = stale[:, :, 0], stale[:, :, 1] + jnp.square(stale[:, :, 0])
    ex = means.mean(axis=1) + (mean - own[:, 0])
    ex2 = squares.mean(axis=1) + (var + jnp.square(mean) - own[:, 1] - jnp.square(own[:, 0]))
    global_var = ex2 - jnp.square(ex)
    return ex, jnp.where(global_var < 0, var, global_var)


def image_std(x: jax.Array, split: bool) -> jax.Array:
    """[B, ...] -> [B] unbiased standard deviation of each sample; of the whole image when its
    rows are split over the patches."""
    axes = tuple(range(1, x.ndim))
    mean, var = x.mean(axis=axes), x.var(axis=axes)
    count = math.prod(x.shape[1:])
    if split:
        mean, var = combine_moments(gather_moments(mean[:, None], var[:, None]))
        mean, var = mean[:, 0], var[:, 0]
        count *= lax.axis_size(PATCH)
    return jnp.sqrt(var * count / (count - 1))


def image_mean(x: jax.Array, split: bool) -> jax.Array:
    """[B, h, W, C] -> [B, 1, 1, C] each channel's mean over the image; over the whole image when
    its rows are split over the patches (every patch holds as many rows)."""
    mean = x.mean(axis=(1, 2), keepdims=True)
    return lax.pmean(mean, PATCH) if split else mean


def unconditional_rows(rows: int, guided: bool, cfg_parallel: bool) -> jax.Array:
    """[rows] bool: the rows of a UNet batch that hold the unconditional half of the guidance: the
    first half when both lie here, every row on `CFG` group 0 with `cfg_parallel`, none unguided."""
    if not guided:
        return jnp.zeros((rows,), bool)
    if cfg_parallel:
        return jnp.broadcast_to(lax.axis_index(CFG) == 0, (rows,))
    return jnp.arange(rows) < rows // 2


def varying_axes(aval: Any) -> frozenset[str]:
    """The mesh axes over which a value (its `jax.typeof` or `eval_shape` result) differs from
    device to device inside `shard_map`."""
    return frozenset(aval.manual_axis_type.varying) if aval.manual_axis_type else frozenset()


def zeros_like_shapes(shapes: Any) -> Any:
    """A tree of zeros shaped like `shapes` (`jax.eval_shape`'s result) and, inside `shard_map`,
    varying over the same mesh axes, so it can start a scan carry the step then writes."""

    def zeros(shape: jax.ShapeDtypeStruct) -> jax.Array:
        value = jnp.zeros(shape.shape, shape.dtype)
        varying = tuple(sorted(varying_axes(shape)))
        return lax.pcast(value, varying, to="varying") if varying else value

    return jax.tree.map(zeros, shapes)


def vary_like(tree: Any, like: Any) -> Any:
    """`tree` cast to vary over every mesh axis the matching leaf of `like` varies over. A loop's
    carry must keep its type: stale context that came in stacked over every device varies over
    every mesh axis, even where a step writes the same value on all of an axis (a halo of the
    latents, which both guidance halves share)."""

    def cast(x: jax.Array, ref: jax.Array) -> jax.Array:
        missing = tuple(sorted(varying_axes(jax.typeof(ref)) - varying_axes(jax.typeof(x))))
        return lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree, like)


def join_guidance_halves(noise: jax.Array) -> jax.Array:
    """This `CFG` group's half of the noise prediction [B, ...] -> both halves [2B, ...],
    unconditional (group 0) first: one small exchange per step. A sum of each half in its own
    slot, so the result is the same on both groups (what the scan carry and `shard_map` need)."""
    group = lax.axis_index(CFG)
    slots = jnp.stack([jnp.where(group == 0, noise, 0), jnp.where(group == 1, noise, 0)])
    return lax.psum(slots, CFG).reshape((-1,) + noise.shape[1:])
