"""The image server under load: images/s and latency with batching against without, the batch
sizes it forms, that no request is lost, and its memory and compiles over many requests.

    python benchmarks/serve_load.py [--clients 1 4 16] [--requests 64] [--steps 8] [--memory-requests 500] \\
        [--json benchmarks/serve_load.json]
    python benchmarks/serve_load.py --requests 8 --memory-requests 20      # a quick check

Two servers on the demo model (`python -m jaxfuse.serve --devices 1 --warm 256x256`, each a
subprocess on a free port, started one after the other and then both kept up): `--max-batch 4`
(batching) and `--max-batch 1` (unbatched), both with `--max-queue 8` and `--batch-wait-ms 50` by
default. Each first answers `--warmup-requests` (not counted). Then for each count of `--clients`,
a closed loop of that many concurrent clients (asyncio, aiohttp's client) sends `--requests`
requests in all to each server in turn (batching first, so both see the same machine load), each
`POST /v1/images/generations` for one 256x256 image of a distinct prompt (captions of the demo's
scenes) and a distinct seed. A client's latency runs from its first try to its image; a 429 (the
queue full: with 16 clients more requests are in flight than 8 queued and one batch running) is
retried after its Retry-After and counted. Every answer must be a 200 holding a 256x256 PNG that
decodes (with the seed asked for, where the answer names one), or a 429 with Retry-After; anything
else is a failure, listed, and the script exits 1 (after the table and the JSON). The batch sizes
are the difference of the server's `jaxfuse_batches_total` across the row; its
`jaxfuse_images_total` and 429 count must move by what the clients saw, and its queue be empty
after. Then the unbatched server is stopped and the batching one gets
`--memory-requests` requests from `--memory-clients` clients: its resident memory (VmRSS of
/proc/PID/status) after the first `--memory-warmup` and after all, and `jaxfuse_compiles_total`
(no compile on a request's path: it must not change from listen to the end, on either server).
Each server is stopped with SIGTERM and must exit 0 without a traceback in its log. The clients
run on the server's machine and take some of its CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

SIZE = 256
METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
LABEL = re.compile(r'(\w+)="([^"]*)"')


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_prompts(count: int, seed: int = 0) -> list[str]:
    """`count` distinct captions of random demo scenes (the words the demo model was trained on)."""
    import numpy as np

    from jaxfuse.demo.scenes import caption, sample_scene

    rng, prompts = np.random.default_rng(seed), {}
    while len(prompts) < count:
        prompts.setdefault(caption(sample_scene(rng)), None)
    return list(prompts)


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(name, ((label, value), ...)): value}."""
    values = {}
    for line in text.splitlines():
        match = METRIC_LINE.match(line.strip())
        if match is None or line.startswith("#"):
            continue
        name, labels, value = match.groups()
        values[name, tuple(sorted(LABEL.findall(labels or "")))] = float(value)
    return values


def batches(metrics: dict) -> Counter:
    """{(images, padded): device calls} from `jaxfuse_batches_total`."""
    return Counter({(int(dict(labels)["images"]), int(dict(labels)["padded"])): int(v)
                    for (name, labels), v in metrics.items() if name == "jaxfuse_batches_total"})


