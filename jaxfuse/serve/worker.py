"""The image server's device side: batches of jobs made into one request each and run through
the pipeline, on one thread, in every process.

    worker = Worker(pipe, served, queue, channel)     # channel: None on one host
    worker.warm([(256, 256)])                         # every batch size's programs, before listening
    worker.serve()                                    # process 0: until the queue stops
    follow(pipe, served, max_batch, channel)          # every other process: until process 0 stops

A batch's rows are its jobs' images in order, padded to the next of `batch_sizes(max_batch)`
by repeating the last row, so that a few compiled programs serve any batch: `warm` compiles
them all, and no request waits for a compile. Image i of a job has the seed `seed + i` and its
own row's noise, so it equals the image a one-image request with that seed makes.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence

import numpy as np

from jaxfuse.pipeline.request import NonFiniteError, Request
from jaxfuse.pipeline.sdxl import Preview, SDXLPipeline
from jaxfuse.serve.hosts import HEARTBEAT_S, Channel, Message
from jaxfuse.serve.jobs import DEFAULT_GUIDANCE, Job, Served
from jaxfuse.serve.metrics import Metrics
from jaxfuse.serve.queue import JobQueue, Ticket


class GenerationFailed(RuntimeError):
    """A batch that ran and failed (a non-finite result, the device); the message says why."""


def batch_sizes(max_batch: int) -> list[int]:
    """The batch sizes programs are compiled for: powers of two below `max_batch`, and it."""
    return sorted({1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch} | {max_batch})


def batch_request(jobs: Sequence[Job], served: Served, max_batch: int) -> Request:
    """The jobs (one key) as one request, its rows padded to a compiled batch size."""
    rows = [(job, seed) for job in jobs for seed in job.seeds]
    size = next(b for b in batch_sizes(max_batch) if b >= len(rows))
    rows += [rows[-1]] * (size - len(rows))
    first = jobs[0]
    images = None if first.image is None else np.stack([job.image for job, _ in rows])
    request = Request.parse(served.spec, [job.prompt for job, _ in rows],
                            None if first.negative_prompt is None else [job.negative_prompt for job, _ in rows],
                            height=first.height, width=first.width, num_inference_steps=first.steps,
                            guidance_scale=first.guidance_scale, seed=[seed for _, seed in rows],
                            scheduler=first.scheduler, image=images,
                            strength=1.0 if first.strength is None else first.strength)
    return request.spread(served.spec, served.layout(first.height, request.steps_run))


def warm_jobs(sizes: Sequence[tuple[int, int]], steps: int, max_batch: int) -> list[list[Job]]:
    """For each size, a batch of each compiled batch size, as a request naming nothing else runs."""
    return [[Job("", None, batch, height, width, steps, DEFAULT_GUIDANCE, 0, "euler")]
            for height, width in sizes for batch in batch_sizes(max_batch)]


def run_batch(pipe: SDXLPipeline, request: Request, jobs: Sequence[Job],
              progress: Callable[[int, int], None] | None = None,
              show: Callable[[int, np.ndarray], None] = lambda step, images: None) -> list[list[np.ndarray]]:
    """The batch's request run: each job's images, [H, W, 3] float32 in [0, 1]. The latents are
    decoded after every step a job wants a preview of, and `show(step, images)` hears them: in
    every process alike, since a decode is a program every process must run."""
    wanted = frozenset().union(*(job.preview_steps(request.steps_run) for job in jobs))
    images = pipe.run(request, progress, Preview(wanted, show) if wanted else None).images
    return per_job(images, jobs)


def per_job(images: np.ndarray, jobs: Sequence[Job]) -> list[list[np.ndarray]]:
    """A batch's images [B, H, W, 3] (padding rows last) -> each job's, in order."""
    offsets = np.cumsum([0] + [job.n for job in jobs])
    return [list(images[start:end]) for start, end in zip(offsets[:-1], offsets[1:])]


class Worker:
    """Process 0's device thread: takes batches from the queue, hands each to the other processes
    (`channel`), runs it, and answers its tickets."""

    def __init__(self, pipe: SDXLPipeline, served: Served, queue: JobQueue, channel: Channel | None = None,
                 metrics: Metrics | None = None):
        self.pipe, self.served, self.queue, self.channel = pipe, served, queue, channel
        self.metrics = metrics or Metrics()
        self.running: list[Ticket] = []  # the batch on the device now (read by the progress endpoint)
        self.started = 0.0
        self.others_stopped = False

    def warm(self, sizes: Sequence[tuple[int, int]], steps: int) -> None:
        """Compiles every batch size's programs for `sizes` at `steps` (in every process)."""
        for jobs in warm_jobs(sizes, steps, self.queue.max_batch):
            self.send(Message("batch", tuple(jobs)))
            run_batch(self.pipe, batch_request(jobs, self.served, self.queue.max_batch), jobs)

    def send(self, message: Message) -> None:
        if self.channel is not None and not self.others_stopped:
            self.channel.send(message)

    def stop_others(self) -> None:
        """Tells the other processes to stop (once: after "stop" they no longer listen)."""
        self.send(Message("stop"))
        self.others_stopped = True

    def serve(self) -> None:
        """Runs batches until the queue stops; then tells the other processes to stop."""
        try:
            while not self.queue.stopped:
                tickets = self.queue.take(HEARTBEAT_S)
                if tickets:
                    self.run(tickets)
                elif not self.queue.stopped:
                    self.send(Message("idle"))
        finally:
            self.stop_others()

    def run(self, tickets: list[Ticket]) -> None:
        jobs = [t.job for t in tickets]
        self.running, self.started = tickets, time.monotonic()
        self.send(Message("batch", tuple(jobs)))
        request = batch_request(jobs, self.served, self.queue.max_batch)
        self.metrics.batch(sum(job.n for job in jobs), request.batch)
        previews = {t: sorted(t.job.preview_steps(request.steps_run)) for t in tickets}

        def progress(step: int, total: int) -> None:
            for ticket in tickets:
                ticket.step, ticket.total = step, total

        def show(step: int, images: np.ndarray) -> None:
            for (ticket, steps), own in zip(previews.items(), per_job(images, jobs)):
                if step in steps:
                    ticket.on_preview(steps.index(step), own)

        try:
            results = run_batch(self.pipe, request, jobs, progress, show)
        except Exception as e:  # noqa: BLE001 -- the server goes on; the batch's clients hear why
            shown(e)
            for ticket in tickets:
                ticket.future.set_exception(GenerationFailed(str(e)))
        else:
            for ticket, images in zip(tickets, results):
                ticket.future.set_result(images)
        finally:
            self.queue.batch_seconds = time.monotonic() - self.started
            self.running = []


def follow(pipe: SDXLPipeline, served: Served, max_batch: int, channel: Channel) -> None:
    """A process other than 0: runs each batch process 0 sends, until it sends "stop"."""
    while (message := channel.receive()).kind != "stop":
        if message.kind == "batch":
            try:
                run_batch(pipe, batch_request(message.jobs, served, max_batch), message.jobs)
            except Exception as e:  # noqa: BLE001 -- process 0 fails alike and tells its clients
                shown(e)


def shown(error: Exception) -> None:
    """A failed batch's error on stderr, whole, unless it is the device's or the weights' (a
    non-finite result), which the clients are told: anything else is a bug."""
    if not isinstance(error, (NonFiniteError, RuntimeError)):
        traceback.print_exception(error)

