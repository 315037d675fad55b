"""The devices: how many to use, the processes of a multi-host run, and the mesh over them.

Without classifier-free-guidance parallelism the mesh is one axis, `PATCH`, of N devices; with it,
(`CFG`=2, `PATCH`=N/2): the unconditional and conditional halves of the batch live on the two
`CFG` groups, each splitting the image over its N/2 devices.

Across hosts one process runs per host (`ProcessLayout`, `initialize_processes`) and the mesh spans
every process's devices. Every process runs the same program; `place` feeds each one only the
shards its own devices hold and `gather` gives every process the whole result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import socket
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxfuse.parallel.patch import CFG, PATCH
from jaxfuse.parallel_config import ParallelConfig, ParallelError

CPU_DEVICES_FLAG = "--xla_force_host_platform_device_count"
# Emulated CPU devices per process when the user names no count: enough to show patch
# parallelism, few enough to keep a 2-core machine responsive.
DEFAULT_CPU_DEVICES = 4


def emulate_cpu_devices(count: int) -> bool:
    """Asks XLA for `count` CPU devices unless XLA_FLAGS already says how many; it must run
    before JAX starts its backend, and it changes nothing on GPU or TPU. True if it set it."""
    flags = os.environ.get("XLA_FLAGS", "")
    if count <= 1 or CPU_DEVICES_FLAG in flags:
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {CPU_DEVICES_FLAG}={count}".strip()
    return True


def default_device_count() -> int:
    """How many devices to spread an image over when the user names none: every device present;
    on a CPU, the emulated `DEFAULT_CPU_DEVICES` of each process."""
    present = len(jax.devices())
    if jax.default_backend() == "cpu":
        return min(present, DEFAULT_CPU_DEVICES * jax.process_count())
    return present


def make_mesh(cfg: ParallelConfig, devices: list | None = None) -> Mesh:
    """The mesh for `cfg` over the first `cfg.devices` devices (default: `jax.devices()`)."""
    devices = jax.devices() if devices is None else devices
    if len(devices) < cfg.devices:
        hint = (f" On a CPU, set XLA_FLAGS={CPU_DEVICES_FLAG}={cfg.devices} before JAX starts "
                "(python -m jaxfuse.generate does this for you; in Python, "
                "jaxfuse.parallel.mesh.emulate_cpu_devices)." if devices[0].platform == "cpu" else "")
        raise ParallelError(f"{cfg.devices} devices asked for, {len(devices)} present.{hint}")
    grid = np.asarray(devices[:cfg.devices])
    if cfg.cfg_parallel:
        return Mesh(grid.reshape(2, cfg.patches), (CFG, PATCH), axis_types=(AxisType.Auto,) * 2)
    return Mesh(grid, (PATCH,), axis_types=(AxisType.Auto,))


# Latents and images, NCHW, split by rows over the patches (replicated over the CFG groups).
ROWS = PartitionSpec(None, None, PATCH, None)


def axis_mesh(axis: str, count: int, devices: list | None = None) -> Mesh:
    """A one-axis mesh of the first `count` devices (default: `jax.devices()`) along `axis`: a
    stream's slots, a canvas's views."""
    devices = jax.devices() if devices is None else devices
    if len(devices) < count:
        raise ParallelError(f"{count} devices asked for along {axis!r}, {len(devices)} present.")
    return Mesh(np.asarray(devices[:count]), (axis,), axis_types=(AxisType.Auto,))


@dataclasses.dataclass(frozen=True)
class ProcessLayout:
    """Where this process sits in a multi-host run: `jax.distributed.initialize`'s arguments, all
    given or none. With none, a cluster that JAX recognises by itself (a TPU pod slice, SLURM,
    Open MPI) supplies them, and elsewhere the process runs alone. `timeout_s` bounds the wait
    for the other processes."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    timeout_s: int = 300

    def __post_init__(self):
        named = {"--coordinator-address": self.coordinator_address, "--num-processes": self.num_processes,
                 "--process-id": self.process_id}
        missing = [flag for flag, value in named.items() if value is None]
        if 0 < len(missing) < len(named):
            raise ParallelError(f"the process layout needs {', '.join(named)} together; {', '.join(missing)} "
                                "missing.")
        if self.coordinator_address is not None:
            if not re.fullmatch(r"\S+:\d{1,5}", self.coordinator_address) or not (
                    0 < int(self.coordinator_address.rsplit(":", 1)[1]) < 65536):
                raise ParallelError(f"--coordinator-address {self.coordinator_address!r} must be HOST:PORT, "
                                    "the address of process 0 and a free port on it, e.g. 10.0.0.1:8476.")
            if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
                raise ParallelError(f"--process-id {self.process_id} must be in 0..{self.num_processes - 1} "
                                    f"for --num-processes {self.num_processes}.")
        if self.timeout_s < 1:
            raise ParallelError(f"the process timeout must be at least 1 s, got {self.timeout_s}.")

    @property
    def given(self) -> bool:
        return self.coordinator_address is not None


