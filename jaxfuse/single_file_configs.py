"""The config files of a diffusers SDXL pipeline folder, for the models a single-file checkpoint holds:
each model's `config.json` inferred from its tensors' names and shapes (in diffusers' and transformers'
names), the pipeline's `model_index.json` and SDXL's scheduler config; imports no model.

What a shape tells comes from the shapes: widths, depths, which levels attend, the text context and
the micro-conditioning widths. What no tensor carries takes SDXL's value, as the published configs of
stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0 write it: 64-wide attention heads, 32 norm
groups, the sample sizes, the VAE's scaling factor, the text encoders' activations and token ids.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from jaxfuse.config import ConfigError, UNetConfig, VAEConfig
from jaxfuse.text_encoder_config import TextEncoderConfig

Shapes = Mapping[str, tuple[int, ...]]

HEAD_WIDTH = 64  # every SDXL attention head is 64 wide; diffusers' `attention_head_dim` counts heads
NORM_GROUPS = 32
# Micro-conditioning time ids: the base's original size, crop corner and target size; the refiner's
# original size, crop corner and aesthetic score. Each is embedded `addition_time_embed_dim` wide.
TIME_IDS = {"sdxl": 6, "sdxl-refiner": 5}
# The published unet configs: the refiner's upcasts attention; the base's leaves it unset.
UPCAST_ATTENTION = {"sdxl": None, "sdxl-refiner": True}
# transformers' class and activation of each text encoder (CLIP ViT-L, OpenCLIP ViT-bigG).
TEXT_ENCODERS = {"text_encoder": ("CLIPTextModel", "quick_gelu"),
                 "text_encoder_2": ("CLIPTextModelWithProjection", "gelu")}
# Both SDXL text encoder configs: eos 2 is the legacy id that pools at the largest token id (see
# `TextEncoderConfig`), which is how SDXL was trained.
TOKEN_IDS = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}

# stabilityai/stable-diffusion-xl-base-1.0 `scheduler/scheduler_config.json` (the refiner's is the same).
SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}
# The pipeline entries of each kind's `model_index.json` (the refiner's: image to image, no first text encoder).
PIPELINES = {
    "sdxl": {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True},
    "sdxl-refiner": {"_class_name": "StableDiffusionXLImg2ImgPipeline", "force_zeros_for_empty_prompt": False,
                     "requires_aesthetics_score": True},
}
LIBRARIES = {
    "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def shape_of(shapes: Shapes, name: str) -> tuple[int, ...]:
    if name not in shapes:
        raise ConfigError(f"it has no {name}")
    return shapes[name]


def count(shapes: Shapes, pattern: str) -> int:
    """How many of `pattern.format(0)`, `pattern.format(1)`, ... are among the names, counting from 0."""
    return next(i for i in itertools.count() if pattern.format(i) not in shapes)


def heads(width: int) -> int:
    if width % HEAD_WIDTH:
        raise ConfigError(f"a width of {width} does not split into SDXL's {HEAD_WIDTH}-wide attention heads")
    return width // HEAD_WIDTH


def one_or_each(values: list[int]) -> int | list[int]:
    """One int when every level agrees, as the published configs write it; else one per level."""
    return values[0] if len(set(values)) == 1 else values


def transformer_depths(depths: list[int], mid: int) -> int | list[int]:
    """diffusers' `transformer_layers_per_block` for the levels' transformer depths (0: no attention) and
    the mid block's, which diffusers reads from the last entry. A level without attention has a value
    nothing reads: the shared depth when all agree (the refiner's 4), else 1 (the base's [1, 2, 10])."""
    if len({d for d in depths if d} | {mid}) == 1:
        return mid
    each = [d or 1 for d in depths]
    if depths[-1] not in (0, mid):
        raise ConfigError(f"its mid block has {mid} transformer layers and its last level {depths[-1]}; "
                          "diffusers' UNet gives both the same")
    return [*each[:-1], mid]


def unet_config(shapes: Shapes, kind: str, pooled_width: int) -> dict[str, Any]:
    """`UNet2DConditionModel`'s config.json for its tensors (diffusers' names); `pooled_width`: the
    second text encoder's projection, the pooled text the UNet's `add_embedding` reads beside the time ids."""
    levels = count(shapes, "down_blocks.{}.resnets.0.conv1.weight")
    widths = [shape_of(shapes, f"down_blocks.{level}.resnets.0.conv2.weight")[0] for level in range(levels)]
    depths = [count(shapes, f"down_blocks.{level}.attentions.0.transformer_blocks.{{}}.attn1.to_q.weight")
              for level in range(levels)]
    attention = "mid_block.attentions.0"
    context = shape_of(shapes, f"{attention}.transformer_blocks.0.attn2.to_k.weight")[1]
    conditioning = shape_of(shapes, "add_embedding.linear_1.weight")[1]
    time_ids, rest = divmod(conditioning - pooled_width, TIME_IDS[kind])
    if rest or time_ids <= 0:
        raise ConfigError(f"its add_embedding reads {conditioning} values, not the pooled text ({pooled_width}) and "
                          f"{TIME_IDS[kind]} time ids of equal width that an {kind} UNet reads")
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 128,
        "in_channels": shape_of(shapes, "conv_in.weight")[1],
        "out_channels": shape_of(shapes, "conv_out.weight")[0],
        "block_out_channels": widths,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)],
        "layers_per_block": one_or_each([count(shapes, f"down_blocks.{level}.resnets.{{}}.conv1.weight")
                                         for level in range(levels)]),
        "transformer_layers_per_block": transformer_depths(
            depths, count(shapes, f"{attention}.transformer_blocks.{{}}.attn1.to_q.weight")),
        "attention_head_dim": [heads(width) for width in widths],
        "cross_attention_dim": context,
        # proj_in is a linear layer [O, I] in SDXL, a 1x1 convolution [O, I, 1, 1] in SD 1.x.
        "use_linear_projection": len(shape_of(shapes, f"{attention}.proj_in.weight")) == 2,
        "upcast_attention": UPCAST_ATTENTION[kind],
        "norm_num_groups": NORM_GROUPS,
        "norm_eps": 1e-5,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_ids,
        "projection_class_embeddings_input_dim": conditioning,
    }


def vae_config(shapes: Shapes) -> dict[str, Any]:
    """`AutoencoderKL`'s config.json for its tensors (diffusers' names), with SDXL's scaling factor."""
    levels = count(shapes, "encoder.down_blocks.{}.resnets.0.conv1.weight")
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [shape_of(shapes, f"encoder.down_blocks.{level}.resnets.0.conv2.weight")[0]
                               for level in range(levels)],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "in_channels": shape_of(shapes, "encoder.conv_in.weight")[1],
        "out_channels": shape_of(shapes, "decoder.conv_out.weight")[0],
        "latent_channels": shape_of(shapes, "decoder.conv_in.weight")[1],
        "layers_per_block": count(shapes, "encoder.down_blocks.0.resnets.{}.conv1.weight"),
        "norm_num_groups": NORM_GROUPS,
        "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in shapes,
        "use_quant_conv": "quant_conv.weight" in shapes,
        "use_post_quant_conv": "post_quant_conv.weight" in shapes,
        "scaling_factor": 0.13025,
        "force_upcast": True,  # SDXL's VAE overflows in float16
        "sample_size": 1024,
    }


