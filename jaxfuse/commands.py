"""What jaxfuse's commands share: `python -m jaxfuse.generate`, `python -m jaxfuse.stream` and
`python -m checkpoints_conversion.convert_diffusers` take their common flags, report, and end
through these helpers; the library never imports them.

Exit codes, every command's (`run_command`): 0 done; 2 an input that cannot work (the message
names the fix); 1 the environment failed (a file that cannot be read or written, a damaged cache,
processes that cannot join, a result that is not finite); 130 interrupted. An error is one line
on stderr, `error: ...`.

Also here: argparse's help format and float type, the flags that several commands take (--lora,
--cache-dir, --no-compile-cache), a progress bar, and the memory checks made before a model loads
(the machine's memory is read by `jaxfuse.runtime.memory`).
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
from jax import monitoring

from jaxfuse import lora
from jaxfuse.config import GroupNormMode, Mode, ParallelConfig, ParallelError
from jaxfuse.demo import NAMED_CONTROLNETS, NAMED_LORAS
from jaxfuse.parallel.mesh import DEFAULT_CPU_DEVICES
from jaxfuse.pipeline.request import Request
from jaxfuse.runtime import memory
from jaxfuse.runtime.programs import COMPILE_CACHE_ENV, use_compile_cache
from jaxfuse.spec import PipelineError, PipelineSpec


def run_command(work: Callable[[], None]) -> int:
    """A command's `work` and its exit code (module doc); an error is one line on stderr."""
    try:
        work()
    except ValueError as e:  # the input: PipelineError, ParallelError, OutputError, ConfigError, ConversionError
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:  # the environment: files, the cache, processes, a non-finite result
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted.", file=sys.stderr)
        return 130
    return 0


# --- flags -----------------------------------------------------------------------------------------------------------


class HelpFormatter(argparse.HelpFormatter):
    """Shows each flag's default once, and none where there is no value to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
        if shown and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def finite_float(text: str) -> float:
    """argparse's type for every float flag: a finite number. float() takes "nan" and "inf", which
    a flag checked only in some modes (--bootstrap without --region) would carry silently."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def controlnet_folder(value: str) -> Path:
    """A --controlnet value: a folder, or one of `NAMED_CONTROLNETS`."""
    return NAMED_CONTROLNETS.get(value, Path(value))


def lora_weights(values: list[str] | None) -> list[tuple[Path, float]]:
    """--lora FILE[:WEIGHT] values -> (file, weight) pairs, each file checked to exist and not be a
    pickle; FILE is a path or one of `NAMED_LORAS`. The text after the last colon is the weight
    unless the whole value names a file."""
    pairs = []
    for value in values or []:
        name, colon, weight_text = value.rpartition(":")
        path, weight = NAMED_LORAS.get(value, Path(value)), 1.0
        if colon and not path.is_file():
            path = NAMED_LORAS.get(name, Path(name))
            try:
                weight = float(weight_text)
            except ValueError:
                if not path.is_file():  # nothing before the colon is a file either: the whole value is not
                    lora.check_file(Path(value))
                raise PipelineError(f"--lora {value}: the weight {weight_text!r} after the colon is not a "
                                    f"number; write FILE:WEIGHT, e.g. {name}:0.8.") from None
            if not math.isfinite(weight):
                raise PipelineError(f"--lora {value}: the weight must be a finite number.")
        lora.check_file(path)
        pairs.append((path, weight))
    return pairs


def add_vae_argument(p: argparse.ArgumentParser) -> None:
    """--vae, as every command that loads a model takes it."""
    p.add_argument("--vae", type=Path,
                   help="a VAE to use in place of the model's own, e.g. SDXL's fp16-fix VAE: a diffusers VAE folder "
                        "(or a pipeline folder holding vae/) or a single file (.safetensors); a single-file model "
                        "without a VAE needs one")


