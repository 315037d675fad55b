"""The image server's counters, and `GET /metrics` in Prometheus' text format (version 0.0.4).

    metrics = Metrics()
    metrics.answered(200, seconds=1.2, images=2)
    metrics.batch(images=3, padded=4)
    text = metrics.exposition(queue_length=5, compiles=12)
"""

from __future__ import annotations

import collections
import threading

import numpy as np

LATENCIES_KEPT = 1000  # the quantiles are over the latest this many answered requests


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.latencies: collections.deque[float] = collections.deque(maxlen=LATENCIES_KEPT)
        self.latency_sum, self.latency_count, self.images = 0.0, 0, 0
        self.responses: collections.Counter[int] = collections.Counter()  # by HTTP status
        self.batches: collections.Counter[tuple[int, int]] = collections.Counter()  # (images, padded to)

    def answered(self, status: int, seconds: float | None = None, images: int = 0) -> None:
        """A generation request answered with `status`; a served one's latency and images."""
        with self.lock:
            self.responses[status] += 1
            self.images += images
            if seconds is not None:
                self.latencies.append(seconds)
                self.latency_sum += seconds
                self.latency_count += 1

    def batch(self, images: int, padded: int) -> None:
        with self.lock:
            self.batches[(images, padded)] += 1

    def quantiles(self) -> dict[float, float]:
        with self.lock:
            latencies = np.array(self.latencies)
        if not latencies.size:
            return {0.5: float("nan"), 0.95: float("nan")}
        return {q: float(np.quantile(latencies, q)) for q in (0.5, 0.95)}

    def exposition(self, queue_length: int, compiles: int) -> str:
        quantiles = self.quantiles()
        with self.lock:
            lines = [
                "# HELP jaxfuse_queue_length Requests waiting for the device.",
                "# TYPE jaxfuse_queue_length gauge", f"jaxfuse_queue_length {queue_length}",
                "# HELP jaxfuse_images_total Images served.",
                "# TYPE jaxfuse_images_total counter", f"jaxfuse_images_total {self.images}",
                "# HELP jaxfuse_responses_total Generation requests answered, by HTTP status.",
                "# TYPE jaxfuse_responses_total counter",
                *(f'jaxfuse_responses_total{{status="{s}"}} {n}' for s, n in sorted(self.responses.items())),
                "# HELP jaxfuse_request_latency_seconds From a served request's arrival to its images, over "
                f"the latest {LATENCIES_KEPT}.",
                "# TYPE jaxfuse_request_latency_seconds summary",
                *(f'jaxfuse_request_latency_seconds{{quantile="{q}"}} {v:.6g}' for q, v in quantiles.items()),
                f"jaxfuse_request_latency_seconds_sum {self.latency_sum:.6g}",
                f"jaxfuse_request_latency_seconds_count {self.latency_count}",
                "# HELP jaxfuse_batches_total Device calls, by the images in them and the batch size they ran "
                "at (padded to a compiled size).",
                "# TYPE jaxfuse_batches_total counter",
                *(f'jaxfuse_batches_total{{images="{i}",padded="{p}"}} {n}'
                  for (i, p), n in sorted(self.batches.items())),
                "# HELP jaxfuse_compiles_total Programs compiled (or loaded from the compile cache) since start.",
                "# TYPE jaxfuse_compiles_total counter", f"jaxfuse_compiles_total {compiles}",
            ]
        return "\n".join(lines) + "\n"
