"""The VAE's decode and encode in tiles, equal to the untiled passes, at image sizes whose whole
activations do not fit a device.

    image = tiled_decode(vae, params, latents, tile=64)                     # numpy [B, 3, 8h, 8w]
    mean, logvar = tiled_encode(vae, params, images, tile=64, mesh=views_mesh(4))

`tile` counts latent pixels in both directions (64: 512 image pixels). The latent is cut into
tile x tile squares in raster order (tiles need not divide it: the last row and column may
overhang the image), and every activation of the network into the same squares scaled to its
resolution, so a tile owns the same part of the image at every layer.

Exact, not approximate. The network (`vae.encoder_blocks`, `vae.decoder_blocks`: the one
description the Flax modules follow too) runs as stages cut at its group norms, one pass over
every tile per stage: a ResNet is two stages, the mid-block attention two (every token's keys and
values, then each tile's queries over them), a convolution, an up- or a downsampling one. In a
stage a tile reads its inputs cropped with the halo its convolution needs (a row and a column on
each side; after, for the VAE's stride-2 convolution), positions outside the image acting as the
convolution's zero padding; normalises with the whole image's statistics, gathered in the stage
before from every tile's own pixels (each tile's mean and variance in float32 by two passes, as
the untiled group norm, pooled exactly on the host); computes up to the next group norm; and gives
back its own pixels and their statistics. Residual connections read the stage before's
activations. The result differs from the untiled pass by float rounding only: about 1e-6 of the
output's range, as far from a float64 decode as the untiled float32 one.

Memory. The whole activations between stages live on the host (numpy, in the compute dtype): at
most three at once (a ResNet's input, its hidden activation and its output), each with a border
of zeros and the last tiles' overhang. A device holds the VAE's parameters and at most two rounds
of tiles in flight (one computing, one coming back): their input crops, outputs and temporaries,
bounded by the tile and not by the image. Not bounded by the tile: the latents on their way in
and the encoder's output on its way out (latent resolution, a few channels), and the attention
stages, which hold every token's keys and values (two [B, h w, C], at latent resolution) and at
most `LOGITS_BYTES` of logits (on CPU; a fused kernel stores none). benchmarks/vae_memory.py
measures it for SDXL's VAE in float32 with 64-pixel tiles: 1.7 GB per device up to 2048², where
the untiled decode needs 35 GB (11 GB without its attention's logits); at 8192² 9.1 GB, all but
1.7 of it the attention's keys, values and logits, against 173 GB untiled without the logits,
with 138 GB on the host. The price is transfers: every stage sends its inputs to the devices and
its output back, so on an accelerator a tiled pass is bound by host-device bandwidth; use it where
the untiled pass does not fit.

Over devices (`mesh`, of this process's devices, any axes): a round runs one tile on each device.
The tiles of a round are independent and their statistics come back to the host with their
pixels, so no collective runs (`jaxfuse.parallel.tiles`).

Legend: B batch, h/w latent rows/columns, th/tw a tile's, s pixels per latent pixel of an
activation (1 at the latent, f = `cfg.downsample_factor` at the image), C channels, G groups,
T tiles, N tiles per round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh

from jaxfuse.models.layers import attention, upsample_nearest
from jaxfuse.models.tile_layout import AFTER, AROUND, OWN, Grid, Whole
from jaxfuse.models.tile_stages import HostRun, PlannedStage, PlanRun, Stage, TileOps
from jaxfuse.models.vae import (
    HEAD_NAMES,
    AutoencoderKL,
    Block,
    BlockKind,
    check_nchw,
    decoder_blocks,
    encoder_blocks,
)
from jaxfuse.parallel.tiles import check_local, place

# The most float32 attention logits a tile computes at once (1024² with 64-pixel tiles: all of them
# in one go; 8192²: one row of queries at a time). A fused kernel (GPU) stores none.
LOGITS_BYTES = 2**28


# What one tile computes in a stage: fn(ops, params, stats of crops[0], shared, crops, bounds of
# crops[0]) -> the tile's output [B, s th, s tw, C].

def plain_conv(ops: TileOps, p: Any, stats: Any, shared: Any, crops: tuple, bounds: jax.Array) -> jax.Array:
    """conv_in: a crop with `AROUND` halo, zeros outside the image already."""
    return ops.conv(p, crops[0])


def norm_conv(ops: TileOps, p: Any, stats: Any, shared: Any, crops: tuple, bounds: jax.Array) -> jax.Array:
    """Group norm, SiLU, 3x3 convolution (`p`: norm, conv): a ResNet's first half, the head."""
    return ops.conv(p["conv"], ops.conv_input(p["norm"], stats, crops[0], bounds))


