"""Views of a canvas larger than the model's native size (MultiDiffusion, Bar-Tal et al. 2023):
windows of the native latent size at a stride, each denoised as an image of its own, the canvas
set to the weighted average of what the views make of it. Pure functions for the view boxes,
the crop and the merge; uniform weights (MultiDiffusion) or Gaussian ones centred on each window
(Mixture of Diffusers, Jiménez 2023), which fade a view out towards its borders.

    boxes = view_boxes((H, W), window=(h, w), stride=(sh, sw))   # [V, 2] top-left corners
    views = crop(canvas, boxes, (h, w))                          # [V, B, C, h, w]
    canvas = merge(views, boxes, (H, W), window_weights((h, w), Weighting.GAUSSIAN))
    loop = views_loop(unet, sampling, Tiling((h, w), (sh, sw)), (H, W), vae_factor, mesh)  # the image loop on views

Merging the views' noise predictions and then stepping the canvas once equals MultiDiffusion's
average of the views' stepped latents for every sampler here: a step is, per pixel, linear in
the noise prediction with coefficients the same in every view.

Legend: B images, C channels, H/W the canvas's latent rows and columns, h/w a window's, V views.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxfuse.config import ConfigError
from jaxfuse.parallel.views import Views
from jaxfuse.sampling.image import denoise
from jaxfuse.sampling.step import predict_noise

GAUSSIAN_VARIANCE = 0.01  # Mixture of Diffusers' variance, on coordinates scaled to the window's side


class Weighting(str, enum.Enum):
    UNIFORM = "uniform"  # every pixel of a view counts the same (MultiDiffusion)
    GAUSSIAN = "gaussian"  # a view counts less towards its borders (Mixture of Diffusers)


def view_starts(size: int, window: int, stride: int) -> list[int]:
    """The first row (or column) of each view along one side: 0, stride, 2 stride, ..., and the
    last view flush with the end, so that every row is in some view."""
    if not 0 < window <= size:
        raise ConfigError(f"a view of {window} does not fit a canvas of {size}; make the canvas at least the "
                          "model's native size.")
    if not 0 < stride <= window:
        raise ConfigError(f"stride {stride} must be in [1, {window}] (the window): a larger one leaves gaps.")
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def view_boxes(canvas: tuple[int, int], window: tuple[int, int], stride: tuple[int, int]) -> np.ndarray:
    """(H, W), (h, w), (sh, sw) -> [V, 2] int: each view's (top, left), row by row."""
    rows, columns = (view_starts(*sides) for sides in zip(canvas, window, stride))
    return np.asarray([(top, left) for top in rows for left in columns], np.int32)


def window_weights(window: tuple[int, int], weighting: Weighting) -> np.ndarray:
    """[h, w] float32 weights of a view's pixels: ones, or the product of two Gaussians over the
    rows and columns, centred on the window, variance `GAUSSIAN_VARIANCE` in units of its side."""
    if Weighting(weighting) is Weighting.UNIFORM:
        return np.ones(window, np.float32)

    def gaussian(side: int) -> np.ndarray:
        x = (np.arange(side) - (side - 1) / 2) / side
        return np.exp(-x**2 / (2 * GAUSSIAN_VARIANCE)) / np.sqrt(2 * np.pi * GAUSSIAN_VARIANCE)

    return np.outer(*(gaussian(side) for side in window)).astype(np.float32)


def crop(canvas: jnp.ndarray, boxes: Any, window: tuple[int, int]) -> jnp.ndarray:
    """[B, C, H, W], [V, 2] (numpy or traced) -> [V, B, C, h, w]: each view's window of the canvas."""
    size = (*canvas.shape[:2], *window)
    return jnp.stack([lax.dynamic_slice(canvas, (0, 0, boxes[v][0], boxes[v][1]), size) for v in range(len(boxes))])


