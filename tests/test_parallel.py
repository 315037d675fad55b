"""Patch parallelism on the emulated 8-device CPU mesh: sync equals single, displaced reads only
the previous step's exchange, and the bytes exchanged are the ones DESIGN.md counts."""

import jax
import numpy as np
import pytest
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

from jaxfuse.config import UNetConfig
from jaxfuse.models.unet import UNet2DConditionModel
from jaxfuse.parallel.cost import sharded_step
from jaxfuse.parallel.hlo import collective_bytes
from jaxfuse.parallel.mesh import ParallelConfig, ParallelError, make_mesh
from jaxfuse.parallel.patch import GroupNormMode, Mode, Patch

CFG = UNetConfig.tiny()  # 3 levels: a patch's latent rows must halve twice
B, H, W = 2, 32, 24  # non-square; with 8 patches each holds 4 latent rows
COLLECTIVES = {"ppermute", "all_gather", "psum", "psum2", "all_to_all", "reduce_scatter"}


@pytest.fixture(scope="module")
def unet():
    return UNet2DConditionModel(CFG)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    return dict(sample=rng.standard_normal((B, 4, H, W), np.float32), timesteps=np.float32(500.0),
                encoder_hidden_states=rng.standard_normal((B, 5, 32), np.float32),
                text_embeds=rng.standard_normal((B, 32), np.float32),
                time_ids=np.tile(np.float32([256, 192, 0, 0, 256, 192]), (B, 1)))


@pytest.fixture(scope="module")
def params(unet, inputs):
    """Random weights made on the host (compiling `init` takes longer than the tests): kernels
    scaled by their fan-in, norm scales near one, every bias non-zero."""
    rng = np.random.default_rng(1)

    def leaf(path, shape):
        name = path[-1].key
        noise = rng.standard_normal(shape.shape).astype(np.float32)
        if name == "kernel":
            return noise / np.sqrt(np.prod(shape.shape[:-1]))
        return 1 + 0.05 * noise if name == "scale" else 0.05 * noise

    abstract = jax.eval_shape(unet.init, jax.random.key(0), **inputs)["params"]
    return jax.tree_util.tree_map_with_path(leaf, abstract)


def mesh_of(n):
    return make_mesh(ParallelConfig(n, Mode.SYNC))


def sharded(unet, patch, n, inputs, stale=None):
    """One UNet step on an n-patch mesh (`jaxfuse.parallel.cost.sharded_step`) and its arguments
    after the parameters; a stale tree travels between calls stacked over PATCH."""
    conditioning = {k: v for k, v in inputs.items() if k != "sample"}
    fn = sharded_step(unet, patch, mesh_of(n), conditioning, with_stale=stale is not None)
    return fn, (inputs["sample"], conditioning) + ((stale,) if stale is not None else ())


def run(unet, patch, n, params, inputs, stale=None):
    fn, args = sharded(unet, patch, n, inputs, stale)
    return jax.jit(fn)(params, *args)


def relative(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module")
def single(unet, params, inputs):
    return jax.jit(unet.apply)({"params": params}, **inputs)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_sync_unet_equals_single(unet, params, inputs, single, n):
    out = run(unet, Patch(Mode.SYNC), n, params, inputs)
    assert out.shape == single.shape
    assert relative(out, single) <= 1e-5


@pytest.mark.parametrize("gn", [g for g in GroupNormMode if g != GroupNormMode.SEPARATE])
def test_displaced_step_on_repeated_input_equals_sync(unet, params, inputs, gn):
    """Fed the same latents and timestep twice, the stale context equals the fresh one, so the
    second (displaced) step must give the first (sync) step's result."""
    sync, stale = run(unet, Patch(Mode.SYNC, gn, record=True), 4, params, inputs)
    displaced, _ = run(unet, Patch(Mode.DISPLACED, gn), 4, params, inputs, stale)
    assert relative(displaced, sync) <= 1e-6


def test_naive_differs_from_single(unet, params, inputs, single):
    assert relative(run(unet, Patch(Mode.NAIVE), 4, params, inputs), single) > 1e-2


def sub_jaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, Jaxpr):
                yield item