def quantile(values: list[float], q: float) -> float:
    """The q-quantile, linear between order statistics (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class Server:
    """`python -m jaxfuse.serve` on the demo model as a subprocess, its log in `folder`."""

    def __init__(self, name: str, args: argparse.Namespace, max_batch: int, folder: Path):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / f"{name}.log"
        self.command = [sys.executable, "-m", "jaxfuse.serve", "--devices", "1", "--steps", str(args.steps),
                        "--port", str(self.port), "--max-batch", str(max_batch), "--batch-wait-ms",
                        str(args.batch_wait_ms), "--max-queue", str(args.max_queue), "--warm", f"{SIZE}x{SIZE}"]
        if args.cache_dir is not None:
            self.command += ["--cache-dir", str(args.cache_dir)]
        self.process: subprocess.Popen | None = None
        self.exit_code: int | None = None

    def start(self, timeout_s: float) -> float:
        """Starts the server and waits until it listens; the seconds that took."""
        env = {k: v for k, v in os.environ.items() if k != "JAXFUSE_API_KEY"}  # an open server
        start = time.perf_counter()
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=env)
        while "serving " not in self.log():
            if self.process.poll() is not None:
                raise RuntimeError(f"the {self.name} server exited with {self.process.returncode} before it listened:"
                                   f"\n{self.log()[-3000:]}")
            if time.perf_counter() - start > timeout_s:
                self.stop()
                raise RuntimeError(f"the {self.name} server did not listen within {timeout_s:g} s:\n"
                                   f"{self.log()[-3000:]}")
            time.sleep(0.2)
        with urllib.request.urlopen(f"{self.url}/health", timeout=30) as answer:
            if answer.status != 200:
                raise RuntimeError(f"the {self.name} server's /health answered {answer.status}")
        return time.perf_counter() - start

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metrics(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=30) as answer:
            return parse_metrics(answer.read().decode())

    def rss_mb(self) -> float:
        """The server process's resident memory (VmRSS), MB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS in /proc/PID/status")

    def stop(self, timeout_s: float = 120.0) -> int | None:
        """SIGTERM (the server drains and exits 0), killed if it does not stop in time."""
        if self.process is None or self.exit_code is not None:
            return self.exit_code
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            self.exit_code = None
        return self.exit_code


class Requests:
    """Distinct prompts and seeds across the whole run."""

    def __init__(self, prompts: list[str], steps: int):
        self.prompts, self.steps, self.next = prompts, steps, itertools.count()

    def body(self) -> dict:
        i = next(self.next)
        return {"prompt": self.prompts[i % len(self.prompts)], "n": 1, "size": f"{SIZE}x{SIZE}",
                "steps": self.steps, "seed": 1000 + i}


def check_png(data: dict, seed: int) -> str | None:
    """None when the answer holds one 256x256 PNG that decodes (and says `seed`, if it says one),
    else what is wrong."""
    from PIL import Image

    try:
        items = data["data"]
        if len(items) != 1:
            return f"{len(items)} images, not 1"
        image = Image.open(io.BytesIO(base64.b64decode(items[0]["b64_json"], validate=True)))
        image.load()
        if items[0].get("seed", seed) != seed:
            return f"the image says seed {items[0]['seed']!r}, not {seed}"
    except Exception as e:  # noqa: BLE001 -- whatever is wrong with it is reported
        return f"not a decodable image: {type(e).__name__}: {e}"
    if image.format != "PNG" or image.size != (SIZE, SIZE):
        return f"a {image.format} of {image.size[0]}x{image.size[1]}, not a {SIZE}x{SIZE} PNG"
    return None


async def load(url: str, clients: int, count: int, requests: Requests, max_retries: int, timeout_s: float,
               after: tuple[int, Callable[[], None]] | None = None) -> dict:
    """`clients` concurrent clients in a closed loop sending `count` requests in all; `after`:
    (k, f) calls f() once k requests are answered."""
    import aiohttp

    latencies, failures, retries, most_retries = [], [], 0, 0
    sent = itertools.count()
    answered = 0

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal retries, most_retries
        body = requests.body()
        start = time.perf_counter()
        for attempt in range(max_retries + 1):
            most_retries = max(most_retries, attempt)
            try:
                async with session.post(f"{url}/v1/images/generations", json=body) as answer:
                    status, retry_after = answer.status, answer.headers.get("Retry-After")
                    text = await answer.text()
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                failures.append(f"seed {body['seed']}: {type(e).__name__}: {e}")
                return
            if status == 429:
                retries += 1
                if retry_after is None or not retry_after.isdigit():
                    failures.append(f"seed {body['seed']}: a 429 without a Retry-After of whole seconds "
                                    f"({retry_after!r})")
                await asyncio.sleep(int(retry_after) if retry_after and retry_after.isdigit() else 1)
                continue
            if status != 200:
                failures.append(f"seed {body['seed']}: HTTP {status}: {text[:300]}")
                return
            wrong = check_png(json.loads(text), body["seed"])
            if wrong:
                failures.append(f"seed {body['seed']}: {wrong}")
            else:
                latencies.append(time.perf_counter() - start)
            return
        failures.append(f"seed {body['seed']}: still 429 after {max_retries} retries")

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal answered
        while next(sent) < count:
            await one(session)
            answered += 1
            if after is not None and answered == after[0]:
                after[1]()

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        seconds = time.perf_counter() - start
    return dict(seconds=seconds, latencies=latencies, failures=failures, retries=retries, most_retries=most_retries)


