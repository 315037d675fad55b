"""`python -m jaxfuse.stream`: live generation from the command line (StreamDiffusion).

    python -m jaxfuse.stream --output out/                          # text to image: the demo, 16 images
    python -m jaxfuse.stream --input frames/ --output out/ --prompt "a blue square at the top left"
    python -m jaxfuse.stream --input clip.mp4 --output styled.mp4   # video in and out: jaxfuse[video]
    python -m jaxfuse.stream --prompts prompts.txt --output out/    # text to image, one prompt a call in turn
    python -m jaxfuse.stream --serve                                # a live web page: jaxfuse[serve]
    python -m jaxfuse.stream --input clip.mp4 --output out.mp4 --controlnet FOLDER --control-preprocess canny

Writes one PNG per image, out/000000.png, ..., or a video when `--output` ends in .mp4, .mov,
.mkv or .webm (at the input video's rate, else `--fps`), and prints the images per second and the
latency (from a frame read to its image written) as they come. Image to image reads a folder of
PNG or JPEG frames in name order, or a video file; each frame's image is written under the
frame's index. The stream holds `len(--t-index)` images in flight, so the first image leaves that
many calls after it entered; the command feeds the last frame again to let the final ones out.
`--serve` serves a page (`jaxfuse.stream.serve`) that streams the browser's camera through the
stream, with a prompt box. The default model is the built-in demo with its few-step LCM-LoRA
(`--lora demo-lcm`), which runs on a laptop CPU. Every argument is checked before the model
loads, the sizes against an estimate of the memory a call needs (`program.call_bytes`); images
already in `--output` are kept unless `--overwrite` is given, and a run holds `--output` while it
runs, so a second run into it fails at once. Compiled programs are kept in the cache folder, as
`generate` keeps them (`--no-compile-cache` or JAXFUSE_COMPILE_CACHE=0: off). Exit codes: every
jaxfuse command's (`jaxfuse.commands`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import sys
import time
from collections import deque
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import jax
import numpy as np

from jaxfuse.commands import (
    HelpFormatter,
    add_cache_arguments,
    add_vae_argument,
    check_listen,
    controlnet_folder,
    finite_float,
    lora_weights,
    peak_memory_text,
    run_command,
    start_compile_cache,
)
from jaxfuse.config import ParallelConfig, ParallelError
from jaxfuse.control_images import Preprocessor
from jaxfuse.demo import DEMO_CONTROLNET, DEMO_MODEL, DEMO_PROMPT
from jaxfuse.parallel.mesh import emulate_cpu_devices
from jaxfuse.pipeline import load_pipeline
from jaxfuse.runtime.memory import free_memory
from jaxfuse.sampling.stream import RCFG, FirstStep, StreamConfig
from jaxfuse.spec import PipelineError, PipelineSpec, checked_float, checked_int
from jaxfuse.stream import media
from jaxfuse.stream.host import SimilarityFilter, run_threaded
from jaxfuse.stream.program import Stream, call_bytes, checked_stream

# An output video's rate: kept as a fraction over at most 1001 (NTSC's), so slower than one frame in
# 1000 s rounds to nothing; Matroska and WebM keep time in milliseconds, so faster than 1000 a second
# loses the frames' times.
FPS_RANGE = (1e-3, 1e3)
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxfuse.stream", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", type=Path, default=DEMO_MODEL,
                   help="a diffusers SDXL pipeline folder or a single-file SDXL checkpoint (.safetensors)")
    add_vae_argument(p)
    p.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]",
                   help="a LoRA fused into the weights, repeatable (default with the demo model: demo-lcm)")
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--prompts", type=Path, help="a text file, one prompt a line: each call takes the next")
    p.add_argument("--negative-prompt", help="for --rcfg initialize and full")
    p.add_argument("--input", type=Path,
                   help="a folder of frames or a video file (image to image); none: text to image")
    p.add_argument("--frames", type=int, default=16, help="text to image: how many images")
    p.add_argument("--output", type=Path, help="the folder the images go to, or a video file")
    p.add_argument("--fps", type=finite_float, default=8.0,
                   help="an output video's rate when the input is not a video, 0.001 to 1000")
    p.add_argument("--overwrite", action="store_true", help="replace images already in --output")
    p.add_argument("--t-index", type=int, nargs="+",
                   help="the steps of the 50-step LCM schedule each image goes through (default: 32 45 for "
                        "image to image, 0 16 32 45 for text to image, 0 32 for --serve on the demo model)")
    p.add_argument("--frame-buffer", type=int, default=1, help="frames that enter per call")
    p.add_argument("--rcfg", choices=[r.value for r in RCFG], default="none", help="residual guidance")
    p.add_argument("--guidance-scale", type=finite_float, default=1.0)
    p.add_argument("--delta", type=finite_float, default=1.0, help="RCFG's weight of the residual noise")
    p.add_argument("--similarity-threshold", type=finite_float,
                   help="skip frames this similar to the last one that went through (e.g. 0.98; default: off)")
    p.add_argument("--max-skips", type=int, default=10, help="skips in a row before a frame goes through")
    p.add_argument("--devices", type=int, default=1,
                   help="split every image by rows over this many devices (on a CPU, emulated ones)")
    p.add_argument("--mode", choices=["sync", "displaced", "pcpp", "naive"], default="displaced",
                   help="with --devices: how the patches see each other (sync equals one device)")
    p.add_argument("--first-step", choices=[s.value for s in FirstStep], default="sync",
                   help="displaced: an entering image's first step synchronous, or on the previous frame's context")
    p.add_argument("--slot-parallel", action="store_true",
                   help="instead of splitting rows, one step of the stream per device (len(--t-index) devices)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve", action="store_true", help="serve the live page instead (camera in, images out)")
    p.add_argument("--host", default="127.0.0.1", help="--serve: the address to listen on")
    p.add_argument("--port", type=int, default=8765, help="--serve: the port to listen on")
    control = p.add_argument_group("ControlNet: each frame steers the images in flight")
    control.add_argument("--controlnet", type=controlnet_folder, action="append", metavar="FOLDER",
                         help="a diffusers ControlNet folder for the model (repeatable; demo-controlnet: the "
                              "demo's); needs --input or --serve")
    control.add_argument("--controlnet-scale", type=finite_float, action="append", metavar="S",
                         help="its conditioning scale: one per --controlnet, or one for all (default 1)")
    control.add_argument("--control-preprocess", choices=[p.value for p in Preprocessor],
                         help="what the ControlNets see of each frame: canny edges, greyscale, or the frame "
                              "(default: none; grey for --serve on the demo, steered by its ControlNet)")
    add_cache_arguments(p)
    return p


@dataclasses.dataclass(frozen=True)
class Plan:
    """A checked command: what the run needs besides the flags."""

    spec: PipelineSpec
    source: media.FrameSource | None  # None: text to image, or the page's camera
    prompts: list[str]
    config: StreamConfig
    patch_parallel: ParallelConfig | None
    size: tuple[int, int]  # (height, width) of the images
    loras: list[tuple[Path, float]]
    similarity: SimilarityFilter | None
    controlnets: tuple[Path, ...] = ()
    control_preprocess: str = Preprocessor.NONE.value


def check_args(args: argparse.Namespace) -> Plan:
    """The command's plan, every argument checked before JAX starts or the model loads."""
    if args.serve:
        given = [name for name in ("input", "output", "prompts") if getattr(args, name) is not None]
        if given:
            raise PipelineError(f"--serve takes its frames from the page's camera and shows the images there: "
                                f"drop --{', --'.join(given)}.")
        if args.frame_buffer != 1:
            raise PipelineError("--serve streams one camera frame a call: drop --frame-buffer.")
        if not 0 < args.port < 65536:
            raise PipelineError(f"--port {args.port} is not a TCP port.")
        try:
            import aiohttp  # noqa: F401
        except ImportError as e:
            raise PipelineError('--serve needs aiohttp: pip install "jaxfuse[serve]".') from e
        check_listen(args.host, args.port)
        return planned(args, None, [args.prompt])
    if args.output is None:
        raise PipelineError("give --output (a folder or a video file), or --serve for the live page.")
    media.check_output(args.output)
    checked_float("--fps", args.fps, *FPS_RANGE, why=" (a video keeps its rate as a fraction over at most 1001, "
                  "and Matroska and WebM keep time in milliseconds)")
    source = None
    if args.input is not None:
        source = media.frame_source(args.input)
    elif args.frames < 1:
        raise PipelineError(f"--frames {args.frames}: make at least one image.")
    images = args.frames if source is None else source.count
    if args.frame_buffer > images > 0:  # a video that does not say its length: count 0, not checked
        raise PipelineError(f"--frame-buffer {args.frame_buffer} takes that many frames a call, but there are "
                            f"{images} ({'--frames' if source is None else '--input'}); give --frame-buffer "
                            f"{images} or less.")
    if not media.is_video(args.output) and images > media.MAX_FOLDER_IMAGES:
        raise PipelineError(f"{'--frames' if source is None else '--input'} makes {images} images, but a folder "
                            f"holds at most {media.MAX_FOLDER_IMAGES} in name order (000000.png to 999999.png); "
                            "make fewer, or write a video (--output ending in .mp4).")
    prompts = [args.prompt]
    if args.prompts is not None:
        if not args.prompts.is_file():
            raise PipelineError(f"--prompts {args.prompts} is not a file.")
        prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
        if not prompts:
            raise PipelineError(f"--prompts {args.prompts} holds no prompt.")
    return planned(args, source, prompts)


