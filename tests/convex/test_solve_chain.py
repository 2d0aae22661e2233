"""The per-element solve after the first solver fails (:mod:`convexddn.convex.solve_chain`): a certificate
whose ray is not exact to rounding is weighed against Clarabel's run whichever solver the user chose
(solver="SCS", whose fallback is SCS itself, and "ECOS", which errors on exponential cones and leaves SCS
alone, raised UnboundedError on a bounded problem); exact rays still decide with no other solver run."""
from __future__ import annotations

import math
import warnings

import cvxpy as cp
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import convexddn as cddn
from convexddn.convex.per_element import CheckedDiffcp
from convexddn.errors import SolverError, SolverWarning, UnboundedError

F64 = torch.float64


def _counted(monkeypatch) -> list[str]:
    """The solvers the per-element path runs, in order (counted, not timed)."""
    calls: list[str] = []
    real = CheckedDiffcp._solve_with

    def counted(self, method, *args, **kwargs):
        calls.append(method)
        return real(self, method, *args, **kwargs)

    monkeypatch.setattr(CheckedDiffcp, "_solve_with", counted)
    return calls


@pytest.mark.parametrize("solver", ["SCS", "ECOS"])
def test_negative_entropy_minus_a_large_linear_term_is_solved_not_unbounded(solver):
    # min -sum(entr(y)) - a.y = sum(y log y - a y) is bounded below; its minimiser is y = exp(a - 1) (closed
    # form: log y + 1 - a = 0), ~1e8 here. SCS's ray lies 6e-10 off K_exp: it excludes dual points below ~1e9
    # only. Raised UnboundedError "certificate verified" with both solvers (no other solver had run).
    rng = np.random.default_rng(1)
    a = torch.tensor(rng.normal(size=3) * 0.5, dtype=F64) + 1 + math.log(1e8)
    ap, y = cp.Parameter(3), cp.Variable(3)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(-cp.sum(cp.entr(y)) - ap @ y)), [ap], [y], solver=solver)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = layer(a.unsqueeze(0))[0]
    except SolverError as err:
        assert type(err) is SolverError and "unbounded not certain" in str(err), err
        return
    ref = torch.exp(a - 1)
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-6
    # Solved by another solver than the one chosen: the caller is told.
    assert any(issubclass(w.category, SolverWarning) and "Clarabel" in str(w.message) for w in caught)


def test_with_no_fallback_a_certificate_not_exact_is_not_certain():
    # fallback=None: no other solver's solution is returned, yet Clarabel's opinion still weighs the claim.
    # The problem is bounded (minimiser exp(a - 1)): a SolverError saying so, not UnboundedError.
    a, y = cp.Parameter(3), cp.Variable(3)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(-cp.sum(cp.entr(y)) - a @ y)), [a], [y], solver="SCS",
                             fallback=None)
    av = torch.tensor(np.random.default_rng(1).normal(size=3) * 0.5, dtype=F64) + 1 + math.log(1e8)
    with pytest.raises(SolverError, match="unbounded not certain") as err:
        layer(av)
    assert type(err.value) is SolverError


@pytest.mark.parametrize("solver", ["Clarabel", "SCS", "ECOS"])
@pytest.mark.parametrize("bound", [1e2, 1e6])
def test_exponential_cone_program_unbounded_along_a_known_ray_still_raises(solver, bound):
    # min -y - 3z s.t. exp(z) <= y, |z| <= bound: unbounded along (y, z) = (1, 0) (y grows, exp(z) <= y stays).
    # At bound 1e6 SCS's ray is not exact to rounding: Clarabel is consulted, and confirms it.
    y, z, p = cp.Variable(), cp.Variable(), cp.Parameter()
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(-y - p * z), [cp.exp(z) <= y, z >= -bound, z <= bound]),
                             [p], [y], solver=solver)
    with pytest.raises(UnboundedError) as err:
        layer(torch.tensor(3.0, dtype=F64))
    assert type(err.value) is UnboundedError


@pytest.mark.parametrize("solver", ["SCS", "ECOS"])
def test_lp_unbounded_along_an_exact_ray_raises_with_no_other_solver(solver, monkeypatch):
    # min -x0 - x1 s.t. x0 - x1 <= 1, x >= 0: unbounded along (1, 1), exactly (-A d = (0, 1, 1) in K).
    a, x = cp.Parameter(2), cp.Variable(2)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(-cp.sum(x)), [x[0] - x[1] <= a[0], x >= a[1]]), [a], [x],
                             solver=solver)
    calls = _counted(monkeypatch)
    with pytest.raises(UnboundedError):
        layer(torch.tensor([1.0, 0.0], dtype=F64))
    assert "Clarabel" not in calls, calls  # (SCS alone, or ECOS and its fallback SCS)


def test_exact_unbounded_tells_rounding_from_a_miss():
    # x0 - x1 <= 1, -x0 <= 0, -x1 <= 0: d = (1, 1) gives -A d = (0, 1, 1), in K exactly; an entry of d at
    # 4e-18 (a zero's rounding) that leaves a row by its own size is rounding too, while d = (1, 1 - 1e-9)
    # leaves the first row by 1e-9 of its terms: a miss, not rounding.
    from convexddn.convex.reach import exact_unbounded

    A = sp.csc_matrix(np.array([[1.0, -1.0], [-1.0, 0.0], [0.0, -1.0]]))
    cones = [("l", 3)]
    assert exact_unbounded(A, cones, np.array([1.0, 1.0]))
    assert exact_unbounded(sp.csc_matrix(np.array([[1.0, 0.0], [0.0, -1.0]])), [("l", 2)], np.array([4e-18, 1.0]))
    assert not exact_unbounded(A, cones, np.array([1.0, 1.0 - 1e-9]))
