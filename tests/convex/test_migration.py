"""Coming from cvxpylayers, or through the registry: what an audit of the migration path
found, each against an independent reference (CVXPY + Clarabel directly, finite
differences, closed forms) and failing on the code before its fix."""
from __future__ import annotations

import io
import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

import convexddn as cddn
from convexddn import ConvexLayer, CvxpyLayer
from convexddn.convex import registry
from convexddn.errors import (ConvexDDNWarning, InfeasibleError, InputError, NotDPPError, OptionError, ProblemError,
                              UnboundedError)
from convexddn.nodes.entmax import entmax
from convexddn.testing import check_gradients

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _quad_form_qp(n: int = 4):
    x = cp.Variable(n)
    P = cp.Parameter((n, n), PSD=True)
    q = cp.Parameter(n)
    lo = cp.Parameter(n)
    prob = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, P) + q @ x), [x >= lo, x <= 0.3])
    return prob, [P, q, lo], x


def _psd(batch: int, n: int, seed: int) -> torch.Tensor:
    M = torch.randn(batch, n, n, dtype=F64, generator=_gen(seed))
    return M @ M.mT + torch.eye(n, dtype=F64)


def test_quad_form_with_a_parameter_matrix_is_solved_by_the_batched_solver():
    """cvxpylayers 1.2 takes quad_form(x, P) with a parameter P (for its QP solvers);
    ConvexLayer refused it as not DPP. The batched solver keeps P as the quadratic term."""
    prob, params, x = _quad_form_qp()
    layer = ConvexLayer(prob, params, [x])
    P, q = _psd(3, 4, 1), torch.randn(3, 4, dtype=F64, generator=_gen(2))
    lo = torch.full((3, 4), -0.3, dtype=F64)
    y = layer(P, q, lo)
    assert layer.last_solve.solvers == ["batched"] * 3
    for b in range(3):  # CVXPY + Clarabel directly, tight tolerances
        for p, v in zip(params, (P[b], q[b], lo[b])):
            p.value = v.numpy()
        prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
        np.testing.assert_allclose(y[b].numpy(), x.value, atol=1e-8)
    report = check_gradients(lambda P_, q_: layer(0.5 * (P_ + P_.mT), q_, lo[:2]),
                             P[:2].clone().requires_grad_(), q[:2].clone().requires_grad_())
    assert report.ok and report.max_abs_error < 1e-8, report
    # The same through the cvxpylayers interface, whose QP solvers take it.
    (y2,) = CvxpyLayer(prob, parameters=params, variables=[x])(P, q, lo)
    torch.testing.assert_close(y2, y)


def test_quad_form_with_a_parameter_matrix_errors_stay_precise():
    prob, params, x = _quad_form_qp(3)
    # The problem is fine, the solver chosen cannot take it: an OptionError naming the choice.
    with pytest.raises(OptionError, match=r"^solver='Clarabel' cannot solve this problem: quad_form\(x, P\) with a "
                                          r"parameter P is DPP in the objective only for the batched solver.*"
                                          r"objective `.*` is not DPP; use solver='auto' or 'batched'$"):
        ConvexLayer(prob, params, [x], solver="Clarabel")
    # In a constraint it is not DPP for any solver: the error names the constraint (it
    # named the objective, which the batched solver takes).
    P, x2 = params[0], cp.Variable(3)
    both = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x2, P)), [cp.quad_form(x2, P) <= 1.0])
    with pytest.raises(NotDPPError, match=r"constraint 0 `QuadForm"):
        ConvexLayer(both, [P], [x2])
    layer = ConvexLayer(prob, params, [x])
    lo = torch.zeros(3, 3, dtype=F64)
    lo[1] = 2.0  # above the upper bound 0.3: infeasible (no per-element path to fall back on)
    with pytest.raises(InfeasibleError, match=r"\[\(1,\)\]"):
        layer(_psd(3, 3, 3), torch.zeros(3, 3, dtype=F64), lo)


def test_checkpoint_of_a_cvxpylayers_model_loads_after_the_import_swap():
    """cvxpylayers saves its problem matrices (q, A, P) as buffers: load_state_dict
    raised 'Unexpected key(s) "opt.q", "opt.A"' after the one-import migration."""
    from cvxpylayers.torch import CvxpyLayer as Reference

    x = cp.Variable(2)
    A = cp.Parameter((3, 2))
    b = cp.Parameter(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b)), [x >= 0])

    class Model(torch.nn.Module):
        def __init__(self, cls):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)
            self.opt = cls(prob, parameters=[A, b], variables=[x])

    old = Model(Reference)
    assert {"opt.q", "opt.A"} <= set(old.state_dict())
    buf = io.BytesIO()
    torch.save(old.state_dict(), buf)
    buf.seek(0)
    new = Model(CvxpyLayer)
    new.load_state_dict(torch.load(buf))
    torch.testing.assert_close(new.lin.weight, old.lin.weight)