def planned(args: argparse.Namespace, source: media.FrameSource | None, prompts: list[str]) -> Plan:
    """The checks both modes share, the sizes and steps against the model's config (read, not
    loaded)."""
    if args.devices < 1:
        raise PipelineError(f"--devices {args.devices}: give 1 or more.")
    if args.slot_parallel and args.devices > 1:
        raise PipelineError("--slot-parallel puts one step on each device; it does not split rows too: drop "
                            "--devices or --slot-parallel.")
    if source is not None and (args.height, args.width) != (None, None):
        raise PipelineError(f"--input {args.input} sets the size ({source.size[1]}x{source.size[0]}); drop --height "
                            "and --width, or resize the frames.")
    if args.similarity_threshold is not None:
        checked_float("--similarity-threshold", args.similarity_threshold, 0.0, 1.0)
    checked_int("--max-skips", args.max_skips, 0)
    image_to_image = source is not None or args.serve
    # --serve on the demo model starts from pure noise and is steered by the demo ControlNet, reading the
    # camera in grey: the camera's dark shapes say where, a typed prompt decides colours and shapes (from
    # step 32 on without it, the camera's dark shapes came out blue whatever the prompt: serve.DEMO_NOTE).
    serve_demo = args.serve and args.model == DEMO_MODEL
    t_index = args.t_index or ((0, 32) if serve_demo else (32, 45) if image_to_image else (0, 16, 32, 45))
    controlnets, preprocess = tuple(args.controlnet or ()), args.control_preprocess or Preprocessor.NONE.value
    if serve_demo and args.controlnet is None:
        controlnets, preprocess = (DEMO_CONTROLNET,), args.control_preprocess or Preprocessor.GREY.value
    config = StreamConfig(tuple(t_index), args.frame_buffer, args.rcfg, args.first_step)
    patch_parallel = ParallelConfig(args.devices, args.mode) if args.devices > 1 else None
    loras = lora_weights(args.lora if args.lora is not None or args.model != DEMO_MODEL else ["demo-lcm"])
    if controlnets and not image_to_image:
        raise PipelineError("--controlnet is steered by the frames: give --input (or --serve for the camera).")
    if args.controlnet_scale and len(args.controlnet_scale) not in (1, len(controlnets)):
        raise PipelineError(f"{len(args.controlnet_scale)} --controlnet-scale values for {len(controlnets)} "
                            "--controlnet folders: give one per ControlNet, or one for all.")
    spec = PipelineSpec.read(args.model, args.vae).with_controlnets(controlnets)
    height, width = source.size if source is not None else (args.height, args.width)
    request, _ = checked_stream(spec, prompts[0], args.negative_prompt, config=config, height=height, width=width,
                                seed=args.seed, guidance_scale=args.guidance_scale, delta=args.delta,
                                slot_parallel=args.slot_parallel, patch_parallel=patch_parallel)
    similarity = None if args.similarity_threshold is None else SimilarityFilter(args.similarity_threshold,
                                                                                   args.max_skips, args.seed)
    return Plan(spec, source, prompts, config, patch_parallel, (request.height, request.width), loras, similarity,
                controlnets, preprocess)


