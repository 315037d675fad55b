"""What a pipeline folder holds and what a request to it may ask, checked from the folder's small
config files alone, before any weight is loaded or anything is compiled."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxfuse import schedulers
from jaxfuse.checkpoint import CONFIG_NAME, MODEL_COMPONENTS, PARAMS_DIR, TOKENIZERS
from jaxfuse.config import ParallelConfig, UNetConfig, VAEConfig
from jaxfuse.sampling.tiled import Weighting


class PipelineError(ValueError):
    """A model folder or a request the pipeline cannot serve; the message names the fix."""


# The steps of a run when none are named, in the command line and the API alike: Euler and
# DPM++(2M), the usual SDXL samplers, are run at 25-30 steps in practice; diffusers' default is 50.
DEFAULT_STEPS = 30
# Image-to-image's share of the schedule when none is named: diffusers' SDXL img2img default.
DEFAULT_STRENGTH = 0.3
# How views are averaged when none is named, measured on the demo (benchmarks/tiled_quality.py):
# Gaussian weights hide the views' borders best (seam measure 2.3 against uniform's 3.3 at half-window
# stride, 1.5 against 3.6 at a quarter); with regions, uniform ones keep more objects in their region.
DEFAULT_WEIGHTING, DEFAULT_REGION_WEIGHTING = "gaussian", "uniform"
# MultiDiffusion bootstraps its regions for 20 of its 50 steps.
DEFAULT_BOOTSTRAP = 0.4
# A canvas of at least this many native-size areas is made of fused views unless told otherwise.
TILED_AREA = 4
# JAX's default keys hold 32 bits: a larger seed would silently repeat a smaller one's noise.
MAX_SEED = 2**32 - 1
# The files a tokenizer folder holds, in either of its two layouts: CLIP's BPE tables as the classic
# pair, or in the one `tokenizer.json` (all that transformers 5 saves). `CLIPTokenizerFast` reads both.
TOKENIZER_FILES = (("tokenizer_config.json", "vocab.json", "merges.txt"), ("tokenizer_config.json", "tokenizer.json"))
TOKENIZER_LAYOUTS = "tokenizer_config.json with either tokenizer.json or vocab.json and merges.txt"


def checked_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """`value` as an int in [low, high]; a bool, a float or a string is refused, not rounded."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise PipelineError(f"{name} must be an int, got {value!r}.")
    if value < low or (high is not None and value > high):
        bound = f"in {low}..{high}" if high is not None else f"at least {low}"
        raise PipelineError(f"{name} must be {bound}, got {value}.")
    return int(value)


def checked_float(name: str, value: Any, low: float, high: float = math.inf, why: str = "") -> float:
    """`value` as a finite float in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise PipelineError(f"{name} must be a number, got {value!r}.")
    if not math.isfinite(value) or not low <= value <= high:
        bound = f"in [{low}, {high}]" if math.isfinite(high) else f"at least {low}"
        raise PipelineError(f"{name} must be a finite number {bound}, got {value}{why}.")
    return float(value)


def checked_prompts(name: str, value: Any) -> list[str]:
    """A prompt or a non-empty list of prompts, as a list."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise PipelineError(f"{name} must be a string or a non-empty list of strings, got {value!r}.")


def checked_pair(name: str, value: Any, low: int) -> tuple[int, int] | None:
    """None, or (height, width)-like: two ints of at least `low`."""
    if value is None:
        return None
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise PipelineError(f"{name} must be two ints (height, width), got {value!r}.")
    return tuple(checked_int(f"{name}[{i}]", v, low) for i, v in enumerate(value))


