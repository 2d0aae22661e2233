"""A degenerate LP vertex the batched path cannot certify goes to the per-element path after
one batched attempt, not three.

An assignment LP ``min <C, X>`` s.t. ``X 1 = 1``, ``Xᵀ 1 = 1``, ``X >= 0`` has a permutation
at every vertex: 2k - 1 independent equalities and k² - k bounds at 0 hold in R^{k²}, so the
active rows are dependent (primal degenerate), the limit KKT system there is singular and
the batched path's error estimate cannot be formed. The iterations again (pairs decided)
and Clarabel's point (the second opinion) end at the same vertex: before, each of the three
attempts took the same failed polishes and active-set steps (15 × 15 at batch 8: 42 LU
factorisations, 1.6 s against 0.08 s per element). Expected values: scipy's
``linear_sum_assignment`` (the Hungarian method), independent of both paths.
"""
from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from convexddn.convex import ConvexLayer
from convexddn.convex.batched import BatchedProgram

F64 = torch.float64


def _assignment(k: int):
    C, X = cp.Parameter((k, k)), cp.Variable((k, k))
    ones = np.ones(k)
    prob = cp.Problem(cp.Minimize(cp.sum(cp.multiply(C, X))), [X @ ones == 1, X.T @ ones == 1, X >= 0])
    return prob, C, X


def _costs(batch: int, k: int) -> torch.Tensor:
    return torch.rand(batch, k, k, generator=torch.Generator().manual_seed(0), dtype=F64)


def _count_calls(monkeypatch) -> list:
    """Each BatchedProgram call's keyword options, recorded."""
    calls, original = [], BatchedProgram.__call__

    def counted(self, *values, **options):
        calls.append(sorted(options))
        return original(self, *values, **options)

    monkeypatch.setattr(BatchedProgram, "__call__", counted)
    return calls