def merge(views: jnp.ndarray, boxes: Any, canvas: tuple[int, int], weights: np.ndarray) -> jnp.ndarray:
    """[V, B, C, h, w] views, [V, 2] boxes, (H, W), [h, w] weights -> [B, C, H, W]: at each pixel
    the weighted average of the views that cover it."""
    total, weight = merge_sums(views, boxes, canvas, weights)
    return total / weight


def merge_sums(views: jnp.ndarray, boxes: Any, canvas: tuple[int, int], weights: np.ndarray,
               counts: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The two sums `merge` divides: the weighted views placed on the canvas [B, C, H, W] and the
    weight at each pixel [H, W]. `counts` [V] (1 or 0) leaves out padding views. Views spread over
    devices add their sums (one `psum`) before dividing."""
    h, w = weights.shape
    total = jnp.zeros((*views.shape[1:3], *canvas), jnp.float32)
    weight = jnp.zeros(canvas, jnp.float32)
    for v in range(views.shape[0]):
        top, left = boxes[v][0], boxes[v][1]
        view_weights = jnp.asarray(weights) if counts is None else weights * counts[v]
        placed = lax.dynamic_slice(total, (0, 0, top, left), (*total.shape[:2], h, w))
        total = lax.dynamic_update_slice(total, placed + views[v].astype(jnp.float32) * view_weights,
                                         (0, 0, top, left))
        weight = lax.dynamic_update_slice(weight, lax.dynamic_slice(weight, (top, left), (h, w)) + view_weights,
                                          (top, left))
    return total, weight


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How a canvas is cut into views, in latent rows and columns."""

    window: tuple[int, int]  # (h, w): the model's native latent size
    stride: tuple[int, int]
    weighting: Weighting = Weighting.UNIFORM


def view_predictor(tiling: Tiling, canvas: tuple[int, int], vae_factor: int, spread: bool = False) -> Callable:
    """A noise prediction with `predict_noise`'s signature for a canvas [B, C, H, W]: every view
    predicted as an image of its own, one view at a time (`lax.map`: the memory of one), with
    SDXL's crop micro-conditioning set to the view's top-left corner in pixels, and the
    predictions merged. The image loop (`sampling.image`) runs it as it runs `predict_noise`.
    `spread` (inside `shard_map` over `VIEWS`, the canvas replicated): each device predicts its
    share of the views, padded to a multiple of the devices with views that count for nothing, and
    one `psum` of the merge's two sums joins them."""
    boxes = view_boxes(canvas, tiling.window, tiling.stride)
    weights = window_weights(tiling.window, tiling.weighting)
    layout = Views(spread)

    def predict(unet: Any, params: Any, sampling: Any, patch: Any, schedule: Any, i: jax.Array,
                latents: jax.Array, cond: Any, guidance: Any, stale: Any = None) -> tuple[jax.Array, Any]:
        mine, counts = layout.mine(boxes)

        def one(view_and_corner):
            view, corner = view_and_corner
            # time_ids: (original size, crop top-left, target size), per conditioning row.
            view_cond = cond.replace(time_ids=cond.time_ids.at[:, 2:4].set(corner))
            return predict_noise(unet, params, sampling, patch, schedule, i, view, view_cond, guidance)[0]

        noises = lax.map(one, (crop(latents, mine, tiling.window), (mine * vae_factor).astype(jnp.float32)))
        sums = merge_sums(noises, mine, canvas, weights, counts)
        total, weight = layout.join(sums)
        return total / weight, stale

    return predict


def views_loop(unet: Any, sampling: Any, tiling: Tiling, canvas: tuple[int, int], vae_factor: int,
               mesh: Mesh | None) -> Callable:
    """The image loop (`image.denoise`) on a canvas's views, as a function of (params, latents,
    cond, schedule, guidance, noise_keys); on `mesh` (one axis, `VIEWS`) the views spread over its
    devices and everything else replicated."""
    loop = functools.partial(denoise, unet, sampling=sampling,
                             predict=view_predictor(tiling, canvas, vae_factor, spread=mesh is not None))
    if mesh is None:
        return loop
    return jax.shard_map(loop, mesh=mesh, in_specs=P(), out_specs=P())