def measure(server: Server, clients: int, count: int, requests: Requests, args: argparse.Namespace,
            after: tuple[int, Callable[[], None]] | None = None) -> dict:
    """One row: the load on `server`, its batches and the server's counters checked against it."""
    before = server.metrics()
    result = asyncio.run(load(server.url, clients, count, requests, args.max_retries, args.request_timeout, after))
    now = server.metrics()
    formed = batches(now) - batches(before)
    calls = sum(formed.values())
    images = sum(i * n for (i, _), n in formed.items())
    served = len(result["latencies"])
    failures = [f"{server.name}, {clients} clients: {f}" for f in result["failures"]]

    def moved(name, labels=()):
        return now.get((name, labels), 0) - before.get((name, labels), 0)

    for what, server_count, seen in (("images (jaxfuse_images_total)", moved("jaxfuse_images_total"), served),
                                     ("images in batches (jaxfuse_batches_total)", images, served),
                                     ("429s (jaxfuse_responses_total)",
                                      moved("jaxfuse_responses_total", (("status", "429"),)), result["retries"])):
        if server_count != seen:
            failures.append(f"{server.name}, {clients} clients: the server counts {server_count:g} {what}, the "
                            f"clients saw {seen}")
    if now.get(("jaxfuse_queue_length", ()), 0):
        failures.append(f"{server.name}, {clients} clients: {now[('jaxfuse_queue_length', ())]:g} requests still "
                        "queued after every client was answered")
    if served != count and not failures:
        failures.append(f"{server.name}, {clients} clients: {served} of {count} requests served")
    latencies = result["latencies"]
    return dict(server=server.name, clients=clients, requests=count, served=served,
                seconds=result["seconds"], images_per_s=served / result["seconds"],
                p50_s=quantile(latencies, 0.5), p95_s=quantile(latencies, 0.95),
                mean_latency_s=statistics.fmean(latencies) if latencies else math.nan,
                max_latency_s=max(latencies, default=math.nan),
                device_calls=calls, mean_batch=images / calls if calls else math.nan,
                batches={f"{i}/{p}": n for (i, p), n in sorted(formed.items())}, retries=result["retries"],
                most_retries_of_one=result["most_retries"], failures=failures)


def batch_text(row: dict) -> str:
    """The row's batches as images per call x calls: "1x3, 3x1 (padded 4), 4x5"."""
    parts = []
    for key, n in row["batches"].items():
        images, padded = map(int, key.split("/"))
        parts.append(f"{images}x{n}" + (f" (padded {padded})" if padded != images else ""))
    return ", ".join(parts) or "-"


