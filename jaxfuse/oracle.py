"""diffusers (PyTorch) as the numerical oracle of the tests and benchmarks: small SDXL-shaped UNets
with random weights and their outputs on fixed inputs, and a tiny random SDXL pipeline saved in the
diffusers format (`build_tiny_sdxl`). Needs the `[test]` extra; the runtime never imports it.

The tiny pipeline: two CLIP text encoders (one with the legacy `eos_token_id == 2` pooling, one
with a projection and the EOS id pooling), a CLIP tokenizer whose vocab/merges files are written
here, a UNet with SDXL's micro-conditioning and a 4-level VAE (factor 8, as in SDXL)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from jaxfuse.demo import architecture
from jaxfuse.demo.architecture import SDXL_SCHEDULER

# Two SDXL-shaped configs that differ in depth, heads, transformer layers per block, group count,
# projection kind and number of micro-conditioning time ids.
BASE_LIKE = dict(
    block_out_channels=(32, 48, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 8),
    norm_num_groups=16,
    cross_attention_dim=40,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=24 + 6 * 8,
    sample_size=16,
)
REFINER_LIKE = dict(
    block_out_channels=(16, 32, 48, 48),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    transformer_layers_per_block=3,
    attention_head_dim=(1, 2, 3, 3),
    norm_num_groups=8,
    cross_attention_dim=24,
    use_linear_projection=False,
    upcast_attention=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=6,
    projection_class_embeddings_input_dim=20 + 5 * 6,
    sample_size=16,
)
# name -> (config, number of micro-conditioning time ids): base SDXL passes 6 (original size,
# crop corner, target size), the refiner 5 (original size, crop corner, aesthetic score).
CASES = {"base-like": (BASE_LIKE, 6), "refiner-like": (REFINER_LIKE, 5)}
TIME_IDS = {6: [[1024, 1024, 0, 0, 1024, 1024], [768, 1152, 16, 32, 1024, 1024]],
            5: [[1024, 1024, 0, 0, 6.0], [768, 1152, 16, 32, 2.5]]}


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """`model` in eval mode with every parameter perturbed, so no layer is an identity or zero."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def random_unet(config: dict, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return perturbed(UNet2DConditionModel(**config), seed)


def unet_inputs(config: dict, num_time_ids: int, height: int = 16, width: int = 24,
                seed: int = 1) -> dict[str, np.ndarray]:
    """Batch 2 of NCHW latents, per-sample timesteps, text context and SDXL conditioning."""
    rng = np.random.default_rng(seed)
    pooled = config["projection_class_embeddings_input_dim"] - num_time_ids * config["addition_time_embed_dim"]
    return {
        "sample": rng.standard_normal((2, 4, height, width), dtype=np.float32),
        "timesteps": np.array([999.0, 37.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 7, config["cross_attention_dim"]), dtype=np.float32),
        "text_embeds": rng.standard_normal((2, pooled), dtype=np.float32),
        "time_ids": np.array(TIME_IDS[num_time_ids], np.float32),
    }


def reference_output(model: UNet2DConditionModel, inputs: dict[str, np.ndarray]) -> np.ndarray:
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        out = model(
            t["sample"], t["timesteps"], encoder_hidden_states=t["encoder_hidden_states"],
            added_cond_kwargs={"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]},
        ).sample
    return out.numpy()


# The published `unet/config.json` of SDXL base 1.0 and refiner 1.0 (no weights needed).
SDXL_BASE_CONFIG = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": None,
    "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None, "use_linear_projection": True,
}
SDXL_REFINER_CONFIG = {
    **SDXL_BASE_CONFIG,
    "attention_head_dim": [6, 12, 24, 24], "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "projection_class_embeddings_input_dim": 2560, "transformer_layers_per_block": 4,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": True,
}


# --- the tiny SDXL pipeline -------------------------------------------------------------------

WORDS = ("red", "blue", "green", "circle", "square", "triangle", "star", "top", "left", "bottom")
TEXT_WIDTHS = (32, 48)  # hidden sizes of the two encoders; the UNet context is their sum
POOLED = 24  # projection_dim of the second encoder


def write_tokenizer(folder: Path, pad_token: str) -> CLIPTokenizer:
    """A CLIP tokenizer whose merges spell `WORDS`: every other word falls back to bytes."""
    architecture.write_tokenizer(folder, WORDS, pad_token)
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def text_config(hidden: int, layers: int, act: str, eos_token_id: int, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=600, hidden_size=hidden, intermediate_size=2 * hidden + 5,
                          num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=77,
                          hidden_act=act, bos_token_id=0, eos_token_id=eos_token_id, pad_token_id=1, **extra)


