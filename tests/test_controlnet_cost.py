"""What a ControlNet adds to one denoising step (`jaxfuse.analysis.cost` with `controlnets=`), read
from the compiled programs at tiny shapes: FLOPs of about its own program, the bytes of its own
exchanges, and stale context only where a step keeps it."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from jaxfuse.analysis.cost import build_step, step_cost
from jaxfuse.analysis.hlo import collective_bytes
from jaxfuse.config import ControlNetConfig, UNetConfig
from jaxfuse.parallel.mesh import PATCH, ROWS, make_mesh
from jaxfuse.parallel.patch import Patch
from jaxfuse.parallel_config import ParallelConfig
from jaxfuse.sampling.denoiser import Denoiser
from jaxfuse.sampling.plan import StepKind

TINY = UNetConfig.tiny()
NET = ControlNetConfig.tiny()
SIZE = 256  # pixels: a 32x32 latent, 16 rows per patch on 2 devices
SYNC = ParallelConfig(2, "sync")
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def controlnet_alone(parallel: ParallelConfig) -> tuple[int, dict[str, int]]:
    """(FLOPs, bytes received by kind) per device of the ControlNet's own program in a step of
    `parallel`: its residuals for the guidance batch on the step's inputs, on a device's rows."""
    _, (denoiser, latents, cond, _, _), _ = build_step(TINY, parallel, SIZE, SIZE, controlnets=(NET,))
    denoiser = denoiser.of_kind(StepKind(Patch.of(parallel)))

    def residuals(denoiser, latents, cond):
        x = jnp.concatenate([latents, latents])  # the guidance batch
        control = cond.control.at_step(0, x.shape[0], True, parallel.cfg_parallel)
        return denoiser.control_residuals(x, jnp.zeros(()), cond.replace(control=control), None)[0]

    in_specs = (P(), ROWS, Denoiser.cond_specs(parallel, cond))
    program = jax.shard_map(residuals, mesh=make_mesh(parallel), in_specs=in_specs,
                            out_specs=P(None, PATCH))  # NHWC residuals, each device's rows
    lowered = jax.jit(program).lower(denoiser, latents, cond)
    return int(lowered.compile().cost_analysis()["flops"]), collective_bytes(lowered.as_text(dialect="hlo"))


@pytest.mark.slow
def test_a_controlnet_adds_its_own_program_to_a_step():
    """On 2 devices in sync: a step with a ControlNet costs the step without it plus about the
    ControlNet's own program (and the residuals' additions to the UNet's skips), receives exactly
    the step's bytes plus the ControlNet's own halos and gathers, holds its parameters, and keeps no
    stale context. The displaced step after the warm-up keeps the ControlNet's too."""
    without = step_cost(TINY, SYNC, SIZE, SIZE)
    with_net = step_cost(TINY, SYNC, SIZE, SIZE, controlnets=(NET,))
    flops, received = controlnet_alone(SYNC)

    added = with_net.flops - without.flops
    assert 1.0 < added / flops < 1.01  # measured 1.0002 (0.43545 GFLOP added, 0.43534 alone)
    assert set(received) == {"collective-permute", "all-gather"}
    assert {kind: with_net.received[kind] - without.received[kind] for kind in with_net.received} == received
    assert with_net.params_bytes - without.params_bytes == with_net.control_params_bytes > 0
    assert with_net.stale_bytes == with_net.control_stale_bytes == 0

    _, _, displaced = build_step(TINY, ParallelConfig(2, "displaced"), SIZE, SIZE, controlnets=(NET,))
    assert 0 < displaced["control_stale"] < displaced["stale"]  # measured 0.77 of 2.53 MB: its share


@pytest.mark.slow
def test_cost_script_on_the_tiny_config(tmp_path):
    """benchmarks/controlnet_cost.py: a row per layout and count, the ratios against the same layout
    without a ControlNet, and a second run that measures nothing again."""
    command = [sys.executable, BENCHMARKS / "controlnet_cost.py", "--preset", "tiny", "--sizes", str(SIZE),
               "--devices", "1", "2", "--modes", "sync", "--json", tmp_path / "cn.json"]
    first = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = {(r["devices"], r["controlnets"]): r for r in json.loads((tmp_path / "cn.json").read_text())}
    assert set(rows) == {(1, 0), (1, 1), (2, 0), (2, 1)}
    assert rows[2, 1]["received_bytes"] > rows[2, 0]["received_bytes"] > 0
    assert "| 2 | sync | 1 | " in first.stdout and "| 1 | single | 0 | " in first.stdout
    again = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert again.returncode == 0 and "measured" not in again.stderr and again.stdout == first.stdout
