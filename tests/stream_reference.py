"""The stream's reference: one image denoised alone through the slots, as StreamDiffusion defines
each guidance type (`tests/test_stream.py`, and the ControlNet's stream in `tests/test_controlnet.py`)."""

import numpy as np

from jaxfuse.sampling.stream import RCFG, StreamConfig

SCALE, DELTA = 1.8, 0.7
T_INDEX = {1: (45,), 2: (32, 45), 4: (0, 16, 32, 45)}


def alone(unet, config: StreamConfig, schedule, cond, entering, entering_noise, slot_noise):
    """One image [C, h, w] denoised alone from `entering` (at slot 0, carrying `entering_noise`),
    stepping to slot s + 1 with `slot_noise[s + 1]`: the guidance types written out as
    StreamDiffusion defines them."""
    s_ = {k: np.asarray(getattr(schedule, k)) for k in ("timesteps", "x0_from_x", "x0_from_output",
                                                        "sample_from_x0", "sample_from_noise")}
    x, residual = entering, entering_noise
    for s in range(config.slots):
        t, p, q = s_["timesteps"][s], s_["x0_from_x"][s], s_["x0_from_output"][s]
        eps_c = unet(x, t, cond, 1)
        if config.rcfg is RCFG.NONE:
            eps = eps_c
        else:
            if config.rcfg is RCFG.FULL:
                eps_u = unet(x, t, cond, 0)
            else:
                if config.rcfg is RCFG.INITIALIZE and s == 0:
                    residual = unet(x, t, cond, 0)
                eps_u = DELTA * residual
            eps = eps_u + SCALE * (eps_c - eps_u)
        x0 = p * x + q * eps
        if s == config.slots - 1:
            return x0
        a_next, b_next = s_["sample_from_x0"][s + 1], s_["sample_from_noise"][s + 1]
        residual = slot_noise[s + 1] + a_next / b_next * (p * s_["sample_from_noise"][s] * residual + q * eps)
        x = a_next * x0 + b_next * slot_noise[s + 1]
