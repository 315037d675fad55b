"""A request to the pipeline and what it returns, checked from the model's config files alone,
before any weight is loaded or anything is compiled.

    request = Request.parse(spec, "a lighthouse", height=1024, width=1024, seed=[0, 1])
    request = Request.parse(spec, "a lighthouse in snow", image=picture, strength=0.6)
    request = request.spread(spec, ParallelConfig(4, "displaced"))

A request is a core (prompts, seeds, size, steps, sampler, guidance, the devices' layout) and
optional parts, each a small frozen type with its own arguments and checks: `ImageToImage` (a
picture to redraw) and `Tiles` (a canvas of fused views, with regions). A new part is one type
with `ARGUMENTS` and `parse`, listed in `PARTS`, and its use where it acts (the step cache and
control images to come); `Request.parse` takes its arguments by name, and the API
(`SDXLPipeline.generate`) and the command line both call it, so no argument is copied by hand
through their signatures.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import PIL.Image

from jaxfuse import schedulers
from jaxfuse.config import ParallelConfig
from jaxfuse.sampling.tiled import Weighting
from jaxfuse.spec import PipelineError, PipelineSpec, checked_float, checked_int, checked_pair, checked_prompts
from jaxfuse.step_cache import SCHEDULES, DeepCache

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


def checked_image(image: Any, batch: int) -> np.ndarray:
    """An input picture: [H, W, 3] or [1 or `batch`, H, W, 3], uint8 or floats in [0, 1] (as the
    pipeline returns them) -> float32 [1 or batch, H, W, 3] in [0, 1]."""
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
class ImageToImage:
    """Redraw a picture (diffusers' `StableDiffusionXLImg2ImgPipeline`): its VAE mean noised to
    step `steps - int(steps x strength)` and denoised from there; it sets the size."""

    ARGUMENTS: ClassVar[dict[str, Any]] = {"image": None, "strength": DEFAULT_STRENGTH}

    image: np.ndarray  # [1 or B, H, W, 3] float32 in [0, 1]
    strength: float  # the share of the schedule that runs, (0, 1]

    @classmethod
    def parse(cls, spec: PipelineSpec, request: Request, image: np.ndarray | None,
              strength: Any) -> ImageToImage | None:
        """The part, or None without an image; `image` is checked already (`checked_image`: it
        sets the request's size before the parts are parsed)."""
        strength = checked_float("strength", strength, 0.0, 1.0)
        if strength == 0:
            raise PipelineError("strength must be in (0, 1], got 0, which would return the image unchanged.")
        if image is None:
            return None
        steps = request.steps
        if int(steps * strength) < 1:
            raise PipelineError(f"strength {strength} of {steps} steps runs int({steps * strength:g}) = 0 steps; "
                                f"raise strength to at least {1 / steps:.3g} or the steps to at least "
                                f"{math.ceil(1 / strength)}.")
        return cls(image, strength)


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

    @classmethod
    def checked(cls, value: Any) -> Region:
        """A `Region`, or (prompt, (x0, y0, x1, y1)) with a string and four ints, as a `Region`."""
        if isinstance(value, Region):
            return value
        if not (isinstance(value, Sequence) and len(value) == 2 and isinstance(value[0], str)
                and isinstance(value[1], Sequence) and len(value[1]) == 4):
            raise PipelineError(f"a region must be (prompt, (x0, y0, x1, y1)), a string and a box in pixels, got "
                                f"{value!r}.")
        return cls(value[0], tuple(checked_int("a region's box", v, 0) for v in value[1]))


@dataclasses.dataclass(frozen=True)
class Tiles:
    """A canvas made of fused views (MultiDiffusion, `jaxfuse.sampling.tiled`): windows of the
    model's native size every `stride` pixels, merged with `weighting` ("uniform" or "gaussian"),
    spread over `devices` device groups (each view split by rows over the request's patch
    layout); `regions` with their own prompts, bootstrapped for the first `bootstrap` share of
    the steps."""

    ARGUMENTS: ClassVar[dict[str, Any]] = {"tiled": None, "tile_stride": None, "tile_weighting": None,
                                           "regions": (), "bootstrap": DEFAULT_BOOTSTRAP, "view_devices": 1}

    window: int
    stride: int
    weighting: str = DEFAULT_WEIGHTING
    regions: tuple[Region, ...] = ()
    bootstrap: float = DEFAULT_BOOTSTRAP
    devices: int = 1

    @classmethod
    def parse(cls, spec: PipelineSpec, request: Request, tiled: bool | None, tile_stride: Any, tile_weighting: Any,
              regions: Any, bootstrap: Any, view_devices: Any) -> Tiles | None:
        """The checked tiling of the request's canvas, or None for one image. `tiled` None: tiled
        when a stride or regions are given or the canvas holds `TILED_AREA` native areas.
        `tile_weighting` None: `DEFAULT_WEIGHTING`, with regions `DEFAULT_REGION_WEIGHTING`."""
        height, width, native = request.height, request.width, spec.default_size
        regions = tuple(Region.checked(r) for r in regions)
        if tiled is None:
            tiled = tile_stride is not None or bool(regions) or height * width >= TILED_AREA * native**2
        if not tiled:
            if regions or tile_stride is not None:
                raise PipelineError("regions and a tile stride belong to a tiled canvas; drop tiled=False "
                                    "(--tiles off).")
            return None
        f = spec.vae_factor
        for name, size in (("height", height), ("width", width)):
            if size < native or size % f:
                raise PipelineError(f"a tiled canvas's {name} must be at least the model's native {native} and a "
                                    f"multiple of {f} (the VAE factor), got {size}.")
        stride = native // 2 // f * f if tile_stride is None else checked_int("tile stride", tile_stride, f, native)
        if stride % f:
            raise PipelineError(f"tile stride {stride} must be a multiple of {f} (the VAE factor); nearest valid: "
                                f"{stride // f * f or f}.")
        weighting = tile_weighting
        if weighting is None:
            weighting = DEFAULT_REGION_WEIGHTING if regions else DEFAULT_WEIGHTING
        if weighting not in [w.value for w in Weighting]:
            raise PipelineError(f"tile weighting {weighting!r} is not one of {', '.join(w.value for w in Weighting)}.")
        for region in regions:
            x0, y0, x1, y1 = region.box
            if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
                raise PipelineError(f"region {region.prompt!r}: box {x0},{y0},{x1},{y1} must satisfy 0 <= x0 < x1 <= "
                                    f"{width} and 0 <= y0 < y1 <= {height} (the canvas, in pixels).")
        return cls(native, stride, weighting, regions, checked_float("bootstrap", bootstrap, 0.0, 1.0),
                   checked_int("view devices", view_devices, 1))

    def spread(self, spec: PipelineSpec, parallel: ParallelConfig) -> ParallelConfig:
        """The layout of each view for a request spread over `parallel`, checked."""
        spec.check_size(self.window, self.window, parallel.patches)
        if parallel.cfg_parallel:
            raise PipelineError("a tiled canvas splits its views by rows, not their guidance batch; drop "
                                "--cfg-parallel.")
        # A view on one device has no other patch to exchange with, whatever the mode: its UNet
        # runs whole (the mesh of views-only layouts has no PATCH axis to exchange on).
        return parallel if parallel.patches > 1 else ParallelConfig()


# The share of the noise SDXL's base removes before its refiner takes over, as SDXL's model card runs them.
DEFAULT_REFINER_START = 0.8


@dataclasses.dataclass(frozen=True)
class Refine:
    """Finish with the model's refiner (diffusers' ensemble of experts, `denoising_end` =
    `denoising_start` = `start`): the model runs the steps whose timestep is at least
    round((1 - start) T), the refiner the rest, from the model's latents as they are."""

    ARGUMENTS: ClassVar[dict[str, Any]] = {"refiner_start": None}

    start: float
    model_steps: int  # the steps the model runs, counted from the schedule's first
    refiner_first: int  # the refiner's first step in its own schedule (the same step when the schedulers agree)

    @classmethod
    def parse(cls, spec: PipelineSpec, request: Request, refiner_start: Any) -> Refine | None:
        if refiner_start is None:
            return None
        if spec.refiner is None:
            raise PipelineError("refiner_start needs a refiner: load one (load_pipeline(..., refiner=FOLDER), "
                                "--refiner FOLDER).")
        start = checked_float("refiner start", refiner_start, 0.0, 1.0)
        if request.tiles is not None:
            raise PipelineError("the refiner finishes one image, not a tiled canvas; drop the refiner start or the "
                                "tiling (--tiles off).")
        model_steps = schedulers.steps_before(request.scheduler, spec.scheduler, request.steps, start)
        refiner_first = schedulers.steps_before(request.scheduler, spec.refiner.scheduler, request.steps, start)
        if not request.start_step < model_steps < request.steps or refiner_first >= request.steps:
            raise PipelineError(f"refiner start {start:g} of {request.steps} steps leaves the model steps "
                                f"{request.start_step}..{model_steps - 1} and the refiner steps {refiner_first}.."
                                f"{request.steps - 1}: each needs at least one; pick a start between "
                                f"{1 - 1 / request.steps:.2g} and {1 / request.steps:.2g} or more steps.")
        return cls(start, model_steps, refiner_first)


# diffusers' `StableDiffusionXLImg2ImgPipeline` defaults.
DEFAULT_AESTHETIC_SCORE, DEFAULT_NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5


@dataclasses.dataclass(frozen=True)
class Aesthetics:
    """The refiner's micro-conditioning: the aesthetic score (0..10, LAION's scale) it is asked
    for, and the one the negative half of the guidance is conditioned on."""

    ARGUMENTS: ClassVar[dict[str, Any]] = {"aesthetic_score": None, "negative_aesthetic_score": None}

    score: float = DEFAULT_AESTHETIC_SCORE
    negative_score: float = DEFAULT_NEGATIVE_AESTHETIC_SCORE

    @classmethod
    def parse(cls, spec: PipelineSpec, request: Request, aesthetic_score: Any,
              negative_aesthetic_score: Any) -> Aesthetics | None:
        """The scores when the model or its refiner reads them (its model index's
        `requires_aesthetics_score`), or None; given to any other model they are an error."""
        if not any(s is not None and s.requires_aesthetics_score for s in (spec, spec.refiner)):
            if aesthetic_score is not None or negative_aesthetic_score is not None:
                raise PipelineError("aesthetic scores condition SDXL's refiner only; this model does not read them "
                                    "(load a refiner, or drop them).")
            return None
        return cls(*(checked_float(name, default if value is None else value, 0.0, 10.0)
                     for name, value, default in (("aesthetic score", aesthetic_score, DEFAULT_AESTHETIC_SCORE),
                                                  ("negative aesthetic score", negative_aesthetic_score,
                                                   DEFAULT_NEGATIVE_AESTHETIC_SCORE))))


class StepCache:
    """DeepCache (`jaxfuse.step_cache`): every `deepcache`-th step runs every layer and keeps the
    deep features at branch `deepcache_branch`; the steps between run only the shallower layers.
    `deepcache_schedule` "quadratic": DeepCache's non-uniform schedule around `deepcache_center`."""

    ARGUMENTS: ClassVar[dict[str, Any]] = {"deepcache": 1, "deepcache_branch": 0, "deepcache_schedule": "uniform",
                                           "deepcache_center": DeepCache.center, "deepcache_power": DeepCache.power}

    @staticmethod
    def parse(spec: PipelineSpec, request: Request, deepcache: Any, deepcache_branch: Any, deepcache_schedule: Any,
              deepcache_center: Any, deepcache_power: Any) -> DeepCache | None:
        """The settings, or None when every step runs every layer (`deepcache` 1)."""
        interval = checked_int("deepcache interval", deepcache, 1)
        branch = checked_int("deepcache branch", deepcache_branch, 0, spec.unet.num_skips - 1)
        if deepcache_schedule not in SCHEDULES:
            raise PipelineError(f"deepcache schedule {deepcache_schedule!r} is not one of {', '.join(SCHEDULES)}.")
        if interval == 1:
            return None
        cache = DeepCache(interval, branch, deepcache_schedule, checked_int("deepcache center", deepcache_center, 0),
                          checked_float("deepcache power", deepcache_power, 1.0, 4.0))
        try:  # host arithmetic: a schedule that cannot be made fails here
            cache.full_steps(request.steps_run)
        except ValueError as e:
            raise PipelineError(str(e)) from None
        return cache


def resized(image: Any, height: int, width: int, batch: int) -> np.ndarray:
    """A control image at the output size, as diffusers' `VaeImageProcessor` resizes one: a PIL image
    with Lanczos, an array by nearest neighbour (PyTorch's `interpolate`: output row i reads input
    row floor(i x rows in / rows out)) -> float32 [1 or batch, height, width, 3] in [0, 1]."""
    if isinstance(image, PIL.Image.Image):
        image = image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), PIL.Image.LANCZOS)
    array = checked_image(image, batch)
    rows, columns = array.shape[1:3]
    if (rows, columns) == (height, width):
        return array
    return array[:, np.arange(height) * rows // height][:, :, np.arange(width) * columns // width]


def per_net(name: str, value: Any, count: int) -> list:
    """One value for every ControlNet, or a list of one per ControlNet -> a list of `count`."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise PipelineError(f"{name}: {len(values)} values for {count} ControlNet{'s' * (count > 1)}; give one per "
                            "ControlNet (in the order they were loaded) or a single value.")
    return values


def checked_scales(value: Any, count: int) -> list[float]:
    """The ControlNets' conditioning scales: one number for all `count`, or one each."""
    return [checked_float("controlnet conditioning scale", v, -math.inf)
            for v in per_net("controlnet_conditioning_scale", value, count)]


@dataclasses.dataclass(frozen=True)
class Controls:
    """The control images of the pipeline's ControlNets (diffusers' `StableDiffusionXLControlNetPipeline`):
    one per ControlNet, resized to the output size (or the canvas), each ControlNet's residuals
    times its scale, counted on the steps that lie wholly inside its start..end fractions of the
    steps that run; in `guess` mode the unconditional half of the guidance gets none."""

    ARGUMENTS: ClassVar[dict[str, Any]] = {"control_image": None, "controlnet_conditioning_scale": 1.0,
                                           "control_guidance_start": 0.0, "control_guidance_end": 1.0,
                                           "guess_mode": False}

    images: tuple[np.ndarray, ...]  # each [1 or B, H, W, 3] float32 in [0, 1]
    scales: tuple[float, ...]
    starts: tuple[float, ...]
    ends: tuple[float, ...]
    guess: bool = False

    @classmethod
    def parse(cls, spec: PipelineSpec, request: Request, control_image: Any, controlnet_conditioning_scale: Any,
              control_guidance_start: Any, control_guidance_end: Any, guess_mode: Any) -> Controls | None:
        """The part, or None without control images (the UNet alone, whatever ControlNets are loaded)."""
        if control_image is None:
            return None
        count = len(spec.controlnets)
        if not count:
            raise PipelineError("control_image needs a ControlNet: load one (load_pipeline(..., controlnets=[FOLDER]), "
                                "--controlnet FOLDER).")
        images = [control_image] if count == 1 and not isinstance(control_image, (list, tuple)) else control_image
        if not isinstance(images, (list, tuple)) or len(images) != count:
            raise PipelineError(f"control_image: give one image per ControlNet ({count}, in the order they were loaded)"
                                f", got {len(images) if isinstance(images, (list, tuple)) else 1}.")
        scales = checked_scales(controlnet_conditioning_scale, count)
        starts = [checked_float("control guidance start", v, 0.0, 1.0)
                  for v in per_net("control_guidance_start", control_guidance_start, count)]
        ends = [checked_float("control guidance end", v, 0.0, 1.0)
                for v in per_net("control_guidance_end", control_guidance_end, count)]
        for start, end in zip(starts, ends):
            if start >= end:
                raise PipelineError(f"control guidance start {start:g} must be below its end {end:g}.")
        if not isinstance(guess_mode, bool):
            raise PipelineError(f"guess_mode must be True or False, got {guess_mode!r}.")
        images = tuple(resized(image, request.height, request.width, request.batch) for image in images)
        return cls(images, tuple(scales), tuple(starts), tuple(ends), guess_mode)

    def step_scales(self, steps: int) -> np.ndarray:
        """[K, steps] float32: each ControlNet's scale at each of the `steps` steps that run; 0 where
        the step is not wholly inside its start..end (diffusers' `controlnet_keep`: with 6 steps,
        0.2..0.7 keeps steps 2 and 3)."""
        i = np.arange(steps)
        keep = [~((i / steps < start) | ((i + 1) / steps > end)) for start, end in zip(self.starts, self.ends)]
        return (np.asarray(self.scales)[:, None] * np.asarray(keep)).astype(np.float32)


# The optional parts of a request, each parsed from its `ARGUMENTS` (by name, with their defaults), in
# this order (a part sees those before it).
PARTS = {"image_to_image": ImageToImage, "tiles": Tiles, "refine": Refine, "aesthetics": Aesthetics,
         "step_cache": StepCache, "control": Controls}


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request, checked (`Request.parse`): every value has its type and range, and
    the lists agree in length (`batch`)."""

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
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    parallel: ParallelConfig = ParallelConfig()
    image_to_image: ImageToImage | None = None
    tiles: Tiles | None = None  # a canvas of fused views, or None: one image
    refine: Refine | None = None  # the refiner finishes the image, or None: the model alone
    aesthetics: Aesthetics | None = None  # when the model or its refiner reads aesthetic scores
    step_cache: DeepCache | None = None  # DeepCache's settings, or None: every step runs every layer
    control: Controls | None = None  # the ControlNets' control images, or None: the UNet alone

    @property
    def batch(self) -> int:
        return len(self.prompts)

    @property
    def start_step(self) -> int:
        """The first step that runs: 0, or later for image-to-image (`schedulers.start_step`)."""
        part = self.image_to_image
        return 0 if part is None else schedulers.start_step(self.steps, part.strength)

    @property
    def steps_run(self) -> int:
        return self.steps - self.start_step

    @property
    def use_guidance(self) -> bool:
        return self.guidance_scale > 1.0

    @classmethod
    def parse(cls, spec: PipelineSpec, prompt: Any, negative_prompt: Any = None, *, height: Any = None,
              width: Any = None, num_inference_steps: Any = DEFAULT_STEPS, guidance_scale: Any = 5.0,
              guidance_rescale: Any = 0.0, seed: Any = 0, latents: Any = None, scheduler: Any = "euler",
              original_size: Any = None, crops_coords_top_left: Any = (0, 0), target_size: Any = None,
              parallel: ParallelConfig = ParallelConfig(), **parts: Any) -> Request:
        """The arguments of `SDXLPipeline.generate` checked, or one `PipelineError` naming the
        fix. `height`/`width` None: the model's size, or the image's. `seed`: one int, or one per
        image (a single prompt is then repeated for each). `parts`: the arguments of the optional
        parts (`PARTS`: `image` and `strength`; `tiled`, `tile_stride`, `tile_weighting`,
        `regions`, `bootstrap`, `view_devices`)."""
        arguments = {name: part.ARGUMENTS for name, part in PARTS.items()}
        known = {key for names in arguments.values() for key in names}
        unknown = sorted(set(parts) - known)
        if unknown:
            raise PipelineError(f"unknown argument{'s' * (len(unknown) > 1)} {', '.join(unknown)}; a request takes "
                                f"the core arguments of `Request.parse` and {', '.join(sorted(known))}.")
        prompts, seeds, negatives = checked_batch(prompt, seed, negative_prompt)
        if parts.get("image") is not None:  # checked once, here: it sets the size
            parts["image"] = checked_image(parts["image"], len(prompts))
            image_size = parts["image"].shape[1:3]
            for name, given, own in (("height", height, image_size[0]), ("width", width, image_size[1])):
                if given is not None and given != own:
                    raise PipelineError(f"{name} {given} differs from the image's {own}; leave it out (the image "
                                        f"sets the size) or resize the image to "
                                        f"{height or image_size[0]}x{width or image_size[1]}.")
            height, width = (int(n) for n in image_size)
        height = spec.default_size if height is None else checked_int("height", height, 1)
        width = spec.default_size if width is None else checked_int("width", width, 1)
        steps = checked_int("steps", num_inference_steps, 1, spec.scheduler.num_train_timesteps)
        kinds = [k.value for k in schedulers.SchedulerKind]
        if scheduler not in kinds:
            raise PipelineError(f"scheduler {scheduler!r} is not one of {', '.join(kinds)}.")
        try:  # host arithmetic only: a step count this sampler cannot schedule fails here, before loading
            schedulers.make_schedule(schedulers.SchedulerKind(scheduler), spec.scheduler, steps)
        except ValueError as e:
            raise PipelineError(str(e)) from None
        request = cls(
            prompts=prompts, negative_prompts=negatives, height=height, width=width, steps=steps,
            guidance_scale=checked_float("guidance scale", guidance_scale, 0.0,
                                         why=" (1 or less turns guidance off)"),
            guidance_rescale=checked_float("guidance rescale", guidance_rescale, 0.0, 1.0),
            seeds=seeds, latents=None if latents is None else spec.checked_latents(latents, len(prompts), height,
                                                                                     width),
            scheduler=schedulers.SchedulerKind(scheduler),
            original_size=checked_pair("original_size", original_size, 1),
            crops_coords_top_left=checked_pair("crops_coords_top_left", crops_coords_top_left, 0),
            target_size=checked_pair("target_size", target_size, 1))
        for name, part in PARTS.items():
            given = {key: parts.get(key, default) for key, default in part.ARGUMENTS.items()}
            request = dataclasses.replace(request, **{name: part.parse(spec, request, **given)})
        return request.spread(spec, parallel)

    def spread(self, spec: PipelineSpec, parallel: ParallelConfig) -> Request:
        """This request spread over the devices `parallel` names, checked for that layout."""
        if not isinstance(parallel, ParallelConfig):
            raise PipelineError(f"parallel must be a jaxfuse.ParallelConfig, got {parallel!r}.")
        if self.tiles is None:
            spec.check_size(self.height, self.width, parallel.patches)
            if self.refine is not None:
                try:
                    spec.refiner.check_size(self.height, self.width, parallel.patches)
                except PipelineError as e:
                    raise PipelineError(f"the refiner's UNet: {e}") from None
        else:
            parallel = self.tiles.spread(spec, parallel)
        if parallel.cfg_parallel and not self.use_guidance:
            raise PipelineError("cfg_parallel splits the guidance batch, but guidance_scale <= 1 has none; "
                                "drop --cfg-parallel or raise --guidance-scale.")
        return dataclasses.replace(self, parallel=parallel)


def checked_batch(prompt: Any, seed: Any, negative_prompt: Any) -> tuple[list[str], list[int], list[str] | None]:
    """The prompts, seeds and negative prompts of a batch, agreeing in length: one seed for the
    batch or one per image (a single prompt repeated for each), one negative prompt or one per
    prompt."""
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
    return prompts, seeds, negatives


@dataclasses.dataclass
class Generation:
    """What a request returns: the images [B, H, W, 3] float32 in [0, 1], the seconds each phase
    took (compiling apart) and the peak memory per device (bytes) of each phase's largest compiled
    program."""

    images: np.ndarray
    timings: dict[str, float]
    memory: dict[str, int] = dataclasses.field(default_factory=dict)


class NonFiniteError(RuntimeError):
    """A generation whose result holds NaN or infinity; the message names the likely cause."""


def check_finite(what: str, values: np.ndarray, likely_cause: str) -> None:
    """Raises `NonFiniteError` unless every value is finite: never a black image."""
    bad = np.size(values) - np.count_nonzero(np.isfinite(values))
    if bad:
        raise NonFiniteError(f"{what} hold {bad} NaN or infinite values of {np.size(values)}; the inputs were "
                             f"checked, so the likely cause is {likely_cause}.")
