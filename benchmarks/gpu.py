"""jaxfuse on one GPU: SDXL-base speed against diffusers, the attention kernel, patch compute,
the pipeline and a roofline, as one prepared command for a lent machine.

    python benchmarks/gpu.py                        (SDXL-base at 1024², random weights, bf16)
    python benchmarks/gpu.py --tiny --out /tmp/g    (tiny configs: a CPU smoke run)

Sections, in priority order; `gpu.json` and `gpu.md` are rewritten after each one, so a run cut
off still reports what it measured; a section that would overrun `--budget-s` is skipped, and
one that raises is reported as failed (the exit status is then 1), each with the reason in its
place:

1. unet, diffusers: the UNet forward (batch 2, 77 text tokens) of jaxfuse (`jit`), then of
   diffusers' `UNet2DConditionModel` (PyTorch eager, SDPA attention) on the same random weights,
   which go from JAX to PyTorch through the converter in reverse (`export_checkpoint`), and the
   relative error between the two. The torch row says why where torch or diffusers is missing.
2. attention: per compiled program, its custom calls and how many are cuDNN fused attention;
   then jaxfuse's attention alone at the self-attention sizes of 1024² and 2048² and with pcpp's
   key mask: which kernel ran, its time, and, where cuDNN was not picked, the time with
   `implementation="cudnn"` forced or the reason it cannot be.
3. patch: the per-device compute of patch parallelism at N = 2, 4, 8 (1024²) and 8 (2048²)
   against single-device / N. One device cannot run the N-device program, so the stand-in is a
   naive-mode step on h/N rows (no exchanges, self-attention over its own rows): a lower bound on
   a displaced step's work.
3b. deepcache: DeepCache's steps (`jaxfuse.step_cache`) at the preset's size: the guided step
   uncached, then full and shallow at each of the preset's branches (SDXL: 0 and 3), each fed
   the state the one before wrote as the loop feeds it, and an image's UNet time with one full
   step in every 3 (`pipeline_steps` steps, uniform schedule) against the uncached image. On one
   device, and on every device in displaced mode where the machine has more than one (steps
   after the warm-up; the warm-up steps are left out of the image's time).
4. pipeline: the demo model's encode / denoise / decode seconds (`Generation.timings`); SDXL-base's
   denoising at 1024² as 30 measured guided steps, and its VAE decode (float32, as SDXL's VAE
   needs) at 1024².
5. large: one guided step at 3840² on one device: its time and memory, or the out-of-memory error.
5b. canvas: one guided step of a 2048² canvas's 9 fused views (stride half a window, Gaussian
   weights) on one device, against 9 native steps; the canvas's VAE decode in tiles of 512 px
   (`models.vae_tiled`, host-resident activations) against the untiled decode.
6. roofline: XLA's FLOPs and bytes of the UNet forward, its arithmetic intensity and achieved
   rate, beside the measured peak of a large bf16 matmul and of a large copy.
7. torch_compile: diffusers' UNet under `torch.compile`, last because its compile is the longest.

On a lent H200 (its image has JAX, flax, optax, torch, transformers, not diffusers): first, here,
`echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: -d .whl
diffusers==0.42.1`, then one `run` with carry [".whl"] and a limit that leaves time for a second
try: `python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --out $OUT`, and commit what
it wrote to benchmarks/gpu_results/.

Times are the median of `repeats` runs after a warm-up that compiles; "peak_bytes" is the
device's peak memory in use since the process started (`memory_stats`; None where the backend
keeps none), so it only grows from row to row.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from jaxfuse.analysis.cost import abstract_inputs, build_step
from jaxfuse.config import UNetConfig, VAEConfig
from jaxfuse.demo import DEMO_MODEL, DEMO_PROMPT
from jaxfuse.demo.architecture import unet_config_json
from jaxfuse.models import unet as unet_model
from jaxfuse.models import vae as vae_model
from jaxfuse.models import vae_tiled
from jaxfuse.models.layers import attention
from jaxfuse.parallel_config import Mode, ParallelConfig
from jaxfuse.pipeline import load_pipeline
from jaxfuse.sampling import tiled
from jaxfuse.sampling.denoiser import Denoiser
from jaxfuse.sampling.step import Sampling
from jaxfuse.step_cache import CacheStep, DeepCache
from jaxfuse.weight_conversion import export_checkpoint

DTYPE = jnp.bfloat16
CUDNN_ATTENTION = "__cudnn$fmha"  # the custom_call_target prefix of XLA's cuDNN fused attention
WINDOW_STRIDE = 7919  # a prime: `random_params`' leaves start at scattered offsets of the pool


@dataclasses.dataclass(frozen=True)
class Preset:
    """What a run measures. `estimate_s`: seconds each section is expected to take, compiling
    included (guesses for an H200; a section is skipped when it would pass the budget)."""

    cfg: UNetConfig
    vae: VAEConfig
    size: int  # image height and width in pixels
    repeats: int
    pipeline_steps: int
    patch_layouts: tuple[tuple[int, int], ...]  # (image size, patches)
    deepcache_branches: tuple[int, ...]  # DeepCache branches timed (full and shallow steps each)
    attention_tokens: tuple[int, ...]  # self-attention lengths timed alone, at 10 heads of 64
    large_size: int
    matmul: int  # side of the square bf16 matmul of the roofline
    copy_bytes: int
    torch_backend: str  # torch.compile's backend
    estimate_s: dict[str, float]


FULL = Preset(cfg=UNetConfig.sdxl_base(), vae=VAEConfig.sdxl(), size=1024, repeats=5, pipeline_steps=30,
              patch_layouts=((1024, 2), (1024, 4), (1024, 8), (2048, 8)), deepcache_branches=(0, 3),
              attention_tokens=(4096, 16384), large_size=3840, matmul=16384, copy_bytes=1 << 31,
              torch_backend="inductor",
              estimate_s={"unet": 90, "diffusers": 60, "attention": 75, "patch": 200, "deepcache": 120, "pipeline": 90,
                          "large": 60, "canvas": 120, "roofline": 20, "torch_compile": 120})
# The smoke run checks every code path, not the numbers: few layouts, its large step the patch
# section's 512² one (compiled once), and
# torch.compile's "eager" backend skips inductor's C++ build.
TINY = Preset(cfg=UNetConfig.tiny(), vae=VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4),
              size=256, repeats=2, pipeline_steps=4, patch_layouts=((256, 2), (512, 2)), deepcache_branches=(0, 3),
              attention_tokens=(256,), large_size=512, matmul=256, copy_bytes=1 << 22, torch_backend="eager",
              estimate_s={"unet": 10, "diffusers": 5, "attention": 5, "patch": 10, "deepcache": 10, "pipeline": 15,
                          "large": 5, "canvas": 10, "roofline": 2, "torch_compile": 5})
# What each section's table shows, written above it in gpu.md.
NOTES = {
    "unet": "jaxfuse's UNet forward, bf16, batch 2, random weights in the preset's config.",
    "diffusers": "diffusers' UNet2DConditionModel eager on the same weights (PyTorch layout by "
                 "`export_checkpoint`), bf16, SDPA; rel_error_to_jaxfuse = max |diff| / max |diffusers|; "
                 "compile_s is its first call.",
    "attention": "Custom calls in each optimized program; cudnn_fmha_calls > 0 means cuDNN fused attention ran. "
                 "The attention rows time jaxfuse's attention alone (batch 2, heads of 64); cudnn_forced_s is "
                 "jax.nn.dot_product_attention(implementation='cudnn') where cuDNN was not picked, "
                 "cudnn_forced_error why it cannot run.",
    "patch": "Stand-in for one device's share of a displaced step at N patches: a naive step on h/N rows on "
             "ONE device, exchanges removed (communication hidden) and self-attention over its own rows only, "
             "so a lower bound on the real per-device work. efficiency = (whole-image time / N) / stand-in time.",
    "deepcache": "DeepCache's full and shallow guided steps at each branch against the uncached step (vs_uncached: "
                 "time / uncached time), each run on the state the one before wrote; flops: XLA's count of the "
                 "program. The image rows: steps at interval 3 (full at 0, 3, 6, ...) = full x full step + the rest x "
                 "shallow step, against steps x the uncached step (UNet only; displaced: without the warm-up).",
    "pipeline": "load_pipeline + generate on the demo model, phases from Generation.timings, compiling excluded; "
                "SDXL-base's denoising as steps x the measured guided step, and its VAE decode in float32.",
    "large": "One guided single-device step at the large size: it fits (time, peak memory) or the error says why not.",
    "canvas": "A canvas of 2 x 2 native sizes: one guided step of its 9 views (sampling.tiled, one device) against "
              "9 x the native step (overhead = the merge and the crops); its VAE decode in tiles of half the native "
              "size (float32) against the untiled decode, or why that one does not fit.",
    "roofline": "XLA cost analysis of the UNet forward; peak rates measured with a bf16 matmul and a copy "
                "(x + 1: every byte read and written once); roofline = min(peak FLOP/s, intensity x bandwidth).",
    "torch_compile": "diffusers' UNet as in the diffusers section, under torch.compile (backend in the row); "
                     "compile_s is its first call.",
}


# --- measuring --------------------------------------------------------------------------------

def peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return stats.get("peak_bytes_in_use") if stats else None


def median_seconds(run: Callable[[], Any], repeats: int) -> float:
    """Median wall seconds of `run()` (which must block until done) over `repeats` runs."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclasses.dataclass
