"""Fused views on the built-in demo model: how visible the views' borders are, and how well region
prompts keep to their regions.

    python benchmarks/tiled_quality.py --json benchmarks/tiled_quality.json    # the full study
    python benchmarks/tiled_quality.py --canvases 1 --steps 4                   # seconds

Seams: canvases of 512 x 512 (the demo's native size is 256) from the demo's default prompt, one
seed each, made with uniform (MultiDiffusion) and Gaussian (Mixture of Diffusers) weights at
strides of 128 and 64 px, and with views that do not overlap (stride 256) as the seam-prone
reference. The seam measure is the mean gradient energy (squared difference of neighbouring
pixels, across the border) on the lines where a view begins or ends, over the mean on every other
line: 1 means the borders cannot be told from the rest of the image.

Regions: canvases of 768 x 256, a caption of one object (the first of a sampled scene's) per 256 x
256 third, generated as regions with an empty background prompt at stride 128 px, with uniform and Gaussian
weights. Each
third is read by `jaxfuse.demo.detect`: accuracy is the share of thirds whose object is found with
its colour, shape and cell; leaks the share of objects also found (colour and cell) in another
third; beside them, the accuracy of the same captions drawn as 256 x 256 images of their own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import numpy as np

STUDY_SEED = 2027
WINDOW = 256


def border_lines(size: int, window: int, stride: int) -> set[int]:
    """The pixel lines between which a view's border falls: every view's first and past-its-last line."""
    from jaxfuse.sampling.tiled import view_starts

    starts = view_starts(size // 8, window // 8, stride // 8)
    return {8 * s for s in starts if s > 0} | {8 * s + window for s in starts if 8 * s + window < size}


def seam_ratio(image: np.ndarray, window: int, stride: int) -> float:
    """Mean squared difference across the views' borders over that across other lines, both directions."""
    ratios = []
    for axis in (0, 1):
        energy = (np.diff(image, axis=axis) ** 2).sum(-1).mean(axis=1 - axis)  # [size - 1]: line i against i + 1
        borders = np.zeros(energy.shape, bool)
        borders[[line - 1 for line in border_lines(image.shape[axis], window, stride)]] = True
        ratios.append(energy[borders].mean() / energy[~borders].mean())
    return float(np.mean(ratios))


def seams(pipe, canvases: int, steps: int) -> list[dict]:
    from jaxfuse.demo import DEMO_PROMPT

    rows = []
    for weighting, stride in [("uniform", 256), ("uniform", 128), ("gaussian", 128), ("uniform", 64),
                              ("gaussian", 64)]:
        start = time.perf_counter()
        values = [seam_ratio(pipe(DEMO_PROMPT, height=512, width=512, num_inference_steps=steps, seed=seed,
                                  tile_stride=stride, tile_weighting=weighting)[0], WINDOW, stride)
                  for seed in range(canvases)]
        rows.append(dict(weighting=weighting, stride=stride, seam=float(np.mean(values)),
                         worst=float(np.max(values)), seconds=time.perf_counter() - start))
        print(rows[-1], file=sys.stderr)
    return rows


def regions(pipe, canvases: int, steps: int, weighting: str) -> dict:
    from jaxfuse.demo.detect import prompt_accuracy
    from jaxfuse.demo.scenes import caption, sample_scene

    rng = np.random.default_rng(STUDY_SEED)
    found = leaked = alone = 0
    start = time.perf_counter()
    for seed in range(canvases):
        scenes = [sample_scene(rng) for _ in range(3)]
        captions = [caption(dataclasses.replace(scene, objects=scene.objects[:1], placements=scene.placements[:1]))
                    for scene in scenes]
        boxes = [(WINDOW * k, 0, WINDOW * (k + 1), WINDOW) for k in range(3)]
        image = pipe("", height=WINDOW, width=3 * WINDOW, num_inference_steps=steps, seed=seed, tile_stride=128,
                     tile_weighting=weighting, regions=list(zip(captions, boxes)))[0]
        thirds = [image[:, WINDOW * k:WINDOW * (k + 1)] for k in range(3)]
        for k, text in enumerate(captions):
            alone += prompt_accuracy(text, pipe(text, num_inference_steps=steps, seed=seed)[0])
            found += prompt_accuracy(text, thirds[k])
            leaked += any(prompt_accuracy(text, thirds[j], with_shape=False) for j in range(3) if j != k)
    return dict(weighting=weighting, canvases=canvases, regions=3 * canvases, accuracy=found / (3 * canvases),
                leaks=leaked / (3 * canvases), alone=alone / (3 * canvases), seconds=time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--canvases", type=int, default=4, help="seam canvases per setting (region canvases: 4x)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)

    from jaxfuse.demo import DEMO_MODEL
    from jaxfuse.pipeline import load_pipeline

    pipe = load_pipeline(DEMO_MODEL, log=lambda _: None)
    seam_rows = seams(pipe, args.canvases, args.steps)
    region_rows = [regions(pipe, 4 * args.canvases, args.steps, weighting) for weighting in ("uniform", "gaussian")]
    print(f"Seams: 512 x 512 demo canvases (native 256), {args.steps} Euler steps, {args.canvases} seeds\n")
    print("| weighting | stride (px) | views | seam measure (mean) | worst |")
    print("|---|---|---|---|---|")
    for row in seam_rows:
        views = len(range(0, 512 - WINDOW + 1, row["stride"])) ** 2
        print(f"| {row['weighting']} | {row['stride']} | {views} | {row['seam']:.3f} | {row['worst']:.3f} |")
    print(f"\nRegions: {4 * args.canvases} canvases of 768 x 256, 3 regions each, {args.steps} steps\n")
    print("| weighting | region accuracy | leaks | the captions as images of their own |")
    print("|---|---|---|---|")
    for row in region_rows:
        print(f"| {row['weighting']} | {row['accuracy']:.1%} | {row['leaks']:.1%} | {row['alone']:.1%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(steps=args.steps, seams=seam_rows, regions=region_rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
