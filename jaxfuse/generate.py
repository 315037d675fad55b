"""`python -m jaxfuse.generate`: SDXL images from the command line.

    python -m jaxfuse.generate                  # the built-in demo model, its default prompt
    python -m jaxfuse.generate --model path/to/stable-diffusion-xl-base-1.0 \\
        --prompt "a lighthouse at dusk" --height 1024 --width 1024 --output lighthouse.png
    python -m jaxfuse.generate --image lighthouse.png --strength 0.6 --prompt "a lighthouse in snow"
    python -m jaxfuse.generate --model path/to/stable-diffusion-xl-base-1.0 \\
        --controlnet path/to/controlnet-canny-sdxl-1.0 --control-image photo.png --control-preprocess canny \\
        --controlnet-scale 0.5 --prompt "a lighthouse at dusk"

Writes the PNG (its settings in a text chunk: `jaxfuse.read_settings`), a JSON file of the
settings and timings beside it, and with `--output-array` the decoded image as float32 [H, W, 3]
in [0, 1] (a .npy file); `--num-images K` numbers them name-0.png, name-1.png, ... Every input
and every output path is checked before the model is loaded, and so is the memory the images
need (their pixels on the host, one denoising step's attention logits on a device); an existing
output file is kept unless `--overwrite` is given. Without `--devices` the image is spread over
every device present, on a CPU over an emulated mesh of 4. Compiled programs are kept in the
cache folder, so a second run with the same shapes starts without compiling
(`--no-compile-cache` or JAXFUSE_COMPILE_CACHE=0: off).

Exit codes: every jaxfuse command's (`jaxfuse.commands`).

On several hosts, start the same command on each with its place in the run:

    python -m jaxfuse.generate ... --coordinator-address 10.0.0.1:8476 --num-processes 2 --process-id 0
    python -m jaxfuse.generate ... --coordinator-address 10.0.0.1:8476 --num-processes 2 --process-id 1

The mesh then spans every process's devices and process 0 writes the files. In a cluster that JAX
recognises by itself (a TPU pod slice, SLURM) the three flags can be left out.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image

from jaxfuse import schedulers
from jaxfuse.commands import (
    HelpFormatter,
    ProgressBar,
    add_cache_arguments,
    add_parallel_arguments,
    add_process_arguments,
    add_vae_argument,
    check_image_memory,
    check_step_memory,
    controlnet_folder,
    finite_float,
    lora_weights,
    parallel_config,
    peak_memory_text,
    run_command,
    start_compile_cache,
)
from jaxfuse.config import Mode, ParallelConfig, ParallelError
from jaxfuse.control_images import Preprocessor, preprocess
from jaxfuse.demo import DEMO_MODEL, DEMO_PROMPT
from jaxfuse.images import read_image
from jaxfuse.outputs import ImageFiles, check_outputs, image_files, write_image
from jaxfuse.parallel.mesh import (
    DEFAULT_CPU_DEVICES,
    ProcessLayout,
    default_device_count,
    emulate_cpu_devices,
    initialize_processes,
    is_main_process,
)
from jaxfuse.pipeline import load_pipeline
from jaxfuse.pipeline.request import (
    DEFAULT_AESTHETIC_SCORE,
    DEFAULT_BOOTSTRAP,
    DEFAULT_NEGATIVE_AESTHETIC_SCORE,
    DEFAULT_REFINER_START,
    DEFAULT_REGION_WEIGHTING,
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
    DEFAULT_WEIGHTING,
    TILED_AREA,
    Controls,
    Region,
    Request,
)
from jaxfuse.sampling.tiled import Weighting, view_boxes
from jaxfuse.spec import PipelineError, PipelineSpec
from jaxfuse.step_cache import SCHEDULES, DeepCache

# The ControlNet flags' defaults: the request's own.
DEFAULT_CONTROL_SCALE, DEFAULT_CONTROL_START, DEFAULT_CONTROL_END = (
    Controls.ARGUMENTS[k] for k in ("controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxfuse.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", type=Path, default=DEMO_MODEL,
                   help="a diffusers SDXL pipeline folder, one converted by jaxfuse, or a single-file SDXL "
                        "checkpoint (.safetensors, Stability's layout: base, fine-tunes, refiner) (default: the "
                        "built-in demo model, 256x256 scenes of coloured shapes)")
    add_vae_argument(p)
    p.add_argument("--prompt", default=DEMO_PROMPT, help="what to draw")
    p.add_argument("--negative-prompt", help="what to steer away from (default: none; SDXL then uses zeros)")
    p.add_argument("--height", type=int, help="image height in pixels (default: the model's size)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the model's size)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="denoising steps")
    p.add_argument("--guidance-scale", type=finite_float, default=5.0,
                   help="classifier-free guidance: how strongly the image follows the prompt; 1 or less: off")
    p.add_argument("--guidance-rescale", type=finite_float, default=0.0,
                   help="0 to 1: rescales the guided prediction's spread towards the conditional one's")
    p.add_argument("--seed", type=int, action="append",
                   help="the initial noise's seed, 0 to 2^32-1; give it K times for K images (default: 0, and "
                        "with --num-images K the seeds 0..K-1)")
    p.add_argument("--num-images", type=int,
                   help="images to make in one batch, with the seeds --seed, --seed + 1, ... (default: 1)")
    p.add_argument("--scheduler", choices=[k.value for k in schedulers.SchedulerKind], default="euler",
                   help="the sampler")
    p.add_argument("--latents", type=Path,
                   help="initial noise as .npy, diffusers layout (K, 4, H/8, W/8), unscaled (instead of the seed); "
                        "with --image, the noise added to it")
    p.add_argument("--image", type=Path, dest="init_image", metavar="IMAGE",
                   help="image-to-image: start from this picture (any Pillow reads: PNG, JPEG, WebP, 16-bit, "
                        "...), which sets the size")
    p.add_argument("--strength", type=finite_float,
                   help=f"image-to-image: the share of the schedule that runs, in (0, 1]: int(steps x strength) "
                        f"steps from the image noised to that level; 1 redraws it all (default: {DEFAULT_STRENGTH})")
    p.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]",
                   help="a LoRA (.safetensors, diffusers/PEFT or kohya format) fused into the weights at WEIGHT "
                        "(default 1); give it once per LoRA. demo-lcm: the demo model's few-step LoRA (with "
                        "--scheduler lcm --steps 4 --guidance-scale 1)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="compute dtype (default: float32 on CPU, bfloat16 on GPU/TPU)")
    p.add_argument("--output", type=Path, default=Path("jaxfuse.png"),
                   help="the PNG to write; the JSON of settings goes beside it")
    p.add_argument("--output-array", type=Path,
                   help="also write the image as float32 HxWx3 in [0, 1] to this .npy file")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    add_cache_arguments(p)
    refiner = p.add_argument_group("the refiner (SDXL's ensemble of experts)")
    refiner.add_argument("--refiner", type=Path, metavar="FOLDER",
                         help="a refiner's pipeline folder (e.g. stable-diffusion-xl-refiner-1.0) that finishes the "
                              "image from the model's latents")
    refiner.add_argument("--refiner-start", type=finite_float,
                         help=f"the share of the noise the model removes before the refiner takes over, in (0, 1) "
                              f"(default with --refiner: {DEFAULT_REFINER_START})")
    refiner.add_argument("--aesthetic-score", type=finite_float,
                         help=f"the refiner's aesthetic score, 0 to 10 (default: {DEFAULT_AESTHETIC_SCORE})")
    refiner.add_argument("--negative-aesthetic-score", type=finite_float,
                         help=f"the negative half's aesthetic score, 0 to 10 (default: "
                              f"{DEFAULT_NEGATIVE_AESTHETIC_SCORE})")
    control = p.add_argument_group("ControlNet")
    control.add_argument("--controlnet", type=controlnet_folder, action="append", metavar="FOLDER",
                         help="a diffusers SDXL ControlNet folder (config.json and its safetensors; "
                              "demo-controlnet: the demo's) that steers the image by a --control-image; give it once "
                              "per ControlNet, in order")
    control.add_argument("--control-image", type=Path, action="append", metavar="IMAGE",
                         help="the picture a ControlNet reads (any Pillow reads), resized to the output size; one per "
                              "--controlnet, in the same order")
    control.add_argument("--controlnet-scale", type=finite_float, action="append", metavar="S",
                         help="how strongly a ControlNet steers: one per --controlnet, in order, or one for all "
                              f"(default: {DEFAULT_CONTROL_SCALE})")
    control.add_argument("--control-guidance-start", type=finite_float, metavar="A",
                         help="the fraction of the steps that run after which the ControlNets start, in [0, 1) "
                              f"(default: {DEFAULT_CONTROL_START})")
    control.add_argument("--control-guidance-end", type=finite_float, metavar="B",
                         help="the fraction of the steps that run after which they stop, in (0, 1] "
                              f"(default: {DEFAULT_CONTROL_END})")
    control.add_argument("--control-preprocess", choices=[k.value for k in Preprocessor], default="none",
                         help="what every control image is made of first: canny (Canny edges, white on black: "
                              'needs pip install "jaxfuse[control]"), grey (its greyscale), none (it as it is)')
    control.add_argument("--guess-mode", action="store_true",
                         help="the ControlNets steer the conditional half of the guidance only (diffusers' guess "
                              "mode: the control is followed even without a prompt)")
    cache = p.add_argument_group("step caching (DeepCache)")
    cache.add_argument("--deepcache", type=int, default=1, metavar="N",
                       help="run every layer on every N-th step only and the shallow ones, on the deep features "
                            "kept from it, in between; 1: off")
    cache.add_argument("--deepcache-branch", type=int, default=0, metavar="B",
                       help="the skip connection below which the kept features stand in (SDXL: 0 to 8; higher "
                            "runs more layers on a cached step: slower, nearer the uncached image)")
    cache.add_argument("--deepcache-schedule", choices=list(SCHEDULES), default="uniform",
                       help="which steps run every layer: every N-th, or DeepCache's non-uniform one, denser "
                            "near --deepcache-center")
    cache.add_argument("--deepcache-center", type=int, default=DeepCache.center,
                       help="the quadratic schedule's densest step")
    cache.add_argument("--deepcache-power", type=finite_float, default=DeepCache.power,
                       help="the quadratic schedule's exponent, above 1")
    add_parallel_arguments(p)
    canvas = p.add_argument_group(
        "large canvases: fused views of the native size (MultiDiffusion), chosen for a canvas of "
        f"{TILED_AREA} native areas or more")
    canvas.add_argument("--tiles", choices=["auto", "on", "off"], default="auto",
                        help="make the canvas of fused views: auto (when it is that large, or --tile-stride or "
                             "--region is given), on, off")
    canvas.add_argument("--tile-stride", type=int,
                        help="pixels between views, a multiple of the VAE factor (default: half the native size)")
    canvas.add_argument("--tile-weighting", choices=[w.value for w in Weighting],
                        help="how views are averaged where they overlap: uniform (MultiDiffusion) or gaussian, "
                             f"fading each view towards its borders (Mixture of Diffusers) (default: "
                             f"{DEFAULT_WEIGHTING}; with --region, {DEFAULT_REGION_WEIGHTING}: measured best for each)")
    canvas.add_argument("--region", action="append", metavar="PROMPT@X0,Y0,X1,Y1",
                        help="draw PROMPT in this box of the canvas (pixels; --prompt everywhere else); repeatable")
    canvas.add_argument("--bootstrap", type=finite_float, default=DEFAULT_BOOTSTRAP,
                        help="the share of the steps in which a region sees a solid colour around it, keeping what "
                             "it draws inside its box (MultiDiffusion's bootstrapping)")
    canvas.add_argument("--view-patches", type=int,
                        help="split each view by rows over this many devices in --mode (default: 1; the views "
                             "spread over --devices / this many device groups)")
    add_process_arguments(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def seeds(args: argparse.Namespace) -> list[int]:
    """One seed per image: --seed given K times, or --num-images K from the one seed."""
    given = args.seed or [0]
    if args.num_images is None:
        return given
    if args.num_images < 1:
        raise PipelineError(f"--num-images must be at least 1, got {args.num_images}.")
    if len(given) > 1 and len(given) != args.num_images:
        raise PipelineError(f"--seed given {len(given)} times for --num-images {args.num_images}; give one seed, "
                            "or one per image.")
    return given if len(given) > 1 else [given[0] + i for i in range(args.num_images)]


def read_latents(path: Path) -> np.ndarray:
    if not path.is_file():
        raise PipelineError(f"--latents {path}: no such file.")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # numpy's own words would suggest unpickling it
        raise PipelineError(f"--latents {path} is not a .npy array file; write one with numpy.save.") from e


def check_control_flags(args: argparse.Namespace) -> None:
    """The ControlNet flags agree: one control image per ControlNet, one scale for all or one per
    ControlNet, and the settings only with ControlNets to take them."""
    nets, images, scales = (len(getattr(args, k) or []) for k in ("controlnet", "control_image", "controlnet_scale"))
    if images and not nets:
        raise PipelineError("--control-image needs a ControlNet to read it: add --controlnet FOLDER (one per control "
                            "image, in the same order).")
    if nets and not images:
        raise PipelineError("--controlnet needs a control image to read: add one --control-image IMAGE per "
                            "--controlnet, in the same order.")
    if nets != images:
        raise PipelineError(f"{nets} --controlnet folder{'s' * (nets > 1)} but {images} --control-image"
                            f"{'s' * (images > 1)}; give one control image per ControlNet, in the same order.")
    if scales > 1 and scales != nets:
        raise PipelineError(f"--controlnet-scale given {scales} times for {nets} ControlNet{'s' * (nets > 1)}; give "
                            "one scale for all, or one per --controlnet, in the same order.")
    settings = {"--controlnet-scale": scales > 0, "--control-guidance-start": args.control_guidance_start is not None,
                "--control-guidance-end": args.control_guidance_end is not None, "--guess-mode": args.guess_mode,
                "--control-preprocess": args.control_preprocess != Preprocessor.NONE}
    given = [flag for flag, present in settings.items() if present]
    if given and not nets:
        raise PipelineError(f"{given[0]} sets how a ControlNet steers the image; add --controlnet FOLDER and "
                            f"--control-image IMAGE, or drop {given[0]}.")


def read_control_images(args: argparse.Namespace) -> list[PIL.Image.Image] | None:
    """Each --control-image made into a control image by --control-preprocess, as a PIL image (the
    request resizes it to the output size with Lanczos, as diffusers resizes PIL images); None
    without any."""
    if not args.control_image:
        return None
    return [PIL.Image.fromarray(preprocess(args.control_preprocess, read_image(path, "--control-image")))
            for path in args.control_image]


@dataclasses.dataclass(frozen=True)
class Plan:
    """A checked command: the model's spec, the request, the files, the processes; `parallel`
    is None when the device count depends on the devices present (`PipelineSpec.largest_layout`)."""

    spec: PipelineSpec
    request: Request
    files: list[ImageFiles]
    parallel: ParallelConfig | None
    processes: ProcessLayout
    loras: list[tuple[Path, float]]


def request_arguments(args: argparse.Namespace, image: np.ndarray | None, image_seeds: list[int]) -> dict:
    """The flags as `Request.parse`'s arguments (the image and the seeds read and listed already)."""
    scales = args.controlnet_scale or [DEFAULT_CONTROL_SCALE]
    return dict(
        prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale, guidance_rescale=args.guidance_rescale,
        seed=image_seeds, latents=None if args.latents is None else read_latents(args.latents),
        scheduler=args.scheduler, image=image, strength=DEFAULT_STRENGTH if args.strength is None else args.strength,
        tiled={"auto": None, "on": True, "off": False}[args.tiles], tile_stride=args.tile_stride,
        tile_weighting=args.tile_weighting, regions=[Region.parse(r) for r in args.region or []],
        bootstrap=args.bootstrap,
        refiner_start=DEFAULT_REFINER_START if args.refiner and args.refiner_start is None else args.refiner_start,
        aesthetic_score=args.aesthetic_score, negative_aesthetic_score=args.negative_aesthetic_score,
        deepcache=args.deepcache, deepcache_branch=args.deepcache_branch, deepcache_schedule=args.deepcache_schedule,
        deepcache_center=args.deepcache_center, deepcache_power=args.deepcache_power,
        control_image=read_control_images(args),
        controlnet_conditioning_scale=scales[0] if len(scales) == 1 else scales,
        control_guidance_start=(DEFAULT_CONTROL_START if args.control_guidance_start is None
                                else args.control_guidance_start),
        control_guidance_end=DEFAULT_CONTROL_END if args.control_guidance_end is None else args.control_guidance_end,
        guess_mode=args.guess_mode)


