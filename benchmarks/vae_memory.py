"""Peak device memory of the SDXL VAE decode, untiled against tiled (`jaxfuse.models.vae_tiled`).

    python benchmarks/vae_memory.py                                # 1024² to 8192², float32, tile 64
    python benchmarks/vae_memory.py --sizes 1024 2048 --tile 32 --dtype bfloat16

SDXL's VAE with abstract parameters (no weights), one image, compiled for the CPU; every figure is
read from compiled programs (`memory_analysis`), nothing runs. SDXL's VAE runs in float32
(`force_upcast`), the default here.

    untiled            the jitted `AutoencoderKL.decode`: arguments + outputs + temporaries - aliased.
                       On CPU its mid-block attention stores the logits of every token pair.
    untiled, no attn   the same decoder without its mid-block attention: what an untiled decode
                       needs apart from the attention, the floor where a fused attention kernel
                       (cuDNN on GPU) stores no logits.
    tiled              the decoder's parameters on the device, plus the largest stage: its shared
                       arguments (statistics, the attention's keys and values), two rounds of tile
                       inputs and outputs (one computing, one on its way) and its temporaries.
    tiled, no attn     the same without the attention's two stages: the part bounded by the tile.
    host               the whole activations the host holds at once (a stage's inputs and output).

The tile programs do not depend on the image size (but for the attention's keys), so each is
compiled once for all sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time


@dataclasses.dataclass(frozen=True)
class Memory:
    """One compiled program's bytes."""

    arguments: int
    outputs: int
    temporaries: int
    aliased: int

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs + self.temporaries - self.aliased


def compiled_memory(jitted, *args) -> Memory:
    m = jitted.lower(*args).compile().memory_analysis()
    return Memory(m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes, m.alias_size_in_bytes)


def untiled_peak(cfg, dtype, size: int) -> int:
    import jax

    from jaxfuse.models.vae import AutoencoderKL, abstract_params

    vae = AutoencoderKL(cfg, dtype)
    latents = jax.ShapeDtypeStruct((1, cfg.latent_channels, size // 8, size // 8), dtype)
    decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=AutoencoderKL.decode))
    return compiled_memory(decode, abstract_params(cfg, dtype), latents).peak


ATTENTION_STAGES = ("keys_values", "attend")


def tiled_peak(cfg, dtype, size: int, tile: int, cache: dict) -> dict:
    """The tiled decode's device peak (all stages, and all but the attention's), the stage that
    sets it and the host's peak; `cache` keeps each stage's compiled memory."""
    import jax

    from jaxfuse.models.tile_stages import nbytes
    from jaxfuse.models.vae import AutoencoderKL, abstract_params
    from jaxfuse.models.vae_tiled import plan_decode

    vae = AutoencoderKL(cfg, dtype)
    params = abstract_params(cfg, dtype)
    latents = jax.ShapeDtypeStruct((1, cfg.latent_channels, size // 8, size // 8), dtype)
    needs = []
    for stage in plan_decode(vae, params, latents, tile):
        key = (id(stage.program), str(jax.tree.map(lambda a: (a.shape, a.dtype), stage.args)))
        if key not in cache:
            cache[key] = compiled_memory(stage.program, *stage.args)
        memory = cache[key]
        stage_params, stats, shared, *_ = stage.args
        per_round = memory.arguments - nbytes([stage_params, stats, shared]) + memory.outputs
        needs.append((nbytes([stats, shared]) + 2 * per_round + memory.temporaries, stage))
    resident = nbytes(params["decoder"])
    worst, stage = max(needs, key=lambda need: need[0])
    others = max(need for need, s in needs if s.name not in ATTENTION_STAGES)
    return dict(peak=resident + worst, stage=stage.name, no_attention=resident + others,
                host=max(s.host_bytes for _, s in needs))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="image sides in pixels")
    p.add_argument("--tile", type=int, default=64, help="tile side in latent pixels (64: 512 image pixels)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = p.parse_args()

    import dataclasses as dc

    import jax.numpy as jnp

    from jaxfuse.config import VAEConfig

    cfg, dtype, gb = VAEConfig.sdxl(), jnp.dtype(args.dtype), 1e9
    no_attention = dc.replace(cfg, mid_block_add_attention=False)
    cache: dict = {}
    print(f"SDXL VAE decode, one image, {args.dtype}, tiles of {args.tile} latent ({8 * args.tile} image) pixels; "
          "peak device memory in GB from compiled CPU programs:\n")
    print("| image | untiled | untiled, no attn | tiled | tiled, no attn | tiled / untiled | largest tiled stage "
          "| host GB | compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        start = time.perf_counter()
        untiled = untiled_peak(cfg, dtype, size)
        floor = untiled_peak(no_attention, dtype, size)
        tiled = tiled_peak(cfg, dtype, size, args.tile, cache)
        print(f"| {size}² | {untiled / gb:.1f} | {floor / gb:.2f} | {tiled['peak'] / gb:.2f} "
              f"| {tiled['no_attention'] / gb:.2f} | {tiled['peak'] / untiled:.2g} | {tiled['stage']} "
              f"| {tiled['host'] / gb:.1f} | {time.perf_counter() - start:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
