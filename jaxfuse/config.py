"""The model configurations diffusers describes in `config.json` files, as frozen dataclasses:
the UNet's (`UNetConfig`), a ControlNet's (`ControlNetConfig`) and the VAE's (`VAEConfig`), with
`ConfigError` and the field checks every model config shares. The text encoders' config is
`jaxfuse.text_encoder_config`; the parallel settings are `jaxfuse.parallel_config`.

A config is validated when it is built, so an unsupported checkpoint or setting fails here, with
the field named, before any weight is read or any function is traced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

# Re-exported for the modules that import the parallel settings from here (the pipeline, spec,
# generate, sampling and stream).
from jaxfuse.parallel_config import GroupNormMode as GroupNormMode
from jaxfuse.parallel_config import Mode as Mode
from jaxfuse.parallel_config import ParallelConfig as ParallelConfig
from jaxfuse.parallel_config import ParallelError as ParallelError

DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)
ADDITION_EMBED_TYPES = (None, "text_time")


class ConfigError(ValueError):
    """A checkpoint configuration that jaxfuse does not support; the message names the field."""


# diffusers `UNet2DConditionModel` defaults, for config files that leave a field out.
_DIFFUSERS_UNET_DEFAULTS: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "use_linear_projection": False,
    "upcast_attention": False,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None,
    "time_embedding_dim": None,
    "sample_size": None,
}

# Fields whose only supported value is the one given (the SDXL base and refiner value); anything
# else changes the architecture in a way the Flax modules do not implement.
_FIXED_FIELDS: dict[str, Any] = {
    "act_fn": "silu",
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "mid_block_scale_factor": 1,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
    "dropout": 0.0,
}


def _per_block(name: str, value: Any, num_blocks: int) -> tuple[int, ...]:
    """An int or a per-block sequence -> one int per block."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * num_blocks
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != num_blocks:
            raise ConfigError(
                f"{name}: {list(value)} has {len(value)} entries but the UNet has {num_blocks} "
                "down blocks; give one entry per block or a single int."
            )
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(
                f"{name}: {list(value)} must hold one int per block (nested per-layer lists "
                "are not supported)."
            )
        return tuple(value)
    raise ConfigError(f"{name}: expected an int or a list of ints, got {value!r}.")


def _single_context_dim(value: Any, num_blocks: int) -> int:
    """`cross_attention_dim` may be per block, but one text context feeds every block, so the
    entries must agree."""
    dims = set(_per_block("cross_attention_dim", value, num_blocks))
    if len(dims) != 1:
        raise ConfigError(
            f"cross_attention_dim: {value!r} differs between blocks; every block reads the same "
            "text embeddings, so jaxfuse needs one value."
        )
    return dims.pop()


def _check_class_name(config: Mapping[str, Any], expected: str) -> None:
    """diffusers configs name their model class; a missing name is taken as the expected one."""
    name = config.get("_class_name", expected)
    if name != expected:
        raise ConfigError(f"_class_name: {name!r} is not a {expected} config.")


