"""Patch parallelism inside the stream: every image split by rows over N emulated CPU devices,
against the one-device stream, for text to image and for a video-like image-to-image input, and
the two ways an entering image's first displaced step can see the other patches.

    python benchmarks/stream_patch.py [--calls 24] [--devices 2 4] [--json benchmarks/stream_patch.json]
    python benchmarks/stream_patch.py --quick          # seconds: N = 2, 6 calls

The few-step demo model (demo + demo-lcm) at 256x256, rcfg none, guidance 1. Text to image runs
the command's default steps (0, 16, 32, 45) from a fixed seed, prompted with the default prompt;
image to image runs (32, 45) on a clip whose frames are one demo scene with its objects swaying
within their cells (alike frames, as a camera's), prompted with the scene's caption. For each
layout the images are compared with the one-device stream's (PSNR, dB, over the images after the
stream has filled) and read by the demo's detector (prompt accuracy). Layouts: `sync` (equal to
one device), `displaced` with the first step synchronous (`--first-step sync`), and `displaced`
with the first step on the previous entering frame's context (`previous`). On a CPU the devices
are emulated: this measures what stale context costs, not time; beside it, the bytes a device
receives in one stream call's UNet work, read from the compiled program (`collective_bytes`):
displaced steps exchange as much as synchronous ones, but do not wait for it (on an
accelerator), and a synchronous first step adds the entering rows' exchange, waited for.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from quality import PSNR_CAP, psnr  # benchmarks/quality.py: per image, capped for identical images

from jaxfuse.parallel.mesh import emulate_cpu_devices

LAYOUTS = (("sync", "sync"), ("displaced", "sync"), ("displaced", "previous"))


def moving_clip(calls: int, size: int, seed: int):
    """A scene whose objects sway within their cells, a few pixels a frame: [T, 1, H, W, 3]
    float32 in [0, 1], and its caption."""
    import numpy as np

    from jaxfuse.demo.scenes import CELL, caption, render, sample_scene

    scene = sample_scene(np.random.default_rng(seed))
    # The farthest every object can move and stay in its cell.
    reach = min(CELL / 2 - p.radius - max(abs(p.dx), abs(p.dy)) for p in scene.placements)
    frames = []
    for t in range(calls):
        sway = reach * np.sin(2 * np.pi * t / 12)  # a period of 12 frames
        placements = tuple(dataclasses.replace(p, dx=p.dx + sway, dy=p.dy + sway / 2) for p in scene.placements)
        frames.append(render(dataclasses.replace(scene, placements=placements), size))
    return np.stack(frames)[:, None].astype(np.float32) / 255, caption(scene)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=24, help="stream calls per run (images past the fill are scored)")
    p.add_argument("--devices", type=int, nargs="+", default=[2, 4])
    p.add_argument("--quick", action="store_true", help="N = 2, 6 calls")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    devices, calls = ((2,), 6) if args.quick else (tuple(args.devices), args.calls)
    emulate_cpu_devices(max(devices))

    import jax
    import numpy as np

    from jaxfuse.analysis.hlo import collective_bytes
    from jaxfuse.demo import DEMO_LCM_LORA, DEMO_MODEL, DEMO_PROMPT
    from jaxfuse.demo.architecture import IMAGE_SIZE
    from jaxfuse.demo.detect import prompt_accuracy
    from jaxfuse.parallel_config import ParallelConfig
    from jaxfuse.pipeline import load_pipeline
    from jaxfuse.sampling.stream import StreamConfig
    from jaxfuse.stream import Stream

    pipe = load_pipeline(DEMO_MODEL, log=lambda _: None, loras=[(DEMO_LCM_LORA, 1.0)])
    clip, clip_caption = moving_clip(calls, IMAGE_SIZE, seed=5)
    tasks = {"text to image": ((0, 16, 32, 45), DEMO_PROMPT, None),
             "image to image": ((32, 45), clip_caption, clip)}
    rows = []
    for task, (t_index, prompt, frames) in tasks.items():
        lag = len(t_index) - 1

        def run(parallel, first_step="sync"):
            """(the images of the frames that entered, past the empty buffer's; the bytes a device
            receives in one call's UNet work, from the compiled program)."""
            stream = Stream(pipe, prompt, config=StreamConfig(t_index, 1, "none", first_step),
                            image_to_image=frames is not None, guidance_scale=1.0, seed=3, patch_parallel=parallel)
            latents = None if frames is None else np.zeros((1, *stream.state.latents.shape[1:]), np.float32)
            hlo = jax.jit(stream._program).lower(stream.denoiser, stream.state, stream.cond, stream.guidance,
                                                 latents).compile().as_text()
            images = stream.run(frames) if frames is not None else stream.run(calls=calls)
            return images[lag:, 0], sum(collective_bytes(hlo).values())

        one, _ = run(None)
        one_accuracy = float(np.mean([prompt_accuracy(prompt, image) for image in one]))
        rows.append({"task": task, "devices": 1, "mode": "one device", "first_step": "-", "psnr_db": PSNR_CAP,
                     "accuracy": one_accuracy, "received_kb": 0.0})
        for n in devices:
            for mode, first_step in LAYOUTS:
                images, received = run(ParallelConfig(n, mode), first_step)
                rows.append({"task": task, "devices": n, "mode": mode,
                             "first_step": first_step if mode == "displaced" else "-",
                             "psnr_db": float(np.mean(psnr(images, one))),
                             "accuracy": float(np.mean([prompt_accuracy(prompt, image) for image in images])),
                             "received_kb": received / 1024})
                print(f"{task}, N={n}, {mode} {first_step}: {rows[-1]['psnr_db']:.1f} dB", file=sys.stderr)
    print("| task | N | mode | first step | PSNR vs one device (dB) | prompt accuracy | received per device and "
          "call (KB) |\n|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['task']} | {row['devices']} | {row['mode']} | {row['first_step']} | "
              f"{row['psnr_db']:.1f} | {row['accuracy']:.1%} | {row['received_kb']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"calls": calls, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