def check_args(args: argparse.Namespace) -> Plan:
    """Everything that can be checked without starting JAX or loading weights; raises
    `PipelineError`, `ParallelError` or `OutputError` (ValueErrors) naming the fix."""
    if args.context is not None and args.mode != "pcpp":
        raise ParallelError("--context sets how much of its neighbours a patch sees in pcpp mode; add --mode pcpp.")
    if args.strength is not None and args.init_image is None:
        raise PipelineError("--strength sets how much of an --image is redrawn; add --image, or drop --strength.")
    check_control_flags(args)
    processes = ProcessLayout(args.coordinator_address, args.num_processes, args.process_id, args.process_timeout)
    spec = PipelineSpec.read(args.model, args.vae).with_controlnets(args.controlnet or [])
    if args.refiner is not None:
        spec = spec.with_refiner(PipelineSpec.read(args.refiner))
    image = None if args.init_image is None else read_image(args.init_image, "--image")
    size = image.shape[:2] if image is not None else (args.height or spec.default_size, args.width or spec.default_size)
    check_image_memory(args.num_images or len(args.seed or [0]), *size)  # before --num-images K lists K seeds
    image_seeds = seeds(args)
    loras = lora_weights(args.lora)
    files = image_files(args.output, args.output_array, len(image_seeds))
    check_outputs(files, args.overwrite)
    request = Request.parse(spec, **request_arguments(args, image, image_seeds))
    if args.view_patches is not None and request.tiles is None:
        raise ParallelError("--view-patches splits the views of a tiled canvas; add --tiles on, or use --devices.")
    if args.devices is not None and processes.given and args.devices % processes.num_processes:
        raise ParallelError(f"--devices {args.devices} must divide evenly among --num-processes "
                            f"{processes.num_processes}: each process brings the same number of devices.")
    if request.tiles is not None:
        request, parallel = canvas_layout(spec, args, request, args.devices)
        return Plan(spec, request, files, parallel, processes, loras)
    parallel = None if args.devices is None else parallel_config(args, args.devices, request.steps_run)
    if parallel is not None:
        request = request.spread(spec, parallel)
    return Plan(spec, request, files, parallel, processes, loras)