def all_collectives(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in COLLECTIVES:
            yield eqn
        for sub in sub_jaxprs(eqn):
            yield from all_collectives(sub)


def collectives_reaching(jaxpr, outvars):
    """The collectives whose results the values `outvars` of `jaxpr` depend on, found by
    walking the equations backwards (a nested jaxpr on the path counts with all it holds)."""
    needed = {v for v in outvars if not isinstance(v, Literal)}
    found = []
    for eqn in reversed(jaxpr.eqns):
        if not needed.intersection(eqn.outvars):
            continue
        if eqn.primitive.name in COLLECTIVES:
            found.append(eqn)
        for sub in sub_jaxprs(eqn):
            found.extend(all_collectives(sub))
        needed.update(v for v in eqn.invars if not isinstance(v, Literal))
    return found


def step_jaxpr(unet, patch, params, inputs, stale=None):
    """The per-device jaxpr of one step (the body of its shard_map)."""
    fn, args = sharded(unet, patch, 4, inputs, stale)
    jaxpr = jax.make_jaxpr(fn)(params, *args)
    (outer,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "shard_map"]
    return outer.params["jaxpr"]


def test_displaced_noise_prediction_waits_on_no_exchange_of_its_step(unet, params, inputs):
    """Asynchrony is real: of everything a displaced step exchanges, only the first
    convolution's fresh latent halo feeds its noise prediction (one row of 4 latent channels
    from each neighbour: 2 x B x 1 x W x 4 x 4 bytes = 1536 bytes here); the rest is only
    written to the stale state for the next step. In sync mode the same walk finds them all."""
    _, stale = run(unet, Patch(Mode.SYNC, record=True), 4, params, inputs)
    displaced = step_jaxpr(unet, Patch(Mode.DISPLACED), params, inputs, stale)
    reaching = collectives_reaching(displaced, displaced.outvars[:1])
    assert [e.primitive.name for e in reaching] == ["ppermute", "ppermute"]
    assert all(e.invars[0].aval.shape == (B, 1, W, CFG.in_channels) for e in reaching)
    assert sum(e.invars[0].aval.size * 4 for e in reaching) == 1536
    exchanged = list(all_collectives(displaced))
    assert len(exchanged) > 20  # the step does exchange, for the next step

    sync = step_jaxpr(unet, Patch(Mode.SYNC), params, inputs)
    reaching = {e.primitive.name for e in collectives_reaching(sync, sync.outvars[:1])}
    assert reaching == {"ppermute", "all_gather"}


def compiled_bytes(unet, patch, n, params, inputs, stale=None):
    fn, args = sharded(unet, patch, n, inputs, stale)
    return collective_bytes(jax.jit(fn).lower(params, *args).compile().as_text())


@pytest.mark.parametrize("n", [2, 4])
def test_bytes_per_step_match_the_design_formula(unet, params, inputs, n):
    """Counted from the compiled HLO: the same in sync and displaced, none in naive, and per
    DESIGN.md: 2 x rows x W x C per 3x3 convolution's halo, (N-1)/N of every patch's keys and
    values per self-attention, (N-1)/N of every patch's 2 x G statistics per group norm."""
    _, stale = run(unet, Patch(Mode.SYNC, record=True), n, params, inputs)
    sync = compiled_bytes(unet, Patch(Mode.SYNC), n, params, inputs)
    displaced = compiled_bytes(unet, Patch(Mode.DISPLACED), n, params, inputs, stale)
    naive = compiled_bytes(unet, Patch(Mode.NAIVE), n, params, inputs)
    assert sum(sync.values()) == sum(displaced.values()) > 0
    assert sum(naive.values()) == 0

    # The formula, from the model's layers: each leaf of the stale tree (stacked over the n
    # patches) is one layer's received context.
    flat = jax.tree_util.tree_flatten_with_path(stale)[0]
    local = {jax.tree_util.keystr(path): leaf.nbytes // n for path, leaf in flat}
    halos = sum(v for k, v in local.items() if "'halo'" in k)
    gathered = sum(v for k, v in local.items() if "'kv'" in k or "'moments'" in k)
    conv_in = 2 * B * 1 * W * CFG.in_channels * 4  # the fresh latent rows, in every mode
    assert sync["collective-permute"] == halos + conv_in
    assert sync["all-gather"] == gathered * (n - 1) // n
    # Layer inventory of the tiny UNet (11 ResNets: 3 down, 2 mid, 6 up; 7 transformers: 1 + 1
    # down, 1 mid, 2 + 2 up). Halos (two leaves each, above and below): both convolutions of
    # every ResNet, 2 downsamplers, 2 upsamplers, conv_out; not conv_in, whose halo is fresh.
    assert sum("'halo'" in k for k in local) == 2 * (2 * 11 + 2 + 2 + 1)
    # One self-attention per transformer layer: 1 + 2 down, 2 mid, 2 x 2 + 2 x 1 up.
    assert sum("'kv'" in k for k in local) == 1 + 2 + 2 + 2 * 2 + 2 * 1
    # Group norms: two per ResNet, one per transformer, the output norm.
    assert sum("'moments'" in k for k in local) == 2 * 11 + 7 + 1


def test_mesh_larger_than_the_devices_names_the_fix():
    with pytest.raises(ParallelError, match="16 devices asked for, 8 present.*XLA_FLAGS"):
        make_mesh(ParallelConfig(16, Mode.SYNC))


@pytest.mark.parametrize("kwargs, message", [
    (dict(devices=4), "mode single runs on one device"),
    (dict(devices=3, mode="sync", cfg_parallel=True), "is odd"),
    (dict(devices=4, mode="displaced", warmup_steps=0), "at least one synchronous warm-up step"),
])
def test_bad_parallel_settings(kwargs, message):
    with pytest.raises(ParallelError, match=message):
        ParallelConfig(**kwargs)
