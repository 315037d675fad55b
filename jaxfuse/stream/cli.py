"""`python -m jaxfuse.stream`: live generation from the command line (StreamDiffusion).

    python -m jaxfuse.stream --output out/                          # text to image: the demo, 16 images
    python -m jaxfuse.stream --input frames/ --output out/ --prompt "a blue square at the top left"
    python -m jaxfuse.stream --prompts prompts.txt --output out/    # text to image, one prompt a call in turn

Writes one PNG per image, out/000000.png, ..., and prints the images per second and the latency
(from a frame read to its image written) as they come. Image to image reads a folder of PNG or
JPEG frames in name order; each frame's image is written under the frame's index. The stream
holds `len(--t-index)` images in flight, so the first image leaves that many calls after it
entered; the command feeds the last frame again to let the final ones out. The default model is
the built-in demo with its few-step LCM-LoRA (`--lora demo-lcm`), which runs on a laptop CPU.
Every argument is checked before the model loads; images already in `--output` are kept unless
`--overwrite` is given. Exit codes as `python -m jaxfuse.generate`'s: 0 done, 2 an input that
cannot work, 1 the environment failed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import PIL.Image

from jaxfuse.demo import DEMO_MODEL, DEMO_PROMPT
from jaxfuse.generate import lora_weights, run_command
from jaxfuse.pipeline import load_pipeline
from jaxfuse.sampling.stream import RCFG, StreamConfig
from jaxfuse.spec import PipelineError, checked_image
from jaxfuse.stream.host import SimilarityFilter, run_threaded
from jaxfuse.stream.program import Stream

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxfuse.stream", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=Path, default=DEMO_MODEL, help="a diffusers SDXL pipeline folder")
    p.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]",
                   help="a LoRA fused into the weights, repeatable (default with the demo model: demo-lcm)")
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--prompts", type=Path, help="a text file, one prompt a line: each call takes the next")
    p.add_argument("--negative-prompt", help="for --rcfg initialize and full")
    p.add_argument("--input", type=Path, help="a folder of frames (image to image); none: text to image")
    p.add_argument("--frames", type=int, default=16, help="text to image: how many images")
    p.add_argument("--output", type=Path, required=True, help="the folder the images go to")
    p.add_argument("--overwrite", action="store_true", help="replace images already in --output")
    p.add_argument("--t-index", type=int, nargs="+",
                   help="the steps of the 50-step LCM schedule each image goes through (default: 32 45 for "
                        "image to image, 0 16 32 45 for text to image)")
    p.add_argument("--frame-buffer", type=int, default=1, help="frames that enter per call")
    p.add_argument("--rcfg", choices=[r.value for r in RCFG], default="none", help="residual guidance")
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--delta", type=float, default=1.0, help="RCFG's weight of the residual noise")
    p.add_argument("--similarity-threshold", type=float,
                   help="skip frames this similar to the last one that went through (e.g. 0.98; default: off)")
    p.add_argument("--max-skips", type=int, default=10, help="skips in a row before a frame goes through")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, help="where converted weights are kept (default ~/.cache/jaxfuse)")
    return p


def read_frame(path: Path) -> np.ndarray:
    try:
        with PIL.Image.open(path) as image:
            return checked_image(np.asarray(image.convert("RGB")), 1)[0]
    except PIL.UnidentifiedImageError as e:
        raise PipelineError(f"--input: {path} is not an image PIL can read.") from e


def check_args(args: argparse.Namespace) -> tuple[list[Path], list[str]]:
    """The frames to read and the prompts, every argument checked before the model loads."""
    frames = []
    if args.input is not None:
        if not args.input.is_dir():
            raise PipelineError(f"--input {args.input} is not a folder of frames.")
        frames = sorted(p for p in args.input.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not frames:
            raise PipelineError(f"--input {args.input} holds no PNG or JPEG frames.")
    elif args.frames < 1:
        raise PipelineError(f"--frames {args.frames}: make at least one image.")
    prompts = [args.prompt]
    if args.prompts is not None:
        if not args.prompts.is_file():
            raise PipelineError(f"--prompts {args.prompts} is not a file.")
        prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
        if not prompts:
            raise PipelineError(f"--prompts {args.prompts} holds no prompt.")
    if args.output.exists() and not args.overwrite and any(args.output.glob("*.png")):
        raise PipelineError(f"--output {args.output} holds images already; choose another folder or give "
                            "--overwrite.")
    if args.frame_buffer != 1 and args.input is not None and len(frames) % args.frame_buffer:
        raise PipelineError(f"--frame-buffer {args.frame_buffer} must divide the {len(frames)} frames.")
    return frames, prompts


class LiveReport:
    """Images per second over the last second's images and the latency of the latest, on one
    line of stderr."""

    def __init__(self):
        self.read_at: deque[float] = deque()
        self.written_at: deque[float] = deque()
        self.last_print = 0.0

    def read(self) -> None:
        self.read_at.append(time.perf_counter())

    def written(self, count: int) -> None:
        now = time.perf_counter()
        latency = now - self.read_at.popleft()
        self.written_at.extend([now] * count)
        while now - self.written_at[0] > 1.0:
            self.written_at.popleft()
        if now - self.last_print > 0.25:
            span = max(now - self.written_at[0], 1e-3)
            print(f"\r{len(self.written_at) / span if len(self.written_at) > 1 else 0:.1f} images/s, latency "
                  f"{latency * 1e3:.0f} ms", end="", file=sys.stderr, flush=True)
            self.last_print = now


def run(args: argparse.Namespace) -> None:
    frame_files, prompts = check_args(args)
    image_to_image = bool(frame_files)
    t_index = args.t_index or ((32, 45) if image_to_image else (0, 16, 32, 45))
    config = StreamConfig(tuple(t_index), args.frame_buffer, args.rcfg)
    loras = lora_weights(args.lora if args.lora is not None or args.model != DEMO_MODEL else ["demo-lcm"])
    height, width = args.height, args.width
    if image_to_image:
        height, width = read_frame(frame_files[0]).shape[:2]
    pipe = load_pipeline(args.model, cache_dir=args.cache_dir, loras=loras,
                         log=lambda line: print(line, file=sys.stderr))
    stream = Stream(pipe, prompts[0], args.negative_prompt, config=config, image_to_image=image_to_image,
                    height=height, width=width, guidance_scale=args.guidance_scale, delta=args.delta, seed=args.seed)
    f, lag = config.frame_buffer_size, config.slots - 1
    total = len(frame_files) if image_to_image else args.frames
    calls = -(-total // f)
    args.output.mkdir(parents=True, exist_ok=True)
    report, count = LiveReport(), {"calls": 0, "written": 0, "saved": 0}

    def sources():  # each call's frames, then the last ones again until the final images are out
        for call in range(calls + lag):
            if call < calls:
                report.read()
            if image_to_image:
                first = min(call, calls - 1) * f
                yield np.stack([read_frame(path) for path in frame_files[first:first + f]])
            else:
                yield None

    def step(frames):
        if len(prompts) > 1:
            stream.update_prompt(prompts[count["calls"] % len(prompts)])
        count["calls"] += 1
        return stream(frames)

    def write(images):
        index = count["written"] - lag * f  # the first `lag` calls hand out the empty buffer's images
        count["written"] += len(images)
        if not 0 <= index < total:
            return
        for i, image in enumerate(images[:total - index]):
            PIL.Image.fromarray(np.round(image * 255).astype(np.uint8)).save(args.output / f"{index + i:06d}.png")
            count["saved"] += 1
        report.written(len(images))

    similarity = None if args.similarity_threshold is None else SimilarityFilter(args.similarity_threshold,
                                                                                   args.max_skips, args.seed)
    source = f"the {total} frames of {args.input}" if image_to_image else f"{total} images from text"
    print(f"streaming {source} at {stream.request.width}x{stream.request.height}, {config.slots} steps in flight, "
          f"rcfg {config.rcfg.value}; compiling first...", file=sys.stderr)
    counts = run_threaded(step, sources(), write, similarity, queue_size=4, live=False)
    print(f"\nwrote {count['saved']} images to {args.output}: {counts.calls} stream calls, {counts.skipped} "
          "frames skipped as alike", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: run(args))
