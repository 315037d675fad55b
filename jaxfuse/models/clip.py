"""The SDXL text encoders in Flax: transformers' `CLIPTextModel` (CLIP ViT-L, SDXL's
`text_encoder/`) and `CLIPTextModelWithProjection` (OpenCLIP bigG, `text_encoder_2/`).

Submodule names equal the transformers parameter names with `.N` written `_N`
(`text_model/encoder/layers_0/self_attn/q_proj`), so a checkpoint converts by the converter's one
renaming rule. The encoder returns what SDXL conditions on: the penultimate layer's hidden states
and the pooled (end-of-text) embedding.

Legend for shape lines: B batch, T tokens, C channels, N heads, D channels per head,
P projection width.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxfuse.checkpoint import CONFIG_NAME, component_folder, load_params
from jaxfuse.models.layers import Dtype, attention
from jaxfuse.text_encoder_config import TextEncoderConfig

WEIGHTS_NAME = "model"  # transformers' file stem: model.safetensors, model.fp16.safetensors
# Saved by older transformers versions next to the weights; not a parameter.
BUFFERS = ("position_ids",)
PREFIX = "text_model"  # the body's name; transformers 5 leaves it out of CLIPTextModel's tensor names
# Configs written before transformers PR #24773 carry this wrong end-of-text id; transformers
# then keeps the original CLIP rule of pooling at the largest token id (the end token is the last
# entry of CLIP's vocabulary). SDXL's published configs are such configs.
LEGACY_EOS_TOKEN_ID = 2


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's sigmoid approximation of GELU, x * sigmoid(1.702 x); any shape."""
    return x * jax.nn.sigmoid(1.702 * x)


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """[B, T] token ids -> [B] position of each sequence's end-of-text token (its first
    occurrence; padding after it may repeat it)."""
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


class TextEmbeddings(nn.Module):
    """Token plus learned position embeddings. [B, T] ids -> [B, T, C]."""

    cfg: TextEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.cfg
        tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="token_embedding")
        positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype,
                             name="position_embedding")
        return tokens(input_ids) + positions(jnp.arange(input_ids.shape[1]))[None]


class SelfAttention(nn.Module):
    """Causal multi-head self-attention with biased projections. [B, T, C] -> [B, T, C]."""

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        q, k, v = (nn.Dense(c, dtype=self.dtype, name=name)(x) for name in ("q_proj", "k_proj", "v_proj"))
        out = attention(q, k, v, self.num_heads, is_causal=True)
        return nn.Dense(c, dtype=self.dtype, name="out_proj")(out)


class MLP(nn.Module):
    """Linear -> GELU (quick or exact, per config) -> linear. [B, T, C] -> [B, T, C]."""

    cfg: TextEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(self.cfg.intermediate_size, dtype=self.dtype, name="fc1")(x)
        h = quick_gelu(h) if self.cfg.hidden_act == "quick_gelu" else nn.gelu(h, approximate=False)
        return nn.Dense(self.cfg.hidden_size, dtype=self.dtype, name="fc2")(h)


def layer_norm(cfg: TextEncoderConfig, dtype: Dtype, name: str) -> nn.LayerNorm:
    """Statistics in float32 (Flax promotes them), two-pass variance."""
    return nn.LayerNorm(cfg.layer_norm_eps, dtype=dtype, use_fast_variance=False, name=name)


class EncoderLayer(nn.Module):
    """Pre-norm residual self-attention then MLP. [B, T, C] -> [B, T, C]."""

    cfg: TextEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = layer_norm(self.cfg, self.dtype, "layer_norm1")(x)
        x = x + SelfAttention(self.cfg.num_attention_heads, self.dtype, name="self_attn")(h)
        h = layer_norm(self.cfg, self.dtype, "layer_norm2")(x)
        return x + MLP(self.cfg, self.dtype, name="mlp")(h)


class Encoder(nn.Module):
    """The stack of layers. [B, T, C] -> (input of the last layer, output of the last layer),
    both [B, T, C]: transformers' `hidden_states[-2]` and `hidden_states[-1]`."""

    cfg: TextEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        for i in range(self.cfg.num_hidden_layers):
            penultimate = x
            x = EncoderLayer(self.cfg, self.dtype, name=f"layers_{i}")(x)
        return penultimate, x


class TextTransformer(nn.Module):
    """transformers' `CLIPTextModel` body. [B, T] ids -> (penultimate hidden states [B, T, C],
    final-normed end-of-text state [B, C], the `pooler_output`)."""

    cfg: TextEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = TextEmbeddings(self.cfg, self.dtype, name="embeddings")(input_ids)
        penultimate, last = Encoder(self.cfg, self.dtype, name="encoder")(x)
        eos = eos_positions(input_ids, self.cfg.eos_token_id)
        # Layer norm acts on each token alone, so normalising only the pooled tokens equals
        # transformers' normalising every token and then picking.
        pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]
        return penultimate, layer_norm(self.cfg, self.dtype, "final_layer_norm")(pooled)


class CLIPTextEncoder(nn.Module):
    """An SDXL text encoder: [B, T] int ids (T <= max_position_embeddings) ->
    (penultimate hidden states [B, T, C], pooled [B, P] with the projection, else [B, C])."""

    cfg: TextEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        if input_ids.ndim != 2 or input_ids.shape[1] > self.cfg.max_position_embeddings:
            raise ValueError(
                f"input_ids: expected [batch, tokens] with at most {self.cfg.max_position_embeddings} "
                f"tokens, got shape {input_ids.shape}; tokenize with max_length="
                f"{self.cfg.max_position_embeddings} and truncation."
            )
        hidden, pooled = TextTransformer(self.cfg, self.dtype, name=PREFIX)(input_ids)
        if self.cfg.with_projection:
            pooled = nn.Dense(self.cfg.projection_dim, use_bias=False, dtype=self.dtype,
                              name="text_projection")(pooled)
        return hidden, pooled


def abstract_params(cfg: TextEncoderConfig, dtype: Dtype = jnp.float32):
    """The parameter tree of `cfg` as `jax.ShapeDtypeStruct` leaves; nothing is allocated."""
    ids = jax.ShapeDtypeStruct((1, cfg.max_position_embeddings), jnp.int32)
    tree = jax.eval_shape(lambda ids: CLIPTextEncoder(cfg).init(jax.random.key(0), ids), ids)["params"]
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, dtype), tree)


def read_config(folder: Path) -> TextEncoderConfig:
    """The config of a text encoder's folder (transformers' `config.json`)."""
    return TextEncoderConfig.from_transformers(json.loads((folder / CONFIG_NAME).read_text()))


def load_text_encoder(folder: str | Path, dtype: Dtype = jnp.float32, param_dtype: Dtype | None = None,
                      variant: str | None = None, component: str = "text_encoder",
                      ) -> tuple[CLIPTextEncoder, Any]:
    """(module, params) from a transformers `text_encoder/` or `text_encoder_2/` folder (or the
    pipeline folder holding `component/`) or a folder converted by jaxfuse.

    `dtype` is the compute dtype, `param_dtype` (default: `dtype`) the one the parameters are
    stored in; `variant="fp16"` picks `model.fp16.safetensors`. The config is checked before any
    weight is read.
    """
    folder = component_folder(folder, component)
    cfg = read_config(folder)
    params = load_params(folder, abstract_params(cfg, param_dtype or dtype), variant, WEIGHTS_NAME, BUFFERS, PREFIX)
    return CLIPTextEncoder(cfg, dtype), params