def run(args: argparse.Namespace, folder: Path, report: dict) -> None:
    """Both servers' rows, then the memory run; everything measured lands in `report` as it comes,
    so a run that stops half-way still reports what it measured."""
    rows, failures, servers = report["rows"], report["failures"], report["servers"]
    requests = Requests(demo_prompts(2 * (len(args.clients) * args.requests + args.warmup_requests)
                                     + args.memory_requests), args.steps)
    batching = Server("batching", args, args.max_batch, folder)
    unbatched = Server("unbatched", args, 1, folder)
    try:
        for server in (batching, unbatched):
            log(f"starting the {server.name} server: {' '.join(server.command[1:])}")
            servers[server.name] = dict(command=server.command[1:])
            seconds = server.start(args.start_timeout)
            servers[server.name] |= dict(start_s=seconds, compiles_at_listen=compiles(server),
                                         rss_at_listen_mb=server.rss_mb())
            log(f"  listening after {seconds:.0f} s, {servers[server.name]['compiles_at_listen']:g} programs")
            if args.warmup_requests:  # the first calls of each program, the first connections: not in the rows
                warm = measure(server, args.max_batch, args.warmup_requests, requests, args)
                failures += warm["failures"]
                servers[server.name]["warmup"] = warm
        for clients in args.clients:
            for server in (batching, unbatched):
                row = measure(server, clients, args.requests, requests, args)
                rows.append(row)
                failures += row["failures"]
                log(f"{server.name}, {clients} clients: {row['images_per_s']:.2f} images/s, p50 {row['p50_s']:.2f} s, "
                    f"p95 {row['p95_s']:.2f} s, batches {batch_text(row)}, {row['retries']} retries, "
                    f"{len(row['failures'])} failures")
        servers["unbatched"]["compiles_at_end"] = compiles(unbatched)
        stop(unbatched, servers, failures)  # the memory run has the machine to itself

        readings = {}
        memory = report["memory"]
        memory |= dict(requests=args.memory_requests, clients=args.memory_clients, warmup=args.memory_warmup,
                       rss_at_listen_mb=servers["batching"]["rss_at_listen_mb"], compiles_before=compiles(batching))
        log(f"memory: {args.memory_requests} requests from {args.memory_clients} clients on the batching server")
        row = measure(batching, args.memory_clients, args.memory_requests, requests, args,
                      after=(args.memory_warmup, lambda: readings.setdefault("warm", batching.rss_mb())))
        failures += row["failures"]
        memory |= dict(rss_after_warmup_mb=readings["warm"], rss_after_all_mb=batching.rss_mb(),
                       compiles_after=compiles(batching), run=row)
        memory["growth_mb"] = memory["rss_after_all_mb"] - memory["rss_after_warmup_mb"]
        servers["batching"]["compiles_at_end"] = memory["compiles_after"]
    finally:
        for server in (batching, unbatched):
            stop(server, servers, failures)


def compiles(server: Server) -> float:
    return server.metrics()[("jaxfuse_compiles_total", ())]


def stop(server: Server, servers: dict, failures: list[str]) -> None:
    """Stops `server` (once), checking it exits 0 and printed no traceback."""
    if server.process is None or "exit_code" in servers[server.name]:
        return
    listened = "start_s" in servers[server.name]  # else `Server.start` said why already
    running = server.process.poll() is None
    code = servers[server.name]["exit_code"] = server.stop()
    if code != 0 and listened:
        failures.append(f"the {server.name} server exited with {code}{' on SIGTERM' * running}, not 0:\n"
                        f"{server.log()[-2000:]}")
    if "Traceback" in server.log():
        failures.append(f"the {server.name} server printed a traceback:\n{server.log()[-3000:]}")