class Program:
    """A compiled program, the arguments it was compiled for and the seconds compiling took."""

    compiled: jax.stages.Compiled
    args: tuple
    compile_s: float
    carries: bool = False  # the last argument is state that the program donates and returns: fed back

    def run(self) -> jax.Array:
        out = self.compiled(*self.args)
        if self.carries and isinstance(out, tuple):  # (output, state), as a step that writes the loop's state
            out, state = out
            self.args = (*self.args[:-1], state)
        return jax.block_until_ready(out)

    def timing(self, repeats: int) -> dict[str, Any]:
        self.run()
        return {"median_s": median_seconds(self.run, repeats), "runs": repeats, "compile_s": self.compile_s,
                "peak_bytes": peak_bytes()}

    def cost(self) -> dict[str, float]:
        return self.compiled.cost_analysis()


def compile_program(jitted: Callable, args: tuple) -> Program:
    """`jitted` (a `jax.jit` function) compiled for `args`."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return Program(compiled, args, time.perf_counter() - start)


# --- models and programs ----------------------------------------------------------------------

@functools.cache
def random_params(cfg: UNetConfig | VAEConfig, dtype: Any = DTYPE) -> Any:
    """Random weights of `cfg` (a UNet's or a VAE's): kernels N(0, 1/fan in), norm scales near 1, biases small, so
    activations keep their size through 2.6B parameters. Each leaf is a window, at its own offset,
    of one draw twice the largest leaf's size: one small program, where a draw per leaf would be
    1,700 random ops to compile, one draw of every parameter an array past int32 indexing, and
    Flax's `init` a run of the model (a compile as long as the UNet's)."""
    model = unet_model if isinstance(cfg, UNetConfig) else vae_model
    leaves, treedef = jax.tree.flatten_with_path(model.abstract_params(cfg, dtype))
    largest = max(leaf.size for _, leaf in leaves)

    def draw(key):
        pool = jax.random.normal(key, (2 * largest,), dtype)
        out = []
        for i, (path, leaf) in enumerate(leaves):
            offset = i * WINDOW_STRIDE % (2 * largest - leaf.size + 1)
            x = pool[offset:offset + leaf.size].reshape(leaf.shape)
            name = path[-1].key
            if name == "kernel":
                out.append(x * (1 / math.sqrt(math.prod(leaf.shape[:-1]))))
            else:
                out.append((name == "scale") + 0.05 * x)
        return jax.tree.unflatten(treedef, [x.astype(dtype) for x in out])

    return jax.jit(draw)(jax.random.key(0))


def unet_inputs(cfg: UNetConfig, latent: int) -> dict[str, np.ndarray]:
    """The UNet's batch-2 inputs at a latent of latent x latent (NCHW), as in guided sampling."""
    rng = np.random.default_rng(0)
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return dict(sample=rng.standard_normal((2, cfg.in_channels, latent, latent), np.float32),
                timesteps=np.float32([500, 500]),
                encoder_hidden_states=rng.standard_normal((2, 77, cfg.cross_attention_dim), np.float32),
                text_embeds=rng.standard_normal((2, pooled), np.float32),
                time_ids=np.tile(np.float32([1024, 1024, 0, 0, 1024, 1024]), (2, 1)))


