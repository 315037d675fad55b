"""transformers' CLIP text-encoder configuration (`text_encoder/config.json`,
`text_encoder_2/config.json`) as a frozen dataclass, validated when it is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from jaxfuse.config import ConfigError, check_choice

TEXT_ENCODER_HIDDEN_ACTS = ("quick_gelu", "gelu")
# transformers `architectures` entry -> whether the model ends in a `text_projection`.
TEXT_ENCODER_ARCHITECTURES = {"CLIPTextModel": False, "CLIPTextModelWithProjection": True}

# transformers `CLIPTextConfig` defaults, for config files that leave a field out.
_TRANSFORMERS_CLIP_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "eos_token_id": 49407,
}


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """transformers' CLIP text encoder: `CLIPTextModel`, or `CLIPTextModelWithProjection` when
    `with_projection`; the defaults are SDXL's first encoder (CLIP ViT-L/14).

    `eos_token_id` decides where the pooled token is: 2, the wrong id that configs written before
    transformers fixed it carry (SDXL's among them), means the largest token id of the sequence,
    as in the original CLIP; any other id, its first position.
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    eos_token_id: int = 2
    with_projection: bool = False

    def __post_init__(self):
        check_choice("hidden_act", self.hidden_act, TEXT_ENCODER_HIDDEN_ACTS)
        if self.num_hidden_layers < 1:
            raise ConfigError(
                f"num_hidden_layers: {self.num_hidden_layers}; SDXL reads the input of the last "
                "layer, so at least 1 is needed."
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"num_attention_heads: {self.num_attention_heads} does not divide hidden_size "
                f"{self.hidden_size}."
            )
        if not isinstance(self.eos_token_id, int) or isinstance(self.eos_token_id, bool):
            raise ConfigError(f"eos_token_id: expected one int, got {self.eos_token_id!r}.")

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> TextEncoderConfig:
        """Reads a transformers `text_encoder/` or `text_encoder_2/` `config.json` dict; raises
        `ConfigError` naming the field."""
        architectures = config.get("architectures")
        if not (isinstance(architectures, Sequence) and len(architectures) == 1
                and architectures[0] in TEXT_ENCODER_ARCHITECTURES):
            raise ConfigError(
                f"architectures: {architectures!r} is not supported; supported: one of "
                f"{list(TEXT_ENCODER_ARCHITECTURES)}."
            )
        check_choice("model_type", config.get("model_type", "clip_text_model"), ("clip_text_model",))
        c = {**_TRANSFORMERS_CLIP_TEXT_DEFAULTS, **config}
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=c["num_attention_heads"],
            max_position_embeddings=c["max_position_embeddings"],
            hidden_act=c["hidden_act"],
            layer_norm_eps=float(c["layer_norm_eps"]),
            projection_dim=c["projection_dim"],
            eos_token_id=c["eos_token_id"],
            with_projection=TEXT_ENCODER_ARCHITECTURES[architectures[0]],
        )

    @classmethod
    def clip_l(cls) -> TextEncoderConfig:
        """stabilityai/stable-diffusion-xl-base-1.0 `text_encoder/config.json` (CLIP ViT-L/14)."""
        return cls()

    @classmethod
    def open_clip_bigg(cls) -> TextEncoderConfig:
        """stabilityai/stable-diffusion-xl-base-1.0 `text_encoder_2/config.json` (OpenCLIP
        ViT-bigG/14, with its projection)."""
        return cls(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            hidden_act="gelu",
            projection_dim=1280,
            with_projection=True,
        )