class ProcessJoinError(RuntimeError):
    """The processes of a multi-host run could not join: a coordinator that cannot be reached, a
    port that is taken, a process that never started. A fault of the surroundings, not of the
    layout (that is a `ParallelError`)."""


# JAX ends the process (SIGABRT, a native stack trace) a few seconds past its own
# `initialization_timeout` while joining; it is given this much longer than the watchdog of
# `_exit_unless_done`, so that ours always ends the process first, with a message.
JAX_TIMEOUT_MARGIN_S = 60


def initialize_processes(layout: ProcessLayout) -> None:
    """Joins the processes of a multi-host run (`jax.distributed.initialize`); a no-op when they
    are joined already, or when none are named and JAX recognises no cluster. It must run before
    anything starts JAX's backends.

    With a layout given, the wait is bounded by `layout.timeout_s`. Raises ProcessJoinError when
    the coordinator's port stays closed (or, in process 0, is taken) or JAX reports a failure. When
    JAX is still waiting at the timeout (process 0 for peers that never came; another process
    talking to something that is not the coordinator), JAX itself would soon end the process
    with a native crash, out of reach of any Python handler; a watchdog thread ends it first:
    it prints `error: ...` to stderr and exits with status 1 (`os._exit`, so no `finally` blocks
    or atexit handlers run)."""
    if jax.distributed.is_initialized():
        return
    if not layout.given:
        try:
            jax.distributed.initialize(initialization_timeout=layout.timeout_s)
        except (ValueError, RuntimeError):  # no cluster around, or JAX already started: one process
            return
    else:
        _join(layout)
    # Collectives between CPU processes need gloo (without other processes it cannot start, so it
    # is set only here); it changes nothing on GPU or TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _join(layout: ProcessLayout) -> None:
    """`jax.distributed.initialize` for a given layout, within `layout.timeout_s` in all."""
    deadline = time.monotonic() + layout.timeout_s
    if layout.process_id == 0:
        _check_port_free(layout)
        stalled = "the coordinator was still waiting for them"
    else:
        _wait_for_coordinator(layout, deadline)
        stalled = ("something listens on that port, but the run did not start: another program, or a JAX "
                   "coordinator still waiting for the other processes")
    with _exit_unless_done(deadline, _unreachable(layout, stalled)):
        try:
            jax.distributed.initialize(layout.coordinator_address, layout.num_processes, layout.process_id,
                                       initialization_timeout=layout.timeout_s + JAX_TIMEOUT_MARGIN_S)
        except Exception as e:  # an XLA runtime error from the coordinator client, or JAX's own checks
            if isinstance(e, RuntimeError) and "before any JAX calls" in str(e):
                raise ParallelError("the process layout must be set before anything else uses JAX in this "
                                    "process: pass it to load_pipeline first, or start a new process.") from e
            raise ProcessJoinError(_unreachable(layout, _first_line(e))) from e


