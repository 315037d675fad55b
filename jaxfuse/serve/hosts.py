"""Batches handed from process 0, which serves HTTP, to every process of a multi-host server, so
the whole slice runs one SPMD program per batch.

    channel = Channel()                               # after jax.distributed is initialized
    channel.send(Message("batch", jobs))              # process 0
    message = channel.receive()                       # every other process: the same message

A message is broadcast over `jax.distributed` (`parallel.mesh.broadcast_from_first`) in two
or more parts: its length, its JSON (padded to a power of two, so that few broadcast programs
are compiled; it names each job's picture's shape, or none), and the jobs' input pictures
(float32) when a batch has any. Every process must broadcast the same shapes and dtypes in the
same order, or the collectives mismatch. While no request comes, process 0 sends "idle" every
`HEARTBEAT_S`, so no process waits in a collective for long; "stop" ends every process's loop.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from jaxfuse.parallel.mesh import broadcast_from_first
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
        # float32 as `receive` expects: a broadcast of another dtype would be another program.
        images = [None if j.image is None else np.ascontiguousarray(j.image, np.float32) for j in message.jobs]
        header = json.dumps({"kind": message.kind, "jobs": [j.describe() for j in message.jobs],
                             "images": [None if i is None else list(i.shape) for i in images]}).encode()
        self.broadcast(np.array([len(header)], np.int32))
        self.broadcast(np.frombuffer(header.ljust(padded_length(len(header)), b"\0"), np.uint8))
        for image in images:
            if image is not None:
                self.broadcast(image)

    def receive(self) -> Message:
        (length,) = self.broadcast(np.zeros(1, np.int32))
        data = self.broadcast(np.zeros(padded_length(int(length)), np.uint8))
        header = json.loads(data[:length].tobytes())
        images = [None if shape is None else self.broadcast(np.zeros(shape, np.float32)) for shape in header["images"]]
        jobs = tuple(Job(**job, image=image) for job, image in zip(header["jobs"], images, strict=True))
        return Message(header["kind"], jobs)

    @staticmethod
    def broadcast(value: np.ndarray) -> np.ndarray:
        return broadcast_from_first(value)
