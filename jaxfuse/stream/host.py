"""The stream's host side: the stochastic similarity filter, drop-oldest queues, and the threads
that keep pre- and post-processing off the device's path.

    similarity = SimilarityFilter(threshold=0.98, max_skips=10, seed=0)
    run_threaded(stream, frames, write, similarity, queue_size=2)  # -> RunCounts
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


CLOSED = object()  # what `FrameQueue.get` returns once the queue is closed (None is a frame: text to image)


class FrameQueue:
    """A bounded first-in first-out queue between two threads. With `drop_oldest` (a live source)
    `put` never waits: when the queue is full the oldest item is dropped and counted, so a slow
    consumer sees the newest items; without it (files) `put` waits for room and nothing is lost.
    After `close`, `get` returns the items put before it, then `CLOSED`, and `put` (a waiting one
    too) drops its item: a side that stops never leaves the other waiting."""

    def __init__(self, maxsize: int, drop_oldest: bool = True):
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, got {maxsize}.")
        self.items: collections.deque = collections.deque()
        self.maxsize, self.drop_oldest, self.dropped, self.closed = maxsize, drop_oldest, 0, False
        self.changed = threading.Condition()

    def put(self, item: Any) -> None:
        with self.changed:
            if len(self.items) >= self.maxsize and not self.closed:
                if self.drop_oldest:
                    self.items.popleft()
                    self.dropped += 1
                else:
                    self.changed.wait_for(lambda: len(self.items) < self.maxsize or self.closed)
            if not self.closed:
                self.items.append(item)
            self.changed.notify_all()

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify_all()

    def get(self) -> Any:
        """The oldest item, waiting for one; `CLOSED` once the queue is closed and empty."""
        with self.changed:
            self.changed.wait_for(lambda: self.items or self.closed)
            item = self.items.popleft() if self.items else CLOSED
            self.changed.notify_all()
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
                 similarity: Callable[[Any], bool] | None = None, queue_size: int = 2,
                 prepare: Callable[[Any], Any] = lambda frame: frame, live: bool = True) -> RunCounts:
    """Feeds `frames` through `step` (a `Stream` call) with reading and `prepare` in one thread
    and `write` in another, each behind a `FrameQueue` of `queue_size` (dropping the oldest item
    when `live`; waiting, for files), so that the device loop in this thread waits on neither; a
    frame `similarity` (a `SimilarityFilter`, or any test of a prepared frame) skips repeats the
    last output. Returns what was read, dropped, skipped,
    called and written; an error in reading or writing ends the run and is raised here."""
    counts = RunCounts()
    inputs, outputs = FrameQueue(queue_size, live), FrameQueue(queue_size, live)
    failures: list[BaseException] = []  # what a thread raised: it ends the run and is raised here

    def read():
        try:
            for frame in frames:
                if inputs.closed:  # the device loop ended early: a live source stops being read
                    break
                counts.read += 1
                inputs.put(prepare(frame))
        except BaseException as e:  # handed to the caller's thread
            failures.append(e)
        finally:
            inputs.close()

    def drain():
        try:
            while (images := outputs.get()) is not CLOSED:
                write(images)
                counts.written += 1
        except BaseException as e:  # handed to the caller's thread
            failures.append(e)
            outputs.close()

    threads = [threading.Thread(target=read, daemon=True), threading.Thread(target=drain, daemon=True)]
    for thread in threads:
        thread.start()
    last = None
    try:
        while not outputs.closed and (frame := inputs.get()) is not CLOSED:
            if similarity is None or similarity(frame) or last is None:
                last = step(frame)
                counts.calls += 1
            else:
                counts.skipped += 1
            outputs.put(last)
    finally:
        inputs.close()
        outputs.close()
        for thread in threads:
            thread.join()
        counts.dropped_in, counts.dropped_out = inputs.dropped, outputs.dropped
    if failures:
        raise failures[0]
    return counts
