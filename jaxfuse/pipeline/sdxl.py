"""Text to image with SDXL: a request -> its conditioning -> the denoising loop -> the VAE -> images.

    pipe = jaxfuse.load_pipeline("stable-diffusion-xl-base-1.0", dtype=jnp.bfloat16)
    images = pipe("a red circle at the top left", height=1024, width=1024, seed=0)

The result equals diffusers' `StableDiffusionXLPipeline` (and its image-to-image pipeline) on the
same weights and initial latents. `SDXLPipeline` only orchestrates: the request and its parts
(`request`), the prompts (`text`), the VAE (`codec`), where the latents lie (`canvas`), the loop
(`sampling.image` over a `sampling.plan.Plan`, the UNet a `sampling.denoiser.Denoiser`) and the
compiled programs (`runtime.programs`). A call keeps its timings, memory and progress in a record
of its own, so threads may share one pipeline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxfuse import schedulers
from jaxfuse.models.vae import AutoencoderKL
from jaxfuse.parallel.mesh import gather
from jaxfuse.pipeline.canvas import Canvas, WholeImage, layout_of
from jaxfuse.pipeline.codec import Codec
from jaxfuse.pipeline.request import Generation, Request, check_finite
from jaxfuse.pipeline.text import Text, TextEncoder
from jaxfuse.runtime.programs import CallPrograms, CallRecord, Programs
from jaxfuse.sampling.denoiser import ControlNet, Denoiser
from jaxfuse.sampling.image import Loop, denoise
from jaxfuse.sampling.plan import Plan
from jaxfuse.sampling.step import Guidance, Sampling
from jaxfuse.spec import PipelineSpec


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> jax.Array:
    """Unit Gaussian noise [B, ...]: from one seed for the whole batch, or one seed per image
    (each image's noise then equals a batch of one from its seed)."""
    if len(seeds) == 1:
        return jax.random.normal(jax.random.key(seeds[0]), shape, jnp.float32)
    return jnp.stack([jax.random.normal(jax.random.key(s), shape[1:], jnp.float32) for s in seeds])


@dataclasses.dataclass(frozen=True)
class Preview:
    """Images decoded from the latents as the loop leaves them: after each step in `steps`
    (counted from 1 over the steps that run, the refiner's too), `show(step, images)`, the images
    [B, H, W, 3] float32 in [0, 1] (in every process of a multi-host run, as the result is)."""

    steps: frozenset[int]
    show: Callable[[int, np.ndarray], None]


class SDXLPipeline:
    """SDXL text to image and image to image; build it with `load_pipeline`."""

    def __init__(self, spec: PipelineSpec, unet, unet_params, vae: AutoencoderKL, vae_params,
                 encoders: Sequence[TextEncoder], dtype: Any, loras: Sequence[tuple[Path, float]] = (),
                 refiner: SDXLPipeline | None = None, controlnets: Sequence[ControlNet] = ()):
        self.spec = spec
        self.dtype = jnp.dtype(dtype)
        self.denoiser = Denoiser(unet, unet_params, controlnets=tuple(controlnets))
        self.codec = Codec(vae, vae_params, spec.vae)
        self.text = Text(tuple(encoders), spec.force_zeros_for_empty_prompt, self.dtype, spec.requires_aesthetics_score)
        self.loras = tuple(loras)  # (file, weight) fused into the weights: named when a result is not finite
        self.refiner = refiner  # the pipeline that finishes a request's image when it names a refiner start
        self.programs = Programs()

    def __call__(self, prompt, negative_prompt=None, **kwargs) -> np.ndarray:
        """The images [B, H, W, 3] float32 in [0, 1]; see `generate` for the arguments."""
        return self.generate(prompt, negative_prompt, **kwargs).images

    def generate(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 progress: Callable[[int, int], None] | None = None, **arguments: Any) -> Generation:
        """Runs the pipeline on the request `Request.parse` makes of the arguments (every one
        checked before anything runs; `PipelineError` names a bad one): `height`, `width`,
        `num_inference_steps`, `guidance_scale`, `guidance_rescale`, `seed` (one for the batch, or
        one per image: image i then equals a one-image run with `seed[i]`), `latents`, `scheduler`,
        `original_size`, `crops_coords_top_left`, `target_size`, `parallel` (the devices: default
        one), and the parts' arguments: `image` and `strength` (image to image, as diffusers'
        `StableDiffusionXLImg2ImgPipeline`; the image sets the size), `tiled`, `tile_stride`,
        `tile_weighting`, `regions`, `bootstrap`, `view_devices` (a canvas of fused views,
        MultiDiffusion: `jaxfuse.pipeline.request.Tiles`). `progress(step, total)` is called after
        every denoising step. Raises `NonFiniteError` when the result holds NaN or infinity."""
        return self.run(Request.parse(self.spec, prompt, negative_prompt, **arguments), progress)

    def run(self, request: Request, progress: Callable[[int, int], None] | None = None,
            preview: Preview | None = None) -> Generation:
        """`generate` for a request checked already (`Request.parse`); `preview`: images of the
        latents at some of the steps on the way."""
        record = CallRecord(progress)
        run = self.programs.for_call(record)
        layout = layout_of(request, self.spec, self.text, self.codec)
        mesh = layout.mesh(request)
        x, schedule = self.initial_latents(run, request, layout, mesh)
        finisher, part, keys = self, request.refine, schedulers.noise_keys(request.seeds)
        if part is not None:  # the model's steps, then the refiner's from its latents as they are
            schedule = schedulers.head(schedule, part.model_steps - request.start_step)
            refined = schedulers.tail(schedulers.make_schedule(request.scheduler, self.refiner.spec.scheduler,
                                                               request.steps), part.refiner_first)
            total = schedule.timesteps.shape[0] + refined.timesteps.shape[0]
            x = self.denoised(run, request, layout, mesh, x, schedule,
                              self.watcher(run, request, layout, mesh, progress, preview, 0, total), keys)
            finisher = self.refiner
            run = finisher.programs.for_call(record)
            layout = layout_of(request, finisher.spec, finisher.text, finisher.codec)
            # The refiner's stochastic steps draw noise of their own, not the model's first steps' again.
            watch = finisher.watcher(run, request, layout, mesh, progress, preview, schedule.timesteps.shape[0],
                                     total)
            x = finisher.denoised(run, request, layout, mesh, x, refined, watch,
                                  schedulers.noise_keys(request.seeds, stream=1), "refiner_")
        else:
            watch = self.watcher(run, request, layout, mesh, progress, preview, 0, schedule.timesteps.shape[0])
            x = self.denoised(run, request, layout, mesh, x, schedule, watch, keys)
        images = gather(run.timed("decode", lambda: finisher.codec.decode(run, x, *layout.vae_layout(request, mesh))))
        check_finite("the decoded image", images, "the VAE's weights or an overflow in half precision (SDXL's "
                     "VAE needs float32: its config's force_upcast)")
        return Generation(images, record.phase_times(), dict(record.memory))

    def watcher(self, run: CallPrograms, request: Request, layout: WholeImage | Canvas, mesh: Mesh | None,
                progress: Callable[[int, int], None] | None, preview: Preview | None, done: int,
                total: int) -> Callable[[int, int, jax.Array], None] | None:
        """The loop's callback for a loop that runs after `done` of a request's `total` steps:
        `progress(step, total)` after each, and `preview.show` of the latents decoded after
        those it names."""
        if progress is None and preview is None:
            return None

        def watch(step: int, _: int, latents: jax.Array) -> None:
            step += done
            if progress is not None:
                progress(step, total)
            if preview is not None and step in preview.steps:
                preview.show(step, gather(self.codec.decode(run, latents, *layout.vae_layout(request, mesh))))
        return watch

    def denoised(self, run: CallPrograms, request: Request, layout: WholeImage | Canvas, mesh: Mesh | None,
                 x: jax.Array, schedule: schedulers.Schedule, watch: Callable[[int, int, jax.Array], None] | None,
                 keys: jax.Array, phase: str = "") -> jax.Array:
        """The latents `x` denoised through `schedule` by this pipeline's model, checked finite;
        `watch`: called after each step (`watcher`); `keys`: the stochastic samplers' noise keys;
        `phase` prefixes the names its phases are timed under."""
        cond = run.timed(f"{phase}encode", lambda: layout.conditioning(run, request))
        loop = Loop(Sampling(request.use_guidance, request.guidance_rescale > 0, request.parallel),
                    Plan.of(request.parallel, schedule.timesteps.shape[0], request.step_cache), mesh,
                    layout.predictor(request, mesh))
        guidance = Guidance(jnp.float32(request.guidance_scale), jnp.float32(request.guidance_rescale))
        x = run.timed(f"{phase}denoise",
                      lambda: denoise(loop, self.denoiser, x, cond, schedule, guidance, keys, run, watch))
        half = "" if self.dtype == jnp.float32 else " or an overflow in half precision (try --dtype float32)"
        check_finite("the denoised latents", gather(x), " or ".join(
            [*(f"the LoRA {path} at weight {weight:g} (try a weight nearer 1)" for path, weight in self.loras),
             f"the UNet's weights{half}"]))
        return x

    def initial_latents(self, run: CallPrograms, request: Request, layout: WholeImage | Canvas,
                        mesh: Mesh | None) -> tuple[jax.Array, schedulers.Schedule]:
        """The latents the loop starts from and the schedule of the steps that run: noise at the
        schedule's first level; for image to image, the picture's latents noised to the level of
        its first step, and the schedule from there."""
        schedule = schedulers.make_schedule(request.scheduler, self.spec.scheduler, request.steps)
        noise = (jnp.asarray(request.latents) if request.latents is not None
                 else initial_noise(request.seeds, self.spec.latent_shape(request.batch, request.height,
                                                                          request.width)))
        part = request.image_to_image
        if part is None:
            return noise * schedule.init_noise_sigma, schedule
        x0 = run.timed("encode_image", lambda: self.codec.encode(run, part.image, request.batch,
                                                                 *layout.vae_layout(request, mesh)))
        x = schedulers.noised_sample(schedule, x0, noise, request.start_step)
        return x, schedulers.tail(schedule, request.start_step)
