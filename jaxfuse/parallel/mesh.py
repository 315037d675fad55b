"""The parallel settings and the device mesh they run on.

Without classifier-free-guidance parallelism the mesh is one axis, `PATCH`, of N devices; with it,
(`CFG`=2, `PATCH`=N/2): the unconditional and conditional halves of the batch live on the two
`CFG` groups, each splitting the image over its N/2 devices.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, PartitionSpec

from jaxfuse.parallel.patch import CFG, PATCH, GroupNormMode, Mode, Patch

CPU_DEVICES_FLAG = "--xla_force_host_platform_device_count"


class ParallelError(ValueError):
    """Parallel settings that cannot run; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How one image is spread over devices.

    `mode`: single, sync, displaced or naive (see `jaxfuse.parallel.patch.Mode`);
    `warmup_steps`: synchronous steps before the displaced ones (DistriFusion uses 4);
    `cfg_parallel`: the two guidance halves on two device groups; `gn`: group-norm statistics
    in displaced steps.
    """

    devices: int = 1
    mode: Mode = Mode.SINGLE
    warmup_steps: int = 4
    cfg_parallel: bool = False
    gn: GroupNormMode = GroupNormMode.CORRECTED

    def __post_init__(self):
        object.__setattr__(self, "mode", Mode(self.mode))
        object.__setattr__(self, "gn", GroupNormMode(self.gn))
        if self.devices < 1:
            raise ParallelError(f"devices must be at least 1, got {self.devices}.")
        if self.mode == Mode.SINGLE and (self.devices != 1 or self.cfg_parallel):
            raise ParallelError(f"mode single runs on one device; for {self.devices} devices choose "
                                "--mode sync, displaced or naive.")
        if self.cfg_parallel and self.devices % 2:
            raise ParallelError(f"cfg_parallel splits the devices into two groups; {self.devices} is odd.")
        if self.warmup_steps < 0:
            raise ParallelError(f"warmup_steps must be >= 0, got {self.warmup_steps}.")
        if self.mode == Mode.DISPLACED and self.warmup_steps < 1:
            raise ParallelError("displaced mode needs at least one synchronous warm-up step to fill "
                                "its stale context; use --warmup-steps 1 or more.")

    @property
    def patches(self) -> int:
        """N: how many patches the image is split into."""
        return self.devices // 2 if self.cfg_parallel else self.devices

    @property
    def split(self) -> bool:
        return self.mode != Mode.SINGLE

    def patch(self, mode: Mode | None = None, record: bool = False) -> Patch:
        """The layers' view of one step in `mode` (default: this config's mode)."""
        return Patch(mode or self.mode, self.gn, record)


def make_mesh(cfg: ParallelConfig, devices: list | None = None) -> Mesh:
    """The mesh for `cfg` over the first `cfg.devices` devices (default: `jax.devices()`)."""
    devices = jax.devices() if devices is None else devices
    if len(devices) < cfg.devices:
        hint = (f" On a CPU, set XLA_FLAGS={CPU_DEVICES_FLAG}={cfg.devices} before JAX starts "
                "(python -m jaxfuse.generate does this for you)." if devices[0].platform == "cpu" else "")
        raise ParallelError(f"{cfg.devices} devices asked for, {len(devices)} present.{hint}")
    grid = np.asarray(devices[:cfg.devices])
    if cfg.cfg_parallel:
        return Mesh(grid.reshape(2, cfg.patches), (CFG, PATCH), axis_types=(AxisType.Auto,) * 2)
    return Mesh(grid, (PATCH,), axis_types=(AxisType.Auto,))


# Latents and images, NCHW, split by rows over the patches (replicated over the CFG groups).
ROWS = PartitionSpec(None, None, PATCH, None)
