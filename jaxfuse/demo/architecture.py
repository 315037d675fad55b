"""The demo model's architecture and its diffusers folder: SDXL's modules, only smaller.

The model is an SDXL pipeline in every structural respect: a factor-8 AutoencoderKL with 4 latent
channels, two CLIP text encoders (the first pooled at the largest token id as SDXL's CLIP-L is,
the second with a projection, as OpenCLIP bigG), CLIP tokenizers whose merges spell the scene
vocabulary, a UNet with `text_time` micro-conditioning and SDXL's Euler scheduler. `save_pipeline`
writes it in the diffusers layout, so jaxfuse loads it by the path real SDXL takes, and diffusers
can load it too.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from jaxfuse.checkpoint import CONFIG_NAME
from jaxfuse.config import UNetConfig, VAEConfig
from jaxfuse.demo.scenes import VOCABULARY
from jaxfuse.models.clip import WEIGHTS_NAME as TEXT_WEIGHTS_NAME
from jaxfuse.text_encoder_config import TextEncoderConfig
from jaxfuse.weight_conversion import WEIGHTS_NAME, export_checkpoint

# The model's resolution: 32 x 32 latents, 4 latent rows per patch on 8 devices. At 128 pixels a
# shape is 3 to 4 latents wide and this small VAE rounds stars and triangles into blobs; at 256 the
# detector finds the shapes it decodes.
IMAGE_SIZE = 256
TEXT_WIDTH = 64
POOLED_WIDTH = 64
TIME_ID_WIDTH = 16
SOS, EOS = "<|startoftext|>", "<|endoftext|>"
# SDXL's scheduler_config.json (stabilityai/stable-diffusion-xl-base-1.0).
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes that byte-level BPE (GPT-2, CLIP) works on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def tokenizer_files(words: tuple[str, ...], pad_token: str) -> dict[str, str]:
    """A CLIP tokenizer's files (name -> text) whose merges spell each of `words` as one token;
    any other text falls back to byte tokens. The end-of-text token has the largest id, as in
    CLIP, which the legacy pooling rule relies on."""
    symbols = byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in words:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1], *parts[2:]]
            vocab.append(parts[0])
    vocab = list(dict.fromkeys(vocab)) + [SOS, EOS]
    return {
        "vocab.json": json.dumps({token: i for i, token in enumerate(vocab)}),
        "merges.txt": "#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n",
        "tokenizer_config.json": json.dumps({
            "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
            "bos_token": SOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}),
    }


def write_tokenizer(folder: Path, words: tuple[str, ...], pad_token: str) -> None:
    """Writes `tokenizer_files` into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in tokenizer_files(words, pad_token).items():
        (folder / name).write_text(text)


# SDXL pads its first tokenizer with the end token and its second with "!".
PAD_TOKENS = (EOS, "!")
VOCAB_SIZE = len(json.loads(tokenizer_files(VOCABULARY, EOS)["vocab.json"]))


@dataclasses.dataclass(frozen=True)
class DemoArchitecture:
    """The configs of the demo pipeline's four models."""

    vae: VAEConfig
    text_encoders: tuple[TextEncoderConfig, TextEncoderConfig]
    unet: UNetConfig


def demo_architecture(scaling_factor: float = 1.0) -> DemoArchitecture:
    """The shipped model's configs; `scaling_factor` is measured on the trained VAE's latents."""
    vae = VAEConfig(block_out_channels=(8, 16, 32, 64), layers_per_block=1, norm_num_groups=4,
                    scaling_factor=scaling_factor, force_upcast=False, sample_size=IMAGE_SIZE)
    encoder = dict(vocab_size=VOCAB_SIZE, hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
                   num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77)
    eos_id = VOCAB_SIZE - 1
    text_encoders = (
        TextEncoderConfig(**encoder, hidden_act="quick_gelu", eos_token_id=2),
        TextEncoderConfig(**encoder, hidden_act="gelu", eos_token_id=eos_id, projection_dim=POOLED_WIDTH,
                          with_projection=True),
    )
    # Three levels, 32 -> 16 -> 8 latents; text enters at the 8 x 8 level, where a grid cell of the
    # scenes is a few latents across, and through the pooled embedding everywhere.
    unet = UNetConfig(
        block_out_channels=(32, 64, 96),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=(1, 1, 1),
        transformer_layers_per_block=(1, 1, 2),
        num_attention_heads=(1, 2, 3),
        cross_attention_dim=2 * TEXT_WIDTH,
        norm_num_groups=8,
        addition_time_embed_dim=TIME_ID_WIDTH,
        projection_class_embeddings_input_dim=POOLED_WIDTH + 6 * TIME_ID_WIDTH,
        sample_size=IMAGE_SIZE // vae.downsample_factor,
    )
    return DemoArchitecture(vae, text_encoders, unet)


