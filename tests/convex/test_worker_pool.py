"""Tests of convexddn.convex.worker_pool (the per-element path's processes are exercised
through ConvexLayer(workers=k) in test_layer.py)."""
from __future__ import annotations

import ctypes
import pickle

import numpy as np
import pytest

from convexddn.convex.worker_pool import WorkerPool, chunks
from convexddn.errors import WorkerError


def test_chunks_cover_the_batch_in_order_without_empty_ones():
    for batch, workers in ((1, 4), (5, 2), (7, 3), (8, 8), (3, 10)):
        parts = chunks(batch, workers)
        assert len(parts) == min(batch, workers)
        assert all(p.size for p in parts)
        assert np.concatenate(parts).tolist() == list(range(batch))


def test_no_pool_for_one_worker_or_one_element():
    assert WorkerPool(1).get(64) is None
    assert WorkerPool(2).get(1) is None


def test_a_pickled_pool_starts_without_processes():
    pool = WorkerPool(2)
    copy = pickle.loads(pickle.dumps(pool))
    assert copy.workers == 2 and copy._executor is None and copy._pid is None


def test_a_crashed_worker_is_reported_as_a_possible_crash_with_its_signal():
    """A worker that dies of a segmentation fault (a read of address 0 here; a singular
    matrix inside SuperLU in the report) was reported with a missing
    ``if __name__ == '__main__':`` guard as the cause; the message names the signal and
    the possible causes instead, and the pool is dropped for a fresh one."""
    pool = WorkerPool(2)
    with pytest.raises(WorkerError, match=r"died \(exit codes: [^)]*SIGSEGV") as info:
        pool.gather(pool.get(2), [(ctypes.string_at, 0)])
    assert "may have crashed" in str(info.value) and "or, as worker processes are spawned" in str(info.value)
    assert ".." not in str(info.value)  # (the pool's own message ends with a period)
    assert pool._executor is None
