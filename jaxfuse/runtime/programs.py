"""Compiled programs, kept and measured: every program of the image pipeline, the stream, the tiled
VAE and the weights' check compiles through one `Programs`.

    programs = Programs()
    record = CallRecord(progress)                     # one call's timings, memory and progress
    run = programs.for_call(record)                   # a `sampling.image.Runner`
    out = run.run(("decode", ...), fn, params, x)     # compiled once per name and argument shapes
    params = run.replicated("unet", params, mesh)     # placed once per mesh

A program is compiled once per name and argument structure, shapes and dtypes, and kept (the
`limit` most recently used); the seconds spent compiling go to the call's record, apart from its
phases' own time (`CallRecord.timed`), with each phase's peak memory per device from the compiled
program. Nothing of a call is kept on the `Programs`: two threads calling one pipeline get their
own records.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxfuse import checkpoint
from jaxfuse.analysis.cost import peak_bytes
from jaxfuse.parallel.mesh import mesh_key, place

# Set to 0 to keep the commands from using the persistent compilation cache.
COMPILE_CACHE_ENV = "JAXFUSE_COMPILE_CACHE"
# Programs kept per `Programs`: a pipeline serving many sizes would otherwise keep every program
# it ever compiled (with the compile cache on, one dropped and needed again loads from disk).
KEPT_PROGRAMS = 64


def use_compile_cache(cache_dir: str | Path | None = None) -> Path:
    """Keeps every compiled program under `cache_dir`/xla (default: jaxfuse's cache folder,
    `$JAXFUSE_CACHE` or ~/.cache/jaxfuse) so that a later process running the same program loads
    it instead of compiling it again (JAX's persistent compilation cache). Call it before the
    first compile; a cache folder set already (`JAX_COMPILATION_CACHE_DIR`) is kept. Returns the
    folder in use."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(Path(cache_dir or checkpoint.default_cache_dir()) / "xla"))
        # JAX's default keeps only programs that took a second to compile; the small ones (text
        # encoders, noise, checks) add up to several seconds of a run too.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return Path(jax.config.jax_compilation_cache_dir)


@dataclasses.dataclass
class CallRecord:
    """One call's account: the seconds of each phase without compiling, the seconds compiling, the
    peak memory per device (bytes) of each phase's largest program, and who hears of each step."""

    progress: Callable[[int, int], None] | None = None
    compile_seconds: float = 0.0
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    memory: dict[str, int] = dataclasses.field(default_factory=dict)

    def timed(self, phase: str, work: Callable[[], Any]) -> Any:
        """`work()`, finished; its seconds less the compiling it caused go to `timings[phase]`."""
        compiled_before, start = self.compile_seconds, time.perf_counter()
        result = jax.block_until_ready(work())
        self.timings[phase] = time.perf_counter() - start - (self.compile_seconds - compiled_before)
        return result

    def phase_times(self) -> dict[str, float]:
        """The compile time first, then each phase's, as the commands print and save them."""
        return {"compile": self.compile_seconds, **self.timings}


class Programs:
    """Compiled programs kept by name and argument signature, and parameters placed on meshes."""

    def __init__(self, limit: int = KEPT_PROGRAMS):
        self.limit = limit
        self._compiled: OrderedDict[Any, tuple[Any, int]] = OrderedDict()  # signature -> (executable, peak bytes)
        self._placed: dict[Any, Any] = {}
        self._lock = threading.Lock()
        self._compiling = threading.Lock()  # one compile at a time: callers wanting the same program wait for it
        self.compiles = 0  # programs compiled (or loaded from the compile cache) so far

    def __len__(self) -> int:
        return len(self._compiled)

    def executable(self, name: Any, fn: Callable, *args, donate: int | None = None,
                   record: CallRecord | None = None) -> tuple[Any, int]:
        """(the compiled `jax.jit(fn)` for `args`, its peak bytes per device), compiled once per
        `name` and argument signature; the compile's seconds go to `record`."""
        leaves, tree = jax.tree.flatten(args)
        signature = (name, tree, tuple((np.shape(x), jnp.result_type(x)) for x in leaves))
        entry = self._kept(signature)
        if entry is None:
            with self._compiling:
                entry = self._kept(signature)
                if entry is None:
                    start = time.perf_counter()
                    jitted = jax.jit(fn, donate_argnums=() if donate is None else (donate,))
                    executable = jitted.lower(*args).compile()
                    if record is not None:
                        record.compile_seconds += time.perf_counter() - start
                    entry = (executable, peak_bytes(executable))
                    with self._lock:
                        self.compiles += 1
                        self._compiled[signature] = entry
                        while len(self._compiled) > self.limit:
                            self._compiled.popitem(last=False)
        return entry

    def _kept(self, signature: Any) -> tuple[Any, int] | None:
        with self._lock:
            entry = self._compiled.get(signature)
            if entry is not None:
                self._compiled.move_to_end(signature)
            return entry

    def run(self, name: Any, fn: Callable, *args, donate: int | None = None, record: CallRecord | None = None):
        """`jax.jit(fn)(*args)` through the kept program (`executable`); the program's peak memory
        counts towards the phase `name` (its first item, when a tuple) in `record`."""
        executable, peak = self.executable(name, fn, *args, donate=donate, record=record)
        if record is not None:
            phase = name[0] if isinstance(name, tuple) else name
            record.memory[phase] = max(record.memory.get(phase, 0), peak)
        return executable(*args)

    def replicated(self, name: str, tree: Any, mesh: Mesh) -> Any:
        """`tree` copied to every device of `mesh`, once per mesh (one mesh per name at a time)."""
        key = (name, mesh_key(mesh))
        with self._lock:
            placed = self._placed.get(key)
        if placed is None:
            placed = place(tree, NamedSharding(mesh, P()))
            with self._lock:
                self._placed = {k: v for k, v in self._placed.items() if k[0] != name}
                self._placed[key] = placed
        return placed

    def for_call(self, record: CallRecord) -> CallPrograms:
        return CallPrograms(self, record)


@dataclasses.dataclass(frozen=True)
class CallPrograms:
    """A `Programs` seen by one call: what runs is accounted to its `record` (a
    `sampling.image.Runner`)."""

    programs: Programs
    record: CallRecord

    def run(self, name: Any, fn: Callable, *args, donate: int | None = None) -> Any:
        return self.programs.run(name, fn, *args, donate=donate, record=self.record)

    def replicated(self, name: str, tree: Any, mesh: Mesh) -> Any:
        return self.programs.replicated(name, tree, mesh)

    def timed(self, phase: str, work: Callable[[], Any]) -> Any:
        return self.record.timed(phase, work)
