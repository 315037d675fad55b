"""The tiled VAE passes (`jaxfuse.models.vae_tiled`) against the untiled Flax VAE, which
test_vae.py checks against diffusers: many tiles, last tiles that overhang the image, on one
device and over meshes of 2 and 4."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import relative_error, scaled_random_params

from jaxfuse.config import VAEConfig
from jaxfuse.demo import DEMO_MODEL
from jaxfuse.models import vae_tiled
from jaxfuse.models.layers import group_moments
from jaxfuse.models.tile_layout import Grid, own_moments, pool_moments
from jaxfuse.models.tile_stages import TileOps
from jaxfuse.models.vae import AttentionBlock, AutoencoderKL, abstract_params, load_vae
from jaxfuse.models.vae_tiled import tiled_decode, tiled_encode
from jaxfuse.parallel.views import views_mesh

# SDXL's layout at a small width, as test_vae.py's "sdxl-like" case: four levels (8 image pixels
# per latent pixel), channel changes between levels, mid-block attention.
TINY = VAEConfig(block_out_channels=(8, 16, 32, 32), layers_per_block=2, norm_num_groups=8, latent_channels=4)


def random_params(cfg: VAEConfig, seed: int = 0):
    return scaled_random_params(abstract_params(cfg), seed, spread=0.1)


def untiled(vae, params, method, x):
    return jax.jit(lambda p, x: vae.apply({"params": p}, x, method=method))(params, x)


def latents_for(vae, size, batch=2):
    return np.random.default_rng(1).standard_normal((batch, vae.cfg.latent_channels, *size)).astype(np.float32)


def image_for(vae, size, batch=2):
    f = vae.cfg.downsample_factor
    image = np.random.default_rng(2).uniform(-1, 1, (batch, vae.cfg.in_channels, f * size[0], f * size[1]))
    image[-1] = 0.3 + 0.01 * image[-1]  # nearly flat, as in test_vae.py: small group variances
    return image.astype(np.float32)


def check_decode(vae, params, size, tile, mesh=None):
    """The tiled decode of random latents of `size` against the untiled one: the relative error."""
    latents = latents_for(vae, size)
    out = tiled_decode(vae, params, latents, tile, mesh)
    ref = untiled(vae, params, AutoencoderKL.decode, latents)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    return relative_error(out, ref)


def check_encode(vae, params, size, tile, mesh=None):
    """The tiled encode of a random image of latent `size` against the untiled one: the larger
    relative error of the mean and the log-variance."""
    image = image_for(vae, size)
    mean, logvar = tiled_encode(vae, params, image, tile, mesh)
    ref_mean, ref_logvar = untiled(vae, params, AutoencoderKL.encode, image)
    assert mean.shape == logvar.shape == ref_mean.shape == (2, vae.cfg.latent_channels, *size)
    return max(relative_error(mean, ref_mean), relative_error(logvar, ref_logvar))


@pytest.fixture(scope="module")
def demo():
    return load_vae(DEMO_MODEL / "vae")


@pytest.fixture(scope="module")
def tiny():
    return AutoencoderKL(TINY), random_params(TINY)


# Errors are max |tiled - untiled| / max |untiled|: float32 rounding (the tiny VAE's tiled decode is
# as far from a float64 decode as its untiled one: 6.8e-6 against 6.2e-6 at most). The demo VAE
# on one device: 10 x 14 latent pixels in 4 x 5 tiles of 3, the last row and column overhanging.
def test_demo_decode_equals_untiled(demo):
    assert check_decode(*demo, (10, 14), 3) <= 1e-5  # measured 1.2e-6 (max |diff| 1.0e-6)


def test_demo_encode_equals_untiled(demo):
    assert check_encode(*demo, (10, 14), 3) <= 4e-6  # measured 3.5e-7 (max |diff| 2.9e-6, log-variance)


# The tiny VAE over devices: 13 x 11 latent pixels in 3 x 3 tiles of 5, the last 3 and 1 pixels
# wide, so the last round of 2 or 4 devices is filled up with a copy of a tile that is left out.
def test_tiny_decode_over_2_devices_equals_untiled(tiny):
    assert check_decode(*tiny, (13, 11), 5, views_mesh(2)) <= 1e-5  # measured 9.3e-7 (max |diff| 9.1e-6 of 9.7)


def test_tiny_encode_over_a_2x2_mesh_equals_untiled(tiny):
    """Four devices on two mesh axes (the views x patches layout), taken together for the tiles."""
    assert check_encode(*tiny, (13, 11), 5, views_mesh(2, patches=2)) <= 1e-5  # measured 1.5e-6 (4.6e-6)


@pytest.mark.slow
def test_tiny_on_one_device_equals_untiled(tiny):
    """13 x 11 latent pixels in 4 x 3 tiles of 4, the last row one pixel high."""
    assert check_decode(*tiny, (13, 11), 4) <= 1e-5  # measured 8.8e-7 (max |diff| 8.6e-6)
    assert check_encode(*tiny, (13, 11), 4) <= 1e-5  # measured 1.1e-6 (3.8e-6)


@pytest.mark.slow
def test_demo_over_8_devices_equals_untiled(demo):
    """200 x 240 image pixels in 7 x 8 tiles of 4 (32 image pixels): seven rounds of eight."""
    assert check_decode(*demo, (25, 30), 4, views_mesh(8)) <= 1e-5  # measured 1.6e-6 (max |diff| 1.4e-6)
    assert check_encode(*demo, (25, 30), 4, views_mesh(8)) <= 4e-6  # measured 4.2e-7 (3.8e-6)


def test_tile_statistics_pool_to_the_whole_image():
    """Each tile's two-pass moments over its own pixels (masked where it overhangs), pooled with
    unequal counts, equal the whole image's."""
    x = np.random.default_rng(3).standard_normal((2, 9, 7, 8)).astype(np.float32) * 3 + 5
    grid = Grid.of((9, 7), 4)  # 3 x 2 tiles, the last row one pixel high, the last column three wide
    padded = np.full((2, 12, 8, 8), 100.0, np.float32)  # outside the image: values the moments must not see
    padded[:, :9, :7] = x
    tiles = np.stack([padded[:, top:top + 4, left:left + 4] for top, left in grid.corners])
    own = np.stack([grid.own(c, 1) for c in grid.corners])
    moments = jax.jit(jax.vmap(lambda y, own: own_moments(y, own, 4)))(tiles, own)
    mean, var = pool_moments(np.asarray(moments), np.prod(own, axis=1).astype(np.float64))
    ref_mean, ref_var = group_moments(jnp.asarray(x), 4)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6)  # measured 1.2e-7
    np.testing.assert_allclose(var, ref_var, rtol=2e-6)  # measured 1.8e-7


