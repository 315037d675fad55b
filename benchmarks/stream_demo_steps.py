"""What the demo's live page can show: which steps let a typed prompt's colour and shape appear in a
camera's stream, and whether the camera places it.

    python benchmarks/stream_demo_steps.py [--t-index 0,32 4,32 32,45] [--seeds 4] [--json FILE]
    python benchmarks/stream_demo_steps.py --t-index 4,32 --seeds 1     # a quick run
    python benchmarks/stream_demo_steps.py --t-index 0,32 32,45 --controlnet demo-controlnet   # the live page's default

The built-in demo model with its LCM-LoRA (demo-lcm) at 256x256, an image-to-image stream per
t-index pair and seed (rcfg none, guidance 1, one frame a call). The camera is a still frame: a
dark shape (0.12) on light grey (0.82), drawn as the demo's scenes draw a shape, in one of four
cells; the detector sees no object in it. Each prompt names a colour and a shape other than the
camera's, either at the camera's cell ("same") or at another cell ("other"). After len(pair) + 1
calls (the stream holds only this prompt's and this frame's images) the image is read by
`jaxfuse.demo.detect`: the table gives how often the prompt's colour and shape are found at the
camera's cell and, for the prompt placed elsewhere, at the prompt's own cell. With `--controlnet`
(a folder, or demo-controlnet) every frame also steers the stream through it, read in grey, as
`--serve` runs the demo.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

DEFAULT_PAIRS = ("0,32", "2,32", "4,32", "8,32", "12,32", "16,32", "32,45")
CAMERAS = (("square", "top left"), ("circle", "centre"), ("square", "bottom right"), ("triangle", "top right"))
PROMPTS = {"square": (("red", "star"), ("yellow", "triangle")), "circle": (("green", "star"), ("red", "square")),
           "triangle": (("blue", "circle"), ("orange", "star"))}  # (colour, shape) by the camera's shape
ELSEWHERE = {"top left": "bottom right", "centre": "top left", "bottom right": "top left", "top right": "bottom left"}
CASES = tuple((camera, prompt) for camera in CAMERAS for prompt in PROMPTS[camera[0]])


def camera_frame(shape: str, position: str, size: int, dark=0.12, light=0.82, radius=0.13) -> np.ndarray:
    """A dark shape centred in its cell on a light grey frame: [1, H, W, 3] float32 in [0, 1]."""
    from PIL import Image, ImageDraw

    from jaxfuse.demo.scenes import CELL, SUPERSAMPLING, cell, outline

    row, column = cell(position)
    centre = np.array([(column + 0.5) * CELL, (row + 0.5) * CELL])
    side = size * SUPERSAMPLING
    mask = Image.new("L", (side, side))
    ImageDraw.Draw(mask).polygon([tuple(v) for v in (outline(shape, radius) + centre) * side], fill=255)
    cover = np.asarray(mask.reduce(SUPERSAMPLING), np.float32)[..., None] / 255
    return (light + cover * (dark - light)).repeat(3, -1)[None].astype(np.float32)


def phrase(colour: str, shape: str, position: str) -> str:
    """As the demo's captions say it: "an orange star at the top right"."""
    preposition = "in" if position == "centre" else "at" if position.startswith(("top", "bottom")) else "on"
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape} {preposition} the {position}"


def measure(pipe, t_index: tuple[int, ...], seeds: int) -> dict:
    """Counts over cameras x prompts x seeds: the prompt's object found at the camera's cell (same,
    other) and at the prompt's cell (other)."""
    from jaxfuse.demo.architecture import IMAGE_SIZE
    from jaxfuse.demo.detect import detect
    from jaxfuse.demo.scenes import SceneObject
    from jaxfuse.sampling.stream import StreamConfig
    from jaxfuse.stream import Stream

    counts = dict(cases=0, same_at_camera=0, other_at_camera=0, other_at_prompt=0)
    for seed in range(seeds):
        stream = Stream(pipe, phrase("red", "star", "top left"), config=StreamConfig(t_index, 1, "none"),
                        image_to_image=True, guidance_scale=1.0, seed=seed, control_preprocess="grey")
        for (camera_shape, camera_cell), (colour, shape) in CASES:
            frame = camera_frame(camera_shape, camera_cell, IMAGE_SIZE)
            counts["cases"] += 1
            for kind, prompt_cell in (("same", camera_cell), ("other", ELSEWHERE[camera_cell])):
                stream.update_prompt(phrase(colour, shape, prompt_cell))
                for _ in range(len(t_index) + 1):
                    image = stream(frame)[0]
                found = detect(image)
                counts[f"{kind}_at_camera"] += SceneObject(colour, shape, camera_cell) in found
                if kind == "other":
                    counts["other_at_prompt"] += SceneObject(colour, shape, prompt_cell) in found
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--t-index", nargs="+", default=list(DEFAULT_PAIRS), help="pairs of steps, as 4,32")
    parser.add_argument("--seeds", type=int, default=4, help="stream seeds per pair (each runs every case)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--controlnet", help="a ControlNet folder (or demo-controlnet) each frame steers through")
    args = parser.parse_args(argv)
    pairs = [tuple(int(t) for t in text.split(",")) for text in args.t_index]

    from jaxfuse.commands import controlnet_folder, lora_weights
    from jaxfuse.demo import DEMO_MODEL
    from jaxfuse.pipeline import load_pipeline

    controlnets = [] if args.controlnet is None else [controlnet_folder(args.controlnet)]
    pipe = load_pipeline(DEMO_MODEL, log=lambda _: None, loras=lora_weights(["demo-lcm"]), controlnets=controlnets)
    rows = []
    for t_index in pairs:
        rows.append(dict(t_index=list(t_index), **measure(pipe, t_index, args.seeds)))
        print(rows[-1], file=sys.stderr, flush=True)
    steered = f", steered by {args.controlnet} (grey)" if args.controlnet else ""
    print(f"{len(CAMERAS)} cameras x 2 prompts x {args.seeds} seeds per cell of the table{steered}\n")
    print("| t-index | prompt at the camera's cell: its colour+shape found there | prompt at another cell: found at "
          "the camera's cell | found at the prompt's cell |\n|---|---|---|---|")
    for row in rows:
        n = row["cases"]
        print(f"| {', '.join(map(str, row['t_index']))} | "
              + " | ".join(f"{row[key]}/{n} ({row[key] / n:.0%})"
                           for key in ("same_at_camera", "other_at_camera", "other_at_prompt")) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(seeds=args.seeds, controlnet=args.controlnet, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
