"""The diagnosis of failed elements whose objective is nonconvex at their values (convexddn.convex.nonconvex)."""
from __future__ import annotations

import warnings

import cvxpy as cp
import pytest
import torch

import convexddn as cddn
from convexddn.errors import InfeasibleError, InputError, SolverWarning

torch.set_num_threads(1)
F64 = dict(dtype=torch.float64)


def _qp(psd: bool = False):
    P = cp.Parameter((3, 3), PSD=psd, name="P")
    q, x = cp.Parameter(3, name="q"), cp.Variable(3, name="x")
    quad = cp.quad_form(x, P if psd else cp.psd_wrap(P))
    return cp.Problem(cp.Minimize(0.5 * quad + q @ x), [x >= -1, x <= 1]), P, q, x


INDEFINITE = torch.diag(torch.tensor([1.0, -1.0, 1.0], **F64))
Q = torch.tensor([0.1, 0.0, 0.1], **F64)


@pytest.mark.parametrize("solver", ["auto", "batched"])
def test_psd_wrap_of_indefinite_value_named(solver):
    """It was a SolverError "solver status: (): numerical trouble", naming neither P nor the term."""
    prob, P, q, x = _qp()
    layer = cddn.ConvexLayer(prob, [P, q], [x], solver=solver)
    with pytest.raises(InputError, match=r"quadratic part is not positive semidefinite at 1 batch index\(es\) "
                                         r"\[\(\)\].*smallest eigenvalue is -1, -1 times its largest.*"
                                         r"psd_wrap of P"):
        layer(INDEFINITE, Q)
    batch = torch.stack([torch.eye(3, **F64), INDEFINITE, 2 * torch.eye(3, **F64)])
    with pytest.raises(InputError, match=r"positive semidefinite at 1 batch index\(es\) \[\(1,\)\] of batch shape "
                                         r"\(3,\).*at batch index \(1,\)"):
        layer(batch, Q)
    masked = cddn.ConvexLayer(prob, [P, q], [x], solver=solver, on_failure="mask")
    with pytest.warns(SolverWarning, match="not positive semidefinite"):
        out = masked(batch, Q)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()
    assert "not positive semidefinite" in masked.last_solve.statuses[1]
    assert "positive semidefinite" not in masked.last_solve.statuses[0]


def test_per_element_solvers_refuse_parametric_quad_form_and_psd_parameters_are_checked():
    """solver='Clarabel' never reaches a solve with psd_wrap(P) of a parameter (OptionError at construction:
    only the batched path keeps a parametric quadratic objective); a PSD=True parameter's value is checked
    before any solve."""
    prob, P, q, x = _qp()
    with pytest.raises(cddn.errors.OptionError, match="quad_form"):
        cddn.ConvexLayer(prob, [P, q], [x], solver="Clarabel")
    prob, P, q, x = _qp(psd=True)
    with pytest.raises(InputError, match=r"declared PSD=True.*smallest eigenvalue -1"):
        cddn.ConvexLayer(prob, [P, q], [x])(INDEFINITE, Q)


def test_psd_values_and_other_failures_untouched():
    """A PSD value solves (rounding-level negative eigenvalues included); an infeasible element with a PSD
    P stays InfeasibleError; beside a nonconvex one, it is counted in the InputError. (With an indefinite
    P an infeasible element is not certified: "numerical trouble", then named nonconvex, which it is.)"""
    prob, P, q, x = _qp()
    layer = cddn.ConvexLayer(prob, [P, q], [x])
    L = torch.tensor([[1.0, 0.0, 0.0], [0.5, 1e-9, 0.0], [0.3, 0.2, 1e-9]], **F64)
    torch.testing.assert_close(layer(torch.eye(3, **F64), Q), -Q, atol=1e-7, rtol=0)
    masked = cddn.ConvexLayer(prob, [P, q], [x], on_failure="mask")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masked(L @ L.T, Q)  # nearly singular PSD: solved or not, never called nonconvex
    assert "semidefinite" not in masked.last_solve.statuses[0]
    lo = cp.Parameter(3, name="lo")
    bad = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, cp.psd_wrap(P)) + q @ x), [x >= lo, x <= 1])
    layer = cddn.ConvexLayer(bad, [P, q, lo], [x])
    lows = torch.tensor([[2.0, 0.0, 0.0], [-1.0, -1.0, -1.0]], **F64)
    with pytest.raises(InfeasibleError):
        layer(torch.eye(3, **F64), Q, lows)
    with pytest.raises(InputError, match=r"batch index\(es\) \[\(1,\)\].*1 other element\(s\) failed too, the "
                                         r"first with status 'primal infeasible"):
        layer(torch.stack([torch.eye(3, **F64), INDEFINITE]), Q, lows)