def test_per_element_solver_args_with_the_default_solver_are_announced():
    """max_iters and verbose reach only the per-element solver with the default solver
    (the batched one solves almost every element): max_iters=1 returned the converged
    answer without a word."""
    x = cp.Variable(2)
    b = cp.Parameter(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - b)), [x >= 0])
    layer = CvxpyLayer(prob, parameters=[b], variables=[x])
    with pytest.warns(ConvexDDNWarning, match=r"\[.max_iters.\] reach only the per-element solver under the default solver"):
        layer(torch.ones(2, dtype=F64), solver_args={"max_iters": 1})
    # That notice does not use up the one about ignored keys.
    with pytest.warns(ConvexDDNWarning, match=r"CvxpyLayer ignores \[.eps.\]"):
        layer(torch.ones(2, dtype=F64), solver_args={"eps": 1e-9})
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvexDDNWarning)
        CvxpyLayer(prob, parameters=[b], variables=[x], solver_args={"solve_method": "SCS", "max_iters": 500})(
            torch.ones(2, dtype=F64))


def test_diagonal_variables_cannot_be_returned():
    """A diag=True variable crashed the first call with torch's 'shape mismatch'."""
    V = cp.Variable((3, 3), diag=True)
    C = cp.Parameter((3, 3))
    w = cp.Variable(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(V - C) + cp.sum_squares(w - cp.diag(V))))
    for solver in ("auto", "Clarabel"):
        with pytest.raises(ProblemError, match=r"diag=True .* use[d]? as cp\.diag\(d\)"):
            ConvexLayer(prob, [C], [V], solver=solver)
    # Used inside the problem and not returned, it is fine: w = diag(C) (closed form).
    Cv = torch.randn(3, 3, dtype=F64, generator=_gen(4))
    torch.testing.assert_close(ConvexLayer(prob, [C], [w])(Cv), torch.diagonal(Cv), atol=1e-7, rtol=0)


def test_learned_layer_takes_per_call_solver_args():
    """They reached the input binding ("unknown input name 'solver_args'"); now the
    ConvexLayer validates them (an unknown key is its OptionError) and applies them."""
    layer = cddn.layer("qp", n=4, n_ineq=3, learn="Gh", inputs="q")
    q = torch.randn(2, 4, dtype=torch.get_default_dtype(), generator=_gen(5))
    torch.testing.assert_close(layer(q, solver_args={"max_iter": 200}), layer(q))
    with pytest.raises(OptionError, match=r"solver_args \(per call\).*bogus"):
        layer(q, solver_args={"bogus": 1})


def test_a_builder_option_named_like_a_layer_option_goes_to_the_builder():
    """A user's builder with an option `tol` got the default while the layer took tol=0.5
    as its own KKT tolerance: [1.9, -0.2, 0] instead of the soft threshold [1.5, 0, 0]."""
    name = "soft_threshold_test"
    registry.names()
    saved = dict(registry._REGISTRY)
    try:
        @registry.register(name, "argmin_u ½‖u − x‖² + tol ‖u‖₁")
        def shrink(n: int, tol: float = 0.1):
            tol = registry.real_option("tol", tol, above=0)
            x = cp.Parameter(n, name="x")
            u = cp.Variable(n, name="u")
            return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(u - x) + tol * cp.norm1(u))), [x], [u]

        layer = cddn.layer(name, n=3, tol=0.5)
        x = torch.tensor([2.0, -0.3, 0.05], dtype=F64)
        torch.testing.assert_close(layer(x), torch.tensor([1.5, 0.0, 0.0], dtype=F64), atol=1e-7, rtol=0)
        assert layer.tol == 1e-6
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved)


