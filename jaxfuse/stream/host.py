"""The stream's host side: the stochastic similarity filter, drop-oldest queues, and the threads
that keep pre- and post-processing off the device's path.

    filter = SimilarityFilter(threshold=0.98, max_skips=10, seed=0)
    run_threaded(stream, frames, write, filter, queue_size=2)  # -> RunCounts
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np


class SimilarityFilter:
    """StreamDiffusion's stochastic similarity filter: a frame whose cosine similarity c to the
    last frame that went through is above `threshold` is skipped with probability
    (c - threshold) / (1 - threshold), so a still input saves UNet calls while a moving one
    passes. After `max_skips` skips in a row the next frame goes through whatever it is, so a
    changed frame waits at most `max_skips` frames. (The reference counts skips since the last
    forced pass, not in a row.)"""

    def __init__(self, threshold: float = 0.98, max_skips: int = 10, seed: int = 0):
        if not 0 <= threshold <= 1 or max_skips < 0:
            raise ValueError(f"threshold must be in [0, 1] and max_skips >= 0, got {threshold} and {max_skips}.")
        self.threshold, self.max_skips = threshold, max_skips
        self.rng = np.random.default_rng(seed)
        self.previous: np.ndarray | None = None
        self.skipped_in_a_row = 0

    def skip_probability(self, frames: np.ndarray) -> float:
        """The chance that `frames` (any shape, compared as one vector) is skipped."""
        if self.previous is None or self.threshold >= 1:
            return 0.0
        a, b = self.previous.ravel().astype(np.float64), np.asarray(frames).ravel().astype(np.float64)
        cosine = a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12)
        return max(0.0, (cosine - self.threshold) / (1 - self.threshold))

    def __call__(self, frames: np.ndarray) -> bool:
        """Whether `frames` goes through (True) or is skipped, the previous output standing for it."""
        skip = self.skipped_in_a_row < self.max_skips and self.rng.uniform() < self.skip_probability(frames)
        if skip:
            self.skipped_in_a_row += 1
        else:
            self.previous, self.skipped_in_a_row = np.array(frames, copy=True), 0
        return not skip


_CLOSED = object()


class DropOldestQueue:
    """A bounded first-in first-out queue whose `put` never blocks: when it is full the oldest item
    is dropped and counted, so a slow consumer sees the newest items. `close` ends `get`s."""

    def __init__(self, maxsize: int):
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, got {maxsize}.")
        self.items: collections.deque = collections.deque()
        self.maxsize, self.dropped = maxsize, 0
        self.ready = threading.Condition()

    def put(self, item: Any) -> None:
        with self.ready:
            if len(self.items) == self.maxsize:
                self.items.popleft()
                self.dropped += 1
            self.items.append(item)
            self.ready.notify()

    def close(self) -> None:
        """`get` returns None once the items before this call are taken."""
        with self.ready:
            self.items.append(_CLOSED)
            self.ready.notify_all()

    def get(self) -> Any:
        """The oldest item, waiting for one; None after `close`."""
        with self.ready:
            self.ready.wait_for(lambda: self.items)
            item = self.items.popleft()
            if item is _CLOSED:
                self.items.appendleft(_CLOSED)  # every later get ends too
                return None
            return item


@dataclasses.dataclass
class RunCounts:
    read: int = 0  # frames taken from the source
    dropped_in: int = 0  # frames the input queue dropped (the device was behind)
    skipped: int = 0  # frames the similarity filter skipped (the previous output stood for them)
    calls: int = 0  # stream calls
    dropped_out: int = 0  # outputs the output queue dropped (the writer was behind)
    written: int = 0


def run_threaded(step: Callable[[Any], np.ndarray], frames: Iterable[Any], write: Callable[[np.ndarray], None],
                 similarity: SimilarityFilter | None = None, queue_size: int = 2,
                 prepare: Callable[[Any], Any] = lambda frame: frame) -> RunCounts:
    """Feeds `frames` through `step` (a `Stream` call) with reading and `prepare` in one thread
    and `write` in another, each behind a drop-oldest queue of `queue_size`, so that the device
    loop in this thread waits on neither; a frame the filter skips repeats the last output.
    Returns what was read, dropped, skipped, called and written."""
    counts = RunCounts()
    inputs, outputs = DropOldestQueue(queue_size), DropOldestQueue(queue_size)
    stop = threading.Event()  # the device loop ended early: a live source stops being read

    def read():
        for frame in frames:
            if stop.is_set():
                break
            counts.read += 1
            inputs.put(prepare(frame))
        inputs.close()

    def drain():
        while (images := outputs.get()) is not None:
            write(images)
            counts.written += 1

    threads = [threading.Thread(target=read, daemon=True), threading.Thread(target=drain, daemon=True)]
    for thread in threads:
        thread.start()
    last = None
    try:
        while (frame := inputs.get()) is not None:
            if similarity is None or similarity(frame) or last is None:
                last = step(frame)
                counts.calls += 1
            else:
                counts.skipped += 1
            outputs.put(last)
    finally:
        stop.set()
        outputs.close()
        for thread in threads:
            thread.join()
        counts.dropped_in, counts.dropped_out = inputs.dropped, outputs.dropped
    return counts
