"""The stream against the plain pipeline at the same steps, and the UNet calls the similarity filter
saves on a still input, on the few-step demo model.

    python benchmarks/stream_speed.py [--calls 20] [--repeats 5] [--json benchmarks/stream_speed.json]
    python benchmarks/stream_speed.py --quick          # seconds: n = 2, two guidance types

Image to image at 256x256 on one CPU device, from one loaded pipeline with the demo LCM-LoRA.
For each number of steps n (`t_index_list` (45,), (32, 45), (0, 16, 32, 45) of the 50-step LCM
schedule) and each residual guidance type, a stream call takes one frame and hands out one image:
images per second = 1 / the call's time, latency = n calls (a frame enters, n - 1 calls later its
image leaves). Beside it, the plain pipeline's time for one image from the same frame with the
same UNet work: `pipe.generate(image=frame, strength=1, scheduler="lcm")` at n steps, which also
encodes the prompt, unguided for `none` and `self`, guided (2 UNet rows) for `initialize` and
`full`. Each pair is compiled first and then timed in turns (`--repeats`, median of the per-turn
ratio), `--calls` stream calls and a quarter as many images a turn.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

T_INDEX = {1: (45,), 2: (32, 45), 4: (0, 16, 32, 45)}
RCFGS = ("none", "self", "initialize", "full")


def time_calls(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="n = 2, rcfg none and full, 3 calls, 1 turn")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    steps, rcfgs = ((2,), ("none", "full")) if args.quick else (tuple(T_INDEX), RCFGS)
    calls, repeats = (3, 1) if args.quick else (args.calls, args.repeats)

    import numpy as np

    from jaxfuse.demo import DEMO_LCM_LORA, DEMO_MODEL, DEMO_PROMPT
    from jaxfuse.demo.architecture import IMAGE_SIZE
    from jaxfuse.demo.scenes import make_batch
    from jaxfuse.pipeline import load_pipeline
    from jaxfuse.sampling.stream import StreamConfig
    from jaxfuse.stream import Stream
    from jaxfuse.stream.host import SimilarityFilter, run_threaded

    pipe = load_pipeline(DEMO_MODEL, log=lambda _: None, loras=[(DEMO_LCM_LORA, 1.0)])
    frame = make_batch(7, 1, IMAGE_SIZE)[0].astype(np.float32) / 255  # [1, H, W, 3]
    rows = []
    for n in steps:
        for rcfg in rcfgs:
            guided = rcfg in ("initialize", "full")
            stream = Stream(pipe, DEMO_PROMPT, config=StreamConfig(T_INDEX[n], 1, rcfg), guidance_scale=1.2)
            plain = dict(image=frame[0], strength=1.0, scheduler="lcm", num_inference_steps=n,
                         guidance_scale=1.2 if guided else 1.0)
            stream(frame)  # compiles
            pipe.generate(DEMO_PROMPT, **plain)
            ratios, stream_s, plain_s = [], [], []
            for _ in range(repeats):
                a = time_calls(lambda: stream(frame), calls)  # noqa: B023
                b = time_calls(lambda: pipe.generate(DEMO_PROMPT, **plain), max(1, calls // 4))  # noqa: B023
                stream_s.append(a)
                plain_s.append(b)
                ratios.append(b / a)
            rows.append(dict(n=n, rcfg=rcfg, stream_call_s=statistics.median(stream_s),
                             plain_image_s=statistics.median(plain_s), speedup=statistics.median(ratios),
                             speedup_min=min(ratios), speedup_max=max(ratios)))
            print(f"n={n} {rcfg}: {rows[-1]}", file=sys.stderr)

    # The filter on a still input: the same frame 100 times.
    stream = Stream(pipe, DEMO_PROMPT, config=StreamConfig(T_INDEX[2], 1, "none"))
    counts = run_threaded(stream, [frame] * 100, lambda _: None, SimilarityFilter(0.98, 10), queue_size=4,
                          live=False)
    still = dict(frames=counts.read, calls=counts.calls, skipped=counts.skipped)

    print(f"demo model + demo-lcm, {IMAGE_SIZE}x{IMAGE_SIZE} image to image, one CPU device, "
          f"median of {repeats} turns of {calls} calls\n")
    print("| steps n | rcfg | stream: images/s | stream: latency (ms) | pipeline: images/s | stream / pipeline "
          "(min-max) |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['rcfg']} | {1 / r['stream_call_s']:.1f} | {r['n'] * r['stream_call_s'] * 1e3:.0f} | "
              f"{1 / r['plain_image_s']:.1f} | {r['speedup']:.2f} ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) |")
    print(f"\nstill input, similarity filter 0.98, at most 10 skips in a row: {still['calls']} UNet calls for "
          f"{still['frames']} frames ({still['skipped']} skipped, {100 * still['skipped'] / still['frames']:.1f}%)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "still": still}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