def tiny_vae() -> AutoencoderKL:
    """The tiny pipelines' VAE (the same weights in each, as SDXL's base and refiner share theirs)."""
    return perturbed(AutoencoderKL(
        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=4,
        sample_size=64, scaling_factor=0.13025, force_upcast=True,
    ), 4)


def build_tiny_sdxl(folder: Path) -> StableDiffusionXLPipeline:
    """Builds, saves to `folder` and returns the tiny pipeline. Its tokenizer folders hold the classic
    files (vocab.json, merges.txt) only; the returned pipeline's `save_pretrained` writes transformers
    5's layout (tokenizer.json only)."""
    # Every model's initial weights from a fixed seed: the first text encoder's would otherwise come
    # from whatever state torch's generator is in, and a test measuring an approximation on these
    # weights would see another model in every session.
    torch.manual_seed(0)
    tokenizer = write_tokenizer(folder / "tokenizer", pad_token="<|endoftext|>")
    tokenizer_2 = write_tokenizer(folder / "tokenizer_2", pad_token="!")  # as SDXL's second tokenizer
    eos = tokenizer.eos_token_id
    text_encoder = perturbed(CLIPTextModel(text_config(TEXT_WIDTHS[0], 3, "quick_gelu", 2)), 1)
    text_encoder_2 = perturbed(CLIPTextModelWithProjection(
        text_config(TEXT_WIDTHS[1], 2, "gelu", eos, projection_dim=POOLED)), 2)
    unet = random_unet(dict(
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), norm_num_groups=8,
        cross_attention_dim=sum(TEXT_WIDTHS), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=POOLED + 6 * 8, sample_size=8,
    ), seed=3)
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                     scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER))
    pipe.save_pretrained(folder)
    for name in ("tokenizer", "tokenizer_2"):  # the classic layout alone: transformers 5 added tokenizer.json
        (folder / name / "tokenizer.json").unlink(missing_ok=True)
    return pipe


def build_tiny_refiner(folder: Path) -> StableDiffusionXLImg2ImgPipeline:
    """Builds, saves to `folder` and returns a tiny refiner made as SDXL's is: the second text
    encoder alone, its micro-conditioning 5 time ids (the last an aesthetic score), a UNet of its
    own (4 levels, attention in the middle two, as the refiner's) and the tiny pipeline's VAE."""
    torch.manual_seed(0)
    tokenizer_2 = write_tokenizer(folder / "tokenizer_2", pad_token="!")
    text_encoder_2 = perturbed(CLIPTextModelWithProjection(
        text_config(TEXT_WIDTHS[1], 2, "gelu", tokenizer_2.eos_token_id, projection_dim=POOLED)), 5)
    unet = random_unet(dict(
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, transformer_layers_per_block=2, attention_head_dim=(1, 2, 2, 2), norm_num_groups=8,
        cross_attention_dim=TEXT_WIDTHS[1], use_linear_projection=True, upcast_attention=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=POOLED + 5 * 8, sample_size=8,
    ), seed=6)
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=tiny_vae(), text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None, tokenizer_2=tokenizer_2,
        unet=unet, scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False)
    pipe.save_pretrained(folder)
    (folder / "tokenizer_2" / "tokenizer.json").unlink(missing_ok=True)
    return pipe


# A narrow conditioning embedding for the tiny ControlNets (SDXL's is (16, 32, 96, 256)).
TINY_EMBEDDING = (8, 8, 16, 16)


def build_tiny_controlnet(unet: UNet2DConditionModel, folder: Path | None = None, seed: int = 7,
                          **config) -> ControlNetModel:
    """A ControlNet made from `unet` as diffusers' `ControlNetModel.from_unet` makes one (its down
    path and middle block copied), every weight then perturbed (the zero convolutions too, so that
    the control counts), saved to `folder` when given; `config`: the ControlNet's own settings
    (`controlnet_conditioning_channel_order`, `global_pool_conditions`, ...)."""
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=TINY_EMBEDDING)
    if config:
        net = ControlNetModel.from_config({**net.config, **config})
        net.load_state_dict(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=TINY_EMBEDDING)
                            .state_dict())
    net = perturbed(net, seed)
    if folder is not None:
        net.save_pretrained(folder)
    return net