def unet_config_json(cfg: UNetConfig) -> dict[str, Any]:
    """The diffusers `unet/config.json` of `cfg` (diffusers stores the head counts as
    `attention_head_dim`)."""
    return {
        "_class_name": "UNet2DConditionModel",
        "block_out_channels": list(cfg.block_out_channels),
        "down_block_types": list(cfg.down_block_types),
        "up_block_types": list(cfg.up_block_types),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "layers_per_block": list(cfg.layers_per_block),
        "transformer_layers_per_block": list(cfg.transformer_layers_per_block),
        "attention_head_dim": list(cfg.num_attention_heads),
        "cross_attention_dim": cfg.cross_attention_dim,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "use_linear_projection": cfg.use_linear_projection,
        "norm_num_groups": cfg.norm_num_groups,
        "norm_eps": cfg.norm_eps,
        "addition_embed_type": cfg.addition_embed_type,
        "addition_time_embed_dim": cfg.addition_time_embed_dim,
        "projection_class_embeddings_input_dim": cfg.projection_class_embeddings_input_dim,
        "sample_size": cfg.sample_size,
    }


def vae_config_json(cfg: VAEConfig) -> dict[str, Any]:
    n = len(cfg.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "block_out_channels": list(cfg.block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "layers_per_block": cfg.layers_per_block,
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_num_groups,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "act_fn": "silu",
        "scaling_factor": cfg.scaling_factor,
        "force_upcast": cfg.force_upcast,
        "sample_size": cfg.sample_size,
    }


def text_encoder_config_json(cfg: TextEncoderConfig) -> dict[str, Any]:
    return {
        "architectures": ["CLIPTextModelWithProjection" if cfg.with_projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": cfg.hidden_act,
        "layer_norm_eps": cfg.layer_norm_eps,
        "projection_dim": cfg.projection_dim,
        "bos_token_id": VOCAB_SIZE - 2,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": 1,
    }


MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")


def save_pipeline(folder: Path, arch: DemoArchitecture, params: dict[str, Any], dtype=np.float16) -> None:
    """Writes a diffusers SDXL pipeline folder: `params` maps `unet`, `vae`, `text_encoder` and
    `text_encoder_2` to Flax parameter trees of `arch`'s models; weights go to safetensors in
    `dtype` under the names diffusers and transformers use."""
    configs = {
        "unet": unet_config_json(arch.unet),
        "vae": vae_config_json(arch.vae),
        "text_encoder": text_encoder_config_json(arch.text_encoders[0]),
        "text_encoder_2": text_encoder_config_json(arch.text_encoders[1]),
    }
    for component, config in configs.items():
        _write_json(folder / component / CONFIG_NAME, config)
        tensors = export_checkpoint(params[component])
        stem = TEXT_WEIGHTS_NAME if component.startswith("text_encoder") else WEIGHTS_NAME
        save_file({k: np.ascontiguousarray(v.astype(dtype)) for k, v in tensors.items()},
                  str(folder / component / f"{stem}.safetensors"))
    for name, pad in zip(("tokenizer", "tokenizer_2"), PAD_TOKENS):
        write_tokenizer(folder / name, VOCABULARY, pad)
    _write_json(folder / "scheduler" / "scheduler_config.json", SDXL_SCHEDULER)
    _write_json(folder / "model_index.json", MODEL_INDEX)
