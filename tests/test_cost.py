"""What the cost benchmarks read: bytes from HLO text, FLOPs and memory from the compiled
per-device program; and a smoke run of each benchmark script on the tiny config."""

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from conftest import sub_jaxprs

from jaxfuse.analysis.cost import build_step, compile_step, step_cost
from jaxfuse.analysis.hlo import collective_bytes
from jaxfuse.config import UNetConfig
from jaxfuse.parallel_config import ParallelConfig

TINY = UNetConfig.tiny()
SIZE = 256  # pixels: a 32x32 latent, 4 rows per patch at the lowest level with 8 patches
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_collective_bytes_by_kind():
    """Per device: a permute receives its result, an all-gather (N-1)/N of it, a ring
    all-reduce 2(N-1)/N of it; async starts count their result only; a permute without pairs
    moves nothing; other ops are not counted."""
    hlo = "\n".join([
        "  %ag = bf16[2,64,8]{2,1,0} all-gather(%x), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={1}",
        "  cp = f32[2,16,8]{2,1,0} collective-permute(y), channel_id=2, source_target_pairs={{0,1},{1,2}}",
        "  ar = f32[10]{0} all-reduce(z), channel_id=3, replica_groups={{0,1}}, to_apply=add",
        "  s = (f32[4,8]{1,0}, f32[16,8]{1,0}) all-gather-start(w), replica_groups={{0,1,2,3}}, dimensions={0}",
        "  e = f32[1,1,4]{2,1,0} collective-permute(u), channel_id=4, source_target_pairs={}",
        "  sum = f32[16,8]{1,0} add(a, b)",
    ])
    got = collective_bytes(hlo)
    assert got["all-gather"] == 2 * 64 * 8 * 2 * 3 // 4 + 16 * 8 * 4 * 3 // 4
    assert got["collective-permute"] == 2 * 16 * 8 * 4
    assert got["all-reduce"] == 2 * 10 * 4 * 1 // 2
    assert set(got) == {"all-gather", "collective-permute", "all-reduce"}


def contraction_flops(jaxpr) -> int:
    """2 x multiply-adds of every matrix product and convolution in `jaxpr`, nested ones too:
    the bulk of a UNet's FLOPs, counted without XLA."""
    total = 0
    for eqn in jaxpr.eqns:
        out = eqn.outvars[0].aval
        if eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * out.size * math.prod(lhs[i] for i in contracting)
        elif eqn.primitive.name == "conv_general_dilated":
            rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, spatial...)
            rhs = eqn.invars[1].aval.shape
            total += 2 * out.size * math.prod(rhs[i] for i in rhs_spec[1:])
        for sub in sub_jaxprs(eqn):
            total += contraction_flops(sub)
    return total


@pytest.mark.parametrize("parallel", [ParallelConfig(1), ParallelConfig(4, "sync"),
                                      pytest.param(ParallelConfig(8, "displaced"), marks=pytest.mark.slow)],
                         ids=["single", "sync-4", "displaced-8"])
def test_flops_read_from_the_compiled_program_cover_its_products(parallel):
    """XLA's count for one device is the products' FLOPs (counted here from the jaxpr, without
    XLA) plus the elementwise work around them, which is a few percent of it."""
    step, args, _ = build_step(TINY, parallel, SIZE, SIZE)
    products = contraction_flops(jax.make_jaxpr(step)(*args).jaxpr)  # a shard_map body has per-device shapes
    flops = step_cost(TINY, parallel, SIZE, SIZE).flops
    assert products <= flops <= 1.1 * products  # measured 1.008 (single), 1.028 (sync-4), 1.034 (displaced-8)


@pytest.mark.slow
def test_per_device_flops_fall_with_the_patches():
    """Sync on N patches costs each device single / N plus the halo rows' extra work: at most
    15% over the ideal on 8 patches of this small image; naive does no more than sync."""
    single = step_cost(TINY, ParallelConfig(1), SIZE, SIZE).flops
    sync = step_cost(TINY, ParallelConfig(8, "sync"), SIZE, SIZE).flops
    naive = step_cost(TINY, ParallelConfig(8, "naive"), SIZE, SIZE).flops
    assert single / 8 < sync <= 1.15 * single / 8  # measured 1.084 x single / 8
    assert naive <= sync  # measured 0.933 x sync


@pytest.mark.parametrize("parallel", [ParallelConfig(4, "sync"), ParallelConfig(4, "displaced"),
                                      pytest.param(ParallelConfig(8, "displaced", cfg_parallel=True),
                                                   marks=pytest.mark.slow)],
                         ids=["sync", "displaced", "displaced-cfg"])
def test_bytes_of_the_written_program_equal_the_compiled_ones_in_float32(parallel):
    """The benchmark counts the program as written (bf16 collectives stay bf16; the CPU
    compiler widens them). In float32 nothing is widened, and the two counts agree."""
    lowered, compiled, _ = compile_step(TINY, parallel, SIZE, SIZE, jnp.float32)
    written = collective_bytes(lowered.as_text(dialect="hlo"))
    assert written == collective_bytes(compiled.as_text())
    assert sum(written.values()) > 0


