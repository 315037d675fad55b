"""Per-device cost of one denoising step of a large canvas's views (MultiDiffusion,
`jaxfuse.sampling.tiled`): FLOPs, bytes received and peak memory, the views spread over devices
(views alone, a `VIEWS` mesh) or over a (`VIEWS`, `PATCH`) grid, each view split by rows in sync
mode (views x patch).

    python benchmarks/tiled_cost.py --json benchmarks/tiled_cost.json     # SDXL, 34 programs
    python benchmarks/tiled_cost.py --quick                               # the tiny UNet, 40 s

SDXL-base shapes with abstract bf16 parameters (no weights), one guided image (UNet batch 2), one
prompt over the whole canvas, windows of the model's native latent size (128, 1024 px) at a stride
of half a window; compiled for an emulated CPU mesh of 8 devices. The step is the views' noise
prediction as the sampling loop runs it (`tiled.views_predictor` inside `shard_map`: every device
its ceil(V / views) views one after another, each view's rows over `PATCH`, one `psum` of the
merge's sums), without the sampler's update.

Measured, from each row's compiled program (one program per row):
    reported FLOPs  XLA's cost analysis. It counts a while loop's body once, whatever its trip
                    count, and the views are a `lax.map` and their merge a `fori_loop` (while
                    loops of ceil(V / views) trips);
    bytes received  per collective in the lowered HLO (`hlo.collective_bytes`, bf16 as written:
                    the CPU compiler widens bf16 collectives to f32), each multiplied by how often
                    its computation runs: a while body's by ceil(V / views), checked against every
                    compiled loop's `known_trip_count`;
    memory          the compiled program's peak (`cost.peak_bytes`): the views run one at a time,
                    so it is one view's working set plus the canvas, whatever the count.
Derived: FLOPs per device = reported + (ceil(V / views) - 1) x the FLOPs of one view on as many
patches, measured by the one-view rows (a canvas of one window, where the loops run once and
XLA's count is exact): a view's UNet pass and its share of the merge. What lies outside the loops
(the division of the merged sums) is measured in every row: at most 32 MFLOP (8192²), against
1.8-13.6 TFLOP a view. Padding views (copies of the first view that fill the last devices'
shares, weight 0) cost as much as real ones and are counted.

The memory figures are the CPU compiler's: they hold float32 copies of the bf16 weights (about
10 GB) and whole attention score matrices, as in `parallel_cost.py`. Each row compiles one program
(SDXL: 34 programs, 15 min of CPU time in all, 13 min 40 s wall with `--jobs 2` on 2 cores);
`--jobs` compiles that many at once, and with `--json` finished rows are kept in the file and
skipped when the run is started again.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import multiprocessing
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

VAE_FACTOR = 8  # pixels per latent pixel (SDXL's VAE)
DEVICE_COUNTS = (1, 2, 4, 8)
# Published figures at these sizes (REFERENCES.md), printed under the table.
PUBLISHED = (
    "DistriFusion (SDXL, 50 DDIM steps, A100 NVLink; REFERENCES.md), latency in s on 1 / 2 / 4 / 8 GPUs: "
    "2048² 23.7 / 13.3 / 7.60 / 4.81; 3840² 140 / 76.6 / 41.3 / 22.9 (no figures at 4096² or 8192²).",
    "DemoFusion (SDXL; REFERENCES.md): windows 128, stride 64, batched 16 on one GPU; 4096² is about 113 "
    "native-size UNet passes per step (progressive stages and dilated global sampling included). "
    "FreCaS: 6.07x faster than DemoFusion at 2048². FreeScale: 8192² in about 55 GB and 1 hour on an A800. "
    "None spreads views over devices.",
)


def view_count(side: int, window: int, stride: int) -> int:
    """Views of a square canvas of `side` latents (`tiled.view_boxes`)."""
    from jaxfuse.sampling.tiled import view_boxes

    return len(view_boxes((side, side), (window, window), (stride, stride)))


def layouts(devices: list[int]) -> list[tuple[int, int]]:
    """Every (views, patches) grid of each device count: views alone first, then views x patch."""
    return [(n // p, p) for n in devices for p in DEVICE_COUNTS if n % p == 0 and p <= n]


def rows_wanted(args) -> list[dict]:
    """One row per (canvas, layout); the one-view canvas (one window) on every patch count used,
    which the derived FLOPs need."""
    window = window_latents(args.preset)
    native = window * VAE_FACTOR
    stride = args.stride or window // 2
    grids = layouts(args.devices)
    rows = [dict(size=native, views_devices=1, patches=p) for p in sorted({p for _, p in grids})]
    rows += [dict(size=size, views_devices=v, patches=p) for size in args.sizes if size != native for v, p in grids]
    return [dict(row, preset=args.preset, dtype=args.dtype, window=window, stride=stride) for row in rows]


def key(row: dict) -> tuple:
    return tuple(row.get(k) for k in ("preset", "dtype", "window", "stride", "size", "views_devices", "patches"))


def window_latents(preset: str) -> int:
    return unet_config(preset).sample_size


def unet_config(preset: str):
    from jaxfuse.config import UNetConfig

    return {"sdxl-base": UNetConfig.sdxl_base, "tiny": UNetConfig.tiny}[preset]()


def computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
    """An HLO module's text -> ({computation name: its instruction lines}, the entry's name)."""
    comps, entry, name = {}, None, None
    for line in hlo_text.splitlines():
        header = re.match(r"(ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header and not line.startswith((" ", "HloModule")):
            name = header[2]
            comps[name] = []
            entry = name if header[1] else entry
        elif line.startswith("}"):
            name = None
        elif name is not None:
            comps[name].append(line)
    return comps, entry


_CALLEE = re.compile(r"\b(to_apply|body|condition|calls|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


def callees(line: str) -> list[tuple[str, str]]:
    """(how, computation) for each computation an instruction calls."""
    found = [(m[1], m[2]) for m in _CALLEE.finditer(line)]
    for m in _BRANCHES.finditer(line):
        found += [("branch", name.strip().lstrip("%")) for name in m[1].split(",")]
    return found


def received_bytes(hlo_text: str, trips: int) -> Counter:
    """Bytes received per device by collective kind in one execution of the module, a collective
    counted as often as its computation runs: a while loop's body `trips` times (every loop of the
    program runs that often: `check_trips`)."""
    from jaxfuse.analysis.hlo import collective_bytes

    comps, entry = computations(hlo_text)

    @functools.cache
    def run(name: str) -> Counter:
        total = Counter(collective_bytes("\n".join(comps[name])))
        for line in comps[name]:
            for how, callee in callees(line):
                times = trips if how == "body" else 1
                total.update({kind: times * size for kind, size in run(callee).items()})
        return total

    return run(entry)


def check_trips(compiled_text: str, trips: int) -> None:
    """Every while loop of the compiled program (the views' `lax.map`, the merge's loop over the
    views) runs `trips` times; XLA inlines a loop of one trip."""
    counts = [int(n) for n in re.findall(r'"known_trip_count":\{"n":"(\d+)"\}', compiled_text)]
    loops = compiled_text.count(" while(")
    if len(counts) != loops or set(counts) - {trips} or (trips > 1 and not loops):
        raise ValueError(f"views per device {trips}: {loops} compiled loops, trip counts {counts}")


def tiled_step(cfg, row: dict):
    """The jitted views prediction of `row` and its abstract arguments: (step, args, views per device)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from jaxfuse.analysis.cost import abstract_inputs
    from jaxfuse.models.unet import UNet2DConditionModel, abstract_params
    from jaxfuse.parallel.views import views_mesh
    from jaxfuse.parallel_config import ParallelConfig
    from jaxfuse.sampling.denoiser import Denoiser
    from jaxfuse.sampling.plan import Plan
    from jaxfuse.sampling.step import Sampling
    from jaxfuse.sampling.tiled import CanvasConditioning, Tiling, views_predictor, whole_canvas

    dtype, patches = jnp.dtype(row["dtype"]), row["patches"]
    side = row["size"] // VAE_FACTOR
    tiling = Tiling((row["window"],) * 2, (row["stride"],) * 2)
    sampling = Sampling(True, False, ParallelConfig(patches, "sync") if patches > 1 else ParallelConfig())
    kind = Plan.of(sampling.parallel, 1).kinds[0]
    unet = UNet2DConditionModel(cfg, dtype)
    mesh = views_mesh(row["views_devices"], patches=patches)
    predict = views_predictor(tiling, (side, side), VAE_FACTOR, mesh).predict

    def step(params, latents, cond, schedule, guidance):
        return predict(Denoiser(unet, params, kind), sampling, schedule, 0, latents, cond, guidance)[0]

    latents, cond, schedule, guidance = abstract_inputs(cfg, 1, row["size"], row["size"], dtype)
    regions = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                           whole_canvas((side, side), cfg.in_channels))
    args = (abstract_params(cfg, dtype), latents, CanvasConditioning(cond, regions), schedule, guidance)
    views = view_count(side, row["window"], row["stride"])
    trips = -(-views // row["views_devices"])
    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P(), out_specs=P())), args, trips


