"""Batches handed from process 0, which serves HTTP, to every process of a multi-host server, so
the whole slice runs one SPMD program per batch.

    channel = Channel()                               # after jax.distributed is initialized
    channel.send(Message("batch", jobs))              # process 0
    message = channel.receive()                       # every other process: the same message

A message is broadcast over `jax.distributed` (`multihost_utils.broadcast_one_to_all`) in two
or three parts: its length, its JSON (padded to a power of two, so that few broadcast programs
are compiled), and the jobs' input pictures when a batch has any. While no request comes,
process 0 sends "idle" every `HEARTBEAT_S`, so no process waits in a collective for long; "stop"
ends every process's loop.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
from jax.experimental import multihost_utils

from jaxfuse.serve.jobs import Job

HEARTBEAT_S = 1.0
MIN_MESSAGE_BYTES = 4096


@dataclasses.dataclass(frozen=True)
class Message:
    """"batch" (run `jobs`), "idle" (nothing yet) or "stop"."""

    kind: str
    jobs: tuple[Job, ...] = ()


def padded_length(size: int) -> int:
    return max(MIN_MESSAGE_BYTES, 1 << (size - 1).bit_length())


class Channel:
    """Process 0's messages to all processes (every process calls `send` or `receive` in step)."""

    def send(self, message: Message) -> None:
        images = [j.image for j in message.jobs if j.image is not None]
        header = json.dumps({"kind": message.kind, "jobs": [j.describe() for j in message.jobs],
                             "images": [list(i.shape) for i in images]}).encode()
        self.broadcast(np.array([len(header)], np.int32))
        self.broadcast(np.frombuffer(header.ljust(padded_length(len(header)), b"\0"), np.uint8))
        for image in images:
            self.broadcast(image)

    def receive(self) -> Message:
        (length,) = self.broadcast(np.zeros(1, np.int32))
        data = self.broadcast(np.zeros(padded_length(int(length)), np.uint8))
        header = json.loads(data[:length].tobytes())
        images = iter([self.broadcast(np.zeros(shape, np.float32)) for shape in header["images"]])
        # A job has a picture exactly when it has a strength (image to image).
        jobs = tuple(Job(**job, image=next(images) if job["strength"] is not None else None)
                     for job in header["jobs"])
        return Message(header["kind"], jobs)

    @staticmethod
    def broadcast(value: np.ndarray) -> Any:
        return np.asarray(multihost_utils.broadcast_one_to_all(value))
