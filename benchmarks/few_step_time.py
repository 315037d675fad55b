"""One demo image at few LCM steps against the usual Euler run, side by side on this machine.

    python benchmarks/few_step_time.py [--lora demo-lcm.safetensors] [--repeats 7]

Both on one device from the same loaded pipeline (a LoRA fused at load changes no program, so its
values do not change the time): LCM at 4 steps without guidance (one UNet batch a step) against
Euler at 30 steps with guidance 5 (two), each compiled first, then run in turns; the figure is the
median of the per-turn ratio, which a busy machine disturbs less than either time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

RUNS = {"lcm, 4 steps, guidance 1": dict(scheduler="lcm", num_inference_steps=4, guidance_scale=1.0),
        "euler, 30 steps, guidance 5": dict(scheduler="euler", num_inference_steps=30, guidance_scale=5.0)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lora", type=Path, help="a LoRA fused at weight 1 (default: none)")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)

    from jaxfuse.demo import DEMO_MODEL, DEMO_PROMPT
    from jaxfuse.pipeline import load_pipeline

    pipe = load_pipeline(DEMO_MODEL, log=lambda _: None, loras=[(args.lora, 1.0)] if args.lora else ())
    seconds = {name: [] for name in RUNS}
    for name, run in RUNS.items():  # compiles
        pipe.generate(DEMO_PROMPT, **run)
    for _ in range(args.repeats):
        for name, run in RUNS.items():
            start = time.perf_counter()
            pipe.generate(DEMO_PROMPT, **run)
            seconds[name].append(time.perf_counter() - start)
    (fast, slow) = seconds.values()
    ratios = [a / b for a, b in zip(fast, slow)]
    print(f"demo model, 256x256, one CPU device, median of {args.repeats} turns\n")
    print("| run | seconds per image |\n|---|---|")
    for name, times in seconds.items():
        print(f"| {name} | {statistics.median(times):.3f} |")
    print(f"\nlcm / euler: {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
