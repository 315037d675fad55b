"""DeepCache (Ma et al., 2024): reuse the UNet's deep features from one step in the next ones.

On a full step every layer runs, and the hidden state entering one up layer (the one that reads
skip connection `branch`) is kept. On a cached ("shallow") step only the layers shallower than
that branch run: the down layers that make skips 0..branch, then the kept features in place of
everything deeper, then the up layers that read skips branch..0 (the time and micro-conditioning
embeddings, `conv_in` and the output head run on every step).

Skips are numbered as the UNet makes them: 0 is `conv_in`'s output, then each down level's
layers (a ResNet and its transformer count as one) and its downsampler. SDXL base has 9, so its
branches are 0..8: at 0 no down layer runs on a cached step and only the last up layer does; at 8
everything but the middle block does. This is `cache_branch_id` of DeepCache's `DeepCacheSDHelper`
(block `branch // 3`, layer `branch % 3` in its own words, the up blocks counted in reverse).

Which steps are full: step 0 of the steps that run, then every `interval`-th (the helper's
uniform schedule), or the steps DeepCache's original SDXL pipeline picks with its non-uniform
schedule, denser where `center` says (`quadratic_steps`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

SCHEDULES = ("uniform", "quadratic")
DEEP_CACHE = "deep_cache"  # the Flax collection holding the kept features


@dataclasses.dataclass(frozen=True)
class CacheStep:
    """How one step uses the cache: `full` runs every layer and keeps the features at `branch`; a
    shallow step runs the layers shallower than `branch` on the kept ones."""

    branch: int
    full: bool


@dataclasses.dataclass(frozen=True)
class DeepCache:
    """A run's DeepCache settings: `interval` N (1: off), `branch` B, and the schedule of full steps."""

    interval: int
    branch: int = 0
    schedule: str = "uniform"
    center: int = 15  # the quadratic schedule's densest step, and its exponent (DeepCache's SDXL example)
    power: float = 1.4

    def full_steps(self, steps: int) -> frozenset[int]:
        """The steps (of the `steps` that run, counted from 0) that run every layer."""
        if self.schedule == "uniform":
            return frozenset(range(0, steps, self.interval))
        return frozenset(quadratic_steps(steps, math.ceil(steps / self.interval), self.center, self.power))

    def kinds(self, steps: int) -> list[CacheStep]:
        full = self.full_steps(steps)
        return [CacheStep(self.branch, i in full) for i in range(steps)]


def quadratic_steps(steps: int, count: int, center: int, power: float) -> list[int]:
    """`count` full steps of `steps`, 0 first, spaced as x^power around `center` (denser near it):
    DeepCache's original SDXL pipeline's non-uniform schedule (its `sample_from_quad_center`),
    which lowers the power by 0.02 until the rounded steps are `count` distinct ones."""
    while power > 1:
        # Below the centre the roots are of negative numbers: complex, as in the original.
        low = complex(-center) ** (1 / power) if center > 0 else 0.0
        xs = np.linspace(low, (steps - center) ** (1 / power), count + 1)
        ys = np.unique(np.trunc(np.real(xs ** power)).astype(int))
        chosen = [0] + [int(y) + center for y in ys[1:-1]]
        if len(chosen) == count:
            return chosen
        power -= 0.02
    raise ValueError(f"no quadratic schedule of {count} full steps in {steps} around step {center}; pick another "
                     "center or the uniform schedule.")
