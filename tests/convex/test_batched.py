"""BatchedProgram: a DPP problem solved for a whole batch in torch, differentiated implicitly.

References: CVXPY's own solve (Clarabel, tight tolerances), the per-element
ConvexLayer, closed forms (sparsemax, ball projections) and central finite
differences in float64; never the batched solver's own output.
"""
from __future__ import annotations

import copy
import pickle
import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

import convexddn as cddn
from convexddn.convex.batched import BatchedProgram, UnsupportedProblem
from convexddn.errors import DTypeError, GradientWarning, InputError, OptionError, ShapeError

F64 = torch.float64
TIGHT = dict(solver="CLARABEL", tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11, max_iter=500)


def cvxpy_solve(problem, parameters, variables, values, index):
    for p, v in zip(parameters, values):
        p.value = (v[index] if v.dim() > len(p.shape) else v).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        problem.solve(**TIGHT)
    return [np.asarray(v.value) for v in variables]


def qp_problem(n=5, m=4, p=2):
    L, q = cp.Parameter((n, n), name="L"), cp.Parameter(n, name="q")
    G, h = cp.Parameter((m, n), name="G"), cp.Parameter(m, name="h")
    A, b = cp.Parameter((p, n), name="A"), cp.Parameter(p, name="b")
    x = cp.Variable(n, name="x")
    ineq = G @ x <= h
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(L @ x) + q @ x + 0.05 * cp.sum_squares(x)),
                      [ineq, A @ x == b])
    return prob, [L, q, G, h, A, b], [x], ineq


def qp_data(batch, n=5, m=4, p=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    L = torch.eye(n, dtype=F64) + 0.3 * torch.randn(batch, n, n, dtype=F64, generator=gen)
    q = torch.randn(batch, n, dtype=F64, generator=gen)
    G = torch.randn(batch, m, n, dtype=F64, generator=gen)
    x0 = torch.randn(batch, n, dtype=F64, generator=gen)
    h = torch.einsum("bmn,bn->bm", G, x0) + torch.rand(batch, m, dtype=F64, generator=gen)
    A = torch.randn(batch, p, n, dtype=F64, generator=gen)
    b = torch.einsum("bpn,bn->bp", A, x0)
    return [L, q, G, h, A, b]


def sparsemax_problem(n):
    x = cp.Parameter(n, name="x")
    y = cp.Variable(n, name="y")
    return cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [cp.sum(y) == 1, y >= 0]), [x], [y]


def sparsemax(x):
    """Martins & Astudillo (2016): the Euclidean projection onto the simplex, by sorting."""
    z, _ = torch.sort(x, dim=-1, descending=True)
    k = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype)
    cums = z.cumsum(-1)
    support = (1 + k * z > cums).sum(-1, keepdim=True)
    tau = (cums.gather(-1, support - 1) - 1) / support.to(x.dtype)
    return (x - tau).clamp(min=0)


def test_batched_sparsemax_closed_form_and_jacobian():
    n = 16
    prob, params, variables = sparsemax_problem(n)
    bp = BatchedProgram(prob, params, variables)
    x = torch.randn(64, n, dtype=F64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    (y,), info = bp(x)
    assert info.solved.all() and (info.residual <= 1e-8).all()
    assert torch.allclose(y, sparsemax(x.detach()), atol=1e-10)
    g = torch.randn(64, n, dtype=F64, generator=torch.Generator().manual_seed(2))
    (grad,) = torch.autograd.grad(y, x, g)
    # Jacobian of sparsemax: diag(s) - s sᵀ/|S| on the support S (s its indicator).
    s = (sparsemax(x.detach()) > 0).to(F64)
    expected = s * g - s * (s * g).sum(-1, keepdim=True) / s.sum(-1, keepdim=True)
    assert torch.allclose(grad, expected, atol=1e-8)


@pytest.mark.parametrize("radius", [0.5, 2.0])
def test_batched_l2_ball_projection(radius):
    n = 6
    x = cp.Parameter(n)
    y = cp.Variable(n)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [cp.norm(y, 2) <= radius])
    bp = BatchedProgram(prob, [x], [y])
    X = torch.randn(32, n, dtype=F64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    (Y,), info = bp(X)
    assert info.solved.all()
    Xd = X.detach()
    exact = Xd * (radius / Xd.norm(dim=1, keepdim=True)).clamp(max=1)
    assert torch.allclose(Y, exact, atol=1e-10)
    g = torch.randn(32, n, dtype=F64)
    (grad,) = torch.autograd.grad(Y, X, g)
    X2 = Xd.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(X2 * (radius / X2.norm(dim=1, keepdim=True)).clamp(max=1), X2, g)
    assert torch.allclose(grad, ref, atol=1e-8)


def l1_ball_problem(n):
    x = cp.Parameter(n, name="x")
    y = cp.Variable(n, name="y")
    return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - x)), [cp.norm(y, 1) <= 1.0]), [x], [y]


def test_batched_l1_ball_projection_matches_cvxpy():
    n = 8
    prob, [x], [y] = l1_ball_problem(n)
    bp = BatchedProgram(prob, [x], [y])
    X = 2 * torch.randn(6, n, dtype=F64, generator=torch.Generator().manual_seed(4))
    (Y,), info = bp(X)
    assert info.solved.all()
    for i in range(6):
        (ref,) = cvxpy_solve(prob, [x], [y], [X], i)
        assert np.allclose(Y[i].numpy(), ref, atol=1e-7)
    assert (Y.abs().sum(1) <= 1 + 1e-9).all()


def test_batched_lp_and_socp_match_cvxpy():
    n = 4
    c = cp.Parameter(n)
    a = cp.Parameter(n)
    y = cp.Variable(n)
    lp = cp.Problem(cp.Minimize(c @ y), [y >= -1, y <= 2, a @ y == 0.5])
    socp = cp.Problem(cp.Minimize(c @ y + cp.norm(y - a, 2)), [cp.norm(y, 2) <= 3, y[0] >= -0.5])
    gen = torch.Generator().manual_seed(5)
    C, Avec = torch.randn(5, n, dtype=F64, generator=gen), torch.rand(5, n, dtype=F64, generator=gen) + 0.1
    for prob in (lp, socp):
        bp = BatchedProgram(prob, [c, a], [y])
        (Y,), info = bp(C, Avec)
        assert info.solved.all(), info.status_names()
        for i in range(5):
            (ref,) = cvxpy_solve(prob, [c, a], [y], [C, Avec], i)
            assert np.allclose(Y[i].numpy(), ref, atol=1e-6), (prob, i)


def test_batched_qp_matches_cvxpy_and_per_element_layer():
    prob, params, variables, _ = qp_problem()
    data = qp_data(4)
    bp = BatchedProgram(prob, params, variables)
    (Y,), info = bp(*data)
    assert info.solved.all()
    layer = cddn.ConvexLayer(prob, params, variables, solver="Clarabel")
    assert torch.allclose(Y, layer(*data), atol=1e-7)
    for i in range(4):
        (ref,) = cvxpy_solve(prob, params, variables, data, i)
        assert np.allclose(Y[i].numpy(), ref, atol=1e-7)


