"""How far Mixture of Diffusers' centring of the Gaussian view weights moves a canvas from ours.

    python benchmarks/gaussian_centre.py            # a 768 x 256 (tall) demo canvas, 30 steps

Our Gaussian weights are centred on each window, at (n - 1) / 2 along both sides; Mixture of
Diffusers' code centres the rows at n / 2 (half a latent row lower). This makes the demo's tall
canvas both ways, from the same noise, and prints how much the images differ (in [0, 1]).
"""

from __future__ import annotations

import os
import sys

import numpy as np

CANVAS = dict(height=768, width=256, num_inference_steps=30, tile_weighting="gaussian", seed=0, tiled=True)


def rows_centred_at_half(window: tuple[int, int], weighting) -> np.ndarray:
    """`tiled.window_weights`' Gaussian with its rows centred at n / 2, as Mixture of Diffusers'."""
    from jaxfuse.sampling.tiled import GAUSSIAN_VARIANCE

    def gaussian(side: int, centre: float) -> np.ndarray:
        x = (np.arange(side) - centre) / side
        return np.exp(-x**2 / (2 * GAUSSIAN_VARIANCE)) / np.sqrt(2 * np.pi * GAUSSIAN_VARIANCE)

    (rows, columns) = window
    return np.outer(gaussian(rows, rows / 2), gaussian(columns, (columns - 1) / 2)).astype(np.float32)


def main() -> int:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    from jaxfuse.demo import DEMO_MODEL, DEMO_PROMPT
    from jaxfuse.pipeline import load_pipeline
    from jaxfuse.sampling import tiled

    ours = load_pipeline(DEMO_MODEL, log=lambda _: None)(DEMO_PROMPT, **CANVAS)
    # A fresh pipeline compiles afresh: its views read the substituted weights.
    tiled.window_weights = rows_centred_at_half
    theirs = load_pipeline(DEMO_MODEL, log=lambda _: None)(DEMO_PROMPT, **CANVAS)
    difference = np.abs(ours - theirs)
    print(f"768 x 256 demo canvas, 30 Euler steps, seed 0: rows centred at n/2 against (n-1)/2: "
          f"max |difference| {difference.max():.3f}, mean {difference.mean():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
