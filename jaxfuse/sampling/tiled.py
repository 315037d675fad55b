"""Views of a canvas larger than the model's native size (MultiDiffusion, Bar-Tal et al. 2023):
windows of the native latent size at a stride, each denoised as an image of its own, the canvas
set to the weighted average of what the views make of it. Pure functions for the view boxes,
the crop and the merge; uniform weights (MultiDiffusion) or Gaussian ones centred on each window
(Mixture of Diffusers, Jiménez 2023), which fade a view out towards its borders.

    boxes = view_boxes((H, W), window=(h, w), stride=(sh, sw))   # [V, 2] top-left corners
    views = crop(canvas, boxes, (h, w))                          # [V, B, C, h, w]
    canvas = merge(views, boxes, (H, W), window_weights((h, w), Weighting.GAUSSIAN))
    loop = Loop(sampling, plan, mesh, views_predictor(Tiling((h, w), (sh, sw)), (H, W), vae_factor, mesh))
    latents = denoise(loop, denoiser, latents, CanvasConditioning(cond, whole_canvas(...)), schedule, guidance, keys)

Region prompts (MultiDiffusion's region-based generation): prompt p weighs each pixel by its mask
(the background, prompt 0, where no region is); every view is predicted once per prompt, and in
the first steps a region's view sees a solid colour outside its mask ("bootstrapping"), so that
what it draws stays inside. With one prompt and a mask of ones this is plain fused views.

Merging the views' noise predictions and then stepping the canvas once equals MultiDiffusion's
average of the views' stepped latents for every sampler here: a step is, per pixel, linear in
the noise prediction with coefficients the same in every view.

Legend: B images, C channels, H/W the canvas's latent rows and columns, h/w a window's (h' the rows
of a view on this device), V views, S this device's, P prompts, K background colours.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh

from jaxfuse import schedulers
from jaxfuse.config import ConfigError
from jaxfuse.parallel.patch import PATCH, vary_like
from jaxfuse.parallel.views import VIEWS, Views
from jaxfuse.sampling.denoiser import Conditioning, Control, Denoiser, ModelState
from jaxfuse.sampling.image import Predictor
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
    """[..., H, W], [V, 2] (numpy or traced) -> [V, ..., h, w]: each view's window of the canvas."""
    return jnp.stack([crop_one(canvas, boxes[v], window) for v in range(len(boxes))])


def crop_one(canvas: jnp.ndarray, corner: Any, window: tuple[int, int]) -> jnp.ndarray:
    """[..., H, W], (top, left) -> [..., h, w]."""
    lead = canvas.ndim - 2
    return lax.dynamic_slice(canvas, (0,) * lead + (corner[0], corner[1]), (*canvas.shape[:lead], *window))


def merge(views: jnp.ndarray, boxes: Any, canvas: tuple[int, int], weights: np.ndarray) -> jnp.ndarray:
    """[V, B, C, h, w] views, [V, 2] boxes, (H, W), [h, w] weights -> [B, C, H, W]: at each pixel
    the weighted average of the views that cover it."""
    weights = jnp.broadcast_to(jnp.asarray(weights), (views.shape[0], *weights.shape))
    total, weight = merge_sums(views * weights[:, None, None], weights, boxes, canvas)
    return total / weight


