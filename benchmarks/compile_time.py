"""Compile time and wall time of the default command, per parallel mode, for one or more source
trees side by side (the same machine, the runs of each mode interleaved).

    python benchmarks/compile_time.py                                # this tree
    python benchmarks/compile_time.py --trees /path/to/old-checkout .  # before against after

Each run is `python -m jaxfuse.generate` on the demo model with 4 emulated CPU devices, 10 steps,
in a fresh process (no compilation cache), so compile time is what a new user waits for. Compile
time is what the pipeline reports (its programs' `lower().compile()`); wall time is the whole
process, start-up and model loading included.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_once(tree: Path, mode: str, steps: int, workdir: Path) -> tuple[float, float]:
    """(compile seconds, wall seconds) of one command run with `tree` first on the path."""
    out = workdir / f"{mode}.png"
    for stale in (out, out.with_suffix(".json")):
        stale.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(tree.resolve()), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jaxfuse.generate", "--mode", mode, "--devices", "4", "--steps",
                    str(steps), "--output", str(out), "--cache-dir", str(workdir / "cache")],
                   cwd=workdir, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    return json.loads(out.with_suffix(".json").read_text())["timings_s"]["compile"], wall


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trees", type=Path, nargs="+", default=[Path(".")], help="source trees to compare")
    p.add_argument("--modes", nargs="+", default=["sync", "displaced", "pcpp"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2, help="runs per tree and mode (the median is shown)")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for tree in args.trees:  # a first run per tree fills its weights cache, outside the timing
            run_once(tree, args.modes[0], 1, workdir)
        for mode in args.modes:
            runs = {tree: [] for tree in args.trees}
            for _ in range(args.repeats):
                for tree in args.trees:
                    runs[tree].append(run_once(tree, mode, args.steps, workdir))
            for tree, results in runs.items():
                compile_s = statistics.median(r[0] for r in results)
                wall_s = statistics.median(r[1] for r in results)
                rows.append((mode, str(tree), compile_s, wall_s))
    print(f"\ndemo model, 4 emulated CPU devices, {args.steps} steps; median of {args.repeats} runs\n")
    print("| mode | tree | compile (s) | wall (s) |\n|---|---|---|---|")
    for mode, tree, compile_s, wall_s in rows:
        print(f"| {mode} | {tree} | {compile_s:.1f} | {wall_s:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