def test_batched_dual_variable_output():
    prob, params, variables, ineq = qp_problem()
    data = qp_data(3, seed=6)
    bp = BatchedProgram(prob, params, variables + [ineq.dual_variables[0]])
    (Y, lam), info = bp(*data)
    assert info.solved.all()
    for i in range(3):
        cvxpy_solve(prob, params, variables, data, i)
        assert np.allclose(lam[i].numpy(), ineq.dual_value, atol=1e-6)


def test_batched_gradcheck_every_qp_parameter():
    prob, params, variables, _ = qp_problem(n=3, m=3, p=1)
    bp = BatchedProgram(prob, params, variables, polish="always")
    data = [v.requires_grad_(True) for v in qp_data(2, n=3, m=3, p=1, seed=7)]
    assert torch.autograd.gradcheck(lambda *v: bp(*v)[0][0], data, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_batched_gradcheck_socp_with_parameter_radius_and_duals():
    n = 4
    x = cp.Parameter(n)
    r = cp.Parameter(nonneg=True)
    y = cp.Variable(n)
    ball = cp.norm(y, 2) <= r
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [ball, y[0] >= -0.2])
    bp = BatchedProgram(prob, [x, r], [y, ball.dual_variables[0]])
    gen = torch.Generator().manual_seed(8)
    X = (2 * torch.randn(3, n, dtype=F64, generator=gen)).requires_grad_(True)
    R = (torch.rand(3, dtype=F64, generator=gen) + 0.5).requires_grad_(True)
    (Y, lam), info = bp(X, R)
    assert info.solved.all() and lam.shape == (3,)
    for i in range(3):  # the multiplier of ‖y‖ <= r, as CVXPY reports it
        cvxpy_solve(prob, [x, r], [y], [X.detach(), R.detach()], i)
        assert abs(lam[i].item() - float(ball.dual_value)) < 1e-6

    def both(a, b):
        y_, l_ = bp(a, b)[0]
        return torch.cat([y_, l_.unsqueeze(-1)], -1)

    assert torch.autograd.gradcheck(both, (X, R), eps=1e-6, atol=1e-6)


def test_batched_default_options_gradient_within_promise():
    """Default options (no polish on QPs): finite differences agree to 1e-4 relative."""
    prob, params, variables, _ = qp_problem()
    bp = BatchedProgram(prob, params, variables)
    data = qp_data(2, seed=9)
    h = data[3].clone().requires_grad_(True)
    (Y,), _ = bp(*data[:3], h, *data[4:])
    w = torch.randn_like(Y)
    (grad,) = torch.autograd.grad(Y, h, w)
    fd = torch.zeros_like(h)
    for k in range(h.shape[1]):
        e = torch.zeros_like(h)
        e[:, k] = 1e-5
        (yp,), _ = bp(*data[:3], h.detach() + e, *data[4:])
        (ym,), _ = bp(*data[:3], h.detach() - e, *data[4:])
        fd[:, k] = ((yp - ym) * w).sum(1) / 2e-5
    assert ((grad - fd).abs().max() / (1 + fd.abs().max())) < 1e-4


def test_batched_infeasible_and_unbounded_elements_are_flagged():
    """min cᵀy + ½y₀² s.t. y >= lo, d·(y₁ + y₂) <= 1: d = 0 frees y₁ (unbounded if c₁ < 0)."""
    n = 3
    c, lo, d = cp.Parameter(n), cp.Parameter(n), cp.Parameter()
    y = cp.Variable(n)
    prob = cp.Problem(cp.Minimize(c @ y + 0.5 * cp.square(y[0])), [y >= lo, d * cp.sum(y[1:]) <= 1])
    bp = BatchedProgram(prob, [c, lo, d], [y])
    C = torch.tensor([[1.0, 1, 1], [1, 1, 1], [1, -1, 1], [1, -1, 1]], dtype=F64, requires_grad=True)
    LO = torch.tensor([[0.0, 0, 0], [0, 1, 1], [0, 0, 0], [0, 0, 0]], dtype=F64, requires_grad=True)
    D = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=F64)
    (Y,), info = bp(C, LO, D)
    assert info.status_names() == ["solved", "primal infeasible", "dual infeasible (unbounded)", "solved"]
    assert info.solved.tolist() == [True, False, False, True]
    assert torch.allclose(Y[3], torch.tensor([0.0, 1.0, 0.0], dtype=F64), atol=1e-8)
    assert torch.isfinite(Y).all()
    grads = torch.autograd.grad(Y.sum(), (C, LO))
    for g in grads:
        assert torch.isfinite(g).all() and (g[1:3] == 0).all()


def test_batched_zero_cotangent_and_failed_elements_get_exact_zero_gradient():
    prob, params, variables = sparsemax_problem(6)
    bp = BatchedProgram(prob, params, variables)
    X = torch.randn(3, 6, dtype=F64, requires_grad=True)
    (Y,), _ = bp(X)
    g = torch.zeros_like(Y)
    g[1] = 1.0
    (grad,) = torch.autograd.grad(Y, X, g)
    assert (grad[0] == 0).all() and (grad[2] == 0).all()


def test_batched_no_grad_forward_builds_no_graph():
    prob, params, variables = sparsemax_problem(5)
    bp = BatchedProgram(prob, params, variables)
    X = torch.randn(4, 5, dtype=F64, requires_grad=True)
    with torch.no_grad():
        (Y,), info = bp(X)
    assert Y.grad_fn is None and not Y.requires_grad
    (Y2,), _ = bp(X)
    assert Y2.grad_fn is not None and torch.allclose(Y, Y2)


def test_batched_batch_of_one_and_unbatched_parameters():
    prob, params, variables, _ = qp_problem()
    data = qp_data(3, seed=10)
    bp = BatchedProgram(prob, params, variables)
    mixed = [data[0][0]] + data[1:]  # L shared by every element
    (Y,), info = bp(*mixed)
    assert Y.shape == (3, 5) and info.solved.all()
    for i in range(3):
        (one,), _ = bp(*[v[i] if k == 0 else v[i:i + 1] for k, v in enumerate([data[0][0].expand(3, 5, 5)] + data[1:])])
        assert one.shape == (1, 5)
        assert torch.allclose(one[0], Y[i], atol=1e-9)
    (alone,), _ = bp(*[v[0] for v in data])  # nothing batched: B = 1
    assert alone.shape == (1, 5)


def test_batched_deepcopy_and_pickle():
    prob, params, variables = sparsemax_problem(5)
    bp = BatchedProgram(prob, params, variables)
    X = torch.randn(4, 5, dtype=F64)
    (Y,), _ = bp(X)
    for other in (copy.deepcopy(bp), pickle.loads(pickle.dumps(bp))):
        (Y2,), info = other(X)
        assert torch.equal(Y, Y2) and info.solved.all()


