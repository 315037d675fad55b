"""SDXL's ControlNet (diffusers `ControlNetModel` with the `text_time` addition embedding) in Flax.

A ControlNet is the UNet's own first layers, down blocks and middle block (`unet.inputs`,
`unet.down_path`, `unet.MidBlock`, under the same names, so its checkpoint converts by the UNet's
renaming rule), with the control image embedded by a few convolutions and added after `conv_in`,
and a zero 1x1 convolution on each skip and on the middle block's output. Its outputs are
`unet.Residuals` that the UNet adds to its skips. Every layer takes the step's `Patch`, so a
ControlNet splits by rows over devices exactly as the UNet does: its convolutions, attention and
group norms exchange context (stale in displaced steps), its residuals are each device's own rows.

    net = ControlNetModel(cfg)
    residuals = net.apply({"params": params}, sample, t, context, image, text_embeds, time_ids, scale)
    noise = unet.apply({"params": unet_params}, sample, t, context, text_embeds, time_ids, control=residuals)

Legend: B batch, C channels, H/W the latent's rows and columns (8 H / 8 W the control image's).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxfuse.checkpoint import CONFIG_NAME, load_params
from jaxfuse.config import ControlNetConfig
from jaxfuse.models.layers import Conv2d, Dtype
from jaxfuse.models.unet import MidBlock, Residuals, check_inputs, down_path, inputs
from jaxfuse.parallel import patch as px
from jaxfuse.parallel.patch import Patch

# diffusers' `conditioning_scale` ramp in guess mode: the skips from 0.1 (shallowest) to 1 (the middle block).
GUESS_RAMP = (-1.0, 0.0)


class ConditioningEmbedding(nn.Module):
    """diffusers `ControlNetConditioningEmbedding`: 3x3 convolutions with SiLU, each stage after the
    first opened by a stride-2 one (padded one pixel on every side, as PyTorch's `padding=1`), then
    a 3x3 convolution to the UNet's first width. [B, 8 H, 8 W, 3] -> [B, H, W, C0]."""

    channels: tuple[int, ...]
    features: int
    dtype: Dtype = jnp.float32
    patch: Patch = Patch()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def conv(features, name, stride=1):
            return Conv2d(features, stride=stride, padding=((1, 1), (1, 1)), dtype=self.dtype, patch=self.patch,
                          name=name)

        x = nn.silu(conv(self.channels[0], "conv_in")(x))
        for i, (width, wider) in enumerate(zip(self.channels, self.channels[1:])):
            x = nn.silu(conv(width, f"blocks_{2 * i}")(x))
            x = nn.silu(conv(wider, f"blocks_{2 * i + 1}", stride=2)(x))
        return conv(self.features, "conv_out")(x)


def skip_channels(cfg: ControlNetConfig) -> list[int]:
    """The channels of each skip the down path makes (conv_in's, one per layer, one per downsampler)."""
    unet = cfg.unet
    channels = [unet.block_out_channels[0]]
    for i, width in enumerate(unet.block_out_channels):
        channels += [width] * (unet.layers_per_block[i] + (i < unet.num_levels - 1))
    return channels


class ControlNetModel(nn.Module):
    """The ControlNet. `__call__` mirrors diffusers' forward:

    sample [B, C_in, H, W] (NCHW), timesteps [] or [B], encoder_hidden_states [B, S, context],
    controlnet_cond [B, 3, 8 H, 8 W] the control image in [0, 1] (RGB: a "bgr" ControlNet flips
    it), text_embeds [B, pooled], time_ids [B, K], conditioning_scale [] or [B] (per row: 0 on
    rows the ControlNet must not move) -> `Residuals` (NHWC, one per skip, and the middle
    block's), scaled (`scaled`), averaged over the image when the config's
    `global_pool_conditions` says so.
    """

    cfg: ControlNetConfig
    dtype: Dtype = jnp.float32
    patch: Patch = Patch()

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, controlnet_cond, text_embeds=None,
                 time_ids=None, conditioning_scale=1.0, guess_mode: bool = False) -> Residuals:
        cfg, unet = self.cfg, self.cfg.unet
        check_inputs(unet, sample, encoder_hidden_states, text_embeds, time_ids)
        expected = (sample.shape[0], cfg.conditioning_channels, 8 * sample.shape[2], 8 * sample.shape[3])
        if controlnet_cond.shape != expected:
            raise ValueError(f"controlnet_cond must be [B, {cfg.conditioning_channels}, 8 H, 8 W] = {expected} for "
                             f"sample {sample.shape}, got {controlnet_cond.shape}.")
        image = jnp.transpose(controlnet_cond, (0, 2, 3, 1)).astype(self.dtype)
        if cfg.channel_order == "bgr":
            image = image[..., ::-1]
        x, temb, context = inputs(unet, self.dtype, self.patch, sample, timesteps, encoder_hidden_states,
                                  text_embeds, time_ids)
        x = x + ConditioningEmbedding(cfg.embedding_channels, unet.block_out_channels[0], self.dtype, self.patch,
                                      name="controlnet_cond_embedding")(image)
        x, skips = down_path(unet, self.dtype, self.patch, x, temb, context)
        x = MidBlock(unet, self.dtype, self.patch, name="mid_block")(x, temb, context)
        down = tuple(Conv2d(c, kernel_size=1, dtype=self.dtype, name=f"controlnet_down_blocks_{j}")(skip)
                     for j, (c, skip) in enumerate(zip(skip_channels(cfg), skips)))
        middle = Conv2d(unet.block_out_channels[-1], kernel_size=1, dtype=self.dtype, name="controlnet_mid_block")(x)
        scale = jnp.broadcast_to(jnp.asarray(conditioning_scale, jnp.float32), (sample.shape[0],))
        residuals = scaled(Residuals(down, middle), scale, guess_mode and not cfg.global_pool_conditions)
        if cfg.global_pool_conditions:
            residuals = jax.tree.map(lambda r: px.image_mean(r, self.patch.split), residuals)
        return residuals


