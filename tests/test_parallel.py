"""Patch parallelism on the emulated 8-device CPU mesh, through the sampling loops' own step
(`jaxfuse.sampling.step.predict_noise`): sync equals single, displaced and pcpp read only the
previous step's exchange, a displaced loop compiles two UNet bodies, pcpp's attention window is the
rows it should be, and the bytes exchanged are the ones DESIGN.md counts."""

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CountingRunner, count_primitive, relative_error, scaled_random_params, sub_jaxprs
from jax.extend.core import Literal
from jax.sharding import PartitionSpec as P

from jaxfuse import schedulers
from jaxfuse.analysis.cost import sharded_step, step_fn
from jaxfuse.analysis.hlo import collective_bytes
from jaxfuse.config import UNetConfig
from jaxfuse.models.layers import Attention, apply_patched
from jaxfuse.models.unet import UNet2DConditionModel
from jaxfuse.parallel import patch as px
from jaxfuse.parallel.mesh import make_mesh
from jaxfuse.parallel.patch import PATCH, Patch
from jaxfuse.parallel_config import GroupNormMode, Mode, ParallelConfig, ParallelError
from jaxfuse.sampling.denoiser import Denoiser
from jaxfuse.sampling.image import Loop, denoise
from jaxfuse.sampling.plan import Plan, StepKind
from jaxfuse.sampling.step import Conditioning, Guidance, Sampling

CFG = UNetConfig.tiny()  # 3 levels: a patch's latent rows must halve twice
B, H, W = 2, 32, 24  # non-square; with 8 patches each holds 4 latent rows
COLLECTIVES = {"ppermute", "all_gather", "psum", "psum2", "all_to_all", "reduce_scatter"}


@pytest.fixture(scope="module")
def unet():
    return UNet2DConditionModel(CFG)


def make_inputs(seed):
    """(latents [B, 4, H, W], their conditioning, a schedule, guidance), for unguided steps whose
    prediction is the UNet's output: DDIM's first of two steps is timestep 500 and leaves the
    latents unscaled."""
    rng = np.random.default_rng(seed)
    cond = Conditioning(context=rng.standard_normal((B, 5, 32), np.float32),
                        text_embeds=rng.standard_normal((B, 32), np.float32),
                        time_ids=np.tile(np.float32([256, 192, 0, 0, 256, 192]), (B, 1)))
    schedule = schedulers.make_schedule(schedulers.SchedulerKind.DDIM, schedulers.SchedulerConfig(clip_sample=False), 2)
    latents = rng.standard_normal((B, 4, H, W), np.float32)
    return latents, cond, schedule, Guidance(np.float32(5.0), np.float32(0.0))


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(0)


@pytest.fixture(scope="module")
def later(inputs):
    """The same conditioning with other latents: a later step, whose stale context is not fresh."""
    return (np.random.default_rng(7).standard_normal(inputs[0].shape, np.float32), *inputs[1:])


@pytest.fixture(scope="module")
def params(unet, inputs):
    """Random weights: every bias non-zero (`scaled_random_params`)."""
    latents, cond, _, _ = inputs
    abstract = jax.eval_shape(unet.init, jax.random.key(0), latents, np.float32(500),
                              cond.context, text_embeds=cond.text_embeds, time_ids=cond.time_ids)["params"]
    return scaled_random_params(abstract, seed=1, spread=0.05)


def sampling_of(n):
    return Sampling(use_guidance=False, use_rescale=False, parallel=ParallelConfig(n, Mode.SYNC))


def sharded(patch, n, stale=None):
    """One noise prediction on an n-patch mesh (`jaxfuse.analysis.cost.sharded_step`), a function
    of (denoiser, *inputs[, stale]); the denoiser's state travels between calls stacked over PATCH."""
    sampling = sampling_of(n)
    return sharded_step(sampling, StepKind(patch), make_mesh(sampling.parallel), with_state=stale is not None)


def run(unet, patch, n, params, inputs, stale=None):
    return jax.jit(sharded(patch, n, stale))(Denoiser(unet, params), *inputs, *([] if stale is None else [stale]))


relative = relative_error


@pytest.fixture(scope="module")
def single(unet, params, inputs):
    return jax.jit(step_fn(sampling_of(1), StepKind()))(Denoiser(unet, params), *inputs)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_sync_unet_equals_single(unet, params, inputs, single, n):
    out = run(unet, Patch(Mode.SYNC), n, params, inputs)
    assert out.shape == single.shape
    assert relative(out, single) <= 1e-5  # measured 1.0e-6


