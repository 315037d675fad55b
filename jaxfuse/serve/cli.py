"""`python -m jaxfuse.serve`: the image server's command line.

    python -m jaxfuse.serve                       # the demo model at http://127.0.0.1:8000
    python -m jaxfuse.serve --model path/to/stable-diffusion-xl-base-1.0 --warm 1024x1024 \\
        --max-batch 4 --api-key "$(openssl rand -hex 16)"

Every flag is checked, the model loaded and the programs for the `--warm` sizes compiled (each
batch size `--max-batch` can form, at the default steps) before the server listens; SIGTERM or
Ctrl-C stops taking requests, finishes the batch on the device, answers the queued requests 503
and exits 0. On several hosts start the same command on each with `--coordinator-address`,
`--num-processes` and `--process-id`, as `generate` takes them: process 0 serves HTTP and hands
each batch to every process. Exit codes: every jaxfuse command's (`jaxfuse.commands`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxfuse.commands import (
    HelpFormatter,
    add_cache_arguments,
    add_parallel_arguments,
    add_process_arguments,
    add_vae_argument,
    bound_sockets,
    lora_weights,
    parallel_config,
    run_command,
    start_compile_cache,
)
from jaxfuse.config import ParallelConfig, ParallelError
from jaxfuse.demo import DEMO_MODEL
from jaxfuse.parallel.mesh import (
    DEFAULT_CPU_DEVICES,
    ProcessLayout,
    default_device_count,
    emulate_cpu_devices,
    initialize_processes,
    is_main_process,
)
from jaxfuse.pipeline import load_pipeline
from jaxfuse.pipeline.request import DEFAULT_STEPS
from jaxfuse.serve.hosts import Channel
from jaxfuse.serve.jobs import Limits, Served
from jaxfuse.serve.queue import JobQueue
from jaxfuse.serve.worker import Worker, batch_sizes, follow
from jaxfuse.spec import PipelineError, PipelineSpec

API_KEY_ENV = "JAXFUSE_API_KEY"
DEMO_NAME = "jaxfuse-demo"  # the demo model's id in /v1/models


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxfuse.serve", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", type=Path, default=DEMO_MODEL,
                   help="a diffusers SDXL pipeline folder or a single-file SDXL checkpoint (default: the demo model)")
    add_vae_argument(p)
    p.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]",
                   help="a LoRA fused into the weights for every request (requests cannot add one); repeatable")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="compute dtype (default: float32 on CPU, bfloat16 on GPU/TPU)")
    add_cache_arguments(p)
    listen = p.add_argument_group("listening")
    listen.add_argument("--host", default="127.0.0.1",
                        help="the address to listen on (0.0.0.0: every network; then set --api-key)")
    listen.add_argument("--port", type=int, default=8000)
    listen.add_argument("--api-key", help=f"the key every endpoint but /health and the page (/) wants as "
                                          f"\"Authorization: Bearer KEY\" (default: ${API_KEY_ENV}; none: open)")
    queue = p.add_argument_group("the queue")
    queue.add_argument("--max-queue", type=int, default=64, help="requests waiting; beyond it: 429 with Retry-After")
    queue.add_argument("--max-batch", type=int, default=4,
                       help="images one device call makes, of requests that share size, steps, sampler and guidance "
                            "(also the most images one request may ask for)")
    queue.add_argument("--batch-wait-ms", type=float, default=50.0,
                       help="how long a request waits for others to share its call")
    queue.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take, queue included")
    queue.add_argument("--warm", nargs="*", metavar="WxH",
                       help="sizes whose programs are compiled before listening (default: the model's size)")
    limits = p.add_argument_group("what a request may ask")
    limits.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="steps of a request that names none")
    limits.add_argument("--max-steps", type=int, default=Limits.max_steps)
    limits.add_argument("--max-side", type=int, default=Limits.max_side, help="pixels per side of an image")
    limits.add_argument("--max-body-mb", type=float, default=16.0, help="a request's body, input pictures included")
    add_parallel_arguments(p)
    add_process_arguments(p)
    return p


def warm_sizes(values: list[str] | None, spec: PipelineSpec) -> list[tuple[int, int]]:
    """--warm's WxH values -> (height, width) pairs the model can make."""
    if values is None:
        return [(spec.default_size, spec.default_size)]
    sizes = []
    for value in values:
        match = re.fullmatch(r"(\d+)x(\d+)", value)
        if match is None:
            raise PipelineError(f"--warm {value}: write a size as WIDTHxHEIGHT, e.g. {spec.default_size}x"
                                f"{spec.default_size}.")
        width, height = int(match[1]), int(match[2])
        spec.check_size(height, width)
        sizes.append((height, width))
    return sizes