@pytest.mark.parametrize("k, batch", [(6, 3), (15, 8)])
def test_degenerate_assignment_lp_takes_one_batched_attempt_then_per_element(monkeypatch, k, batch):
    prob, C, X = _assignment(k)
    layer = ConvexLayer(prob, [C], [X])
    costs = _costs(batch, k)
    calls = _count_calls(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = layer(costs)
    # One batched attempt: neither the iterations again (decide_pairs) nor Clarabel's point
    # (second_opinion) for elements flagged as a degenerate vertex.
    assert len(calls) == 1 and calls[0] == ["per_element_next", "where"], calls
    info = layer.last_solve
    assert info.solved.all()
    assert info.backend == ["per_element"] * batch
    for i in range(batch):
        rows, cols = linear_sum_assignment(costs[i].numpy())
        perm = np.zeros((k, k))
        perm[rows, cols] = 1.0
        np.testing.assert_allclose(out[i].numpy(), perm, atol=1e-8)
        assert abs(float((costs[i] * out[i]).sum()) - costs[i].numpy()[rows, cols].sum()) < 1e-8


def test_the_batched_path_flags_the_vertex_it_cannot_certify():
    """BatchedProgram alone: the elements stay unsolved (it has no fallback) with the DEGENERATE
    bit in their points; a nondegenerate LP beside it (a box, one bound active per variable) is
    solved without the bit."""
    from convexddn.convex.measures import DEGENERATE

    prob, C, X = _assignment(6)
    (_,), info = BatchedProgram(prob, [C], [X])(_costs(3, 6))
    assert not info.solved.any()
    assert all(bits & DEGENERATE for bits in info.points.tolist())
    c, x = cp.Parameter(4), cp.Variable(4)
    box = BatchedProgram(cp.Problem(cp.Minimize(c @ x), [x >= -1, x <= 1]), [c], [x])
    (y,), info = box(torch.tensor([[1.0, -2.0, 3.0, -0.5]], dtype=F64))
    assert info.solved.all() and not any(bits & DEGENERATE for bits in info.points.tolist())
    torch.testing.assert_close(y, torch.tensor([[-1.0, 1.0, -1.0, 1.0]], dtype=F64), rtol=0, atol=1e-9)


def test_forward_mode_keeps_the_batched_retries_of_a_degenerate_vertex():
    """Forward mode is differentiated on the batched path only, so there the retries stay: of the
    assignment LP k = 3 (costs seed 3, elements 0, 1, 19 of 48), element 19 is flagged degenerate
    after the first attempt and certified by the second opinion's retry. With the shortcut taken
    in forward mode too it went per element, and forward mode was refused (ProblemError). Its
    optimum is unique (a permutation, linear_sum_assignment), so X is locally constant in C: the
    tangent is 0."""
    import torch.autograd.forward_ad as fwAD

    k = 3
    prob, C, X = _assignment(k)
    costs = torch.rand(48, k, k, dtype=F64, generator=torch.Generator().manual_seed(k))[[0, 1, 19]]
    layer = ConvexLayer(prob, [C], [X])
    with warnings.catch_warnings(), fwAD.dual_level():
        warnings.simplefilter("ignore")
        out = layer(fwAD.make_dual(costs, torch.ones_like(costs)))
        primal, tangent = fwAD.unpack_dual(out)
    for b in range(3):
        rows, cols = linear_sum_assignment(costs[b].numpy())
        want = np.zeros((k, k))
        want[rows, cols] = 1.0
        assert np.abs(primal[b].numpy() - want).max() <= 1e-8
    assert float(tangent.abs().max()) <= 1e-12


def _working_set_sizes(monkeypatch) -> list:
    """The working-set sizes of each active-set step's elements, ``(before, after)``, recorded
    (one element per solve below: its own sequence)."""
    import convexddn.convex.active_set as active_set

    sizes, original = [], active_set._step

    def counted(*args):
        out = original(*args)
        sizes.append((args[8].sum(1).tolist(), out[0][1].sum(1).tolist()))
        return out

    monkeypatch.setattr(active_set, "_step", counted)
    return sizes


def _repeats_above(sizes: list, n: int) -> bool:
    """Whether a single element's steps came back to a working-set size above ``n`` they had had
    and stepped on from there."""
    seen = {sizes[0][0][0]} if sizes else set()
    for before, after in sizes[:-1]:
        if after[0] > n and after[0] in seen:
            return True
        seen.add(after[0])
    return False


@pytest.mark.parametrize("element", [0, 2])
def test_active_set_steps_stop_cycling_at_the_vertex_where_the_per_element_path_comes_next(monkeypatch, element):
    """15 × 15 at batch 1: the active-set steps at the degenerate vertex (239 rows in R^225) release
    rows that rejoin at once and cycle through the same working-set sizes (element 2: 239 -> 232 ->
    233 -> 232 -> ...), 11 steps that end 4 to 8 rows over, which no estimate certifies. Where the
    per-element path comes next they stop once a size comes again; the answer is the same (the
    per-element path's, against linear_sum_assignment)."""
    k = 15
    prob, C, X = _assignment(k)
    costs = _costs(8, k)[element:element + 1]
    sizes = _working_set_sizes(monkeypatch)
    layer = ConvexLayer(prob, [C], [X])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = layer(costs)
    assert sizes and sizes[0][0][0] > k * k  # (the steps ran from the degenerate vertex)
    assert not _repeats_above(sizes, k * k), sizes
    assert layer.last_solve.backend == ["per_element"]
    rows, cols = linear_sum_assignment(costs[0].numpy())
    assert abs(float((costs[0] * out[0]).sum()) - costs[0].numpy()[rows, cols].sum()) < 1e-8


def test_batched_only_use_keeps_every_active_set_step():
    """Without the per-element path next (BatchedProgram alone, as forward mode's), the steps run as
    before: element 2 of the same costs comes back to a size it had and steps on."""
    k = 15
    prob, C, X = _assignment(k)
    with pytest.MonkeyPatch.context() as mp:
        sizes = _working_set_sizes(mp)
        BatchedProgram(prob, [C], [X])(_costs(8, k)[2:3])
    assert _repeats_above(sizes, k * k), sizes
