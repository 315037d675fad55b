"""LoRA files fused into a pipeline's weights when it loads: a LoRA changes no compiled program.

Two formats, safetensors only (a pickled file is refused):

- diffusers/PEFT (`save_lora_weights`): `<component>.<module>.lora_A.weight` [r, in(, kh, kw)]
  and `<component>.<module>.lora_B.weight` [out, r(, 1, 1)] for the components unet,
  text_encoder and text_encoder_2. The scale is lora_alpha / r (lora_alpha / sqrt(r) with
  rsLoRA) from PEFT's config in the file's `lora_adapter_metadata`, per module by its
  `alpha_pattern`; without metadata, 1 (diffusers' convention).
- kohya: `lora_unet_<module>`, `lora_te1_<module>` (or `lora_te_`) and `lora_te2_<module>`, each
  with `.lora_down.weight`, `.lora_up.weight` and an optional scalar `.alpha` (scale alpha / r,
  1 without), the module's dots written as underscores; UNet modules in diffusers' names or in
  the original SGM UNet's (`input_blocks.4.1...`, `middle_block`, `output_blocks`), as SDXL
  LoRAs trained with kohya's scripts name them.

Each module's update, weight x scale x up @ down in float32, is added to its kernel in Flax's
layout. Every tensor of a file is used, or the file is refused with a list of the ones that are
not: unknown names, halves without their pair, wrong shapes. Other adapters (DoRA, LyCORIS's LoHa
and LoKr) are refused by name, and so is a file holding NaN or infinity, before any of the
model's weights is read; a weight that leaves a fused kernel non-finite is refused naming the LoRA
and its weight.
The converted-weights cache holds the weights without LoRAs, so no LoRA ever reaches a cache entry.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxfuse.single_file import sgm_blocks, sgm_name
from jaxfuse.weight_conversion import PICKLE_SUFFIXES, checkpoint_name, listing, open_safetensors

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_COMPONENTS = {"lora_unet": "unet", "lora_te1": "text_encoder", "lora_te": "text_encoder",
                    "lora_te2": "text_encoder_2"}
PEFT_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.lora_([AB])\.weight$")
KOHYA_KEY = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
METADATA_KEY = "lora_adapter_metadata"  # diffusers' key for PEFT's config in the safetensors header
# Adapters that are not LoRAs, by a part of their tensors' names: DoRA's magnitudes (PEFT's, and
# kohya's/LyCORIS's `dora_scale`), LyCORIS's Hadamard (LoHa) and Kronecker (LoKr) factors.
OTHER_ADAPTERS = {"lora_magnitude_vector": "DoRA", "dora_scale": "DoRA", "hada_w1_a": "LoHa", "lokr_w1": "LoKr"}


class LoraError(ValueError):
    """A LoRA file the pipeline cannot fuse; the message names the file and the tensors."""


@dataclasses.dataclass(frozen=True)
class LoraUpdate:
    """One module's low-rank update: W += weight x scale x up @ down, on the kernel at `path`."""

    component: str
    path: tuple[str, ...]
    down: str  # tensor names in the file
    up: str
    scale: float  # the file's own: alpha / r
    weight: float  # the user's


def module_kernels(abstract: Any) -> dict[str, tuple[str, ...]]:
    """diffusers/transformers module name -> the Flax path of its kernel, for a parameter tree.
    A text encoder's modules go by two names: transformers 4's `text_model.encoder...` (what
    LoRAs in the wild carry) and transformers 5's `encoder...`."""
    kernels = {checkpoint_name(path).removesuffix(".weight"): path
               for path in traverse_util.flatten_dict(abstract) if path[-1] == "kernel"}
    return kernels | {name.removeprefix("text_model."): path for name, path in kernels.items()
                      if name.startswith("text_model.")}


def kohya_names(component: str, kernels: Mapping[str, tuple[str, ...]]) -> dict[str, str]:
    """A kohya module name (dots as underscores, no prefix) -> the diffusers module name; the UNet's
    also under their SGM names."""
    names = {module.replace(".", "_"): module for module in kernels}
    if component == "unet":
        blocks = sgm_blocks(list(kernels))
        for module in kernels:
            if (sgm := sgm_name(module, blocks)) is not None:
                names[sgm.replace(".", "_")] = module
    return names


def peft_config(metadata: Mapping[str, str] | None) -> dict[str, Any]:
    """PEFT's config in a diffusers file's header, `<component>.<field>` keys ({} without one)."""
    return json.loads((metadata or {}).get(METADATA_KEY, "{}"))


