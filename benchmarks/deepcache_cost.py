"""Per-device cost of DeepCache's steps (`jaxfuse.step_cache`): FLOPs, bytes received and peak
memory of a full and of a shallow step, alone and over patch-parallel devices, and what a run
averages with one full step in every N.

    python benchmarks/deepcache_cost.py --sizes 1024 2048 --json benchmarks/deepcache_cost.json  # sync, displaced
    python benchmarks/deepcache_cost.py --sizes 1024 --devices 2 4 8 --modes pcpp --json benchmarks/deepcache_cost.json
    python benchmarks/deepcache_cost.py --preset tiny --sizes 256 --devices 1 2 --json /tmp/dc.json  # 2 min

SDXL-base shapes with abstract bf16 parameters (no weights), guidance batch 2 (no cfg split),
compiled for an emulated CPU mesh of 8 devices; every figure is read from the compiled program
(`jaxfuse.analysis.cost.step_cost`, with a `CacheStep`). Per (size, devices, mode), five programs:
the uncached step, and the full and the shallow step at each branch (`--branches`, default 0 and
3). Displaced and pcpp (p = 0.3) steps are steps after the warm-up, as in parallel_cost.py; their state is
the stale context and the kept features, as the run's first (full, synchronous) step writes it.

Branch 3 is the deepest at which N = 3 meets the aim of 0.45 of the uncached FLOPs, by the
products' FLOPs counted from the single-device jaxpr at 1024² (a shallow step's share: branch 0
0.015, 1 0.038, 2 0.066, 3 0.129, 4 0.214, 5 0.306, ..., 8 0.882; N = 3 averages 0.343, ..., 0.419
at 3, 0.476 at 4); a deeper branch keeps more layers fresh on every step, which DeepCache's
paper finds better for the image.

A run's average per step with the uniform schedule of interval N (every N-th step full, warm-up
steps left out): (full + (N - 1) shallow) / N, against the uncached step of the same layout.
Memory: the kept features are exact (B' x C x h x w x dtype at the branch, this device's rows);
peak is the CPU compiler's buffer assignment (see parallel_cost.py: it includes float32 copies of
the weights it reads). `jax.jit` drops arguments a program does not read, so a shallow program's
peak leaves out the deep layers' weights, which a run holds anyway: a run's peak is its full
step's. Each row compiles one program (20 to 90 s for a full SDXL step on 2 shared cores, 5 to
25 s for a shallow one; 35 programs per size in 9 to 18 min); with `--json` finished rows are kept
in the file and skipped when the run is started again.
"""

from __future__ import annotations

import sys
import time

from parallel_cost import cost_parser, measured_rows, parsed

MODES = ("sync", "displaced", "pcpp")
STEPS = ("uncached", "full", "shallow")
INTERVALS = (2, 3, 5)
AIM = 0.45  # the aim: at N = 3, FLOPs and bytes per step at most this share of the uncached run


def rows_wanted(args) -> list[dict]:
    rows = []
    for size in args.sizes:
        for n in args.devices:
            for mode in ["single"] if n == 1 else args.modes:
                rows.append(dict(size=size, devices=n, mode=mode, branch=None, full=None))
                for branch in args.branches:
                    for full in (True, False):
                        rows.append(dict(size=size, devices=n, mode=mode, branch=branch, full=full))
    return [dict(row, preset=args.preset, dtype=args.dtype, cfg_parallel=False) for row in rows]


def key(row: dict) -> tuple:
    return tuple(row.get(k) for k in ("preset", "dtype", "size", "devices", "mode", "cfg_parallel", "branch", "full"))


def measure(row: dict) -> dict:
    import jax.numpy as jnp

    from jaxfuse.analysis.cost import step_cost
    from jaxfuse.config import UNetConfig
    from jaxfuse.parallel_config import ParallelConfig
    from jaxfuse.step_cache import CacheStep

    cfg = {"sdxl-base": UNetConfig.sdxl_base, "tiny": UNetConfig.tiny}[row["preset"]]()
    parallel = ParallelConfig(row["devices"], row["mode"], cfg_parallel=row["cfg_parallel"])
    cache = None if row["branch"] is None else CacheStep(row["branch"], row["full"])
    start = time.perf_counter()
    cost = step_cost(cfg, parallel, row["size"], row["size"], jnp.dtype(row["dtype"]), cache=cache)
    return dict(row, **cost.as_dict(), compile_seconds=round(time.perf_counter() - start, 1))


