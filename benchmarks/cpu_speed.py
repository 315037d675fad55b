"""jaxfuse against diffusers (PyTorch) on this CPU, one device, fp32, the same random weights.

    python benchmarks/cpu_speed.py                 (needs the [test] extra: torch and diffusers)
    python benchmarks/cpu_speed.py --quick         (a small UNet and few repeats: a smoke run)

1. The UNet forward: two SDXL-shaped configs of 128M and 142M parameters (three levels, the first
   without attention, heads of 64, text_time conditioning; channels 96/192/384 and 128/256/384)
   at a 64x64 latent, batch 2: jaxfuse `jit` against diffusers eager under `torch.no_grad`.
2. Attention on CPU: `jax.nn.dot_product_attention` against the einsum path jaxfuse takes on CPU
   (`jaxfuse.models.layers.attention`), at the self-attention shapes of that UNet and of SDXL.
3. The whole pipeline (encode, 20 Euler steps with guidance, decode) on the tiny random SDXL of
   jaxfuse/oracle.py at 128x96: `jaxfuse.load_pipeline` against `StableDiffusionXLPipeline`.

Both run once to warm up (jaxfuse compiles), then in turns; the figure is the median of the
per-turn ratio jaxfuse / diffusers, which a busy machine disturbs less than either time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from diffusers import StableDiffusionXLPipeline  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402

import jaxfuse  # noqa: E402
from jaxfuse.models.layers import attention  # noqa: E402
from jaxfuse.oracle import build_tiny_sdxl, random_unet  # noqa: E402

# SDXL's layout at about 1/20 of its width and depth: 128M parameters.
UNET_128M = dict(
    block_out_channels=(96, 192, 384),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 4),
    attention_head_dim=(3, 3, 6),  # diffusers' name for the number of heads: 64 channels each
    cross_attention_dim=1024,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=1280 + 6 * 256,
    sample_size=64,
)
# A second shape, so that one tuned config cannot hide a gap: wider channels at the first level,
# 128/256/384 with heads of 64 (2/4/6), the config a new user tried first (issue 19).
UNET_WIDE = dict(UNET_128M, block_out_channels=(128, 256, 384), attention_head_dim=(2, 4, 6))
# The smoke run's UNet: same layout, a fraction of the width.
UNET_SMALL = dict(UNET_128M, block_out_channels=(32, 64, 64), attention_head_dim=(1, 1, 1), cross_attention_dim=64,
                  addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)


def turns(runs: dict[str, Callable[[], object]], repeats: int) -> dict:
    """Warm up the two `runs`, then time them in turns: the median seconds of each (key
    "<name>_s") and the median ratio first / second."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(*times.values())]
    return {**{f"{name}_s": statistics.median(t) for name, t in times.items()},
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def unet_speed(tmp: Path, config: dict, latent: int, repeats: int) -> dict:
    model = random_unet(config)
    model.save_pretrained(tmp / "unet")
    unet, params = jaxfuse.load_unet(tmp / "unet")
    rng = np.random.default_rng(0)
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    inputs = dict(sample=rng.standard_normal((2, 4, latent, latent), np.float32),
                  timesteps=np.float32([500, 500]),
                  encoder_hidden_states=rng.standard_normal((2, 77, config["cross_attention_dim"]), np.float32),
                  text_embeds=rng.standard_normal((2, pooled), np.float32),
                  time_ids=np.tile(np.float32([1024, 1024, 0, 0, 1024, 1024]), (2, 1)))
    forward = jax.jit(unet.apply)
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}

    def ours():
        return jax.block_until_ready(forward({"params": params}, **inputs))

    def theirs():
        with torch.no_grad():
            return model(t["sample"], t["timesteps"], encoder_hidden_states=t["encoder_hidden_states"],
                         added_cond_kwargs={"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]}).sample

    result = turns({"jaxfuse": ours, "diffusers": theirs}, repeats)
    ref = theirs().numpy()
    result["max_rel_diff"] = float(np.abs(np.asarray(ours()) - ref).max() / np.abs(ref).max())
    result["parameters"] = sum(p.numel() for p in model.parameters())
    return result


def attention_speed(shapes: list[tuple[int, int]], repeats: int) -> list[dict]:
    """(tokens, heads of 64) self-attention at batch 2: seconds of each path and their ratio."""
    rows = []
    for tokens, heads in shapes:
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((2, tokens, heads * 64), np.float32) for _ in range(3))
        fused = jax.jit(lambda q, k, v, n=heads: jax.nn.dot_product_attention(
            *(x.reshape(2, -1, n, 64) for x in (q, k, v))).reshape(q.shape))
        ours = jax.jit(lambda q, k, v, n=heads: attention(q, k, v, n))
        result = turns({"einsum": lambda: jax.block_until_ready(ours(q, k, v)),
                        "fused": lambda: jax.block_until_ready(fused(q, k, v))}, repeats)
        rows.append(dict(result, tokens=tokens, heads=heads))
    return rows


def pipeline_speed(tmp: Path, steps: int, repeats: int) -> dict:
    build_tiny_sdxl(tmp / "tiny-sdxl")
    reference = StableDiffusionXLPipeline.from_pretrained(tmp / "tiny-sdxl")
    reference.set_progress_bar_config(disable=True)
    pipe = jaxfuse.load_pipeline(tmp / "tiny-sdxl", cache_dir=tmp / "cache", log=lambda _: None)
    noise = np.random.default_rng(0).standard_normal((1, 4, 16, 12)).astype(np.float32)
    request = dict(prompt="a red circle at the top left", negative_prompt="a blue square", guidance_scale=6.0,
                   height=128, width=96, num_inference_steps=steps)
    phases = []

    def ours():
        generation = pipe.generate(**request, latents=noise)
        phases.append(generation.timings)
        return generation.images

    def theirs():
        return reference(**request, latents=torch.from_numpy(noise), output_type="np").images

    result = turns({"jaxfuse": ours, "diffusers": theirs}, repeats)
    result["max_abs_diff"] = float(np.abs(ours() - theirs()).max())
    result["jaxfuse_phases_s"] = {k: statistics.median(p[k] for p in phases[1:]) for k in phases[0]}
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="a small UNet at a 16x16 latent, 2 repeats, 4 steps")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    diffusers_logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    repeats = 2 if args.quick else args.repeats
    configs = {"small": UNET_SMALL} if args.quick else {"128m": UNET_128M, "wide": UNET_WIDE}
    with tempfile.TemporaryDirectory() as tmp:
        unets = {name: unet_speed(Path(tmp) / name, config, 16 if args.quick else 64, repeats)
                 for name, config in configs.items()}
        shapes = [(256, 1)] if args.quick else [(1024, 3), (256, 6), (1024, 20)]
        attn = attention_speed(shapes, repeats)
        pipeline = pipeline_speed(Path(tmp), 4 if args.quick else 20, repeats)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__} "
          f"({jax.devices()[0].device_kind}), fp32, median of {repeats} turns\n")
    print("| workload | jaxfuse s | diffusers s | jaxfuse / diffusers (min-max) | max diff |\n|---|---|---|---|---|")
    for name, unet in unets.items():
        channels = "/".join(map(str, configs[name]["block_out_channels"]))
        print(f"| UNet forward, {unet['parameters'] / 1e6:.0f}M parameters ({channels}), batch 2 "
              f"| {unet['jaxfuse_s']:.3f} | {unet['diffusers_s']:.3f} "
              f"| {unet['ratio']:.2f} ({unet['ratio_min']:.2f}-{unet['ratio_max']:.2f}) "
              f"| {unet['max_rel_diff']:.1e} of max |")
    print(f"| tiny pipeline, {4 if args.quick else 20} steps | {pipeline['jaxfuse_s']:.3f} "
          f"| {pipeline['diffusers_s']:.3f} | {pipeline['ratio']:.2f} "
          f"({pipeline['ratio_min']:.2f}-{pipeline['ratio_max']:.2f}) | {pipeline['max_abs_diff']:.1e} |")
    print("\n| self-attention, batch 2 | einsum path s | jax.nn.dot_product_attention s | ratio |\n|---|---|---|---|")
    for row in attn:
        print(f"| {row['tokens']} tokens, {row['heads']} heads of 64 | {row['einsum_s'] * 1e3:.1f} ms "
              f"| {row['fused_s'] * 1e3:.1f} ms | {row['ratio']:.2f} |")
    print("\njaxfuse pipeline phases (s): " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                         pipeline["jaxfuse_phases_s"].items()))
    if args.json:
        args.json.write_text(json.dumps({"unet": unets, "attention": attn, "pipeline": pipeline}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