def _check_groups_divide(num_groups: int, block_out_channels: Sequence[int]) -> None:
    for i, channels in enumerate(block_out_channels):
        if channels % num_groups:
            raise ConfigError(f"norm_num_groups: {num_groups} does not divide block {i}'s {channels} channels.")


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not supported; supported: {list(allowed)}.")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The SDXL-family `UNet2DConditionModel` architecture, one value per down block.

    The up blocks mirror the down blocks (diffusers reverses every per-block list for them).
    `num_attention_heads` is the number of heads; diffusers configs store it, for historical
    reasons, as `attention_head_dim` (see `from_diffusers`). Attention logits and softmax are
    always computed in float32, so `upcast_attention` needs no separate path.
    """

    block_out_channels: tuple[int, ...] = (320, 640, 1280)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    layers_per_block: tuple[int, ...] = (2, 2, 2)
    transformer_layers_per_block: tuple[int, ...] = (1, 2, 10)
    num_attention_heads: tuple[int, ...] = (5, 10, 20)
    cross_attention_dim: int = 2048
    in_channels: int = 4
    out_channels: int = 4
    use_linear_projection: bool = True
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    center_input_sample: bool = False
    downsample_padding: int = 1
    time_embedding_dim: int | None = None
    addition_embed_type: str | None = "text_time"
    addition_time_embed_dim: int | None = 256
    projection_class_embeddings_input_dim: int | None = 2816
    sample_size: int | None = 128

    def __post_init__(self):
        n = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types", "layers_per_block",
                     "transformer_layers_per_block", "num_attention_heads"):
            if len(getattr(self, name)) != n:
                raise ConfigError(
                    f"{name}: has {len(getattr(self, name))} entries, block_out_channels has {n}."
                )
        for t in self.down_block_types:
            check_choice("down_block_types", t, DOWN_BLOCK_TYPES)
        for t in self.up_block_types:
            check_choice("up_block_types", t, UP_BLOCK_TYPES)
        check_choice("addition_embed_type", self.addition_embed_type, ADDITION_EMBED_TYPES)
        if self.addition_embed_type == "text_time" and (
            self.addition_time_embed_dim is None or self.projection_class_embeddings_input_dim is None
        ):
            raise ConfigError(
                "addition_embed_type 'text_time' needs addition_time_embed_dim and "
                "projection_class_embeddings_input_dim."
            )
        for i, (channels, heads) in enumerate(zip(self.block_out_channels, self.num_attention_heads)):
            if channels % heads:
                raise ConfigError(
                    f"num_attention_heads (diffusers config: attention_head_dim): block {i} has "
                    f"{channels} channels, not divisible by {heads} heads."
                )
        _check_groups_divide(self.norm_num_groups, self.block_out_channels)

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def downsample_factor(self) -> int:
        """The latent height and width must be multiples of this (one 2x step per level)."""
        return 2 ** (self.num_levels - 1)

    @property
    def num_skips(self) -> int:
        """The skips the down path makes: `conv_in`'s, one per ResNet (with its transformer) and one
        per downsampler; DeepCache's branches are numbered by them (`jaxfuse.step_cache`)."""
        return 1 + sum(self.layers_per_block) + self.num_levels - 1

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> UNetConfig:
        """Reads a diffusers `unet/config.json` dict; raises `ConfigError` naming the field."""
        _check_class_name(config, "UNet2DConditionModel")
        for name, supported in _FIXED_FIELDS.items():
            value = config.get(name, supported)
            if value != supported:
                raise ConfigError(
                    f"{name}: {value!r} is not supported (jaxfuse implements the SDXL UNet, "
                    f"which uses {supported!r})."
                )
        c = {**_DIFFUSERS_UNET_DEFAULTS, **config}
        n = len(c["block_out_channels"])
        check_choice("mid_block_type", c["mid_block_type"], MID_BLOCK_TYPES)
        # diffusers' naming quirk: `attention_head_dim` holds the number of heads unless
        # `num_attention_heads` is given.
        heads = c["num_attention_heads"] or c["attention_head_dim"]
        return cls(
            block_out_channels=tuple(c["block_out_channels"]),
            down_block_types=tuple(c["down_block_types"]),
            up_block_types=tuple(c["up_block_types"]),
            layers_per_block=_per_block("layers_per_block", c["layers_per_block"], n),
            transformer_layers_per_block=_per_block(
                "transformer_layers_per_block", c["transformer_layers_per_block"], n
            ),
            num_attention_heads=_per_block("attention_head_dim", heads, n),
            cross_attention_dim=_single_context_dim(c["cross_attention_dim"], n),
            in_channels=c["in_channels"],
            out_channels=c["out_channels"],
            use_linear_projection=bool(c["use_linear_projection"]),
            upcast_attention=bool(c["upcast_attention"]),
            norm_num_groups=c["norm_num_groups"],
            norm_eps=float(c["norm_eps"]),
            flip_sin_to_cos=bool(c["flip_sin_to_cos"]),
            freq_shift=float(c["freq_shift"]),
            center_input_sample=bool(c["center_input_sample"]),
            downsample_padding=c["downsample_padding"],
            time_embedding_dim=c["time_embedding_dim"],
            addition_embed_type=c["addition_embed_type"],
            addition_time_embed_dim=c["addition_time_embed_dim"],
            projection_class_embeddings_input_dim=c["projection_class_embeddings_input_dim"],
            sample_size=c["sample_size"],
        )

    @classmethod
    def sdxl_base(cls) -> UNetConfig:
        """stabilityai/stable-diffusion-xl-base-1.0 `unet/config.json` (2.6B parameters)."""
        return cls()

    @classmethod
    def sdxl_refiner(cls) -> UNetConfig:
        """stabilityai/stable-diffusion-xl-refiner-1.0 `unet/config.json`."""
        return cls(
            block_out_channels=(384, 768, 1536, 1536),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=(2, 2, 2, 2),
            transformer_layers_per_block=(4, 4, 4, 4),
            num_attention_heads=(6, 12, 24, 24),
            cross_attention_dim=1280,
            upcast_attention=True,
            projection_class_embeddings_input_dim=2560,
        )

    @classmethod
    def tiny(cls) -> UNetConfig:
        """A small SDXL-shaped UNet (three levels, the first without attention) for tests and
        examples: about 2M parameters."""
        return cls(
            block_out_channels=(32, 64, 64),
            layers_per_block=(1, 1, 1),
            transformer_layers_per_block=(1, 1, 2),
            num_attention_heads=(2, 4, 4),
            cross_attention_dim=32,
            norm_num_groups=8,
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
            sample_size=16,
        )