def test_batched_not_fooled_by_scale():
    prob, params, variables = sparsemax_problem(6)
    t = cp.Parameter(nonneg=True)
    x, y = params[0], variables[0]
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [cp.sum(y) == t, y >= 0])
    bp = BatchedProgram(prob, [x, t], [y])
    # Seeded: with the global stream the data depended on the tests run before (1 draw in
    # 300 leaves BatchedProgram one element short of certified at 1e8, residual 4.6e-7 for a
    # point right to 1e-14; ConvexLayer's second opinion certifies it).
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(4, 6, dtype=F64, generator=gen)
    T = torch.rand(4, dtype=F64, generator=gen) + 0.5
    (ref,), _ = bp(X, T)
    for k in (1e-8, 1e8):
        (Y,), info = bp(k * X, k * T)
        assert info.solved.all()
        assert torch.allclose(Y / k, ref, atol=1e-9, rtol=1e-9)


def _capped_simplex(X: np.ndarray, T: np.ndarray) -> np.ndarray:
    """Closed form of argmin ‖y − x‖² s.t. Σy = t, y >= 0 per row: y = max(x − τ, 0), τ from sorted x."""
    u = -np.sort(-X, axis=1)
    css = np.cumsum(u, axis=1) - T[:, None]
    k = np.arange(1, X.shape[1] + 1)
    rho = (u - css / k > 0).sum(1)
    tau = css[np.arange(X.shape[0]), rho - 1] / rho
    return np.maximum(X - tau[:, None], 0.0)


def test_batched_certifies_a_bound_met_within_the_points_accuracy_at_any_scale():
    """The capped simplex of test_batched_not_fooled_by_scale at the draw (seed 123) whose
    element 0 ends its single polishing step with y_5 = 2.1e-14 of ‖y‖ on an active bound
    (its multiplier 0.03 of the largest): the point is right to 1e-14 at every scale, but
    its bound's pair read as 'not complementary' (the slack beyond 64 rounding units), and
    the limit point's row y_5 >= 0 failed from a scale of ~2e6 on: uncertified at 1e8
    (residual 4.6e-7). The closed form is the reference."""
    x, y, t = cp.Parameter(6, name="x"), cp.Variable(6, name="y"), cp.Parameter(nonneg=True)
    bp = BatchedProgram(cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [cp.sum(y) == t, y >= 0]), [x, t], [y])
    gen = torch.Generator().manual_seed(123)
    X = torch.randn(4, 6, dtype=F64, generator=gen)
    T = torch.rand(4, dtype=F64, generator=gen) + 0.5
    for k in (1e-8, 1.0, 1e4, 1e8):
        (Y,), info = bp(k * X, k * T)
        assert info.solved.all(), (k, info.residual)
        ref = _capped_simplex(X.numpy(), T.numpy())
        off = np.abs(Y.numpy() / k - ref).max(1) / np.abs(ref).max(1)
        assert off.max() <= 1e-12, (k, off)


def test_batched_psd_parameter_in_quad_form():
    n = 3
    Q = cp.Parameter((n, n), PSD=True)
    q = cp.Parameter(n)
    y = cp.Variable(n)
    prob = cp.Problem(cp.Minimize(0.5 * cp.quad_form(y, Q) + q @ y), [y >= -1, y <= 1])
    bp = BatchedProgram(prob, [Q, q], [y])
    gen = torch.Generator().manual_seed(11)
    M = torch.randn(3, n, n, dtype=F64, generator=gen)
    Qv = M @ M.mT + 0.5 * torch.eye(n, dtype=F64)
    qv = 3 * torch.randn(3, n, dtype=F64, generator=gen)
    (Y,), info = bp(Qv, qv)
    assert info.solved.all()
    for i in range(3):
        (ref,) = cvxpy_solve(prob, [Q, q], [y], [Qv, qv], i)
        assert np.allclose(Y[i].numpy(), ref, atol=1e-7)


def test_batched_unsupported_cones():
    x = cp.Parameter(3)
    y = cp.Variable(3)
    prob = cp.Problem(cp.Minimize(cp.sum(cp.exp(y)) - x @ y))
    with pytest.raises(UnsupportedProblem):
        BatchedProgram(prob, [x], [y])


def test_batched_invalid_inputs_and_options():
    prob, params, variables = sparsemax_problem(4)
    bp = BatchedProgram(prob, params, variables)
    with pytest.raises(ShapeError, match="parameter 0"):
        bp(torch.zeros(2, 5, dtype=F64))
    with pytest.raises(ShapeError, match="one per parameter"):
        bp(torch.zeros(2, 4, dtype=F64), torch.zeros(2, 4, dtype=F64))
    with pytest.raises(DTypeError, match="floating-point"):
        bp(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(OptionError, match="tol"):
        BatchedProgram(prob, params, variables, tol=0.0)
    with pytest.raises(OptionError, match="polish"):
        BatchedProgram(prob, params, variables, polish="sometimes")
    with pytest.raises(OptionError, match="float32"):
        BatchedProgram(prob, params, variables, dtype=torch.float32)
    prob2, params2, variables2, _ = qp_problem()
    bp2 = BatchedProgram(prob2, params2, variables2)
    data = qp_data(2)
    with pytest.raises(ShapeError, match="batch size"):
        bp2(*data[:5], data[5][:1])
    if torch.cuda.is_available():
        with pytest.raises(InputError, match="one device"):
            bp2(*data[:5], data[5].cuda())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batched_cuda_matches_cpu():
    prob, params, variables, _ = qp_problem()
    data = qp_data(8, seed=12)
    bp = BatchedProgram(prob, params, variables)
    cpu = [v.clone().requires_grad_(True) for v in data]
    gpu = [v.cuda().requires_grad_(True) for v in data]
    (Yc,), _ = bp(*cpu)
    (Yg,), info = bp(*gpu)
    assert Yg.device.type == "cuda" and info.solved.all()
    assert torch.allclose(Yg.cpu(), Yc, atol=1e-8)
    w = torch.randn_like(Yc)
    gc = torch.autograd.grad(Yc, cpu, w)
    gg = torch.autograd.grad(Yg, gpu, w.cuda())
    for a, b in zip(gc, gg):
        assert torch.allclose(b.cpu(), a, atol=1e-8)


def _corner(moving: bool):
    """min ½‖x − c‖² s.t. x₁ ≤ h₁, x₂ ≤ h₂, x₁ + x₂ ≤ h₃ at c = (1, 2), h = 0: three active
    rows at the vertex x = 0 of R² (a degenerate vertex)."""
    x, c = cp.Variable(2), cp.Parameter(2)
    G = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    if moving:
        h = cp.Parameter(3)
        return BatchedProgram(cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x - c)), [G @ x <= h]), [c, h], [x])
    return BatchedProgram(cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x - c)), [G @ x <= 0]), [c], [x])


