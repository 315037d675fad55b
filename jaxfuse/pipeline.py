"""Text to image with SDXL: prompts -> text embeddings -> a compiled denoising loop -> VAE -> image.

    pipe = jaxfuse.load_pipeline("stable-diffusion-xl-base-1.0", dtype=jnp.bfloat16)
    images = pipe("a red circle at the top left", height=1024, width=1024, seed=0)

The result equals diffusers' `StableDiffusionXLPipeline` on the same weights and initial latents.
This module loads the models, encodes and conditions the prompts, hands the latents to a sampling
loop (`jaxfuse.sampling.image`: one compiled program per phase of steps) and decodes; the text
encoders and the VAE are jitted on their own.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from transformers import CLIPTokenizerFast

from jaxfuse import checkpoint, lora, schedulers
from jaxfuse.analysis.cost import peak_bytes
from jaxfuse.config import Mode, ParallelConfig
from jaxfuse.models import clip as clip_model
from jaxfuse.models import unet as unet_model
from jaxfuse.models import vae_tiled
from jaxfuse.models.clip import load_text_encoder
from jaxfuse.models.unet import load_unet
from jaxfuse.models.vae import AutoencoderKL, load_vae
from jaxfuse.parallel.mesh import ROWS, ProcessLayout, gather, initialize_processes, make_mesh, place
from jaxfuse.parallel.patch import Patch
from jaxfuse.parallel.views import views_mesh
from jaxfuse.sampling import image, tiled
from jaxfuse.sampling.step import Conditioning, Guidance, Sampling
from jaxfuse.spec import (
    DEFAULT_BOOTSTRAP,
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
    PipelineSpec,
    Region,
    Request,
    Tiles,
)

# MultiDiffusion's bootstrapping draws its backgrounds from 20 random solid colours.
BOOTSTRAP_COLOURS = 20
BOOTSTRAP_STREAM = 1  # the colours' key, and folded into each seed's for the bootstrapping's draws


class NonFiniteError(RuntimeError):
    """A generation whose result holds NaN or infinity; the message names the likely cause."""


def check_finite(what: str, values: np.ndarray, likely_cause: str) -> None:
    """Raises `NonFiniteError` unless every value is finite: never a black image."""
    bad = np.size(values) - np.count_nonzero(np.isfinite(values))
    if bad:
        raise NonFiniteError(f"{what} hold {bad} NaN or infinite values of {np.size(values)}; the inputs were "
                             f"checked, so the likely cause is {likely_cause}.")


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> jax.Array:
    """Unit Gaussian noise [B, ...]: from one seed for the whole batch, or one seed per image
    (each image's noise then equals a batch of one from its seed)."""
    if len(seeds) == 1:
        return jax.random.normal(jax.random.key(seeds[0]), shape, jnp.float32)
    return jnp.stack([jax.random.normal(jax.random.key(s), shape[1:], jnp.float32) for s in seeds])


@dataclasses.dataclass
class Generation:
    """The images [B, H, W, 3] float32 in [0, 1], the seconds each phase took and the peak memory
    per device (bytes) of each phase's largest compiled program."""

    images: np.ndarray
    timings: dict[str, float]
    memory: dict[str, int] = dataclasses.field(default_factory=dict)


def vae_mean(vae: AutoencoderKL, x: jax.Array) -> jax.Array:
    """The VAE encoder's mean [B, 4, h, w] of images x [B, 3, H, W] (its posterior's first half)."""
    return vae.encode(x)[0]


def mesh_key(mesh: Mesh | None) -> Any:
    """What identifies a mesh for reuse of compiled programs and placed parameters."""
    return None if mesh is None else (mesh.axis_names, mesh.devices.shape, tuple(d.id for d in mesh.devices.flat))


@dataclasses.dataclass
class TextEncoder:
    """One tokenizer with its CLIP encoder."""

    tokenizer: Any
    module: Any
    params: Any

    def token_ids(self, prompts: Sequence[str]) -> np.ndarray:
        max_length = self.tokenizer.model_max_length
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=max_length,
                             truncation=True, return_tensors="np").input_ids
        full = self.tokenizer(list(prompts)).input_ids
        for prompt, tokens in zip(prompts, full):
            if len(tokens) > max_length:
                print(f"warning: the prompt {prompt!r} is longer than CLIP's {max_length} tokens; "
                      "the end was cut off.", file=sys.stderr)
        return ids.astype(np.int32)