@functools.cache
def forward_program(cfg: UNetConfig, latent: int) -> Program:
    inputs = unet_inputs(cfg, latent)
    unet = unet_model.UNet2DConditionModel(cfg, DTYPE)
    return compile_program(jax.jit(lambda params, inputs: unet.apply({"params": params}, **inputs)),
                           (random_params(cfg), jax.device_put(inputs)))


@functools.cache
def step_program(cfg: UNetConfig, parallel: ParallelConfig, height: int, width: int,
                 cache: CacheStep | None = None) -> Program:
    """`jaxfuse.analysis.cost.build_step`'s guided step (a DeepCache step with `cache`) with the
    random weights and random inputs in place of its abstract ones, the denoiser's state too."""
    step, args, _ = build_step(cfg, parallel, height, width, DTYPE, cache=cache)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(args[1:]))))
    inputs = jax.tree.map(lambda a: jax.random.normal(next(keys), a.shape, a.dtype)
                          if isinstance(a, jax.ShapeDtypeStruct) else a, args[1:])
    program = compile_program(step, (args[0].replace(params=random_params(cfg)), *inputs))
    program.carries = cache is not None or parallel.mode.reads_stale
    return program


def single_step(preset: Preset, size: int | None = None) -> Program:
    size = size or preset.size
    return step_program(preset.cfg, ParallelConfig(), size, size)