def peft_alphas(config: Mapping[str, Any], component: str) -> tuple[Any, Mapping[str, float], bool]:
    """(lora_alpha or None, alpha_pattern, use_rslora) of `component` in PEFT's config."""
    own = {key.removeprefix(f"{component}."): value for key, value in config.items()
           if key.startswith(f"{component}.")}
    return own.get("lora_alpha"), own.get("alpha_pattern") or {}, bool(own.get("use_rslora"))


def other_adapters(keys: Sequence[str], config: Mapping[str, Any]) -> list[str]:
    """The kinds of adapter other than LoRA a file holds, by its tensors' names and PEFT's config."""
    kinds = {kind for key in keys for marker, kind in OTHER_ADAPTERS.items() if f".{marker}" in key}
    if any(name.rpartition(".")[2] == "use_dora" and value for name, value in config.items()):
        kinds.add("DoRA")
    return sorted(kinds)


def pattern_value(pattern: Mapping[str, float], module: str, default: Any) -> Any:
    """PEFT's per-module override: the entry whose key is the module name or ends it after a dot."""
    for key, value in pattern.items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def check_file(path: Path) -> None:
    """A LoRA file that exists and is not pickled (checked before anything loads)."""
    if path.suffix in PICKLE_SUFFIXES:
        raise LoraError(f"LoRA {path}: a pickled file ({path.suffix}) can run code when read and is refused; "
                        "use the .safetensors version of the LoRA.")
    if not path.is_file():
        raise LoraError(f"LoRA {path}: no such file.")


def checked_loras(loras: Any) -> list[tuple[Path, float]]:
    """`load_pipeline`'s `loras` as (file, weight) pairs, or a `LoraError` naming the entry."""
    pairs = []
    for entry in loras:
        if not (isinstance(entry, Sequence) and not isinstance(entry, str) and len(entry) == 2
                and isinstance(entry[0], (str, os.PathLike))):
            raise LoraError(f"loras must be (file, weight) pairs, got {entry!r}.")
        path, weight = entry
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise LoraError(f"LoRA {path}: the weight must be a finite number, got {weight!r}.")
        pairs.append((Path(path), float(weight)))
    return pairs


def plan_lora(path: Path, weight: float, abstract: Mapping[str, Any]) -> list[LoraUpdate]:
    """The updates the LoRA file at `path` makes at `weight` to the parameter trees `abstract`
    ({component: tree}, leaves with `.shape`), from its header, then its tensors checked finite.
    Raises `LoraError` listing every tensor it cannot use."""
    check_file(path)
    with open_safetensors(path) as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        metadata = f.metadata()
    config = peft_config(metadata)
    if kinds := other_adapters(list(shapes), config):
        raise LoraError(f"LoRA {path} is a {' and '.join(kinds)} adapter, which jaxfuse does not fuse (it adds a "
                        "plain LoRA's up @ down only); use a plain LoRA.")
    kernels = {c: module_kernels(tree) for c, tree in abstract.items()}
    kohya = {c: kohya_names(c, kernels[c]) for c in kernels}
    halves: dict[tuple[str, str], dict[str, str]] = {}  # (component, module) -> {down, up, alpha: key}
    unknown = []
    for key in sorted(shapes):
        if m := PEFT_KEY.match(key):
            component, module, part = m[1], m[2], {"A": "down", "B": "up"}[m[3]]
        elif (m := KOHYA_KEY.match(key)) and m[2] in kohya.get(KOHYA_COMPONENTS[m[1]], {}):
            component = KOHYA_COMPONENTS[m[1]]
            module, part = kohya[component][m[2]], KOHYA_PARTS[m[3]]
        else:
            unknown.append(key)
            continue
        if component not in kernels or module not in kernels[component]:
            unknown.append(key)
            continue
        halves.setdefault((component, module), {})[part] = key

    updates, unpaired, wrong, nonfinite = [], [], [], []
    for (component, module), keys in sorted(halves.items()):
        if not {"down", "up"} <= set(keys):
            unpaired += [f"{key} (its {'up' if 'down' in keys else 'down'} half is missing)" for key in keys.values()]
            continue
        down, up = shapes[keys["down"]], shapes[keys["up"]]
        kernel = abstract[component]
        for name in kernels[component][module]:
            kernel = kernel[name]
        rank = down[0]
        # The update in PyTorch's layout, [out, in(, kh, kw)], against the kernel's [(kh, kw,) in, out].
        expected = (kernel.shape[-1], kernel.shape[-2], *kernel.shape[:-2])
        if len(up) < 2 or up[1] != rank or any(n != 1 for n in up[2:]) or (up[0], *down[1:]) != expected:
            wrong.append(f"{keys['down']} {down} with {keys['up']} {up}: {module} needs [r, {expected[1]}"
                         f"{''.join(f', {n}' for n in expected[2:])}] and [{expected[0]}, r]")
            continue
        if "alpha" in keys:  # kohya
            scale = float(np.asarray(_read(path, keys["alpha"]))) / rank
        else:
            alpha, alpha_pattern, rslora = peft_alphas(config, component)
            alpha = pattern_value(alpha_pattern, module, alpha)
            scale = 1.0 if alpha is None else alpha / (math.sqrt(rank) if rslora else rank)
        if not math.isfinite(scale):
            nonfinite.append(keys.get("alpha", f"{component}.lora_alpha in {METADATA_KEY}"))
        updates.append(LoraUpdate(component, kernels[component][module], keys["down"], keys["up"], scale, weight))
    if unknown or unpaired or wrong:
        raise LoraError(f"LoRA {path} does not fit this model:"
                        + listing("tensors naming no module of the UNet or the text encoders", unknown)
                        + listing("halves without their pair", unpaired)
                        + listing("wrong shapes", wrong))
    if not updates:
        raise LoraError(f"LoRA {path} holds no LoRA tensors.")
    with open_safetensors(path) as f:  # a LoRA is small: read once here, again when fused
        nonfinite += [key for u in updates for key in (u.down, u.up) if not np.isfinite(f.get_tensor(key)).all()]
    nonfinite = list(dict.fromkeys(nonfinite))  # a PEFT alpha is shared by many modules
    if nonfinite:
        raise LoraError(f"LoRA {path} holds NaN or infinity, so the model would too:"
                        + listing("tensors", nonfinite) + "\n  the file is damaged: download or train it again.")
    return updates