# diffusers `ControlNetModel` defaults for the fields a ControlNet adds to the UNet's.
_DIFFUSERS_CONTROLNET_DEFAULTS: dict[str, Any] = {
    "conditioning_channels": 3,
    "conditioning_embedding_out_channels": (16, 32, 96, 256),
    "controlnet_conditioning_channel_order": "rgb",
    "global_pool_conditions": False,
}
CHANNEL_ORDERS = ("rgb", "bgr")


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """diffusers `ControlNetModel`: a copy of a UNet's down path and middle block (`unet`, whose up
    blocks it does not have), reading a control image through a small convolutional embedding
    (`embedding_channels`, each stage after the first halving the size), with one zero 1x1
    convolution per skip and one after the middle block.

    `channel_order` "bgr": the ControlNet was trained on BGR images and flips the RGB image it is
    given; `global_pool_conditions`: its residuals are averaged over the image (and the pipeline
    runs it in guess mode)."""

    unet: UNetConfig = UNetConfig()
    conditioning_channels: int = 3
    embedding_channels: tuple[int, ...] = (16, 32, 96, 256)
    channel_order: str = "rgb"
    global_pool_conditions: bool = False

    def __post_init__(self):
        check_choice("controlnet_conditioning_channel_order", self.channel_order, CHANNEL_ORDERS)
        if 2 ** (len(self.embedding_channels) - 1) != 8:
            raise ConfigError(f"conditioning_embedding_out_channels: {list(self.embedding_channels)} halves the "
                              f"control image {len(self.embedding_channels) - 1} times; jaxfuse's VAE factor of 8 "
                              "needs 3 (four entries).")

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> ControlNetConfig:
        """Reads a diffusers ControlNet `config.json` dict; raises `ConfigError` naming the field."""
        _check_class_name(config, "ControlNetModel")
        c = {**_DIFFUSERS_CONTROLNET_DEFAULTS, **config}
        down = c.get("down_block_types", _DIFFUSERS_UNET_DEFAULTS["down_block_types"])
        # The UNet config it copies, with the up blocks that mirror its down blocks (never built).
        up = tuple("CrossAttnUpBlock2D" if t == "CrossAttnDownBlock2D" else "UpBlock2D" for t in reversed(down))
        unet = UNetConfig.from_diffusers({**c, "_class_name": "UNet2DConditionModel", "up_block_types": up})
        return cls(unet, int(c["conditioning_channels"]), tuple(c["conditioning_embedding_out_channels"]),
                   c["controlnet_conditioning_channel_order"], bool(c["global_pool_conditions"]))

    @classmethod
    def tiny(cls) -> ControlNetConfig:
        """The ControlNet of `UNetConfig.tiny()`, with a narrower embedding."""
        return cls(UNetConfig.tiny(), embedding_channels=(8, 8, 16, 16))