# --- sections ---------------------------------------------------------------------------------

def diffusers_unet_row(preset: Preset, ours: np.ndarray, compile_backend: str | None = None) -> dict[str, Any]:
    """diffusers' UNet on jaxfuse's weights, bf16, SDPA attention, eager or under `torch.compile`
    with `compile_backend`: its timing and its relative error to `ours`; or why it did not run."""
    try:
        import torch
        from diffusers import UNet2DConditionModel as TorchUNet
        from diffusers.models.attention_processor import AttnProcessor2_0
    except ImportError as e:
        return {"program": "diffusers UNet (torch)", "skipped": f"not installed: {e}"}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = TorchUNet.from_config(unet_config_json(preset.cfg)).to(torch.bfloat16).eval()
    model.set_attn_processor(AttnProcessor2_0())
    state = {name: torch.from_numpy(np.asarray(tensor, np.float32)).to(torch.bfloat16)
             for name, tensor in export_checkpoint(random_params(preset.cfg)).items()}
    model.load_state_dict(state, strict=True)
    del state
    how = "eager" if compile_backend is None else f"torch.compile, {compile_backend}"
    if compile_backend is not None:
        model = torch.compile(model, backend=compile_backend)
    t = {k: torch.from_numpy(v).to(device, torch.bfloat16)
         for k, v in unet_inputs(preset.cfg, preset.size // 8).items()}

    @torch.no_grad()
    def run():
        out = model(t["sample"], t["timesteps"], encoder_hidden_states=t["encoder_hidden_states"],
                    added_cond_kwargs={"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]}).sample
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    reference = run().float().cpu().numpy().astype(np.float64)
    first = time.perf_counter() - start  # eager: the first call; compiled: mostly the compile
    error = float(np.abs(ours - reference).max() / np.abs(reference).max())
    return {"program": f"diffusers UNet ({how}, SDPA, {device})", "median_s": median_seconds(run, preset.repeats),
            "runs": preset.repeats, "compile_s": first,
            "peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
            "rel_error_to_jaxfuse": error}


def unet_section(preset: Preset) -> list[dict]:
    program = forward_program(preset.cfg, preset.size // 8)
    return [{"program": "jaxfuse UNet (jit)", **program.timing(preset.repeats)}]


def diffusers_section(preset: Preset, compile_backend: str | None = None) -> list[dict]:
    ours = forward_program(preset.cfg, preset.size // 8).run()
    return [diffusers_unet_row(preset, np.asarray(ours, np.float64), compile_backend)]


def torch_compile_section(preset: Preset) -> list[dict]:
    return diffusers_section(preset, preset.torch_backend)


def custom_calls(program: Program) -> Counter:
    """How many times each custom call (cuBLAS, cuDNN, ...) appears in the optimized HLO."""
    return Counter(re.findall(r'custom_call_target="([^"]+)"', program.compiled.as_text()))


def cudnn_calls(program: Program) -> int:
    return sum(n for target, n in custom_calls(program).items() if target.startswith(CUDNN_ATTENTION))


def attention_row(tokens: int, masked: bool, repeats: int, heads: int = 10) -> dict[str, Any]:
    """jaxfuse's self-attention over `tokens` (with pcpp's key mask: half the keys) alone: which
    kernel it compiled to and its time; where that is not cuDNN, cuDNN forced, or why it fails."""
    q, k, v = jax.random.normal(jax.random.key(2), (3, 2, tokens, heads * 64), DTYPE)
    mask = jnp.arange(tokens) < tokens // 2 if masked else None
    program = compile_program(jax.jit(lambda q, k, v, mask: attention(q, k, v, heads, key_mask=mask)),
                              (q, k, v, mask))
    row = {"program": f"attention, {tokens} tokens{', key mask' if masked else ''}",
           "cudnn_fmha_calls": cudnn_calls(program), **program.timing(repeats)}
    if row["cudnn_fmha_calls"]:
        return row

    def forced(q, k, v, mask):
        split = [x.reshape(2, tokens, heads, 64) for x in (q, k, v)]
        return jax.nn.dot_product_attention(*split, mask=None if mask is None else mask[None, None, None, :],
                                            implementation="cudnn")

    try:
        row["cudnn_forced_s"] = compile_program(jax.jit(forced), (q, k, v, mask)).timing(repeats)["median_s"]
    except Exception as e:  # XLA and cuDNN refuse with many error types; the message is the finding
        row["cudnn_forced_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return row


def attention_section(preset: Preset) -> list[dict]:
    programs = {"UNet forward": forward_program(preset.cfg, preset.size // 8),
                "guided single-device step": single_step(preset)}
    rows = []
    for name, program in programs.items():
        calls = custom_calls(program)
        rows.append({"program": name, "cudnn_fmha_calls": cudnn_calls(program),
                     "custom_calls": ", ".join(f"{target} x{n}" for target, n in sorted(calls.items())) or "none",
                     "compile_s": program.compile_s})
    for tokens in preset.attention_tokens:
        rows.append(attention_row(tokens, False, preset.repeats))
    rows.append(attention_row(preset.attention_tokens[0], True, preset.repeats))
    return rows


def patch_section(preset: Preset) -> list[dict]:
    rows, single = [], {}
    for size, n in preset.patch_layouts:
        if size not in single:
            single[size] = single_step(preset, size).timing(preset.repeats)
            rows.append({"program": "guided step, whole image", "size": size, "patches": 1, **single[size]})
        # On a one-device mesh a naive step is one patch's rows with nothing exchanged.
        timing = step_program(preset.cfg, ParallelConfig(1, Mode.NAIVE), size // n, size).timing(preset.repeats)
        ideal = single[size]["median_s"] / n
        rows.append({"program": f"naive step on h/{n} rows, 1 device (stand-in: no exchanges)", "size": size,
                     "patches": n, **timing, "ideal_s": ideal, "efficiency": ideal / timing["median_s"]})
    return rows


def deepcache_section(preset: Preset) -> list[dict]:
    rows, steps = [], preset.pipeline_steps
    layouts = [ParallelConfig()] + ([ParallelConfig(jax.device_count(), Mode.DISPLACED)]
                                    if jax.device_count() > 1 else [])
    for parallel in layouts:
        where = {"devices": parallel.devices, "mode": parallel.mode.value}
        # No cache argument: the single-device program is `single_step`'s, compiled once.
        uncached = step_program(preset.cfg, parallel, preset.size, preset.size)
        base = uncached.timing(preset.repeats)
        rows.append({"program": "guided step, uncached", **where, **base, "flops": uncached.cost()["flops"]})
        for branch in preset.deepcache_branches:
            timed = {}
            for full in (True, False):
                program = step_program(preset.cfg, parallel, preset.size, preset.size, CacheStep(branch, full))
                timed[full] = program.timing(preset.repeats)
                rows.append({"program": f"DeepCache {'full' if full else 'shallow'} step, branch {branch}", **where,
                             **timed[full], "flops": program.cost()["flops"],
                             "vs_uncached": timed[full]["median_s"] / base["median_s"]})
            full_steps = len(DeepCache(3, branch).full_steps(steps))
            image = full_steps * timed[True]["median_s"] + (steps - full_steps) * timed[False]["median_s"]
            uncached_image = steps * base["median_s"]
            rows.append({"program": f"image, N=3, branch {branch}: {steps} steps, {full_steps} full", **where,
                         "image_s": image, "uncached_image_s": uncached_image, "speedup": uncached_image / image})
    return rows


def pipeline_section(preset: Preset, cache: Path) -> list[dict]:
    pipe = load_pipeline(DEMO_MODEL, dtype=DTYPE, cache_dir=cache, log=lambda _: None)

    def generate() -> dict[str, float]:
        return pipe.generate(DEMO_PROMPT, num_inference_steps=preset.pipeline_steps).timings

    compile_s = generate()["compile"]  # the first call compiles every program the later ones run
    timings = [generate() for _ in range(preset.repeats)]
    phases = {f"{phase}_s": statistics.median(t[phase] for t in timings) for phase in ("encode", "denoise", "decode")}
    demo = {"program": f"demo pipeline, {preset.pipeline_steps} steps", **phases, "runs": preset.repeats,
            "compile_s": compile_s, "peak_bytes": peak_bytes()}
    step = single_step(preset).timing(preset.repeats)
    denoise = {"program": f"SDXL-base denoising at {preset.size}², {preset.pipeline_steps} x the guided step",
               "denoise_s": preset.pipeline_steps * step["median_s"], "peak_bytes": step["peak_bytes"]}
    vae = vae_model.AutoencoderKL(preset.vae, jnp.float32)
    latents = jax.random.normal(jax.random.key(3), (1, preset.vae.latent_channels, preset.size // 8, preset.size // 8))
    decode = compile_program(jax.jit(lambda params, z: vae.apply({"params": params}, z, method="decode")),
                             (random_params(preset.vae, jnp.float32), latents))
    return [demo, denoise, {"program": f"VAE decode at {preset.size}², float32", **decode.timing(preset.repeats)}]


def large_section(preset: Preset) -> list[dict]:
    row = {"program": f"guided step at {preset.large_size}², 1 device"}
    try:
        return [{**row, "fits": True, **single_step(preset, preset.large_size).timing(preset.repeats)}]
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return [{**row, "fits": False, "error": str(e).splitlines()[0][:300], "peak_bytes": peak_bytes()}]


def canvas_section(preset: Preset) -> list[dict]:
    size, window = 2 * preset.size, preset.size // 8
    tiling = tiled.Tiling((window, window), (window // 2, window // 2), tiled.Weighting.GAUSSIAN)
    predictor = tiled.views_predictor(tiling, (size // 8, size // 8), 8, None)
    latents, cond, schedule, guidance = abstract_inputs(preset.cfg, 1, size, size, DTYPE)
    keys = iter(jax.random.split(jax.random.key(2), 3))
    cond = jax.tree.map(lambda a: jax.random.normal(next(keys), a.shape, a.dtype), cond)
    canvas = tiled.CanvasConditioning(cond, tiled.whole_canvas((size // 8, size // 8), preset.cfg.in_channels))
    unet, sampling = unet_model.UNet2DConditionModel(preset.cfg, DTYPE), Sampling(True, False)

    def step(params, x, canvas):
        return predictor.predict(Denoiser(unet, params), sampling, schedule, 0, x, canvas, guidance)[0]

    x = jax.random.normal(jax.random.key(4), latents.shape)
    views = compile_program(jax.jit(step), (random_params(preset.cfg), x, canvas)).timing(preset.repeats)
    native = single_step(preset).timing(preset.repeats)["median_s"]
    rows = [{"program": f"guided step of a {size}² canvas, 9 views, 1 device", **views,
             "views_x_native_s": 9 * native, "overhead": views["median_s"] / (9 * native)}]

    vae, params = vae_model.AutoencoderKL(preset.vae, jnp.float32), random_params(preset.vae, jnp.float32)
    z = np.asarray(jax.random.normal(jax.random.key(5), (1, preset.vae.latent_channels, size // 8, size // 8)))
    vae_tiled.tiled_decode(vae, params, z, window // 2)  # compiles its stages
    rows.append({"program": f"VAE decode at {size}² in tiles of {preset.size // 2} px, float32",
                 "median_s": median_seconds(lambda: vae_tiled.tiled_decode(vae, params, z, window // 2),
                                            preset.repeats), "runs": preset.repeats, "peak_bytes": peak_bytes()})
    untiled = {"program": f"VAE decode at {size}², untiled, float32"}
    try:
        decode = compile_program(jax.jit(lambda params, z: vae.apply({"params": params}, z, method="decode")),
                                 (params, jnp.asarray(z)))
        rows.append({**untiled, **decode.timing(preset.repeats)})
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        rows.append({**untiled, "fits": False, "error": str(e).splitlines()[0][:300]})
    return rows


def roofline_section(preset: Preset) -> list[dict]:
    program = forward_program(preset.cfg, preset.size // 8)
    cost = program.cost()
    timing = program.timing(preset.repeats)
    n = preset.matmul
    a = jnp.ones((n, n), DTYPE)
    matmul = compile_program(jax.jit(lambda a: a @ a), (a,))
    x = jnp.ones((preset.copy_bytes // 2,), DTYPE)
    copy = compile_program(jax.jit(lambda x: x + 1), (x,))  # reads and writes every byte once
    matmul_s, copy_s = matmul.timing(preset.repeats)["median_s"], copy.timing(preset.repeats)["median_s"]
    peak_flops, bandwidth = 2 * n ** 3 / matmul_s, 2 * preset.copy_bytes / copy_s
    intensity = cost["flops"] / cost["bytes accessed"]
    return [{"program": "jaxfuse UNet forward", "flops": cost["flops"], "bytes_accessed": cost["bytes accessed"],
             "flops_per_byte": intensity, **timing, "achieved_flops_per_s": cost["flops"] / timing["median_s"],
             "roofline_flops_per_s": min(peak_flops, intensity * bandwidth)},
            {"program": f"bf16 matmul {n}x{n}", "median_s": matmul_s, "flops_per_s": peak_flops},
            {"program": f"bf16 copy of {preset.copy_bytes / 2 ** 20:.0f} MiB", "median_s": copy_s,
             "bytes_per_s": bandwidth}]


# --- reporting --------------------------------------------------------------------------------

def environment() -> dict[str, Any]:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "jax": jax.__version__, "jaxlib": jaxlib.__version__, "devices": [str(d) for d in jax.devices()],
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "torch": None, "cudnn": None}
    try:
        import torch
    except ImportError:
        return env
    env["torch"] = torch.__version__
    env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return env


def cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown(report: dict[str, Any]) -> str:
    lines = ["# jaxfuse on one GPU (benchmarks/gpu.py)", "",
             *(f"- {key}: {cell(value)}" for key, value in report["environment"].items())]
    for name, section in report["sections"].items():
        lines += ["", f"## {name}", "", NOTES[name], ""]
        if "rows" not in section:
            lines += [f"{outcome}: {why}" for outcome, why in section.items()]
            continue
        columns = list(dict.fromkeys(key for row in section["rows"] for key in row))
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in section["rows"]]
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], out: Path) -> None:
    (out / "gpu.json").write_text(json.dumps(report, indent=1))
    (out / "gpu.md").write_text(markdown(report))


def run_section(section: Callable[[Preset], list[dict]], preset: Preset, expected_s: float,
                left_s: float) -> dict[str, Any]:
    """{"rows": ...}, or why there are none: "skipped" when the section would overrun the budget,
    "failed" with the error when it raised."""
    if expected_s > left_s:
        return {"skipped": f"expected to take {expected_s:.0f} s, {max(left_s, 0):.0f} s of the budget left"}
    try:
        return {"rows": section(preset)}
    except Exception as e:  # a one-off run on a lent machine: report it and go on to the next section
        traceback.print_exc()
        return {"failed": f"{type(e).__name__}: {e}"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=float, default=480, help="skip sections that would not finish by then")
    p.add_argument("--out", type=Path, default=Path("benchmarks/gpu_results"), help="where gpu.json and gpu.md go")
    p.add_argument("--tiny", action="store_true", help="tiny configs and 2 runs: a CPU smoke test")
    args = p.parse_args()
    start = time.perf_counter()
    preset = TINY if args.tiny else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(), "preset": {"size": preset.size, "tiny": args.tiny}, "sections": {}}
    with tempfile.TemporaryDirectory() as cache:
        sections = {"unet": unet_section, "diffusers": diffusers_section, "attention": attention_section,
                    "patch": patch_section, "deepcache": deepcache_section,
                    "pipeline": lambda preset: pipeline_section(preset, Path(cache)),
                    "large": large_section, "canvas": canvas_section, "roofline": roofline_section,
                    "torch_compile": torch_compile_section}
        for name, section in sections.items():
            left_s = args.budget_s - (time.perf_counter() - start)
            report["sections"][name] = run_section(section, preset, preset.estimate_s[name], left_s)
            write(report, args.out)
            print(f"{name}: {next(iter(report['sections'][name]))} at {time.perf_counter() - start:.0f} s", flush=True)
    print(markdown(report))
    return int(any("failed" in section for section in report["sections"].values()))


if __name__ == "__main__":
    sys.exit(main())