def check_devices(plan: Plan, devices: int, slot_parallel: bool) -> None:
    """Once JAX has started, before the model loads: the `devices` the stream runs on are
    present and its calls fit in their memory (`program.call_bytes`, an estimate)."""
    present = len(jax.devices())
    if devices > present:
        what = f"--slot-parallel with {devices} --t-index steps" if slot_parallel else f"--devices {devices}"
        raise ParallelError(f"{what} needs {devices} devices, but {present} {jax.default_backend()} devices are "
                            "present.")
    config, (height, width) = plan.config, plan.size
    need, (have, holder) = call_bytes(plan.spec, config, height, width), free_memory(devices)
    if need > have:
        one_frame = call_bytes(plan.spec, dataclasses.replace(config, frame_buffer_size=1), height, width)
        fits = have // one_frame  # the estimate grows in proportion to the frames a call
        fix = (f"give --frame-buffer {fits} or less, fewer --t-index steps or smaller frames" if fits else
               "give smaller frames (--height/--width, or resize --input) or fewer --t-index steps")
        raise PipelineError(f"--frame-buffer {config.frame_buffer_size} with {config.slots} --t-index steps and "
                            f"--rcfg {config.rcfg.value} at {width}x{height} needs about {need / 2**30:.1f} GiB a "
                            f"call (an estimate of its activations, the weights left out), more than the "
                            f"{have / 2**30:.1f} GiB {holder}; {fix}.")


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
    """The command: checks every argument, holds the output for the run, then streams."""
    plan = check_args(args)
    with contextlib.nullcontext() if args.serve else media.claimed(args.output, args.overwrite):
        run_planned(args, plan)


