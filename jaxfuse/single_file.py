"""A single-file SDXL checkpoint in Stability's original (SGM) layout, the file that diffusers'
`StableDiffusionXLPipeline.from_single_file` reads, seen as the diffusers/transformers models it holds;
imports no model.

The layout, by name prefix:
  model.diffusion_model.*                the UNet in SGM's names (input_blocks, middle_block, output_blocks)
  first_stage_model.*                    the VAE in the original autoencoder's names (encoder.down.N.block.M)
  conditioner.embedders.0.transformer.*  CLIP ViT-L, transformers' names after the prefix
  conditioner.embedders.1.model.*        OpenCLIP ViT-bigG; the refiner's file has it alone, as embedders.0
A VAE alone (sdxl_vae.safetensors: the autoencoder's names without a prefix, or diffusers') is read too.

`SingleFile.read` reads the header only and makes every check there: the kind of file, a name for each
tensor, the configs. Each model's tensors then keep their bytes: a diffusers/transformers name maps to a
`Source`, a tensor of the file and its layout (a third of OpenCLIP's fused q/k/v, OpenCLIP's transposed
text projection, a VAE attention's 1x1 convolution read as a linear weight), and `MappedCheckpoint`
reads them one at a time for `weight_conversion.convert_checkpoint`.

The UNet's SGM names are one table (`sgm_table`), which `jaxfuse.lora` uses too: kohya's LoRAs name
the UNet's modules in the SGM layout.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxfuse.config import ConfigError
from jaxfuse.single_file_configs import SCHEDULER_CONFIG as SCHEDULER_CONFIG
from jaxfuse.single_file_configs import check_configs, component_configs, model_index
from jaxfuse.weight_conversion import PICKLE_SUFFIXES, ConversionError, listing, open_safetensors

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
UNET, VAE, CLIP_L = "model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer."
OPEN_CLIP, REFINER_OPEN_CLIP = "conditioner.embedders.1.model.", "conditioner.embedders.0.model."
KINDS = {"sdxl": "an SDXL base (or fine-tune)", "sdxl-refiner": "an SDXL refiner", "vae": "an SDXL VAE"}
# Where each kind of file keeps each model: name prefix -> component.
LAYOUTS = {
    "sdxl": {UNET: "unet", VAE: "vae", CLIP_L: "text_encoder", OPEN_CLIP: "text_encoder_2"},
    "sdxl-refiner": {UNET: "unet", VAE: "vae", REFINER_OPEN_CLIP: "text_encoder_2"},
}
# Tensors that no model reads, skipped as diffusers skips them: CLIP's position ids (a buffer),
# OpenCLIP's contrastive logit scale and attention mask, SGM's denoiser sigmas, and the EMA copy
# (`model_ema.*`, its names without dots; diffusers reads the plain weights unless asked for these).
IGNORED = re.compile(r"model_ema\..*|denoiser\.sigmas|conditioner\.embedders\.\d\."
                     r"(transformer\.text_model\.embeddings\.position_ids|model\.(logit_scale|attn_mask))")

# A ResNet's parts in the SGM UNet.
SGM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
SGM_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
           "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2",
           "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
           "mid_block.resnets.1": "middle_block.2"}
# The original autoencoder's parts: a ResNet's, the mid attention's (q/k/v/proj_out 1x1 convolutions).
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# OpenCLIP's modules, and a transformer layer's (its attention's q/k/v are one fused in_proj).
OPEN_CLIP_MODULES = {"token_embedding": "text_model.embeddings.token_embedding",
                     "ln_final": "text_model.final_layer_norm"}
OPEN_CLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
QKV = ("q_proj", "k_proj", "v_proj")


class SingleFileError(ValueError):
    """A single-file checkpoint jaxfuse cannot read; the message names the file, what is wrong and the fix."""


def sgm_table(down_layers: Sequence[int], up_layers: Sequence[int], up_attends: Sequence[bool]) -> dict[str, str]:
    """diffusers block name -> the SGM UNet's, for a UNet with `down_layers[l]` ResNet layers at down
    level l and `up_layers[l]` at up level l (`up_attends[l]`: with attentions): input_blocks count
    conv_in, then per level its ResNet (and attention) layers and its downsampler; output_blocks per
    level its layers, the upsampler inside the last one."""
    table = dict(SGM_TOP)
    block = 1
    for level, layers in enumerate(down_layers):
        for j in range(layers):
            table[f"down_blocks.{level}.resnets.{j}"] = f"input_blocks.{block}.0"
            table[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{block}.1"
            block += 1
        table[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{block}.0.op"
        block += 1
    block = 0
    for level, (layers, attends) in enumerate(zip(up_layers, up_attends)):
        for j in range(layers):
            table[f"up_blocks.{level}.resnets.{j}"] = f"output_blocks.{block}.0"
            table[f"up_blocks.{level}.attentions.{j}"] = f"output_blocks.{block}.1"
            block += 1
        table[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{block - 1}.{2 if attends else 1}.conv"
    return table


def sgm_blocks(modules: Sequence[str]) -> dict[str, str]:
    """`sgm_table` for the blocks among `modules` (diffusers UNet module names, as a LoRA's)."""
    count = {}  # (down_blocks|up_blocks, level) -> layers
    for name in modules:
        if m := re.match(r"(down_blocks|up_blocks)\.(\d+)\.resnets\.(\d+)\.", name):
            key = (m[1], int(m[2]))
            count[key] = max(count.get(key, 0), int(m[3]) + 1)
    levels = range(1 + max((level for kind, level in count if kind == "down_blocks"), default=-1))
    return sgm_table([count.get(("down_blocks", level), 0) for level in levels],
                     [count.get(("up_blocks", level), 0) for level in levels],
                     [any(name.startswith(f"up_blocks.{level}.attentions.") for name in modules) for level in levels])


def sgm_name(module: str, blocks: Mapping[str, str]) -> str | None:
    """A diffusers UNet module name in the SGM UNet's names (None outside its blocks)."""
    for block, sgm in blocks.items():
        if module == block:
            return sgm
        if module.startswith(block + "."):
            rest = module[len(block) + 1:]
            if ".resnets." in block:
                head, _, tail = rest.partition(".")
                rest = ".".join(filter(None, [SGM_RESNET.get(head, head), tail]))
            return f"{sgm}.{rest}"
    return None


def sgm_levels(keys: Iterable[str]) -> tuple[list[int], list[bool]]:
    """(ResNet layers, whether it attends) per down level of an SGM UNet, from its input blocks' names
    (without `model.diffusion_model.`): after conv_in, a block holding `0.op` is a level's downsampler."""
    blocks: dict[int, set[str]] = {}  # input block -> its modules' names after the number
    for key in keys:
        if m := re.match(r"input_blocks\.(\d+)\.(.+)", key):
            blocks.setdefault(int(m[1]), set()).add(m[2])
    layers, attends = [0], [False]
    for block in range(1, 1 + max(blocks, default=0)):
        parts = blocks.get(block, set())
        if any(part.startswith("0.op.") for part in parts):
            layers.append(0)
            attends.append(False)
        else:
            layers[-1] += 1
            attends[-1] |= any(part.startswith("1.") for part in parts)
    return layers, attends


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a diffusers/transformers tensor is in the file: the tensor `key`, the `third` of it along
    its first axis (OpenCLIP's fused q, k, v), and its layout: `transposed` (OpenCLIP's text projection,
    [width, projection]), `linear` (a 1x1 convolution [O, I, 1, 1] read as a linear weight [O, I])."""

    key: str
    third: int | None = None
    transposed: bool = False
    linear: bool = False

    def shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        """The tensor's shape, for the shape the file stores."""
        if self.third is not None:
            stored = (stored[0] // 3, *stored[1:])
        if self.linear and all(n == 1 for n in stored[2:]):
            stored = stored[:2]
        return stored[::-1] if self.transposed else stored

    def take(self, f: Any) -> np.ndarray:
        """The tensor, from the open safetensors file `f`; of a fused tensor, only its third is read."""
        if self.third is None:
            tensor = f.get_tensor(self.key)
        else:
            part = f.get_slice(self.key)
            rows = part.get_shape()[0] // 3
            tensor = part[self.third * rows:(self.third + 1) * rows]
        tensor = tensor.reshape(self.shape(tensor.shape)) if self.linear else tensor
        return tensor.T if self.transposed else tensor


def unet_tensor(key: str, blocks: Mapping[str, str]) -> dict[str, Source]:
    """An SGM UNet tensor (without `model.diffusion_model.`) under its diffusers name, by the longest
    SGM block of `blocks` (an `sgm_table`) that holds it ({} when none does)."""
    holders = [block for block, sgm in blocks.items() if key.startswith(sgm + ".")]
    if not holders:
        return {}
    block = max(holders, key=lambda b: len(blocks[b]))  # `output_blocks.5.1.conv` over `output_blocks.5.1`
    rest = key[len(blocks[block]) + 1:]
    if ".resnets." in block:
        rest = next((part + rest[len(sgm):] for part, sgm in SGM_RESNET.items() if rest.startswith(sgm + ".")), "")
    return {f"{block}.{rest}": Source(key)} if rest else {}


def vae_module(module: str, levels: int) -> tuple[str, bool] | None:
    """An original VAE module name -> (its diffusers name, whether it is a 1x1 convolution that diffusers
    holds as a linear layer); None for a name the layout lacks. The decoder numbers its levels from the
    bottom (`up.0` is the last to run), diffusers from the top."""
    half, _, rest = module.partition(".")
    if module in ("quant_conv", "post_quant_conv"):
        return module, False
    if half not in ("encoder", "decoder"):
        return None
    if rest in ("conv_in", "conv_out", "norm_out"):
        return f"{half}.{'conv_norm_out' if rest == 'norm_out' else rest}", False
    if (m := re.fullmatch(r"mid\.block_([12])\.(\w+)", rest)) and m[2] in VAE_RESNET:
        return f"{half}.mid_block.resnets.{int(m[1]) - 1}.{VAE_RESNET[m[2]]}", False
    if (m := re.fullmatch(r"mid\.attn_1\.(\w+)", rest)) and m[1] in VAE_ATTENTION:
        return f"{half}.mid_block.attentions.0.{VAE_ATTENTION[m[1]]}", m[1] != "norm"
    way = "down" if half == "encoder" else "up"
    m = re.fullmatch(rf"{way}\.(\d+)\.(?:block\.(\d+)\.(\w+)|{way}sample\.conv)", rest)
    if not m:
        return None
    level = int(m[1]) if way == "down" else levels - 1 - int(m[1])
    if m[2] is None:
        return f"{half}.{way}_blocks.{level}.{way}samplers.0.conv", False
    return (f"{half}.{way}_blocks.{level}.resnets.{m[2]}.{VAE_RESNET[m[3]]}", False) if m[3] in VAE_RESNET else None


def vae_tensor(key: str, levels: int) -> dict[str, Source]:
    module, _, parameter = key.rpartition(".")
    if parameter not in ("weight", "bias") or (found := vae_module(module, levels)) is None:
        return {}
    name, linear = found
    return {f"{name}.{parameter}": Source(key, linear=linear and parameter == "weight")}


def open_clip_tensor(key: str) -> dict[str, Source]:
    """An OpenCLIP text tensor (without its embedder's prefix) under transformers' names ({} when unknown)."""
    if key == "positional_embedding":
        return {"text_model.embeddings.position_embedding.weight": Source(key)}
    if key == "text_projection":  # x @ text_projection in OpenCLIP, a linear layer's [O, I] in transformers
        return {"text_projection.weight": Source(key, transposed=True)}
    module, _, parameter = key.rpartition(".")
    if module in OPEN_CLIP_MODULES:
        return {f"{OPEN_CLIP_MODULES[module]}.{parameter}": Source(key)}
    if not (m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(\w+)", key)):
        return {}
    layer, module, parameter = f"text_model.encoder.layers.{m[1]}", m[2], m[3]
    if module == "attn" and parameter in ("in_proj_weight", "in_proj_bias"):
        kind = parameter.removeprefix("in_proj_")
        return {f"{layer}.self_attn.{qkv}.{kind}": Source(key, third=i) for i, qkv in enumerate(QKV)}
    return {f"{layer}.{OPEN_CLIP_LAYER[module]}.{parameter}": Source(key)} if module in OPEN_CLIP_LAYER else {}


def clip_tensor(key: str) -> dict[str, Source]:
    """A CLIP ViT-L tensor (without its embedder's prefix): transformers' names already."""
    return {key: Source(key)} if key.startswith("text_model.") else {}


def unet_translator(keys: Sequence[str]) -> Callable[[str], dict[str, Source]]:
    layers, attends = sgm_levels(keys)
    # diffusers' up levels mirror the down levels, each with one layer more (it takes the level's skips).
    blocks = sgm_table(layers, [n + 1 for n in reversed(layers)], attends[::-1])
    return lambda key: unet_tensor(key, blocks)


def vae_translator(keys: Sequence[str]) -> Callable[[str], dict[str, Source]]:
    if any(key.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for key in keys):
        return lambda key: {key: Source(key)}  # diffusers' own names
    levels = 1 + max((int(m[1]) for key in keys if (m := re.match(r"decoder\.up\.(\d+)\.", key))), default=-1)
    return lambda key: vae_tensor(key, levels)


# component -> a function of its tensors' names (the file's prefix removed) giving their translation.
TRANSLATORS = {
    "unet": unet_translator,
    "vae": vae_translator,
    "text_encoder": lambda keys: clip_tensor,
    "text_encoder_2": lambda keys: open_clip_tensor,
}


def file_kind(path: Path, keys: Sequence[str]) -> tuple[str, dict[str, str]]:
    """(the kind of file, its layout: prefix -> component), from its tensors' names."""
    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in keys)

    if has(UNET):
        found = []
        if has("cond_stage_model."):
            found.append("a text encoder named cond_stage_model.*")
        if f"{UNET}label_emb.0.0.weight" not in keys:
            found.append("a UNet without label_emb (SDXL's pooled-text and size conditioning)")
        if found:
            raise SingleFileError(f"{path} is not SDXL: it holds {' and '.join(found)}, as Stable Diffusion 1.x/2.x "
                                  "files do. jaxfuse runs SDXL (base, its fine-tunes, the refiner): use an SDXL file.")
        if has(REFINER_OPEN_CLIP):
            return "sdxl-refiner", LAYOUTS["sdxl-refiner"]
        missing = [f"{name} ({prefix}*)" for prefix, name in ((CLIP_L, "CLIP ViT-L"), (OPEN_CLIP, "OpenCLIP ViT-bigG"))
                   if not has(prefix)]
        if missing:
            raise SingleFileError(f"{path} holds an SDXL UNet but lacks the text encoder {' and '.join(missing)}: "
                                  "an SDXL file holds both (the refiner's holds OpenCLIP as "
                                  "conditioner.embedders.0.model.*). Use the complete checkpoint, or the model's "
                                  "diffusers folder.")
        return "sdxl", LAYOUTS["sdxl"]
    if has(VAE):
        return "vae", {VAE: "vae"}
    if has("encoder.") and has("decoder."):
        return "vae", {"": "vae"}
    found = sorted({key.split(".")[0] for key in keys})
    raise SingleFileError(f"{path} is not an SDXL checkpoint: it has no model.diffusion_model.* (the UNet) and is no "
                          "VAE (encoder.*, decoder.*)." + listing("names found, up to the first dot", found)
                          + "\n  A diffusers model file belongs in its model folder; a LoRA is passed as a LoRA.")


def read_header(path: Path) -> dict[str, tuple[int, ...]]:
    """A safetensors file's tensor names and shapes; no tensor is read."""
    if path.suffix in PICKLE_SUFFIXES:
        raise SingleFileError(
            f"{path} is a pickled checkpoint ({path.suffix}), which can run code when read: jaxfuse never unpickles "
            "files. Use the model's .safetensors release, or convert the file where you trust it: "
            "safetensors.torch.save_file(torch.load(SRC, weights_only=True)['state_dict'], DST) (without "
            "['state_dict'] when the file has no such entry).")
    if not path.is_file():
        raise SingleFileError(f"{path}: no such file; pass a single-file SDXL checkpoint (.safetensors).")
    try:
        with open_safetensors(path) as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except ConversionError as e:
        raise SingleFileError(str(e)) from None


def placed(layout: Mapping[str, str], keys: Iterable[str]) -> tuple[dict[str, dict[str, Source]], list[str]]:
    """({component: {diffusers/transformers name: Source}} in `COMPONENTS`' order, the keys no model of
    `layout` (prefix -> component) takes: unknown names and second tensors for one name), ignored keys skipped."""
    grouped: dict[str, list[str]] = {component: [] for component in layout.values()}
    unexpected = []
    for key in keys:
        if IGNORED.fullmatch(key):
            continue
        prefix = next((p for p in layout if key.startswith(p)), None)
        if prefix is None:
            unexpected.append(key)
        else:
            grouped[layout[prefix]].append(key[len(prefix):])
    sources: dict[str, dict[str, Source]] = {}
    prefixes = {component: prefix for prefix, component in layout.items()}
    for component, component_keys in grouped.items():
        translate, found = TRANSLATORS[component](component_keys), {}
        for key in component_keys:
            names = translate(key)
            if not names or found.keys() & names.keys():
                unexpected.append(prefixes[component] + key)
                continue
            found |= {name: dataclasses.replace(s, key=prefixes[component] + s.key) for name, s in names.items()}
        if found:
            sources[component] = found
    return {c: sources[c] for c in COMPONENTS if c in sources}, unexpected


class MappedCheckpoint:
    """One model of a single file under diffusers'/transformers' names, read one tensor at a time, as
    `weight_conversion.convert_checkpoint` reads a `SafetensorsCheckpoint`: `shapes` (name -> shape,
    PyTorch's layout), `files` (name -> the file, for messages) and `read(name)`."""

    def __init__(self, path: Path, sources: Mapping[str, Source], header: Mapping[str, tuple[int, ...]]):
        self.sources = dict(sources)
        self.shapes = {name: source.shape(header[source.key]) for name, source in self.sources.items()}
        self.files = dict.fromkeys(self.sources, path)

    def read(self, name: str) -> np.ndarray:
        with open_safetensors(self.files[name]) as f:
            return self.sources[name].take(f)


@dataclasses.dataclass(frozen=True)
class SingleFile:
    """A single-file checkpoint's header, seen as its models: `kind` is "sdxl" (base or a fine-tune:
    both text encoders), "sdxl-refiner" (OpenCLIP only) or "vae"; `shapes` the file's tensors (original
    names); `configs` each model's config.json as diffusers/transformers write it; `sources` each
    model's tensors (diffusers/transformers name -> `Source`)."""

    path: Path
    kind: str
    shapes: Mapping[str, tuple[int, ...]]
    configs: Mapping[str, dict]
    sources: Mapping[str, Mapping[str, Source]] = dataclasses.field(repr=False)

    @classmethod
    def read(cls, path: str | Path) -> SingleFile:
        """The file at `path`, from its header; raises `SingleFileError` for a file that is not a
        safetensors SDXL checkpoint, lacks a text encoder or holds tensors the layout does not know."""
        path = Path(path).expanduser()
        shapes = read_header(path)
        kind, layout = file_kind(path, list(shapes))
        sources, unexpected = placed(layout, shapes)
        if unexpected:
            raise SingleFileError(
                f"{path} holds tensors that {KINDS[kind]} file in the original layout does not:"
                + listing("unexpected", sorted(unexpected))
                + "\n  It is not a plain SDXL checkpoint (a v-prediction, inpainting or other variant adds tensors) or "
                  "was saved with extra ones: use the model's plain SDXL release or its diffusers folder.")
        try:
            configs = component_configs(kind, {c: MappedCheckpoint(path, s, shapes).shapes for c, s in sources.items()})
            check_configs(configs)
        except ConfigError as e:
            raise SingleFileError(f"{path} is not shaped as {KINDS[kind]} file: {e}. jaxfuse runs SDXL's "
                                  "architecture only.") from None
        return cls(path, kind, shapes, configs, sources)

    def components(self) -> tuple[str, ...]:
        """The models the file holds, of unet, vae, text_encoder, text_encoder_2."""
        return tuple(self.sources)

    def checkpoint(self, component: str) -> MappedCheckpoint:
        """`component`'s tensors, for `weight_conversion.convert_checkpoint`."""
        if component not in self.sources:
            raise SingleFileError(f"{self.path} holds no {component} (it holds {', '.join(self.sources)}); "
                                  f"pass the {component} separately.")
        return MappedCheckpoint(self.path, self.sources[component], self.shapes)

    def model_index(self) -> dict[str, Any]:
        """`model_index.json` of the diffusers pipeline folder this file amounts to."""
        if self.kind == "vae":
            raise SingleFileError(f"{self.path} is a VAE alone, not a pipeline: pass it as a pipeline's VAE.")
        return model_index(self.kind)
