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
from jaxfuse.step_cache import CacheStep, DeepCache


@dataclasses.dataclass(frozen=True)
class StepKind:
    """How one step runs, as the denoiser reads it: `patch`, each layer's view of the other patches;
    `cache`, whether it runs every layer and keeps DeepCache's features or only the shallow ones."""

    patch: Patch = Patch()
    cache: CacheStep | None = None

    @property
    def writes_state(self) -> bool:
        """The step writes model state the next step reads (its exchanges, kept as stale context;
        DeepCache's features)."""
        return self.patch.writes_stale or (self.cache is not None and self.cache.full)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The kind of every step of a run, in order."""

    kinds: tuple[StepKind, ...]

    @classmethod
    def of(cls, parallel: ParallelConfig, num_steps: int, cache: DeepCache | None = None) -> Plan:
        """A run of `num_steps` steps on `parallel`'s layout: every step in its mode, but a
        displaced (or pcpp) run's first `warmup_steps` synchronous, recording their context for
        the steps after; with `cache`, each step full or shallow as its schedule says."""
        own = Patch.of(parallel)
        warm = min(parallel.warmup_steps, num_steps) if parallel.mode.reads_stale else 0
        patches = [Patch.of(parallel, Mode.SYNC, record=True)] * warm + [own] * (num_steps - warm)
        caches = [None] * num_steps if cache is None else cache.kinds(num_steps)
        return cls(tuple(StepKind(p, c) for p, c in zip(patches, caches)))

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
