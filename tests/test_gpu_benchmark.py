"""benchmarks/gpu.py's smoke run on CPU: every section measured, finite positive times, a table."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SECTIONS = ("unet", "diffusers", "attention", "patch", "deepcache", "pipeline", "large", "canvas", "roofline",
            "torch_compile")


def times(rows: list[dict]) -> list:
    return [value for row in rows for key, value in row.items() if key.endswith("_s")]


@pytest.mark.slow
def test_tiny_run_reports_every_section(tmp_path):
    # One CPU device, as on the GPU machine; LLVM's cheapest optimisation shortens the compiles
    # that take most of the run (the times are not checked, only that they are there).
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
    run = subprocess.run([sys.executable, "benchmarks/gpu.py", "--tiny", "--out", str(tmp_path)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["environment"]["jax"]
    assert set(report["sections"]) == set(SECTIONS)
    for name in SECTIONS:
        section = report["sections"][name]
        assert "rows" in section, (name, section)  # torch and diffusers too: they are in the test extra
        rows = section["rows"]
        assert times(rows), name
        assert all(t is not None and math.isfinite(t) and t > 0 for t in times(rows)), (name, rows)
    for name in ("diffusers", "torch_compile"):
        assert report["sections"][name]["rows"][0]["rel_error_to_jaxfuse"] < 0.1  # both bf16; measured 0.017
    attention = report["sections"]["attention"]["rows"]
    # No cuDNN on CPU: the forced kernel's row says why instead of a time.
    assert [row["cudnn_forced_error"] for row in attention if "tokens" in row["program"]] == \
        ["RuntimeError: cuDNN is not detected."] * 2
    assert report["sections"]["large"]["rows"][0]["fits"] is True
    # DeepCache, one device: uncached, full and shallow at branches 0 and 3, and an image at N = 3 for each
    # branch; a shallow step has fewer FLOPs than a full one, which has the uncached step's (the same layers).
    deepcache = {row["program"]: row for row in report["sections"]["deepcache"]["rows"]}
    uncached = deepcache["guided step, uncached"]["flops"]
    for branch in (0, 3):
        full, shallow = (deepcache[f"DeepCache {step} step, branch {branch}"]["flops"] for step in ("full", "shallow"))
        assert shallow < 0.9 * full and full == pytest.approx(uncached, rel=0.01)
        assert deepcache[f"image, N=3, branch {branch}: 4 steps, 2 full"]["speedup"] > 0
    assert "| program |" in (tmp_path / "gpu.md").read_text()