def merge_sums(weighted: jnp.ndarray, weights: jnp.ndarray, boxes: Any,
               canvas: tuple[int, int]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The two sums `merge` divides: [V, B, C, h, w] views already multiplied by their weights
    and [V, h, w] the weights, each placed at its box on the canvas and added up -> [B, C, H, W]
    and [H, W]. Views spread over devices add their sums (one `psum`) before dividing."""
    h, w = weights.shape[1:]
    boxes = jnp.asarray(boxes)

    def add(v, sums):  # a loop, not V copies of the body: a large canvas has hundreds of views
        total, weight = sums
        top, left = boxes[v, 0], boxes[v, 1]
        placed = lax.dynamic_slice(total, (0, 0, top, left), (*total.shape[:2], h, w))
        total = lax.dynamic_update_slice(total, placed + weighted[v].astype(jnp.float32), (0, 0, top, left))
        weight = lax.dynamic_update_slice(weight, lax.dynamic_slice(weight, (top, left), (h, w)) + weights[v],
                                          (top, left))
        return total, weight

    zeros = (jnp.zeros((*weighted.shape[1:3], *canvas), jnp.float32), jnp.zeros(canvas, jnp.float32))
    return lax.fori_loop(0, weighted.shape[0], add, vary_like(zeros, (weighted, weights)))


@flax.struct.dataclass
class Regions:
    """Where each prompt of a canvas applies, and MultiDiffusion's bootstrapping: in the first
    `bootstrap_steps` steps a region's view sees, outside its mask, a solid colour (drawn afresh
    each step from `backgrounds`) noised to the step's level instead of the canvas (MultiDiffusion
    draws 20 colours and bootstraps 20 of 50 steps)."""

    masks: jax.Array  # [P, H, W] float32: each prompt's weight at each latent pixel; prompt 0 the background
    backgrounds: jax.Array  # [K, C] float32: the latents of K solid colours
    bootstrap_steps: jax.Array  # [] int32
    key: jax.Array  # [1 or B, 2] uint32 key data, one per image: the colours' draws and their noise


def whole_canvas(canvas: tuple[int, int], channels: int) -> Regions:
    """One prompt over the whole canvas: plain fused views, no bootstrapping."""
    return Regions(jnp.ones((1, *canvas), jnp.float32), jnp.zeros((1, channels), jnp.float32), jnp.int32(0),
                   jax.random.key_data(jax.random.key(0))[None])


def region_masks(boxes: np.ndarray, canvas: tuple[int, int]) -> np.ndarray:
    """[R, 4] (top, left, bottom, right) latent boxes -> [1 + R, H, W] masks: the background where
    no box is (MultiDiffusion's 1 - the sum of the regions, at least 0), then one per box."""
    masks = np.zeros((len(boxes), *canvas), np.float32)
    for mask, (top, left, bottom, right) in zip(masks, np.asarray(boxes)):
        mask[top:bottom, left:right] = 1.0
    return np.concatenate([np.clip(1 - masks.sum(0, keepdims=True), 0, None), masks])


@flax.struct.dataclass
class CanvasConditioning:
    """What the views of a canvas read: the prompts' conditioning, rows prompt by prompt
    ([P B], doubled with guidance, the unconditional half first), and where each prompt applies."""

    prompts: Conditioning
    regions: Regions


def region_draws(regions: Regions, i: jax.Array, shape: tuple[int, int, int, int]) -> tuple[jax.Array, jax.Array]:
    """Step i's bootstrap colour for each prompt and image [P, B, C], drawn afresh each step, and
    the unit noise [P, B, C, H, W] that brings it to the step's level, the same every step (shape:
    (P, B, H, W)); each image's from its own key (one key: the same for every image), and the
    same in every view."""
    prompts, images, height, width = shape
    choices, channels = regions.backgrounds.shape

    def one(key):
        picks = jax.random.randint(jax.random.fold_in(key, i), (prompts,), 0, choices)
        return regions.backgrounds[picks], jax.random.normal(key, (prompts, channels, height, width))

    colours, noise = jax.vmap(one)(jax.random.wrap_key_data(regions.key))  # [K, P, C], [K, P, C, H, W]
    return (jnp.broadcast_to(jnp.swapaxes(colours, 0, 1), (prompts, images, channels)),
            jnp.broadcast_to(jnp.swapaxes(noise, 0, 1), (prompts, images, channels, height, width)))


def bootstrapped(view: jax.Array, masks: jax.Array, colours: Any, noise: Any, bootstrap: jax.Array,
                 schedule: Any, i: jax.Array) -> jax.Array:
    """A view [B, C, h, w] as each prompt sees it -> [P B, C, h, w]: the background prompt sees the
    view itself; a region, in its first `bootstrap` steps, sees outside its mask [P, h, w] its solid
    colour [P, B, C] noised to step i's level with `noise` [P, B, C, h, w], and the view inside
    (one prompt: the view, colours and noise None)."""
    prompts = masks.shape[0]
    views = jnp.broadcast_to(view, (prompts, *view.shape))
    if prompts > 1:
        backgrounds = schedulers.noised_sample(schedule, colours[..., None, None], noise, i)  # [P, B, C, h, w]
        inside = (jnp.arange(prompts) == 0)[:, None, None] | (masks > 0) | (i >= bootstrap)
        views = jnp.where(inside[:, None, None], views, backgrounds.astype(view.dtype))
    return views.reshape(prompts * view.shape[0], *view.shape[1:])


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How a canvas is cut into views, in latent rows and columns."""

    window: tuple[int, int]  # (h, w): the model's native latent size
    stride: tuple[int, int]
    weighting: Weighting = Weighting.UNIFORM


def view_predictor(tiling: Tiling, canvas: tuple[int, int], vae_factor: int, spread: bool = False,
                   split: bool = False) -> Callable:
    """A noise prediction with `predict_noise`'s signature for a canvas [B, C, H, W] and a
    `CanvasConditioning`: every view predicted as an image of its own for every prompt, one view at
    a time (`lax.map`: the memory of one), with SDXL's micro-conditioning that of a window-sized
    crop of the canvas at the view's corner, and the predictions merged, weighted by the window's
    weights and the prompts' masks. The image loop (`sampling.image`) runs it as it runs `predict_noise`; the
    denoiser's state (the stale context of displaced steps) is kept per view ([S, ...]).

    Inside `shard_map`, the canvas replicated: with `spread` (over `VIEWS`) each device predicts
    its share of the views, padded to a multiple of the devices with views that count for nothing;
    with `split` (over `PATCH`) each view is split by rows, the UNet under the sampling's patch
    mode. One `psum` of the merge's two sums joins them."""
    boxes = view_boxes(canvas, tiling.window, tiling.stride)
    weights = jnp.asarray(window_weights(tiling.window, tiling.weighting))
    layout = Views(spread, split)
    pixels = jnp.asarray(tiling.window, jnp.float32) * vae_factor

    def view_control(control: Control | None, corner: jax.Array) -> Control | None:
        """The control images' window of the view at `corner` (in latent pixels), this device's rows."""
        if control is None:
            return None
        window = tuple(vae_factor * side for side in tiling.window)
        return control.replace(images=tuple(layout.own_rows(crop_one(image, corner * vae_factor, window), 2)
                                            for image in control.images))

    def predict(denoiser: Denoiser, sampling: Any, schedule: Any, i: jax.Array, latents: jax.Array,
                cond: CanvasConditioning, guidance: Any, state: ModelState = ModelState()) -> tuple[jax.Array, Any]:
        mine, counts = layout.mine(boxes)
        regions = cond.regions
        prompts = regions.masks.shape[0]
        shape = (prompts, latents.shape[0], *canvas)
        colours, noise = region_draws(regions, i, shape) if prompts > 1 else (None, None)

        def one(view):
            corner, count, view_state = view
            masks = crop_one(regions.masks, corner, tiling.window)  # [P, h, w]
            view_noise = None if noise is None else crop_one(noise, corner, tiling.window)
            inputs = bootstrapped(crop_one(latents, corner, tiling.window), masks, colours, view_noise,
                                  regions.bootstrap_steps, schedule, i)
            # time_ids: (original size, crop top-left, target size) per conditioning row: a view is
            # a window-sized crop of the canvas at its corner.
            time_ids = cond.prompts.time_ids.at[:, 2:4].set(corner * vae_factor).at[:, 4:6].set(pixels)
            view_cond = cond.prompts.replace(time_ids=time_ids, control=view_control(cond.prompts.control, corner))
            out, view_state = predict_noise(denoiser, sampling, schedule, i, layout.own_rows(inputs, 2), view_cond,
                                            guidance, view_state)  # [P B, C, h', w]
            mask_weights = layout.own_rows(masks * weights * count, 1)[:, None, None]  # [P, 1, 1, h', w]
            weighted = (out.reshape(prompts, -1, *out.shape[1:]) * mask_weights).sum(0)
            return (weighted, mask_weights.sum(0)[0, 0]), view_state

        (weighted, view_weights), state = lax.map(one, (mine, counts, state))
        rows = mine + jnp.asarray([layout.first_row(tiling.window[0]), 0])
        total, weight = layout.join(merge_sums(weighted, view_weights, rows, canvas))
        return total / weight, state

    return predict


def views_predictor(tiling: Tiling, canvas: tuple[int, int], vae_factor: int, mesh: Mesh | None) -> Predictor:
    """The image loop's predictor for a canvas's views on `mesh` (None, `VIEWS`, or `VIEWS` x
    `PATCH`)."""
    axes = () if mesh is None else mesh.axis_names
    return Predictor(view_predictor(tiling, canvas, vae_factor, spread=VIEWS in axes, split=PATCH in axes),
                     whole_latents=True, key=(tiling, canvas, vae_factor, axes))