def print_report(args: argparse.Namespace, report: dict) -> None:
    rows, memory, servers = report["rows"], report["memory"], report["servers"]
    print(f"demo model, {SIZE}x{SIZE}, {args.steps} steps, one CPU device (`--devices 1`), --max-queue "
          f"{args.max_queue}, --batch-wait-ms {args.batch_wait_ms:g}; {args.requests} requests a row, one image "
          f"each; batching: --max-batch {args.max_batch}, unbatched: --max-batch 1\n")
    print("| server | clients | images/s | p50 s | p95 s | mean batch | batch sizes seen (images x calls) "
          "| retries (most of one request) |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['server']} | {r['clients']} | {r['images_per_s']:.2f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | "
              f"{r['mean_batch']:.2f} | {batch_text(r)} | {r['retries']} ({r['most_retries_of_one']}) |")
    if report["ratios"]:
        print("\n| clients | images/s batching / unbatched |\n|---|---|")
        for r in report["ratios"]:
            print(f"| {r['clients']} | {r['ratio']:.2f} |")
    if "run" in memory:
        print(f"\nbatching server, {memory['requests']} requests from {memory['clients']} clients "
              f"({memory['run']['images_per_s']:.2f} images/s): resident memory {memory['rss_at_listen_mb']:.0f} MB "
              f"at listen, {memory['rss_after_warmup_mb']:.0f} MB after the first {memory['warmup']}, "
              f"{memory['rss_after_all_mb']:.0f} MB after all {memory['requests']}: {memory['growth_mb']:+.1f} MB; "
              f"jaxfuse_compiles_total {memory['compiles_before']:g} before, {memory['compiles_after']:g} after")
    for name, info in servers.items():
        print(f"{name} server: listening after {info.get('start_s', math.nan):.0f} s, jaxfuse_compiles_total "
              f"{info.get('compiles_at_listen', math.nan):g} at listen, {info.get('compiles_at_end', math.nan):g} "
              f"at the end, exit code {info.get('exit_code')}")
    print(f"\n{len(report['failures'])} failures; the whole run took {report['seconds']:.0f} s")
    for failure in report["failures"]:
        print(f"FAILED: {failure}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients of each row")
    p.add_argument("--requests", type=int, default=64, help="requests of each row, in all")
    p.add_argument("--steps", type=int, default=8, help="the servers' --steps (every request runs these)")
    p.add_argument("--max-batch", type=int, default=4, help="the batching server's --max-batch")
    p.add_argument("--batch-wait-ms", type=float, default=50.0, help="both servers' --batch-wait-ms")
    p.add_argument("--max-queue", type=int, default=8, help="both servers' --max-queue")
    p.add_argument("--memory-requests", type=int, default=500, help="requests of the memory run")
    p.add_argument("--memory-warmup", type=int, default=50,
                   help="of those, the ones before the first reading (at most half of them)")
    p.add_argument("--warmup-requests", type=int, default=8,
                   help="requests each server answers before the rows, from --max-batch clients, not counted")
    p.add_argument("--memory-clients", type=int, default=4)
    p.add_argument("--cache-dir", type=Path, help="the servers' --cache-dir (default: theirs)")
    p.add_argument("--max-retries", type=int, default=100, help="429s one request may get before it fails")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds one HTTP call may take")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds a server may take to listen")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if min(args.clients + [args.requests, args.memory_requests, args.memory_clients, args.steps, args.max_batch]) < 1:
        p.error("--clients, --requests, --memory-requests, --memory-clients, --steps and --max-batch must be >= 1")
    if args.memory_requests < 2 or args.memory_warmup < 1 or args.warmup_requests < 0:
        p.error("--memory-requests must be at least 2, --memory-warmup at least 1, --warmup-requests at least 0")
    args.memory_warmup = min(args.memory_warmup, args.memory_requests // 2)
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        p.error('the clients need aiohttp: pip install "jaxfuse[serve]"')

    started = time.perf_counter()
    report = dict(rows=[], ratios=[], memory={}, servers={}, failures=[])
    with tempfile.TemporaryDirectory(prefix="serve-load-") as folder:
        try:
            run(args, Path(folder), report)
        except Exception as e:  # noqa: BLE001 -- reported with what was measured before it
            report["failures"].append(f"the run stopped: {type(e).__name__}: {e}")
    for name, info in report["servers"].items():
        if "compiles_at_end" in info and info["compiles_at_end"] != info["compiles_at_listen"]:
            report["failures"].append(f"the {name} server compiled while serving: jaxfuse_compiles_total "
                                      f"{info['compiles_at_listen']:g} at listen, {info['compiles_at_end']:g} "
                                      "at the end")
    for clients in args.clients:
        pair = {r["server"]: r for r in report["rows"] if r["clients"] == clients}
        if len(pair) == 2 and pair["unbatched"]["images_per_s"] > 0:
            report["ratios"].append(dict(clients=clients, ratio=pair["batching"]["images_per_s"]
                                         / pair["unbatched"]["images_per_s"]))
    report["seconds"] = time.perf_counter() - started
    print_report(args, report)
    if args.json:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"}
        args.json.write_text(json.dumps(dict(settings=settings, **report), indent=2))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
