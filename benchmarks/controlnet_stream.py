"""The stream's rate with and without the demo ControlNet, at the live page's settings on the demo.

    python benchmarks/controlnet_stream.py [--calls 20] [--repeats 5] [--json benchmarks/controlnet_stream.json]

The demo model with its LCM-LoRA at 256x256 on one CPU device, `--t-index 0 32`, rcfg none, one
camera-like frame a call (a dark square on a light ground): the stream as `--serve` runs it on the
demo (steered by the demo ControlNet, the frame read in grey) against the same stream without a
ControlNet. Both are compiled first, then timed in turns (`--repeats` turns of `--calls` calls
each); the ratio is the median of the per-turn ratios, so both sides see the same machine load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def camera_frame(side: int) -> np.ndarray:
    """[1, side, side, 3] float32: a dark square in the bottom left cell on a light grey ground."""
    frame = np.full((side, side, 3), 200 / 255, np.float32)
    third = side // 3
    frame[2 * third + 20:3 * third - 20, 20:third - 20] = 30 / 255
    return frame[None]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    from jaxfuse.demo import DEMO_CONTROLNET, DEMO_LCM_LORA, DEMO_MODEL, DEMO_PROMPT
    from jaxfuse.pipeline import load_pipeline
    from jaxfuse.sampling.stream import StreamConfig
    from jaxfuse.stream import Stream

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    loras = [(DEMO_LCM_LORA, 1.0)]
    config = StreamConfig((0, 32), 1, "none")
    steered = Stream(load_pipeline(DEMO_MODEL, loras=loras, controlnets=[DEMO_CONTROLNET], log=log), DEMO_PROMPT,
                     config=config, control_preprocess="grey")
    plain = Stream(load_pipeline(DEMO_MODEL, loras=loras, log=log), DEMO_PROMPT, config=config)
    frame = camera_frame(steered.request.height)
    for stream in (steered, plain):
        stream(frame)  # compiles
    seconds = {"steered": [], "plain": []}
    for _ in range(args.repeats):
        for name, stream in (("steered", steered), ("plain", plain)):
            start = time.perf_counter()
            for _ in range(args.calls):
                stream(frame)
            seconds[name].append((time.perf_counter() - start) / args.calls)
    ratios = [s / p for s, p in zip(seconds["steered"], seconds["plain"])]
    result = dict(calls=args.calls, repeats=args.repeats, steered_call_s=statistics.median(seconds["steered"]),
                  plain_call_s=statistics.median(seconds["plain"]), ratio=statistics.median(ratios),
                  ratio_min=min(ratios), ratio_max=max(ratios))
    print(f"demo model + demo-lcm, 256x256, --t-index 0 32, rcfg none, one CPU device; median of {args.repeats} "
          f"turns of {args.calls} calls\n")
    print("| stream | images/s | call (ms) |\n|---|---|---|")
    print(f"| without a ControlNet | {1 / result['plain_call_s']:.1f} | {1e3 * result['plain_call_s']:.0f} |")
    print(f"| with the demo ControlNet | {1 / result['steered_call_s']:.1f} | {1e3 * result['steered_call_s']:.0f} |")
    print(f"\ncall time with / without: {result['ratio']:.2f} ({result['ratio_min']:.2f}-{result['ratio_max']:.2f})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