def test_degenerate_vertex_with_moving_constraints_warns():
    # Moving h₃ up leaves x at 0, moving it down drags x along: one-sided derivatives of
    # x₁ + x₂ in h₃ are 0 and 1; the linearisation returned 0.82 without a warning.
    program = _corner(moving=True)
    c = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    h = torch.zeros(1, 3, dtype=torch.float64)

    def total(hh):
        return float(program(c, hh)[0][0].sum())

    step = torch.tensor([[0.0, 0.0, 1e-6]], dtype=torch.float64)
    assert abs((total(h + step) - total(h)) / 1e-6) < 1e-6
    assert abs((total(h) - total(h - step)) / 1e-6 - 1.0) < 1e-6
    hg = h.clone().requires_grad_()
    with pytest.warns(GradientWarning, match="degenerate vertex"):
        program(c, hg)[0][0].sum().backward()


def test_degenerate_vertex_of_a_fixed_polytope_is_differentiable():
    # The same vertex with constant constraints: x = 0 for every c near (1, 2), so the
    # gradient is 0 and exists although three rows are active in R².
    program = _corner(moving=False)
    c = torch.tensor([[1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        program(c)[0][0].sum().backward()
    assert float(c.grad.abs().max()) < 1e-9


def test_float32_solves_are_certified_and_agree_with_float64():
    """In float32 the limit scaling at the solution needs a larger shift (1e-5): with
    float64's 1e-12 no element with an active constraint was ever certified. Expected
    values: the float64 solve (itself checked against finite differences above)."""
    prob, params, variables, _ = qp_problem(n=12, m=10, p=3)
    data = qp_data(8, n=12, m=10, p=3, seed=4)
    b64 = BatchedProgram(prob, params, variables)
    b32 = BatchedProgram(prob, params, variables, dtype=torch.float32, tol=1e-6, tol_accept=1e-6, tol_error=1e-4)
    d64 = [d.clone().requires_grad_() for d in data]
    d32 = [d.float().requires_grad_() for d in data]
    (y64,), i64 = b64(*d64)
    (y32,), i32 = b32(*d32)
    assert i64.solved.all() and i32.solved.all(), i32.status_names()
    assert y32.dtype == torch.float32
    scale = float(y64.detach().abs().max())
    assert float((y32.detach().double() - y64.detach()).abs().max()) < 1e-5 * scale
    gy = torch.randn(8, 12, dtype=F64, generator=torch.Generator().manual_seed(5))
    g64 = torch.autograd.grad((y64 * gy).sum(), d64)
    g32 = torch.autograd.grad((y32 * gy.float()).sum(), d32)
    for a, b in zip(g32, g64):
        assert float((a.double() - b).abs().max()) < 1e-2 * float(b.abs().max())
    with pytest.raises(OptionError, match="tol_error"):
        BatchedProgram(prob, params, variables, dtype=torch.float32, tol_accept=1e-6)



def test_float32_second_order_cone_program_solves():
    """A float32 program with a second-order cone raised (the cone's row mask was
    float64 and made the iterates float64: "Input dtypes must be the same" in the KKT
    factorisation). Reference: the closed-form projection onto the unit ball."""
    x, y = cp.Variable(4), cp.Parameter(4)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [cp.norm(x, 2) <= 1])
    program = BatchedProgram(prob, [y], [x], dtype=torch.float32, tol=1e-6, tol_accept=1e-6, tol_error=1e-4)
    v = 3 * torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    v[0] = 0.3 * v[0] / v[0].norm()  # one inside the ball
    (out,), info = program(v)
    assert out.dtype == torch.float32 and info.solved.all(), info.status_names()
    expected = v / v.norm(dim=-1, keepdim=True).clamp_min(1.0)
    assert float((out - expected).abs().max()) < 1e-5


def test_float32_step_length_with_exact_zero_directions():
    """In float32 the ratio test's floor 1e-300 was 0: a direction entry of exactly +0.0
    (data with exact zeros) became -0.0 and the step -inf, which froze the element as
    numerical trouble (one element of this batch failed; half stopped after 1-2
    iterations). Reference: the box projection's closed form, clamp(y, -1, 1)."""
    x, y = cp.Variable(8), cp.Parameter(8)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [x >= -1, x <= 1])
    program = BatchedProgram(prob, [y], [x], dtype=torch.float32, tol=1e-6, tol_accept=1e-6, tol_error=1e-4)
    v = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    v[:, :3] = 0.0
    (out,), info = program(v)
    assert info.solved.all(), info.status_names()
    assert int(info.iterations.min()) >= 3  # none frozen after a step or two
    assert float((out - v.clamp(-1, 1)).abs().max()) < 1e-5


# ------------------------------------------------------------------ routing by size


def test_auto_solves_mpc_and_dense_qps_batched_and_large_separable_programs_per_element():
    """The routing of ConvexLayer(solver="auto") by work per iteration: the MPC (420
    variables, 248 equalities, eliminated before iterating) and a dense QP with n = 200
    go batched (13× and 250× faster than per element on 2 cores; the MPC was routed per
    element before); an L1-ball projection in R^128 (nearly separable) stays per element
    (2× faster there). The MPC's solution matches CVXPY + Clarabel and its gradient
    central finite differences."""
    from convexddn.bench.cases.convex import CONVEX_PROBLEMS  # the bench's MPC (cvxpylayers' form)

    prob, params, variables, _ = CONVEX_PROBLEMS["mpc30"][1](1, torch.Generator().manual_seed(0))
    layer = cddn.ConvexLayer(prob, params, variables)
    x0 = 3 * torch.randn(1, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
    x0.requires_grad_(True)
    u = layer(x0)
    assert layer.last_solve.backend == ["batched"] and layer.last_solve.solvers == ["batched"]
    want = cvxpy_solve(prob, params, variables, [x0.detach()], 0)[0]
    np.testing.assert_allclose(u[0].detach().numpy(), want, atol=1e-7)
    w = torch.randn(u.shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    (g,) = torch.autograd.grad((u * w).sum(), x0)
    step, fd = 1e-6, torch.zeros(8, dtype=F64)
    with torch.no_grad():
        for i in range(8):
            e = torch.zeros_like(x0)
            e[0, i] = step
            fd[i] = ((layer(x0 + e) - layer(x0 - e)) * w).sum() / (2 * step)
    torch.testing.assert_close(g[0], fd, atol=1e-6, rtol=1e-6)

    n = 200
    gen = torch.Generator().manual_seed(3)
    G, x_feas = torch.randn(n, n, dtype=F64, generator=gen), torch.randn(n, dtype=F64, generator=gen)
    q, x = cp.Parameter(n, name="q"), cp.Variable(n)
    dense = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x) + q @ x),
                       [G.numpy() @ x <= (G @ x_feas).numpy() + 1.0])
    layer = cddn.ConvexLayer(dense, [q], [x])
    layer(torch.randn(2, n, dtype=F64, generator=gen))
    assert layer.last_solve.backend == ["batched"] * 2

    prob, params, variables = l1_ball_problem(128)
    layer = cddn.ConvexLayer(prob, params, variables)
    layer(torch.randn(2, 128, dtype=F64, generator=gen))
    assert layer.last_solve.backend == ["per_element"] * 2


