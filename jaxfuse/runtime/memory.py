"""What memory this machine has, in bytes: the host's total, one device's total, and what is free
on N devices now. Each call reads it afresh (nothing is kept); the commands check a request
against these numbers before a model loads.

On a CPU, JAX's devices (one, or several emulated ones) share the host's memory: a device's total
is its share of the host's, and what is free is the host's, however many devices there are.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import jax

CGROUP = Path("/sys/fs/cgroup")  # cgroup v2's files: memory.max ("max" where there is no limit), memory.current


def host_memory() -> int:
    """The bytes of memory this machine has (its physical pages)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def host_free() -> int:
    """The bytes the host could hand out now: the least of its memory, what Linux could hand out
    without swapping (/proc/meminfo's MemAvailable) and what is left of a container's limit
    (cgroup v2), each where the machine tells it."""
    free = [host_memory()]
    with contextlib.suppress(OSError, ValueError, StopIteration):
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        free.append(1024 * int(next(line for line in meminfo if line.startswith("MemAvailable:")).split()[1]))
    with contextlib.suppress(OSError, ValueError):
        free.append(int((CGROUP / "memory.max").read_text()) - int((CGROUP / "memory.current").read_text()))
    return min(free)


def device_memory() -> int:
    """The bytes one device holds: an accelerator's own (JAX's `bytes_limit`); a CPU device's
    share of the host's memory."""
    stats = jax.local_devices()[0].memory_stats() or {}  # None on CPU
    return stats.get("bytes_limit") or host_memory() // jax.local_device_count()


def free_memory(devices: int) -> tuple[int, str]:
    """The bytes free on `devices` devices together, and where, in words (to end "more than the
    N GiB ..."): an accelerator's limit less what is in use, as JAX reports them, times `devices`;
    on a CPU the host's free memory (`host_free`), which its devices share."""
    device = jax.local_devices()[0]
    stats = device.memory_stats()
    if stats and "bytes_limit" in stats:
        return devices * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)), f"{devices} {device.device_kind} hold"
    return host_free(), "this machine has free"
