"""Model weights on disk: find, read (safetensors only), match against a model's abstract
parameter tree, convert, and save or load the converted (orbax) form; imports no model.

The mapping is one rule: a checkpoint name `a.0.b.weight` is the Flax path `a_0/b/<leaf>`, where
the leaf is whatever the model has there (`kernel` for linear and convolution weights, `scale`
for norm weights, `embedding` for embedding tables), and the tensor takes the target leaf's
layout: a convolution weight [O, I, kh, kw] becomes HWIO, a linear weight [O, I] becomes [I, O].
The expected tree comes from the model itself (`jax.eval_shape`, passed in by the model's
loader), and conversion fails, listing every difference, unless each tensor lands on exactly one
parameter of the same shape and every parameter is filled.

Weights are read with `safetensors` only; pickled `.bin`/`.ckpt` files are refused, never loaded.

A converted pipeline folder (`save_pipeline`) is a diffusers pipeline folder whose model folders
hold `config.json` and `params/` (orbax) instead of safetensors; the pipeline's cache and
`python -m checkpoints_conversion.convert_diffusers` both write it, and every loader reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from safetensors import safe_open

WEIGHTS_NAME = "diffusion_pytorch_model"
CONFIG_NAME = "config.json"
PARAMS_DIR = "params"  # the orbax checkpoint inside a converted folder
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
MAX_LISTED = 20
# Flax's names for what PyTorch calls `weight`: linear/convolution, norm, embedding table.
WEIGHT_LEAVES = ("kernel", "scale", "embedding")


class ConversionError(ValueError):
    """A checkpoint that does not fit the model; the message lists every mismatch."""


def find_weight_files(folder: Path, variant: str | None = None, weights_name: str = WEIGHTS_NAME) -> list[Path]:
    """The safetensors files of `folder`: one file, or the shards named by its index.

    `weights_name` is the file stem: `diffusion_pytorch_model` for diffusers models, `model` for
    transformers ones. Without `variant`, the full-precision file is preferred and the `fp16`
    variant taken when it is the only one.
    """
    variants = [variant] if variant else [None, "fp16"]
    for v in variants:
        stem = f"{weights_name}.{v}" if v else weights_name
        single = folder / f"{stem}.safetensors"
        if single.is_file():
            return [single]
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} names shard files that are not there: {missing}")
            return [folder / s for s in shards]
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ConversionError(
            f"{folder} holds only pickled weights ({', '.join(pickled)}); jaxfuse never unpickles "
            "files. Convert them to safetensors first, e.g. with diffusers: "
            "UNet2DConditionModel.from_pretrained(SRC).save_pretrained(DST, safe_serialization=True)."
        )
    wanted = f"{weights_name}.{variant}.safetensors" if variant else f"{weights_name}.safetensors"
    raise FileNotFoundError(f"{folder} has no {wanted} (nor a sharded .safetensors.index.json).")


class SafetensorsCheckpoint:
    """The tensors of some safetensors files, read one at a time; shapes known without reading."""

    def __init__(self, files: list[Path]):
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for path in files:
            with safe_open(path, framework="numpy") as f:
                for key in f.keys():
                    self.files[key] = path
                    self.shapes[key] = tuple(f.get_slice(key).get_shape())

    def read(self, key: str) -> np.ndarray:
        with safe_open(self.files[key], framework="numpy") as f:
            return f.get_tensor(key)


def flax_path(key: str) -> tuple[str, ...]:
    """`down_blocks.0.attentions.1.proj_in.weight` -> (`down_blocks_0`, `attentions_1`, `proj_in`, `weight`)."""
    path: list[str] = []
    for part in key.split("."):
        if part.isdigit() and path:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return tuple(path)


def flax_axes(ndim: int, leaf: str) -> tuple[int, ...]:
    """The transpose taking a PyTorch tensor to the layout of the Flax leaf it fills."""
    if leaf == "kernel" and ndim == 4:
        return (2, 3, 1, 0)  # convolution [O, I, kh, kw] -> [kh, kw, I, O]
    if leaf == "kernel" and ndim == 2:
        return (1, 0)  # linear [O, I] -> [I, O]
    return tuple(range(ndim))


# Module names that end in `_<digits>` in diffusers itself rather than by the `.N` renaming.
UNDERSCORE_NAMES = ("linear_1", "linear_2")


def checkpoint_name(path: tuple[str, ...]) -> str:
    """The inverse of `flax_path` for a parameter: (`down_blocks_0`, `resnets_1`, `conv1`,
    `kernel`) -> `down_blocks.0.resnets.1.conv1.weight`."""
    *module, leaf = path
    parts = [part if part in UNDERSCORE_NAMES else re.sub(r"_(\d+)$", r".\1", part) for part in module]
    return ".".join([*parts, "weight" if leaf in WEIGHT_LEAVES else leaf])


def export_checkpoint(params: Any) -> dict[str, np.ndarray]:
    """A Flax parameter tree -> {checkpoint name: tensor in PyTorch's layout}, the inverse of
    `convert_checkpoint` (as numpy arrays, in the parameters' dtype)."""
    tensors = {}
    for path, value in traverse_util.flatten_dict(params).items():
        value = np.asarray(value)
        tensors[checkpoint_name(path)] = value.transpose(np.argsort(flax_axes(value.ndim, path[-1])))
    return tensors


def match_checkpoint(shapes: Mapping[str, tuple[int, ...]], abstract: Any, buffers: tuple[str, ...] = (),
                     prefix: str = "") -> dict[str, tuple[str, ...]]:
    """Checkpoint name -> the Flax path it fills, for a parameter tree `abstract` (leaves with a
    `.shape`). Raises `ConversionError` listing every missing, unused and wrong-shaped tensor.

    `buffers`: last name parts of tensors that are not parameters and are skipped (e.g. the
    `position_ids` some CLIP checkpoints carry). `prefix`: a leading module name that some
    checkpoints leave out of every name (transformers 5 saves `CLIPTextModel` without
    `text_model.`); when no name starts with it, it is put in front of each.
    """
    targets = traverse_util.flatten_dict(abstract)
    add_prefix = bool(prefix) and not any(key.startswith(f"{prefix}.") for key in shapes)
    plan: dict[str, tuple[str, ...]] = {}
    unused: list[str] = []
    wrong_shape: dict[tuple[str, ...], str] = {}
    for key in sorted(shapes):
        *module, name = flax_path(f"{prefix}.{key}" if add_prefix else key)
        if name in buffers:
            continue
        if name == "weight":  # PyTorch's one name for what Flax calls by the layer's kind
            name = next((n for n in WEIGHT_LEAVES if (*module, n) in targets), "kernel")
        path = (*module, name)
        if path not in targets:
            unused.append(key)
            continue
        shape = tuple(shapes[key][i] for i in flax_axes(len(shapes[key]), name))
        if shape != tuple(targets[path].shape):
            wrong_shape[path] = (
                f"{key}: checkpoint {tuple(shapes[key])} gives {shape}, "
                f"model {'/'.join(path)} expects {tuple(targets[path].shape)}"
            )
            continue
        plan[key] = path
    filled = set(plan.values()) | set(wrong_shape)
    missing = ["/".join(p) for p in targets if p not in filled]
    if missing or unused or wrong_shape:
        raise ConversionError(
            "the checkpoint does not match the model config:"
            + _listing("missing in checkpoint (model parameters no tensor fills)", missing)
            + _listing("unused in checkpoint (tensors the model has no parameter for)", unused)
            + _listing("wrong shape", list(wrong_shape.values()))
        )
    return plan


def convert_checkpoint(checkpoint: SafetensorsCheckpoint, abstract: Any, buffers: tuple[str, ...] = (),
                       prefix: str = "") -> Any:
    """The parameter tree `abstract` (ShapeDtypeStruct leaves) filled from `checkpoint`; every
    name and shape is checked before any tensor is read (see `match_checkpoint`)."""
    plan = match_checkpoint(checkpoint.shapes, abstract, buffers, prefix)
    targets = traverse_util.flatten_dict(abstract)
    params = {}
    for key, path in plan.items():
        tensor = checkpoint.read(key).transpose(flax_axes(len(checkpoint.shapes[key]), path[-1]))
        params[path] = jnp.asarray(tensor.astype(targets[path].dtype))
    return traverse_util.unflatten_dict(params)


def _listing(title: str, items: list[str]) -> str:
    if not items:
        return ""
    shown = "".join(f"\n    {item}" for item in items[:MAX_LISTED])
    more = f"\n    ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"\n  {title}: {len(items)}{shown}{more}"


def component_folder(folder: str | Path, component: str) -> Path:
    """The folder of one model (`unet`, `vae`, ...): `folder` itself when it holds a config,
    else its `component/` subfolder, as in a diffusers pipeline folder."""
    folder = Path(folder).expanduser()
    if not (folder / CONFIG_NAME).is_file() and (folder / component / CONFIG_NAME).is_file():
        folder = folder / component
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{folder} has no {CONFIG_NAME}: pass a diffusers `{component}/` folder (or the pipeline "
            "folder holding one) or a folder made by `python -m checkpoints_conversion.convert_diffusers`."
        )
    return folder


def load_params(folder: Path, abstract: Any, variant: str | None = None, weights_name: str = WEIGHTS_NAME,
                buffers: tuple[str, ...] = (), prefix: str = "") -> Any:
    """The parameter tree `abstract` filled from a converted folder (orbax) or a diffusers /
    transformers one (see `find_weight_files` and `match_checkpoint` for the other arguments)."""
    if (folder / PARAMS_DIR).is_dir():
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore((folder / PARAMS_DIR).absolute(), abstract)
    files = find_weight_files(folder, variant, weights_name)
    return convert_checkpoint(SafetensorsCheckpoint(files), abstract, buffers, prefix)


def save_params(dst: Path, config_text: str, params: Any) -> None:
    """Writes a converted model folder: its config.json and the orbax checkpoint of `params`."""
    dst.mkdir(parents=True, exist_ok=True)
    (dst / CONFIG_NAME).write_text(config_text)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save((dst / PARAMS_DIR).absolute(), params)


# The parts of an SDXL pipeline folder.
MODEL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
TOKENIZERS = ("tokenizer", "tokenizer_2")
# Bump when the converted format changes, so old caches are not read.
CACHE_FORMAT = 1
CACHE_ENV = "JAXFUSE_CACHE"


def save_pipeline(folder: Path, dst: Path, params: dict[str, Any]) -> None:
    """A converted pipeline folder at `dst` from the diffusers pipeline `folder` and each model's
    converted `params`: model configs + orbax params, the rest copied. Written to a temporary name
    and renamed, so an interrupted run leaves no half folder behind."""
    partial = dst.with_name(dst.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for component, tree in params.items():
        save_params(partial / component, (folder / component / CONFIG_NAME).read_text(), tree)
    for component in (*TOKENIZERS, "scheduler"):
        shutil.copytree(folder / component, partial / component)
    shutil.copy2(folder / "model_index.json", partial / "model_index.json")
    (partial / "complete").write_text("")
    shutil.rmtree(dst, ignore_errors=True)
    partial.rename(dst)


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "jaxfuse")


def cache_folder(folder: Path, dtype: Any, cache_dir: str | Path | None = None) -> Path:
    """Where the converted copy of the pipeline `folder` in `dtype` is cached: named by a hash of
    every model file's name, size and modification time."""
    dtype = jnp.dtype(dtype)
    digest = hashlib.sha256(f"{CACHE_FORMAT} {dtype.name}".encode())
    for component in MODEL_COMPONENTS:
        for path in sorted((folder / component).iterdir()):
            stat = path.stat()
            digest.update(f"{component}/{path.name} {stat.st_size} {stat.st_mtime_ns}".encode())
    return Path(cache_dir or default_cache_dir()) / f"{folder.name}-{digest.hexdigest()[:16]}"