def norm_conv_add(ops: TileOps, p: Any, stats: Any, shared: Any, crops: tuple, bounds: jax.Array) -> jax.Array:
    """A ResNet's second half: group norm, SiLU, 3x3 convolution of the hidden crop, plus the
    block's input (crops[1], through the 1x1 `shortcut` when `p` has one)."""
    x = crops[1] if "shortcut" not in p else ops.conv(p["shortcut"], crops[1])
    return x + norm_conv(ops, p, stats, shared, crops, bounds)


def keys_values(ops: TileOps, p: Any, stats: Any, shared: Any, crops: tuple, bounds: jax.Array) -> jax.Array:
    """The attention block's keys and values of a tile's tokens, side by side [B, th, tw, 2 C]."""
    y = ops.norm(p["group_norm"], stats, crops[0])
    return jnp.concatenate([ops.dense(p["to_k"], y), ops.dense(p["to_v"], y)], axis=-1)


def attend(ops: TileOps, p: Any, stats: Any, kv: tuple, crops: tuple, bounds: jax.Array) -> jax.Array:
    """The attention block on a tile: its tokens' queries over every token's keys and values
    (`kv`, two [B, h w, C]), plus the input, as `vae.AttentionBlock`; the queries a few rows at a
    time (`query_rows`), one chunk's logits in memory at once."""
    x = crops[0]
    b, rows, cols, c = x.shape
    k, v = kv
    step = query_rows(rows, cols, k.shape[1])

    def chunk(y: jax.Array) -> jax.Array:  # [B, step, cols, C] normalised rows -> their attention output
        q = ops.dense(p["to_q"], y.reshape(b, step * cols, c))
        return ops.dense(p["to_out_0"], attention(q, k, v, num_heads=1)).reshape(y.shape)

    y = ops.norm(p["group_norm"], stats, x).reshape(b, rows // step, step, cols, c)
    return x + jnp.moveaxis(lax.map(chunk, jnp.moveaxis(y, 1, 0)), 0, 1).reshape(x.shape)


def query_rows(rows: int, cols: int, keys: int) -> int:
    """The most of a tile's `rows` (a divisor of them, at least one) whose queries' float32
    logits over `keys` keys fit `LOGITS_BYTES`."""
    fits = [d for d in range(1, rows + 1) if rows % d == 0 and d * cols * keys * 4 <= LOGITS_BYTES]
    return max(fits, default=1)


def upsampled_conv(ops: TileOps, p: Any, stats: Any, shared: Any, crops: tuple, bounds: jax.Array) -> jax.Array:
    """Nearest 2x, then 3x3 convolution: an `AROUND` crop doubles to two context rows a side,
    of which the convolution needs one."""
    return ops.conv(p, upsample_nearest(crops[0])[:, 1:-1, 1:-1])


def strided_conv(ops: TileOps, p: Any, stats: Any, shared: Any, crops: tuple, bounds: jax.Array) -> jax.Array:
    """The stride-2 3x3 convolution of an `AFTER` crop."""
    return ops.conv(p, crops[0], stride=2)


def run_block(block: Block, p: Any, x: Whole, run: Callable[[Stage], Whole]) -> Whole:
    """`block` (its parameters `p`) on the whole activation `x`, stage by stage through `run`."""
    if block.kind == BlockKind.CONV:
        return run(Stage(plain_conv, p, ((x, AROUND),), x.scale))
    if block.kind == BlockKind.RESNET:
        hidden = run(Stage(norm_conv, {"norm": p["norm1"], "conv": p["conv1"]}, ((x, AROUND),), x.scale))
        second = {"norm": p["norm2"], "conv": p["conv2"]}
        if "conv_shortcut" in p:
            second["shortcut"] = p["conv_shortcut"]
        return run(Stage(norm_conv_add, second, ((hidden, AROUND), (x, OWN)), x.scale))
    if block.kind == BlockKind.ATTENTION:
        kv = run(Stage(keys_values, p, ((x, OWN),), x.scale, moments=False))
        return run(Stage(attend, p, ((x, OWN),), x.scale, shared=kv))
    if block.kind == BlockKind.DOWNSAMPLE:
        return run(Stage(strided_conv, p["conv"], ((x, AFTER),), x.scale // 2))
    if block.kind == BlockKind.UPSAMPLE:
        return run(Stage(upsampled_conv, p["conv"], ((x, AROUND),), 2 * x.scale))
    norm, conv = HEAD_NAMES
    return run(Stage(norm_conv, {"norm": p[norm], "conv": p[conv]}, ((x, AROUND),), x.scale, moments=False))


def run_blocks(blocks: tuple[Block, ...], params: Any, x: Whole, run: Callable[[Stage], Whole]) -> Whole:
    """The encoder's or decoder's `blocks` with its parameters."""
    for block in blocks:
        p = params
        for name in block.path:
            p = p[name]
        x = run_block(block, p, x, run)
    return x


def check_tile(tile: int) -> None:
    """Raises one clear ValueError unless `tile` is a positive whole number of latent pixels."""
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 1:
        raise ValueError(f"tile must be a positive whole number of latent pixels (64 is 512 image pixels), "
                         f"got {tile!r}.")


def tiled_decode(vae: AutoencoderKL, params: Any, latents: Any, tile: int, mesh: Mesh | None = None,
                 run: Callable | None = None) -> np.ndarray:
    """`vae.decode` in tiles of `tile` x `tile` latent pixels (see the module docstring):
    [B, L, h, w] -> [B, C_out, f h, f w], a numpy array on the host, where it was assembled.
    `mesh`: one tile on each of its devices at a time; `run`: where the stages compile (`HostRun`)."""
    check_tile(tile)
    check_nchw(latents, vae.cfg.latent_channels, "latents")
    check_local(mesh)
    grid = Grid.of(latents.shape[2:], tile)
    z = vae.apply({"params": params}, jnp.asarray(latents), method=AutoencoderKL.decoder_input)
    x = Whole.of(grid, np.asarray(z), 1)
    stages = HostRun(grid, TileOps(vae.cfg.norm_num_groups, vae.dtype), mesh, run)
    out = run_blocks(decoder_blocks(vae.cfg), place(params["decoder"], mesh, False), x, stages)
    return np.transpose(out.image(grid), (0, 3, 1, 2))


def tiled_encode(vae: AutoencoderKL, params: Any, image: Any, tile: int, mesh: Mesh | None = None,
                 run: Callable | None = None) -> tuple[jax.Array, jax.Array]:
    """`vae.encode` in tiles of `tile` x `tile` latent pixels, `f tile` image pixels (see the
    module docstring): [B, C_in, H, W] with H and W multiples of f -> the latent distribution's
    mean and log-variance [B, L, H / f, W / f]. `mesh`: one tile on each of its devices at a time;
    `run`: where the stages compile (`HostRun`)."""
    cfg = vae.cfg
    f = cfg.downsample_factor
    check_tile(tile)
    check_nchw(image, cfg.in_channels, "image")
    if image.shape[2] % f or image.shape[3] % f:
        raise ValueError(f"a tiled encode needs image sides that are multiples of {f} (the VAE's downsampling), got "
                         f"{image.shape[2]} x {image.shape[3]}; crop or pad the image to "
                         f"{image.shape[2] // f * f} x {image.shape[3] // f * f} or "
                         f"{-(-image.shape[2] // f) * f} x {-(-image.shape[3] // f) * f}.")
    check_local(mesh)
    grid = Grid.of((image.shape[2] // f, image.shape[3] // f), tile)
    # encoder_input's transpose and cast, here on the host: the whole image never goes to a device.
    x = Whole.of(grid, np.transpose(np.asarray(image), (0, 2, 3, 1)).astype(vae.dtype), f)
    stages = HostRun(grid, TileOps(cfg.norm_num_groups, vae.dtype), mesh, run)
    h = run_blocks(encoder_blocks(cfg), place(params["encoder"], mesh, False), x, stages)
    return vae.apply({"params": params}, jnp.asarray(h.image(grid)), method=AutoencoderKL.latent_distribution)


def plan_decode(vae: AutoencoderKL, params: Any, latents: jax.ShapeDtypeStruct, tile: int,
                mesh: Mesh | None = None) -> list[PlannedStage]:
    """The stages `tiled_decode` runs, with their programs and abstract arguments, to compile and
    measure without computing; `params` may be abstract (`vae.abstract_params`)."""
    check_tile(tile)
    grid = Grid.of(latents.shape[2:], tile)
    z = jax.eval_shape(lambda p, x: vae.apply({"params": p}, x, method=AutoencoderKL.decoder_input), params, latents)
    run = PlanRun(grid, TileOps(vae.cfg.norm_num_groups, vae.dtype), mesh)
    whole = jax.ShapeDtypeStruct((z.shape[0], *grid.extent(1), z.shape[-1]), z.dtype)
    run_blocks(decoder_blocks(vae.cfg), params["decoder"], Whole(whole, 1), run)
    return run.stages