def test_threshold_is_scale_invariant_and_passes_rounding():
    """The test on a failed element directly: a rank-one v vᵀ (eigenvalues ~-1e-16 of the largest from
    rounding) is not flagged at any scale; -1e-6 of the largest is, at any scale."""
    from convexddn.convex.nonconvex import explain_nonconvex

    prob, P, q, x = _qp()
    program = cddn.ConvexLayer(prob, [P, q], [x])._batched
    v = torch.tensor([0.3, -1.7, 2.9], **F64)
    for scale in (1e-8, 1.0, 1e8):
        for value, flagged in ((torch.outer(v, v), False), (torch.diag(torch.tensor([1.0, -1e-6, 0.5], **F64)), True)):
            info = {"kinds": ["other"], "statuses": ["numerical trouble"], "solved": [False]}
            left = explain_nonconvex(program, prob, [P, q], [scale * value[None], Q[None]], [0], info, (), False)
            assert ("not positive semidefinite" in info["statuses"][0]) == flagged, (scale, flagged)
            assert left == [0]
            # solved, where the quadratic part reads a parameter: tested too, made unsolved if flagged
            info = {"kinds": ["solved"], "statuses": ["solved"], "solved": [True]}
            left = explain_nonconvex(program, prob, [P, q], [scale * value[None], Q[None]], [], info, (), False)
            assert (left == [0]) == flagged and info["solved"] == [not flagged], (scale, flagged)
    assert explain_nonconvex(None, prob, [P, q], [INDEFINITE[None], Q[None]], [0], info, (), True) == [0]


def _box_qp():
    """min yᵀ psd_wrap(P) y + qᵀy over the box [-1, 1]²."""
    P, q, y = cp.Parameter((2, 2), name="P"), cp.Parameter(2, name="q"), cp.Variable(2, name="y")
    return cp.Problem(cp.Minimize(cp.quad_form(y, cp.psd_wrap(P)) + q @ y), [y >= -1, y <= 1]), P, q, y


@pytest.mark.parametrize("q2", [-0.5, -0.2, 0.2, 0.5])
def test_a_nonconvex_value_that_converges_is_not_returned_as_solved(q2):
    """P = diag(1, -3): y₂ ↦ -3y₂² + q₂y₂ on [-1, 1] has local minimisers at both ends, the
    global one at y₂ = -sign(q₂). The interior point converged to the other end, returned as
    solved with no warning (y₂ = -1 for q₂ = -0.5, where y₂ = 1 gives -3.5 against -2.5)."""
    prob, P, q, y = _box_qp()
    Pm = torch.tensor([[1.0, 0.0], [0.0, -3.0]], **F64)
    qv = torch.tensor([0.3, q2], **F64)
    layer = cddn.ConvexLayer(prob, [P, q], [y])
    with pytest.raises(InputError, match=r"not positive semidefinite at 1 batch index\(es\) \[\(\)\].*psd_wrap of P"):
        layer(Pm, qv)
    # Masked: only that element; a PSD element beside it is solved (its closed form: y = -q/2 clipped).
    masked = cddn.ConvexLayer(prob, [P, q], [y], on_failure="mask")
    batch = torch.stack([torch.eye(2, **F64), Pm])
    with pytest.warns(SolverWarning, match="not positive semidefinite"):
        out = masked(batch, torch.stack([qv, qv]))
    assert torch.isnan(out[1]).all()
    torch.testing.assert_close(out[0], (-qv / 2).clamp(-1, 1), atol=1e-8, rtol=0)
    assert masked.last_solve.solved.tolist() == [True, False]
    assert "not positive semidefinite" in masked.last_solve.statuses[1]


