"""Per-device cost of ControlNets in one denoising step: FLOPs, bytes received and memory of a step
with 0, 1 and 2 SDXL ControlNets beside the UNet, alone and over patch-parallel devices, and the
ratios with / without (the ControlNets' added share).

    python benchmarks/controlnet_cost.py --sizes 1024 --json benchmarks/controlnet_cost.json  # sync, displaced
    python benchmarks/controlnet_cost.py --sizes 1024 2048 --controlnets 0 1 2 --json benchmarks/controlnet_cost.json
    python benchmarks/controlnet_cost.py --preset tiny --sizes 256 --devices 1 2 --json /tmp/cn.json  # 2 min

SDXL-base shapes with abstract bf16 parameters (no weights), guidance batch 2 (no cfg split),
compiled for an emulated CPU mesh of 8 devices; every figure is read from the compiled program
(`jaxfuse.analysis.cost.step_cost` with `controlnets=`). The ControlNet is SDXL's full-size one,
`ControlNetConfig(unet=UNetConfig.sdxl_base())`, the architecture of diffusers/controlnet-canny-
sdxl-1.0 (the UNet's down path and middle block, 1.25B parameters); each reads a control image of
the image's size, split by rows as the latents, and exchanges its own context as the UNet does
(stale in displaced steps, which keep it as part of the state). Displaced steps are steps after
the warm-up, as in parallel_cost.py.

Memory: parameters and stale context are exact (per device; the ControlNets' share in its own
column); peak is the CPU compiler's buffer assignment (see parallel_cost.py: it includes float32
copies of the weights it reads). Each row compiles one program (40 to 150 s for SDXL with
ControlNets on 2 shared cores); with `--json` finished rows are kept in the file and skipped when
the run is started again.
"""

from __future__ import annotations

import sys
import time

from parallel_cost import cost_parser, measured_rows, parsed

MODES = ("sync", "displaced", "pcpp")


def rows_wanted(args) -> list[dict]:
    """Every layout without ControlNets first, then with one, then two: a run stopped early has the
    comparisons it has measured."""
    rows = []
    for size in args.sizes:
        for count in args.controlnets:
            for n in args.devices:
                for mode in ["single"] if n == 1 else args.modes:
                    rows.append(dict(size=size, devices=n, mode=mode, controlnets=count))
    return [dict(row, preset=args.preset, dtype=args.dtype, cfg_parallel=False) for row in rows]


def key(row: dict) -> tuple:
    return tuple(row.get(k) for k in ("preset", "dtype", "size", "devices", "mode", "cfg_parallel", "controlnets"))


def measure(row: dict) -> dict:
    import jax.numpy as jnp

    from jaxfuse.analysis.cost import step_cost
    from jaxfuse.config import ControlNetConfig, UNetConfig
    from jaxfuse.parallel_config import ParallelConfig

    cfg, net = {"sdxl-base": (UNetConfig.sdxl_base(), ControlNetConfig(UNetConfig.sdxl_base())),
                "tiny": (UNetConfig.tiny(), ControlNetConfig.tiny())}[row["preset"]]
    parallel = ParallelConfig(row["devices"], row["mode"], cfg_parallel=row["cfg_parallel"])
    start = time.perf_counter()
    cost = step_cost(cfg, parallel, row["size"], row["size"], jnp.dtype(row["dtype"]),
                     controlnets=(net,) * row["controlnets"])
    return dict(row, **cost.as_dict(), compile_seconds=round(time.perf_counter() - start, 1))


def ratio(value: float, base: dict | None, field: str) -> str:
    return f"{value / base[field]:.3f}" if base and base[field] else "-"


def table(rows: list[dict]) -> str:
    """One markdown table per image size: each layout with 0, 1, 2 ControlNets, against the same
    layout without."""
    mb, gb = 1e6, 1e9
    out = []
    for size in sorted({r["size"] for r in rows}):
        at = [r for r in rows if r["size"] == size]
        by = {(r["devices"], r["mode"], r["controlnets"]): r for r in at}
        out += [f"\n{at[0]['preset']} {size}x{size}, guidance batch 2, {at[0]['dtype']}, per device and step "
                "(/ without: against the same layout with no ControlNet):\n",
                "| devices | mode | ControlNets | TFLOP | / without | received MB | / without | params GB "
                "| ControlNets' params GB | stale GB | ControlNets' stale GB | peak GB | / without | compile s |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        order = ("single",) + MODES
        for r in sorted(at, key=lambda r: (r["devices"], order.index(r["mode"]), r["controlnets"])):
            base = by.get((r["devices"], r["mode"], 0))
            out.append(
                f"| {r['devices']} | {r['mode']} | {r['controlnets']} | {r['flops'] / 1e12:.3f} "
                f"| {ratio(r['flops'], base, 'flops')} | {r['received_bytes'] / mb:.1f} "
                f"| {ratio(r['received_bytes'], base, 'received_bytes')} | {r['params_bytes'] / gb:.2f} "
                f"| {r['control_params_bytes'] / gb:.2f} | {r['stale_bytes'] / gb:.3f} "
                f"| {r['control_stale_bytes'] / gb:.3f} | {r['peak_bytes'] / gb:.2f} "
                f"| {ratio(r['peak_bytes'], base, 'peak_bytes')} | {r['compile_seconds']:.0f} |")
    return "\n".join(out)


def main() -> int:
    p = cost_parser(__doc__, [1024], MODES, ["sync", "displaced"])
    p.add_argument("--controlnets", type=int, nargs="+", default=[0, 1], help="ControlNets beside the UNet")
    args = parsed(p)
    print(table(measured_rows(rows_wanted(args), key, measure, args.json)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
