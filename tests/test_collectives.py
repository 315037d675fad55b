"""The pure patch exchanges of `jaxfuse.parallel.patch`, each run alone inside `jax.shard_map` on meshes of 1, 2, 4
and 8 emulated devices (the guidance join on cfg x patch meshes of 2, 4 and 8).

The inputs are rank-coded: every value spells the indices it sits at (batch, row, column, channel; for per-device
inputs the device too), so a value that lands in the wrong place shows where it came from. Each result is compared
with one built independently in numpy from the whole, unsplit array, and exactly (`assert_array_equal`); the only
exceptions are the floating-point statistics of real data (`combine_moments`, `image_std`), which are compared to
float32 rounding and also, for `combine_moments`, exactly on integer data."""

import functools
import itertools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxfuse.parallel.mesh import make_mesh
from jaxfuse.parallel.patch import (
    CFG,
    PATCH,
    combine_moments,
    distrifusion_moments,
    gather_moments,
    gather_rows,
    image_std,
    join_guidance_halves,
    neighbour_rows,
    own_rows_fresh,
    window_mask,
    window_of,
    with_own_moments,
)
from jaxfuse.parallel_config import Mode, ParallelConfig

DEVICES = (1, 2, 4, 8)
over_meshes = pytest.mark.parametrize("n", DEVICES, ids=lambda n: f"{n}dev")
ROWS = P(None, PATCH)  # a whole array split by rows (axis 1) over the patches
STACKED = P(PATCH)  # one entry per device along a leading axis; the device reads entry [0]
WHOLE = P()  # the same array on every device
B, G = 2, 3  # batch, groups


@functools.cache
def patch_mesh(n: int, cfg_parallel: bool = False):
    return make_mesh(ParallelConfig(n, Mode.SYNC, cfg_parallel=cfg_parallel))


def run_per_device(fn, mesh, specs, *inputs):
    """`fn(*local inputs)` on every device of `mesh`, inputs split by `specs` -> its results (any pytree) as numpy
    arrays with a leading axis over the devices, in mesh order (cfg group major)."""

    def body(*args):
        return jax.tree.map(lambda r: r[None], fn(*args))

    sharded = jax.shard_map(body, mesh=mesh, in_specs=tuple(specs), out_specs=P(mesh.axis_names))
    return jax.tree.map(np.asarray, jax.jit(sharded)(*inputs))


def coded(*shape: int, sign: int = 1) -> np.ndarray:
    """float32 array whose values spell their indices, a group of decimal digits per axis, plus 1 so that no
    value is the 0 of padding: shape (2, 16, 3) -> 1 + 1000 b + 10 r + c. `sign=-1` for a second, disjoint set."""
    index = np.indices(shape)
    value = np.zeros(shape, np.int64)
    for axis, size in enumerate(shape):
        value = value * 10 ** len(str(size - 1)) + index[axis]
    assert value.max() < 2**24, "not exact in float32"
    return (sign * (value + 1)).astype(np.float32)


def rows_of(x: np.ndarray, n: int, p: int) -> np.ndarray:
    """Patch p's rows (axis 1) of the whole `x` split into n patches."""
    h = x.shape[1] // n
    return x[:, p * h:(p + 1) * h]


def np_neighbour_rows(x: np.ndarray, n: int, p: int, above: int, below: int) -> tuple[np.ndarray, np.ndarray]:
    """The `above` rows of the whole x just before patch p and the `below` just after it, zeros outside x."""
    h = x.shape[1] // n
    pad = [(0, 0)] * x.ndim
    pad[1] = (above, below)
    padded = np.pad(x, pad)  # row r of x is row r + above here
    return padded[:, p * h:p * h + above], padded[:, (p + 1) * h + above:(p + 1) * h + above + below]


def np_group_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[B, R, W, C] -> float64 mean and population variance of each of G channel groups, [B, G] each."""
    grouped = x.astype(np.float64).reshape(*x.shape[:-1], G, -1)
    return grouped.mean(axis=(1, 2, 4)), grouped.var(axis=(1, 2, 4))


def np_patch_moments(x: np.ndarray, n: int) -> np.ndarray:
    """[B, R, W, C] -> every patch's float64 (mean, variance) per group, [B, N, 2, G]."""
    return np.stack([np.stack(np_group_moments(rows_of(x, n, p)), axis=1) for p in range(n)], axis=1)


@over_meshes
@pytest.mark.parametrize("shape", [(3, 2, 2), (4, 3)], ids=["image", "tokens"])
def test_neighbour_rows(n, shape):
    """Every (above, below) in {0, 1, 2}^2 on h = 3 rows of an image, or 4 tokens of a sequence."""
    x = coded(B, n * shape[0], *shape[1:])
    pairs = list(itertools.product(range(3), repeat=2))
    got = run_per_device(lambda v: {pair: neighbour_rows(v, *pair) for pair in pairs}, patch_mesh(n), [ROWS], x)
    for (above, below), p in itertools.product(pairs, range(n)):
        want_above, want_below = np_neighbour_rows(x, n, p, above, below)
        msg = f"patch {p}, above={above}, below={below}"
        np.testing.assert_array_equal(got[above, below][0][p], want_above, err_msg=msg)
        np.testing.assert_array_equal(got[above, below][1][p], want_below, err_msg=msg)