def checked_image(image: Any, batch: int) -> np.ndarray:
    """An image-to-image input: [H, W, 3] or [1 or `batch`, H, W, 3], uint8 or floats in [0, 1]
    (as the pipeline returns them) -> float32 [1 or batch, H, W, 3] in [0, 1]."""
    array = np.asarray(image)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] not in (1, batch):
        raise PipelineError(f"image must be [H, W, 3] or [{batch if batch > 1 else 1}, H, W, 3] (RGB, channels "
                            f"last), got shape {np.shape(image)}.")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255
    if not np.issubdtype(array.dtype, np.floating):
        raise PipelineError(f"image must hold uint8 or floats in [0, 1], got dtype {array.dtype}.")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise PipelineError(f"image must hold finite floats in [0, 1], got values in [{array.min()}, {array.max()}]"
                            " (scale 0..255 images by 1/255, or pass them as uint8).")
    return array.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Region:
    """A prompt for a box of the canvas, in pixels: columns x0..x1, rows y0..y1 (the command
    line's "prompt@x0,y0,x1,y1")."""

    prompt: str
    box: tuple[int, int, int, int]

    @classmethod
    def parse(cls, text: str) -> Region:
        prompt, at, box_text = text.rpartition("@")
        try:
            box = tuple(int(v) for v in box_text.split(","))
        except ValueError:
            box = ()
        if not at or not prompt.strip() or len(box) != 4:
            raise PipelineError(f"--region {text!r} must be \"PROMPT@X0,Y0,X1,Y1\", a prompt and a box of the canvas "
                                "in pixels, e.g. \"a red circle@0,0,256,256\".")
        return cls(prompt, box)


def checked_region(value: Any) -> Region:
    """A `Region`, or (prompt, (x0, y0, x1, y1)) with a string and four ints, as a `Region`."""
    if isinstance(value, Region):
        return value
    if not (isinstance(value, Sequence) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], Sequence) and len(value[1]) == 4):
        raise PipelineError(f"a region must be (prompt, (x0, y0, x1, y1)), a string and a box in pixels, got "
                            f"{value!r}.")
    return Region(value[0], tuple(checked_int("a region's box", v, 0) for v in value[1]))


