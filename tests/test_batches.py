"""The input boundary: in-memory batches, and `Prefetch`, which reads a source ahead in a thread."""

import threading

import numpy as np
import pytest

from dit.batches import ArrayBatches, Prefetch


def source(n=32, batch=4):
    x = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1, 2, 2, 1), np.float32)
    return ArrayBatches(x, np.arange(n) % 3, batch, seed=0)


def test_array_batches_hold_the_latents_as_they_are():
    batch = source().next()
    assert batch.mean.shape == batch.std.shape == (4, 1, 2, 2, 1) and (batch.std == 0).all()
    np.testing.assert_array_equal(batch.label, batch.mean[:, 0, 0, 0, 0].astype(int) % 3)


def test_prefetch_hands_out_the_sources_batches_in_order_with_the_state_of_the_last_one():
    straight = source()
    expected = [(straight.next(), straight.get_state()) for _ in range(6)]
    with Prefetch(source(), put=lambda batch: batch.mean, count=6, depth=2) as batches:
        for batch, state in expected:
            np.testing.assert_array_equal(batches.next(), batch.mean)
            # What a checkpoint saves: the position after this batch, not after the ones read ahead.
            assert batches.get_state() == state
        with pytest.raises(RuntimeError, match="all `count` batches"):
            batches.next()


def test_an_error_in_the_reading_thread_is_raised_by_next():
    class Failing(ArrayBatches):
        def next(self):
            if self.get_state()["position"] == 8:
                raise OSError("disk gone")
            return super().next()

    reading = source()
    with Prefetch(Failing(reading.x, reading.y, 4, seed=0), put=lambda batch: batch, count=5) as batches:
        batches.next(), batches.next()  # the two batches read before the failure still arrive
        with pytest.raises(OSError, match="disk gone"):
            batches.next()
        with pytest.raises(OSError, match="disk gone"):  # again, rather than waiting on an ended thread
            batches.next()


def test_leaving_the_context_stops_the_thread():
    before = threading.active_count()
    with Prefetch(source(), put=lambda batch: batch, count=1000, depth=1) as batches:
        batches.next()
        assert threading.active_count() == before + 1  # blocked on a full queue, far from its count
    assert threading.active_count() == before