@pytest.mark.parametrize("gn", [GroupNormMode.CORRECTED,
                                *(pytest.param(g, marks=pytest.mark.slow) for g in (
                                    GroupNormMode.CORRECTED_DISTRIFUSION, GroupNormMode.STALE, GroupNormMode.SYNC))])
def test_displaced_step_on_repeated_input_equals_sync(unet, params, inputs, gn):
    """Fed the same latents and timestep twice, the stale context equals the fresh one, so the
    second (displaced) step must give the first (sync) step's result."""
    sync, stale = run(unet, Patch(Mode.SYNC, gn, record=True), 4, params, inputs)
    displaced, _ = run(unet, Patch(Mode.DISPLACED, gn), 4, params, inputs, stale)
    # DistriFusion's statistics go through E[x^2] - E[x]^2, which cancels: measured 9.3e-7 there, 0 for the others.
    assert relative(displaced, sync) <= (1e-5 if gn == GroupNormMode.CORRECTED_DISTRIFUSION else 1e-6)


def test_naive_differs_from_single(unet, params, inputs, single):
    assert relative(run(unet, Patch(Mode.NAIVE), 4, params, inputs), single) > 1e-2


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
    jaxpr = jax.make_jaxpr(sharded(patch, 4, stale))(Denoiser(unet, params), *inputs,
                                                     *([] if stale is None else [stale]))
    (outer,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "shard_map"]
    return outer.params["jaxpr"]


@pytest.mark.parametrize("parallel", [ParallelConfig(4, Mode.DISPLACED),
                                      pytest.param(ParallelConfig(4, Mode.PCPP), marks=pytest.mark.slow)],
                         ids=["displaced", "pcpp"])
def test_displaced_noise_prediction_waits_on_no_exchange_of_its_step(unet, params, inputs, parallel):
    """Asynchrony is real: of everything a displaced (or pcpp) step exchanges, only the first
    convolution's fresh latent halo feeds its noise prediction (one row of 4 latent channels
    from each neighbour: 2 x B x 1 x W x 4 x 4 bytes = 1536 bytes here); the rest is only
    written to the stale state for the next step. In sync mode the same walk finds them all."""
    _, stale = run(unet, Patch.of(parallel, Mode.SYNC, record=True), 4, params, inputs)
    displaced = step_jaxpr(unet, Patch.of(parallel), params, inputs, stale)
    reaching = collectives_reaching(displaced, displaced.outvars[:1])
    assert [e.primitive.name for e in reaching] == ["ppermute", "ppermute"]
    assert all(e.invars[0].aval.shape == (B, 1, W, CFG.in_channels) for e in reaching)
    assert sum(e.invars[0].aval.size * 4 for e in reaching) == 1536
    exchanged = list(all_collectives(displaced))
    assert len(exchanged) > 20  # the step does exchange, for the next step

    sync = step_jaxpr(unet, Patch(Mode.SYNC), params, inputs)
    reaching = {e.primitive.name for e in collectives_reaching(sync, sync.outvars[:1])}
    assert reaching == {"ppermute", "all_gather"}


@pytest.mark.parametrize("mode", [Mode.DISPLACED, pytest.param(Mode.PCPP, marks=pytest.mark.slow)])
def test_each_kind_of_step_compiles_one_unet_body(unet, params, inputs, mode):
    """A displaced loop of six steps (two warm-up) runs two step programs, one per kind, each
    holding the UNet once; the first program's stale context is zeros shaped by an abstract trace,
    not a step peeled out of the loop (no UNet). A UNet body is counted by its convolutions (the
    single step's count)."""
    per_unet = count_primitive(jax.make_jaxpr(step_fn(sampling_of(1), StepKind()))(Denoiser(unet, params),
                                                                                   *inputs).jaxpr,
                               "conv_general_dilated")
    parallel = ParallelConfig(4, mode, warmup_steps=2)
    latents, cond, _, guidance = inputs
    schedule = schedulers.make_schedule("euler", schedulers.SchedulerConfig(), 6)
    runner = CountingRunner()
    loop = Loop(Sampling(False, False, parallel), Plan.of(parallel, 6), make_mesh(parallel))
    denoise(loop, Denoiser(unet, params), latents, cond, schedule, guidance, schedulers.noise_keys([0]), runner,
            progress=lambda *_: None)  # one step at a time: each kind's program called again and again
    steps = {name: count for name, count in runner.convolutions.items() if name[0] == "steps"}
    assert per_unet > 0 and list(steps.values()) == [per_unet, per_unet]
    assert runner.convolutions[("initial", *loop.key, loop.plan.state_kind)] == 0


