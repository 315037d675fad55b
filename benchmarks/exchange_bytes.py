"""Bytes each device receives per denoising step, counted from the compiled program's HLO.

    python benchmarks/exchange_bytes.py --preset sdxl-base --size 1024 --devices 8 --mode displaced

Abstract parameters (no weights, little memory): the UNet step of one patch-parallel mode is
compiled for an emulated CPU mesh and its collectives are summed by kind (see
`jaxfuse.parallel.hlo`). Batch 2 (classifier-free guidance), bfloat16 by default.
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=["sdxl-base", "sdxl-refiner", "tiny"], default="sdxl-base")
    p.add_argument("--size", type=int, default=1024, help="image height and width in pixels")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--mode", choices=["sync", "displaced", "naive"], default="displaced")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = p.parse_args()
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"

    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from jaxfuse.config import UNetConfig
    from jaxfuse.models.unet import UNet2DConditionModel, abstract_params
    from jaxfuse.parallel.hlo import collective_bytes
    from jaxfuse.parallel.mesh import ROWS, ParallelConfig, make_mesh
    from jaxfuse.parallel.patch import PATCH, STALE, Mode, Patch

    cfg = {"sdxl-base": UNetConfig.sdxl_base, "sdxl-refiner": UNetConfig.sdxl_refiner, "tiny": UNetConfig.tiny}[
        args.preset]()
    dtype = jnp.dtype(args.dtype)
    unet = UNet2DConditionModel(cfg, dtype)
    params = abstract_params(cfg, dtype)
    latent = args.size // 8
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    sample = jax.ShapeDtypeStruct((2, cfg.in_channels, latent, latent), dtype)
    rest = dict(timesteps=jnp.float32(500), encoder_hidden_states=jnp.zeros((2, 77, cfg.cross_attention_dim), dtype),
                text_embeds=jnp.zeros((2, pooled), dtype), time_ids=jnp.zeros((2, 6), jnp.float32))
    mesh = make_mesh(ParallelConfig(args.devices, Mode.SYNC))
    mode = Mode(args.mode)

    def step(params, sample, stale=None):
        variables = {"params": params} if stale is None else {"params": params, STALE: stale}
        patch = Patch(mode)
        out = unet.clone(patch=patch).apply(variables, sample, mutable=[STALE] if patch.writes_stale else False,
                                            **rest)
        return (out[0], out[1][STALE]) if patch.writes_stale else out  # kept: what the next step reads

    args_ = [params, sample]
    in_specs = [P(), ROWS]
    if mode == Mode.DISPLACED:  # the stale context a displaced step reads, stacked over the patches
        def record(params, sample):
            return unet.clone(patch=Patch(Mode.SYNC, record=True)).apply(
                {"params": params}, sample, mutable=[STALE], **rest)[1][STALE]
        args_.append(jax.eval_shape(jax.shard_map(record, mesh=mesh, in_specs=(P(), ROWS), out_specs=P(PATCH)),
                                    params, sample))
        in_specs.append(P(PATCH))
    out_specs = (ROWS, P(PATCH)) if mode == Mode.DISPLACED else ROWS
    fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=tuple(in_specs), out_specs=out_specs))
    received = collective_bytes(fn.lower(*args_).compile().as_text())
    print(f"{args.preset} {args.size}x{args.size} batch 2 {args.dtype}, {args.devices} patches, {args.mode}: "
          "bytes received per device per step")
    for kind, size in sorted(received.items()):
        print(f"  {kind:20s} {size / 1e6:10.2f} MB")
    print(f"  {'total':20s} {sum(received.values()) / 1e6:10.2f} MB")
    if dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
        print("  (compiled for CPU, which widens bf16 collectives to f32: a GPU or TPU moves half of this)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