def text_encoder_config(shapes: Shapes, component: str) -> dict[str, Any]:
    """transformers' config.json of `component` (text_encoder: CLIP ViT-L, text_encoder_2: OpenCLIP
    ViT-bigG with its projection) for its tensors (transformers' names)."""
    architecture, activation = TEXT_ENCODERS[component]
    vocab, width = shape_of(shapes, "text_model.embeddings.token_embedding.weight")
    return {
        "architectures": [architecture],
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": shape_of(shapes, "text_model.encoder.layers.0.mlp.fc1.weight")[0],
        "num_hidden_layers": count(shapes, "text_model.encoder.layers.{}.self_attn.q_proj.weight"),
        "num_attention_heads": heads(width),
        "max_position_embeddings": shape_of(shapes, "text_model.embeddings.position_embedding.weight")[0],
        "hidden_act": activation,
        "layer_norm_eps": 1e-5,
        # CLIPTextModel has no projection; its config says the width, as SDXL's does (768).
        "projection_dim": shape_of(shapes, "text_projection.weight")[0] if architecture.endswith("Projection")
        else width,
        **TOKEN_IDS,
    }


def component_configs(kind: str, shapes: Mapping[str, Shapes]) -> dict[str, dict[str, Any]]:
    """Each component's config.json, for {component: its tensors' shapes} of a file of `kind`."""
    configs = {}
    for component, component_shapes in shapes.items():
        if component in TEXT_ENCODERS:
            configs[component] = text_encoder_config(component_shapes, component)
        elif component == "vae":
            configs[component] = vae_config(component_shapes)
    if "unet" in shapes:
        pooled_width = configs["text_encoder_2"]["projection_dim"]
        configs["unet"] = unet_config(shapes["unet"], kind, pooled_width)
    return {component: configs[component] for component in shapes}


def check_configs(configs: Mapping[str, dict[str, Any]]) -> None:
    """Builds each config as jaxfuse's loaders will, so that one they refuse fails before any tensor is read."""
    readers = {"unet": UNetConfig.from_diffusers, "vae": VAEConfig.from_diffusers,
               "text_encoder": TextEncoderConfig.from_transformers,
               "text_encoder_2": TextEncoderConfig.from_transformers}
    for component, config in configs.items():
        readers[component](config)


def model_index(kind: str) -> dict[str, Any]:
    """`model_index.json` of an SDXL pipeline folder of `kind` ("sdxl" or "sdxl-refiner")."""
    index = {**PIPELINES[kind], **LIBRARIES}
    if kind == "sdxl-refiner":  # diffusers writes the refiner's absent first encoder as [null, null]
        index["text_encoder"] = index["tokenizer"] = [None, None]
    return index
