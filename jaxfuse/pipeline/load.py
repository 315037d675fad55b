"""Loading a pipeline: its models from a diffusers folder or the converted-weights cache, LoRAs
planned against the model and fused, the weights checked finite; and joining the processes of a
multi-host run (`start_processes`), which the caller does before anything starts JAX."""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from transformers import CLIPTokenizerFast

from jaxfuse import checkpoint, lora
from jaxfuse.clip_tokenizer import shipped_tokenizer, write_tokenizer_folder
from jaxfuse.config import UNetConfig, VAEConfig
from jaxfuse.models import clip as clip_model
from jaxfuse.models import unet as unet_model
from jaxfuse.models import vae as vae_model
from jaxfuse.models.clip import load_text_encoder
from jaxfuse.models.controlnet import load_controlnet
from jaxfuse.models.unet import load_unet
from jaxfuse.models.vae import load_vae
from jaxfuse.parallel.mesh import ProcessLayout, initialize_processes
from jaxfuse.pipeline.request import NonFiniteError
from jaxfuse.pipeline.sdxl import SDXLPipeline
from jaxfuse.pipeline.text import TextEncoder
from jaxfuse.runtime.programs import Programs
from jaxfuse.sampling.denoiser import ControlNet
from jaxfuse.single_file import SCHEDULER_CONFIG, SingleFile
from jaxfuse.spec import PipelineSpec
from jaxfuse.text_encoder_config import TextEncoderConfig
from jaxfuse.weight_conversion import convert_checkpoint

LOADERS = {"unet": load_unet, "vae": load_vae, "text_encoder": load_text_encoder, "text_encoder_2": load_text_encoder}


def start_processes(coordinator_address: str | None = None, num_processes: int | None = None,
                    process_id: int | None = None, timeout_s: int = 300) -> None:
    """Joins the processes of a multi-host run (`jax.distributed.initialize`), before anything
    else uses JAX: every process calls it with its place in the run (none of the three in a
    cluster JAX recognises by itself: a TPU pod slice, SLURM). A pipeline then spreads an image
    over every process's devices. `python -m jaxfuse.generate` calls it from its flags."""
    initialize_processes(ProcessLayout(coordinator_address, num_processes, process_id, timeout_s))


# What builds each model from a config dict: its config's reader, its module, its abstract tree, and the
# checkpoint's extras (buffers to skip, a prefix some files leave out), for single files.
MODELS = {"unet": (UNetConfig.from_diffusers, unet_model.UNet2DConditionModel, unet_model.abstract_params, ()),
          "vae": (VAEConfig.from_diffusers, vae_model.AutoencoderKL, vae_model.abstract_params, ()),
          **{c: (TextEncoderConfig.from_transformers, clip_model.CLIPTextEncoder, clip_model.abstract_params,
                 (clip_model.BUFFERS, clip_model.PREFIX)) for c in ("text_encoder", "text_encoder_2")}}


def convert_single_file(single: SingleFile, component: str, dtype: Any) -> tuple[Any, Any]:
    """(module, params) of one model of a single-file checkpoint, its parameters in `dtype`."""
    read_config, module, abstract_params, extras = MODELS[component]
    cfg = read_config(single.configs[component])
    return module(cfg, dtype), convert_checkpoint(single.checkpoint(component), abstract_params(cfg, dtype), *extras)


def load_models(spec: PipelineSpec, source: Path, dtype: Any) -> dict[str, tuple[Any, Any]]:
    """Each model stored with the pipeline `spec` describes, as (module, params), read from
    `source` (its folder or single file, or a converted copy of it) in the model's dtype
    (`PipelineSpec.dtypes`)."""
    dtypes = spec.dtypes(jnp.dtype(dtype))
    if source.is_file():
        return {c: convert_single_file(spec.single_file, c, dtypes[c]) for c in spec.stored_components}
    return {c: LOADERS[c](source / c, dtype=dtypes[c]) for c in spec.stored_components}


