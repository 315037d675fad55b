"""Per-device cost of one denoising step of patch parallelism: FLOPs, bytes received, memory.

    python benchmarks/parallel_cost.py --json benchmarks/parallel_cost.json
    python benchmarks/parallel_cost.py --preset tiny --sizes 256 --devices 1 2 4   # seconds
    python benchmarks/parallel_cost.py --sizes 1024 --devices 1 4 8 --modes displaced pcpp --json ...

SDXL-base shapes with abstract bf16 parameters (no weights), guidance batch 2, compiled for an
emulated CPU mesh of 8 devices; every figure is read from the compiled program
(`jaxfuse.analysis.cost`). Each row compiles one program (about 40 s for SDXL on 2 cores); with
`--json` finished rows are kept in the file and skipped when the run is started again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

MODES = ("sync", "displaced", "pcpp", "naive")
CONTEXTS = (0.1, 0.3, 0.5, 1.0)  # pcpp's p, one row each
# DistriFusion's communication per step on 8 GPUs (REFERENCES.md), by image size.
DISTRIFUSION_GB = {1024: 0.42, 3840: 5.38}


def rows_wanted(args) -> list[dict]:
    rows = []
    for size in args.sizes:
        rows.append(dict(size=size, devices=1, mode="single", cfg_parallel=False))
        for n in (n for n in args.devices if n > 1):
            for mode in args.modes:
                for context in (args.contexts if mode == "pcpp" else [None]):
                    # pcpp without the cfg split: with it, 4 devices hold 2 patches, neither of
                    # them interior, and the count (`hlo.collective_bytes`) is an interior patch's.
                    for cfg_parallel in (False,) if mode == "pcpp" else (False, True):
                        rows.append(dict(size=size, devices=n, mode=mode, context=context, cfg_parallel=cfg_parallel))
    return [dict(row, preset=args.preset, dtype=args.dtype) for row in rows]


def key(row: dict) -> tuple:
    return tuple(row.get(k) for k in ("preset", "dtype", "size", "devices", "mode", "context", "cfg_parallel"))


def measure(row: dict) -> dict:
    import jax.numpy as jnp

    from jaxfuse.analysis.cost import step_cost
    from jaxfuse.config import UNetConfig
    from jaxfuse.parallel_config import ParallelConfig

    cfg = {"sdxl-base": UNetConfig.sdxl_base, "tiny": UNetConfig.tiny}[row["preset"]]()
    context = {} if row.get("context") is None else {"context": row["context"]}
    parallel = ParallelConfig(row["devices"], row["mode"], cfg_parallel=row["cfg_parallel"], **context)
    start = time.perf_counter()
    cost = step_cost(cfg, parallel, row["size"], row["size"], jnp.dtype(row["dtype"]))
    return dict(row, **cost.as_dict(), compile_seconds=round(time.perf_counter() - start, 1))


def table(rows: list[dict]) -> str:
    """One markdown table per image size; FLOPs against the single-device program / N, bytes
    received against displaced mode's on as many devices."""
    mb, gb = 1e6, 1e9
    out = []
    for size in sorted({r["size"] for r in rows}):
        at = [r for r in rows if r["size"] == size]
        single = next((r for r in at if r["mode"] == "single"), None)
        out += [f"\n{at[0]['preset']} {size}x{size}, guidance batch 2, {at[0]['dtype']}, per device and step:\n",
                "| N | mode | cfg split | GFLOP | / (single / N) | all-gather MB | permute MB | all-reduce MB "
                "| received MB | / displaced | params GB | stale GB | temporaries GB | peak GB |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        displaced = {(r["devices"], r["cfg_parallel"]): r for r in at if r["mode"] == "displaced"}
        for r in sorted(at, key=lambda r: (r["devices"], MODES.index(r["mode"]) if r["mode"] in MODES else -1,
                                           r.get("context") or 0, r["cfg_parallel"])):
            ideal = f"{r['flops'] / (single['flops'] / r['devices']):.3f}" if single else "-"
            base = displaced.get((r["devices"], r["cfg_parallel"]))
            vs_displaced = f"{r['received_bytes'] / base['received_bytes']:.2f}" if base else "-"
            mode = r["mode"] if r.get("context") is None else f"{r['mode']} p={r['context']:g}"
            got = r["received"]
            out.append(
                f"| {r['devices']} | {mode} | {'yes' if r['cfg_parallel'] else 'no'} | {r['flops'] / 1e9:.1f} "
                f"| {ideal} | {got.get('all-gather', 0) / mb:.1f} | {got.get('collective-permute', 0) / mb:.2f} "
                f"| {got.get('all-reduce', 0) / mb:.2f} | {r['received_bytes'] / mb:.1f} | {vs_displaced} "
                f"| {r['params_bytes'] / gb:.2f} | {r['stale_bytes'] / gb:.3f} | {r['temp_bytes'] / gb:.2f} "
                f"| {r['peak_bytes'] / gb:.2f} |")
        if size in DISTRIFUSION_GB and at[0]["preset"] == "sdxl-base":
            out.append(f"\nDistriFusion, 8 GPUs, {size}x{size}: {DISTRIFUSION_GB[size] * 1e3:.0f} MB per step "
                       "(REFERENCES.md).")
    return "\n".join(out)


def measured_rows(wanted: list[dict], key, measure, path: Path | None) -> list[dict]:
    """The rows `wanted`, each `measure(row)`; with `path`, the rows that json file holds are kept and
    skipped, and each new one is written to it as it finishes (a stopped run resumes)."""
    done = json.loads(path.read_text()) if path and path.is_file() else []
    have = {key(r) for r in done}
    for row in wanted:
        if key(row) in have:
            continue
        done.append(measure(row))
        print(f"measured {key(row)} in {done[-1]['compile_seconds']} s", file=sys.stderr, flush=True)
        if path:
            path.write_text(json.dumps(done, indent=1))
    keys = {key(r) for r in wanted}
    return [r for r in done if key(r) in keys]


def cost_parser(doc: str, sizes: list[int], modes: tuple[str, ...],
                default_modes: list[str]) -> argparse.ArgumentParser:
    """The flags every per-device cost table takes (this one, controlnet_cost.py, deepcache_cost.py):
    the model preset, the sizes, device counts and modes measured, the dtype, the JSON kept."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--preset", choices=["sdxl-base", "tiny"], default="sdxl-base")
    p.add_argument("--sizes", type=int, nargs="+", default=sizes, help="image sides in pixels")
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--modes", nargs="+", choices=modes, default=default_modes)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--json", type=Path, help="keep the rows in this file (finished rows are skipped)")
    return p


def parsed(p: argparse.ArgumentParser) -> argparse.Namespace:
    """The flags, with as many CPU devices emulated as the largest --devices (before JAX starts)."""
    args = p.parse_args()
    os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "
                               f"--xla_force_host_platform_device_count={max(args.devices)}")
    return args


def main() -> int:
    p = cost_parser(__doc__, [1024, 2048, 3840], MODES, list(MODES))
    p.add_argument("--contexts", type=float, nargs="+", default=list(CONTEXTS), help="pcpp's p values")
    args = parsed(p)
    print(table(measured_rows(rows_wanted(args), key, measure, args.json)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