def canvas_layout(spec: PipelineSpec, args: argparse.Namespace, request: Request,
                  devices: int | None) -> tuple[Request, ParallelConfig | None]:
    """A canvas's request and layout on `devices` devices: its views spread over devices /
    --view-patches groups, each view split by rows over --view-patches devices. With `devices`
    None (not known before JAX starts) the views' split is checked and the layout left for later."""
    patches = args.view_patches or 1
    if devices is not None and devices % patches:
        raise ParallelError(f"--view-patches {patches} must divide the {devices} devices into equal groups.")
    parallel = parallel_config(args, patches, request.steps_run)
    request = request.spread(spec, parallel)
    if devices is None:
        return request, None
    tiles = dataclasses.replace(request.tiles, devices=devices // patches)
    return dataclasses.replace(request, tiles=tiles), parallel


def describe_canvas(spec: PipelineSpec, request: Request, layout: str) -> str:
    """A canvas's views and where they run, as the banner says it."""
    tiles, f = request.tiles, spec.vae_factor
    views = len(view_boxes((request.height // f, request.width // f), (tiles.window // f,) * 2,
                           (tiles.stride // f,) * 2))
    regions = f", {len(tiles.regions)} regions" if tiles.regions else ""
    groups = f" over {tiles.devices} device groups of {layout}" if tiles.devices > 1 else f" on {layout}"
    return f"{views} views of {tiles.window}x{tiles.window} every {tiles.stride} px{regions}{groups}"


def describe_layout(parallel: ParallelConfig, steps: int) -> str:
    """The layout as the banner says it, with how many steps really run displaced."""
    if not parallel.split:
        return "1 device"
    text = f"{parallel.devices} devices, {parallel.mode.value}"
    if parallel.mode.reads_stale:
        stale = parallel.stale_steps(steps)
        text += (f" after {steps - stale} synchronous warm-up steps" if stale else
                 f", but every step is synchronous: the {parallel.warmup_steps} warm-up steps cover all {steps}")
    return text + (", cfg-parallel" if parallel.cfg_parallel else "")


def json_value(value: Any) -> Any:
    """A flag's value as the settings record it: paths (and lists of them) as strings."""
    if isinstance(value, list):
        return [json_value(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def generate(args: argparse.Namespace) -> None:
    """The command: checks, starts JAX (emulated CPU devices, the processes), loads, generates and
    writes. Raises ValueErrors for what the user's input gets wrong, OSError or RuntimeError for
    what the environment does."""
    plan = check_args(args)
    request, processes = plan.request, plan.processes
    # Each process emulates its share of the CPU devices; both must happen before JAX starts.
    cpu_devices = args.devices // (processes.num_processes or 1) if args.devices else DEFAULT_CPU_DEVICES
    emulated = emulate_cpu_devices(cpu_devices)
    initialize_processes(processes)
    main_process = is_main_process()
    compile_cache, cache_counter = start_compile_cache(args)

    def report(line: str) -> None:  # progress and results: from process 0 only
        if main_process:
            print(line, file=sys.stderr)

    if emulated and jax.default_backend() == "cpu":
        report(f"no accelerator: emulating {cpu_devices} CPU devices per process "
               f"(XLA_FLAGS={os.environ['XLA_FLAGS']})")
    parallel = plan.parallel
    if request.tiles is not None and parallel is None:
        request, parallel = canvas_layout(plan.spec, args, request, default_device_count())
    elif parallel is None:
        wanted = 1 if args.mode == "single" else default_device_count()
        parallel = plan.spec.largest_layout(request.height, wanted,
                                            lambda n: parallel_config(args, n, request.steps_run), args.cfg_parallel)
    devices = parallel.devices * (1 if request.tiles is None else request.tiles.devices)
    if len(jax.devices()) < devices:
        raise ParallelError(f"--devices {devices} but only {len(jax.devices())} "
                            f"{jax.default_backend()} devices are present.")
    check_step_memory(plan.spec, request, parallel)
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")

    pipe = load_pipeline(plan.spec.folder, dtype=jnp.dtype(dtype), cache_dir=args.cache_dir, log=report,
                         loras=plan.loras, vae=args.vae, refiner=args.refiner, controlnets=args.controlnet or ())
    hosts = f", {jax.process_count()} processes" if jax.process_count() > 1 else ""
    images = f"{request.batch} images of " if request.batch > 1 else ""
    part = request.image_to_image
    steps = (f"{request.steps}" if part is None else
             f"from {args.init_image} at strength {part.strength}: the last {request.steps_run} of {request.steps}")
    if request.refine is not None:
        steps += f" (the refiner's from step {request.refine.refiner_first + 1})"
    cached = ""
    if request.step_cache is not None:
        full = len(request.step_cache.full_steps(request.steps_run))
        cached = f" ({full} of them every layer: DeepCache, branch {request.step_cache.branch})"
    control, controlled = request.control, ""
    if control is not None:
        controlled = f" with {len(control.images)} ControlNet{'s' * (len(control.images) > 1)}"
        controlled += "" if args.control_preprocess == Preprocessor.NONE else f" ({args.control_preprocess})"
    layout = describe_layout(parallel, request.steps_run)
    if request.tiles is not None:
        layout = describe_canvas(plan.spec, request, layout)
    report(f"generating {images}{request.width}x{request.height}, {steps} {request.scheduler.value} steps{cached}"
           f"{controlled} on {jax.default_backend()} ({layout}{hosts}, {dtype}); "
           + ("compiling first..." if compile_cache is None else f"compiling first (kept in {compile_cache})..."))
    result = pipe.run(request.spread(plan.spec, parallel), ProgressBar("denoising") if main_process else None)
    if not main_process:
        return
    report(peak_memory_text(result.memory))
    settings = {k: json_value(v) for k, v in vars(args).items()}
    settings.update(height=request.height, width=request.width, devices=devices,
                    processes=jax.process_count(), dtype=dtype, backend=jax.default_backend(),
                    mode=parallel.mode.value, warmup_steps=parallel.warmup_steps,
                    displaced_steps=parallel.stale_steps(request.steps_run),
                    strength=part and part.strength, refiner_start=request.refine and request.refine.start,
                    aesthetic_score=request.aesthetics and request.aesthetics.score,
                    negative_aesthetic_score=request.aesthetics and request.aesthetics.negative_score,
                    context=parallel.context if parallel.mode == Mode.PCPP else None,
                    controlnet_scale=control and list(control.scales),
                    control_guidance_start=control and control.starts[0],
                    control_guidance_end=control and control.ends[0],
                    compile_cache=cache_counter and cache_counter.counts, images=request.batch)
    for i, files in enumerate(plan.files):
        image_settings = settings | {"seed": request.seeds[i % len(request.seeds)], "image": i,
                                     "output": str(files.png), "output_array": files.array and str(files.array)}
        write_image(files, result.images[i], image_settings, result.timings, args.overwrite)
    print(" ".join(f"{k} {v:.2f} s" for k, v in result.timings.items()), file=sys.stderr)
    print(f"wrote {', '.join(str(f.png) for f in plan.files)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(lambda: generate(args))


if __name__ == "__main__":
    sys.exit(main())
