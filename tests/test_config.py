"""UNetConfig.from_diffusers: the SDXL settings it reads and the clear errors for the rest."""

import pytest

from jaxfuse.config import ConfigError, UNetConfig
from jaxfuse.oracle import BASE_LIKE, SDXL_BASE_CONFIG


def test_per_block_values_accept_an_int_or_a_list():
    cfg = UNetConfig.from_diffusers({**SDXL_BASE_CONFIG, "transformer_layers_per_block": 3,
                                     "attention_head_dim": 10, "cross_attention_dim": [2048] * 3})
    assert cfg.transformer_layers_per_block == (3, 3, 3)
    assert cfg.num_attention_heads == (10, 10, 10)
    assert cfg.cross_attention_dim == 2048


def test_num_attention_heads_wins_over_the_legacy_field():
    cfg = UNetConfig.from_diffusers({**SDXL_BASE_CONFIG, "num_attention_heads": [4, 8, 16]})
    assert cfg.num_attention_heads == (4, 8, 16)


def test_missing_fields_take_diffusers_defaults():
    cfg = UNetConfig.from_diffusers({k: v for k, v in BASE_LIKE.items() if k != "norm_eps"})
    assert cfg.norm_eps == 1e-5 and cfg.flip_sin_to_cos and cfg.in_channels == 4


@pytest.mark.parametrize("field, value", [
    ("class_embed_type", "timestep"),
    ("resnet_time_scale_shift", "scale_shift"),
    ("act_fn", "gelu"),
    ("time_embedding_type", "fourier"),
    ("down_block_types", ["DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D"]),
    ("up_block_types", ["CrossAttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"]),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("addition_embed_type", "text_image"),
    ("transformer_layers_per_block", [1, 2]),
    ("transformer_layers_per_block", [[1], [2, 2], [10] * 10]),
    ("cross_attention_dim", [768, 2048, 2048]),
    ("attention_head_dim", [5, 10, 21]),
    ("norm_num_groups", 48),
])
def test_unsupported_setting_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        UNetConfig.from_diffusers({**SDXL_BASE_CONFIG, field: value})


def test_not_a_unet_config():
    with pytest.raises(ConfigError, match="_class_name"):
        UNetConfig.from_diffusers({"_class_name": "AutoencoderKL"})
