"""Text to image with SDXL: prompts -> text embeddings -> one compiled denoising scan -> VAE -> image.

    pipe = jaxfuse.load_pipeline("stable-diffusion-xl-base-1.0", dtype=jnp.bfloat16)
    images = pipe("a red circle at the top left", height=1024, width=1024, seed=0)

The result equals diffusers' `StableDiffusionXLPipeline` on the same weights and initial latents.
The denoising loop is one `jit` of `lax.scan` over the steps; the text encoders and the VAE are
jitted on their own.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from transformers import CLIPTokenizer

from checkpoints_conversion.convert_diffusers import CONFIG_NAME, PARAMS_DIR, save_params
from jaxfuse import schedulers
from jaxfuse.config import UNetConfig, VAEConfig
from jaxfuse.models.clip import load_text_encoder
from jaxfuse.models.layers import apply_patched
from jaxfuse.models.unet import load_unet
from jaxfuse.models.vae import AutoencoderKL, load_vae
from jaxfuse.parallel import patch as px
from jaxfuse.parallel.mesh import ROWS, ParallelConfig, ProcessLayout, gather, initialize_processes, make_mesh, place
from jaxfuse.parallel.patch import Mode, Patch

MODEL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
TOKENIZERS = ("tokenizer", "tokenizer_2")
# Bump when the converted format changes, so old caches are not read.
CACHE_FORMAT = 1
CACHE_ENV = "JAXFUSE_CACHE"


class PipelineError(ValueError):
    """A model folder or a request the pipeline cannot serve; the message names the fix."""


@flax.struct.dataclass
class Conditioning:
    """What the UNet reads besides the latents: [B', 77, context], [B', pooled], [B', 6]. With
    classifier-free guidance B' = 2B, the unconditional half first (diffusers' order)."""

    context: jax.Array
    text_embeds: jax.Array
    time_ids: jax.Array


@dataclasses.dataclass
class Generation:
    """The images [B, H, W, 3] float32 in [0, 1] and the seconds each phase took."""

    images: np.ndarray
    timings: dict[str, float]


@dataclasses.dataclass(frozen=True)
class Sampling:
    """The settings that shape the compiled denoising program (the rest are array arguments)."""

    use_guidance: bool  # guidance scale > 1: the UNet sees the unconditional and conditional batch
    use_rescale: bool  # guidance rescale > 0
    parallel: ParallelConfig = ParallelConfig()

    def phases(self, num_steps: int) -> list[tuple[Patch, int, int]]:
        """(the layers' view, first step, end step) of each run of steps alike: displaced (and
        pcpp) runs its warm-up steps synchronously, keeping their context for the steps after."""
        p = self.parallel
        if p.patch().displaced:
            warm = min(p.warmup_steps, num_steps)
            return [(p.patch(Mode.SYNC, record=True), 0, warm), (p.patch(), warm, num_steps)]
        return [(p.patch(), 0, num_steps)]


def sample_std(x: jax.Array, split: bool) -> jax.Array:
    """[B, ...] -> [B, 1, ...] unbiased standard deviation of each sample; of the whole image
    when its rows are split over the patches."""
    axes = tuple(range(1, x.ndim))
    mean, var = x.mean(axis=axes), x.var(axis=axes)
    count = np.prod(x.shape[1:])
    if split:
        mean, var = px.combine_moments(px.gather_moments(mean, var))
        count *= lax.axis_size(px.PATCH)
    return jnp.sqrt(var * count / (count - 1)).reshape((-1,) + (1,) * len(axes))


def guide(noise: jax.Array, scale: jax.Array, rescale: jax.Array, sampling: Sampling) -> jax.Array:
    """Classifier-free guidance on [2B, ...] predictions (unconditional half first) -> [B, ...].

    Rescaling mixes in the prediction rescaled to the conditional one's standard deviation
    (Lin et al. 2023, sec. 3.4), as diffusers' `guidance_rescale` does.
    """
    uncond, cond = jnp.split(noise.astype(jnp.float32), 2)
    guided = uncond + scale * (cond - uncond)
    if not sampling.use_rescale:
        return guided
    split = sampling.parallel.split
    ratio = sample_std(cond, split) / sample_std(guided, split)
    return rescale * guided * ratio + (1 - rescale) * guided


def denoise(unet, params, latents, cond: Conditioning, schedule, guidance_scale, guidance_rescale,
            sampling: Sampling, progress: Callable[..., None] | None = None) -> jax.Array:
    """The whole sampling loop: latents [B, 4, h, w] -> denoised latents, as one `lax.scan` per
    phase (`Sampling.phases`), with the "stale" context in the carry. Runs as it is on one
    device, or inside `shard_map` on each device's rows. `progress(i, total=n)` is called on the
    host after step i."""
    num_steps = schedule.timesteps.shape[0]
    cfg_parallel = sampling.parallel.cfg_parallel

    def one_step(patch, carry, i):
        x, state, stale = carry
        model_input = schedulers.scale_model_input(schedule, x, i)
        if sampling.use_guidance and not cfg_parallel:
            model_input = jnp.concatenate([model_input, model_input])
        noise, stale = apply_patched(unet, patch, params, stale, model_input, schedule.timesteps[i], cond.context,
                                     text_embeds=cond.text_embeds, time_ids=cond.time_ids)
        if cfg_parallel:
            noise = px.join_guidance_halves(noise)
        if sampling.use_guidance:
            noise = guide(noise, guidance_scale, guidance_rescale, sampling)
        x, state = schedulers.step(schedule, state, i, noise.astype(jnp.float32), x)
        if progress is not None:
            jax.debug.callback(functools.partial(progress, total=num_steps), i)
        return (x, state, stale)

    carry = (latents, schedulers.init_state(schedule, latents), None)
    for patch, start, stop in sampling.phases(num_steps):
        if start < stop and carry[2] is None and patch.writes_stale:
            carry = one_step(patch, carry, start)  # creates the stale context the scan carries
            start += 1
        step = functools.partial(one_step, patch)
        carry, _ = lax.scan(lambda c, i: (step(c, i), None), carry, jnp.arange(start, stop))
    return carry[0]


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
                  *(f"{c}/{CONFIG_NAME}" for c in MODEL_COMPONENTS),
                  *(f"{t}/tokenizer_config.json" for t in TOKENIZERS)]
        missing = [name for name in wanted if not (folder / name).is_file()]
        if missing:
            raise PipelineError(f"{folder} is not an SDXL pipeline folder: missing {', '.join(missing)}.")

        def config(name):
            return json.loads((folder / name).read_text())

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

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (batch, self.unet.in_channels, height // self.vae_factor, width // self.vae_factor)

    def check_request(self, height: int, width: int, num_steps: int, batch: int = 1,
                      latents_shape: tuple[int, ...] | None = None, patches: int = 1) -> None:
        """One clear error for a request that cannot run. Split over `patches` devices, the
        latent height must divide into equal patches that the UNet can halve at every level."""
        for name, size, f in (("height", height, self.size_multiple * patches), ("width", width, self.size_multiple)):
            if size <= 0 or size % f:
                why = (f"VAE factor {self.vae_factor} x UNet factor {self.unet.downsample_factor}"
                       + (f" x {patches} patches" if name == "height" and patches > 1 else ""))
                nearest = " or ".join(str(v) for v in (size // f * f, (size // f + 1) * f) if v > 0)
                raise PipelineError(f"{name} {size} must be a positive multiple of {f} ({why}); "
                                    f"nearest valid: {nearest}.")
        if num_steps < 1:
            raise PipelineError(f"steps must be at least 1, got {num_steps}.")
        expected = self.latent_shape(batch, height, width)
        if latents_shape is not None and tuple(latents_shape) != expected:
            raise PipelineError(f"latents have shape {tuple(latents_shape)}; {height}x{width} with batch "
                                f"{batch} needs {expected} (diffusers layout, unscaled noise).")

    def dtypes(self, dtype: jnp.dtype) -> dict[str, jnp.dtype]:
        """Each model's dtype. The VAE stays in float32 when its config says `force_upcast`
        (SDXL's VAE overflows in half precision)."""
        vae_dtype = jnp.dtype(jnp.float32) if self.vae.force_upcast else dtype
        return {"unet": dtype, "vae": vae_dtype, "text_encoder": dtype, "text_encoder_2": dtype}


class SDXLPipeline:
    """SDXL text to image; build it with `load_pipeline`."""

    def __init__(self, spec: PipelineSpec, unet, unet_params, vae, vae_params,
                 encoders: Sequence[TextEncoder], dtype: Any):
        self.spec = spec
        self.unet, self.unet_params = unet, unet_params
        self.vae, self.vae_params = vae, vae_params
        self.encoders = list(encoders)
        self.dtype = jnp.dtype(dtype)
        self._executables: dict[Any, Any] = {}
        self._compile_seconds = 0.0
        self._progress: Callable[[int, int], None] | None = None
        self._last_step = 0
        self._on_mesh: dict[Any, Any] = {}

    def _run(self, name: Any, fn: Callable, *args):
        """`jax.jit(fn)(*args)`, compiled once per `name` and argument shapes and kept; the time
        spent compiling is counted apart from the phase's own time."""
        leaves, tree = jax.tree.flatten(args)
        signature = (name, tree, tuple((np.shape(x), jnp.result_type(x)) for x in leaves))
        if signature not in self._executables:
            start = time.perf_counter()
            self._executables[signature] = jax.jit(fn).lower(*args).compile()
            self._compile_seconds += time.perf_counter() - start
        return self._executables[signature](*args)

    def _replicated(self, name: str, params: Any, mesh: Mesh) -> Any:
        """`params` copied to every device of `mesh`, once per mesh."""
        key = (name, mesh_key(mesh))
        if key not in self._on_mesh:
            self._on_mesh = {k: v for k, v in self._on_mesh.items() if k[0] != name}  # one mesh at a time
            self._on_mesh[key] = place(params, NamedSharding(mesh, P()))
        return self._on_mesh[key]

    def _step_done(self, i, total: int) -> None:
        """Host side of the denoising loop's per-step callback (which every device of a mesh
        makes: each step is reported once)."""
        step = int(i) + 1
        if self._progress is not None and step > self._last_step:
            self._last_step = step
            self._progress(step, total)

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
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 5.0, guidance_rescale: float = 0.0, seed: int = 0,
                 latents: np.ndarray | None = None, scheduler: str = "euler",
                 original_size: tuple[int, int] | None = None, crops_coords_top_left: tuple[int, int] = (0, 0),
                 target_size: tuple[int, int] | None = None, parallel: ParallelConfig = ParallelConfig(),
                 progress: Callable[[int, int], None] | None = None) -> Generation:
        """Runs the pipeline; `parallel` spreads the image over devices (default: one device);
        `progress(step, total)` is called after every denoising step."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        height, width = height or self.spec.default_size, width or self.spec.default_size
        self.spec.check_request(height, width, num_inference_steps, len(prompts),
                                None if latents is None else np.shape(latents), parallel.patches)
        kind = schedulers.SchedulerKind(scheduler)
        use_guidance = guidance_scale > 1.0
        if parallel.cfg_parallel and not use_guidance:
            raise PipelineError("cfg_parallel splits the guidance batch, but guidance_scale <= 1 has none; "
                                "drop --cfg-parallel or raise --guidance-scale.")
        sampling = Sampling(use_guidance, guidance_rescale > 0, parallel)
        mesh = make_mesh(parallel) if parallel.split else None
        self._compile_seconds, self._progress, self._last_step = 0.0, progress, 0
        timings: dict[str, float] = {}

        cond = self._timed(timings, "encode", lambda: self.conditioning(
            prompts, negative_prompt, use_guidance, (height, width), original_size, crops_coords_top_left,
            target_size))
        schedule = schedulers.make_schedule(kind, self.spec.scheduler, num_inference_steps)
        shape = self.spec.latent_shape(len(prompts), height, width)
        noise = (jnp.asarray(latents, jnp.float32) if latents is not None
                 else jax.random.normal(jax.random.key(seed), shape, jnp.float32))
        scales = (jnp.float32(guidance_scale), jnp.float32(guidance_rescale))
        x = self._timed(timings, "denoise", lambda: self.denoise(
            noise * schedule.init_noise_sigma, cond, schedule, scales, sampling, mesh))
        images = gather(self._timed(timings, "decode", lambda: self.decode(x, mesh)))
        return Generation(images, {"compile": self._compile_seconds, **timings})

    def _timed(self, timings: dict[str, float], phase: str, work: Callable[[], Any]) -> Any:
        """`work()`, finished; its seconds less the compiling it caused go to `timings[phase]`."""
        compiled_before, start = self._compile_seconds, time.perf_counter()
        result = jax.block_until_ready(work())
        timings[phase] = time.perf_counter() - start - (self._compile_seconds - compiled_before)
        return result

    def denoise(self, x, cond: Conditioning, schedule, scales, sampling: Sampling, mesh: Mesh | None) -> jax.Array:
        """Initial latents [B, 4, h, w] -> denoised latents; on `mesh`, split by rows."""
        loop = functools.partial(denoise, self.unet, sampling=sampling, progress=self._step_done)
        params = self.unet_params
        if mesh is not None:
            specs = (P(), ROWS, P(px.CFG) if sampling.parallel.cfg_parallel else P(), P(), P(), P())
            loop = jax.shard_map(loop, mesh=mesh, in_specs=specs, out_specs=ROWS)
            inputs = (x, cond, schedule, *scales)
            x, cond, schedule, *scales = [place(a, NamedSharding(mesh, spec)) for a, spec in zip(inputs, specs[1:])]
            params = self._replicated("unet", params, mesh)
        return self._run(("denoise", sampling), loop, params, x, cond, schedule, *scales)

    def __call__(self, prompt, negative_prompt=None, **kwargs) -> np.ndarray:
        """The images [B, H, W, 3] float32 in [0, 1]; see `generate` for the arguments."""
        return self.generate(prompt, negative_prompt, **kwargs).images

    def conditioning(self, prompts, negative_prompt, use_guidance, size, original_size,
                     crops_coords_top_left, target_size) -> Conditioning:
        """Text embeddings and SDXL micro-conditioning, unconditional half first when guiding."""
        context, pooled = self.encode_prompts(prompts)
        time_ids = jnp.asarray([*(original_size or size), *crops_coords_top_left, *(target_size or size)],
                               jnp.float32)
        time_ids = jnp.broadcast_to(time_ids, (len(prompts), time_ids.shape[0]))
        if use_guidance:
            if negative_prompt is None and self.spec.force_zeros_for_empty_prompt:
                neg_context, neg_pooled = jnp.zeros_like(context), jnp.zeros_like(pooled)
            else:
                if negative_prompt is None or isinstance(negative_prompt, str):
                    negatives = [negative_prompt or ""] * len(prompts)
                else:
                    negatives = list(negative_prompt)
                if len(negatives) != len(prompts):
                    raise PipelineError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; "
                                        "give one per prompt or a single string.")
                neg_context, neg_pooled = self.encode_prompts(negatives)
            context = jnp.concatenate([neg_context, context])
            pooled = jnp.concatenate([neg_pooled, pooled])
            time_ids = jnp.concatenate([time_ids, time_ids])
        return Conditioning(context.astype(self.dtype), pooled.astype(self.dtype), time_ids)

    def decode(self, latents: jax.Array, mesh: Mesh | None = None) -> jax.Array:
        """Latents [B, 4, h, w] -> images [B, H, W, 3] float32 in [0, 1]; on `mesh`, each device
        decodes its rows with synchronous patch parallelism."""
        cfg = self.spec.vae
        if cfg.latents_mean is not None and cfg.latents_std is not None:
            mean = jnp.asarray(cfg.latents_mean, jnp.float32).reshape(1, -1, 1, 1)
            std = jnp.asarray(cfg.latents_std, jnp.float32).reshape(1, -1, 1, 1)
            latents = latents * std / cfg.scaling_factor + mean
        else:
            latents = latents / cfg.scaling_factor
        vae = self.vae if mesh is None else self.vae.clone(patch=Patch(Mode.SYNC))

        def decode(params, z):
            return vae.apply({"params": params}, z, method=AutoencoderKL.decode)

        params = self.vae_params
        if mesh is not None:
            decode = jax.shard_map(decode, mesh=mesh, in_specs=(P(), ROWS), out_specs=ROWS)
            params = self._replicated("vae", params, mesh)
        image = self._run(("vae_decode", mesh_key(mesh)), decode, params, latents.astype(self.vae.dtype))
        return jnp.clip(jnp.transpose(image.astype(jnp.float32), (0, 2, 3, 1)) / 2 + 0.5, 0.0, 1.0)


def _source_hash(folder: Path, dtype: jnp.dtype) -> str:
    """A key for the converted copy: every model file's name, size and modification time."""
    digest = hashlib.sha256(f"{CACHE_FORMAT} {dtype.name}".encode())
    for component in MODEL_COMPONENTS:
        for path in sorted((folder / component).iterdir()):
            stat = path.stat()
            digest.update(f"{component}/{path.name} {stat.st_size} {stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "jaxfuse")


def load_pipeline(folder: str | Path, dtype: Any = jnp.float32, cache_dir: str | Path | None = None,
                  log: Callable[[str], None] = print, *, coordinator_address: str | None = None,
                  num_processes: int | None = None, process_id: int | None = None) -> SDXLPipeline:
    """An SDXL pipeline from a diffusers folder (converted once and cached under `cache_dir`,
    default `$JAXFUSE_CACHE` or ~/.cache/jaxfuse) or from a converted folder.

    Across hosts, every process calls it with the same folder and its own place in the run
    (`jax.distributed.initialize`'s arguments; none in a cluster JAX recognises by itself), before
    anything else uses JAX; generating then spreads the image over every process's devices.
    """
    spec = PipelineSpec.read(folder)
    initialize_processes(ProcessLayout(coordinator_address, num_processes, process_id))
    folder, dtype = spec.folder, jnp.dtype(dtype)
    source = folder
    cache = None
    # Across processes each one converts for itself: the cache's orbax checkpoint would make every
    # process write and wait for the others.
    if not spec.converted and jax.process_count() == 1:
        cache = Path(cache_dir or default_cache_dir()) / f"{folder.name}-{_source_hash(folder, dtype)}"
        if (cache / "complete").is_file():
            log(f"loading converted weights from the cache {cache}")
            source = cache
        else:
            log(f"converting {folder} to JAX once; the converted weights are cached in {cache}")

    start = time.perf_counter()
    loaders = {"unet": load_unet, "vae": load_vae, "text_encoder": load_text_encoder,
               "text_encoder_2": load_text_encoder}
    dtypes = spec.dtypes(dtype)
    models = {c: loaders[c](source / c, dtype=dtypes[c]) for c in MODEL_COMPONENTS}
    if cache is not None and source is folder:
        _write_cache(folder, cache, {c: params for c, (_, params) in models.items()})
    log(f"loaded the model in {time.perf_counter() - start:.1f} s")

    encoders = [TextEncoder(CLIPTokenizer.from_pretrained(folder / tokenizer, local_files_only=True), *models[model])
                for tokenizer, model in zip(TOKENIZERS, ("text_encoder", "text_encoder_2"))]
    return SDXLPipeline(spec, *models["unet"], *models["vae"], encoders, dtype)


def _write_cache(folder: Path, cache: Path, params: dict[str, Any]) -> None:
    """A converted pipeline folder: model configs + orbax params, the rest copied. Written to a
    temporary name and renamed, so an interrupted run leaves no half cache behind."""
    partial = cache.with_name(cache.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for component, tree in params.items():
        save_params(partial / component, (folder / component / CONFIG_NAME).read_text(), tree)
    for component in (*TOKENIZERS, "scheduler"):
        shutil.copytree(folder / component, partial / component)
    shutil.copy2(folder / "model_index.json", partial / "model_index.json")
    (partial / "complete").write_text("")
    shutil.rmtree(cache, ignore_errors=True)
    partial.rename(cache)
