"""What a pipeline folder holds, read from its small config files alone, and the checks of the
values a request gives (`jaxfuse.pipeline.request` builds requests with them), before any weight is
loaded or anything is compiled."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxfuse import schedulers
from jaxfuse.checkpoint import CONFIG_NAME, PARAMS_DIR, TOKENIZERS, component_folder
from jaxfuse.config import ConfigError, ControlNetConfig, ParallelConfig, UNetConfig, VAEConfig
from jaxfuse.single_file import SCHEDULER_CONFIG, SingleFile
from jaxfuse.text_encoder_config import TextEncoderConfig
from jaxfuse.weight_conversion import PICKLE_SUFFIXES


class PipelineError(ValueError):
    """A model folder or a request the pipeline cannot serve; the message names the fix."""


# The files a tokenizer folder holds, in either of its two layouts: CLIP's BPE tables as the classic
# pair, or in the one `tokenizer.json` (all that transformers 5 saves). `CLIPTokenizerFast` reads both.
TOKENIZER_FILES = (("tokenizer_config.json", "vocab.json", "merges.txt"), ("tokenizer_config.json", "tokenizer.json"))
TOKENIZER_LAYOUTS = "tokenizer_config.json with either tokenizer.json or vocab.json and merges.txt"
# SDXL's text encoders, each with its tokenizer's folder. The refiner has the second one only.
TEXT_ENCODERS = dict(zip(("text_encoder", "text_encoder_2"), TOKENIZERS))


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


def read_config(path: Path) -> dict:
    """A config file's JSON, or one `PipelineError` naming the file."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path} is not valid JSON ({e}); restore it from the model's original copy.") from e


def indexed_encoders(index: dict) -> tuple[str, ...]:
    """The text encoders a `model_index.json` names (the refiner's names its absent first one [null, null])."""
    return tuple(e for e in TEXT_ENCODERS if (index.get(e) or [None])[0] is not None)


def read_vae(vae: str | Path) -> tuple[VAEConfig, Path]:
    """The config of a VAE given on its own: a diffusers VAE folder (or a pipeline folder holding
    one) or a single file holding a VAE (`jaxfuse.single_file`), and where it is."""
    path = Path(vae).expanduser()
    if path.is_file() or path.suffix in (".safetensors", *PICKLE_SUFFIXES):
        single = SingleFile.read(path)
        if "vae" not in single.components():
            raise PipelineError(f"the VAE {vae} holds no VAE tensors ({', '.join(single.components())}): pass a VAE "
                                "file or folder.")
        return VAEConfig.from_diffusers(single.configs["vae"]), path
    try:
        folder = component_folder(path, "vae")
    except FileNotFoundError:
        raise PipelineError(f"the VAE {vae} holds no {CONFIG_NAME}: pass a diffusers VAE folder ({CONFIG_NAME} "
                            "and its safetensors), a pipeline folder holding vae/, or a single-file VAE "
                            "(.safetensors).") from None
    return VAEConfig.from_diffusers(read_config(folder / CONFIG_NAME)), folder


