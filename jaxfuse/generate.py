"""`python -m jaxfuse.generate`: one SDXL image from the command line.

    python -m jaxfuse.generate                  # the built-in demo model, its default prompt
    python -m jaxfuse.generate --model path/to/stable-diffusion-xl-base-1.0 \\
        --prompt "a lighthouse at dusk" --height 1024 --width 1024 --output lighthouse.png

Writes the PNG, a JSON file of the settings and timings beside it, and with `--output-array`
the decoded image as float32 [H, W, 3] in [0, 1]. Every input is checked before the model is
loaded; an existing output file is kept unless `--overwrite` is given. Without `--devices` the
image is spread over every device present, on a CPU over an emulated mesh of 4.

On several hosts, start the same command on each with its place in the run:

    python -m jaxfuse.generate ... --coordinator-address 10.0.0.1:8476 --num-processes 2 --process-id 0
    python -m jaxfuse.generate ... --coordinator-address 10.0.0.1:8476 --num-processes 2 --process-id 1

The mesh then spans every process's devices and process 0 writes the files. In a cluster that JAX
recognises by itself (a TPU pod slice, SLURM) the three flags can be left out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxfuse import schedulers
from jaxfuse.config import GroupNormMode, Mode, ParallelConfig, ParallelError
from jaxfuse.demo import DEMO_MODEL, DEMO_PROMPT
from jaxfuse.parallel.mesh import (
    DEFAULT_CPU_DEVICES,
    ProcessLayout,
    default_device_count,
    emulate_cpu_devices,
    initialize_processes,
    is_main_process,
)
from jaxfuse.pipeline import load_pipeline
from jaxfuse.spec import PipelineError, PipelineSpec


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxfuse.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=Path, default=DEMO_MODEL,
                   help="a diffusers SDXL pipeline folder, or one converted by jaxfuse (default: the built-in "
                        "demo model, 256x256 scenes of coloured shapes)")
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--height", type=int, default=None, help="image height (default: the model's size)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the model's size)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--guidance-rescale", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", choices=[k.value for k in schedulers.SchedulerKind], default="euler")
    p.add_argument("--latents", type=Path, help="initial noise as .npy, diffusers layout (1, 4, H/8, W/8), unscaled")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute dtype (default: float32 on CPU, bfloat16 on GPU/TPU)")
    p.add_argument("--output", type=Path, default=Path("jaxfuse.png"), help="PNG to write")
    p.add_argument("--output-array", type=Path, help="also write the image as float32 HxWx3 in [0, 1] (.npy)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--cache-dir", type=Path, help="where converted weights are kept (default: ~/.cache/jaxfuse)")
    parallel = p.add_argument_group("patch parallelism")
    parallel.add_argument("--devices", type=int, default=None,
                          help="devices to split the image over (default: every device present, or the most "
                               f"the image's rows divide among; on a CPU, {DEFAULT_CPU_DEVICES} emulated ones)")
    parallel.add_argument("--mode", choices=[m.value for m in Mode], default=None,
                          help="single, or how patches see each other: sync (exact), displaced (DistriFusion: "
                               "previous step's context, communication overlapped), naive (none), pcpp "
                               "(displaced, but self-attention sees only part of the two neighbouring patches) "
                               "(default: single on one device, displaced on several)")
    parallel.add_argument("--context", type=float, default=None,
                          help="pcpp: the fraction of the patch above and of the patch below that self-attention "
                               "sees, 0 to 1 (default: 0.3); 1 is the two neighbours in full, not every patch")
    parallel.add_argument("--warmup-steps", type=int, default=4,
                          help="synchronous steps before displaced (or pcpp) ones")
    parallel.add_argument("--cfg-parallel", action="store_true",
                          help="put the conditional and unconditional batch on two device groups")
    parallel.add_argument("--gn", choices=[g.value for g in GroupNormMode], default="corrected",
                          help="group-norm statistics in displaced and pcpp steps")
    hosts = p.add_argument_group("several hosts (jax.distributed); all three flags or none")
    hosts.add_argument("--coordinator-address", help="HOST:PORT of process 0, the same for every process")
    hosts.add_argument("--num-processes", type=int, help="how many processes (hosts) take part")
    hosts.add_argument("--process-id", type=int, help="this process's index, 0 to --num-processes - 1")
    hosts.add_argument("--process-timeout", type=int, default=300,
                       help="seconds to wait for every process to join before failing")
    return p.parse_args(argv)


def parallel_config(args: argparse.Namespace, devices: int) -> ParallelConfig:
    mode = args.mode or ("single" if devices == 1 else "displaced")
    context = {} if args.context is None else {"context": args.context}
    return ParallelConfig(devices, mode, args.warmup_steps, args.cfg_parallel, args.gn, **context)


def check_args(args: argparse.Namespace
               ) -> tuple[PipelineSpec, np.ndarray | None, ParallelConfig | None, ProcessLayout]:
    """Everything that can be checked without loading weights; raises `PipelineError` or
    `ParallelError`. The parallel layout is None when `--devices` is not given: it then depends on
    the devices present (`PipelineSpec.largest_layout`)."""
    if args.context is not None and args.mode != "pcpp":
        raise ParallelError("--context sets how much of its neighbours a patch sees in pcpp mode; add --mode pcpp.")
    parallel = None if args.devices is None else parallel_config(args, args.devices)
    processes = ProcessLayout(args.coordinator_address, args.num_processes, args.process_id, args.process_timeout)
    if parallel is not None and processes.given and parallel.devices % processes.num_processes:
        raise ParallelError(f"--devices {parallel.devices} must divide evenly among --num-processes "
                            f"{processes.num_processes}: each process brings the same number of devices.")
    if args.output.suffix.lower() != ".png":
        raise PipelineError(f"--output {args.output} must end in .png.")
    outputs = [args.output, args.output.with_suffix(".json")] + ([args.output_array] if args.output_array else [])
    existing = [str(p) for p in outputs if p.exists()]
    if existing and not args.overwrite:
        raise PipelineError(f"{', '.join(existing)} already exist; choose another --output or pass --overwrite.")
    spec = PipelineSpec.read(args.model)
    latents = None
    if args.latents is not None:
        if not args.latents.is_file():
            raise PipelineError(f"--latents {args.latents}: no such file.")
        latents = np.load(args.latents, allow_pickle=False)
    height, width = args.height or spec.default_size, args.width or spec.default_size
    spec.check_request(height, width, args.steps, 1, None if latents is None else latents.shape,
                       parallel.patches if parallel else 1)
    return spec, latents, parallel, processes


class ProgressBar:
    """A one-line text progress bar on stderr; the rate counts from the end of the first step,
    so it excludes start-up."""

    def __init__(self, label: str, width: int = 30):
        self.label, self.width, self.first = label, width, None

    def __call__(self, step: int, total: int) -> None:
        now = time.perf_counter()
        if step == 1:
            self.first = now
        rate = f" {(step - 1) / (now - self.first):.2f} steps/s" if step > 1 and now > self.first else ""
        done = int(self.width * step / total)
        print(f"\r{self.label} [{'#' * done}{'.' * (self.width - done)}] {step}/{total}{rate}",
              end="\n" if step == total else "", file=sys.stderr, flush=True)


def generate(args: argparse.Namespace) -> None:
    """The command: checks, starts JAX (emulated CPU devices, the processes), loads, generates and
    writes. Raises `PipelineError`, `ParallelError` (ValueErrors) or OSError for what the user can fix."""
    spec, latents, parallel, processes = check_args(args)
    # Each process emulates its share of the CPU devices; both must happen before JAX starts.
    cpu_devices = args.devices // (processes.num_processes or 1) if args.devices else DEFAULT_CPU_DEVICES
    emulated = emulate_cpu_devices(cpu_devices)
    initialize_processes(processes)
    main_process = is_main_process()

    def report(line: str) -> None:  # progress and results: from process 0 only
        if main_process:
            print(line, file=sys.stderr)

    if emulated and jax.default_backend() == "cpu":
        report(f"no accelerator: emulating {cpu_devices} CPU devices per process "
               f"(XLA_FLAGS={os.environ['XLA_FLAGS']})")
    height, width = args.height or spec.default_size, args.width or spec.default_size
    if parallel is None:
        wanted = 1 if args.mode == "single" else default_device_count()
        parallel = spec.largest_layout(height, wanted, lambda n: parallel_config(args, n), args.cfg_parallel)
    if len(jax.devices()) < parallel.devices:
        raise ParallelError(f"--devices {parallel.devices} but only {len(jax.devices())} "
                            f"{jax.default_backend()} devices are present.")
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")

    pipe = load_pipeline(spec.folder, dtype=jnp.dtype(dtype), cache_dir=args.cache_dir, log=report)
    layout = "1 device" if not parallel.split else (
        f"{parallel.devices} devices, {parallel.mode.value}" + (", cfg-parallel" if parallel.cfg_parallel else ""))
    hosts = f", {jax.process_count()} processes" if jax.process_count() > 1 else ""
    report(f"generating {width}x{height}, {args.steps} {args.scheduler} steps on {jax.default_backend()} "
           f"({layout}{hosts}, {dtype}); compiling first...")
    result = pipe.generate(
        args.prompt, args.negative_prompt, height=height, width=width, num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale, guidance_rescale=args.guidance_rescale, seed=args.seed,
        latents=latents, scheduler=args.scheduler, parallel=parallel,
        progress=ProgressBar("denoising") if main_process else None,
    )
    if not main_process:
        return
    image = result.images[0]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(args.output)
    if args.output_array:
        np.save(args.output_array, image.astype(np.float32))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(height=height, width=width, devices=parallel.devices, processes=jax.process_count(),
                    dtype=dtype, backend=jax.default_backend(), mode=parallel.mode.value,
                    context=parallel.context if parallel.mode == Mode.PCPP else None)
    args.output.with_suffix(".json").write_text(json.dumps(
        {"settings": settings, "timings_s": {k: round(v, 3) for k, v in result.timings.items()}}, indent=2))
    print(" ".join(f"{k} {v:.2f} s" for k, v in result.timings.items()), file=sys.stderr)
    print(f"wrote {args.output}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        generate(args)
    except (ValueError, OSError) as e:  # PipelineError, ParallelError, ConfigError, a file that cannot be read
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
