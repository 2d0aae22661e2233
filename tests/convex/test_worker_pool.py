"""Tests of convexddn.convex.worker_pool (the per-element path's processes are exercised
through ConvexLayer(workers=k) in test_layer.py)."""
from __future__ import annotations

import pickle

import numpy as np

from convexddn.convex.worker_pool import WorkerPool, chunks


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
