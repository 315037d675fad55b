"""benchmarks/serve_load.py's quick run: two servers on the demo model at 2 steps, a queue of 2 so
that 4 clients meet 429s; every row served, nothing lost, no compile while serving."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("aiohttp")

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_quick_run_serves_every_request_without_compiling(tmp_path):
    # LLVM's cheapest optimisation shortens the servers' compiles (the times are not checked).
    env = {k: v for k, v in os.environ.items() if k != "JAXFUSE_API_KEY"}
    env |= dict(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
    command = [sys.executable, "benchmarks/serve_load.py", "--clients", "1", "4", "--requests", "8", "--steps", "2",
               "--max-queue", "2", "--memory-requests", "20", "--memory-warmup", "5", "--warmup-requests", "2",
               "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "load.json")]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    report = json.loads((tmp_path / "load.json").read_text())
    assert report["failures"] == []
    rows = {(r["server"], r["clients"]): r for r in report["rows"]}
    assert set(rows) == {(server, clients) for server in ("batching", "unbatched") for clients in (1, 4)}
    for row in [*rows.values(), report["memory"]["run"]]:
        assert row["served"] == row["requests"] and row["failures"] == []
        assert math.isfinite(row["images_per_s"]) and row["images_per_s"] > 0
        assert 0 < row["p50_s"] <= row["p95_s"]
    assert all(key == "1/1" for key in {**rows["unbatched", 1]["batches"], **rows["unbatched", 4]["batches"]})
    assert rows["batching", 4]["mean_batch"] > 1  # 4 clients at once share calls
    assert rows["batching", 4]["retries"] + rows["unbatched", 4]["retries"] > 0  # 4 clients, 2 queued, 1 call
    assert {r["clients"] for r in report["ratios"]} == {1, 4}

    memory = report["memory"]
    assert memory["compiles_before"] == memory["compiles_after"] > 0
    assert memory["rss_after_all_mb"] > 0 and memory["rss_after_warmup_mb"] > 0
    for server in report["servers"].values():
        assert server["compiles_at_end"] == server["compiles_at_listen"] and server["exit_code"] == 0
    assert "| batching | 4 |" in run.stdout and "| unbatched | 1 |" in run.stdout