def scaled(residuals: Residuals, scale: jax.Array, guess: bool) -> Residuals:
    """The residuals times the conditioning scale of each batch row [B]. `guess` (guess mode, for
    a ControlNet without pooled conditions): the skips' scales ramp up log-uniformly from 0.1 to 1
    towards the middle block, as diffusers' `torch.logspace(-1, 0, n + 1)`."""
    count = len(residuals.down) + 1
    ramp = jnp.logspace(*GUESS_RAMP, count) if guess else jnp.ones(count)

    def times(r, factor):
        return r * (scale * factor).astype(r.dtype)[:, None, None, None]

    return Residuals(tuple(times(r, ramp[j]) for j, r in enumerate(residuals.down)), times(residuals.middle, ramp[-1]))


def abstract_params(cfg: ControlNetConfig, dtype: Dtype = jnp.float32):
    """The parameter tree of `cfg` as `jax.ShapeDtypeStruct` leaves; nothing is allocated."""
    unet = cfg.unet
    f = unet.downsample_factor
    shapes = {"sample": (1, unet.in_channels, f, f), "encoder_hidden_states": (1, 1, unet.cross_attention_dim),
              "controlnet_cond": (1, cfg.conditioning_channels, 8 * f, 8 * f)}
    if unet.addition_embed_type == "text_time":  # one time id stands in for the K of the real model (see unet.py)
        shapes |= {"text_embeds": (1, unet.projection_class_embeddings_input_dim - unet.addition_time_embed_dim),
                   "time_ids": (1, 1)}
    arrays = {name: jax.ShapeDtypeStruct(shape, jnp.float32) for name, shape in shapes.items()}

    def init(sample, encoder_hidden_states, controlnet_cond, **extra):
        return ControlNetModel(cfg).init(jax.random.key(0), sample, jnp.zeros(()), encoder_hidden_states,
                                         controlnet_cond, **extra)

    tree = jax.eval_shape(init, **arrays)["params"]
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, dtype), tree)


def read_config(folder: str | Path) -> ControlNetConfig:
    """The config of a diffusers ControlNet folder (`config.json` beside its weights) or a converted one."""
    path = Path(folder).expanduser() / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent} has no {CONFIG_NAME}: pass a diffusers ControlNet folder "
                                "(config.json + diffusion_pytorch_model.safetensors).")
    return ControlNetConfig.from_diffusers(json.loads(path.read_text()))


def load_controlnet(folder: str | Path, dtype: Dtype = jnp.float32, param_dtype: Dtype | None = None,
                    variant: str | None = None) -> tuple[ControlNetModel, Any]:
    """(module, params) from a diffusers ControlNet folder or a converted one (as `unet.load_unet`)."""
    cfg = read_config(folder)
    params = load_params(Path(folder).expanduser(), abstract_params(cfg, param_dtype or dtype), variant)
    return ControlNetModel(cfg, dtype), params