def compiled_bytes(unet, patch, n, params, inputs, stale=None):
    args = (Denoiser(unet, params), *inputs, *([] if stale is None else [stale]))
    return collective_bytes(jax.jit(sharded(patch, n, stale)).lower(*args).compile().as_text())


@pytest.mark.parametrize("n", [pytest.param(2, marks=pytest.mark.slow), 4])
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
    (dict(devices=4, mode="pcpp", warmup_steps=0), "pcpp mode needs at least one synchronous warm-up step"),
    (dict(devices=4, mode="pcpp", context=1.5), r"must be in \[0, 1\], got 1.5"),
])
def test_bad_parallel_settings(kwargs, message):
    with pytest.raises(ParallelError, match=message):
        ParallelConfig(**kwargs)


# --- PCPP: self-attention sees its own rows and a window of each neighbour's -------------------

def window_size(context, tokens):
    """The specification, in exact arithmetic: context x tokens, to the nearest token, halves up."""
    return math.floor(Fraction(str(context)) * tokens + Fraction(1, 2))


@pytest.mark.parametrize("context, tokens, expected", [(0.3, 15, 5), (0.3, 8, 2), (0.5, 3, 2), (0.1, 4, 0),
                                                       (1.0, 12, 12), (0.0, 12, 0)])
def test_window_size_rounds_to_the_nearest_token_halves_up(context, tokens, expected):
    assert px.window_tokens(context, tokens) == window_size(context, tokens) == expected


def test_window_size_agrees_with_exact_arithmetic():
    for context in np.round(np.arange(0, 1.0001, 0.05), 2):
        for tokens in range(1, 200):
            assert px.window_tokens(float(context), tokens) == window_size(context, tokens), (context, tokens)


def visible_tokens(patch, rows, width, n, context):
    """The image tokens (row-major indices) patch `patch` of `n` should attend to, built from
    rows and columns: its own rows; of the patch above, its last rows, whole ones first, then the
    end of the row above them; of the patch below, its first rows, then the start of the next."""
    h = rows // n
    count = window_size(context, h * width)
    whole, rest = divmod(count, width)
    first, end = patch * h, (patch + 1) * h
    cells = {(r, c) for r in range(first, end) for c in range(width)}
    if patch > 0:
        cells |= {(r, c) for r in range(first - whole, first) for c in range(width)}
        cells |= {(first - whole - 1, c) for c in range(width - rest, width)} if rest else set()
    if patch < n - 1:
        cells |= {(r, c) for r in range(end, end + whole) for c in range(width)}
        cells |= {(end + whole, c) for c in range(rest)} if rest else set()
    return {r * width + c for r, c in cells}


@pytest.mark.parametrize("n, rows, width, context", [(4, 12, 5, 0.2), (4, 12, 5, 0.3), (4, 12, 5, 0.5),
                                                     (4, 12, 5, 1.0), (2, 6, 7, 0.3), (8, 8, 6, 0.3)])
def test_pcpp_attention_window_is_exactly_the_specified_tokens(n, rows, width, context):
    """One self-attention layer whose queries are zero (so every key it sees weighs the same)
    and whose values are the tokens themselves, one-hot: a patch's output is the mean of the
    one-hot vectors of exactly the tokens it sees. The warm-up (sync) step sees every token;
    the pcpp step its own, fresh (scaled by 2 here), and the neighbours' windows from the
    warm-up step."""
    tokens = rows * width
    layer = Attention(num_heads=1, head_dim=tokens)
    eye, zeros = jnp.eye(tokens), jnp.zeros((tokens, tokens))
    params = {"to_q": {"kernel": zeros}, "to_k": {"kernel": zeros}, "to_v": {"kernel": eye},
              "to_out_0": {"kernel": eye, "bias": jnp.zeros(tokens)}}
    parallel = ParallelConfig(n, Mode.PCPP, context=context)

    def steps(x):
        warm, stale = apply_patched(layer, Patch.of(parallel, Mode.SYNC, record=True), params, None, x)
        return warm, apply_patched(layer, Patch.of(parallel), params, stale, 2 * x)[0]

    rows_spec = P(None, PATCH)
    fn = jax.jit(jax.shard_map(steps, mesh=make_mesh(parallel), in_specs=rows_spec, out_specs=(rows_spec, rows_spec)))
    warm, out = (np.asarray(a)[0] for a in fn(eye[None]))
    np.testing.assert_allclose(warm, np.full((tokens, tokens), 1 / tokens), rtol=5e-7)  # measured 5.2e-8
    h = rows // n
    for query in range(tokens):
        patch = query // (h * width)
        seen = visible_tokens(patch, rows, width, n, context)
        own = set(range(patch * h * width, (patch + 1) * h * width))
        expected = np.zeros(tokens)
        expected[sorted(seen)] = [2.0 if t in own else 1.0 for t in sorted(seen)]
        # measured 5.2e-8 relative, and exactly 0 where a token is not seen
        np.testing.assert_allclose(out[query], expected / len(seen), rtol=5e-7, atol=0, err_msg=f"query {query}")