def step_name(row: dict) -> str:
    return "uncached" if row["branch"] is None else f"{'full' if row['full'] else 'shallow'} b{row['branch']}"


def ratio(value: float, base: float) -> str:
    return f"{value / base:.3f}" if base else "-"


def averages(full: dict, shallow: dict, uncached: dict, interval: int) -> tuple[float, float | None]:
    """(FLOPs, bytes received) per step of a run with one full step in every `interval`, as shares
    of the uncached step's (bytes: None where the uncached step receives none)."""
    def mean(field):
        return (full[field] + (interval - 1) * shallow[field]) / interval

    flops = mean("flops") / uncached["flops"]
    received = mean("received_bytes") / uncached["received_bytes"] if uncached["received_bytes"] else None
    return flops, received


def tables(rows: list[dict], intervals: tuple[int, ...]) -> str:
    """Per image size: every program's figures, then a run's averages by branch and interval."""
    mb, gb = 1e6, 1e9
    out = []
    for size in sorted({r["size"] for r in rows}):
        at = [r for r in rows if r["size"] == size]
        layouts = sorted({(r["devices"], r["mode"]) for r in at},
                         key=lambda layout: (layout[0], (("single",) + MODES).index(layout[1])))
        by = {(r["devices"], r["mode"], r["branch"], r["full"]): r for r in at}
        out += [f"\n{at[0]['preset']} {size}x{size}, guidance batch 2, {at[0]['dtype']}, per device and step:\n",
                "| devices | mode | step | GFLOP | / uncached | received MB | / uncached | kept features MB "
                "| stale GB | peak GB |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for n, mode in layouts:
            uncached = by.get((n, mode, None, None))
            for r in sorted((r for r in at if (r["devices"], r["mode"]) == (n, mode)),
                            key=lambda r: (r["branch"] is not None, r["branch"] or 0, not r["full"])):
                out.append(
                    f"| {n} | {mode} | {step_name(r)} | {r['flops'] / 1e9:.1f} "
                    f"| {ratio(r['flops'], uncached['flops']) if uncached else '-'} "
                    f"| {r['received_bytes'] / mb:.1f} "
                    f"| {ratio(r['received_bytes'], uncached['received_bytes']) if uncached else '-'} "
                    f"| {r.get('deep_bytes', 0) / mb:.2f} | {r['stale_bytes'] / gb:.3f} | {r['peak_bytes'] / gb:.2f} |")

        heads = " | ".join(f"FLOPs N={i}" for i in intervals) + " | " + " | ".join(f"bytes N={i}" for i in intervals)
        out += [f"\nA run's average per step against the uncached step, {size}x{size} (one full step in every N, "
                f"uniform schedule; meets: N = 3 at most {AIM} of the uncached FLOPs and bytes):\n",
                f"| devices | mode | branch | kept features MB | full - uncached peak MB | {heads} | N=3 meets |",
                "|---|---|---|---|---|" + "---|" * (2 * len(intervals)) + "---|"]
        for n, mode in layouts:
            uncached = by.get((n, mode, None, None))
            for branch in sorted({r["branch"] for r in at if r["branch"] is not None}):
                full, shallow = by.get((n, mode, branch, True)), by.get((n, mode, branch, False))
                if not (uncached and full and shallow):
                    continue
                got = {i: averages(full, shallow, uncached, i) for i in intervals}
                flops = " | ".join(f"{got[i][0]:.3f}" for i in intervals)
                received = " | ".join("-" if got[i][1] is None else f"{got[i][1]:.3f}" for i in intervals)
                at3 = averages(full, shallow, uncached, 3)
                meets = at3[0] <= AIM and (at3[1] is None or at3[1] <= AIM)
                out.append(f"| {n} | {mode} | {branch} | {full['deep_bytes'] / mb:.2f} "
                           f"| {(full['peak_bytes'] - uncached['peak_bytes']) / mb:+.1f} | {flops} | {received} "
                           f"| {'yes' if meets else 'no'} |")
    return "\n".join(out)


def main() -> int:
    p = cost_parser(__doc__, [1024, 2048], MODES, ["sync", "displaced"])
    p.add_argument("--branches", type=int, nargs="+", default=[0, 3], help="DeepCache branches (SDXL: 0..8)")
    p.add_argument("--intervals", type=int, nargs="+", default=list(INTERVALS), help="N: one full step in every N")
    args = parsed(p)
    print(tables(measured_rows(rows_wanted(args), key, measure, args.json), tuple(args.intervals)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