@contextlib.contextmanager
def _exit_unless_done(deadline: float, message: str):
    """Ends the process, printing `error: {message}` and exiting with status 1, unless the block
    is done by `deadline` (time.monotonic), and at least 1 s after it starts."""
    done = threading.Event()

    def watch():
        if not done.wait(max(1.0, deadline - time.monotonic())):
            print(f"error: {message}", file=sys.stderr, flush=True)
            os._exit(1)

    threading.Thread(target=watch, name="jaxfuse-join-watchdog", daemon=True).start()
    try:
        yield
    finally:
        done.set()


def _check_port_free(layout: ProcessLayout) -> None:
    """Raises ProcessJoinError when the coordinator's port is taken on this host: JAX's
    coordinator service, which binds it on every interface, would crash the process (SIGSEGV)."""
    if "JAX_COORDINATOR_BIND_ADDRESS" in os.environ:  # JAX binds elsewhere: nothing to check here
        return
    port = int(layout.coordinator_address.rsplit(":", 1)[1])
    dual = socket.has_dualstack_ipv6()
    try:
        with socket.create_server(("", port), family=socket.AF_INET6 if dual else socket.AF_INET,
                                  dualstack_ipv6=dual):
            return
    except OSError as e:
        raise ProcessJoinError(f"process 0 cannot serve as the coordinator at {layout.coordinator_address}: port "
                               f"{port} is taken on this host ({os.strerror(e.errno)}); choose a free port and pass it "
                               f"to every process as --coordinator-address.") from e


def _wait_for_coordinator(layout: ProcessLayout, deadline: float) -> None:
    """Waits until the coordinator's port accepts connections: JAX's own wait ends in a native
    crash. Raises ProcessJoinError when `deadline` (time.monotonic) passes first."""
    host, port = layout.coordinator_address.rsplit(":", 1)
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except OSError as e:
            if time.monotonic() + 0.5 > deadline:
                raise ProcessJoinError(_unreachable(layout, _first_line(e))) from e
            time.sleep(0.5)


def _unreachable(layout: ProcessLayout, cause: str) -> str:
    """Why the processes could not join, and what to check, from process `layout.process_id`'s view."""
    address, n = layout.coordinator_address, layout.num_processes
    if layout.process_id == 0:
        others = f"{n - 1} process" if n == 2 else f"{n - 1} processes"
        return (f"the other {others} did not join process 0 at {address} within {layout.timeout_s} s: check that "
                f"each was started with --coordinator-address {address} (an address of this host that it can "
                f"reach), --num-processes {n} and its own --process-id in 1..{n - 1}, and that port "
                f"{address.rsplit(':', 1)[1]} of this host is open to them. ({cause})")
    return (f"process {layout.process_id} of {n} could not join the others through the coordinator at {address} "
            f"within {layout.timeout_s} s: check that every process was started with the same "
            f"--coordinator-address and --num-processes, that process 0 runs on that host, and that its port is "
            f"open. ({cause})")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def is_main_process() -> bool:
    """True in the process that writes files and reports progress (process 0)."""
    return jax.process_index() == 0


def mesh_key(mesh: Mesh | None) -> Any:
    """What identifies a mesh for reuse of compiled programs and placed parameters."""
    return None if mesh is None else (mesh.axis_names, mesh.devices.shape, tuple(d.id for d in mesh.devices.flat))


def place(tree: Any, sharding: NamedSharding) -> Any:
    """Every array of `tree` (the same values in every process) laid out as `sharding`; across
    processes, each process supplies only the shards its own devices hold."""
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def one(x):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree)


def place_as(tree: Any, mesh: Mesh, specs: Any) -> Any:
    """`tree` laid out on `mesh` as `specs` says: a `PartitionSpec` for all of it, or a tree of them
    (a prefix of `tree`'s structure, as `shard_map` takes them)."""
    return jax.tree.map(lambda spec, part: place(part, NamedSharding(mesh, spec)), specs, tree,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def broadcast_from_first(value: np.ndarray) -> np.ndarray:
    """Process 0's `value` in every process; each process passes an array of the same shape and
    dtype (what it holds is ignored outside process 0)."""
    return np.asarray(multihost_utils.broadcast_one_to_all(value))


def gather(array: jax.Array) -> np.ndarray:
    """The whole value of an array that may be spread over processes, in every process."""
    if array.is_fully_addressable:
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
