"""``solver="auto"`` skips the batched attempt after one that certified none of its elements
(every one a degenerate vertex), and tries it again after RETRY_EVERY calls, then after
twice as many each time it certifies nothing (convexddn.convex.route_memory).

The 15 × 15 assignment LP's vertices are primal degenerate (2k - 1 independent equalities
and k² - k bounds at 0 in R^{k²}): the batched path cannot certify them and every element
went per element after a batched attempt costing 6-8 times the per-element solve, on every
call. Expected values: scipy's ``linear_sum_assignment``, independent of both paths.
"""
from __future__ import annotations

import threading
import warnings

import cvxpy as cp
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from convexddn.convex import ConvexLayer
from convexddn.convex.batched import BatchedProgram
from convexddn.convex.route_memory import RETRY_EVERY, RETRY_MOST

F64 = torch.float64


def _assignment(k: int):
    C, X = cp.Parameter((k, k)), cp.Variable((k, k))
    ones = np.ones(k)
    return cp.Problem(cp.Minimize(cp.sum(cp.multiply(C, X))), [X @ ones == 1, X.T @ ones == 1, X >= 0]), C, X


def _attempts(monkeypatch) -> list:
    """One entry per batched attempt (the first of a call; its retries of elements are not counted)."""
    calls, original = [], BatchedProgram.__call__

    def counted(self, *values, **options):
        if "second_opinion" not in options and "decide_pairs" not in options:
            calls.append(options.get("per_element_next"))
        return original(self, *values, **options)

    monkeypatch.setattr(BatchedProgram, "__call__", counted)
    return calls


def _optimal(costs: torch.Tensor) -> np.ndarray:
    out = []
    for c in costs.numpy():
        r, col = linear_sum_assignment(c)
        out.append(c[r, col].sum())
    return np.array(out)


def test_degenerate_program_skips_the_batched_attempt_and_retries_it_with_backoff(monkeypatch):
    prob, C, X = _assignment(15)
    layer = ConvexLayer(prob, [C], [X])
    attempts = _attempts(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    calls = 1 + RETRY_EVERY + 2 * RETRY_EVERY + 1  # the first, the retry after 8, the one after 16 more, one skip
    at = []
    for i in range(calls):
        costs = torch.rand(2, 15, 15, generator=gen, dtype=F64)
        n = len(attempts)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = layer(costs)
        if len(attempts) > n:
            at.append(i)
        np.testing.assert_allclose((costs * out).sum((1, 2)).numpy(), _optimal(costs), rtol=0, atol=1e-8)
        assert layer.last_solve.backend == ["per_element"] * 2 and all(layer.last_solve.solved.tolist())
    # Batched at the first call, then after 8 calls, then (its retry certified nothing) after 16.
    assert at == [0, RETRY_EVERY, 3 * RETRY_EVERY]
    assert 4 * RETRY_EVERY <= RETRY_MOST


def test_a_program_the_batched_path_certifies_is_always_tried_batched(monkeypatch):
    x, q = cp.Variable(4), cp.Parameter(4)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - q)), [x >= 0, cp.sum(x) == 1])
    layer = ConvexLayer(prob, [q], [x])
    attempts = _attempts(monkeypatch)
    for _ in range(3):
        out = layer(torch.randn(3, 4, dtype=F64))
        assert layer.last_solve.backend == ["batched"] * 3
    assert attempts == [True] * 3
    assert torch.allclose(out.sum(-1), torch.ones(3, dtype=F64))


def test_solver_batched_and_other_threads_keep_their_own_routing(monkeypatch):
    prob, C, X = _assignment(15)
    forced = ConvexLayer(prob, [C], [X], solver="batched")
    auto = ConvexLayer(prob, [C], [X])
    attempts = _attempts(monkeypatch)
    costs = torch.rand(1, 15, 15, generator=torch.Generator().manual_seed(1), dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            forced(costs)
        assert len(attempts) == 2  # (solver="batched" asks for the batched path: every call)
        auto(costs)
        auto(costs)
        assert len(attempts) == 3  # (the second call skipped it)
        seen = []
        thread = threading.Thread(target=lambda: seen.append(auto(costs)))
        thread.start()
        thread.join()
    assert len(attempts) == 4  # (another thread learns for itself)
    assert abs(float((costs * seen[0]).sum()) - _optimal(costs)[0]) <= 1e-8