def run_planned(args: argparse.Namespace, plan: Plan) -> None:
    """Starts JAX, checks the devices, loads the model and streams (or serves)."""
    source, prompts, config, similarity = plan.source, plan.prompts, plan.config, plan.similarity
    patch_parallel, (height, width) = plan.patch_parallel, plan.size
    devices = config.slots if args.slot_parallel else args.devices
    emulate_cpu_devices(devices)  # before JAX starts; not on GPU
    _, cache_counter = start_compile_cache(args)
    check_devices(plan, devices, args.slot_parallel)
    pipe = load_pipeline(args.model, cache_dir=args.cache_dir, loras=plan.loras, vae=args.vae,
                         controlnets=plan.controlnets, log=lambda line: print(line, file=sys.stderr))
    scales = args.controlnet_scale or [1.0]
    stream = Stream(pipe, prompts[0], args.negative_prompt, config=config, image_to_image=source is not None or
                    args.serve, height=height, width=width, guidance_scale=args.guidance_scale, delta=args.delta,
                    seed=args.seed, slot_parallel=args.slot_parallel, patch_parallel=patch_parallel,
                    controlnet_conditioning_scale=scales[0] if len(scales) == 1 else scales,
                    control_preprocess=plan.control_preprocess)
    if args.serve:
        from jaxfuse.stream.serve import DEMO_NOTE, serve  # aiohttp: the optional extra

        print(f"compiling the stream at {stream.request.width}x{stream.request.height}...", file=sys.stderr)
        serve(stream, args.host, args.port, similarity, note=DEMO_NOTE if args.model == DEMO_MODEL else None)
        return
    spread = (f", one step per device on {config.slots}" if args.slot_parallel else
              f", rows split over {args.devices} devices ({args.mode})" if patch_parallel else "")
    if plan.controlnets:
        spread += f", steered by {len(plan.controlnets)} ControlNet(s) ({plan.control_preprocess})"
    f, lag = config.frame_buffer_size, config.slots - 1
    report, count = LiveReport(), {"calls": 0, "written": 0, "saved": 0, "total": None}

    def calls() -> Iterator[np.ndarray | None]:
        """Each call's f frames (the last call's filled up with its last frame), then the last
        frames again until the final images are out; `count["total"]` set at the input's end."""
        if source is None:
            count["total"] = args.frames
            groups = itertools.repeat(None, -(-args.frames // f))
        else:
            groups = frame_groups(source.frames(), f, count)
        last = None
        for last in groups:
            report.read()
            yield last
        yield from itertools.repeat(last, lag)

    def step(frames):
        if len(prompts) > 1:
            stream.update_prompt(prompts[count["calls"] % len(prompts)])
        count["calls"] += 1
        return stream(frames)

    def write(images):
        index = count["written"] - lag * f  # the first `lag` calls hand out the empty buffer's images
        count["written"] += len(images)
        if index < 0:
            return
        for i, image in enumerate(images[:count["total"] - index]):
            sink.write(index + i, image)
            count["saved"] += 1
        report.written(len(images))

    what = f"the frames of {args.input}" if source is not None else f"{args.frames} images from text"
    print(f"streaming {what} at {stream.request.width}x{stream.request.height}, {config.slots} steps in flight, "
          f"rcfg {config.rcfg.value}{spread}; compiling first...", file=sys.stderr)
    rate = source.rate if source is not None and source.rate else Fraction(args.fps).limit_denominator(1001)
    with media.image_sink(args.output, rate, args.overwrite) as sink:
        counts = run_threaded(step, calls(), write, similarity, queue_size=4, live=False)
    programs = cache_counter and (f"; programs: {cache_counter.counts['compiled']} compiled, "
                                  f"{cache_counter.counts['loaded']} loaded from the compile cache")
    print(f"\nwrote {count['saved']} images to {args.output}: {counts.calls} stream calls, {counts.skipped} "
          f"frames skipped as alike{programs or ''}", file=sys.stderr)
    print(f"compiling took {stream.record.compile_seconds:.2f} s; {peak_memory_text(stream.record.memory)}",
          file=sys.stderr)


def frame_groups(frames: Iterator[np.ndarray], f: int, count: dict) -> Iterator[np.ndarray]:
    """Frames in groups [f, H, W, 3], the last filled up with its last frame; `count["total"]`
    the number of frames, set before the last group is handed on."""
    total, group = 0, list(itertools.islice(frames, f))
    if not group:
        raise PipelineError("--input holds no frames.")
    while group:
        total += len(group)
        following = list(itertools.islice(frames, f))  # one group ahead: the last one is known as such
        if not following:
            count["total"] = total
            group += [group[-1]] * (f - len(group))
        yield np.stack(group)
        group = following


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: run(args))
