"""The per-element chain's last resort (:data:`convexddn.convex.solve_chain.LAST_RESORT`): where the first
solver and the fallback both failed with no verified certificate standing, ECOS (a dependency of convexddn) is
tried once, where it takes the program's cones and has not run. On ``max Σ log y s.t. aᵀy = 1`` with
``a ~ 1e8`` Clarabel stopped at a KKT residual of 1.6e-6 and SCS at its iteration limit, and the layer
raised SolverError although ``solver="ECOS"`` of the same layer solves it (a tester's finding)."""
from __future__ import annotations

import warnings

import cvxpy as cp
import diffcp
import numpy as np
import pytest
import torch

import convexddn as cddn
from convexddn.convex.per_element import CheckedDiffcp
from convexddn.errors import SolverError, SolverWarning

F64 = torch.float64


def _counted(monkeypatch, failing: tuple[str, ...] = ()) -> list[str]:
    """The solvers the per-element path runs, in order; those in ``failing`` raise as a solver
    that errors does (diffcp's SolverError), so that the chain goes on past them."""
    calls: list[str] = []
    real = CheckedDiffcp._solve_with

    def counted(self, method, *args, **kwargs):
        calls.append(method)
        if method in failing:
            raise diffcp.SolverError(f"{method} made to fail by the test")
        return real(self, method, *args, **kwargs)

    monkeypatch.setattr(CheckedDiffcp, "_solve_with", counted)
    return calls


def _log_barrier(**options):
    """``max Σ log y s.t. aᵀy = 1`` (exponential cones): its solution is ``y = 1/(n a)`` (stationarity
    ``1/y_i = λ a_i`` and ``aᵀy = 1`` give ``λ = n``), so ``∂y_i/∂a_i = −1/(n a_i²)``."""
    ap, y = cp.Parameter(4, pos=True), cp.Variable(4)
    return cddn.ConvexLayer(cp.Problem(cp.Maximize(cp.sum(cp.log(y))), [ap @ y == 1]), [ap], [y], **options)


def _a(scale: float) -> torch.Tensor:
    return torch.tensor(np.random.default_rng(10).uniform(0.5, 2.0, size=4), dtype=F64) * scale


@pytest.mark.parametrize("solver", ["auto", "Clarabel"])
def test_badly_scaled_log_barrier_is_solved_by_the_last_resort(solver):
    a = _a(1e8).requires_grad_()
    layer = _log_barrier(solver=solver)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = layer(a.unsqueeze(0))[0]
        (out * w).sum().backward()
    a0 = a.detach()
    ref = 1 / (4 * a0)
    assert ((out.detach() - ref).abs().max() / ref.abs().max()).item() <= 1e-6  # (tol, the residual's bound)
    grad = -w / (4 * a0 ** 2)
    assert ((a.grad - grad).abs().max() / grad.abs().max()).item() <= 1e-5
    # Another solver than the ones chosen solved it: the caller is told, as of a fallback, and last_solve says which.
    told = [str(m.message) for m in caught if issubclass(m.category, SolverWarning) and "needed a fallback" in
            str(m.message)]
    assert len(told) == 1 and "solved by the last resort ECOS" in told[0] and "fallback SCS" in told[0], told
    assert layer.last_solve.solvers == ["ECOS"]


def test_when_all_three_fail_the_error_lists_each():
    # At a ~ 3e9 ECOS ends "Infeasible" without a certificate that verifies (the problem is feasible: y = 1/(4a)).
    layer = _log_barrier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)
        with pytest.raises(SolverError) as err:
            layer(_a(3e9).unsqueeze(0))
    text = str(err.value)
    assert type(err.value) is SolverError
    assert "Clarabel: " in text and "; fallback SCS: " in text and "; last resort ECOS: " in text, text


def test_no_fallback_means_no_last_resort(monkeypatch):
    calls = _counted(monkeypatch)
    layer = _log_barrier(solver="Clarabel", fallback=None)
    with pytest.raises(SolverError):
        layer(_a(1e8).unsqueeze(0))
    assert calls and set(calls) == {"Clarabel"}, calls


