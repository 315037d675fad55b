"""How far jaxfuse is from its references, as numbers (the tests assert the bounds).

    python benchmarks/parity.py        (needs the [test] extra: torch and diffusers are the oracle)

1. The UNet against diffusers' UNet2DConditionModel, same random weights (jaxfuse/oracle.py).
2. The whole pipeline against diffusers' StableDiffusionXLPipeline, per sampler, on the tiny
   random SDXL of jaxfuse/oracle.py, same initial noise.
3. Patch parallelism in sync mode against one device, per number of patches, on the emulated
   CPU mesh: the UNet output and the decoded image.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
)

import jaxfuse  # noqa: E402
from jaxfuse.oracle import CASES, build_tiny_sdxl, random_unet, reference_output, unet_inputs  # noqa: E402
from jaxfuse.parallel_config import ParallelConfig  # noqa: E402


def relative(a, b) -> str:
    err = np.abs(np.asarray(a, np.float32) - b).max()
    return f"{err:.2e} ({err / np.abs(b).max():.1e} of max |ref|)"


def unet_table(tmp: Path) -> None:
    print("| config | dtype | max abs diff vs diffusers fp32 |\n|---|---|---|")
    for name, (config, num_ids) in sorted(CASES.items()):
        model = random_unet(config)
        model.save_pretrained(tmp / name)
        inputs = unet_inputs(config, num_ids)
        ref = reference_output(model, inputs)
        for dtype in (jnp.float32, jnp.bfloat16):
            unet, params = jaxfuse.load_unet(tmp / name, dtype=dtype)
            out = jax.jit(unet.apply)({"params": params}, inputs["sample"], inputs["timesteps"],
                                      inputs["encoder_hidden_states"], text_embeds=inputs["text_embeds"],
                                      time_ids=inputs["time_ids"])
            print(f"| {name} | {jnp.dtype(dtype).name} | {relative(out, ref)} |")


def pipeline_tables(tmp: Path) -> None:
    build_tiny_sdxl(tmp / "tiny-sdxl")
    reference = StableDiffusionXLPipeline.from_pretrained(tmp / "tiny-sdxl")
    pipe = jaxfuse.load_pipeline(tmp / "tiny-sdxl", cache_dir=tmp / "cache", log=lambda _: None)
    noise = np.random.default_rng(0).standard_normal((1, 4, 16, 12)).astype(np.float32)
    request = dict(prompt="a red circle at the top left", negative_prompt="a blue square", guidance_scale=6.0,
                   height=128, width=96, num_inference_steps=8)
    print("\n| sampler | max abs diff of the [0, 1] image vs diffusers |\n|---|---|")
    samplers = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler, "dpmpp-2m": DPMSolverMultistepScheduler}
    for name, cls in samplers.items():
        reference.scheduler = cls.from_config(reference.scheduler.config)
        ref = reference(**request, latents=torch.from_numpy(noise), output_type="np").images
        print(f"| {name} | {relative(pipe(**request, latents=noise, scheduler=name), ref)} |")

    single = pipe(**request, latents=noise)
    print("\n| patches | mode | max abs diff of the [0, 1] image vs one device |\n|---|---|---|")
    for parallel in (ParallelConfig(2, "sync"), ParallelConfig(4, "sync"), ParallelConfig(8, "sync"),
                     ParallelConfig(8, "sync", cfg_parallel=True), ParallelConfig(8, "displaced", warmup_steps=2),
                     ParallelConfig(8, "naive")):
        label = parallel.mode.value + (", cfg-parallel" if parallel.cfg_parallel else "")
        if parallel.mode.value == "displaced":
            label += f", warm-up {parallel.warmup_steps} of 8"
        images = pipe(**request, latents=noise, parallel=parallel)
        print(f"| {parallel.patches} | {label} | {relative(images, single)} |")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        unet_table(Path(tmp))
        pipeline_tables(Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