VAE_DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
VAE_UP_BLOCK_TYPES = ("UpDecoderBlock2D",)

# diffusers `AutoencoderKL` defaults, for config files that leave a field out.
_DIFFUSERS_VAE_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": VAE_DOWN_BLOCK_TYPES,
    "up_block_types": VAE_UP_BLOCK_TYPES,
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


def _optional_tuple(value: Any) -> tuple | None:
    """A JSON list (or tuple) -> a tuple, so the frozen config stays hashable; None stays None."""
    return None if value is None else tuple(value)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """diffusers `AutoencoderKL` with `DownEncoderBlock2D` encoder and `UpDecoderBlock2D` decoder
    blocks and SiLU; the defaults are SDXL's VAE.

    The decoder takes a denoised latent `z` mapped back to the VAE's scale, as diffusers'
    pipelines do: `z / scaling_factor` (SDXL), `z * latents_std / scaling_factor + latents_mean`
    per channel when both are given, `z / scaling_factor + shift_factor` when that is given.
    `force_upcast`: the checkpoint is unsafe in float16 (SDXL's VAE overflows), so a pipeline
    running in lower precision should run the VAE in float32.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.13025
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    sample_size: int | tuple[int, ...] | None = 1024

    def __post_init__(self):
        if not isinstance(self.layers_per_block, int) or isinstance(self.layers_per_block, bool):
            raise ConfigError(
                f"layers_per_block: expected one int (the VAE uses the same depth at every level), "
                f"got {self.layers_per_block!r}."
            )
        _check_groups_divide(self.norm_num_groups, self.block_out_channels)
        for name in ("latents_mean", "latents_std"):
            values = getattr(self, name)
            if values is not None and len(values) != self.latent_channels:
                raise ConfigError(
                    f"{name}: has {len(values)} entries, one per latent channel expected "
                    f"(latent_channels is {self.latent_channels})."
                )

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side (one 2x step between levels)."""
        return 2 ** (self.num_levels - 1)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> VAEConfig:
        """Reads a diffusers `vae/config.json` dict; raises `ConfigError` naming the field."""
        _check_class_name(config, "AutoencoderKL")
        c = {**_DIFFUSERS_VAE_DEFAULTS, **config}
        check_choice("act_fn", c["act_fn"], ("silu",))
        n = len(c["block_out_channels"])
        for name, allowed in (("down_block_types", VAE_DOWN_BLOCK_TYPES),
                              ("up_block_types", VAE_UP_BLOCK_TYPES)):
            if len(c[name]) != n:
                raise ConfigError(f"{name}: has {len(c[name])} entries, block_out_channels has {n}.")
            for block_type in c[name]:
                check_choice(name, block_type, allowed)
        sample_size = c["sample_size"]
        return cls(
            in_channels=c["in_channels"],
            out_channels=c["out_channels"],
            latent_channels=c["latent_channels"],
            block_out_channels=tuple(c["block_out_channels"]),
            layers_per_block=c["layers_per_block"],
            norm_num_groups=c["norm_num_groups"],
            mid_block_add_attention=bool(c["mid_block_add_attention"]),
            use_quant_conv=bool(c["use_quant_conv"]),
            use_post_quant_conv=bool(c["use_post_quant_conv"]),
            scaling_factor=float(c["scaling_factor"]),
            shift_factor=None if c["shift_factor"] is None else float(c["shift_factor"]),
            latents_mean=_optional_tuple(c["latents_mean"]),
            latents_std=_optional_tuple(c["latents_std"]),
            force_upcast=bool(c["force_upcast"]),
            sample_size=sample_size if isinstance(sample_size, int) else _optional_tuple(sample_size),
        )

    @classmethod
    def sdxl(cls) -> VAEConfig:
        """stabilityai/stable-diffusion-xl-base-1.0 `vae/config.json` (84M parameters)."""
        return cls()