def load_vae_of(spec: PipelineSpec, dtype: Any) -> tuple[Any, Any]:
    """The VAE that replaces `spec`'s model's own (`PipelineSpec.with_vae`), from its folder or file."""
    vae_dtype = spec.dtypes(jnp.dtype(dtype))["vae"]
    if spec.vae_folder.is_file():
        return convert_single_file(SingleFile.read(spec.vae_folder), "vae", vae_dtype)
    return load_vae(spec.vae_folder, dtype=vae_dtype)


def save_converted(spec: PipelineSpec, dst: Path, models: dict[str, tuple[Any, Any]]) -> None:
    """The converted pipeline folder of `spec`'s folder or single file with the loaded `models`
    at `dst` (`checkpoint.save_pipeline`): what the cache holds and the conversion command writes."""
    params = {c: tree for c, (_, tree) in models.items()}
    if spec.single_file is None:
        checkpoint.save_pipeline(spec.folder, dst, params)
        return
    with tempfile.TemporaryDirectory() as layout:
        write_single_file_layout(spec, Path(layout))
        checkpoint.save_pipeline(Path(layout), dst, params)


def write_single_file_layout(spec: PipelineSpec, dst: Path) -> None:
    """The small files of the diffusers pipeline folder `spec`'s single file amounts to (model
    index, scheduler, model configs, the shipped tokenizers) at `dst`: what a converted copy
    (`checkpoint.save_pipeline`) takes beside the weights."""
    single = spec.single_file
    files = {"model_index.json": single.model_index(), "scheduler/scheduler_config.json": SCHEDULER_CONFIG,
             **{f"{c}/{checkpoint.CONFIG_NAME}": single.configs[c] for c in spec.stored_components}}
    for name, content in files.items():
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        (dst / name).write_text(json.dumps(content, indent=2))
    for tokenizer in spec.tokenizers:
        write_tokenizer_folder(dst / tokenizer, tokenizer)


def plan_loras(spec: PipelineSpec, loras: Sequence[tuple[str | Path, float]]) -> list[tuple[Path, list]]:
    """Each (LoRA file, weight) checked against the model's parameter shapes, from the config
    files and the LoRA's header, and its tensors checked finite: (file, its `lora.LoraUpdate`s)."""
    pairs = lora.checked_loras(loras)
    if not pairs:
        return []
    abstract = {"unet": unet_model.abstract_params(spec.unet)}
    for component in spec.encoders:
        abstract[component] = clip_model.abstract_params(spec.text_encoder_config(component))
    return [(path, lora.plan_lora(path, weight, abstract)) for path, weight in pairs]


def check_weights_finite(programs: Programs, named: dict[str, Any]) -> None:
    """Raises `NonFiniteError` naming the first parameters of `named` (model name -> tree) that
    hold NaN or infinity, checked on the devices."""
    flags = programs.run("weights_finite", lambda tree: jax.tree.map(lambda x: jnp.isfinite(x).all(), tree), named)
    bad = ["/".join(str(getattr(k, "key", k)) for k in path)
           for path, ok in jax.tree_util.tree_flatten_with_path(flags)[0] if not ok]
    if bad:
        raise NonFiniteError(f"the model's weights hold NaN or infinity in {len(bad)} tensors ({', '.join(bad[:5])}"
                             f"{', ...' if len(bad) > 5 else ''}); the checkpoint is damaged: restore it from "
                             "its original copy.")


def checked_pipeline(spec: PipelineSpec, models: dict[str, tuple[Any, Any]], encoders: Sequence[TextEncoder],
                     dtype: Any, loras: Sequence[tuple[Path, float]] = (), refiner: SDXLPipeline | None = None,
                     controlnets: Sequence[ControlNet] = ()) -> SDXLPipeline:
    """The pipeline of loaded `models` and `encoders`, its weights checked finite first."""
    pipe = SDXLPipeline(spec, *models["unet"], *models["vae"], encoders, dtype, loras, refiner, controlnets)
    check_weights_finite(pipe.programs, {"unet": pipe.denoiser.params, "vae": pipe.codec.params,
                                         **{f"text_encoder_{i}": e.params for i, e in enumerate(encoders)},
                                         **{f"controlnet_{i}": net.params for i, net in enumerate(controlnets)}})
    return pipe