def test_batch_beyond_the_memory_budget_is_solved_in_chunks(monkeypatch):
    """A batch larger than the memory budget holds is solved in chunks that fit (it went
    to the per-element path before: 13× slower on a constrained MPC); the chunks' results
    and gradients are the whole batch's."""
    import convexddn.convex.batched as batched_module

    prob, params, variables, _ = qp_problem()
    data = [v.requires_grad_() for v in qp_data(8)]
    layer = cddn.ConvexLayer(prob, params, variables)
    whole = layer(*data)
    (g_whole,) = torch.autograd.grad(whole.sum(), data[1])
    per_element = layer._batched.memory_estimate(1)
    monkeypatch.setitem(batched_module._BATCHED_MAX_BYTES, "cpu", 3 * per_element)
    assert layer._batched.max_batch(torch.device("cpu")) == 3
    calls = []
    original = batched_module.ConeSolve.apply
    monkeypatch.setattr(batched_module.ConeSolve, "apply",
                        lambda P, *rest: calls.append(P.shape[0]) or original(P, *rest))
    chunked = layer(*data)
    (g_chunked,) = torch.autograd.grad(chunked.sum(), data[1])
    assert calls == [3, 3, 2]
    assert layer.last_solve.backend == ["batched"] * 8 and all(layer.last_solve.solved)
    torch.testing.assert_close(chunked, whole, atol=1e-12, rtol=0)
    torch.testing.assert_close(g_chunked, g_whole, atol=1e-10, rtol=0)
    # One element beyond the budget: the per-element path.
    monkeypatch.setitem(batched_module._BATCHED_MAX_BYTES, "cpu", per_element - 1)
    layer(*[v.detach()[:2] for v in data])
    assert layer.last_solve.backend == ["per_element"] * 2


def test_backward_refines_until_its_kkt_residual_is_small():
    """An element of the bench's constrained MPC whose derivative system, regularised,
    gains only a constant factor per refinement step: the fixed three steps left the
    gradient 4e-3 off central differences (which agree one-sidedly to 1e-7 there, a
    smooth point); refining until the residual is small brings it within 1e-6."""
    from convexddn.bench.cases.convex import CONVEX_PROBLEMS

    gen = torch.Generator().manual_seed(0)
    prob, params, variables, data = CONVEX_PROBLEMS["mpc30"][1](8, gen)
    g = torch.randn((8,) + tuple(variables[0].shape), dtype=F64, generator=gen)[6:7]
    x = data[0][6:7]
    layer = cddn.ConvexLayer(prob, params, variables, solver="batched")
    x0 = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradientWarning)  # its vertex probe is high (5e6)
        (grad,) = torch.autograd.grad(layer(x0), x0, g)
    h = 1e-4
    with torch.no_grad():
        fd = torch.stack([((layer(x + h * e) - layer(x - h * e)) * g).sum() / (2 * h)
                          for e in torch.eye(8, dtype=F64)[:, None, :]])
    torch.testing.assert_close(grad[0], fd, atol=1e-5, rtol=0)


def test_socp_with_rows_of_very_different_scales_gradient():
    """min c·x + ‖Ax − b‖ s.t. |x| <= 10, rows of (A, b) 1e-4 to 1e4 apart in one cone
    (one Ruiz factor per cone): the backward's KKT system held the active bounds only by
    the lifted slack 1e-12, soft beside the cone's stiffness in those units: ∂x/∂c 0.2 off
    (true ~1e-7), with no warning. Reference: the per-element path (Clarabel + Newton,
    dense adjoint), which agreed with an mpmath solution of the exact KKT derivative."""
    rng = np.random.default_rng(7)
    n, m, B = 5, 4, 8
    rows = 10.0 ** rng.uniform(-4, 4, (B, m, 1))
    A_ = rng.standard_normal((B, m, n)) * rows
    b_ = rng.standard_normal((B, m)) * rows[..., 0]
    c_ = 0.1 * rng.standard_normal((B, n))
    x = cp.Variable(n)
    A, b, c = cp.Parameter((m, n)), cp.Parameter(m), cp.Parameter(n)
    prob = cp.Problem(cp.Minimize(c @ x + cp.norm(A @ x - b)), [cp.abs(x) <= 10])
    gy = torch.tensor(rng.standard_normal((B, n)))
    grads = []
    for solver in ("auto", "Clarabel"):
        ts = [torch.tensor(v, requires_grad=True) for v in (A_, b_, c_)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = cddn.ConvexLayer(prob, [A, b, c], [x], solver=solver)(*ts)
            grads.append(torch.autograd.grad((y * gy).sum(), ts))
    for got, ref in zip(*grads):
        scale = ref.abs().amax(tuple(range(1, ref.dim())), keepdim=True) + 1e-6
        assert float(((got - ref).abs() / scale).max()) < 1e-4


def test_structure_products_match_dense_integer_products():
    """The sparsity analysis' pattern products (canonical._meets) are sparse float
    products now (numpy's integer matmul has no BLAS: an L1-ball projection with
    n = 512 took 13 s to construct); reference: the integer products they replaced."""
    from convexddn.convex.canonical import _meets

    rng = np.random.default_rng(0)
    for shape, density in (((40, 30, 25), 0.1), ((7, 1, 9), 0.5), ((0, 5, 3), 0.3), ((12, 20, 20), 0.0)):
        m, k, n = shape
        a, b = rng.random((m, k)) < density, rng.random((k, n)) < density
        expected = (a.astype(np.int64) @ b.astype(np.int64)) > 0
        np.testing.assert_array_equal(_meets(a, b), expected)


def _batched_warned(layer, vals, loss=lambda y: y.sum()):
    """Run forward + backward; return (the elements the batched path solved, whether a
    GradientWarning named a 'not unique or not differentiable' solution, the gradients)."""
    vals = [v.detach().clone().requires_grad_(True) for v in vals]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = layer(*vals)
        loss(y).backward()
    texts = [str(w.message) for w in caught if issubclass(w.category, GradientWarning)]
    batched = [i for i, s in enumerate(layer.last_solve.solvers) if s == "batched"]
    return batched, texts, [v.grad for v in vals]


def edge_of_optima_lps():
    """``(layer, values)``: six LPs min cᵀx s.t. Gx ≤ h whose optimal set is an edge (a
    vertex with a zero multiplier on one active row, row 0, which can be released at no
    cost: the optimal face's extent is positive by construction)."""
    rng = np.random.default_rng(12)
    B, n, m = 6, 4, 7
    G = rng.standard_normal((B, m, n))
    xs = rng.standard_normal((B, n))
    h = np.einsum("bmn,bn->bm", G, xs)
    h[:, n:] += rng.random((B, m - n)) + 0.1
    lam = rng.random((B, n)) + 0.1
    lam[:, 0] = 0
    c = -np.einsum("bn,bnj->bj", lam, G[:, :n])
    x, cc, Gp, hp = cp.Variable(n), cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cc @ x), [Gp @ x <= hp]), [cc, Gp, hp], [x])
    return layer, [torch.tensor(v) for v in (c, G, h)]


