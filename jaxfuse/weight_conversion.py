"""A safetensors checkpoint -> a model's Flax parameter tree, and back (`export_checkpoint`): find
and read the weight files, match their names and shapes against the model's abstract parameter
tree, convert; imports no model.

The mapping is one rule: a checkpoint name `a.0.b.weight` is the Flax path `a_0/b/<leaf>`, where
the leaf is whatever the model has there (`kernel` for linear and convolution weights, `scale`
for norm weights, `embedding` for embedding tables), and the tensor takes the target leaf's
layout: a convolution weight [O, I, kh, kw] becomes HWIO, a linear weight [O, I] becomes [I, O].
The expected tree comes from the model itself (`jax.eval_shape`, passed in by the model's
loader), and conversion fails, listing every difference, unless each tensor lands on exactly one
parameter of the same shape and every parameter is filled; it fails too, listing the tensors, on
a value that is NaN or infinite (in the file, or once cast to a narrower dtype).

Weights are read with `safetensors` only; pickled `.bin`/`.ckpt` files are refused, never loaded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open

WEIGHTS_NAME = "diffusion_pytorch_model"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
MAX_LISTED = 20
# Flax's names for what PyTorch calls `weight`: linear/convolution, norm, embedding table.
WEIGHT_LEAVES = ("kernel", "scale", "embedding")


class ConversionError(ValueError):
    """A checkpoint that does not fit the model, or a weight file that cannot be read; the message
    lists every mismatch or names the file."""


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
            "files. Convert them to safetensors first with the diffusers or transformers class its "
            "config.json names: CLASS.from_pretrained(SRC).save_pretrained(DST, safe_serialization=True)."
        )
    wanted = f"{weights_name}.{variant}.safetensors" if variant else f"{weights_name}.safetensors"
    raise FileNotFoundError(f"{folder} has no {wanted} (nor a sharded .safetensors.index.json).")


def open_safetensors(path: Path):
    """`safe_open(path)`, failing with a `ConversionError` that names the file: safetensors' own
    error ("header too large", "incomplete metadata") says neither which file nor what to do."""
    try:
        return safe_open(path, framework="numpy")
    except SafetensorError as e:
        raise ConversionError(f"{path} is not a readable safetensors file ({e}): it is truncated or damaged; "
                              "download it again, or save it again from the original model.") from None


class SafetensorsCheckpoint:
    """The tensors of some safetensors files, read one at a time; shapes known without reading."""

    def __init__(self, files: list[Path]):
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for path in files:
            with open_safetensors(path) as f:
                for key in f.keys():
                    self.files[key] = path
                    self.shapes[key] = tuple(f.get_slice(key).get_shape())

    def read(self, key: str) -> np.ndarray:
        with open_safetensors(self.files[key]) as f:
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
            + listing("missing in checkpoint (model parameters no tensor fills)", missing)
            + listing("unused in checkpoint (tensors the model has no parameter for)", unused)
            + listing("wrong shape", list(wrong_shape.values()))
        )
    return plan


def convert_checkpoint(checkpoint: SafetensorsCheckpoint, abstract: Any, buffers: tuple[str, ...] = (),
                       prefix: str = "") -> Any:
    """The parameter tree `abstract` (ShapeDtypeStruct leaves) filled from `checkpoint`; every
    name and shape is checked before any tensor is read (see `match_checkpoint`), and every value
    after: NaN or infinity, in the file or from a dtype too narrow for a value, is refused."""
    plan = match_checkpoint(checkpoint.shapes, abstract, buffers, prefix)
    targets = traverse_util.flatten_dict(abstract)
    params, nonfinite, overflow = {}, [], []
    for key, path in plan.items():
        source = checkpoint.read(key).transpose(flax_axes(len(checkpoint.shapes[key]), path[-1]))
        dtype = jnp.dtype(targets[path].dtype)
        with np.errstate(over="ignore"):  # a value beyond the dtype's range becomes infinity: listed below
            tensor = source.astype(dtype)
        if not np.isfinite(tensor).all():
            if np.isfinite(source).all():
                overflow.append(f"{key} in {checkpoint.files[key]}, as {dtype}")
            else:
                nonfinite.append(f"{key} in {checkpoint.files[key]}")
        params[path] = jnp.asarray(tensor)
    if nonfinite or overflow:
        raise ConversionError("the checkpoint's values must be finite, or every image it makes is NaN:"
                              + listing("tensors holding NaN or infinity (the file is damaged: restore it from its "
                                        "original copy)", nonfinite)
                              + listing("tensors with values beyond their dtype's range (convert to float32)",
                                        overflow))
    return traverse_util.unflatten_dict(params)


def listing(title: str, items: list[str]) -> str:
    """A titled, counted list of at most MAX_LISTED items for an error message ("" when empty)."""
    if not items:
        return ""
    shown = "".join(f"\n    {item}" for item in items[:MAX_LISTED])
    more = f"\n    ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"\n  {title}: {len(items)}{shown}{more}"