def cached(source: Path, converted: bool, dtype: Any, cache_dir: str | Path | None, log: Callable[[str], None],
           what: str, load: Callable[[Path], Any], save: Callable[[Path, Any], None]) -> Any:
    """`load(source)`, or `load` of the converted-weights cache's entry for `source` when it holds
    one; else what `load(source)` gives is cached (`save(entry, loaded)`, on one process)."""
    cache = None
    # Across processes each one converts for itself: the cache's orbax checkpoint would make every
    # process write and wait for the others.
    if not converted and jax.process_count() == 1:
        cache = checkpoint.cache_folder(source, dtype, cache_dir)
        if cache.is_dir():  # only a finished entry is renamed to this name (`checkpoint.save_pipeline`)
            log(f"loading converted weights of {what} from the cache {cache}")
            return checkpoint.read_cache(cache, load)
        log(f"converting {what} to JAX once; the converted weights are cached in {cache}")
    loaded = load(source)
    if cache is not None:
        # When another process cached the same model meanwhile, its entry is kept: same values as ours.
        try:
            save(cache, loaded)
        except OSError as e:  # the weights are loaded: a cache that cannot be written costs the next run only
            log(f"warning: the converted weights could not be cached ({e}); the next run converts again.")
    return loaded


def read_models(spec: PipelineSpec, dtype: Any, cache_dir: str | Path | None,
                log: Callable[[str], None]) -> dict[str, tuple[Any, Any]]:
    """The models of `spec`'s folder, from the converted-weights cache when it holds them, else
    converted (and cached)."""
    return cached(spec.folder, spec.converted, dtype, cache_dir, log, str(spec.folder),
                  lambda source: load_models(spec, source, dtype), lambda entry, models: save_converted(spec, entry,
                                                                                                        models))


def read_controlnet(folder: Path, dtype: Any, cache_dir: str | Path | None, log: Callable[[str], None]) -> ControlNet:
    """A ControlNet from its folder, through the converted-weights cache as a pipeline's models."""
    def save(entry, net):
        checkpoint.save_pipeline(folder, entry, net.params, checkpoint.write_model)

    return cached(folder, (folder / checkpoint.PARAMS_DIR).is_dir(), dtype, cache_dir, log, f"the ControlNet {folder}",
                  lambda source: ControlNet(*load_controlnet(source, dtype)), save)


def load_models_of(spec: PipelineSpec, dtype: Any, cache_dir: str | Path | None,
                   log: Callable[[str], None]) -> dict[str, tuple[Any, Any]]:
    """The models of `spec`: its own from its folder or the cache (`read_models`), with the VAE
    that replaces its own when it names one."""
    own = spec
    if spec.vae_folder is not None and "vae" in spec.stored_components:  # the cache holds the model's own VAE
        own = PipelineSpec.read(spec.folder)
    models = read_models(own, dtype, cache_dir, log)
    if spec.vae_folder is not None:  # the replacement is read as it is
        models["vae"] = load_vae_of(spec, dtype)
        log(f"the VAE from {spec.vae_folder}")
    return models


def text_encoders(spec: PipelineSpec, models: dict[str, tuple[Any, Any]]) -> list[TextEncoder]:
    """Each text encoder of `spec` with its tokenizer."""
    # The fast tokenizer reads a tokenizer folder of either layout (`spec.TOKENIZER_FILES`). In transformers 5
    # it is the `CLIPTokenizer` diffusers loads; in 4, `CLIPTokenizer` is a slow one that reads the classic pair only.
    # A single file holds no tokenizer: it takes CLIP's, shipped with jaxfuse.
    return [TextEncoder(shipped_tokenizer(tokenizer) if spec.single_file is not None else
                        CLIPTokenizerFast.from_pretrained(spec.folder / tokenizer, local_files_only=True),
                        *models[model])
            for tokenizer, model in zip(spec.tokenizers, spec.encoders)]


