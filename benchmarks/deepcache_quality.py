"""What DeepCache costs in image quality and saves in time, on the built-in demo model.

    python benchmarks/deepcache_quality.py --json benchmarks/deepcache_quality.json   # the full study
    python benchmarks/deepcache_quality.py --prompts 2 --steps 4 --devices 2          # seconds

quality.py's captioned scenes (`scenes.make_batch(STUDY_SEED, ...)`) and noise, all prompts in one
batch, generated without the cache on one device (the reference), then with DeepCache at every
interval N (`--intervals`: every N-th step runs every layer) and branch B (`--branches`, default
0 and the demo UNet's middle skip, `num_skips // 2`; see `jaxfuse.step_cache`), first on one device,
then displaced on each of `--devices` (warm-up `--warmup`), where the displaced run without the
cache is a row too. Each row: the mean PSNR of its images against the one-device uncached images
(same prompt, same noise; the worst image in brackets), the prompt accuracy of `jaxfuse.demo.detect`
(quality.py's two numbers), and the wall time of its batch per image, with its ratio to the
uncached batch on as many devices. A setting is timed on its second call: the first compiles it
and is not counted. The uncached batch at a device count is timed in the same run as that count's
cached rows, before and after them (their mean is the ratio's denominator; both are kept), so a
ratio compares runs side by side even when a rerun resumes. Runs on an emulated CPU mesh of 8
devices: times at N > 1 devices say what the emulation costs a CPU, not what N chips would take.
The table's first row is quality.py's: the accuracy of the rendered scenes through the VAE.
With `--json`, finished rows are kept and skipped on a rerun.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from quality import NOISE_SEED, STUDY_SEED, accuracy, autoencoded, psnr  # benchmarks/quality.py

from jaxfuse.parallel.mesh import emulate_cpu_devices

UNCACHED = 1  # DeepCache interval 1: every step runs every layer


def key(row: dict) -> str:
    mode = "single" if row["devices"] == 1 else f"displaced N={row['devices']} warmup={row['warmup']}"
    cache = "uncached" if row["interval"] == UNCACHED else f"deepcache={row['interval']} branch={row['branch']}"
    return f"{mode} {cache}"


def grid(devices: int, warmup: int, intervals: list[int], branches: list[int]) -> list[dict]:
    """The rows at one device count: uncached first, then every interval and branch."""
    base = dict(devices=devices, warmup=warmup if devices > 1 else 0)
    return [dict(base, interval=UNCACHED, branch=None)] + [dict(base, interval=n, branch=b)
                                                          for n in intervals for b in branches]


def table(autoencoded_scores: dict[str, float], rows: list[dict], run: dict) -> str:
    lines = [f"{run['prompts']} prompts, {run['steps']} {run['scheduler']} steps, guidance {run['guidance_scale']:g}; "
             "PSNR against the one-device uncached images (mean over prompts, min in brackets); prompt accuracy "
             "with shape / colour and cell only; wall time per image of the batch after a compiling call, and its "
             "ratio to the uncached batch on as many devices timed in the same run.", "",
             "| devices | DeepCache N | branch | PSNR (dB) | prompt accuracy (%) | s / image | time vs uncached |",
             "|---|---|---|---|---|---|---|"]
    lines.append(f"| 1 | rendered scene through the VAE | - | - | {autoencoded_scores['accuracy']:.1f} / "
                 f"{autoencoded_scores['colour_place']:.1f} | - | - |")
    for r in sorted(rows, key=lambda r: (r["devices"], r["interval"], r["branch"] or 0)):
        devices = "1" if r["devices"] == 1 else f"{r['devices']} displaced"
        cache = ("off", "-") if r["interval"] == UNCACHED else (str(r["interval"]), str(r["branch"]))
        quality = "-" if r["devices"] == 1 and r["interval"] == UNCACHED else f"{r['psnr']:.1f} ({r['psnr_min']:.1f})"
        lines.append(f"| {devices} | {cache[0]} | {cache[1]} | {quality} "
                     f"| {r['accuracy']:.1f} / {r['colour_place']:.1f} | {r['seconds'] / run['prompts']:.2f} "
                     f"| {r['seconds'] / r['uncached_seconds']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="default: the built-in demo model")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 5], help="DeepCache's N")
    p.add_argument("--branches", type=int, nargs="+", default=None,
                   help="DeepCache's branches; default 0 and the UNet's middle skip (num_skips // 2)")
    p.add_argument("--devices", type=int, nargs="*", default=[2, 4, 8], help="displaced on these device counts")
    p.add_argument("--warmup", type=int, default=1, help="displaced's synchronous first steps")
    p.add_argument("--scheduler", default="euler")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--json", type=Path, help="keep finished rows here; a rerun skips them")
    args = p.parse_args(argv)
    emulate_cpu_devices(8)

    from jaxfuse.demo import DEMO_MODEL
    from jaxfuse.demo.scenes import make_batch
    from jaxfuse.parallel_config import ParallelConfig
    from jaxfuse.pipeline import load_pipeline

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    pipe = load_pipeline(args.model or DEMO_MODEL, log=log)
    branches = args.branches if args.branches is not None else [0, pipe.spec.unet.num_skips // 2]
    rendered, captions = make_batch(STUDY_SEED, args.prompts, pipe.spec.default_size)
    identity = dict(model=str(args.model or "demo"), prompts=args.prompts, steps=args.steps,
                    scheduler=args.scheduler, guidance_scale=args.guidance_scale)

    def timed(row: dict, compile_first: bool = True):
        """The row's images and the seconds of its batch; with `compile_first`, timed on a second
        call (the first compiles and is not counted)."""
        n = row["devices"]
        parallel = ParallelConfig() if n == 1 else ParallelConfig(n, "displaced", row["warmup"])
        cache = {} if row["interval"] == UNCACHED else dict(deepcache=row["interval"], deepcache_branch=row["branch"])

        def generate():
            return pipe.generate(captions, num_inference_steps=args.steps, seed=NOISE_SEED, parallel=parallel,
                                 scheduler=args.scheduler, guidance_scale=args.guidance_scale, **cache).images

        if compile_first:
            generate()
        start = time.perf_counter()
        images = generate()
        return images, time.perf_counter() - start

    reference = dict(devices=1, warmup=0, interval=UNCACHED, branch=None)
    single, single_seconds = timed(reference)
    best = accuracy(captions, autoencoded(pipe, rendered))
    log(f"rendered scenes through the VAE: {best}; single: {accuracy(captions, single)}, {single_seconds:.1f} s "
        f"a batch; "
        f"branches {branches} of 0..{pipe.spec.unet.num_skips - 1}")
    done = json.loads(args.json.read_text()) if args.json and args.json.is_file() else []
    done = [r for r in done if all(r.get(k) == v for k, v in identity.items())]

    def save(rows: list[dict]) -> None:
        nonlocal done
        new = {key(r) for r in rows}
        done = [r for r in done if key(r) not in new] + rows
        if args.json:
            args.json.write_text(json.dumps(done, indent=1) + "\n")

    def measured(row: dict, images, seconds: float, uncached: list[float]) -> dict:
        values = psnr(images, single)
        return dict(row, **identity, **accuracy(captions, images), psnr=float(values.mean()),
                    psnr_min=float(values.min()), seconds=round(seconds, 2),
                    uncached_seconds=round(sum(uncached) / len(uncached), 2),
                    uncached_times=[round(s, 2) for s in uncached])

    def report(row: dict) -> None:
        log(f"{key(row)}: PSNR {row['psnr']:.1f} ({row['psnr_min']:.1f}) dB, accuracy {row['accuracy']:.1f}% / "
            f"{row['colour_place']:.1f}%, {row['seconds']:.1f} s a batch "
            f"({row['seconds'] / row['uncached_seconds']:.2f} x uncached {row['uncached_times']})")

    for devices in [1, *args.devices]:
        known = {key(r) for r in done}
        uncached, *cached = grid(devices, args.warmup, args.intervals, branches)
        todo = [r for r in cached if key(r) not in known]
        if not todo and key(uncached) in known:
            continue
        images, before = (single, single_seconds) if devices == 1 else timed(uncached)
        rows = []
        for row in todo:  # kept at once, against the time before; updated below
            rows.append(measured(row, *timed(row), [before]))
            report(rows[-1])
            save(rows)
        # The uncached batch again after its count's cached ones: their denominator is the mean of both.
        times = [before, timed(uncached, compile_first=False)[1]]
        rows = [dict(r, uncached_seconds=round(sum(times) / 2, 2), uncached_times=[round(s, 2) for s in times])
                for r in rows]
        log(f"{key(uncached)}: {times[0]:.1f} s a batch before the cached rows, {times[1]:.1f} s after")
        rows.append(measured(uncached, images, sum(times) / 2, times))  # timed with its count's cached rows
        report(rows[-1])
        save(rows)
    print(table(best, done, identity))
    return 0


if __name__ == "__main__":
    sys.exit(main())
