"""Tiny random SDXL pipelines (base and refiner) saved as diffusers folders, and a writer of them as
single-file checkpoints in Stability's original (SGM) layout: what `from_single_file` loads.

The writer is the inverse of diffusers' `loaders/single_file_utils.py` conversion, written from the
layout alone; `test_single_file_writer.py` proves it against diffusers' loader. One file holds:

    model.diffusion_model.*                 the UNet: time_embed, label_emb, input_blocks,
                                            middle_block, output_blocks, out
    first_stage_model.*                     the VAE: encoder/decoder down/up/mid, quant convs
    conditioner.embedders.0.transformer.*   CLIP ViT-L (base only), transformers' names
    conditioner.embedders.N.model.*         OpenCLIP bigG: N = 1 in a base file, 0 in a refiner's

A standalone VAE file holds the VAE's original names with no prefix.

The tiny models keep SDXL's values wherever a file carries no tensor for them, as a loader must
assume them: 64-wide attention heads, 32 norm groups, CLIP's 49408-token vocabulary, 77 positions,
the activations, the token ids of the published text encoder configs, a 4-level VAE (factor 8) with
scaling factor 0.13025, the sample sizes. Their depth indices match SDXL's (two layers per block,
three UNet levels for the base, four for the refiner), so every UNet and VAE key name of a tiny
file is one a real file has, up to transformer depth.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from jaxfuse.clip_tokenizer import write_tokenizer_folder
from jaxfuse.demo.architecture import SDXL_SCHEDULER
from jaxfuse.oracle import perturbed

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = {"base": "conditioner.embedders.1.model.", "refiner": "conditioner.embedders.0.model."}

HEAD_WIDTH = 64  # SDXL's attention heads, in the UNet and both text encoders
TIME_ID_WIDTH = 8  # addition_time_embed_dim (SDXL: 256)
# The published text encoder configs of SDXL base and refiner 1.0 carry transformers' old CLIP ids:
# bos 0, eos 2 (the legacy rule: pool at the largest token id), pad 1.
TOKEN_IDS = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)
TEXT_ENCODER = dict(  # CLIP ViT-L/14 (SDXL: 768 wide, 12 layers, 12 heads)
    vocab_size=49408, hidden_size=64, intermediate_size=4 * 64, num_hidden_layers=3,
    num_attention_heads=64 // HEAD_WIDTH, max_position_embeddings=77, hidden_act="quick_gelu",
    layer_norm_eps=1e-5, projection_dim=768, **TOKEN_IDS,
)
# OpenCLIP bigG/14 (SDXL: 1280 wide, 32 layers, 20 heads). 10 layers: diffusers tells an SDXL file
# by the 10th layer's key (`CHECKPOINT_KEY_NAMES["xl_base"]`); a width unlike the first encoder's,
# as in SDXL, for diffusers tells the two encoders apart by their position embedding's width.
TEXT_ENCODER_2 = dict(
    TEXT_ENCODER, hidden_size=128, intermediate_size=4 * 128, num_hidden_layers=10,
    num_attention_heads=128 // HEAD_WIDTH, hidden_act="gelu", projection_dim=64,
)
CONTEXT_WIDTH = TEXT_ENCODER["hidden_size"] + TEXT_ENCODER_2["hidden_size"]
POOLED_WIDTH = TEXT_ENCODER_2["projection_dim"]

_UNET_COMMON = dict(
    layers_per_block=2, norm_num_groups=32, norm_eps=1e-5, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=TIME_ID_WIDTH, sample_size=128,
)
BASE_UNET = dict(  # SDXL base: (320, 640, 1280), depth (1, 2, 10)
    _UNET_COMMON,
    block_out_channels=(64, 128, 192),
    attention_head_dim=(1, 2, 3),  # diffusers' name for the number of heads: width / 64
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2),
    cross_attention_dim=CONTEXT_WIDTH,
    projection_class_embeddings_input_dim=POOLED_WIDTH + 6 * TIME_ID_WIDTH,
)
REFINER_UNET = dict(  # SDXL refiner: (384, 768, 1536, 1536), depth 4
    _UNET_COMMON,
    block_out_channels=(64, 128, 192, 192),
    attention_head_dim=(1, 2, 3, 3),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=2,
    cross_attention_dim=TEXT_ENCODER_2["hidden_size"],
    projection_class_embeddings_input_dim=POOLED_WIDTH + 5 * TIME_ID_WIDTH,
    upcast_attention=True,
)
VAE = dict(  # SDXL: (128, 256, 512, 512)
    block_out_channels=(32, 64, 128, 128), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, norm_num_groups=32,
    sample_size=1024, scaling_factor=0.13025, force_upcast=True,
)
LOGIT_SCALE = math.log(100.0)  # OpenCLIP's trained temperature, a scalar real files carry


# --- the tiny pipelines ---------------------------------------------------------------------------


def write_tokenizers(folder: Path, names: tuple[str, ...]) -> dict[str, CLIPTokenizer]:
    """Writes the tokenizers `names` under `folder` with CLIP's vocabulary as jaxfuse ships it (a
    single file carries none, so the loader uses the shipped one) and returns them loaded."""
    for name in names:
        write_tokenizer_folder(folder / name, name)
    return {name: CLIPTokenizer.from_pretrained(folder / name, local_files_only=True) for name in names}


def _random(make: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    """The model `make` builds, its initial weights drawn from `seed`, then perturbed."""
    torch.manual_seed(seed)
    return perturbed(make(), seed)


def _save(pipe, folder: Path, tokenizer_names: tuple[str, ...]):
    pipe.save_pretrained(folder)
    for name in tokenizer_names:  # the classic layout alone: transformers 5 adds tokenizer.json
        (folder / name / "tokenizer.json").unlink(missing_ok=True)
    return pipe


def build_tiny_base(folder: Path) -> StableDiffusionXLPipeline:
    """A tiny random SDXL base pipeline, saved to `folder` (a diffusers folder) and returned."""
    tokenizers = write_tokenizers(folder, ("tokenizer", "tokenizer_2"))
    pipe = StableDiffusionXLPipeline(
        vae=_random(lambda: AutoencoderKL(**VAE), 14),
        text_encoder=_random(lambda: CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER)), 11),
        text_encoder_2=_random(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2)), 12),
        unet=_random(lambda: UNet2DConditionModel(**BASE_UNET), 13),
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
        **tokenizers,
    )
    return _save(pipe, folder, tuple(tokenizers))


def build_tiny_refiner(folder: Path) -> StableDiffusionXLImg2ImgPipeline:
    """A tiny random SDXL refiner pipeline (OpenCLIP alone, 5 time ids, the base's VAE config),
    saved to `folder` and returned."""
    tokenizers = write_tokenizers(folder, ("tokenizer_2",))
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=_random(lambda: AutoencoderKL(**VAE), 24),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=_random(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2)), 22),
        unet=_random(lambda: UNet2DConditionModel(**REFINER_UNET), 23),
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        **tokenizers,
    )
    return _save(pipe, folder, tuple(tokenizers))


# --- renaming -------------------------------------------------------------------------------------

# A resnet's layers: diffusers name -> original name, in the UNet and in the VAE.
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _add_module(table: dict[str, str], ours: str, theirs: str, layers: dict[str, str] | None = None) -> None:
    """Maps the module `ours` (a diffusers path) to `theirs`, with its sublayers renamed by `layers`."""
    table[ours] = theirs
    for a, b in (layers or {}).items():
        table[f"{ours}.{a}"] = f"{theirs}.{b}"


def _rename(state: dict[str, torch.Tensor], table: dict[str, str], what: str) -> dict[str, torch.Tensor]:
    """Each key renamed by the longest module path of `table` it lies under; fails with the keys no
    path covers (a path no key lies under is a layer this model lacks: a last level's sampler)."""
    out, unmapped = {}, []
    for key, value in state.items():
        parts = key.split(".")
        heads = (".".join(parts[:n]) for n in range(len(parts) - 1, 0, -1))
        head = next((h for h in heads if h in table), None)
        if head is None:
            unmapped.append(key)
            continue
        out[table[head] + key[len(head):]] = value
    if unmapped:
        raise ValueError(f"{what}: {len(unmapped)} keys with no original name: {unmapped[:10]}")
    if len(out) != len(state):
        raise ValueError(f"{what}: {len(state) - len(out)} keys renamed onto another key's name")
    return out


def _unet_table(config: dict) -> dict[str, str]:
    """diffusers UNet module paths -> original ones, from the block types and layers per block."""
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"layers_per_block: {layers!r}; the original layout has one count for all levels")
    levels = len(config["down_block_types"])
    table: dict[str, str] = {}
    for ours, theirs in [("conv_in", "input_blocks.0.0"), ("time_embedding.linear_1", "time_embed.0"),
                         ("time_embedding.linear_2", "time_embed.2"), ("add_embedding.linear_1", "label_emb.0.0"),
                         ("add_embedding.linear_2", "label_emb.0.2"), ("conv_norm_out", "out.0"),
                         ("conv_out", "out.2"), ("mid_block.attentions.0", "middle_block.1")]:
        _add_module(table, ours, theirs)
    _add_module(table, "mid_block.resnets.0", "middle_block.0", UNET_RESNET)
    _add_module(table, "mid_block.resnets.1", "middle_block.2", UNET_RESNET)
    i = 1  # input_blocks.0 is conv_in; then one block per resnet (+ its attention), one per downsampler
    for level, kind in enumerate(config["down_block_types"]):
        for j in range(layers):
            _add_module(table, f"down_blocks.{level}.resnets.{j}", f"input_blocks.{i}.0", UNET_RESNET)
            if "CrossAttn" in kind:
                _add_module(table, f"down_blocks.{level}.attentions.{j}", f"input_blocks.{i}.1")
            i += 1
        if level < levels - 1:
            _add_module(table, f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{i}.0.op")
            i += 1
    i = 0  # layers + 1 output blocks per level; the last of a level carries its upsampler
    for level, kind in enumerate(config["up_block_types"]):
        attention = "CrossAttn" in kind
        for j in range(layers + 1):
            _add_module(table, f"up_blocks.{level}.resnets.{j}", f"output_blocks.{i}.0", UNET_RESNET)
            if attention:
                _add_module(table, f"up_blocks.{level}.attentions.{j}", f"output_blocks.{i}.1")
            if j == layers and level < levels - 1:
                _add_module(table, f"up_blocks.{level}.upsamplers.0.conv", f"output_blocks.{i}.{1 + attention}.conv")
            i += 1
    return table


def _vae_table(config: dict) -> dict[str, str]:
    """diffusers VAE module paths -> original ones: the decoder's levels are numbered from the bottom
    (diffusers' up_blocks.0 is the original up.{levels - 1})."""
    levels = len(config["block_out_channels"])
    table: dict[str, str] = {}
    for name in ("quant_conv", "post_quant_conv"):
        _add_module(table, name, name)
    for part in ("encoder", "decoder"):
        for name in ("conv_in", "conv_out"):
            _add_module(table, f"{part}.{name}", f"{part}.{name}")
        _add_module(table, f"{part}.conv_norm_out", f"{part}.norm_out")
        for j in (0, 1):
            _add_module(table, f"{part}.mid_block.resnets.{j}", f"{part}.mid.block_{j + 1}", VAE_RESNET)
        _add_module(table, f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", VAE_ATTENTION)
    for level in range(levels):
        down, up = f"encoder.down.{level}", f"decoder.up.{levels - 1 - level}"
        for j in range(config["layers_per_block"]):
            _add_module(table, f"encoder.down_blocks.{level}.resnets.{j}", f"{down}.block.{j}", VAE_RESNET)
        for j in range(config["layers_per_block"] + 1):
            _add_module(table, f"decoder.up_blocks.{level}.resnets.{j}", f"{up}.block.{j}", VAE_RESNET)
        _add_module(table, f"encoder.down_blocks.{level}.downsamplers.0.conv", f"{down}.downsample.conv")
        _add_module(table, f"decoder.up_blocks.{level}.upsamplers.0.conv", f"{up}.upsample.conv")
    return table


def original_unet(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict in the original names (no prefix)."""
    return _rename(state, _unet_table(config), "unet")


def original_vae(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers VAE state dict in the original names (no prefix); the mid attention's linear
    layers as 1x1 convolutions [O, I, 1, 1]."""
    out = _rename(state, _vae_table(config), "vae")
    for key, value in out.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            out[key] = value[:, :, None, None]
    return out


def original_clip(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """CLIP ViT-L: transformers' names under `text_model.` (transformers 5 saves them without it),
    with the position ids real files carry."""
    out = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
    out["text_model.embeddings.position_ids"] = torch.arange(config["max_position_embeddings"])[None]
    return out


def original_open_clip(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """OpenCLIP bigG from transformers' CLIPTextModelWithProjection: q, k, v fused into
    `in_proj_*`, the projection stored as [width, proj] (the transpose of the linear weight)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
        "text_projection": state.pop("text_projection.weight").T.contiguous(),
        "logit_scale": torch.tensor(LOGIT_SCALE),
    }
    renames = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
               "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for n in range(config["num_hidden_layers"]):
        ours, theirs = f"encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for leaf in ("weight", "bias"):
            out[f"{theirs}attn.in_proj_{leaf}"] = torch.cat(
                [state.pop(f"{ours}self_attn.{p}_proj.{leaf}") for p in "qkv"])
            for a, b in renames.items():
                out[f"{theirs}{b}.{leaf}"] = state.pop(f"{ours}{a}.{leaf}")
    if state:
        raise ValueError(f"text_encoder_2: keys with no OpenCLIP name: {sorted(state)[:10]}")
    return out


# --- writing --------------------------------------------------------------------------------------


def _read(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict (all the folder's safetensors files) and config.json of a saved model."""
    state: dict[str, torch.Tensor] = {}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors file in {folder}")
    for file in files:
        part = load_file(file)
        if state.keys() & part.keys():
            raise ValueError(f"{folder}: a key in two files ({file.name}); a variant beside the weights?")
        state.update(part)
    return state, json.loads((folder / "config.json").read_text())


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def _save_file(state: dict[str, torch.Tensor], path: Path, dtype: torch.dtype) -> None:
    """Floating tensors in `dtype`, the others (position ids) as they are."""
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt"})


def is_refiner_folder(folder: Path) -> bool:
    """Whether a diffusers SDXL folder is a refiner's (no first text encoder), from model_index.json."""
    components = json.loads((Path(folder) / "model_index.json").read_text())
    if not (components.get("text_encoder_2") or [None])[0]:
        raise ValueError(f"{folder}: no text_encoder_2 in model_index.json: not an SDXL pipeline")
    return not (components.get("text_encoder") or [None])[0]


def write_single_file(folder: Path, path: Path, dtype: torch.dtype = torch.float16, vae: bool = True) -> None:
    """Writes the diffusers SDXL folder `folder` (base or refiner, told by its model_index.json) as
    one original-layout checkpoint `path`, in `dtype`; without the VAE's keys when `vae` is False."""
    folder = Path(folder)
    kind = "refiner" if is_refiner_folder(folder) else "base"
    unet, unet_config = _read(folder / "unet")
    text_2, text_2_config = _read(folder / "text_encoder_2")
    state = {**_prefixed(UNET_PREFIX, original_unet(unet, unet_config)),
             **_prefixed(OPEN_CLIP_PREFIX[kind], original_open_clip(text_2, text_2_config))}
    if kind == "base":
        state.update(_prefixed(CLIP_PREFIX, original_clip(*_read(folder / "text_encoder"))))
    if vae:
        state.update(_prefixed(VAE_PREFIX, original_vae(*_read(folder / "vae"))))
    _save_file(state, Path(path), dtype)


def write_single_file_vae(folder: Path, path: Path, dtype: torch.dtype = torch.float16) -> None:
    """Writes a diffusers VAE folder (config.json and weights; a pipeline folder's `vae/` is taken
    too) as a standalone original-layout VAE file `path` (`encoder.*`, `decoder.*`, ...)."""
    folder = Path(folder)
    if not (folder / "config.json").exists() and (folder / "vae" / "config.json").exists():
        folder = folder / "vae"
    _save_file(original_vae(*_read(folder)), Path(path), dtype)
