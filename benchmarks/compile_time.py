"""Compile time and wall time of the default command, per parallel mode, for one or more source
trees side by side (the same machine, the runs of each mode interleaved).

    python benchmarks/compile_time.py                                # this tree
    python benchmarks/compile_time.py --trees /path/to/old-checkout .  # before against after
    python benchmarks/compile_time.py --compile-cache --modes displaced --steps 30  # first and second run

Each run is `python -m jaxfuse.generate` on the demo model with 4 emulated CPU devices, 10 steps,
in a fresh process without the persistent compilation cache, so compile time is what a new user
waits for. With `--compile-cache`, each mode runs twice on an empty compilation cache: the first
run compiles and fills it, the second loads from it. Compile time is what the pipeline reports
(its programs' `lower().compile()`); wall time is the whole process, start-up and model loading
included (the weights are converted once beforehand, outside the timing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_once(tree: Path, mode: str, steps: int, workdir: Path, compile_cache: bool = False) -> tuple[float, float]:
    """(compile seconds, wall seconds) of one command run with `tree` first on the path."""
    out = workdir / f"{mode}.png"
    for stale in (out, out.with_suffix(".json")):
        stale.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(tree.resolve()), "JAX_PLATFORMS": "cpu",
           "JAXFUSE_COMPILE_CACHE": "1" if compile_cache else "0"}
    env.pop("XLA_FLAGS", None)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jaxfuse.generate", "--mode", mode, "--devices", "4", "--steps",
                    str(steps), "--output", str(out), "--cache-dir", str(workdir / "cache")],
                   cwd=workdir, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    return json.loads(out.with_suffix(".json").read_text())["timings_s"]["compile"], wall


def first_and_second(tree: Path, mode: str, steps: int, workdir: Path) -> tuple[float, ...]:
    """(compile, compile, wall, wall) seconds of a run on an empty compilation cache and of a
    run on the one the first left."""
    shutil.rmtree(workdir / "cache" / "xla", ignore_errors=True)
    (first_compile, first_wall), (second_compile, second_wall) = (
        run_once(tree, mode, steps, workdir, compile_cache=True) for _ in range(2))
    return first_compile, second_compile, first_wall, second_wall


def medians(trees: list[Path], mode: str, steps: int, repeats: int, workdir: Path) -> list[tuple]:
    """(mode, tree, compile, wall) per tree: medians of `repeats` runs, the trees interleaved."""
    runs = {tree: [] for tree in trees}
    for _ in range(repeats):
        for tree in trees:
            runs[tree].append(run_once(tree, mode, steps, workdir))
    return [(mode, str(tree), statistics.median(r[0] for r in results), statistics.median(r[1] for r in results))
            for tree, results in runs.items()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trees", type=Path, nargs="+", default=[Path(".")], help="source trees to compare")
    p.add_argument("--modes", nargs="+", default=["sync", "displaced", "pcpp"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2, help="runs per tree and mode (the median is shown)")
    p.add_argument("--compile-cache", action="store_true", help="time a first and a second run per mode instead")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for tree in args.trees:  # a first run per tree fills its weights cache, outside the timing
            run_once(tree, args.modes[0], 1, workdir)
        for mode in args.modes:
            if args.compile_cache:
                rows += [(mode, str(tree), *first_and_second(tree, mode, args.steps, workdir)) for tree in args.trees]
            else:
                rows += medians(args.trees, mode, args.steps, args.repeats, workdir)
    if args.compile_cache:
        print(f"\ndemo model, 4 emulated CPU devices, {args.steps} steps; a first and a second run on an empty "
              "compilation cache\n")
        print("| mode | tree | compile, first (s) | compile, second (s) | wall, first (s) | wall, second (s) |\n"
              "|---|---|---|---|---|---|")
    else:
        print(f"\ndemo model, 4 emulated CPU devices, {args.steps} steps; median of {args.repeats} runs\n")
        print("| mode | tree | compile (s) | wall (s) |\n|---|---|---|---|")
    for mode, tree, *seconds in rows:
        print(f"| {mode} | {tree} | " + " | ".join(f"{s:.1f}" for s in seconds) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