def check_args(args: argparse.Namespace) -> tuple[PipelineSpec, Limits, list[tuple[int, int]]]:
    """Everything checked before JAX starts or a weight loads."""
    for name in ("max_queue", "max_batch", "steps", "max_steps", "max_side"):
        if getattr(args, name) < 1:
            raise PipelineError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    if not args.batch_wait_ms >= 0:  # `not`: NaN is refused too
        raise PipelineError(f"--batch-wait-ms must be positive or 0, got {args.batch_wait_ms}.")
    for name in ("timeout", "max_body_mb"):
        if not getattr(args, name) > 0:
            raise PipelineError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}.")
    if args.steps > args.max_steps:
        raise PipelineError(f"--steps {args.steps} is above --max-steps {args.max_steps}.")
    if args.context is not None and args.mode != "pcpp":
        raise ParallelError("--context sets how much of its neighbours a patch sees in pcpp mode; add --mode pcpp.")
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise PipelineError('the server needs aiohttp: pip install "jaxfuse[serve]".') from None
    spec = PipelineSpec.read(args.model, args.vae)
    sizes = warm_sizes(args.warm, spec)
    limits = Limits(steps=args.steps, max_images=args.max_batch, max_side=args.max_side, max_steps=args.max_steps)
    return spec, limits, sizes


def api_key_of(args: argparse.Namespace) -> str | None:
    """--api-key, or the environment's API_KEY_ENV; None (an open server) when neither is set."""
    return args.api_key or os.environ.get(API_KEY_ENV) or None


def layout_policy(args: argparse.Namespace, spec: PipelineSpec):
    """(height, steps that run) -> the devices' layout: --devices exactly, or the most devices
    present whose patches the height divides into (`PipelineSpec.largest_layout`)."""
    wanted = args.devices or (1 if args.mode == "single" else default_device_count())

    def layout(height: int, steps_run: int) -> ParallelConfig:
        if args.devices is not None:
            return parallel_config(args, args.devices, steps_run)
        return spec.largest_layout(height, wanted, lambda n: parallel_config(args, n, steps_run), args.cfg_parallel)
    return layout


def serve(args: argparse.Namespace) -> None:
    spec, limits, sizes = check_args(args)
    loras = lora_weights(args.lora)
    api_key = api_key_of(args)
    processes = ProcessLayout(args.coordinator_address, args.num_processes, args.process_id, args.process_timeout)
    # Process 0 holds its port from here: nothing takes it while the model loads and compiles.
    sockets = bound_sockets(args.host, args.port) if not processes.given or processes.process_id == 0 else []
    emulate_cpu_devices(args.devices // (processes.num_processes or 1) if args.devices else DEFAULT_CPU_DEVICES)
    # JAX's preemption notifier would take SIGTERM in every process of a multi-host run and drop
    # it: the server stops on it itself.
    jax.config.update("jax_enable_preemption_service", False)
    initialize_processes(processes)
    main_process = is_main_process()

    def log(line: str) -> None:
        if main_process:
            print(line, file=sys.stderr, flush=True)

    start_compile_cache(args)
    if args.devices is not None and len(jax.devices()) < args.devices:
        raise ParallelError(f"--devices {args.devices} but only {len(jax.devices())} {jax.default_backend()} "
                            "devices are present.")
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    pipe = load_pipeline(spec.folder, dtype=jnp.dtype(dtype), cache_dir=args.cache_dir, log=log, loras=loras,
                         vae=args.vae)
    served = Served(spec, DEMO_NAME if args.model == DEMO_MODEL else args.model.stem, layout_policy(args, spec),
                    frozenset(path.stem for path, _ in loras))
    channel = Channel() if jax.process_count() > 1 else None
    if not main_process:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # process 0 says when to stop, after draining
        follow(pipe, served, args.max_batch, channel)
        return
    jobs = JobQueue(args.max_queue, args.max_batch, args.batch_wait_ms / 1000)
    device = Worker(pipe, served, jobs, channel)
    signal.signal(signal.SIGTERM, interrupted)  # until the server listens (then it drains on SIGTERM)
    try:
        layouts = ", ".join(f"{w}x{h} on {served.layout(h, limits.steps).devices} device(s)" for h, w in sizes)
        log(f"compiling batches of {', '.join(map(str, batch_sizes(args.max_batch)))} image(s) at {limits.steps} "
            f"steps for {layouts or 'no size (--warm given none)'}...")
        device.warm(sizes, limits.steps)
        log(f"{pipe.programs.compiles} programs compiled")
        from jaxfuse.serve import app  # aiohttp: checked present in `check_args`

        server = app.ImageServer(served, limits, jobs, device, api_key, args.timeout, int(args.max_body_mb * 2**20))
        asyncio.run(app.serve(server, sockets, log))
    finally:  # however process 0 ends, the others are not left waiting for its next batch
        device.stop_others()


def interrupted(*_) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: serve(args))
