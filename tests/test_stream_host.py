"""The stream's host side (`jaxfuse.stream.host`): the similarity filter skips at the rate its
formula predicts and never past its budget; the queues drop the oldest item when full and lose
nothing otherwise."""

import threading
import time

import numpy as np
import pytest

from jaxfuse.stream.host import CLOSED, FrameQueue, SimilarityFilter, run_threaded


def at_cosine(frame: np.ndarray, cosine: float, rng) -> np.ndarray:
    """A frame whose cosine similarity to `frame` is `cosine`."""
    unit = frame.ravel() / np.linalg.norm(frame)
    other = rng.standard_normal(unit.shape)
    other -= (other @ unit) * unit
    other /= np.linalg.norm(other)
    return (cosine * unit + np.sqrt(1 - cosine**2) * other).reshape(frame.shape)


@pytest.mark.parametrize("cosine, expected", [(0.97, 0.0), (0.98, 0.0), (0.99, 0.5), (0.995, 0.75), (1.0, 1.0)])
def test_skip_probability_follows_the_formula(cosine, expected):
    similarity = SimilarityFilter(threshold=0.98)
    frame = np.random.default_rng(0).standard_normal((2, 8, 8, 3))
    assert similarity(frame)  # the first frame always goes through
    probability = similarity.skip_probability(at_cosine(frame, cosine, np.random.default_rng(1)))
    assert probability == pytest.approx(expected, abs=1e-9)


def test_frames_at_one_similarity_skip_at_the_predicted_rate():
    rng = np.random.default_rng(2)
    similarity = SimilarityFilter(threshold=0.98, max_skips=10**6, seed=3)
    similarity(rng.standard_normal((4, 4, 3)))
    frames = 4000
    skipped = sum(not similarity(at_cosine(similarity.previous, 0.99, rng)) for _ in range(frames))
    assert abs(skipped / frames - 0.5) < 4 * np.sqrt(0.25 / frames)  # four standard deviations


def test_a_still_input_skips_all_but_one_frame_in_max_skips_plus_one():
    similarity = SimilarityFilter(threshold=0.98, max_skips=10)
    frame = np.ones((4, 4, 3))
    passed = [similarity(frame) for _ in range(1 + 11 * 5)]
    assert passed[0] and sum(passed[1:]) == 5 and all(passed[1:][10::11])


def test_a_changed_frame_goes_through_once_the_budget_is_spent():
    rng = np.random.default_rng(4)
    similarity = SimilarityFilter(threshold=0.98, max_skips=3, seed=0)
    frame = rng.standard_normal((4, 4, 3))
    assert similarity(frame)
    assert not any(similarity(frame) for _ in range(3))
    changed = at_cosine(frame, 0.9999, rng)  # skipped with probability 0.995 while the budget lasts
    assert similarity(changed) and np.array_equal(similarity.previous, changed)


def test_a_full_live_queue_drops_its_oldest_item():
    queue = FrameQueue(2)
    for item in range(5):
        queue.put(item)
    queue.close()
    assert [queue.get(), queue.get(), queue.get(), queue.get()] == [3, 4, CLOSED, CLOSED]
    assert queue.dropped == 3


def test_a_device_slower_than_its_source_drops_input_frames_and_counts_them():
    def slow_step(frame):
        time.sleep(0.02)
        return frame

    written = []
    counts = run_threaded(slow_step, range(50), written.append, queue_size=2)
    assert counts.read == 50 and counts.dropped_in > 0
    assert counts.calls + counts.dropped_in == counts.read  # every frame either ran or was dropped
    assert written == sorted(written) and written[-1] == 49  # in order, ending with the newest


def test_a_paced_source_loses_no_frame_and_skips_repeat_the_last_output():
    scenes = np.random.default_rng(5).standard_normal((3, 4, 4, 3))

    def paced():
        for i in range(30):
            time.sleep(0.002)
            yield scenes[i // 10]  # three still scenes of ten frames

    written, step_threads = [], set()

    def step(frame):
        step_threads.add(threading.get_ident())
        return frame * 2

    counts = run_threaded(step, paced(), written.append, SimilarityFilter(max_skips=4), queue_size=64)
    assert (counts.read, counts.dropped_in, counts.dropped_out, counts.written) == (30, 0, 0, 30)
    assert (counts.calls, counts.skipped) == (6, 24)  # per scene: its first frame, then the one after 4 skips
    assert all(np.array_equal(w, 2 * scenes[i // 10]) for i, w in enumerate(written))
    assert step_threads == {threading.get_ident()}  # the device loop runs in the caller's thread


def test_files_through_a_slow_device_lose_no_frame():
    def slow_step(frame):
        time.sleep(0.005)
        return frame

    written = []
    counts = run_threaded(slow_step, range(40), written.append, queue_size=2, live=False)
    assert (counts.read, counts.calls, counts.dropped_in, counts.dropped_out) == (40, 40, 0, 0)
    assert written == list(range(40))


def finished_within(seconds, fn):
    """fn() run in a thread: its result or what it raised; fails if it is still running after `seconds`."""
    outcome = {}

    def run():
        try:
            outcome["result"] = fn()
        except Exception as e:  # noqa: BLE001 -- compared by the test
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the run hangs"
    return outcome


def test_an_error_in_reading_writing_or_the_device_ends_the_run_and_is_raised():
    def broken_source():
        yield from range(3)
        raise OSError("frame 3 cannot be read")

    def broken_writer(_):
        raise OSError("the disk is full")

    def broken_step(_):
        raise RuntimeError("the device failed")

    for kwargs, message in [(dict(frames=broken_source(), write=lambda _: None), "frame 3"),
                            (dict(frames=range(50), write=broken_writer), "disk is full"),
                            (dict(frames=range(50), write=lambda _: None, step=broken_step), "device failed")]:
        kwargs.setdefault("step", lambda frame: frame)
        outcome = finished_within(10, lambda: run_threaded(queue_size=2, live=False, **kwargs))  # noqa: B023
        assert message in str(outcome.get("error")), outcome