def test_displaced_memory_holds_the_stale_context():
    """A displaced step's arguments are a sync step's plus the stale context, which holds every
    patch's keys and values: more than the device's own share of them."""
    sync = step_cost(TINY, ParallelConfig(4, "sync"), SIZE, SIZE)
    displaced = step_cost(TINY, ParallelConfig(4, "displaced"), SIZE, SIZE)
    assert sync.stale_bytes == 0
    assert displaced.argument_bytes - sync.argument_bytes == displaced.stale_bytes
    assert displaced.received == sync.received
    assert displaced.stale_bytes > displaced.received["all-gather"]
    assert sync.peak_bytes >= sync.params_bytes + sync.temp_bytes


def script(*args, tmp_path):
    result = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=tmp_path,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_cost_and_projection_scripts_on_the_tiny_config(tmp_path):
    costs = tmp_path / "costs.json"
    out = script(BENCHMARKS / "parallel_cost.py", "--preset", "tiny", "--sizes", str(SIZE), "--devices", "1", "4",
                 "--modes", "displaced", "pcpp", "--contexts", "0.3", "--json", costs, tmp_path=tmp_path)
    rows = json.loads(costs.read_text())
    assert len(rows) == 4 and "| 4 | displaced | yes |" in out
    pcpp = next(r for r in rows if r["mode"] == "pcpp")
    displaced = next(r for r in rows if r["mode"] == "displaced" and not r["cfg_parallel"])
    assert "| 4 | pcpp p=0.3 | no |" in out and pcpp["received_bytes"] < displaced["received_bytes"]
    out = script(BENCHMARKS / "projection.py", "--costs", costs, "--fraction-of-peak", "0.4",
                 "--plot", tmp_path / "projection.png", tmp_path=tmp_path)
    assert "| A100 NVLink3 | 256² | 4 | displaced |" in out
    assert (tmp_path / "projection.png").stat().st_size > 10_000


@pytest.mark.slow
def test_cpu_speed_script_quick(tmp_path):
    out = script(BENCHMARKS / "cpu_speed.py", "--quick", "--json", tmp_path / "speed.json", tmp_path=tmp_path)
    result = json.loads((tmp_path / "speed.json").read_text())
    assert result["unet"]["small"]["max_rel_diff"] < 2e-5  # measured 1.8e-6 (EPYC)
    assert result["pipeline"]["max_abs_diff"] < 5e-5  # measured 4.0e-6, as test_pipeline's image comparisons
    assert "| tiny pipeline, 4 steps |" in out


def test_projection_uses_a_gpu_reports_measured_rates(tmp_path):
    """A full gpu.py report replaces the calibrated rate: fraction = the UNet's achieved FLOP/s
    over the measured matmul peak, and each (size, N) patch efficiency divides that layout's rate."""
    flops, half = 1e12, 0.6e12
    costs = [dict(preset="sdxl-base", size=1024, devices=n, mode=mode, cfg_parallel=False, dtype="bfloat16",
                  flops=f, received_bytes=b) for n, mode, f, b in [(1, "single", flops, 0), (2, "sync", half, 1e6),
                                                                  (2, "displaced", half, 1e6)]]
    report = {"preset": {"size": 1024, "tiny": False},
              "environment": {"devices": ["cuda:0"], "date": "2026-11-30T00:00:00+00:00"},
              "sections": {"roofline": {"rows": [{"program": "jaxfuse UNet forward", "achieved_flops_per_s": 2e14},
                                                 {"program": "bf16 matmul 16384x16384", "flops_per_s": 8e14}]},
                           "patch": {"rows": [{"program": "guided step, whole image", "size": 1024, "patches": 1},
                                              {"program": "naive step", "size": 1024, "patches": 2,
                                               "efficiency": 0.8}]}}}
    (tmp_path / "costs.json").write_text(json.dumps(costs))
    (tmp_path / "gpu.json").write_text(json.dumps(report))
    out = script(BENCHMARKS / "projection.py", "--costs", "costs.json", "--measured", "gpu.json",
                 "--json", "projected.json", tmp_path=tmp_path)
    assert "achieved 25.0% of peak FLOP/s, measured by benchmarks/gpu.py (cuda:0, 2026-11-30" in out
    assert "1024² N=2: 0.80" in out
    projected = json.loads((tmp_path / "projected.json").read_text())
    rows = {(r["accelerator"], r["devices"], r["mode"]): r for r in projected}
    peak = 312e12  # A100's stated bf16 rate
    assert rows["A100 NVLink3", 1, "single"]["compute_ms"] == pytest.approx(flops / (peak * 0.25) * 1e3)
    assert rows["A100 NVLink3", 2, "displaced"]["compute_ms"] == pytest.approx(half / (peak * 0.25 * 0.8) * 1e3)

    report["preset"]["tiny"] = True
    (tmp_path / "gpu.json").write_text(json.dumps(report))
    refused = subprocess.run([sys.executable, BENCHMARKS / "projection.py", "--costs", "costs.json", "--measured",
                              "gpu.json"], capture_output=True, text=True, cwd=tmp_path)
    assert refused.returncode == 1 and "smoke run, not a measurement" in refused.stderr
