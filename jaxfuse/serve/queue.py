"""The image server's queue: bounded, and batching the jobs that can share a compiled program.

    queue = JobQueue(max_queue=64, max_batch=4, batch_wait_s=0.05)
    ticket = queue.submit(job)            # on the event loop; QueueFull, Stopped
    batch = queue.take(timeout_s=1.0)     # on the device thread: tickets, or [] when none came
    queued = queue.stop()                 # no more submits; the tickets still queued, for a 503

The oldest queued job picks the next batch: it and the later jobs with its `key`, in the order
they came, as many as fit `max_batch` images. The batch goes once it is full or its oldest job
has waited `batch_wait_s`, so a lone request waits at most that long for company. A ticket's
future carries its images; cancelling it (a client that went away, a timeout) takes the job out
of the queue if it has not started.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
import threading
import time
from collections.abc import Callable

import numpy as np

from jaxfuse.serve.jobs import Job


class QueueFull(Exception):
    """The queue holds `max_queue` jobs; `retry_after_s`: when room is likely."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"the queue is full; retry after {retry_after_s} s.")
        self.retry_after_s = retry_after_s


class Stopped(Exception):
    """The server is stopping: it takes no new job, and the queued ones will not run."""


@dataclasses.dataclass(eq=False)
class Ticket:
    """A queued job: its images come on `future` (a list of [H, W, 3] float32 arrays); `step` of
    `total` is its progress, `on_preview(index, images)` hears its previews (device thread)."""

    job: Job
    arrived: float
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    on_preview: Callable[[int, list[np.ndarray]], None] | None = None
    step: int = 0
    total: int = 0


class JobQueue:
    def __init__(self, max_queue: int, max_batch: int, batch_wait_s: float,
                 clock: Callable[[], float] = time.monotonic):
        if max_queue < 1 or max_batch < 1 or batch_wait_s < 0:
            raise ValueError(f"max_queue and max_batch must be at least 1 and batch_wait_s at least 0, got "
                             f"{max_queue}, {max_batch}, {batch_wait_s}.")
        self.max_queue, self.max_batch, self.batch_wait_s, self.clock = max_queue, max_batch, batch_wait_s, clock
        self.waiting: collections.deque[Ticket] = collections.deque()
        self.changed = threading.Condition()
        self.stopped = False
        self.batch_seconds = 1.0  # a recent batch's run time, for Retry-After

    def __len__(self) -> int:
        with self.changed:
            return len(self.waiting)

    def submit(self, job: Job, on_preview: Callable[[int, list[np.ndarray]], None] | None = None) -> Ticket:
        with self.changed:
            if self.stopped:
                raise Stopped("the server is stopping and takes no new requests.")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(self.retry_after_s())
            ticket = Ticket(job, self.clock(), on_preview=on_preview)
            self.waiting.append(ticket)
            self.changed.notify_all()
            return ticket

    def retry_after_s(self) -> int:
        """Seconds until the batches ahead of a new request are likely done (at least 1)."""
        images = sum(t.job.n for t in self.waiting)
        return max(1, math.ceil(math.ceil(images / self.max_batch) * self.batch_seconds))

    def forget(self, ticket: Ticket) -> None:
        """Takes `ticket` out of the queue if it is still there (its client left or timed out)."""
        with self.changed:
            if ticket in self.waiting:
                self.waiting.remove(ticket)

    def take(self, timeout_s: float) -> list[Ticket]:
        """The next batch, once it is full or its oldest job has waited `batch_wait_s`; [] when
        no job came within `timeout_s` or the queue is stopped. Cancelled tickets are dropped;
        the batch's tickets are marked running (their futures can no longer be cancelled)."""
        deadline = self.clock() + timeout_s
        with self.changed:
            while not self.stopped:
                self.drop_cancelled()
                now = self.clock()
                if self.waiting:
                    batch = self.batch()
                    ready = self.waiting[0].arrived + self.batch_wait_s
                    if sum(t.job.n for t in batch) >= self.max_batch or now >= ready:
                        for ticket in batch:
                            self.waiting.remove(ticket)
                        return [t for t in batch if t.future.set_running_or_notify_cancel()]
                    self.changed.wait(ready - now)
                elif now >= deadline:
                    return []
                else:
                    self.changed.wait(deadline - now)
            return []

    def batch(self) -> list[Ticket]:
        """The oldest job and the later ones that share its key and fit beside it."""
        first = self.waiting[0]
        batch, images = [first], first.job.n
        for ticket in list(self.waiting)[1:]:
            if ticket.job.key == first.job.key and images + ticket.job.n <= self.max_batch:
                batch.append(ticket)
                images += ticket.job.n
        return batch

    def drop_cancelled(self) -> None:
        for ticket in [t for t in self.waiting if t.future.cancelled()]:
            self.waiting.remove(ticket)

    def stop(self) -> list[Ticket]:
        """Takes no more jobs; returns the queued ones (emptied from the queue) and wakes `take`."""
        with self.changed:
            self.stopped = True
            queued, self.waiting = list(self.waiting), collections.deque()
            self.changed.notify_all()
            return queued