@over_meshes
def test_gather_rows(n):
    tokens = coded(B, n * 4, 3)
    got = run_per_device(gather_rows, patch_mesh(n), [ROWS], tokens)
    for p in range(n):
        np.testing.assert_array_equal(got[p], tokens, err_msg=f"patch {p}")


@over_meshes
def test_gather_moments(n):
    fresh = coded(n, 2, B, G, sign=-1)  # device p's (mean, var), each [B, G]
    got = run_per_device(lambda s: gather_moments(s[0, 0], s[0, 1]), patch_mesh(n), [STACKED], fresh)
    want = fresh.transpose(2, 0, 1, 3)  # [b, p, k, g] = fresh[p, k, b, g]
    for p in range(n):
        np.testing.assert_array_equal(got[p], want, err_msg=f"patch {p}")


def check_combine_moments(n, x, assert_equal):
    """combine_moments of x's per-patch moments (float64, rounded to float32) against x's whole moments."""
    moments = np_patch_moments(x, n).astype(np.float32)
    got_mean, got_var = run_per_device(combine_moments, patch_mesh(n), [WHOLE], moments)
    want_mean, want_var = np_group_moments(x)
    for p in range(n):
        assert_equal(got_mean[p], want_mean, err_msg=f"mean, patch {p}")
        assert_equal(got_var[p], want_var, err_msg=f"variance, patch {p}")


@over_meshes
def test_combine_moments_real(n):
    """To float32 rounding: the moments given are float64 ones rounded to float32 (relative error 2^-24 each), and
    the combination sums and squares at most 8 of them in float32, a few ulps (1.2e-7 each) in all; rtol 1e-6 allows
    about 8 while a wrong formula (N - 1 for N, the spread of the means left out) is off by percents."""
    x = np.random.default_rng(n).normal(3.0, 2.0, (B, n * 4, 4, 2 * G))
    check_combine_moments(n, x, functools.partial(np.testing.assert_allclose, rtol=1e-6))


@over_meshes
def test_combine_moments_integers_exact(n):
    """Small integers in patches of 16 values per group and 2^k patches: every mean and variance on the way is a
    short dyadic fraction, exact in float32, so the combination must be exact too."""
    x = np.random.default_rng(n).integers(-4, 5, (B, n * 2, 4, 2 * G)).astype(np.float32)
    check_combine_moments(n, x, np.testing.assert_array_equal)


@over_meshes
def test_with_own_moments(n):
    stale = coded(B, n, 2, G)
    fresh = coded(n, 2, B, G, sign=-1)  # device p's (mean, var), each [B, G]
    got = run_per_device(lambda m, s: with_own_moments(m, s[0, 0], s[0, 1]), patch_mesh(n), [WHOLE, STACKED],
                         stale, fresh)
    for p in range(n):
        want = stale.copy()
        want[:, p, 0], want[:, p, 1] = fresh[p, 0], fresh[p, 1]
        np.testing.assert_array_equal(got[p], want, err_msg=f"patch {p}")


def np_distrifusion_moments(stale, mean, var, p):
    """The docstring's formula in numpy, float64: the stale whole-image E[x] and E[x^2] plus the change of patch p's
    own, not divided by N; where the variance comes out negative, p's fresh variance. Also the raw variance."""
    stale_mean, stale_var = stale[:, p, 0], stale[:, p, 1]
    ex = stale[:, :, 0].mean(axis=1) + mean - stale_mean
    ex2 = (stale[:, :, 1] + stale[:, :, 0] ** 2).mean(axis=1) + (var + mean**2) - (stale_var + stale_mean**2)
    raw = ex2 - ex**2
    return ex, np.where(raw < 0, var, raw), raw


