"""The image server's queue on its own (no model): which jobs share a batch, when a batch leaves,
a full queue's Retry-After, cancelling, stopping; and the batch sizes programs are compiled for."""

import threading

import pytest

from jaxfuse.serve.jobs import Job
from jaxfuse.serve.queue import JobQueue, QueueFull, Stopped
from jaxfuse.serve.worker import batch_sizes


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def job(n=1, height=256, steps=4, prompt="a red circle"):
    return Job(prompt, None, n, height, 256, steps, 5.0, 0, "euler")


def queue(max_queue=8, max_batch=4, wait=0.5, clock=None):
    return JobQueue(max_queue, max_batch, wait, clock=clock or Clock())


def test_a_batch_is_the_oldest_job_and_the_later_ones_that_share_its_key_and_fit():
    q = queue(wait=0.0)
    a, b, c, d, e = (q.submit(j) for j in (job(2), job(steps=8), job(1), job(2), job(1)))
    # a (2 images) + c (1) fit 4; d (2) would make 5; e (1) makes 4. b has other steps: the next batch.
    assert q.take(0) == [a, c, e]
    assert q.take(0) == [b]
    assert q.take(0) == [d]
    assert q.take(0) == [] and len(q) == 0


def test_a_lone_job_waits_for_company_at_most_batch_wait():
    clock = Clock()
    q = queue(wait=0.5, clock=clock)
    first = q.submit(job())
    taken = []
    thread = threading.Thread(target=lambda: taken.append(q.take(timeout_s=10)))
    thread.start()
    thread.join(0.2)
    assert thread.is_alive()  # not full, not waited long enough (the clock stands still)
    clock.now = 0.5
    with q.changed:
        q.changed.notify_all()
    thread.join(5)
    assert taken == [[first]]


def test_a_full_batch_leaves_at_once():
    q = queue(wait=100.0)
    tickets = [q.submit(job(2)) for _ in range(2)]
    assert q.take(timeout_s=0) == tickets


def test_a_full_queue_refuses_with_the_time_its_batches_take():
    q = queue(max_queue=3, max_batch=2)
    q.batch_seconds = 2.5
    for _ in range(3):
        q.submit(job(2))
    with pytest.raises(QueueFull) as refused:
        q.submit(job())
    assert refused.value.retry_after_s == 8  # 3 batches of 2 images ahead, 2.5 s each, rounded up


def test_a_cancelled_ticket_never_runs_and_a_taken_one_cannot_be_cancelled():
    q = queue(wait=0.0)
    gone, kept = q.submit(job()), q.submit(job())
    assert gone.future.cancel()
    assert q.take(0) == [kept]
    assert not kept.future.cancel()  # running: its result is discarded instead
    left = q.submit(job())
    q.forget(left)
    assert len(q) == 0 and q.take(0) == []


def test_stop_returns_the_queued_jobs_and_refuses_new_ones():
    q = queue()
    tickets = [q.submit(job()) for _ in range(3)]
    assert q.stop() == tickets and len(q) == 0
    assert q.take(timeout_s=10) == []  # at once: a stopped queue gives nothing
    with pytest.raises(Stopped):
        q.submit(job())


@pytest.mark.parametrize("max_batch, sizes", [(1, [1]), (4, [1, 2, 4]), (6, [1, 2, 4, 6]), (8, [1, 2, 4, 8])])
def test_batches_are_padded_to_powers_of_two_and_the_largest(max_batch, sizes):
    assert batch_sizes(max_batch) == sizes