def read_controlnet(folder: str | Path, unet: UNetConfig) -> ControlNetConfig:
    """The config of a diffusers ControlNet folder (`config.json` beside its weights, as the public
    SDXL ControlNets are saved) or a converted one, checked to fit `unet`: its residuals must have
    the shapes of the UNet's skips, and it reads the same text and micro-conditioning."""
    path = Path(folder).expanduser() / CONFIG_NAME
    if not path.is_file():
        raise PipelineError(f"the ControlNet {folder} has no {CONFIG_NAME}: pass a diffusers ControlNet folder "
                            "(config.json and diffusion_pytorch_model.safetensors).")
    try:
        cfg = ControlNetConfig.from_diffusers(read_config(path))
    except ConfigError as e:
        raise PipelineError(f"the ControlNet {folder}: {e}") from None
    if cfg.conditioning_channels != 3:
        raise PipelineError(f"the ControlNet {folder} reads control images of {cfg.conditioning_channels} channels; "
                            "jaxfuse passes RGB images (3).")
    fields = ("block_out_channels", "layers_per_block", "in_channels", "cross_attention_dim", "addition_embed_type",
              "projection_class_embeddings_input_dim")
    wrong = [f"{name} {getattr(cfg.unet, name)} (the UNet's: {getattr(unet, name)})" for name in fields
             if getattr(cfg.unet, name) != getattr(unet, name)]
    if wrong:
        raise PipelineError(f"the ControlNet {folder} was made for another model: {'; '.join(wrong)}. Pass a "
                            "ControlNet trained for this model (an SDXL ControlNet for SDXL).")
    return cfg


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """What a pipeline folder or a single-file checkpoint holds, read from its small config files
    (or the file's header) alone, so a request can be checked before any weight is loaded."""

    folder: Path  # the pipeline folder, or the single file
    unet: UNetConfig
    vae: VAEConfig
    scheduler: schedulers.SchedulerConfig
    force_zeros_for_empty_prompt: bool
    converted: bool  # every model folder holds orbax params already
    vae_folder: Path | None = None  # a VAE (folder or file) that replaces the model's own (`with_vae`)
    encoders: tuple[str, ...] = tuple(TEXT_ENCODERS)  # the text encoders it has: the refiner has the second only
    requires_aesthetics_score: bool = False  # the refiner's micro-conditioning: an aesthetic score for a crop
    refiner: PipelineSpec | None = None  # a model that finishes this one's images (`with_refiner`)
    single_file: SingleFile | None = dataclasses.field(default=None, repr=False)  # when the model is one file
    controlnets: tuple[tuple[Path, ControlNetConfig], ...] = ()  # (folder, config) of each ControlNet beside it

    @classmethod
    def read(cls, model: str | Path, vae: str | Path | None = None) -> PipelineSpec:
        """The spec of a diffusers pipeline folder or a single-file checkpoint in Stability's
        layout (SDXL base, a fine-tune, or the refiner: which text encoders it has says which);
        with `vae`, of the model with that VAE (`with_vae`)."""
        path = Path(model).expanduser()
        if path.is_dir():
            spec = cls.of_folder(path)
        elif path.is_file() or path.suffix in (".safetensors", *PICKLE_SUFFIXES):
            spec = cls.of_file(path, vae)
        else:
            raise PipelineError(f"{path}: no such folder or file; pass a diffusers SDXL pipeline folder or a "
                                "single-file SDXL checkpoint (.safetensors).")
        return spec if vae is None else spec.with_vae(vae)

    @classmethod
    def of_folder(cls, folder: Path) -> PipelineSpec:
        if not (folder / "model_index.json").is_file():
            raise PipelineError(f"{folder} is not an SDXL pipeline folder: missing model_index.json.")
        index = read_config(folder / "model_index.json")
        encoders = indexed_encoders(index)
        wanted = ["scheduler/scheduler_config.json", *(f"{c}/{CONFIG_NAME}" for c in ("unet", "vae", *encoders))]
        missing = [name for name in wanted if not (folder / name).is_file()]
        lacking = []
        for t in (TEXT_ENCODERS[e] for e in encoders):  # what the layout the folder comes nearest to lacks
            lacking += min(([f"{t}/{name}" for name in layout if not (folder / t / name).is_file()]
                            for layout in TOKENIZER_FILES), key=len)  # (the classic one on a tie)
        if missing or lacking or not encoders:
            why = f" A tokenizer folder holds {TOKENIZER_LAYOUTS}." if lacking else ""
            what = (f"missing {', '.join(missing + lacking)}" if missing or lacking
                    else "its model_index.json names no text encoder")
            raise PipelineError(f"{folder} is not an SDXL pipeline folder: {what}." + why)
        return cls.of_configs(folder, index, read_config(folder / "unet" / CONFIG_NAME),
                              VAEConfig.from_diffusers(read_config(folder / "vae" / CONFIG_NAME)),
                              read_config(folder / "scheduler/scheduler_config.json"),
                              converted=all((folder / c / PARAMS_DIR).is_dir() for c in ("unet", "vae", *encoders)))

    @classmethod
    def of_file(cls, path: Path, vae: str | Path | None) -> PipelineSpec:
        """A single file's spec (`jaxfuse.single_file`): the configs its tensors' names and shapes
        give; one that holds no VAE needs `vae`."""
        single = SingleFile.read(path)
        if single.kind == "vae":
            raise PipelineError(f"{path} is a VAE alone: pass it as the VAE of a model (--vae, load_pipeline(vae=)).")
        if "vae" in single.configs:
            vae_config = VAEConfig.from_diffusers(single.configs["vae"])
        elif vae is not None:
            vae_config = read_vae(vae)[0]
        else:
            raise PipelineError(f"{path} holds no VAE: pass one with --vae (load_pipeline(vae=)): a diffusers VAE "
                                "folder or a single-file VAE, e.g. SDXL's VAE or its fp16-fix.")
        return cls.of_configs(path, single.model_index(), single.configs["unet"], vae_config, SCHEDULER_CONFIG,
                              converted=False, single_file=single)

    @classmethod
    def of_configs(cls, folder: Path, index: dict, unet: dict, vae: VAEConfig, scheduler: dict, converted: bool,
                   single_file: SingleFile | None = None) -> PipelineSpec:
        """The spec of a model from its `model_index.json`, its UNet's and scheduler's configs and its VAE's."""
        return cls(
            folder=folder,
            unet=UNetConfig.from_diffusers(unet),
            vae=vae,
            scheduler=schedulers.SchedulerConfig.from_diffusers(scheduler),
            force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
            converted=converted,
            encoders=indexed_encoders(index),
            requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)),
            single_file=single_file,
        )

    @property
    def components(self) -> tuple[str, ...]:
        """Its models' folder names."""
        return ("unet", "vae", *self.encoders)

    @property
    def tokenizers(self) -> tuple[str, ...]:
        """The tokenizer folder of each text encoder, in order."""
        return tuple(TEXT_ENCODERS[e] for e in self.encoders)

    @property
    def stored_components(self) -> tuple[str, ...]:
        """Its models whose weights are in its folder or file (a single file may lack the VAE)."""
        if self.single_file is None:
            return self.components
        return tuple(c for c in self.components if c in self.single_file.components())

    def text_encoder_config(self, component: str) -> TextEncoderConfig:
        if self.single_file is not None:
            return TextEncoderConfig.from_transformers(self.single_file.configs[component])
        return TextEncoderConfig.from_transformers(read_config(self.folder / component / CONFIG_NAME))

    def with_vae(self, vae: str | Path) -> PipelineSpec:
        """This model with the VAE in `vae` (see `read_vae`) in place of its own, e.g. SDXL's
        fp16-fix VAE; checked against the UNet. A refiner takes it too: it decodes the images it
        finishes."""
        cfg, where = read_vae(vae)
        if cfg.latent_channels != self.unet.in_channels:
            raise PipelineError(f"the VAE {vae} makes latents of {cfg.latent_channels} channels; this model's UNet "
                                f"reads {self.unet.in_channels}: pass a VAE made for it.")
        refiner = None if self.refiner is None else self.refiner.with_vae(vae)
        return dataclasses.replace(self, vae=cfg, vae_folder=where, refiner=refiner)

    def with_refiner(self, refiner: PipelineSpec) -> PipelineSpec:
        """This model with `refiner` finishing its images (diffusers' ensemble of experts: this
        model denoises the first part of the schedule, the refiner the rest); checked to share
        its latent space."""
        if refiner.refiner is not None:
            raise PipelineError(f"the refiner {refiner.folder} has a refiner of its own; pass a plain model.")
        for what, ours, theirs in (("latent channels", self.unet.in_channels, refiner.unet.in_channels),
                                   ("VAE factor", self.vae_factor, refiner.vae_factor)):
            if ours != theirs:
                raise PipelineError(f"the refiner {refiner.folder} has {theirs} {what}, this model {ours}: a refiner "
                                    "continues this model's latents, so it must share its VAE's latent space.")
        if self.vae_folder is not None:
            refiner = refiner.with_vae(self.vae_folder)
        return dataclasses.replace(self, refiner=refiner)

    def with_controlnets(self, folders: Sequence[str | Path]) -> PipelineSpec:
        """This model with the ControlNets in `folders` beside its UNet, each checked to fit it."""
        return dataclasses.replace(self, controlnets=tuple((Path(f).expanduser(), read_controlnet(f, self.unet))
                                                           for f in folders))

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
        return {c: vae_dtype if c == "vae" else dtype for c in self.components}


# Names that moved to `jaxfuse.pipeline.request`; importing them from here works for one more release.
MOVED_TO_REQUEST = {"Request", "Region", "Tiles", "checked_image", "DEFAULT_STEPS", "DEFAULT_STRENGTH",
                    "DEFAULT_BOOTSTRAP", "DEFAULT_WEIGHTING", "DEFAULT_REGION_WEIGHTING", "TILED_AREA", "MAX_SEED"}


def __getattr__(name: str) -> Any:
    if name not in MOVED_TO_REQUEST:
        raise AttributeError(f"module 'jaxfuse.spec' has no attribute {name!r}")
    warnings.warn(f"jaxfuse.spec.{name} moved to jaxfuse.pipeline.request.{name}; the old name goes in the next "
                  "release.", DeprecationWarning, stacklevel=2)
    # By name, not an import statement: the request module imports this one.
    return getattr(importlib.import_module("jaxfuse.pipeline.request"), name)