@pytest.mark.slow
def test_pcpp_with_the_whole_neighbour_on_two_patches_equals_displaced(unet, params, inputs, later):
    """N = 2, p = 1: each patch's one neighbour is the rest of the image, so pcpp sees what
    displaced sees (in another order of float32 sums: the masked, empty window above the top
    patch adds zeros). The step after warm-up gets new latents, so stale and fresh context differ."""
    pcpp = ParallelConfig(2, Mode.PCPP, context=1.0)
    _, stale = run(unet, Patch(Mode.SYNC, record=True), 2, params, inputs)
    displaced, _ = run(unet, Patch(Mode.DISPLACED), 2, params, later, stale)
    _, stale = run(unet, Patch.of(pcpp, Mode.SYNC, record=True), 2, params, inputs)
    partial, _ = run(unet, Patch.of(pcpp), 2, params, later, stale)
    assert relative(partial, displaced) <= 1e-5  # measured 8.9e-7
    assert relative(displaced, run(unet, Patch(Mode.SYNC), 2, params, later)) > 1e-3  # the stale context counts


@pytest.mark.slow
def test_pcpp_without_context_is_naive_attention_with_displaced_convolutions(unet, params, inputs, later,
                                                                            monkeypatch):
    """p = 0: self-attention sees the patch's own tokens only, while convolutions and group norm
    stay displaced. The reference is a displaced step (after the same synchronous warm-up) whose
    attention replaces the stale keys and values of every patch by the patch's own fresh ones."""
    pcpp = ParallelConfig(4, Mode.PCPP, context=0.0)
    _, windows = run(unet, Patch.of(pcpp, Mode.SYNC, record=True), 4, params, inputs)
    partial, _ = run(unet, Patch.of(pcpp), 4, params, later, windows)
    flat = jax.tree_util.tree_flatten_with_path(windows)[0]
    assert [leaf.shape[1] for path, leaf in flat if "'kv_window'" in jax.tree_util.keystr(path)] == [0] * 22
    _, stale = run(unet, Patch(Mode.SYNC, record=True), 4, params, inputs)
    monkeypatch.setattr(px, "own_rows_fresh", lambda gathered, local: local)
    local_attention, _ = run(unet, Patch(Mode.DISPLACED), 4, params, later, stale)
    assert relative(partial, local_attention) <= 1e-6  # measured 0 (two programs: may round differently)


@pytest.mark.slow
def test_pcpp_bytes_match_the_formula(unet, params, inputs):
    """Counted from the compiled HLO against displaced: each self-attention receives, instead of
    (N - 1) x T tokens' keys and values by all-gather, two windows of window(p, T) tokens by
    collective-permute (T: the patch's tokens at that layer); the halos and statistics are the
    same. With 4 patches the windows are 14.4 -> 14 tokens at the upper level, 3.6 -> 4 at the
    lower one."""
    n, context = 4, 0.3
    pcpp = ParallelConfig(n, Mode.PCPP, context=context)
    _, stale = run(unet, Patch(Mode.SYNC, record=True), n, params, inputs)
    displaced = compiled_bytes(unet, Patch(Mode.DISPLACED), n, params, inputs, stale)
    _, window_stale = run(unet, Patch.of(pcpp, Mode.SYNC, record=True), n, params, inputs)
    partial = compiled_bytes(unet, Patch.of(pcpp), n, params, inputs, window_stale)

    gathered = [leaf.shape for path, leaf in jax.tree_util.tree_flatten_with_path(stale)[0]
                if "'kv'" in jax.tree_util.keystr(path)]  # [n B, S, 2C] per self-attention
    assert len(gathered) == 11
    windows = sum(2 * window_size(context, s // n) * c2 * B * 4 for _, s, c2 in gathered)
    all_tokens = sum((n - 1) * (s // n) * c2 * B * 4 for _, s, c2 in gathered)
    assert partial["collective-permute"] - displaced["collective-permute"] == windows > 0
    assert displaced["all-gather"] - partial["all-gather"] == all_tokens