def test_a_fallback_that_is_the_first_solver_means_no_last_resort(monkeypatch):
    # solver="SCS" (its default fallback SCS never runs a second time): SCS made to fail, ECOS is not tried.
    calls = _counted(monkeypatch, failing=("SCS",))
    layer = _log_barrier(solver="SCS")
    assert layer.fallback == "SCS"
    with pytest.raises(SolverError):
        layer(_a(1.0).unsqueeze(0))
    assert calls[0] == "SCS" and "ECOS" not in calls, calls  # (Clarabel: the verdict's feasibility check)


def test_a_problem_clarabel_solves_runs_no_other_solver(monkeypatch):
    calls = _counted(monkeypatch)
    layer = _log_barrier(solver="Clarabel")
    out = layer(_a(1.0).unsqueeze(0))[0]
    torch.testing.assert_close(out, 1 / (4 * _a(1.0)), rtol=1e-8, atol=0)
    assert calls == ["Clarabel"], calls


def test_a_problem_the_fallback_solves_runs_no_last_resort(monkeypatch):
    calls = _counted(monkeypatch, failing=("Clarabel",))
    layer = _log_barrier(solver="Clarabel")
    with pytest.warns(SolverWarning, match="solved by the fallback SCS"):
        out = layer(_a(1.0).unsqueeze(0))[0]
    torch.testing.assert_close(out, 1 / (4 * _a(1.0)), rtol=1e-6, atol=0)
    assert "ECOS" not in calls and "SCS" in calls, calls


def test_no_last_resort_for_a_psd_cone(monkeypatch):
    # The projection onto the PSD cone (min ‖X − M‖_F s.t. X ⪰ 0), Clarabel and SCS made to fail: ECOS, which
    # has no PSD cone, is not tried, and the error names the two that ran.
    calls = _counted(monkeypatch, failing=("Clarabel", "SCS"))
    Mp, X = cp.Parameter((2, 2), symmetric=True), cp.Variable((2, 2), symmetric=True)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.norm(X - Mp, "fro")), [X >> 0]), [Mp], [X],
                             solver="Clarabel")
    with pytest.raises(SolverError) as err:
        layer(torch.tensor([[1.0, 2.0], [2.0, -1.0]], dtype=F64))
    assert "ECOS" not in calls and "SCS" in calls, calls
    assert "fallback SCS" in str(err.value) and "ECOS" not in str(err.value)


def test_the_last_resort_runs_where_it_takes_the_cones(monkeypatch):
    # The same failures on a second-order cone program: min ‖x − m‖₂ s.t. x ≥ 0 is solved by x = max(m, 0).
    calls = _counted(monkeypatch, failing=("Clarabel", "SCS"))
    mp, x = cp.Parameter(3), cp.Variable(3)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.norm(x - mp)), [x >= 0]), [mp], [x], solver="Clarabel")
    m = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    with pytest.warns(SolverWarning, match="solved by the last resort ECOS"):
        out = layer(m)
    torch.testing.assert_close(out, m.clamp(min=0), rtol=0, atol=1e-7)
    assert calls.count("ECOS") == 1 and layer.last_solve.solvers == ["ECOS"], calls


def test_takes_cones_reads_diffcp_cone_dictionaries():
    # (CVXPY's dims_to_solver_dict: keys z/f, l, q, ep, s, p, pnd; the table is check_solver_cones's)
    from convexddn.convex.solver_args import takes_cones

    assert takes_cones("ECOS", {"z": 1, "l": 2, "q": [3], "ep": 4, "s": []})
    assert not takes_cones("ECOS", {"z": 1, "s": [2]})
    assert takes_cones("Clarabel", {"s": [2]})  # (no restriction known)


def test_worker_processes_take_the_last_resort_too():
    # (the chain runs in each worker: one element each, the same warning and record as in this process)
    layer = _log_barrier(workers=2)
    a = torch.stack([_a(1e8), 2 * _a(1e8)])
    with pytest.warns(SolverWarning, match=r"2 batch element\(s\) .* solved by the last resort ECOS"):
        out = layer(a)
    ref = 1 / (4 * a)
    assert ((out - ref).abs().amax(1) / ref.abs().amax(1)).max().item() <= 1e-6
    assert layer.last_solve.solvers == ["ECOS", "ECOS"]
