"""How one image is spread over devices: `ParallelConfig`, with its choices `Mode` and
`GroupNormMode`, and `ParallelError` for settings that cannot run.

Validated when it is built, before any mesh is made or any function is traced.
"""

from __future__ import annotations

import dataclasses
import enum


class ParallelError(ValueError):
    """Parallel settings that cannot run; the message names the fix."""


class Mode(str, enum.Enum):
    """How the patches of a split image see each other (DESIGN.md, `jaxfuse.parallel.patch`)."""

    SINGLE = "single"  # no mesh: plain SDXL
    SYNC = "sync"  # fresh context, used at once: equals single
    DISPLACED = "displaced"  # the previous step's context, own rows fresh (DistriFusion)
    NAIVE = "naive"  # no context at all: zero halos, local attention and statistics
    PCPP = "pcpp"  # displaced, but self-attention sees only the two neighbours' nearest tokens (PCPP)

    @property
    def reads_stale(self) -> bool:
        """Steps of this mode use the previous step's context, so synchronous warm-up steps
        must fill it first (displaced and pcpp)."""
        return self in (Mode.DISPLACED, Mode.PCPP)


class GroupNormMode(str, enum.Enum):
    """Group-norm statistics in `displaced` steps (DistriFusion's ablation, REFERENCES.md)."""

    CORRECTED = "corrected"  # stale statistics with the own patch's replaced by fresh ones
    CORRECTED_DISTRIFUSION = "corrected-distrifusion"  # E[x], E[x^2] + (fresh - stale) local, not / N
    STALE = "stale"  # the previous step's whole-image statistics
    SYNC = "sync"  # fresh whole-image statistics every step (a blocking, tiny exchange)
    SEPARATE = "separate"  # the own patch's statistics only


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How one image is spread over devices.

    `mode`: single, sync, displaced, naive or pcpp (`Mode`); `warmup_steps`: synchronous steps
    before the displaced (or pcpp) ones (DistriFusion's `warmup_steps=K` runs K + 1 of them);
    `cfg_parallel`: the two guidance halves on two device groups; `gn`: group-norm statistics in
    displaced and pcpp steps; `context`: in pcpp mode, the fraction p of the patch above and of
    the patch below that self-attention sees (0.3, as in the PCPP authors' code; p = 1 is the two
    neighbours in full, not every patch: `displaced` is that).
    """

    devices: int = 1
    mode: Mode = Mode.SINGLE
    warmup_steps: int = 4
    cfg_parallel: bool = False
    gn: GroupNormMode = GroupNormMode.CORRECTED
    context: float = 0.3

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
        if self.mode.reads_stale and self.warmup_steps < 1:
            raise ParallelError(f"{self.mode.value} mode needs at least one synchronous warm-up step to fill "
                                "its stale context; use --warmup-steps 1 or more.")
        if not 0 <= self.context <= 1:
            raise ParallelError(f"context (--context) is the fraction of each neighbour patch that pcpp attends "
                                f"to; it must be in [0, 1], got {self.context}.")

    @property
    def patches(self) -> int:
        """N: how many patches the image is split into."""
        return self.devices // 2 if self.cfg_parallel else self.devices

    @property
    def split(self) -> bool:
        return self.mode != Mode.SINGLE

    def stale_steps(self, num_steps: int) -> int:
        """How many of `num_steps` steps use the previous step's context: those after the
        warm-up in displaced and pcpp mode; none when the warm-up covers every step."""
        return max(0, num_steps - self.warmup_steps) if self.mode.reads_stale else 0