def measure(row: dict) -> dict:
    """One row's program compiled and read (see the module docstring)."""
    from jaxfuse.analysis.cost import nbytes, peak_bytes

    start = time.perf_counter()
    cfg = unet_config(row["preset"])
    step, args, trips = tiled_step(cfg, row)
    lowered = step.lower(*args)
    compiled = lowered.compile()
    check_trips(compiled.as_text(), trips)
    memory = compiled.memory_analysis()
    got = received_bytes(lowered.as_text(dialect="hlo"), trips)
    return dict(row, views=view_count(row["size"] // VAE_FACTOR, row["window"], row["stride"]),
                views_per_device=trips, reported_flops=int(compiled.cost_analysis()["flops"]), received=dict(got),
                received_bytes=sum(got.values()), params_bytes=nbytes(args[0]),
                temp_bytes=memory.temp_size_in_bytes, peak_bytes=peak_bytes(compiled),
                compile_seconds=round(time.perf_counter() - start, 1))


def with_flops(rows: list[dict]) -> list[dict]:
    """Each row with `flops`: reported + (views per device - 1) x one view's FLOPs on as many
    patches (from the one-view rows); rows without their one-view row are left out."""
    one_view = {(r["preset"], r["dtype"], r["window"], r["patches"]): r["reported_flops"] for r in rows
                if r["views"] == 1}
    out = []
    for r in rows:
        view = one_view.get((r["preset"], r["dtype"], r["window"], r["patches"]))
        if view is not None:
            out.append(dict(r, view_flops=view, flops=r["reported_flops"] + (r["views_per_device"] - 1) * view))
    return out


def table(rows: list[dict]) -> str:
    """One markdown table per canvas. "vs 1 device": FLOPs on one device / per-device FLOPs (the
    speed-up if FLOPs were all); "ideal": V x patches / views per device (load balance only)."""
    mb, gb = 1e6, 1e9
    first = rows[0]
    scale, unit = (1e12, "TFLOP") if max(r["flops"] for r in rows) >= 1e12 else (1e9, "GFLOP")
    out = [f"\n{first['preset']}, {first['dtype']}, window {first['window']} latents, stride {first['stride']}, "
           "guidance batch 2, one step, per device:\n"]
    for size in sorted({r["size"] for r in rows}):
        at = sorted((r for r in rows if r["size"] == size),
                    key=lambda r: (r["views_devices"] * r["patches"], r["patches"]))
        single = next((r for r in at if r["views_devices"] * r["patches"] == 1), None)
        out += [f"\n{size}² ({size // VAE_FACTOR}² latents), V = {at[0]['views']} views:\n",
                f"| canvas | V | layout | N | views / device | padding views | XLA {unit} (loop once) | {unit} "
                "| vs 1 device | ideal | all-gather MB | permute MB | all-reduce MB | received MB | temporaries GB "
                "| peak GB |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in at:
            n = r["views_devices"] * r["patches"]
            got = r["received"]
            speed = f"{single['flops'] / r['flops']:.2f}" if single else "-"
            out.append(
                f"| {size}² | {r['views']} | {r['views_devices']} x {r['patches']} | {n} | {r['views_per_device']} "
                f"| {r['views_per_device'] * r['views_devices'] - r['views']} | {r['reported_flops'] / scale:.2f} "
                f"| {r['flops'] / scale:.2f} | {speed} | {r['views'] * r['patches'] / r['views_per_device']:.2f} "
                f"| {got.get('all-gather', 0) / mb:.1f} | {got.get('collective-permute', 0) / mb:.1f} "
                f"| {got.get('all-reduce', 0) / mb:.1f} | {r['received_bytes'] / mb:.1f} "
                f"| {r['temp_bytes'] / gb:.2f} | {r['peak_bytes'] / gb:.2f} |")
    if first["preset"] == "sdxl-base":
        out += ["", *(f"- {line}" for line in PUBLISHED)]
    return "\n".join(out)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=["sdxl-base", "tiny"], default="sdxl-base")
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192], help="canvas sides in pixels")
    p.add_argument("--devices", type=int, nargs="+", default=list(DEVICE_COUNTS), choices=DEVICE_COUNTS)
    p.add_argument("--stride", type=int, help="view stride in latents (default: half the window)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="programs compiled at once")
    p.add_argument("--json", type=Path, help="keep the rows in this file (finished rows are skipped)")
    p.add_argument("--quick", action="store_true", help="the tiny UNet on a 256² canvas, 1 and 2 devices")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.sizes, args.devices = "tiny", [256], [1, 2]
    return args


def main() -> int:
    args = parse_args()
    os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "
                               f"--xla_force_host_platform_device_count={max(DEVICE_COUNTS)}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    done = json.loads(args.json.read_text()) if args.json and args.json.is_file() else []
    have = {key(r) for r in done}
    todo = [row for row in rows_wanted(args) if key(row) not in have]
    start = time.perf_counter()
    # Each worker is a fresh process that reads XLA_FLAGS when it starts JAX.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max(1, args.jobs), mp_context=context) as pool:
        for future in concurrent.futures.as_completed([pool.submit(measure, row) for row in todo]):
            done.append(future.result())
            print(f"measured {key(done[-1])} in {done[-1]['compile_seconds']} s", file=sys.stderr, flush=True)
            if args.json:
                args.json.write_text(json.dumps(done, indent=1))
    print(f"{len(todo)} programs in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    wanted = {key(r) for r in rows_wanted(args)}
    print(table(with_flops([r for r in done if key(r) in wanted])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