def load_pipeline(folder: str | Path, dtype: Any = jnp.float32, cache_dir: str | Path | None = None,
                  log: Callable[[str], None] = print, *, loras: Sequence[tuple[str | Path, float]] = (),
                  vae: str | Path | None = None, refiner: str | Path | None = None,
                  controlnets: Sequence[str | Path] = (), **processes: Any) -> SDXLPipeline:
    """An SDXL pipeline from a diffusers folder (converted once and cached under `cache_dir`,
    default `$JAXFUSE_CACHE` or ~/.cache/jaxfuse) or from a converted folder. A cache entry is
    checked against its manifest first; a damaged one raises `checkpoint.CacheError`, naming the
    folder to delete. Weights that hold NaN or infinity raise `NonFiniteError`. The folder may be
    SDXL's refiner: it then runs image to image alone (`image=`, `strength=`).

    `vae`: a diffusers VAE folder (or a pipeline folder holding one) used in place of the model's
    own (and the refiner's), such as SDXL's fp16-fix VAE; checked against the UNet before any
    weight is read.

    `refiner`: a pipeline folder of SDXL's refiner (or any model sharing this one's latents) that
    finishes the images a request names `refiner_start` for (diffusers' ensemble of experts).

    `controlnets`: diffusers ControlNet folders (`config.json` and its safetensors, as the public
    SDXL ControlNets are saved) that run beside the UNet when a request gives control images
    (`control_image=`, one per ControlNet); each checked against the UNet before any weight is
    read, converted once and cached as the model.

    `loras`: (safetensors file, weight) pairs, diffusers/PEFT or kohya (`jaxfuse.lora`), fused into
    the UNet's and text encoders' weights after loading (the model's, not the refiner's); each is
    checked against the model before any weight is read, and raises `lora.LoraError` (a
    ValueError) listing what does not fit.

    Across hosts, every process calls `start_processes` first, then this with the same folder.
    (`coordinator_address`, `num_processes` and `process_id` here still start them, with a
    DeprecationWarning, until the next release.)
    """
    spec = PipelineSpec.read(folder, vae).with_controlnets(controlnets)
    if refiner is not None:
        spec = spec.with_refiner(PipelineSpec.read(refiner))
    lora_updates = plan_loras(spec, loras)
    if processes:
        warnings.warn("load_pipeline(coordinator_address=..., num_processes=..., process_id=...) is deprecated: "
                      "call jaxfuse.start_processes(...) before loading.", DeprecationWarning, stacklevel=2)
        start_processes(**processes)
    start = time.perf_counter()
    models = load_models_of(spec, dtype, cache_dir, log)
    if lora_updates:  # after the cache: an entry holds the model's own weights only
        fused = lora.fuse({c: models[c][1] for c in lora.COMPONENTS if c in models}, lora_updates)
        models.update({c: (models[c][0], fused[c]) for c in fused})
        log("fused " + ", ".join(f"{path.name} ({len(updates)} modules)" for path, updates in lora_updates))
    finisher = None
    if spec.refiner is not None:
        refiner_models = load_models_of(spec.refiner, dtype, cache_dir, log)
        finisher = checked_pipeline(spec.refiner, refiner_models, text_encoders(spec.refiner, refiner_models), dtype)
        log(f"the refiner from {spec.refiner.folder}")
    nets = [read_controlnet(path, dtype, cache_dir, log) for path, _ in spec.controlnets]
    log(f"loaded the model in {time.perf_counter() - start:.1f} s")
    fused = [(path, updates[0].weight) for path, updates in lora_updates]
    return checked_pipeline(spec, models, text_encoders(spec, models), dtype, fused, finisher, nets)
