"""Projected SDXL latency and speed-up on 2, 4 and 8 accelerators, from measured per-device cost.

    python benchmarks/projection.py --costs benchmarks/parallel_cost.json --plot benchmarks/projection.png

Measured (by benchmarks/parallel_cost.py, from the compiled programs): each device's FLOPs and
bytes received per UNet step. Stated, not measured here: each accelerator's peak bf16 rate and
link bandwidth (vendor figures, `ACCELERATORS`). The fraction of peak a UNet step achieves, used
for every accelerator and size, comes from the first of:

- `--fraction-of-peak`;
- a GPU run's report (`--measured`, by default benchmarks/gpu_results/gpu.json when it exists,
  written by benchmarks/gpu.py): the UNet forward's achieved FLOP/s over the measured peak of a
  large matmul on that device; its patch rows also give each (size, N)'s efficiency, the single
  device's time / N over one patch's time, which divides that layout's rate;
- otherwise a calibration on DistriFusion's measured single-A100 latency at 1024² (50 steps in
  5.02 s, REFERENCES.md), with every patch efficiency 1.

The output's first line says which. The model:

    compute = FLOPs / (peak x fraction x efficiency)   communication = bytes received / bandwidth
    sync step = compute + communication           displaced step = max(compute, communication)
    latency = warm-up x sync step + (steps - warm-up) x displaced step     (UNet steps only)

pcpp steps are projected as displaced ones, with their own FLOPs and bytes; its warm-up steps are
sync steps (the sync row of as many devices).

It leaves out what a real run adds (kernel launches, small-kernel inefficiency at small patches,
the text encoders and the VAE), so it is an upper bound on the speed-up; DistriFusion's measured
curve is drawn beside it.

With `--deepcache` (rows of benchmarks/deepcache_cost.py) a second table projects DeepCache over
the same layouts: each of the 50 steps is full (every N-th, from step 0: the uniform schedule) or
shallow, with its own program's measured FLOPs and bytes, and the same step model (displaced and
pcpp: warm-up steps synchronous, full or shallow as the schedule says). Beside it, the published
figures: DeepCache's SDXL latency (one GPU, REFERENCES.md) and DistriFusion's (A100s).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# name -> (peak dense bf16 FLOP/s, bytes/s a device receives over its links), vendor figures.
ACCELERATORS = {
    "A100 NVLink3": (312e12, 300e9),  # 600 GB/s NVLink, both directions together
    "H100 NVLink4": (989e12, 450e9),  # 900 GB/s NVLink, both directions together
    "H200 NVLink4": (989e12, 450e9),  # H100's compute and links, more and faster memory
    "TPU v5e": (197e12, 200e9),  # 1,600 Gbps inter-chip interconnect per chip
    "TPU v5p": (459e12, 600e9),  # 4,800 Gbps inter-chip interconnect per chip
}
# DistriFusion on A100s (REFERENCES.md): measured latency in seconds, 50 DDIM steps, by size and N.
DISTRIFUSION_S = {
    1024: {1: 5.02, 2: 3.35, 4: 2.26, 8: 1.77},
    2048: {1: 23.7, 2: 13.3, 4: 7.60, 8: 4.81},
    3840: {1: 140.0, 2: 76.6, 4: 41.3, 8: 22.9},
}
STEPS, WARMUP = 50, 4
# DeepCache's published SDXL latency (REFERENCES.md): 50 steps on one GPU, seconds without and with it.
DEEPCACHE_S = (17.52, 6.71)
CACHE_ACCELERATORS = ("A100 NVLink3",)  # where the published figures were measured (DistriFusion's)
MEASURED = Path(__file__).with_name("gpu_results") / "gpu.json"
MODES = ("single", "sync", "displaced", "pcpp", "naive")


def calibrated_fraction(rows: list[dict]) -> float:
    """The fraction of the A100's peak that DistriFusion's single-GPU 1024² latency implies
    for our measured single-device FLOPs."""
    single = [r for r in rows if r["preset"] == "sdxl-base" and r["size"] == 1024 and r["mode"] == "single"]
    if not single:
        raise SystemExit("the costs hold no sdxl-base 1024 single-device row to calibrate on; "
                         "pass --fraction-of-peak")
    return single[0]["flops"] * STEPS / DISTRIFUSION_S[1024][1] / ACCELERATORS["A100 NVLink3"][0]


def measured_rates(report: dict) -> tuple[float, dict[tuple[int, int], float], str]:
    """From a benchmarks/gpu.py report: (achieved fraction of peak FLOP/s, {(size, N): patch
    efficiency}, where it was measured)."""
    if report["preset"]["tiny"]:
        raise SystemExit("the GPU report is a --tiny smoke run, not a measurement; pass --measured with a full run's "
                         "gpu.json, or --fraction-of-peak")
    sections = report["sections"]
    roofline = {row["program"].split()[1]: row for row in sections.get("roofline", {}).get("rows", [])}
    if not {"UNet", "matmul"} <= set(roofline):
        raise SystemExit("the GPU report has no roofline rows (its run stopped before that section); "
                         "pass --fraction-of-peak")
    fraction = roofline["UNet"]["achieved_flops_per_s"] / roofline["matmul"]["flops_per_s"]
    efficiency = {(row["size"], row["patches"]): row["efficiency"]
                  for row in sections.get("patch", {}).get("rows", []) if "efficiency" in row}
    env = report["environment"]
    return fraction, efficiency, f"{env['devices'][0]}, {env['date'][:10]}"


def project(rows: list[dict], fraction: float, cfg_parallel: bool,
            efficiency: dict[tuple[int, int], float] | None = None) -> list[dict]:
    """Latency and speed-up of every (accelerator, size, N, mode) the costs allow; `efficiency`:
    the measured (size, N) -> patch efficiency (1 where absent)."""
    efficiency = efficiency or {}
    out = []
    for name, (peak, bandwidth) in ACCELERATORS.items():
        def rate(r):
            return peak * fraction * efficiency.get((r["size"], r["devices"]), 1.0)

        def sync_step(r):
            return r["flops"] / rate(r) + r["received_bytes"] / bandwidth

        for size in sorted({r["size"] for r in rows}):
            at = {(r["devices"], r["mode"], r.get("context")): r for r in rows if r["size"] == size
                  and r["cfg_parallel"] == (cfg_parallel and r["devices"] > 1)}
            if (1, "single", None) not in at:
                continue
            single = STEPS * at[1, "single", None]["flops"] / rate(at[1, "single", None])
            out.append(dict(accelerator=name, size=size, devices=1, mode="single", compute_ms=single / STEPS * 1e3,
                            comm_ms=0.0, latency_s=single, speedup=1.0))
            for (n, mode, context), r in sorted(at.items(), key=lambda item: (item[0][0], MODES.index(item[0][1]),
                                                                               item[0][2] or 0)):
                if n == 1 or (mode == "pcpp" and (n, "sync", None) not in at):
                    continue
                compute, comm = r["flops"] / rate(r), r["received_bytes"] / bandwidth
                overlapped = max(compute, comm)
                if mode == "sync":
                    latency = STEPS * sync_step(r)
                elif mode == "naive":
                    latency = STEPS * overlapped
                else:  # displaced, pcpp: synchronous warm-up steps, then overlapped ones
                    warm = sync_step(at[n, "sync", None] if mode == "pcpp" else r)
                    latency = WARMUP * warm + (STEPS - WARMUP) * overlapped
                label = mode if context is None else f"pcpp p={context:g}"
                out.append(dict(accelerator=name, size=size, devices=n, mode=label, compute_ms=compute * 1e3,
                                comm_ms=comm * 1e3, latency_s=latency, speedup=single / latency))
    return out


def table(projected: list[dict]) -> str:
    lines = ["| accelerator | size | N | mode | compute ms/step | comm ms/step | latency s | speed-up "
             "| DistriFusion A100, measured |", "|---|---|---|---|---|---|---|---|---|"]
    for p in projected:
        if p["mode"] == "naive":
            continue
        measured = DISTRIFUSION_S.get(p["size"], {}).get(p["devices"])
        ref = (f"{measured:.2f} s ({DISTRIFUSION_S[p['size']][1] / measured:.1f}x)"
               if measured and p["accelerator"].startswith("A100") and p["mode"] in ("single", "displaced") else "")
        lines.append(f"| {p['accelerator']} | {p['size']}² | {p['devices']} | {p['mode']} | {p['compute_ms']:.1f} "
                     f"| {p['comm_ms']:.2f} | {p['latency_s']:.2f} | {p['speedup']:.2f}x | {ref} |")
    return "\n".join(lines)


def project_cache(rows: list[dict], fraction: float, intervals: tuple[int, ...],
                  efficiency: dict[tuple[int, int], float] | None = None,
                  accelerators: tuple[str, ...] = CACHE_ACCELERATORS) -> list[dict]:
    """Latency of `STEPS` steps of every (accelerator, size, N devices, mode), uncached and with
    DeepCache at each branch of the rows and each interval (one full step in every interval)."""
    efficiency = efficiency or {}
    out = []
    for name in accelerators:
        peak, bandwidth = ACCELERATORS[name]
        for size in sorted({r["size"] for r in rows}):
            by = {(r["devices"], r["mode"], r["branch"], r["full"]): r for r in rows if r["size"] == size}

            def seconds(r: dict, overlapped: bool) -> float:
                compute = r["flops"] / (peak * fraction * efficiency.get((size, r["devices"]), 1.0))
                comm = r["received_bytes"] / bandwidth
                return max(compute, comm) if overlapped else compute + comm

            def latency(n: int, mode: str, branch: int | None, interval: int) -> float | None:
                total = 0.0
                for i in range(STEPS):
                    full = None if branch is None else i % interval == 0
                    warm = mode in ("displaced", "pcpp") and i < WARMUP
                    r = by.get((n, "sync" if warm and mode == "pcpp" else mode, branch, full))
                    if r is None:
                        return None
                    total += seconds(r, overlapped=mode in ("displaced", "pcpp", "naive") and not warm)
                return total

            if (1, "single", None, None) not in by:
                continue
            single = latency(1, "single", None, 1)
            for n, mode in sorted({(n, mode) for n, mode, _, _ in by},
                                  key=lambda layout: (layout[0], MODES.index(layout[1]))):
                uncached = latency(n, mode, None, 1)
                for branch in [None] + sorted({b for _, _, b, _ in by if b is not None}):
                    for interval in [1] if branch is None else intervals:
                        got = latency(n, mode, branch, interval)
                        if got is None or uncached is None:
                            continue
                        out.append(dict(accelerator=name, size=size, devices=n, mode=mode, branch=branch,
                                        interval=interval, latency_s=got, speedup=single / got,
                                        vs_layout_uncached=uncached / got))
    return out


def cache_table(projected: list[dict]) -> str:
    lines = ["| accelerator | size | N | mode | DeepCache | latency s (projected) | speed-up vs 1 device uncached "
             "| cache alone | published, measured |", "|---|---|---|---|---|---|---|---|---|"]
    for p in projected:
        cache = "off" if p["branch"] is None else f"N={p['interval']}, branch {p['branch']}"
        ref = ""
        if p["accelerator"].startswith("A100") and p["branch"] is None and p["mode"] in ("single", "displaced"):
            measured = DISTRIFUSION_S.get(p["size"], {}).get(p["devices"])
            ref = (f"DistriFusion A100: {measured:.2f} s ({DISTRIFUSION_S[p['size']][1] / measured:.1f}x)"
                   if measured else "")
        elif p["devices"] == 1 and p["size"] == 1024 and p["branch"] is not None and p["accelerator"] == \
                CACHE_ACCELERATORS[0]:
            ref = f"DeepCache, 1 GPU: {DEEPCACHE_S[0]} -> {DEEPCACHE_S[1]} s ({DEEPCACHE_S[0] / DEEPCACHE_S[1]:.1f}x)"
        lines.append(f"| {p['accelerator']} | {p['size']}² | {p['devices']} | {p['mode']} | {cache} "
                     f"| {p['latency_s']:.2f} | {p['speedup']:.2f}x | {p['vs_layout_uncached']:.2f}x | {ref} |")
    return "\n".join(lines)


def plot(projected: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({p["size"] for p in projected})
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 3.8), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for (name, mode), style in {("A100 NVLink3", "displaced"): "-o", ("A100 NVLink3", "sync"): "--o",
                                    ("H100 NVLink4", "displaced"): "-s", ("TPU v5e", "displaced"): "-^",
                                    ("TPU v5p", "displaced"): "-v"}.items():
            points = [p for p in projected if p["size"] == size and p["accelerator"] == name
                      and p["mode"] in (mode, "single")]
            ax.plot([p["devices"] for p in points], [p["speedup"] for p in points], style, ms=4,
                    label=f"{name} {mode} (projected)")
        if size in DISTRIFUSION_S:
            measured = DISTRIFUSION_S[size]
            ax.plot(list(measured), [measured[1] / t for t in measured.values()], "k-D", ms=5,
                    label="DistriFusion A100 (measured)")
        ax.plot([1, 8], [1, 8], ":", color="grey", label="linear")
        ax.set(title=f"{size}x{size}", xlabel="devices", ylabel="speed-up vs one device", xticks=[1, 2, 4, 8])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--costs", type=Path, default=Path(__file__).with_name("parallel_cost.json"),
                   help="rows written by parallel_cost.py --json")
    p.add_argument("--fraction-of-peak", type=float,
                   help="achieved fraction of peak FLOP/s (default: from --measured, else calibrated on "
                        "DistriFusion's single A100)")
    p.add_argument("--measured", type=Path, default=MEASURED,
                   help="benchmarks/gpu.py's gpu.json; used when it exists and no --fraction-of-peak is given")
    p.add_argument("--cfg-parallel", action="store_true", help="project the rows with the guidance batch split")
    p.add_argument("--plot", type=Path, help="write the speed-up curves to this PNG")
    p.add_argument("--json", type=Path, help="also write the projected rows here")
    p.add_argument("--deepcache", type=Path, help="rows of deepcache_cost.py --json: also project DeepCache")
    p.add_argument("--intervals", type=int, nargs="+", default=[3], help="DeepCache's N: one full step in every N")
    args = p.parse_args()
    if not args.costs.is_file():
        raise SystemExit(f"{args.costs} does not exist; run benchmarks/parallel_cost.py --json {args.costs} first")
    rows = [r for r in json.loads(args.costs.read_text()) if r["dtype"] == "bfloat16"]
    efficiency = {}
    if args.fraction_of_peak:
        fraction, source = args.fraction_of_peak, "given by --fraction-of-peak"
    elif args.measured.is_file():
        fraction, efficiency, where = measured_rates(json.loads(args.measured.read_text()))
        source = (f"measured by benchmarks/gpu.py ({where}; {args.measured}), with its patch efficiencies at "
                  + (", ".join(f"{size}² N={n}: {e:.2f}" for (size, n), e in sorted(efficiency.items())) or "none"))
    else:
        fraction, source = calibrated_fraction(rows), "calibrated on DistriFusion's single-A100 latency (stated)"
    projected = project(rows, fraction, args.cfg_parallel, efficiency)
    print(f"{STEPS} steps, warm-up {WARMUP}, achieved {fraction:.1%} of peak FLOP/s, {source}; "
          f"{'guidance batch split over two groups' if args.cfg_parallel else 'no guidance split'}\n")
    print(table(projected))
    if args.plot:
        plot(projected, args.plot, f"SDXL UNet, {STEPS} steps: projected from measured FLOPs and bytes\n"
             f"({fraction:.0%} of peak FLOP/s)")
    cached = []
    if args.deepcache:
        cache_rows = [r for r in json.loads(args.deepcache.read_text()) if r["dtype"] == "bfloat16"]
        cached = project_cache(cache_rows, fraction, tuple(args.intervals), efficiency)
        print(f"\nDeepCache, {STEPS} steps (uniform schedule; warm-up {WARMUP} synchronous in displaced and pcpp), "
              f"projected from {args.deepcache}; published figures measured by their authors\n")
        print(cache_table(cached))
    if args.json:
        args.json.write_text(json.dumps(projected + cached, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
