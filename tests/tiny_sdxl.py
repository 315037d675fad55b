"""A tiny random SDXL pipeline in the diffusers format: the end-to-end oracle.

Two CLIP text encoders (one with the legacy `eos_token_id == 2` pooling, one with a projection
and the EOS id pooling), a CLIP tokenizer whose vocab/merges files are written here, a UNet with
SDXL's micro-conditioning and a 4-level VAE (factor 8, as in SDXL)."""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
from reference import perturbed, random_unet
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from jaxfuse.demo import architecture
from jaxfuse.demo.architecture import SDXL_SCHEDULER

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


def build(folder: Path) -> StableDiffusionXLPipeline:
    """Builds, saves to `folder` and returns the tiny pipeline."""
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
    vae = perturbed(AutoencoderKL(
        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=4,
        sample_size=64, scaling_factor=0.13025, force_upcast=True,
    ), 4)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                     scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER))
    pipe.save_pretrained(folder)
    return pipe
