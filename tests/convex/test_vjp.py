"""Forward mode of the batched convex path (:func:`convexddn.convex.vjp.cone_jvp`).

Expected tangents: closed forms differentiated by torch itself (the L2-ball projection,
sparsemax's Jacobian), central finite differences in float64, and the reverse mode
through the dot-product identity ⟨u, J ṫ⟩ = ⟨Jᵀ u, ṫ⟩ (the backward is checked against
finite differences in test_batched.py).
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import cvxpy as cp
import pytest
import torch
import torch.autograd.forward_ad as fwAD

from convexddn.convex.batched import BatchedProgram
from convexddn.convex.layer import ConvexLayer
from convexddn.errors import DoubleBackwardError, GradientWarning, ProblemError

sys.path.insert(0, str(Path(__file__).parent))
from test_batched import (_corner, edge_of_optima_lps, qp_data, qp_problem, sparsemax,  # noqa: E402
                          sparsemax_problem)

F64 = torch.float64


def _tangents(values, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(v.shape, dtype=v.dtype, generator=gen) for v in values]


def _jvp(fn, values, tangents):
    with fwAD.dual_level():
        out = fn(*(fwAD.make_dual(v, t) for v, t in zip(values, tangents)))
        return fwAD.unpack_dual(out).tangent


def test_qp_every_parameter_against_finite_differences_and_reverse_mode():
    prob, params, variables, _ = qp_problem()
    layer = ConvexLayer(prob, params, variables)
    values = qp_data(6, seed=3)
    tangents = _tangents(values, 4)
    got = _jvp(layer, values, tangents)
    assert layer.last_solve.backend == ["batched"] * 6
    h = 1e-6
    with torch.no_grad():
        fd = (layer(*(v + h * t for v, t in zip(values, tangents)))
              - layer(*(v - h * t for v, t in zip(values, tangents)))) / (2 * h)
    torch.testing.assert_close(got, fd, rtol=1e-6, atol=1e-7)
    u = torch.randn(got.shape, dtype=F64, generator=torch.Generator().manual_seed(5))
    leaves = [v.clone().requires_grad_(True) for v in values]
    grads = torch.autograd.grad(layer(*leaves), leaves, u)
    torch.testing.assert_close((u * got).sum(), sum((g * t).sum() for g, t in zip(grads, tangents)),
                               rtol=1e-9, atol=1e-10)


def test_socp_ball_with_a_parameter_radius_matches_the_closed_form():
    n = 5
    x, r, y = cp.Parameter(n), cp.Parameter(nonneg=True), cp.Variable(n)
    layer = ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [cp.norm(y, 2) <= r]), [x, r], [y])
    gen = torch.Generator().manual_seed(6)
    X = 2 * torch.randn(8, n, dtype=F64, generator=gen)
    X[:3] *= 0.05  # inside the ball: y = x
    R = torch.rand(8, dtype=F64, generator=gen) + 0.5
    tX, tR = _tangents([X, R], 7)

    def exact(a, b):
        return a * (b[:, None] / a.norm(dim=1, keepdim=True)).clamp(max=1)

    _, want = torch.func.jvp(exact, (X, R), (tX, tR))
    torch.testing.assert_close(_jvp(layer, [X, R], [tX, tR]), want, rtol=1e-7, atol=1e-8)


def test_sparsemax_matches_its_jacobian():
    prob, params, variables = sparsemax_problem(12)
    program = BatchedProgram(prob, params, variables)
    x = torch.randn(16, 12, dtype=F64, generator=torch.Generator().manual_seed(8))
    t = torch.randn(16, 12, dtype=F64, generator=torch.Generator().manual_seed(9))
    got = _jvp(lambda v: program(v)[0][0], [x], [t])
    s = (sparsemax(x) > 0).to(F64)  # J = diag(s) − s sᵀ / |S|
    torch.testing.assert_close(got, s * t - s * (s * t).sum(-1, keepdim=True) / s.sum(-1, keepdim=True),
                               rtol=1e-7, atol=1e-8)


def test_dual_inputs_that_also_require_grad():
    prob, params, variables, _ = qp_problem()
    layer = ConvexLayer(prob, params, variables)
    values = [v.requires_grad_(True) for v in qp_data(3, seed=10)]
    tangents = _tangents(values, 11)
    with fwAD.dual_level():
        y = layer(*(fwAD.make_dual(v, t) for v, t in zip(values, tangents)))
        tangent = fwAD.unpack_dual(y).tangent
        # Inside the level a backward whose inputs carry tangents would differentiate the
        # gradient in forward mode (a second derivative the first-order backward cannot give):
        # refused (convexddn._first_order.refuse_forward_over_reverse). The graph outlives it.
        with pytest.raises(DoubleBackwardError, match="ConvexLayer"):
            y.sum().backward(retain_graph=True)
    y.sum().backward()  # reverse mode through the same call, after the level
    assert all(v.grad is not None for v in values)
    torch.testing.assert_close(tangent, _jvp(layer, [v.detach() for v in values], tangents), rtol=1e-9, atol=1e-10)


def test_degenerate_vertex_moved_apart_warns_and_gives_zero():
    program = _corner(moving=True)  # three active rows at a vertex of R², h₃ moves it
    c = torch.tensor([[1.0, 2.0]], dtype=F64)
    h = torch.zeros(1, 3, dtype=F64)
    with pytest.warns(GradientWarning, match="forward mode.*degenerate vertex"):
        got = _jvp(lambda a, b: program(a, b)[0][0], [c, h], [torch.zeros_like(c), torch.tensor([[0.0, 0.0, 1.0]], dtype=F64)])
    assert torch.equal(got, torch.zeros_like(got))


def test_per_element_path_refuses_forward_mode_clearly():
    prob, params, variables, _ = qp_problem()
    layer = ConvexLayer(prob, params, variables, solver="Clarabel")
    values = qp_data(2, seed=12)
    with pytest.raises(ProblemError, match="forward-mode differentiation is implemented on the batched path only"):
        _jvp(layer, values, _tangents(values, 13))
    # Without tangents the per-element path runs as usual under a dual level.
    with fwAD.dual_level():
        assert layer(*values).shape == (2, 5)


def test_forward_mode_with_an_infeasible_element_masks_or_raises_as_reverse_mode():
    """One infeasible element in a batch made the whole forward-mode call raise "forward
    mode is implemented on the batched path only" (the failure went to the per-element
    path for its second look): it is now masked (on_failure="mask") or raised as
    infeasible, as in reverse mode, and the other elements get their tangents."""
    from convexddn.errors import InfeasibleError, SolverWarning

    q, b, z = cp.Parameter(3), cp.Parameter(), cp.Variable(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(z - q)), [z >= 0, cp.sum(z) <= b])
    Q = torch.tensor([[0.3, 0.1, -0.5], [0.2, 0.4, 0.1], [1.0, 2.0, 3.0]], dtype=F64)
    B = torch.tensor([1.0, -1.0, 2.0], dtype=F64)  # element 1: z >= 0 with sum(z) <= -1
    T = torch.tensor([[1.0, -1.0, 0.5], [1.0, 1.0, 1.0], [0.5, 0.2, -0.3]], dtype=F64)
    layer = ConvexLayer(prob, [q, b], [z], on_failure="mask")
    with pytest.warns(SolverWarning, match=r"indices \[\(1,\)\]"):
        got = _jvp(lambda qq: layer(qq, B), [Q], [T])
    # Closed forms: row 0 projects q onto {z >= 0} (the sum bound 1 is slack): ż = ṫ where
    # q > 0; row 2 onto the simplex face sum(z) = 2 with z_0 = 0 (q − 0.5 on the support).
    torch.testing.assert_close(got[0], torch.tensor([1.0, -1.0, 0.0], dtype=F64), atol=1e-9, rtol=0)
    torch.testing.assert_close(got[2], torch.tensor([0.0, 0.25, -0.25], dtype=F64), atol=1e-9, rtol=0)
    # The masked element: its NaN output is a constant of the graph in both modes, as the docs
    # say (no gradient reaches it in reverse mode; a zero tangent in forward mode).
    assert torch.equal(got[1], torch.zeros(3, dtype=F64))
    X = Q.clone().requires_grad_()
    with pytest.warns(SolverWarning):
        out = layer(X, B)
    assert out[1].isnan().all()
    out.sum().backward()  # (a NaN loss: the masked element is in it)
    assert torch.equal(X.grad[1], torch.zeros(3, dtype=F64))
    with pytest.raises(InfeasibleError, match=r"\(1,\)"):
        _jvp(lambda qq: ConvexLayer(prob, [q, b], [z])(qq, B), [Q], [T])


def test_lp_with_an_edge_of_optima_has_no_tangent():
    """The LPs of test_batched.py whose optimal set is an edge: the backward names and
    zeroes every element; forward mode gave tangents up to 1.5e3 without a warning (rounding
    caps the system's blow-up, and a tangent need not excite it): the limit system decides."""
    layer, values = edge_of_optima_lps()
    with pytest.warns(GradientWarning, match="forward mode.*not unique"):
        got = _jvp(layer, values, _tangents(values, 14))
    batched = [i for i, s in enumerate(layer.last_solve.solvers) if s == "batched"]
    assert batched, "the batched path solved none: the test lost its subject"
    assert torch.equal(got[batched], torch.zeros_like(got[batched]))


def test_forward_mode_does_not_warn_where_an_undecided_pair_is_not_reached():
    """Forward mode of α-entmax (α = 1.5) through CVXPY's cone form: auxiliary cones at
    their tips leave pairs undecided that the outputs do not see (the backward's test in
    test_batched.py); no warning, tangents equal to the native node's (exact solver)."""
    import convexddn as cddn
    from convexddn.nodes.entmax import entmax

    layer = cddn.layer("entmax", n=6, alpha=1.5, backend="cvxpy")
    x = 2 * torch.randn(8, 6, dtype=F64, generator=torch.Generator().manual_seed(3))
    t = _tangents([x], 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _jvp(layer, [x], t)
    assert not [w for w in caught if issubclass(w.category, GradientWarning)]
    assert layer.last_solve.solvers == ["batched"] * 8
    ref = _jvp(lambda v: entmax(v, alpha=1.5), [x], t)
    assert torch.allclose(got, ref, atol=1e-7, rtol=0)


def test_dense_solve_falls_back_to_the_exact_limit_matrix():
    """entmax (alpha 1.5) through CVXPY's cone forms: the factorised backward stopped at a
    residual of 1.7e-6, and the dense solve, refined from the regularised matrix, gained
    4 % a step (1.2e-6 after ten, above BACKWARD_ACCEPT = 1e-6): the gradient was zeroed
    as "not unique", for this cotangent and not for others (a backward not linear in its
    cotangent). The exact limit matrix is nonsingular there and its own LU solves it to
    3e-11: the gradient equals the native node's (a closed-form backward) to 1e-8. (On
    this project's CI kind of machine the case reaches the dense solve; elsewhere
    rounding may let the factorised solve pass, and the check holds all the same.)"""
    import convexddn as cddn

    x = torch.tensor([[0.02206759, 0.9189101, -0.4198889, 0.32779854, -2.13822559, -1.44994807, 0.79591341,
                       -0.5901494]], dtype=F64, requires_grad=True)
    w = torch.tensor([[1.541, -0.2934, -2.1788, 0.5684, -1.0845, -1.3986, 0.4033, 0.838]], dtype=F64)
    cone = cddn.layer("entmax", n=8, alpha=1.5, backend="cvxpy")
    native = cddn.layer("entmax", n=8, alpha=1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g, = torch.autograd.grad((w * cone(x)).sum(), x)
    ref, = torch.autograd.grad((w * native(x)).sum(), x)
    torch.testing.assert_close(g, ref, rtol=0, atol=1e-8)


def _forward_mode(layer, value):
    with fwAD.dual_level():
        return fwAD.unpack_dual(layer(fwAD.make_dual(value, torch.ones_like(value)))).tangent


@pytest.mark.parametrize("mode", ["backward", "forward mode"])
def test_an_ill_conditioned_unique_solution_keeps_its_derivative(mode):
    """argmin over u >= 0 of u^1.005 - q u = (q/1.005)^200 (CVXPY's chain of second-order
    cones): at q = 1.05, du/dq = 200 (q/1.005)^199 / 1.005 = 1.2e6, and the derivative system
    amplifies the cotangent by 1.1e7, beyond AMPLIFICATION: the gradient was zeroed as "not
    unique", although the limit test finds the solution unique and the dense solve is 2.4e-8 off.
    That is above float64's 1e-8 promise (the system's own floor: tests/convex/test_power_gradient.py),
    so it is kept with the one GradientWarning that gives its estimated error (3e-7)."""
    u, q = cp.Variable(), cp.Parameter(name="q")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (CVXPY's note on the rational approximation)
        layer = ConvexLayer(cp.Problem(cp.Minimize(cp.power(u, 1.005) - q * u), [u >= 0]), [q], [u])
    qv = 1.05
    Q = torch.tensor(qv, dtype=F64, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = torch.autograd.grad(layer(Q), Q)[0] if mode == "backward" else _forward_mode(layer, Q.detach())
    assert layer.last_solve.backend == ["batched"]
    torch.testing.assert_close(g, torch.tensor(200 * (qv / 1.005) ** 199 / 1.005, dtype=F64), rtol=1e-6, atol=0)
    texts = [w.message for w in caught if issubclass(w.category, GradientWarning)]
    assert len(texts) == 1 and 1e-8 < texts[0].estimated_error[0] < 1e-4, [str(t) for t in texts]


def test_nearly_parallel_rows_have_their_derivative_where_it_is_solved_accurately():
    """min ‖y − c‖² s.t. Ey = f, y >= −5, rows 0 and 1 of E d apart: the solution is unique,
    d sum(y)/df = 1ᵀEᵀ(EEᵀ)⁻¹ ~ 1/d, and the multipliers go as 1/d². At d = 1e-7 the
    cotangent is amplified beyond AMPLIFICATION, and the gradient was zeroed as "not unique";
    the dense solve's estimated error certifies it (1.6e-6 off, estimated 1.7e-6: kept, with the
    GradientWarning giving that estimate, above float64's 1e-8 promise). At 1e-8 it does not (a
    gradient of 3, for 1e8, came back warned as a one-sided blend): zeroed, with the warning
    that the system could not be solved accurately, not that the solution is not unique."""
    n, p = 5, 3
    E, f, c, y = cp.Parameter((p, n)), cp.Parameter(p), cp.Parameter(n), cp.Variable(n)
    layer = ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - c)), [E @ y == f, y >= -5]), [E, f, c], [y])
    gen = torch.Generator().manual_seed(1)
    E0, r, f0, c0 = (torch.randn(*s, dtype=F64, generator=gen) for s in ((p, n), (n,), (p,), (n,)))
    for d in (1e-6, 1e-7, 1e-8):
        Et, ft = E0.clone(), 0.3 * f0
        Et[1], ft[1] = Et[0] + d * r, ft[0] + d * 0.5
        F = ft.clone().requires_grad_(True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = layer(Et, F, c0)
            (g,) = torch.autograd.grad(out.sum(), F)
        assert out.min() > -4  # (the bounds inactive)
        texts = [str(w.message) for w in caught if issubclass(w.category, GradientWarning)]
        estimates = [e for w in caught for e in getattr(w.message, "estimated_error", [])]
        if d < 1e-7:
            assert len(texts) == 1 and "could not be solved accurately" in texts[0], texts
            assert not g.any()
        else:
            exact = torch.linalg.pinv(Et).T @ torch.ones(n, dtype=F64)  # (EEᵀ)⁻¹E 1, unsquared
            torch.testing.assert_close(g, exact, rtol=1e-5, atol=0)
            if d < 1e-6:
                error = ((g - exact).abs().max() / exact.abs().max()).item()
                assert len(texts) == 1 and len(estimates) == 1 and error <= estimates[0] < 1e-4, texts
            else:
                assert not texts, texts


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_an_inactive_bound_has_an_exactly_zero_derivative(mode):
    """min ½‖u‖² + qᵀu s.t. u ≤ h at q = (-1, 0.5, -0.2), h = (3, 0.1, 0.05): the first bound has
    slack 2, so u ≤ h[0] leaves the solution u = (1, min(-0.5, 0.1), min(0.2, 0.05)) unchanged in h[0]
    for any nearby h: dL/dh[0] is 0, exactly (it came out ~1e-11, and Adam, which divides by a
    gradient's own size, moved h[0] by 5.8e-4 in 20 steps); the other bound's is the closed form."""
    q, h = cp.Parameter(3), cp.Parameter(3)
    u = cp.Variable(3)
    layer = ConvexLayer(cp.Problem(cp.Minimize(0.5 * cp.sum_squares(u) + q @ u), [u <= h]), [q, h], [u])
    qv = torch.tensor([[-1.0, 0.5, -0.2]], dtype=torch.float64)
    hv = torch.tensor([[3.0, 0.1, 0.05]], dtype=torch.float64, requires_grad=True)
    if mode == "reverse":
        y = layer(qv, hv)
        assert torch.allclose(y, torch.tensor([[1.0, -0.5, 0.05]], dtype=torch.float64), atol=1e-12)
        y.sum().backward()
        # u₀ = -q₀ and u₁ = -q₁ are free of h; u₂ = h₂ is active: gradient (0, 0, 1).
        assert hv.grad[0, 0].item() == 0.0 and hv.grad[0, 1].item() == 0.0
        assert abs(hv.grad[0, 2].item() - 1.0) < 1e-10
    else:
        with fwAD.dual_level():
            y = layer(qv, fwAD.make_dual(hv.detach(), torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)))
            tangent = fwAD.unpack_dual(y).tangent
        assert torch.equal(tangent, torch.zeros_like(tangent))


def test_an_inactive_bound_is_exactly_zero_beside_a_repolished_element():
    """x = (0.1, 0.2, 0.3) strictly inside a·y ≤ 0.43 (slack 0.23): y = x and dL/dh = 0, exactly,
    whatever shares the batch. Beside an element 1e-7 outside its halfspace (re-polished: the
    batch's KKT system is patched from two parts) it was -1.5e-12."""
    x, a, h = cp.Parameter(3), cp.Parameter(3), cp.Parameter()
    y = cp.Variable(3)
    layer = ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [a @ y <= h, y <= 5, y >= -5]), [x, a, h], [y])
    av = torch.tensor([1.0, 2.0, -1.0], dtype=F64)
    xv = torch.tensor([0.1, 0.2, 0.3], dtype=F64)
    X = torch.stack([xv, xv + 1e-7 * av / 6]).requires_grad_(True)
    H = torch.tensor([0.43, 0.2], dtype=F64, requires_grad=True)
    out = layer(X, av.expand(2, 3), H)
    (out * torch.tensor([0.3, -1.0, 0.7], dtype=F64)).sum().backward()
    assert torch.allclose(out[0], xv, atol=1e-14)
    assert H.grad[0].item() == 0.0
    assert torch.allclose(X.grad[0], torch.tensor([0.3, -1.0, 0.7], dtype=F64), atol=1e-12)