@pytest.mark.parametrize("alpha", [1.0001, 1.0005, 1.3333])
def test_entmax_cone_form_near_alpha_one_is_exact(alpha):
    """CVXPY rounds the exponent to a fraction of denominator <= 1024 by default: 1.0001
    became 1 (a linear objective) and the layer returned a vertex 0.15 off as solved."""
    x = torch.randn(3, 6, dtype=F64, generator=_gen(6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CVXPY's note on its rational approximation
        cone = cddn.layer("entmax", n=6, alpha=alpha, backend="cvxpy")
        torch.testing.assert_close(cone(x), entmax(x, alpha), atol=1e-7, rtol=0)


def test_entmax_cone_form_without_a_close_fraction_is_refused():
    for alpha in (1.00000001, 1e10):  # (5e6 has one since denominators go to 2^32)
        with pytest.raises(OptionError, match=r"no cone form close enough .* native node"):
            cddn.layer("entmax", n=4, alpha=alpha, backend="cvxpy")


def test_transport_needs_two_targets():
    """n = 1 leaves b out of the problem: the layer failed with a confusing 'parameters
    do not match' ProblemError."""
    for name in ("ot_lp", "ot_entropic"):
        with pytest.raises(OptionError, match=r"n must be an integer >= 2 and <= 2147483647, got 1"):
            cddn.layer(name, m=3, n=1)


def _unconstrained_qp(n: int = 4):
    x = cp.Variable(n)
    P = cp.Parameter((n, n), PSD=True)
    q = cp.Parameter(n)
    return cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, P) + q @ x)), [P, q], x


def test_unconstrained_quad_form_qp_and_its_symmetric_gradient():
    """min ½xᵀPx + qᵀx without constraints was refused ('no constraint data'), and the
    gradient in P was upper-triangular (CVXPY reads one triangle): one SGD step made P
    asymmetric and the next call failed. Closed forms: x = −P⁻¹q, and for L = wᵀx,
    dL/dq = −u, dL/dP = −(u xᵀ + x uᵀ)/2 with u = P⁻¹w (P symmetric)."""
    prob, params, x = _unconstrained_qp()
    layer = ConvexLayer(prob, params, [x])
    P = _psd(3, 4, 7).requires_grad_()
    q = torch.randn(3, 4, dtype=F64, generator=_gen(8)).requires_grad_()
    w = torch.randn(3, 4, dtype=F64, generator=_gen(9))
    y = layer(P, q)
    want = -torch.linalg.solve(P.detach(), q.detach().unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(y, want, atol=1e-10, rtol=0)
    gP, gq = torch.autograd.grad((y * w).sum(), (P, q))
    u = torch.linalg.solve(P.detach(), w.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(gq, -u, atol=1e-9, rtol=0)
    torch.testing.assert_close(gP, -0.5 * (u.unsqueeze(-1) * want.unsqueeze(-2) + want.unsqueeze(-1) * u.unsqueeze(-2)),
                               atol=1e-9, rtol=0)
    singular = torch.zeros(2, 4, 4, dtype=F64)
    singular[:, 0, 0] = 1.0
    q_bad = torch.zeros(2, 4, dtype=F64)
    q_bad[1, 2] = 1.0  # not in the range of P: unbounded
    with pytest.raises(UnboundedError, match=r"\[\(1,\)\]"):
        layer(singular, q_bad)


def test_psd_parameters_are_checked_matrix_by_matrix():
    """The attribute check used one scale for the whole batch: an indefinite P beside a
    1e10 I passed, and came back as a wrong point reported solved."""
    prob, params, x = _quad_form_qp()
    layer = ConvexLayer(prob, params, [x])
    bad = torch.diag(torch.tensor([-0.27, 0.5, 1.0, 2.0], dtype=F64))
    P = torch.stack([1e10 * torch.eye(4, dtype=F64), bad])
    q, lo = torch.ones(2, 4, dtype=F64), torch.full((2, 4), -1.0, dtype=F64)
    with pytest.raises(InputError, match=r"PSD=True, got 1 matrices .* batch index \(1,\), has smallest eigenvalue -0\.27"):
        layer(P, q, lo)
    P32 = torch.stack([2e3 * torch.eye(4), torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.1]))])
    with pytest.raises(InputError, match=r"batch index \(1,\)"):
        layer(P32, q.float(), lo.float())


def test_layer_pickles_after_the_user_solved_its_problem():
    """prob.solve() caches Clarabel's model on the problem: pickling or deep-copying the
    layer then raised "cannot pickle 'builtins.DefaultSolver'"."""
    import copy
    import pickle

    x = cp.Variable(2)
    b = cp.Parameter(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - b)), [x >= 0])
    layer = ConvexLayer(prob, [b], [x])
    b.value = np.array([1.0, -2.0])
    prob.solve(solver=cp.CLARABEL)
    bv = torch.tensor([[1.0, -2.0], [-1.0, 3.0]], dtype=F64)
    want = bv.clamp_min(0)  # projection onto the nonnegative orthant
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        torch.testing.assert_close(clone(bv), want, atol=1e-9, rtol=0)
    assert prob._solver_cache  # the user's problem keeps its cache