@over_meshes
def test_distrifusion_moments(n):
    """Small integers, so that every step is exact in float32. Groups 0 and 1 move the own patch's mean far (by 6
    and 9, with a small fresh variance), which drives the uncorrected variance negative whenever N > 1; group 2 moves
    it little and keeps it positive. (With N = 1 the formula is the fresh variance itself, never negative.)"""
    rng = np.random.default_rng(n)
    stale = np.stack([rng.integers(-3, 4, (B, n, G)), rng.integers(0, 5, (B, n, G))], axis=2).astype(np.float64)
    shift = np.array([6, 9, 1])
    fresh_mean = stale[:, :, 0].transpose(1, 0, 2) + shift + rng.integers(-1, 2, (n, B, G))  # [n, B, G]
    fresh_var = rng.integers(0, 2, (n, B, G)) + 4 * (shift < 2)
    fresh = np.stack([fresh_mean, fresh_var], axis=1)  # device p's (mean, var), [n, 2, B, G]
    got_mean, got_var = run_per_device(lambda m, s: distrifusion_moments(m, s[0, 0], s[0, 1]), patch_mesh(n),
                                       [WHOLE, STACKED], stale.astype(np.float32), fresh.astype(np.float32))
    negatives = 0
    for p in range(n):
        want_mean, want_var, raw = np_distrifusion_moments(stale, fresh_mean[p], fresh_var[p], p)
        negatives += (raw < 0).sum()
        np.testing.assert_array_equal(got_mean[p], want_mean, err_msg=f"mean, patch {p}")
        np.testing.assert_array_equal(got_var[p], want_var, err_msg=f"variance, patch {p}")
    assert (negatives > 0) == (n > 1), "the case meant to give a negative variance does not"


@over_meshes
@pytest.mark.parametrize("count", (1, 3, 4), ids=lambda c: f"count{c}")
def test_window(n, count):
    """pcpp's window read from an all-gather: the neighbours' nearest `count` of T = 4 tokens wherever a neighbour
    exists, the mask False exactly where none does, and the same tokens as `neighbour_rows` where the mask is True."""
    tokens_per_patch = 4
    tokens = coded(B, n * tokens_per_patch, 3)

    def windows(gathered, local):
        return (window_of(gathered, tokens_per_patch, count), window_mask(tokens_per_patch, count),
                neighbour_rows(local, count, count))

    (above, below), mask, (nb_above, nb_below) = run_per_device(windows, patch_mesh(n), [WHOLE, ROWS], tokens, tokens)
    for p in range(n):
        msg = f"patch {p}"
        want_mask = np.concatenate([np.full(count, p > 0), np.ones(tokens_per_patch, bool), np.full(count, p < n - 1)])
        np.testing.assert_array_equal(mask[p], want_mask, err_msg=msg)
        start, end = p * tokens_per_patch, (p + 1) * tokens_per_patch
        if p > 0:
            np.testing.assert_array_equal(above[p], tokens[:, start - count:start], err_msg=msg)
        if p < n - 1:
            np.testing.assert_array_equal(below[p], tokens[:, end:end + count], err_msg=msg)
        seen_above, seen_below = mask[p][:count], mask[p][-count:]
        np.testing.assert_array_equal(above[p][:, seen_above], nb_above[p][:, seen_above], err_msg=msg)
        np.testing.assert_array_equal(below[p][:, seen_below], nb_below[p][:, seen_below], err_msg=msg)


@over_meshes
def test_own_rows_fresh(n):
    stale = coded(B, n * 4, 3)
    fresh = coded(B, n * 4, 3, sign=-1)
    got = run_per_device(own_rows_fresh, patch_mesh(n), [WHOLE, ROWS], stale, fresh)
    for p in range(n):
        want = stale.copy()
        want[:, p * 4:(p + 1) * 4] = rows_of(fresh, n, p)
        np.testing.assert_array_equal(got[p], want, err_msg=f"patch {p}")


@over_meshes
def test_image_std(n):
    """The unbiased std of each whole sample, split over the patches or (split=False) whole on one device: float32
    sums of a few hundred values, so rtol 1e-6 (about 8 ulps) against numpy's float64."""
    x = np.random.default_rng(n).normal(0.5, 2.0, (B, n * 2, 4, 3)).astype(np.float32)
    want = x.reshape(B, -1).astype(np.float64).std(axis=1, ddof=1)
    split = run_per_device(functools.partial(image_std, split=True), patch_mesh(n), [ROWS], x)
    whole = run_per_device(functools.partial(image_std, split=False), patch_mesh(1), [WHOLE], x)
    np.testing.assert_allclose(whole[0], want, rtol=1e-6)
    for p in range(n):
        np.testing.assert_allclose(split[p], want, rtol=1e-6, err_msg=f"patch {p}")


@pytest.mark.parametrize("n", DEVICES[1:], ids=lambda n: f"{n}dev")
def test_join_guidance_halves(n):
    """Group g holds half g of the noise [2B, ...], its rows split over the group's patches; every device gets both
    halves of its own rows, group 0 first: joined over CFG only, never over PATCH."""
    mesh = patch_mesh(n, cfg_parallel=True)
    patches = n // 2
    noise = coded(2 * B, patches * 3, 2)  # the leading digit group is the cfg group's half and its batch
    got = run_per_device(join_guidance_halves, mesh, [P(CFG, PATCH)], noise)
    for group, p in itertools.product(range(2), range(patches)):
        np.testing.assert_array_equal(got[group * patches + p], rows_of(noise, patches, p),
                                      err_msg=f"cfg group {group}, patch {p}")