# Logits of one query row of the 4 x 3 tile: 3 queries x 30 keys x 4 bytes. Every row at once, or two at a time.
@pytest.mark.parametrize("logits_bytes", [10**9, 2 * 3 * 30 * 4])
def test_attention_tile_equals_the_attention_block(monkeypatch, logits_bytes):
    """A tile's queries, in chunks of rows, over every token's keys and values: the block's output
    on the tile's pixels."""
    monkeypatch.setattr(vae_tiled, "LOGITS_BYTES", logits_bytes)
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 6, 5, 16)), jnp.float32)
    block = AttentionBlock(num_groups=4)
    params = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32) * 0.3,
                          jax.eval_shape(block.init, jax.random.key(0), x)["params"])
    ops = TileOps(4, jnp.float32)

    @jax.jit
    def tile(params, x):
        stats = group_moments(x, 4)
        kv = vae_tiled.keys_values(ops, params, stats, None, (x,), None)
        keys_values = tuple(half.reshape(2, 30, 16) for half in jnp.split(kv, 2, axis=-1))
        return vae_tiled.attend(ops, params, stats, keys_values, (x[:, 2:6, 1:4],), None)

    ref = jax.jit(block.apply)({"params": params}, x)[:, 2:6, 1:4]
    np.testing.assert_allclose(tile(params, x), ref, rtol=0, atol=3e-6)  # measured 2.4e-7, outputs up to 4.6


def test_grid_scales_the_tiles_to_every_resolution():
    grid = Grid.of((13, 11), 4)
    assert grid.per_side == (4, 3) and len(grid.corners) == 12
    np.testing.assert_array_equal(grid.own(grid.corners[-1], 8), [8, 24])  # 1 x 3 latent pixels
    # The first tile's crop at scale 2 with one pixel of halo: its first row and column lie
    # outside the image; the last tile's, two image pixels and a row of halo down from its top.
    np.testing.assert_array_equal(grid.bounds(grid.corners[0], 2, (1, 1)), [[1, 27], [1, 23]])
    np.testing.assert_array_equal(grid.bounds(grid.corners[-1], 2, (1, 1)), [[-23, 3], [-15, 7]])
    assert Grid.of((13, 11), 64).tile == (13, 11)  # a tile larger than the image: one tile


@pytest.mark.parametrize("tile", [0, -4, 2.5, True, "64"])
def test_bad_tile_is_a_clear_error_before_any_compute(tile):
    vae = AutoencoderKL(TINY)
    latents = np.zeros((1, 4, 8, 8), np.float32)
    with pytest.raises(ValueError, match="tile must be a positive whole number of latent pixels"):
        tiled_decode(vae, None, latents, tile)  # no parameters: it must fail before using them
    with pytest.raises(ValueError, match="tile must be a positive whole number"):
        tiled_encode(vae, None, np.zeros((1, 3, 64, 64), np.float32), tile)


def test_encode_names_the_image_sizes_that_tile():
    with pytest.raises(ValueError, match=r"multiples of 8.*got 60 x 64; crop or pad the image to 56 x 64 or 64 x 64"):
        tiled_encode(AutoencoderKL(TINY), None, np.zeros((1, 3, 60, 64), np.float32), 4)
