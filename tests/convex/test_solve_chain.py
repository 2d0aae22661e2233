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


def test_lp_unbounded_along_an_exact_ray_runs_no_fallback(monkeypatch):
    """An exact unboundedness ray decides as an exact infeasibility ray does: Clarabel's claim on the LP
    above is raised with no fallback run (SCS ran after it, and could not change the verdict; a
    reviewer's finding)."""
    a, x = cp.Parameter(2), cp.Variable(2)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(-cp.sum(x)), [x[0] - x[1] <= a[0], x >= a[1]]), [a], [x],
                             solver="Clarabel")
    calls = _counted(monkeypatch)
    with pytest.raises(UnboundedError):
        layer(torch.tensor([1.0, 0.0], dtype=F64))
    assert calls == ["Clarabel"], calls


class _Scripted:
    """A stand-in for the per-element backend: ``_try`` answers each solver from ``table``."""

    _cones = [("l", 2)]

    def __init__(self, solver, fallback, table):
        self.solver, self.fallback, self.table, self.calls = solver, fallback, table, []

    def _try(self, method, args, A, b, c):
        self.calls.append(method)
        return self.table[method]()


def _claim(method: str, exact: bool):
    """A verified infeasibility claim of ``method``, exact to rounding or not."""
    from convexddn.convex.dissent import Run

    run = Run(method, "infeasible", "infeasible", ray=np.ones(2), verified=True, exact=exact,
              points=[("infeasible", np.zeros(2), np.ones(2))])
    return None, (f"{method}: infeasible; certificate verified", "infeasible", "infeasible", run)


def test_chain_weighs_every_certificate_and_keeps_fallback_none(monkeypatch):
    """(1) With fallback=None the consulted Clarabel does not re-solve at the certificate's reach
    either (its solution would be returned); (2) an inexact claim beside another run's exact one is
    not sent to Clarabel, and a consulted point is weighed against every certificate (it was weighed
    against the first, inexact one only, and returned over the exact one). A reviewer's findings."""
    from convexddn.convex import solve_chain
    from convexddn.convex.dissent import Run

    A, b, c = sp.csc_matrix(np.eye(2)), np.ones(2), np.ones(2)
    monkeypatch.setattr(solve_chain, "try_in_unit", lambda be, m, a, A, b, c: be._try(m, a, A, b, c))
    seen = {}
    monkeypatch.setattr(solve_chain, "judge", lambda be, methods, *a: (
        seen.setdefault("methods", [m for m, _ in methods]), (None, ("judged", "other"), None))[1])
    failed = lambda: (None, ("Clarabel: inaccurate", "other", "other",  # noqa: E731
                             Run("Clarabel", "other", "inaccurate", points=[("inaccurate", np.zeros(2), np.ones(2))])))
    be = _Scripted("SCS", None, {"SCS": lambda: _claim("SCS", False), "Clarabel": failed})
    solve_chain.after_failure(be, {}, A, b, c, _claim("SCS", False)[1])
    assert be.calls == ["Clarabel"] and seen["methods"] == ["SCS"]

    weighed = []
    monkeypatch.setattr(solve_chain, "within_reach", lambda A, b, c, cones, run, x, y, r: (
        weighed.append(run.method), run.exact)[1])
    solved = lambda: ((None, np.full(2, 1e9), np.ones(2), np.zeros(2), "Solved", 1e-8, "Clarabel", None), None)  # noqa
    be = _Scripted("ECOS", "SCS", {"SCS": lambda: _claim("SCS", True), "Clarabel": solved})
    out, *_ = solve_chain.after_failure(be, {}, A, b, c, _claim("ECOS", False)[1])
    assert be.calls == ["SCS"] and out is None  # (no opinion asked: judge weighs the exact claim)

    def unbounded():  # a verified, inexact claim of the other kind
        run = Run("SCS", "unbounded", "unbounded", ray=np.ones(2), verified=True, exact=False,
                  points=[("unbounded", np.ones(2), np.zeros(2))])
        return None, ("SCS: unbounded; certificate verified", "unbounded", "unbounded", run)

    be = _Scripted("ECOS", "SCS", {"SCS": unbounded, "Clarabel": solved})
    out, *_ = solve_chain.after_failure(be, {}, A, b, c, _claim("ECOS", False)[1])
    assert be.calls == ["SCS", "Clarabel"] and weighed == ["ECOS", "SCS"] and out is not None


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


def test_failure_of_badly_scaled_data_says_so():
    """max Σ log y s.t. aᵀy = 1 with a ~ 1e8 (y* = 1/(4a)): Clarabel ends at a residual of 1.6e-6 and
    SCS at its iteration limit; the SolverError did not say the data may be badly scaled (their nonzero
    magnitudes span 1e8), as the README promises (a tester's finding). (With a fallback ECOS now solves it
    as the last resort, test_last_resort.py: fallback=None keeps the failure this checks.)"""
    a0 = torch.tensor(np.random.default_rng(10).uniform(0.5, 2.0, size=4)) * 1e8
    ap, y = cp.Parameter(4, pos=True), cp.Variable(4)
    layer = cddn.ConvexLayer(cp.Problem(cp.Maximize(cp.sum(cp.log(y))), [ap @ y == 1]), [ap], [y],
                             solver="Clarabel", fallback=None)
    with pytest.raises(SolverError) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)
        layer(a0.unsqueeze(0))
    # (its largest entry, max a, over its smallest, the unit constants of the exponential cones' rows)
    spans = f"spanning {a0.max().item():.0e}"
    assert type(err.value) is SolverError and "badly scaled" in str(err.value) and spans in str(err.value)


def test_scale_hint_only_for_failures_without_a_certificate_on_spread_data():
    """spread.scale_hint: the hint and the data's span (largest over smallest nonzero magnitude, here
    2e8 / 1) for a failure without a certificate; nothing for a certificate's kind, for data spanning
    less than 1e6, or where the status says so already."""
    from convexddn.convex.spread import scale_hint

    A, b, c = sp.csc_matrix(np.array([[2e8, 1.0]])), np.array([1.0]), np.array([0.0, -1.0])
    assert scale_hint("Clarabel: failed", "other", A, b, c) == (
        "Clarabel: failed; the data may be badly scaled (nonzero magnitudes spanning 2e+08)")
    assert scale_hint("Clarabel: infeasible", "infeasible", A, b, c) == "Clarabel: infeasible"
    assert scale_hint("x (the data may be badly scaled)", "other", A, b, c) == "x (the data may be badly scaled)"
    small = sp.csc_matrix(np.array([[9e5, 1.0]]))
    assert scale_hint("Clarabel: failed", "other", small, b, c) == "Clarabel: failed"