def test_lp_with_an_edge_of_optima_is_warned_on_the_batched_path():
    """LPs whose optimal set is an edge (:func:`edge_of_optima_lps`): elements the batched
    path solved got gradients of 1e3-6e4 without a warning (rounding capped the derivative
    system's blow-up at ~2.5e3, below its 1e7 test); the per-element path warned. Now the
    limit system's test flags them; every batched element must be named and zeroed."""
    batched, texts, grads = _batched_warned(*edge_of_optima_lps())
    assert batched, "the batched path solved none: the test lost its subject"
    assert any("not unique" in t for t in texts)
    for i in batched:
        assert float(grads[0][i].abs().max()) == 0.0 and float(grads[2][i].abs().max()) == 0.0


def test_second_order_cone_tip_without_strict_complementarity_is_warned():
    """Group soft-threshold x = argmin ½‖x − v‖² + λ‖x‖ at ‖v‖ = λ: x = 0 at the cone's tip
    with its multiplier on the cone's boundary; the one-sided derivatives of x₁ in v₁ are
    0 and 0.64 (closed form x = (1 − λ/‖v‖)₊ v). The batched path returned a blend (0.007)
    without a warning: only nonnegative rows were checked for undecided pairs."""
    v, lam, x = cp.Parameter(2), cp.Parameter(nonneg=True), cp.Variable(2)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x - v) + lam * cp.norm(x)), []),
                             [v, lam], [x])
    vals = [torch.tensor([[0.6, 0.8]], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)]
    batched, texts, _ = _batched_warned(layer, vals, lambda y: y[0, 1])
    assert batched == [0]
    assert any("not unique or not differentiable" in t for t in texts)



@pytest.mark.parametrize("alpha", [1.5, 2.5])
def test_undecided_pair_the_outputs_do_not_see_is_not_warned(monkeypatch, alpha):
    """α-entmax through CVXPY's second-order-cone form of p^α: at an entry p_i = 0 the
    auxiliary cones sit at their tips with multipliers on their boundaries (a Jordan-frame
    pair undecided), but p_i is pinned by its own bound, so both sides give the same
    derivative. The batched path warned "not unique or not differentiable" on nearly every
    element; now only where the derivative reaches the open direction (the soft-threshold
    test above still warns). Gradients against the native node (exact sort-based solver)."""
    import convexddn.convex.interior_point as ip
    from convexddn.convex.certify import DECIDED
    from convexddn.nodes.entmax import entmax

    seen = []
    real = ip.undecided
    monkeypatch.setattr(ip, "undecided", lambda *a: seen.append(bool((real(*a) > DECIDED).any())) or real(*a))
    layer = cddn.layer("entmax", n=6, alpha=alpha, backend="cvxpy")
    x = 2 * torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    g = torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    batched, texts, grads = _batched_warned(layer, [x], lambda y: (y * g).sum())
    assert seen == [True], "no undecided pair: the test lost its subject"
    assert batched == list(range(8)) and not texts, texts
    xr = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(entmax(xr, alpha=alpha), xr, g)
    assert torch.allclose(grads[0], ref, atol=1e-7, rtol=0)