def _read(path: Path, key: str) -> np.ndarray:
    with open_safetensors(path) as f:
        return f.get_tensor(key)


def kernel_delta(down: jax.Array, up: jax.Array) -> jax.Array:
    """up @ down in a Flax kernel's layout, float32: down [r, in(, kh, kw)] and up [out, r(, 1, 1)]
    (PyTorch's layout, as LoRA files hold them) -> [(kh, kw,) in, out]."""
    down, up = jnp.asarray(down, jnp.float32), jnp.asarray(up, jnp.float32)
    delta = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(up.shape[0], *down.shape[1:])
    return delta.T if delta.ndim == 2 else delta.transpose(2, 3, 1, 0)


def fuse(params: Mapping[str, Any], loras: Sequence[tuple[Path, list[LoraUpdate]]]) -> dict[str, Any]:
    """{component: tree} with every update of every (file, updates) added, in float32, each kernel
    then cast back to its dtype. Raises `LoraError` naming the LoRAs and their weights when a
    fused kernel is not finite (a weight too large for float32, or for the kernel's dtype)."""
    flat = {c: traverse_util.flatten_dict(tree) for c, tree in params.items()}
    deltas: dict[tuple[str, tuple[str, ...]], jax.Array] = {}
    sources: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for path, updates in loras:
        with open_safetensors(path) as f:
            for u in updates:
                key = (u.component, u.path)
                delta = kernel_delta(f.get_tensor(u.down), f.get_tensor(u.up))
                deltas[key] = deltas.get(key, 0) + u.weight * (u.scale * delta)
                sources.setdefault(key, []).append(f"{path} at weight {u.weight:g}")
    for (component, path), delta in deltas.items():
        kernel = flat[component][path]
        flat[component][path] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    finite = jax.device_get({key: jnp.isfinite(flat[key[0]][key[1]]).all() for key in deltas})
    bad = sorted(key for key, ok in finite.items() if not ok)
    if bad:
        culprits = ", ".join(dict.fromkeys(s for key in bad for s in sources[key]))
        kernels = ["/".join([component, *path]) for component, path in bad]
        raise LoraError(f"fusing LoRA {culprits} leaves NaN or infinity in the model's weights; lower the weight "
                        "(LoRAs are made for weights near 1)." + listing("kernels", kernels))
    return {c: traverse_util.unflatten_dict(tree) for c, tree in flat.items()}