def add_cache_arguments(p: argparse.ArgumentParser) -> None:
    """--cache-dir and --no-compile-cache, as every command that loads a model takes them."""
    p.add_argument("--cache-dir", type=Path,
                   help="where converted weights and compiled programs are kept (default: $JAXFUSE_CACHE or "
                        "~/.cache/jaxfuse)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help=f"compile every program afresh instead of keeping them in the cache folder (or set "
                        f"{COMPILE_CACHE_ENV}=0)")


DEFAULT_WARMUP_STEPS = ParallelConfig.warmup_steps


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    """--devices, --mode and the modes' settings, as `generate` and `serve` take them."""
    parallel = p.add_argument_group("patch parallelism")
    parallel.add_argument("--devices", type=int,
                          help="devices to split the image over (default: every device present, or the most "
                               f"the image's rows divide among; on a CPU, {DEFAULT_CPU_DEVICES} emulated ones)")
    parallel.add_argument("--mode", choices=[m.value for m in Mode],
                          help="single, or how patches see each other: sync (exact), displaced (DistriFusion: "
                               "previous step's context, communication overlapped), naive (none), pcpp "
                               "(displaced, but self-attention sees only part of the two neighbouring patches) "
                               "(default: single on one device, displaced on several)")
    parallel.add_argument("--context", type=finite_float,
                          help="pcpp: the fraction of the patch above and of the patch below that self-attention "
                               "sees, 0 to 1 (default: 0.3); 1 is the two neighbours in full, not every patch")
    parallel.add_argument("--warmup-steps", type=int,
                          help=f"synchronous steps before displaced (or pcpp) ones (default: {DEFAULT_WARMUP_STEPS}, "
                               "fewer than --steps; DistriFusion's warmup_steps=K is K+1 here)")
    parallel.add_argument("--cfg-parallel", action="store_true",
                          help="put the conditional and unconditional batch on two device groups")
    parallel.add_argument("--gn", choices=[g.value for g in GroupNormMode], default="corrected",
                          help="group-norm statistics in displaced and pcpp steps")


def add_process_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of a multi-host run (`jaxfuse.parallel.mesh.ProcessLayout`)."""
    hosts = p.add_argument_group("several hosts (jax.distributed); all three flags or none")
    hosts.add_argument("--coordinator-address", help="HOST:PORT of process 0, the same for every process")
    hosts.add_argument("--num-processes", type=int, help="how many processes (hosts) take part")
    hosts.add_argument("--process-id", type=int, help="this process's index, 0 to --num-processes - 1")
    hosts.add_argument("--process-timeout", type=int, default=300,
                       help="seconds to wait for every process to join before failing")


def parallel_config(args: argparse.Namespace, devices: int, steps_run: int) -> ParallelConfig:
    """The layout the flags ask for on `devices` devices, for a run of `steps_run` steps."""
    mode = args.mode or ("single" if devices == 1 else "displaced")
    context = {} if args.context is None else {"context": args.context}
    warmup = DEFAULT_WARMUP_STEPS if args.warmup_steps is None else args.warmup_steps
    parallel = ParallelConfig(devices, mode, warmup, args.cfg_parallel, args.gn, **context)
    if args.warmup_steps is not None and parallel.mode.reads_stale and args.warmup_steps >= steps_run:
        raise ParallelError(f"--warmup-steps {args.warmup_steps} covers all {steps_run} steps that run, so no step "
                            f"would run {parallel.mode.value}; give fewer warm-up steps, or --mode sync.")
    return parallel


def start_compile_cache(args: argparse.Namespace) -> tuple[Path | None, CompileCacheCounter | None]:
    """The persistent compile cache's folder and a counter of its hits and misses, or (None, None)
    when --no-compile-cache or COMPILE_CACHE_ENV=0 turns it off."""
    if args.no_compile_cache or os.environ.get(COMPILE_CACHE_ENV, "1") == "0":
        return None, None
    return use_compile_cache(args.cache_dir), CompileCacheCounter()


class CompileCacheCounter:
    """Counts JAX's persistent-cache hits and misses (each compile asks the cache once)."""

    EVENTS = {"/jax/compilation_cache/cache_hits": "loaded", "/jax/compilation_cache/cache_misses": "compiled"}

    def __init__(self):
        self.counts = {"loaded": 0, "compiled": 0}
        monitoring.register_event_listener(self._event)

    def _event(self, name: str, **_) -> None:
        if name in self.EVENTS:
            self.counts[self.EVENTS[name]] += 1


# --- serving ---------------------------------------------------------------------------------------------------------


LISTEN_FIXES = {errno.EADDRINUSE: "another program listens there: give another --port, or stop it",
                errno.EACCES: "ports below 1024 need root: give --port 1024 or above"}


def check_listen(host: str, port: int) -> None:
    """Refuses a --host that is not an address of this machine, or a --port that cannot be
    listened on there, by binding each of its addresses for a moment."""
    for listener in bound_sockets(host, port):
        listener.close()


def bound_sockets(host: str, port: int) -> list[socket.socket]:
    """A socket bound to each of `host`'s addresses at `port` (not listening yet: bound, the port
    stays the server's while it loads and compiles), or one `PipelineError` naming the fix."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise PipelineError(f"--host {host} does not resolve ({e.strerror}); give an address of this machine, "
                            "e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every network).") from None
    bound = []
    try:
        for family, kind, protocol, _, address in addresses:
            listener = socket.socket(family, kind, protocol)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp's own would be
            try:
                listener.bind(address)
                bound.append(listener)
            except OSError as e:
                listener.close()
                if e.errno != errno.EADDRNOTAVAIL:  # one family missing is skipped, as asyncio's server does
                    fix = LISTEN_FIXES.get(e.errno, "give another --host or --port")
                    raise PipelineError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); "
                                        f"{fix}.") from None
    except PipelineError:
        for listener in bound:
            listener.close()
        raise
    if not bound:
        raise PipelineError(f"--host {host} is not an address of this machine; give one of its own, e.g. 127.0.0.1 "
                            "(this machine only) or 0.0.0.0 (every network).")
    return bound


# --- progress --------------------------------------------------------------------------------------------------------


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


# --- memory, checked before a model loads ----------------------------------------------------------------------------


def gib(size: int) -> str:
    return f"{size / 2**30:,.1f} GiB"


def images_text(count: int, height: int, width: int) -> str:
    return f"{count} image{'' if count == 1 else 's'} of {width}x{height}"


def check_image_memory(count: int, height: int, width: int) -> None:
    """Refuses images the host cannot hold: process 0 gathers them, float32 [K, H, W, 3], whatever
    the devices, so this bounds --num-images and the size before anything is made."""
    need, have = count * height * width * 3 * 4, memory.host_memory()
    if min(count, height, width) > 0 and need > have:
        raise PipelineError(f"the pixels of {images_text(count, height, width)} take {gib(need)} as float32, more "
                            f"than this machine's {gib(have)} of memory; make fewer images per run (--num-images) or "
                            "smaller ones (--height, --width).")


def attention_logits(spec: PipelineSpec, request: Request, parallel: ParallelConfig) -> tuple[int, ...]:
    """The largest attention logits of one UNet step on one device, [b, heads, t / patches, t]:
    `models.layers.attention` holds them whole, in float32, at every level that attends (on CPU its
    own einsum; elsewhere `jax.nn.dot_product_attention`, which with no implementation named runs
    XLA's, float32 logits too, as of JAX 0.10). t is the level's tokens of the image or, on a
    canvas, of one view (a device runs one view at a time); b the images, twice with guidance
    unless --cfg-parallel puts the halves on two devices."""
    cfg, f = spec.unet, spec.vae_factor
    height, width = (request.height, request.width) if request.tiles is None else (request.tiles.window,) * 2
    batch = request.batch * (2 if request.use_guidance and not parallel.cfg_parallel else 1)
    shapes = []
    for level, (kind, heads) in enumerate(zip(cfg.down_block_types, cfg.num_attention_heads)):
        tokens = (height // f >> level) * (width // f >> level)
        if kind.startswith("CrossAttn"):
            shapes.append((batch, heads, tokens // parallel.patches, tokens))
    return max(shapes, key=math.prod, default=(0,))


def check_step_memory(spec: PipelineSpec, request: Request, parallel: ParallelConfig) -> None:
    """Refuses a request whose one UNet step cannot fit a device: its attention logits alone (a
    lower bound of what the step holds, growing with the square of the tokens) exceed the device."""
    shape = attention_logits(spec, request, parallel)
    need, have = 4 * math.prod(shape), memory.device_memory()
    if need > have:
        views = " or make a canvas of views (--tiles on)" if request.tiles is None else ""
        raise PipelineError(f"one UNet step on {images_text(request.batch, request.height, request.width)} needs "
                            f"{gib(need)} a device for its attention logits alone (float32 {list(shape)}), more than "
                            f"the {gib(have)} a {jax.default_backend()} device holds; make fewer images per run "
                            f"(--num-images), smaller ones (--height, --width), split them over more devices "
                            f"(--devices){views}.")


def peak_memory_text(memory: dict[str, int]) -> str:
    """The peak memory per device of the (at most three) largest phases' programs, in words."""
    largest = sorted(memory.items(), key=lambda item: -item[1])[:3]
    return "peak memory per device: " + ", ".join(f"{phase} {size / 2**20:.1f} MiB" for phase, size in largest)