def test_unique_solutions_are_not_flagged_by_the_limit_test(monkeypatch):
    """The limit system's uniqueness test must stay quiet where the solution is unique:
    random QPs with inequalities and equalities, a projection onto a ball (SOC), and an
    L1-ball projection (an auxiliary epigraph variable per entry). Its gate is opened
    (LIMIT_GATE = 0: the test runs on every element; at 10 none of these reaches it)."""
    import convexddn.convex.uniqueness as uniqueness
    import convexddn.convex.vjp as vjp

    calls = []
    real = uniqueness.limit_nonunique
    monkeypatch.setattr(vjp, "LIMIT_GATE", 0.0)
    monkeypatch.setattr(uniqueness, "limit_nonunique", lambda *a: calls.append(1) or real(*a))
    prob, params, variables, _ = qp_problem(n=12, m=10, p=3)
    data = qp_data(8, n=12, m=10, p=3, seed=11)
    _, texts, _ = _batched_warned(cddn.ConvexLayer(prob, params, variables), data)
    assert not texts
    x, y = cp.Variable(5), cp.Parameter(5)
    for cons in ([cp.norm(x, 2) <= 1], [cp.norm(x, 1) <= 1]):
        layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(x - y)), cons), [y], [x])
        v = 3 * torch.randn(16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        _, texts, _ = _batched_warned(layer, [v])
        assert not texts, texts
    assert len(calls) == 3  # the test ran on each batch


def test_strictly_complementary_cone_with_a_small_multiplier_is_not_flagged_by_the_limit_test():
    """min qᵀy + 0.1‖Ly‖ s.t. Gy ≤ h, Ay = b, ‖y‖ ≤ r: an element drawn at random (1 of 40)
    whose norm cone is on its boundary with a multiplier z₀ = 8.4e-3 s₀ (equilibrated): the
    limit test decided the cone's tangent rows on s₀/z₀ against DECIDED = 1e-2, dropped
    its curvature, found a null direction and zeroed the gradient with "not unique or not
    differentiable", though every active multiplier is >= 6.5e-3 and the one-sided
    differences agree (the derivative system's amplification, 19.6, opened the gate).
    Reference: the per-element path (Clarabel, dense adjoint); CVXPY's central
    differences in q agree with it to 3e-4 (0.24, −0.26, 0.87, −8.38, 0.63, 6.64)."""
    f32 = lambda v: torch.tensor(v, dtype=torch.float32).to(F64)  # noqa: E731 (drawn in float32)
    vals = [f32([[0.519800723, -0.0298924502, -0.672201276, 0.307066023, -1.25969827, 0.00276550837],
                 [0.246610567, 0.181339815, 0.141076595, 0.124100327, -0.070388861, 0.264525563],
                 [-0.962126195, 0.236824185, -0.24923797, 0.370735139, -0.182292402, -0.218264431],
                 [0.259294927, 0.0171650704, -0.0742872357, -0.0892432854, -0.243432567, -0.227523953],
                 [0.00560220284, 0.425189823, -0.181072101, 0.167439759, -0.0882716924, 0.466595918],
                 [-0.487470537, -0.185364321, 0.452851027, -0.311913341, 0.369189739, 0.296206772]]),
            f32([-2.41258693, -0.572232902, 1.62421238, -0.295377761, 0.928911269, -0.584870458]),
            f32([[-0.460327923, -0.0838206932, 1.76898205, -0.284669191, -2.13996601, -0.37595576],
                 [1.05770671, 1.1271621, 0.118071638, 2.0371511, -1.39426196, -0.15838173],
                 [0.475050449, 0.0419499613, -1.23997271, -0.0322618112, -0.43490079, 0.147520959],
                 [0.285849571, 0.45303455, -0.0880640745, 0.594588816, -0.843469918, 0.849653363],
                 [-0.543517292, -0.30757755, 0.520714045, 0.560052872, 0.429172099, 0.645354927],
                 [-0.144104004, 0.80630976, -0.634655297, -0.987622976, 0.399567753, -0.00520245451],
                 [1.31217539, 0.876803875, -0.222762287, -1.5155611, 0.945164979, -0.392907977],
                 [-0.282375365, -0.800690234, 0.902125895, -0.336712748, 0.267136216, -1.56482422]]),
            f32([0.255652249, 0.562512338, 0.89174211, 0.684280515, 1.02954221, 0.614392817, 0.762781084, 1.1686182]),
            f32([[-1.71803248, -0.26092115, -0.119901717, -0.010366925, -0.221640289, 0.0756189451],
                 [-1.75926161, 1.38496709, -1.75420284, -0.503578782, 0.366991192, -0.321930945]]),
            f32([-0.022852255, -0.104045346]),
            f32(1.31045079)]
    w = torch.tensor([-0.5169946614841917, -1.0475461266021293, -0.02020351746384866, 0.08737857261825491,
                      2.306880372222595, -1.1814166687118122], dtype=F64)
    n, mi, me = 6, 8, 2
    L, q, G = cp.Parameter((n, n)), cp.Parameter(n), cp.Parameter((mi, n))
    h, A, b, r = cp.Parameter(mi), cp.Parameter((me, n)), cp.Parameter(me), cp.Parameter(nonneg=True)
    y = cp.Variable(n)
    prob = cp.Problem(cp.Minimize(q @ y + 0.1 * cp.norm(L @ y)), [G @ y <= h, A @ y == b, cp.norm(y) <= r])
    grads = {}
    for solver in ("auto", "Clarabel"):
        layer = cddn.ConvexLayer(prob, [L, q, G, h, A, b, r], [y], solver=solver)
        args = [v.clone().requires_grad_(True) for v in vals]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            grads[solver] = torch.autograd.grad(layer(*args) @ w, args)
        assert not [str(c.message) for c in caught if issubclass(c.category, GradientWarning)], solver
        if solver == "auto":
            assert layer.last_solve.backend == ["batched"], "not solved batched: the test lost its subject"
    ref = torch.cat([g.reshape(-1) for g in grads["Clarabel"]])
    got = torch.cat([g.reshape(-1) for g in grads["auto"]])
    assert float(ref.abs().max()) > 1.0  # (d(wᵀy)/dq₃ = −8.38)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4


def test_segment_of_optima_along_a_ray_of_the_cone_is_warned():
    """min w (t − x₁) s.t. ‖x‖ ≤ t ≤ 1: every (t, t, 0), t ∈ [0, 1], is optimal, along a
    ray of the cone's boundary (its multiplier w (1, −1, 0) nonzero). The limit system's
    tangent row along u = (1, 0) is zero up to rounding; scaled to unit length it was a
    constraint that does not exist, and the gradient (reaching the segment) passed
    without a warning. Every element must now be named and zeroed, for multipliers
    1e-4 to 10."""
    x, t, w = cp.Variable(2), cp.Variable(), cp.Parameter(pos=True)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(w * (t - x[0])), [cp.norm(x) <= t, t <= 1]), [w], [x, t])
    wv = torch.tensor([1.0, 1e-2, 1e-4, 10.0], dtype=F64)
    batched, texts, grads = _batched_warned(layer, [wv], lambda out: out[0].sum() + out[1].sum())
    assert batched == [0, 1, 2, 3], "not solved batched: the test lost its subject"
    assert any("not unique" in m and "set to zero" in m for m in texts), texts
    assert torch.equal(grads[0], torch.zeros_like(grads[0]))


def test_least_squares_with_a_huge_rhs_under_a_loose_box_is_normwise_exact(exact_solve):
    """min ‖Ax − b‖² s.t. |x| <= u with b ~ 6e9 (cond(A) 235) and the box inactive: the
    batched path returned x_1 = −5133 for 386.5 (2.2e-6 normwise, documented 1e-7) as
    solved. Truth: the normal equations of the float64 data in exact rationals."""
    A_ = [[-4.5122887803416005e-07, -4.5673932885566708e-06, 1.9412883415725599e-06],
          [-3.9823957665213419e-02, 3.4197125233663533e-01, -1.1151098308476134e-01],
          [-1.2010605937634899e+00, -1.1965552374946521e+01, -1.5758870787522506e+01],
          [4.0456350461074888e-08, 5.2061828781185418e-07, 2.4199677309948393e-07],
          [-6.6673987699051557e-02, 8.7804862938356903e-02, 1.9246309872571785e-01]]
    b_ = [4.1563515917528269e+05, -4.3843933024973914e+07, 6.1079870223173151e+09,
          1.7284998423280260e+06, -3.0067913476244742e+08]
    u_ = [1.2310022945242610e+12, 1.6176454429863543e+04, 1.1074491547386644e+10]
    solve, normal_equations = exact_solve
    exact = solve(*normal_equations(A_, b_))
    A, b, u = cp.Parameter((5, 3)), cp.Parameter(5), cp.Parameter(3)
    x = cp.Variable(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b)), [x <= u, x >= -u])
    layer = cddn.ConvexLayer(prob, [A, b, u], [x], solver="batched")
    y = layer(torch.tensor(A_, dtype=F64), torch.tensor(b_, dtype=F64), torch.tensor(u_, dtype=F64))
    assert layer.last_solve.statuses == ["solved"]
    assert float((y - exact).abs().max() / (1 + exact.abs().max())) < 1e-9


def ball_cut_problem(n=6):
    """Projection of p onto {‖x‖ ≤ r, aᵀx ≤ c}: a second-order cone, so the solutions are
    LU-polished (certify.finish)."""
    p, a = cp.Parameter(n, name="p"), cp.Parameter(n, name="a")
    r, c = cp.Parameter(nonneg=True, name="r"), cp.Parameter(name="c")
    x = cp.Variable(n, name="x")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - p)), [cp.norm(x, 2) <= r, a @ x <= c])
    return prob, [p, a, r, c], [x]