@dataclasses.dataclass(frozen=True)
class Tiles:
    """A canvas made of fused views (MultiDiffusion, `jaxfuse.sampling.tiled`): windows of the
    model's native size every `stride` pixels, merged with `weighting` ("uniform" or "gaussian"),
    spread over `devices` device groups (each view split by rows over the request's patch
    layout); `regions` with their own prompts, bootstrapped for the first `bootstrap` share of
    the steps."""

    window: int
    stride: int
    weighting: str = DEFAULT_WEIGHTING
    regions: tuple[Region, ...] = ()
    bootstrap: float = DEFAULT_BOOTSTRAP
    devices: int = 1


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request, checked (`PipelineSpec.request`): every value has its type and
    range, and the lists agree in length (`batch`)."""

    prompts: list[str]
    negative_prompts: list[str] | None
    height: int
    width: int
    steps: int
    guidance_scale: float
    guidance_rescale: float
    seeds: list[int]  # one for the whole batch's noise, or one per image
    latents: np.ndarray | None
    scheduler: schedulers.SchedulerKind
    original_size: tuple[int, int] | None
    crops_coords_top_left: tuple[int, int]
    target_size: tuple[int, int] | None
    parallel: ParallelConfig
    image: np.ndarray | None = None  # image-to-image: [1 or B, H, W, 3] float32 in [0, 1]
    strength: float = 1.0  # how much of the schedule image-to-image runs, (0, 1]
    tiles: Tiles | None = None  # a canvas of fused views, or None: one image

    @property
    def batch(self) -> int:
        return len(self.prompts)

    @property
    def start_step(self) -> int:
        """The first step that runs: 0, or later for image-to-image (`schedulers.start_step`)."""
        return 0 if self.image is None else schedulers.start_step(self.steps, self.strength)

    @property
    def steps_run(self) -> int:
        return self.steps - self.start_step

    @property
    def use_guidance(self) -> bool:
        return self.guidance_scale > 1.0


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """What a pipeline folder holds, read from its small config files alone, so a request can
    be checked before any weight is loaded."""

    folder: Path
    unet: UNetConfig
    vae: VAEConfig
    scheduler: schedulers.SchedulerConfig
    force_zeros_for_empty_prompt: bool
    converted: bool  # every model folder holds orbax params already

    @classmethod
    def read(cls, folder: str | Path) -> PipelineSpec:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise PipelineError(f"{folder} is not a folder; pass a diffusers SDXL pipeline folder.")
        wanted = ["model_index.json", "scheduler/scheduler_config.json",
                  *(f"{c}/{CONFIG_NAME}" for c in MODEL_COMPONENTS)]
        missing = [name for name in wanted if not (folder / name).is_file()]
        lacking = []
        for t in TOKENIZERS:  # what the layout the folder comes nearest to lacks (the classic one on a tie)
            lacking += min(([f"{t}/{name}" for name in layout if not (folder / t / name).is_file()]
                            for layout in TOKENIZER_FILES), key=len)
        if missing or lacking:
            why = f" A tokenizer folder holds {TOKENIZER_LAYOUTS}." if lacking else ""
            raise PipelineError(f"{folder} is not an SDXL pipeline folder: missing {', '.join(missing + lacking)}."
                                + why)

        def config(name):
            try:
                return json.loads((folder / name).read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise PipelineError(f"{folder / name} is not valid JSON ({e}); restore it from the model's "
                                    "original copy.") from e

        return cls(
            folder=folder,
            unet=UNetConfig.from_diffusers(config(f"unet/{CONFIG_NAME}")),
            vae=VAEConfig.from_diffusers(config(f"vae/{CONFIG_NAME}")),
            scheduler=schedulers.SchedulerConfig.from_diffusers(config("scheduler/scheduler_config.json")),
            force_zeros_for_empty_prompt=bool(config("model_index.json").get("force_zeros_for_empty_prompt", True)),
            converted=all((folder / c / PARAMS_DIR).is_dir() for c in MODEL_COMPONENTS),
        )

    @property
    def vae_factor(self) -> int:
        return self.vae.downsample_factor

    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this."""
        return self.vae_factor * self.unet.downsample_factor

    @property
    def default_size(self) -> int:
        return (self.unet.sample_size or 128) * self.vae_factor

    def tiles(self, height: int, width: int, tiled: bool | None, stride: Any, weighting: Any, regions: Any,
              bootstrap: Any, devices: Any) -> Tiles | None:
        """The checked tiling of a `height` x `width` canvas, or None for one image. `tiled` None:
        tiled when a stride or regions are given or the canvas holds `TILED_AREA` native areas.
        `weighting` None: `DEFAULT_WEIGHTING`, with regions `DEFAULT_REGION_WEIGHTING`."""
        native = self.default_size
        regions = tuple(checked_region(r) for r in regions)
        if tiled is None:
            tiled = stride is not None or bool(regions) or height * width >= TILED_AREA * native**2
        if not tiled:
            if regions or stride is not None:
                raise PipelineError("regions and a tile stride belong to a tiled canvas; drop tiled=False "
                                    "(--tiles off).")
            return None
        f = self.vae_factor
        for name, size in (("height", height), ("width", width)):
            if size < native or size % f:
                raise PipelineError(f"a tiled canvas's {name} must be at least the model's native {native} and a "
                                    f"multiple of {f} (the VAE factor), got {size}.")
        stride = native // 2 // f * f if stride is None else checked_int("tile stride", stride, f, native)
        if stride % f:
            raise PipelineError(f"tile stride {stride} must be a multiple of {f} (the VAE factor); nearest valid: "
                                f"{stride // f * f or f}.")
        if weighting is None:
            weighting = DEFAULT_REGION_WEIGHTING if regions else DEFAULT_WEIGHTING
        if weighting not in [w.value for w in Weighting]:
            raise PipelineError(f"tile weighting {weighting!r} is not one of {', '.join(w.value for w in Weighting)}.")
        for region in regions:
            x0, y0, x1, y1 = region.box
            if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
                raise PipelineError(f"region {region.prompt!r}: box {x0},{y0},{x1},{y1} must satisfy 0 <= x0 < x1 <= "
                                    f"{width} and 0 <= y0 < y1 <= {height} (the canvas, in pixels).")
        return Tiles(native, stride, weighting, regions, checked_float("bootstrap", bootstrap, 0.0, 1.0),
                     checked_int("view devices", devices, 1))

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (batch, self.unet.in_channels, height // self.vae_factor, width // self.vae_factor)

    def request(self, prompt: Any, negative_prompt: Any = None, *, height: Any = None, width: Any = None,
                num_inference_steps: Any = DEFAULT_STEPS, guidance_scale: Any = 5.0, guidance_rescale: Any = 0.0,
                seed: Any = 0, latents: Any = None, scheduler: Any = "euler", original_size: Any = None,
                crops_coords_top_left: Any = (0, 0), target_size: Any = None,
                parallel: ParallelConfig = ParallelConfig(), image: Any = None,
                strength: Any = DEFAULT_STRENGTH, tiled: bool | None = None, tile_stride: Any = None,
                tile_weighting: Any = None, regions: Sequence[Any] = (),
                bootstrap: Any = DEFAULT_BOOTSTRAP, view_devices: Any = 1) -> Request:
        """The arguments of `SDXLPipeline.generate` checked, or one `PipelineError` naming the
        fix. `height`/`width` None: the model's size, or the image's. `seed`: one int, or one per
        image (a single prompt is then repeated for each). `image`: image-to-image from it, at
        `strength`. The tiling arguments: `PipelineSpec.tiles`."""
        prompts = checked_prompts("prompt", prompt)
        seeds = [seed] if isinstance(seed, numbers.Integral) or not isinstance(seed, Sequence) else list(seed)
        if not seeds:
            raise PipelineError("seed must be an int or a non-empty list of ints, got [].")
        seeds = [checked_int("seed", s, 0, MAX_SEED) for s in seeds]
        if len(seeds) > 1 and len(prompts) == 1:
            prompts = prompts * len(seeds)
        if len(seeds) > 1 and len(seeds) != len(prompts):
            raise PipelineError(f"{len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt, "
                                "or one seed for the batch.")
        negatives = None if negative_prompt is None else checked_prompts("negative_prompt", negative_prompt)
        if negatives is not None and len(negatives) == 1:
            negatives = negatives * len(prompts)
        if negatives is not None and len(negatives) != len(prompts):
            raise PipelineError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one per "
                                "prompt or a single string.")
        if image is not None:
            image = checked_image(image, len(prompts))
            size = image.shape[1:3]
            for name, given, own in (("height", height, size[0]), ("width", width, size[1])):
                if given is not None and given != own:
                    raise PipelineError(f"{name} {given} differs from the image's {own}; leave it out (the image "
                                        f"sets the size) or resize the image to "
                                        f"{height or size[0]}x{width or size[1]}.")
            height, width = (int(n) for n in size)
        height = self.default_size if height is None else checked_int("height", height, 1)
        width = self.default_size if width is None else checked_int("width", width, 1)
        steps = checked_int("steps", num_inference_steps, 1, self.scheduler.num_train_timesteps)
        kinds = [k.value for k in schedulers.SchedulerKind]
        if scheduler not in kinds:
            raise PipelineError(f"scheduler {scheduler!r} is not one of {', '.join(kinds)}.")
        try:  # host arithmetic only: a step count this sampler cannot schedule fails here, before loading
            schedulers.make_schedule(schedulers.SchedulerKind(scheduler), self.scheduler, steps)
        except ValueError as e:
            raise PipelineError(str(e)) from None
        strength = checked_float("strength", strength, 0.0, 1.0)
        if strength == 0:
            raise PipelineError("strength must be in (0, 1], got 0, which would return the image unchanged.")
        if image is not None and int(steps * strength) < 1:
            raise PipelineError(f"strength {strength} of {steps} steps runs int({steps * strength:g}) = 0 steps; "
                                f"raise strength to at least {1 / steps:.3g} or the steps to at least "
                                f"{math.ceil(1 / strength)}.")
        request = Request(
            prompts=prompts, negative_prompts=negatives, height=height, width=width, steps=steps,
            guidance_scale=checked_float("guidance scale", guidance_scale, 0.0,
                                         why=" (1 or less turns guidance off)"),
            guidance_rescale=checked_float("guidance rescale", guidance_rescale, 0.0, 1.0),
            seeds=seeds, latents=None if latents is None else self.checked_latents(latents, len(prompts), height,
                                                                                     width),
            scheduler=schedulers.SchedulerKind(scheduler),
            original_size=checked_pair("original_size", original_size, 1),
            crops_coords_top_left=checked_pair("crops_coords_top_left", crops_coords_top_left, 0),
            target_size=checked_pair("target_size", target_size, 1), parallel=ParallelConfig(),
            image=image, strength=strength,
            tiles=self.tiles(height, width, tiled, tile_stride, tile_weighting, regions, bootstrap, view_devices))
        return self.spread(request, parallel)

    def spread(self, request: Request, parallel: ParallelConfig) -> Request:
        """`request` spread over the devices `parallel` names, checked for that layout."""
        if not isinstance(parallel, ParallelConfig):
            raise PipelineError(f"parallel must be a jaxfuse.ParallelConfig, got {parallel!r}.")
        if request.tiles is None:
            self.check_size(request.height, request.width, parallel.patches)
        else:
            self.check_size(request.tiles.window, request.tiles.window, parallel.patches)
            if parallel.cfg_parallel:
                raise PipelineError("a tiled canvas splits its views by rows, not their guidance batch; drop "
                                    "--cfg-parallel.")
            if parallel.patches == 1:
                # A view on one device has no other patch to exchange with, whatever the mode: its
                # UNet runs whole (the mesh of views-only layouts has no PATCH axis to exchange on).
                parallel = ParallelConfig()
        if parallel.cfg_parallel and not request.use_guidance:
            raise PipelineError("cfg_parallel splits the guidance batch, but guidance_scale <= 1 has none; "
                                "drop --cfg-parallel or raise --guidance-scale.")
        return dataclasses.replace(request, parallel=parallel)

    def check_size(self, height: int, width: int, patches: int = 1) -> None:
        """One clear error for a (positive) image size the model cannot make. Split over
        `patches` devices, the latent height must divide into equal patches that the UNet can
        halve at every level."""
        for name, size, f in (("height", height, self.size_multiple * patches), ("width", width, self.size_multiple)):
            if size % f == 0:
                continue
            why = (f"VAE factor {self.vae_factor} x UNet factor {self.unet.downsample_factor}"
                   + (f" x {patches} patches" if name == "height" and patches > 1 else ""))
            nearest = " or ".join(str(v) for v in (size // f * f, (size // f + 1) * f) if v > 0)
            message = f"{name} {size} must be a positive multiple of {f} ({why}); nearest valid: {nearest}"
            blocks = size // self.size_multiple
            if name == "height" and patches > 1 and size % self.size_multiple == 0:
                counts = [str(n) for n in range(1, min(patches, blocks) + 1) if blocks % n == 0]
                message += (f"; or split {size} into {', '.join(counts)} patches (--devices; twice that with "
                            "cfg-parallel)")
            raise PipelineError(message + ".")

    def checked_latents(self, latents: Any, batch: int, height: int, width: int) -> np.ndarray:
        """Initial noise in diffusers' layout [B, C, H/8, W/8], unscaled, as float32."""
        array = np.asarray(latents)
        if not np.issubdtype(array.dtype, np.floating):
            raise PipelineError(f"latents must hold floats, got dtype {array.dtype}.")
        expected = self.latent_shape(batch, height, width)
        if array.shape != expected:
            raise PipelineError(f"latents have shape {array.shape}; {height}x{width} with batch {batch} needs "
                                f"{expected} (diffusers layout, unscaled noise).")
        nonfinite = np.size(array) - np.count_nonzero(np.isfinite(array))
        if nonfinite:
            raise PipelineError(f"latents hold {nonfinite} NaN or infinite values; initial noise must be finite.")
        return array.astype(np.float32)

    def largest_layout(self, height: int, wanted: int, layout: Callable[[int], ParallelConfig],
                       cfg_parallel: bool = False) -> ParallelConfig:
        """`layout(n)` for the most devices n <= `wanted` whose patches the image's rows divide
        into (even counts only with `cfg_parallel`): the device-count policy when none is named."""
        for devices in range(wanted, 0, -1):
            if cfg_parallel and devices % 2:
                continue
            parallel = layout(devices)  # a setting it refuses is wrong at any count
            if height % (self.size_multiple * parallel.patches) == 0:
                return parallel
        raise PipelineError(f"no device count up to {wanted} splits a height of {height} (--cfg-parallel needs "
                            "an even count); name one with --devices.")

    def dtypes(self, dtype: jnp.dtype) -> dict[str, jnp.dtype]:
        """Each model's dtype. The VAE stays in float32 when its config says `force_upcast`
        (SDXL's VAE overflows in half precision)."""
        vae_dtype = jnp.dtype(jnp.float32) if self.vae.force_upcast else dtype
        return {"unet": dtype, "vae": vae_dtype, "text_encoder": dtype, "text_encoder_2": dtype}