class SDXLPipeline:
    """SDXL text to image; build it with `load_pipeline`."""

    def __init__(self, spec: PipelineSpec, unet, unet_params, vae, vae_params,
                 encoders: Sequence[TextEncoder], dtype: Any, loras: Sequence[tuple[Path, float]] = ()):
        self.spec = spec
        self.unet, self.unet_params = unet, unet_params
        self.vae, self.vae_params = vae, vae_params
        self.encoders = list(encoders)
        self.dtype = jnp.dtype(dtype)
        self._executables: dict[Any, Any] = {}
        self._compile_seconds = 0.0
        self._peak_bytes: dict[Any, int] = {}  # the peak memory per device of each compiled signature
        self._memory: dict[str, int] = {}  # this run's, per phase
        self._progress: Callable[[int, int], None] | None = None
        self._on_mesh: dict[Any, Any] = {}
        self._params_checked = False
        self.loras = tuple(loras)  # (file, weight) fused into the weights: named when a result is not finite

    def _run(self, name: Any, fn: Callable, *args, donate: int | None = None):
        """`jax.jit(fn)(*args)`, compiled once per `name` and argument shapes and kept; the time
        spent compiling is counted apart from the phase's own time. `donate`: the index of an
        argument whose buffers the result may reuse (a carry that is replaced)."""
        leaves, tree = jax.tree.flatten(args)
        signature = (name, tree, tuple((np.shape(x), jnp.result_type(x)) for x in leaves))
        if signature not in self._executables:
            start = time.perf_counter()
            jitted = jax.jit(fn, donate_argnums=() if donate is None else (donate,))
            self._executables[signature] = jitted.lower(*args).compile()
            self._compile_seconds += time.perf_counter() - start
            self._peak_bytes[signature] = peak_bytes(self._executables[signature])
        phase = name[0] if isinstance(name, tuple) else name
        self._memory[phase] = max(self._memory.get(phase, 0), self._peak_bytes[signature])
        return self._executables[signature](*args)

    def _replicated(self, name: str, params: Any, mesh: Mesh) -> Any:
        """`params` copied to every device of `mesh`, once per mesh."""
        key = (name, mesh_key(mesh))
        if key not in self._on_mesh:
            self._on_mesh = {k: v for k, v in self._on_mesh.items() if k[0] != name}  # one mesh at a time
            self._on_mesh[key] = place(params, NamedSharding(mesh, P()))
        return self._on_mesh[key]

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
        """Prompts -> context [B, 77, sum of widths] (each encoder's penultimate layer, side by
        side) and the last encoder's pooled embedding [B, pooled]."""
        contexts, pooled = [], None
        for i, encoder in enumerate(self.encoders):
            apply = encoder.module.apply
            hidden, pooled = self._run(f"text_encoder_{i}", lambda p, ids: apply({"params": p}, ids),
                                       encoder.params, encoder.token_ids(prompts))
            contexts.append(hidden)
        return jnp.concatenate(contexts, axis=-1), pooled

    def generate(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = DEFAULT_STEPS,
                 guidance_scale: float = 5.0, guidance_rescale: float = 0.0, seed: int | Sequence[int] = 0,
                 latents: np.ndarray | None = None, scheduler: str = "euler",
                 original_size: tuple[int, int] | None = None, crops_coords_top_left: tuple[int, int] = (0, 0),
                 target_size: tuple[int, int] | None = None, parallel: ParallelConfig = ParallelConfig(),
                 image: np.ndarray | None = None, strength: float = DEFAULT_STRENGTH,
                 tiled: bool | None = None, tile_stride: int | None = None, tile_weighting: str | None = None,
                 regions: Sequence[Region | tuple[str, tuple[int, int, int, int]]] = (),
                 bootstrap: float = DEFAULT_BOOTSTRAP, view_devices: int = 1,
                 progress: Callable[[int, int], None] | None = None) -> Generation:
        """Runs the pipeline; `parallel` spreads the image over devices (default: one device);
        `progress(step, total)` is called after every denoising step.

        Image-to-image with `image` ([H, W, 3] or one per prompt, uint8 or float in [0, 1]; it
        sets the size): its VAE mean is noised to step `steps - int(steps x strength)` and
        denoised from there, as diffusers' `StableDiffusionXLImg2ImgPipeline` does; `latents`
        is then the noise added.

        `seed` is one int for the whole batch's noise, or one per image: image i then equals a
        one-image run with `seed[i]`, and a single prompt is repeated for each. Every argument is
        checked before anything runs (`PipelineSpec.request`); raises `PipelineError` for a bad
        one and `NonFiniteError` when the result holds NaN or infinity.

        A canvas above the native size (`TILED_AREA` native areas, or `tiled=True`, a
        `tile_stride` or `regions`) is made of fused views of the native size (MultiDiffusion,
        `jaxfuse.sampling.tiled`): one every `tile_stride` pixels (default: half the native size),
        merged with "uniform" or "gaussian" weights (default: Gaussian; uniform with regions),
        spread over `view_devices` device groups of `parallel.devices` each (patch parallelism
        inside every view), and decoded in tiles of half the native size (`models.vae_tiled`).
        `regions`: (prompt, (x0, y0, x1, y1)) boxes in pixels, each drawn with its own prompt, the
        prompt itself everywhere else; they are bootstrapped (a solid colour around them) for the
        first `bootstrap` share of the steps.
        """
        request = self.spec.request(
            prompt, negative_prompt, height=height, width=width, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, seed=seed, latents=latents,
            scheduler=scheduler, original_size=original_size, crops_coords_top_left=crops_coords_top_left,
            target_size=target_size, parallel=parallel, image=image, strength=strength, tiled=tiled,
            tile_stride=tile_stride, tile_weighting=tile_weighting, regions=regions, bootstrap=bootstrap,
            view_devices=view_devices)
        return self.run(request, progress)

    def run(self, request: Request, progress: Callable[[int, int], None] | None = None) -> Generation:
        """`generate` for a request checked already (`PipelineSpec.request`)."""
        self.check_params_finite()
        parallel = request.parallel
        sampling = Sampling(request.use_guidance, request.guidance_rescale > 0, parallel)
        mesh = self.mesh(request)
        self._compile_seconds, self._progress, self._memory = 0.0, progress, {}
        timings: dict[str, float] = {}

        if request.tiles is None:
            cond, predictor = self._timed(timings, "encode", lambda: self.conditioning(request)), image.Predictor()
        else:
            cond = self._timed(timings, "encode", lambda: self.canvas_conditioning(request))
            predictor = tiled.views_predictor(self.tiling(request.tiles), self.latent_size(request),
                                              self.spec.vae_factor, mesh)
        schedule = schedulers.make_schedule(request.scheduler, self.spec.scheduler, request.steps)
        noise = (jnp.asarray(request.latents) if request.latents is not None
                 else initial_noise(request.seeds, self.spec.latent_shape(request.batch, request.height,
                                                                          request.width)))
        if request.image is None:
            x = noise * schedule.init_noise_sigma
        else:
            x0 = self._timed(timings, "encode_image",
                             lambda: self.encode_image(request.image, request.batch, *self.vae_layout(mesh, request)))
            x = schedulers.noised_sample(schedule, x0, noise, request.start_step)
            schedule = schedulers.tail(schedule, request.start_step)
        guidance = Guidance(jnp.float32(request.guidance_scale), jnp.float32(request.guidance_rescale))
        keys = schedulers.noise_keys(request.seeds)
        x = self._timed(timings, "denoise",
                        lambda: self.denoise(x, cond, schedule, guidance, keys, sampling, mesh, predictor))
        latents = gather(x)
        half = "" if self.dtype == jnp.float32 else " or an overflow in half precision (try --dtype float32)"
        check_finite("the denoised latents", latents, " or ".join(
            [*(f"the LoRA {path} at weight {weight:g} (try a weight nearer 1)" for path, weight in self.loras),
             f"the UNet's weights{half}"]))
        images = gather(self._timed(timings, "decode", lambda: self.decode(x, *self.vae_layout(mesh, request))))
        check_finite("the decoded image", images, "the VAE's weights or an overflow in half precision (SDXL's "
                     "VAE needs float32: its config's force_upcast)")
        return Generation(images, {"compile": self._compile_seconds, **timings}, dict(self._memory))

    def mesh(self, request: Request) -> Mesh | None:
        """The devices of a request: the image split by rows over `PATCH` (and `CFG`); a canvas's
        views over `VIEWS`, each split by rows over `PATCH` when the request's layout splits."""
        parallel, tiles = request.parallel, request.tiles
        if tiles is None:
            return make_mesh(parallel) if parallel.split else None
        if tiles.devices == 1 and not parallel.split:
            return None
        return views_mesh(tiles.devices, patches=parallel.patches if parallel.split else 1)

    def vae_layout(self, mesh: Mesh | None, request: Request) -> tuple[Mesh | None, int | None]:
        """Where the VAE runs, and in tiles of how many latent pixels: an image whole, split by
        rows on its mesh; a canvas in tiles of half the native size (`models.vae_tiled`: exact;
        SDXL's decode then needs 1.7 GB a device up to 2048², where a tile of the native size
        needs 6.1 and the untiled decode of a native image 2.9: benchmarks/vae_memory.py), a tile
        on each device of its mesh at a time (of this process's devices: across processes each
        decodes it on its own)."""
        if request.tiles is None:
            return mesh, None
        local = mesh if mesh is not None and jax.process_count() == 1 else None
        return local, request.tiles.window // self.spec.vae_factor // 2

    def latent_size(self, request: Request) -> tuple[int, int]:
        return request.height // self.spec.vae_factor, request.width // self.spec.vae_factor

    def tiling(self, tiles: Tiles) -> tiled.Tiling:
        window, stride = tiles.window // self.spec.vae_factor, tiles.stride // self.spec.vae_factor
        return tiled.Tiling((window, window), (stride, stride), tiled.Weighting(tiles.weighting))

    def canvas_conditioning(self, request: Request) -> tiled.CanvasConditioning:
        """The conditioning of a canvas's prompts (the request's, then each region's, each for
        every image) and where each applies (`tiled.Regions`)."""
        tiles, f = request.tiles, self.spec.vae_factor
        copies = 1 + len(tiles.regions)
        prompts = request.prompts + [r.prompt for r in tiles.regions for _ in range(request.batch)]
        negatives = None if request.negative_prompts is None else request.negative_prompts * copies
        cond = self.conditioning(dataclasses.replace(request, prompts=prompts, negative_prompts=negatives),
                                 request.use_guidance)
        canvas = self.latent_size(request)
        if not tiles.regions:
            return tiled.CanvasConditioning(cond, tiled.whole_canvas(canvas, self.spec.unet.in_channels))
        # Latent boxes cover every pixel of the pixel boxes: rows y0 // f .. ceil(y1 / f).
        boxes = np.asarray([(y0 // f, x0 // f, -(-y1 // f), -(-x1 // f)) for x0, y0, x1, y1 in
                            (r.box for r in tiles.regions)])
        # Each image's draws from its own seed, so that image i equals a one-image run with seed i.
        keys = jnp.stack([jax.random.key_data(jax.random.fold_in(jax.random.key(seed), BOOTSTRAP_STREAM))
                          for seed in request.seeds])
        regions = tiled.Regions(jnp.asarray(tiled.region_masks(boxes, canvas)),
                                self.solid_colours(jax.random.key(BOOTSTRAP_STREAM)),
                                jnp.int32(round(tiles.bootstrap * request.steps_run)), keys)
        return tiled.CanvasConditioning(cond, regions)

    def solid_colours(self, key: jax.Array, count: int = BOOTSTRAP_COLOURS) -> jax.Array:
        """The UNet latents [count, C] of `count` random solid colours (MultiDiffusion's
        bootstrapping backgrounds): each colour's image encoded, its middle latent pixel (away
        from the borders the encoder pads)."""
        side = 8  # latent pixels
        pixels = side * self.spec.vae_factor
        colours = np.asarray(jax.random.uniform(key, (count, 1, 1, 3)))
        latents = self.encode_image(np.broadcast_to(colours, (count, pixels, pixels, 3)), count)
        return latents[:, :, side // 2, side // 2]

    def check_params_finite(self) -> None:
        """Raises `NonFiniteError` naming the first parameters that hold NaN or infinity (checked
        once, on the devices)."""
        if self._params_checked:
            return
        named = {"unet": self.unet_params, "vae": self.vae_params,
                 **{f"text_encoder_{i}": e.params for i, e in enumerate(self.encoders)}}
        flags = jax.jit(lambda tree: jax.tree.map(lambda x: jnp.isfinite(x).all(), tree))(named)
        bad = ["/".join(str(getattr(k, "key", k)) for k in path)
               for path, ok in jax.tree_util.tree_flatten_with_path(flags)[0] if not ok]
        if bad:
            raise NonFiniteError(f"the model's weights hold NaN or infinity in {len(bad)} tensors ({', '.join(bad[:5])}"
                                 f"{', ...' if len(bad) > 5 else ''}); the checkpoint is damaged: restore it from "
                                 "its original copy.")
        self._params_checked = True

    def _timed(self, timings: dict[str, float], phase: str, work: Callable[[], Any]) -> Any:
        """`work()`, finished; its seconds less the compiling it caused go to `timings[phase]`."""
        compiled_before, start = self._compile_seconds, time.perf_counter()
        result = jax.block_until_ready(work())
        timings[phase] = time.perf_counter() - start - (self._compile_seconds - compiled_before)
        return result

    def denoise(self, x, cond: Any, schedule, guidance: Guidance, noise_keys: jax.Array, sampling: Sampling,
                mesh: Mesh | None, predictor: image.Predictor = image.Predictor()) -> jax.Array:
        """Initial latents [B, 4, h, w] -> denoised latents; on `mesh`, laid out as the predictor
        says (split by rows, or a canvas's views spread). With a progress callback the host runs
        one step at a time (the same compiled program as a phase's whole range) and reports each
        when it is done."""
        params, args = self.unet_params, (x, cond, schedule, guidance, noise_keys)
        if mesh is not None:
            params = self._replicated("unet", params, mesh)
            specs = image.loop_specs(sampling, predictor)[1:]
            args = [place(a, NamedSharding(mesh, spec)) for a, spec in zip(args, specs)]
        _, cond, schedule, guidance, _ = args
        # Programs are kept by name: a canvas's predictor is a new function each run, named by
        # what makes it (`Predictor.key`) and the mesh.
        kind = (sampling, predictor.key, None if predictor.key is None else mesh_key(mesh))
        carry = self._run(("initial", *kind), image.initial_program(self.unet, sampling, mesh, predictor),
                          params, *args)
        total = schedule.timesteps.shape[0]
        # Every process of a multi-host run must launch the same programs in the same order,
        # whichever of them reports progress: across processes the host always steps.
        stepwise = self._progress is not None or jax.process_count() > 1
        for patch, start, stop in sampling.phases(total):
            steps = image.steps_program(self.unet, sampling, patch, mesh, predictor)
            bounds = [(i, i + 1) for i in range(start, stop)] if stepwise else [(start, stop)]
            for first, end in bounds:
                carry = self._run(("steps", *kind, patch), steps, params, carry, cond, schedule, guidance,
                                  np.int32(first), np.int32(end), donate=1)
                if self._progress is not None:
                    jax.block_until_ready(carry.latents)
                    self._progress(end, total)
        return carry.latents

    def __call__(self, prompt, negative_prompt=None, **kwargs) -> np.ndarray:
        """The images [B, H, W, 3] float32 in [0, 1]; see `generate` for the arguments."""
        return self.generate(prompt, negative_prompt, **kwargs).images

    def conditioning(self, request: Request, negative: bool | None = None) -> Conditioning:
        """Text embeddings and SDXL micro-conditioning, unconditional half first when guiding (or
        when `negative` asks for it whatever the guidance scale)."""
        context, pooled = self.encode_prompts(request.prompts)
        size = (request.height, request.width)
        time_ids = jnp.asarray([*(request.original_size or size), *request.crops_coords_top_left,
                                *(request.target_size or size)], jnp.float32)
        time_ids = jnp.broadcast_to(time_ids, (request.batch, time_ids.shape[0]))
        if request.use_guidance if negative is None else negative:
            if request.negative_prompts is None and self.spec.force_zeros_for_empty_prompt:
                neg_context, neg_pooled = jnp.zeros_like(context), jnp.zeros_like(pooled)
            else:
                neg_context, neg_pooled = self.encode_prompts(request.negative_prompts or [""] * request.batch)
            context = jnp.concatenate([neg_context, context])
            pooled = jnp.concatenate([neg_pooled, pooled])
            time_ids = jnp.concatenate([time_ids, time_ids])
        return Conditioning(context.astype(self.dtype), pooled.astype(self.dtype), time_ids)

    def latent_scaling(self) -> tuple[Any, Any]:
        """(shift, scale): the UNet's latents are (VAE latents - shift) x scale, as diffusers'
        SDXL pipelines map them (per channel with the config's latents_mean and latents_std)."""
        cfg = self.spec.vae
        if cfg.latents_mean is not None and cfg.latents_std is not None:
            mean = jnp.asarray(cfg.latents_mean, jnp.float32).reshape(1, -1, 1, 1)
            std = jnp.asarray(cfg.latents_std, jnp.float32).reshape(1, -1, 1, 1)
            return mean, cfg.scaling_factor / std
        return 0.0, cfg.scaling_factor

    def vae_function(self, method: Callable, patch: Patch = Patch()) -> Callable:
        """`method` of the VAE as a function of (params, x [B, C, H, W]), under `patch`."""
        vae = self.vae.clone(patch=patch)
        return lambda params, x: vae.apply({"params": params}, x, method=method)

    def _vae_program(self, method: Callable, mesh: Mesh | None) -> tuple[Callable, Any]:
        """`vae_function(method)` and the VAE's parameters; on `mesh`, each device runs its rows with
        synchronous patch parallelism."""
        if mesh is None:
            return self.vae_function(method), self.vae_params
        run = self.vae_function(method, Patch(Mode.SYNC))
        return (jax.shard_map(run, mesh=mesh, in_specs=(P(), ROWS), out_specs=ROWS),
                self._replicated("vae", self.vae_params, mesh))

    def vae_input(self, images: jax.Array) -> jax.Array:
        """Images [B, H, W, 3] in [0, 1] -> the VAE encoder's input [B, 3, H, W] in [-1, 1]."""
        return jnp.transpose(jnp.asarray(images) * 2 - 1, (0, 3, 1, 2)).astype(self.vae.dtype)

    def unet_latents(self, mean: jax.Array) -> jax.Array:
        """The VAE encoder's mean [B, 4, h, w] -> the UNet's latents, float32."""
        shift, scale = self.latent_scaling()
        return (mean.astype(jnp.float32) - shift) * scale

    def vae_latents(self, latents: jax.Array) -> jax.Array:
        """The UNet's latents [B, 4, h, w] -> the VAE decoder's input."""
        shift, scale = self.latent_scaling()
        return (latents / scale + shift).astype(self.vae.dtype)

    @staticmethod
    def images(decoded: jax.Array) -> jax.Array:
        """The VAE decoder's output [B, 3, H, W] -> images [B, H, W, 3] float32 in [0, 1]."""
        return jnp.clip(jnp.transpose(decoded.astype(jnp.float32), (0, 2, 3, 1)) / 2 + 0.5, 0.0, 1.0)

    def encode_image(self, images: np.ndarray, batch: int, mesh: Mesh | None = None,
                     tile: int | None = None) -> jax.Array:
        """Images [1 or B, H, W, 3] in [0, 1] -> the VAE encoder's mean [B, 4, h, w] as the UNet's
        latents (diffusers samples around the mean; SDXL's VAE's spread is about 1e-4 of it);
        with `tile`, in tiles of that many latent pixels, a tile on each device of `mesh`."""
        x = self.vae_input(images)
        if tile is not None:
            mean = vae_tiled.tiled_encode(self.vae, self.vae_params, x, tile, mesh)[0]
            return jnp.broadcast_to(self.unet_latents(mean), (batch, *mean.shape[1:]))
        encode, params = self._vae_program(vae_mean, mesh)
        if mesh is not None:
            x = place(x, NamedSharding(mesh, ROWS))
        # The noising mixes it with host arrays: gathered, it is the same value in every process.
        latents = self.unet_latents(gather(self._run(("vae_encode", mesh_key(mesh)), encode, params, x)))
        return jnp.broadcast_to(latents, (batch, *latents.shape[1:]))

    def decode(self, latents: jax.Array, mesh: Mesh | None = None, tile: int | None = None) -> jax.Array:
        """Latents [B, 4, h, w] -> images [B, H, W, 3] float32 in [0, 1]; on `mesh`, each device
        decodes its rows with synchronous patch parallelism; with `tile`, in tiles of that many
        latent pixels, a tile on each device of `mesh`."""
        if tile is not None:
            z = self.vae_latents(jnp.asarray(gather(latents)))
            return self.images(jnp.asarray(vae_tiled.tiled_decode(self.vae, self.vae_params, z, tile, mesh)))
        decode, params = self._vae_program(AutoencoderKL.decode, mesh)
        return self.images(self._run(("vae_decode", mesh_key(mesh)), decode, params, self.vae_latents(latents)))


# Set to 0 to keep `python -m jaxfuse.generate` from using the persistent compilation cache.
COMPILE_CACHE_ENV = "JAXFUSE_COMPILE_CACHE"


def use_compile_cache(cache_dir: str | Path | None = None) -> Path:
    """Keeps every compiled program under `cache_dir`/xla (default: jaxfuse's cache folder,
    `$JAXFUSE_CACHE` or ~/.cache/jaxfuse) so that a later process running the same program loads
    it instead of compiling it again (JAX's persistent compilation cache). Call it before the
    first compile; a cache folder set already (`JAX_COMPILATION_CACHE_DIR`) is kept. Returns the
    folder in use."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(Path(cache_dir or checkpoint.default_cache_dir()) / "xla"))
        # JAX's default keeps only programs that took a second to compile; the small ones (text
        # encoders, noise, checks) add up to several seconds of a run too.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return Path(jax.config.jax_compilation_cache_dir)


LOADERS = {"unet": load_unet, "vae": load_vae, "text_encoder": load_text_encoder, "text_encoder_2": load_text_encoder}


def load_models(spec: PipelineSpec, source: Path, dtype: Any) -> dict[str, tuple[Any, Any]]:
    """Each model of the pipeline `spec` describes, as (module, params), read from `source` (its
    folder, or a converted copy of it) in the model's dtype (`PipelineSpec.dtypes`)."""
    dtypes = spec.dtypes(jnp.dtype(dtype))
    return {c: LOADERS[c](source / c, dtype=dtypes[c]) for c in checkpoint.MODEL_COMPONENTS}


def plan_loras(spec: PipelineSpec, loras: Sequence[tuple[str | Path, float]]) -> list[tuple[Path, list]]:
    """Each (LoRA file, weight) checked against the model's parameter shapes, from the config
    files and the LoRA's header, and its tensors checked finite: (file, its `lora.LoraUpdate`s)."""
    pairs = lora.checked_loras(loras)
    if not pairs:
        return []
    abstract = {"unet": unet_model.abstract_params(spec.unet)}
    for component in ("text_encoder", "text_encoder_2"):
        abstract[component] = clip_model.abstract_params(clip_model.read_config(spec.folder / component))
    return [(path, lora.plan_lora(path, weight, abstract)) for path, weight in pairs]


def load_pipeline(folder: str | Path, dtype: Any = jnp.float32, cache_dir: str | Path | None = None,
                  log: Callable[[str], None] = print, *, loras: Sequence[tuple[str | Path, float]] = (),
                  coordinator_address: str | None = None, num_processes: int | None = None,
                  process_id: int | None = None) -> SDXLPipeline:
    """An SDXL pipeline from a diffusers folder (converted once and cached under `cache_dir`,
    default `$JAXFUSE_CACHE` or ~/.cache/jaxfuse) or from a converted folder. A cache entry is
    checked against its manifest first; a damaged one raises `checkpoint.CacheError`, naming the
    folder to delete.

    `loras`: (safetensors file, weight) pairs, diffusers/PEFT or kohya (`jaxfuse.lora`), fused into
    the UNet's and text encoders' weights after loading; each is checked against the model before
    any weight is read, and raises `lora.LoraError` (a ValueError) listing what does not fit.

    Across hosts, every process calls it with the same folder and its own place in the run
    (`jax.distributed.initialize`'s arguments; none in a cluster JAX recognises by itself), before
    anything else uses JAX; generating then spreads the image over every process's devices.
    """
    spec = PipelineSpec.read(folder)
    lora_updates = plan_loras(spec, loras)
    initialize_processes(ProcessLayout(coordinator_address, num_processes, process_id))
    folder, source, cache = spec.folder, spec.folder, None
    # Across processes each one converts for itself: the cache's orbax checkpoint would make every
    # process write and wait for the others.
    if not spec.converted and jax.process_count() == 1:
        cache = checkpoint.cache_folder(folder, dtype, cache_dir)
        if cache.is_dir():  # only a finished entry is renamed to this name (`checkpoint.save_pipeline`)
            log(f"loading converted weights from the cache {cache}")
            source = cache
        else:
            log(f"converting {folder} to JAX once; the converted weights are cached in {cache}")

    start = time.perf_counter()
    if source is cache:
        models = checkpoint.read_cache(cache, lambda entry: load_models(spec, entry, dtype))
    else:
        models = load_models(spec, source, dtype)
        if cache is not None:
            # When another process cached the same model meanwhile, its entry is kept: same values as ours.
            try:
                checkpoint.save_pipeline(folder, cache, {c: params for c, (_, params) in models.items()})
            except OSError as e:  # the weights are loaded: a cache that cannot be written costs the next run only
                log(f"warning: the converted weights could not be cached ({e}); the next run converts again.")
    if lora_updates:  # after the cache: an entry holds the model's own weights only
        fused = lora.fuse({c: models[c][1] for c in lora.COMPONENTS}, lora_updates)
        models.update({c: (models[c][0], fused[c]) for c in lora.COMPONENTS})
        log("fused " + ", ".join(f"{path.name} ({len(updates)} modules)" for path, updates in lora_updates))
    log(f"loaded the model in {time.perf_counter() - start:.1f} s")

    # The fast tokenizer reads a tokenizer folder of either layout (`spec.TOKENIZER_FILES`). In transformers 5
    # it is the `CLIPTokenizer` diffusers loads; in 4, `CLIPTokenizer` is a slow one that reads the classic pair only.
    encoders = [TextEncoder(CLIPTokenizerFast.from_pretrained(folder / tokenizer, local_files_only=True),
                            *models[model])
                for tokenizer, model in zip(checkpoint.TOKENIZERS, ("text_encoder", "text_encoder_2"))]
    return SDXLPipeline(spec, *models["unet"], *models["vae"], encoders, dtype,
                        [(path, updates[0].weight) for path, updates in lora_updates])