def ball_cut_data(batch, n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [2 * torch.randn(batch, n, dtype=F64, generator=gen), torch.randn(batch, n, dtype=F64, generator=gen),
            torch.rand(batch, dtype=F64, generator=gen) + 0.5, 0.3 * torch.randn(batch, dtype=F64, generator=gen)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", ["qp", "socp"])
def test_cuda_graph_steps_match_eager_steps(monkeypatch, step_graphs, case):
    """On CUDA the interior-point steps replay as captured graphs, kept for the next solve
    of the same shapes: same solutions and gradients as the eager steps
    (CONVEXDDN_CUDA_GRAPHS=0) for two batches solved one after the other (the second
    reuses the first's graphs, with its own data; the first's results stay intact)."""
    import convexddn._step_graphs as sg

    if case == "qp":
        prob, params, variables, _ = qp_problem()
        batches = [qp_data(16, seed=5), qp_data(16, seed=6)]
    else:
        (prob, params, variables), batches = ball_cut_problem(), [ball_cut_data(64), ball_cut_data(64, seed=1)]
    bp = BatchedProgram(prob, params, variables)

    def solve(data):
        args = [v.cuda().requires_grad_(True) for v in data]
        (Y,), info = bp(*args)
        assert info.solved.all()
        w = torch.linspace(-1, 1, Y.numel(), dtype=Y.dtype, device=Y.device).reshape(Y.shape)
        return Y.detach(), torch.autograd.grad(Y, args, w)

    monkeypatch.setenv("CONVEXDDN_CUDA_GRAPHS", "0")
    eager = [solve(data) for data in batches]
    assert step_graphs and not any(m.capture or m.replays for m in step_graphs)
    monkeypatch.setenv("CONVEXDDN_CUDA_GRAPHS", "1")
    monkeypatch.setattr(sg.StepGraphs, "_kept", sg.OrderedDict())
    step_graphs.clear()
    graphs = [solve(batches[0])]
    made = [m for m in step_graphs if m.site.startswith("interior point")]
    assert made and all(m.capture and m.reason is None and m.replays > 0 for m in made)
    step_graphs.clear()
    graphs.append(solve(batches[1]))
    assert not [m for m in step_graphs if m.site.startswith("interior point")]  # the kept ones served
    assert all(m.replays > 0 for m in sg.StepGraphs._kept.values())
    # Kept graphs made under inference mode serve a solve with autograd after it.
    monkeypatch.setattr(sg.StepGraphs, "_kept", sg.OrderedDict())
    with torch.inference_mode():
        (Yi,), _ = bp(*(v.cuda() for v in batches[1]))
    assert sg.StepGraphs._kept and torch.allclose(Yi, eager[1][0], atol=1e-9, rtol=1e-9)
    Ya, ga = solve(batches[0])
    assert torch.allclose(Ya, eager[0][0], atol=1e-9, rtol=1e-9)
    for (Yg, gg), (Ye, ge) in zip(graphs, eager):
        assert torch.allclose(Yg, Ye, atol=1e-9, rtol=1e-9)
        for a, b in zip(gg, ge):
            assert torch.allclose(a, b, atol=1e-8, rtol=1e-8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_graphs_replay_variants_and_fall_back(monkeypatch):
    """Two captured variants alternate on shared buffers and give the eager results; a
    body that reads the host cannot be captured: it runs eagerly (right result), and
    ``reason`` says why."""
    from convexddn._step_graphs import StepGraphs
    from convexddn.errors import ConvexDDNWarning

    # (a failed capture is recorded for its site for the whole process: not for later tests)
    monkeypatch.setattr(StepGraphs, "_failed", {})

    def pure(c):
        return lambda x, k: (x + c * k.sum(), k + 1, x.sum())

    graphs = StepGraphs(True)
    state = [torch.ones(3, device="cuda"), torch.zeros(2, device="cuda")]
    x, k = 1.0, 0.0
    for c in (1.0, 2.0, 1.0, 2.0, 2.0):
        total = 3 * x
        state, (extra,) = graphs.run(c, pure(c), state)
        x, k = x + c * 2 * k, k + 1
        assert state[0].tolist() == [x] * 3 and state[1].tolist() == [k] * 2 and extra.item() == total
    assert graphs.reason is None and graphs.replays == 5

    def swap(a, b):  # new values that are the other slot's buffers
        return b, a, a + b

    graphs = StepGraphs(True)
    state = [torch.zeros(2, device="cuda"), torch.ones(2, device="cuda")]
    for i in range(3):
        state, (total,) = graphs.run("swap", swap, state)
        assert state[0].tolist() == [float(i % 2 == 0)] * 2 and state[1].tolist() == [float(i % 2)] * 2
        assert total.tolist() == [1.0, 1.0]

    def reads(x, k):
        return x + float(k.sum()), k + 1  # float(): a host read

    graphs = StepGraphs(True)
    state = [torch.ones(3, device="cuda"), torch.zeros(2, device="cuda")]
    with pytest.warns(ConvexDDNWarning, match="could not be captured"):
        for _ in range(3):
            state, _ = graphs.run("only", reads, state)
    assert graphs.reason is not None and graphs.replays == 0
    assert state[0].tolist() == [7.0] * 3 and state[1].tolist() == [3.0] * 2


@pytest.mark.parametrize("kind, polish", [("soc", "auto"), ("qp", "always")])
def test_memory_estimate_holds_the_newton_polish_matrices(monkeypatch, kind, polish):
    """Where the Newton polish takes LU steps on every element (second-order cones, or
    polish="always"), it holds each element's (n + m)-square KKT matrix K and K's LU factors
    at once; the estimate that sizes the chunks omitted them, and the chunks the 4 GiB budget
    allowed for ‖Ax‖₂ ≤ 1 (A 100×10) peaked at 7× it. The matrices' size is read from what
    the polish factorises, not from the estimate's formula."""
    import convexddn.convex.polish as polish_module

    n, rows = 4, 60
    A = np.random.default_rng(0).standard_normal((rows, n))
    x, c = cp.Variable(n), cp.Parameter(n)
    if kind == "soc":
        prob = cp.Problem(cp.Minimize(c @ x), [cp.norm(A @ x, 2) <= 1, cp.norm(x, 2) <= 10])
    else:
        prob = cp.Problem(cp.Minimize(cp.sum_squares(x - c)), [A @ x <= 1])
    program = BatchedProgram(prob, [c], [x], polish=polish)
    seen = []
    original = polish_module.lu_factor_ex
    monkeypatch.setattr(polish_module, "lu_factor_ex", lambda K: seen.append(tuple(K.shape)) or original(K))
    batch = 4
    _, info = program(torch.randn(batch, n, dtype=F64, generator=torch.Generator().manual_seed(0)))
    assert bool(info.solved.all()) and seen
    k, size, _ = max(seen)
    assert k == batch  # every element at once
    held = 2 * k * size * size * 8  # K and its factors, float64
    assert program.memory_estimate(batch) >= held