def test_psd_values_of_a_wrapped_parameter_stay_solved_without_a_warning():
    """The check on every call passes PSD values, singular ones included (P = diag(1, 0): a
    Cholesky factorisation of P itself fails, of P plus the tolerance's shift does not)."""
    prob, P, q, y = _box_qp()
    layer = cddn.ConvexLayer(prob, [P, q], [y])
    Ps = torch.stack([torch.diag(torch.tensor([1.0, 0.0], **F64)), torch.tensor([[2.0, 1.0], [1.0, 0.5]], **F64)])
    qv = torch.tensor([[0.4, 0.5], [0.3, -0.2]], **F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = layer(Ps, qv)
    # element 0: y₁ = -q₁/2 = -0.2, y₂ minimises 0.5·y₂ on the box: -1
    torch.testing.assert_close(out[0], torch.tensor([-0.2, -1.0], **F64), atol=1e-7, rtol=0)
    assert layer.last_solve.solved.all()


def test_indefinite_but_convex_on_the_equality_constraints_is_solved():
    """P = diag(1, -0.5) with y₁ + y₂ = b: on the feasible line y = (t, b − t) the objective is
    t² − ½(b − t)² + q₁t + q₂(b − t), convex (½t² + …); the check on every call refused it as
    nonconvex. Its minimiser in closed form: t = q₂ − q₁ − b."""
    P, q, b, y = cp.Parameter((2, 2), name="P"), cp.Parameter(2, name="q"), cp.Parameter(name="b"), cp.Variable(2)
    prob = cp.Problem(cp.Minimize(cp.quad_form(y, cp.psd_wrap(P)) + q @ y), [y[0] + y[1] == b, y >= -5, y <= 5])
    layer = cddn.ConvexLayer(prob, [P, q, b], [y])
    Pv, qv, bv = torch.diag(torch.tensor([1.0, -0.5], **F64)), torch.tensor([0.3, 0.1], **F64), torch.tensor(1.0, **F64)
    # d/dt [t² − ½(b − t)² + q₁t + q₂(b − t)] = 2t + (b − t) + q₁ − q₂ = t + b + q₁ − q₂ = 0
    t = float(qv[1] - qv[0] - bv)
    torch.testing.assert_close(layer(Pv, qv, bv), torch.tensor([t, float(bv) - t], **F64), atol=1e-7, rtol=0)
    # Indefinite on that line too (P = diag(-1, 0.5): -½t² + …) stays refused.
    with pytest.raises(InputError, match="not positive semidefinite"):
        layer(torch.diag(torch.tensor([-1.0, 0.5], **F64)), qv, bv)


@pytest.mark.parametrize("wrapped", [False, True])
def test_float32_gram_matrix_within_its_rounding_is_not_refused(wrapped):
    """A float32 Gram matrix B Bᵀ of a rank-2 B is PSD to float32's rounding (smallest eigenvalue
    -7.6e-9 of its largest): the PSD=True check before the solve passed it, and the check after
    the solve, at float64's rounding, refused it as nonconvex, advising to declare it PSD=True
    (a tester: 14 of 16 such matrices refused; psd_wrap 13 of 16). Now both forgive the rounding
    of the least precise input: the float32 result is the float64 one to float32's rounding
    (the same matrix widened), and an indefinite float32 matrix (-1e-3 of its largest) is
    still refused."""
    n = 5
    P = cp.Parameter((n, n), PSD=not wrapped)
    q, y = cp.Parameter(n), cp.Variable(n)
    quad = cp.quad_form(y, cp.psd_wrap(P) if wrapped else P)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(0.5 * quad + q @ y), [y >= -1, y <= 1]), [P, q], [y])
    g = torch.Generator().manual_seed(4)
    B64, Q64 = torch.randn(n, 2, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    B, Q = B64.float(), Q64.float()
    P32 = B @ B.T
    P32 = 0.5 * (P32 + P32.T)
    assert float(torch.linalg.eigvalsh(P32.double())[0]) < 0  # (the subject: PSD only to rounding)
    y32 = layer(P32, Q)
    y64 = layer(B64 @ B64.T, Q64)  # (the same data in float64, PSD to its rounding)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, atol=1e-5, rtol=0)
    bad = P32 - 1e-3 * float(P32.abs().max()) * torch.eye(n)
    with pytest.raises(InputError, match="not positive semidefinite|declared PSD=True, got 1 matrices that are not"):
        layer(bad, Q)
