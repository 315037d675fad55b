"""How much patch parallelism changes the image, on the built-in demo model.

    python benchmarks/quality.py --json benchmarks/quality.json          # the full study
    python benchmarks/quality.py --prompts 4 --steps 4 --devices 2 --warmups 1   # seconds
    python benchmarks/quality.py --lora demo-lcm.safetensors --scheduler lcm --guidance-scale 1 \
        --steps 4 --devices 2 4 --warmups 1 2 --contexts                  # a few-step LoRA

A fixed set of captioned scenes (`scenes.make_batch(STUDY_SEED, ...)`: prompts the model never
trained on) is generated once on one device and then under every parallel setting, all prompts in
one batch, prompt i from the i-th slice of the seed's noise. Each setting reports the mean PSNR of
its images against the single-device images (same prompt, same noise) and the prompt accuracy of
`jaxfuse.demo.detect`: the share of the caption's objects found with the right colour, shape and
cell, and with the right colour and cell whatever the shape. The rendered scenes passed through
the model's VAE give the accuracy no generated image can beat. Settings: displaced with each
warm-up, pcpp with each context fraction (at the longest warm-up), naive, and sync (a check: it
should equal single) at each device count; at the largest count also every group-norm mode of
displaced steps (no parallel setting at all with `--devices` alone: the single-device accuracy).
Runs on an emulated CPU mesh of 8 devices.
With `--json`, finished rows are kept and skipped on a rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

STUDY_SEED = 2026  # the study's scenes; training draws from other seeds
NOISE_SEED = 0
PSNR_CAP = 100.0  # dB, for images identical to the last bit


def settings(devices: list[int], warmups: list[int], contexts: list[float]) -> list[dict]:
    from jaxfuse.parallel_config import GroupNormMode

    rows, warm = [], max(warmups)
    for n in devices:
        rows += [dict(mode="displaced", devices=n, warmup=w, gn="corrected") for w in warmups]
        rows += [dict(mode="pcpp", devices=n, warmup=warm, gn="corrected", context=p) for p in contexts]
        rows += [dict(mode="naive", devices=n, warmup=0, gn="corrected"),
                 dict(mode="sync", devices=n, warmup=0, gn="corrected")]
    if devices:
        rows += [dict(mode="displaced", devices=max(devices), warmup=warm, gn=gn.value)
                 for gn in GroupNormMode if gn.value != "corrected"]
    return rows


def key(row: dict) -> str:
    context = f" context={row['context']:g}" if row.get("context") is not None else ""
    return f"{row['mode']} N={row['devices']} warmup={row['warmup']} gn={row['gn']}{context}"


def psnr(images, reference):
    """Per-image PSNR in dB of images in [0, 1] [B, H, W, 3] against `reference`, capped."""
    import numpy as np

    mse = np.mean((images.astype(np.float64) - reference) ** 2, axis=(1, 2, 3))
    return np.minimum(10 * np.log10(1 / np.maximum(mse, 1e-30)), PSNR_CAP)


def accuracy(captions, images) -> dict[str, float]:
    """Mean prompt accuracy in percent of float images in [0, 1]: objects found with the named
    colour, shape and cell, and with the named colour and cell whatever their shape."""
    import numpy as np

    from jaxfuse.demo.detect import prompt_accuracy

    images = [np.round(im * 255).astype(np.uint8) for im in images]
    return {name: 100 * float(np.mean([prompt_accuracy(c, im, with_shape) for c, im in zip(captions, images)]))
            for name, with_shape in (("accuracy", True), ("colour_place", False))}


def autoencoded(pipe, images):
    """Rendered scenes [B, H, W, 3] uint8 through the pipeline's VAE (encode to the latent mean,
    decode): the best any generated image can be, as the detector sees it."""
    import jax.numpy as jnp
    import numpy as np

    x = jnp.asarray(np.transpose(images, (0, 3, 1, 2)), jnp.float32) / 127.5 - 1
    out = pipe.codec.vae.apply({"params": pipe.codec.params}, x)
    return np.clip((np.transpose(np.asarray(out), (0, 2, 3, 1)) + 1) / 2, 0, 1)


def table(references: dict[str, dict], rows: list[dict], run: dict) -> str:
    lora = f", LoRA {run['lora']}" if run["lora"] else ""
    lines = [f"{run['prompts']} prompts, {run['steps']} {run['scheduler']} steps, guidance {run['guidance_scale']:g}"
             f"{lora}; PSNR against single (mean over prompts, min in brackets); prompt accuracy with shape / "
             "colour and cell only.", "",
             "| devices | mode | warm-up | group norm | PSNR (dB) | prompt accuracy (%) |",
             "|---|---|---|---|---|---|"]
    for name, scores in references.items():
        lines.append(f"| 1 | {name} | - | - | - | {scores['accuracy']:.1f} / {scores['colour_place']:.1f} |")
    order = {"sync": 0, "displaced": 1, "pcpp": 2, "naive": 3}
    for r in sorted(rows, key=lambda r: (r["devices"], order[r["mode"]], r["gn"] != "corrected", r["warmup"],
                                         r["gn"], r.get("context") or 0)):
        stale = r["mode"] in ("displaced", "pcpp")
        warmup, gn = (str(r["warmup"]), r["gn"]) if stale else ("-", "-")
        mode = r["mode"] if r.get("context") is None else f"pcpp p={r['context']:g}"
        lines.append(f"| {r['devices']} | {mode} | {warmup} | {gn} | {r['psnr']:.1f} ({r['psnr_min']:.1f}) "
                     f"| {r['accuracy']:.1f} / {r['colour_place']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="default: the built-in demo model")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--devices", type=int, nargs="*", default=[2, 4, 8])
    p.add_argument("--warmups", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--contexts", type=float, nargs="*", default=[0.1, 0.3, 0.5, 1.0], help="pcpp's p values")
    p.add_argument("--scheduler", default="euler")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--lora", type=Path, help="a LoRA file fused at weight 1")
    p.add_argument("--json", type=Path, help="keep finished rows here; a rerun skips them")
    args = p.parse_args(argv)
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"

    from jaxfuse.demo import DEMO_MODEL
    from jaxfuse.demo.scenes import make_batch
    from jaxfuse.parallel_config import ParallelConfig
    from jaxfuse.pipeline import load_pipeline

    pipe = load_pipeline(args.model or DEMO_MODEL, log=lambda line: print(line, file=sys.stderr),
                         loras=[(args.lora, 1.0)] if args.lora else ())
    rendered, captions = make_batch(STUDY_SEED, args.prompts, pipe.spec.default_size)
    identity = dict(model=str(args.model or "demo"), prompts=args.prompts, steps=args.steps,
                    scheduler=args.scheduler, guidance_scale=args.guidance_scale, lora=args.lora and str(args.lora))

    def generate(parallel):
        start = time.perf_counter()
        result = pipe.generate(captions, num_inference_steps=args.steps, seed=NOISE_SEED, parallel=parallel,
                               scheduler=args.scheduler, guidance_scale=args.guidance_scale)
        return result.images, time.perf_counter() - start

    single, seconds = generate(ParallelConfig())
    references = {"rendered scene through the VAE": accuracy(captions, autoencoded(pipe, rendered)),
                  "single": accuracy(captions, single)}
    print(f"references: {references} (single: {seconds:.0f} s)", file=sys.stderr)
    done = json.loads(args.json.read_text()) if args.json and args.json.is_file() else []
    # Rows written before the sampler settings were recorded are the defaults' rows.
    defaults = dict(scheduler="euler", guidance_scale=5.0, lora=None)
    done = [r for r in done if all(r.get(k, defaults.get(k)) == v for k, v in identity.items())]
    known = {key(r) for r in done}
    for row in settings(args.devices, args.warmups, args.contexts):
        if key(row) in known:
            continue
        context = {} if row.get("context") is None else {"context": row["context"]}
        parallel = ParallelConfig(row["devices"], row["mode"], row["warmup"], gn=row["gn"], **context)
        images, seconds = generate(parallel)
        values = psnr(images, single)
        row = dict(row, **identity, **accuracy(captions, images), psnr=float(values.mean()),
                   psnr_min=float(values.min()), seconds=round(seconds, 1))
        print(f"{key(row)}: PSNR {row['psnr']:.1f} dB, accuracy {row['accuracy']:.1f}% / "
              f"{row['colour_place']:.1f}% ({seconds:.0f} s)", file=sys.stderr)
        done.append(row)
        if args.json:
            args.json.write_text(json.dumps(done, indent=1) + "\n")
    print(table(references, done, identity))
    return 0


if __name__ == "__main__":
    sys.exit(main())
