"""The VAE both ways, as the pipeline uses it: pictures to the UNet's latents and back, whole on
one device, split by rows on a mesh (synchronous patch parallelism), or in tiles
(`models.vae_tiled`, exact, for canvases).

Legend: B images, H/W pixels, h/w latent rows and columns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxfuse.config import Mode, VAEConfig
from jaxfuse.models import vae_tiled
from jaxfuse.models.vae import AutoencoderKL
from jaxfuse.parallel.mesh import ROWS, gather, mesh_key, place
from jaxfuse.parallel.patch import Patch
from jaxfuse.sampling.image import Runner


def vae_mean(vae: AutoencoderKL, x: jax.Array) -> jax.Array:
    """The VAE encoder's mean [B, 4, h, w] of images x [B, 3, H, W] (its posterior's first half)."""
    return vae.encode(x)[0]


def images(decoded: jax.Array) -> jax.Array:
    """The VAE decoder's output [B, 3, H, W] -> images [B, H, W, 3] float32 in [0, 1]."""
    return jnp.clip(jnp.transpose(decoded.astype(jnp.float32), (0, 2, 3, 1)) / 2 + 0.5, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Codec:
    """The VAE with its parameters and config (the latents' scaling)."""

    vae: AutoencoderKL
    params: Any
    cfg: VAEConfig

    def latent_scaling(self) -> tuple[Any, Any]:
        """(shift, scale): the UNet's latents are (VAE latents - shift) x scale, as diffusers'
        SDXL pipelines map them (per channel with the config's latents_mean and latents_std)."""
        cfg = self.cfg
        if cfg.latents_mean is not None and cfg.latents_std is not None:
            mean = jnp.asarray(cfg.latents_mean, jnp.float32).reshape(1, -1, 1, 1)
            std = jnp.asarray(cfg.latents_std, jnp.float32).reshape(1, -1, 1, 1)
            return mean, cfg.scaling_factor / std
        return 0.0, cfg.scaling_factor

    def vae_input(self, pictures: jax.Array) -> jax.Array:
        """Images [B, H, W, 3] in [0, 1] -> the VAE encoder's input [B, 3, H, W] in [-1, 1]."""
        return jnp.transpose(jnp.asarray(pictures) * 2 - 1, (0, 3, 1, 2)).astype(self.vae.dtype)

    def unet_latents(self, mean: jax.Array) -> jax.Array:
        """The VAE encoder's mean [B, 4, h, w] -> the UNet's latents, float32."""
        shift, scale = self.latent_scaling()
        return (mean.astype(jnp.float32) - shift) * scale

    def vae_latents(self, latents: jax.Array) -> jax.Array:
        """The UNet's latents [B, 4, h, w] -> the VAE decoder's input."""
        shift, scale = self.latent_scaling()
        return (latents / scale + shift).astype(self.vae.dtype)

    def function(self, method: Callable, patch: Patch = Patch()) -> Callable:
        """`method` of the VAE as a function of (params, x [B, C, H, W]), under `patch`."""
        vae = self.vae.clone(patch=patch)
        return lambda params, x: vae.apply({"params": params}, x, method=method)

    def encode_latents(self, params: Any, pictures: jax.Array) -> jax.Array:
        """Images [B, H, W, 3] in [0, 1] -> the UNet's latents, as one traced function (the stream's)."""
        return self.unet_latents(self.function(vae_mean)(params, self.vae_input(pictures)))

    def decode_images(self, params: Any, latents: jax.Array) -> jax.Array:
        """The UNet's latents -> images [B, H, W, 3] in [0, 1], as one traced function (the stream's)."""
        return images(self.function(AutoencoderKL.decode)(params, self.vae_latents(latents)))

    def _program(self, run: Runner, method: Callable, mesh: Mesh | None) -> tuple[Callable, Any]:
        """`function(method)` and the VAE's parameters; on `mesh`, each device runs its rows with
        synchronous patch parallelism."""
        if mesh is None:
            return self.function(method), self.params
        program = self.function(method, Patch(Mode.SYNC))
        return (jax.shard_map(program, mesh=mesh, in_specs=(P(), ROWS), out_specs=ROWS),
                run.replicated("vae", self.params, mesh))

    def encode(self, run: Runner, pictures: np.ndarray, batch: int, mesh: Mesh | None = None,
               tile: int | None = None) -> jax.Array:
        """Images [1 or B, H, W, 3] in [0, 1] -> the VAE encoder's mean [B, 4, h, w] as the UNet's
        latents (diffusers samples around the mean; SDXL's VAE's spread is about 1e-4 of it);
        with `tile`, in tiles of that many latent pixels, a tile on each device of `mesh`."""
        x = self.vae_input(pictures)
        if tile is not None:
            mean = vae_tiled.tiled_encode(self.vae, self.params, x, tile, mesh, run.run)[0]
            return jnp.broadcast_to(self.unet_latents(mean), (batch, *mean.shape[1:]))
        encode, params = self._program(run, vae_mean, mesh)
        if mesh is not None:
            x = place(x, NamedSharding(mesh, ROWS))
        # The noising mixes it with host arrays: gathered, it is the same value in every process.
        latents = self.unet_latents(gather(run.run(("vae_encode", mesh_key(mesh)), encode, params, x)))
        return jnp.broadcast_to(latents, (batch, *latents.shape[1:]))

    def decode(self, run: Runner, latents: jax.Array, mesh: Mesh | None = None,
               tile: int | None = None) -> jax.Array:
        """Latents [B, 4, h, w] -> images [B, H, W, 3] float32 in [0, 1]; on `mesh`, each device
        decodes its rows with synchronous patch parallelism; with `tile`, in tiles of that many
        latent pixels, a tile on each device of `mesh`."""
        if tile is not None:
            z = self.vae_latents(jnp.asarray(gather(latents)))
            return images(jnp.asarray(vae_tiled.tiled_decode(self.vae, self.params, z, tile, mesh, run.run)))
        decode, params = self._program(run, AutoencoderKL.decode, mesh)
        return images(run.run(("vae_decode", mesh_key(mesh)), decode, params, self.vae_latents(latents)))
