"""The step plan: what kind each denoising step of a run is.

    plan = Plan.of(parallel, num_steps)
    for kind, start, stop in plan.phases():    # runs of steps alike, each compiled once
        ...

A kind says how the denoiser runs one step: today how its layers see the other patches
(synchronous, recording their exchanges for the steps after, displaced, pcpp or naive); a step
cache adds whether a step runs every layer or only the shallow ones. A plan may alternate kinds
(a cache refreshes every k steps): `phases` cuts it into runs of equal kinds, and every distinct
kind is one compiled program however often it recurs.
"""

from __future__ import annotations

import dataclasses
import itertools

from jaxfuse.config import Mode, ParallelConfig
from jaxfuse.parallel.patch import Patch


@dataclasses.dataclass(frozen=True)
class StepKind:
    """How one step runs, as the denoiser reads it: `patch`, each layer's view of the other patches."""

    patch: Patch = Patch()

    @property
    def writes_state(self) -> bool:
        """The step writes model state the next step reads (its exchanges, kept as stale context)."""
        return self.patch.writes_stale


@dataclasses.dataclass(frozen=True)
class Plan:
    """The kind of every step of a run, in order."""

    kinds: tuple[StepKind, ...]

    @classmethod
    def of(cls, parallel: ParallelConfig, num_steps: int) -> Plan:
        """A run of `num_steps` steps on `parallel`'s layout: every step in its mode, but a
        displaced (or pcpp) run's first `warmup_steps` synchronous, recording their context for
        the steps after."""
        own = StepKind(Patch.of(parallel))
        if not parallel.mode.reads_stale:
            return cls((own,) * num_steps)
        warm = min(parallel.warmup_steps, num_steps)
        return cls((StepKind(Patch.of(parallel, Mode.SYNC, record=True)),) * warm + (own,) * (num_steps - warm))

    def phases(self) -> list[tuple[StepKind, int, int]]:
        """(kind, first step, end step) of each run of consecutive steps of one kind."""
        phases, start = [], 0
        for kind, run in itertools.groupby(self.kinds):
            stop = start + len(list(run))
            phases.append((kind, start, stop))
            start = stop
        return phases

    @property
    def state_kind(self) -> StepKind | None:
        """The kind whose written state shapes what the loop carries (the first that writes any),
        or None when no step keeps state."""
        return next((kind for kind in self.kinds if kind.writes_state), None)
