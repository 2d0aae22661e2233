"""The exponential cone's projection (:mod:`convexddn.convex.exp_cone`) against points whose
projection is known by construction, and the per-element path's exponential-cone
solutions against closed forms."""
from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

import convexddn as cddn
from convexddn.convex.exp_cone import Memo, project_exp, projection_derivative

F64 = torch.float64


def _constructed(count: int, seed: int = 0):
    """Points v = s a(ρ) + μ b(ρ) (s > 0, μ ≥ 0): their projection is s a(ρ), their dual
    projection at −v is −μ b(ρ) (a on the cone's boundary, b its outward normal)."""
    rng = np.random.default_rng(seed)
    rho = rng.uniform(-30, 30, count)  # (far along the boundary too: Newton from diffcp's point fails there)
    s = np.exp(rng.uniform(-5, 5, count))
    mu = np.exp(rng.uniform(-12, 3, count)) * (rng.uniform(size=count) > 0.1)
    return _built(rho, s, mu)


def _built(rho, s, mu):
    """``(v, Π_K(v), −Π_K*(−v))`` of :func:`_constructed` for given ``ρ, s, μ`` ``(count,)``."""
    e, one = np.exp(rho), np.ones_like(rho)
    a = np.stack([rho, one, e], 1)
    b = np.stack([e, (1 - rho) * e, -one], 1)
    return s[:, None] * a + mu[:, None] * b, s[:, None] * a, mu[:, None] * b


@pytest.mark.parametrize("scale", [1e-9, 1.0, 1e9])
def test_projection_of_constructed_points_to_rounding(scale):
    # diffcp's (a bisection to 1e-8 with membership tests at 1e-6): errors up to 8e-5 relative,
    # 2.5 at scale 1e-7 (its tolerances are absolute).
    v, want, _ = _constructed(5000)
    err = np.abs(project_exp(scale * v) - scale * want).max(1) / np.abs(scale * v).max(1)
    assert np.quantile(err, 0.99) < 1e-15 and err.max() < 1e-13, (np.quantile(err, 0.99), err.max())


def test_projection_is_positively_homogeneous():
    # A review found 0.18-0.84 relative errors below scale 1e-5 and above 1e155.
    v = np.array([[1.0, -1.0, 1.0], [0.0178, -0.4365, 0.1912], [20.0, 1.0, np.exp(20.0) - 0.1], [-0.3, 2.0, 0.1]])
    base = project_exp(v)
    for k in range(-12, 151, 9):
        np.testing.assert_allclose(project_exp(v * 10.0 ** k), base * 10.0 ** k, rtol=1e-14, atol=0)


def test_dual_projection_of_constructed_points():
    v, _, normal = _constructed(2000, seed=1)
    err = np.abs(project_exp(-v, dual=True) + normal).max(1) / np.abs(v).max(1)
    assert np.quantile(err, 0.99) < 1e-14 and err.max() < 1e-10


def test_the_closed_form_cases():
    v = np.array([
        [-1.0, 2.0, 5.0],     # in K: itself
        [1.0, -2.0, -3.0],    # in the polar cone: 0
        [-1.0, -2.0, 3.0],    # r, s <= 0: (r, 0, max(t, 0))
        [-1.0, -2.0, -3.0],
    ])
    want = np.array([[-1.0, 2.0, 5.0], [0.0, 0.0, 0.0], [-1.0, 0.0, 3.0], [-1.0, 0.0, 0.0]])
    np.testing.assert_allclose(project_exp(v), want, rtol=0, atol=1e-15)


def test_memo_starts_from_the_last_roots_and_keeps_the_answers():
    # The per-element polish projects nearby points in turn: Newton from the last roots (a
    # Memo), each verified, gives the constructed projection as from the point's own start.
    # The moved points are constructed too (ρ, s, μ moved by 1e-4 relative): known projections.
    rng = np.random.default_rng(3)
    rho, s, mu = rng.uniform(-30, 30, 2000), np.exp(rng.uniform(-5, 5, 2000)), np.exp(rng.uniform(-12, 3, 2000))
    v, want, _ = _built(rho, s, mu)
    move = lambda u: u * (1 + 1e-4 * rng.standard_normal(u.shape))  # noqa: E731
    moved, moved_want, _ = _built(move(rho), move(s), move(mu))
    memo = Memo()
    first = project_exp(v, memo=memo)
    for got, ref in ((first, want), (project_exp(moved, memo=memo), moved_want)):
        err = np.abs(got - ref).max(1) / np.abs(v).max(1)
        assert np.quantile(err, 0.99) < 1e-15 and err.max() < 1e-13, (np.quantile(err, 0.99), err.max())
    again = project_exp(v, memo=memo)  # (kept: the same bits, a copy the caller may write)
    again[0] = 0.0
    assert np.array_equal(project_exp(v, memo=memo), first)


def _projection_mpmath(v):
    """Π_K(v) for v outside K, its polar and the quadrant, in 40 digits: the ray a(ρ) = (ρ, 1, e^ρ)
    nearest v maximises ⟨v, a⟩ / ‖a‖ (started from the best of a grid of ρ); Π = ⟨v, a⟩ / ‖a‖² a."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(40):
        r, s, t = (mpmath.mpf(float(x)) for x in v)
        cos = lambda x: (r * x + s + t * mpmath.exp(x)) / mpmath.sqrt(x * x + 1 + mpmath.exp(2 * x))  # noqa: E731
        start = max((mpmath.mpf(k) / 4 for k in range(-240, 241)), key=cos)
        rho = mpmath.findroot(lambda x: mpmath.diff(cos, x), start)
        a = [rho, mpmath.mpf(1), mpmath.exp(rho)]
        return np.array([float((r * a[0] + s + t * a[2]) / (a[0] ** 2 + 1 + a[2] ** 2) * x) for x in a])


def test_projection_is_found_coordinate_by_coordinate_against_mpmath():
    # Newton from diffcp's point (ρ = -0.044, root 23.09) stopped after 8 steps 2.6e-6 off and
    # passed a check against 64 ε max|v|: r, s 2.5e-6 off (one ulp of v moves them 1e-14, 2.2e-8
    # at worst in the family below); for tiny coordinates beside a large t, 1.0 to 170 off.
    # Now the last step must be at ρ's rounding and v reconstructed coordinate by coordinate.
    rng = np.random.default_rng(11)
    family = np.stack([rng.uniform(50, 150, 24), rng.uniform(-3, -0.5, 24), 10 ** rng.uniform(10, 11, 24)],
                      1)
    v = np.concatenate([[[93.14104539767468, -1.274575751834779, 43043805084.21869],
                         [1.1017295428716723e-06, 1.00326661243944e-08, 1141790444087.0884],
                         [-6.750644214668343e-12, 1.6042714969974775e-13, -305801891.869525],
                         [-9.345564297164573e-06, 2.6939603571062494e-07, -1267111161090.7834]], family])
    want = np.array([_projection_mpmath(x) for x in v])
    err = np.abs(project_exp(v) - want) / np.abs(want)
    assert err.max() < 1e-13, (err.max(1), err.argmax() // 3)


def test_projection_derivative_against_central_differences():
    rng = np.random.default_rng(3)
    v = rng.standard_normal((3000, 3)) * np.exp(rng.uniform(-2, 2, (3000, 1)))
    h = 1e-6
    for dual in (False, True):
        D, known = projection_derivative(v, dual)
        fd = np.stack([(project_exp(v + h * e, dual) - project_exp(v - h * e, dual)) / (2 * h) for e in np.eye(3)], 2)
        assert known.all()
        assert np.abs(D - fd).max() < 1e-7  # (central differences: ~1e-9 here)


@pytest.mark.parametrize("adjoint", ["dense", "sparse"])
def test_entropy_projection_is_softmax_to_rounding(adjoint):
    """argmin −H(y) − θᵀy over Σy = 1 is softmax(θ), its Jacobian diag(p) − ppᵀ: the per-
    element path's exponential-cone solutions were 1.7e-8 off (its polish stalled on
    diffcp's projection) and gradients 3e-8 (diffcp's derivative of it); now to rounding."""
    n = 12
    th, y = cp.Parameter(n), cp.Variable(n)
    prob = cp.Problem(cp.Minimize(-cp.sum(cp.entr(y)) - th @ y), [cp.sum(y) == 1])
    layer = cddn.ConvexLayer(prob, [th], [y], solver="Clarabel", adjoint=adjoint)
    theta = torch.randn(4, n, dtype=F64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    g = torch.randn(4, n, dtype=F64, generator=torch.Generator().manual_seed(1))
    out = layer(theta)
    (grad,) = torch.autograd.grad(out, theta, g)
    p = torch.softmax(theta.detach(), -1)
    torch.testing.assert_close(out.detach(), p, atol=1e-13, rtol=0)
    torch.testing.assert_close(grad, p * g - p * (p * g).sum(-1, keepdim=True), atol=1e-12, rtol=0)
    assert max(layer.last_solve.residuals) < 1e-13


@pytest.mark.parametrize("adjoint", ["dense", "sparse"])
def test_logistic_regression_is_stationary_and_its_gradient_the_inverse_hessian(adjoint):
    """min Σ log(1 + exp(−yᵢ xᵢᵀw)) + ½‖w‖² − θᵀw: the gradient of the objective vanishes at
    w (it was 2e-7 off), and dw/dθ = H⁻¹ (H the objective's Hessian) for the backward
    (gradients were 2e-9 off with diffcp's derivative of the projection)."""
    gen = torch.Generator().manual_seed(0)
    n, m = 8, 30
    X = torch.randn(m, n, dtype=F64, generator=gen)
    lab = torch.randint(0, 2, (m,), generator=gen).double() * 2 - 1
    th, w = cp.Parameter(n), cp.Variable(n)
    loss = cp.sum(cp.logistic(-cp.multiply(lab.numpy(), X.numpy() @ w))) + 0.5 * cp.sum_squares(w) - th @ w
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(loss)), [th], [w], solver="Clarabel", adjoint=adjoint)
    theta = torch.randn(3, n, dtype=F64, generator=gen, requires_grad=True)
    g = torch.randn(3, n, dtype=F64, generator=gen)
    out = layer(theta)
    (grad,) = torch.autograd.grad(out, theta, g)
    wv, tv = out.detach(), theta.detach()
    sig = torch.sigmoid(-lab * (wv @ X.T))
    stationarity = -(sig * lab) @ X + wv - tv
    assert float(stationarity.abs().max()) < 1e-12
    H = torch.einsum("bm,mi,mj->bij", sig * (1 - sig), X, X) + torch.eye(n, dtype=F64)
    torch.testing.assert_close(grad, torch.linalg.solve(H, g.unsqueeze(-1)).squeeze(-1), atol=1e-12, rtol=0)


def test_derivative_of_subnormal_rows_is_finite_and_does_not_spoil_the_batch():
    # A review found np.linalg.inv raising for a whole batch on one row of ~1e-320.
    rng = np.random.default_rng(5)
    good = rng.standard_normal((50, 3))
    tiny = np.array([[5e-324, 0.0, 1e-300], [-1e-300, 5e-324, -1.0], [5e-324, 5e-324, 5e-324]])
    D, _ = projection_derivative(np.concatenate([good, tiny]))
    assert np.isfinite(D).all()
    D_good, _ = projection_derivative(good)
    np.testing.assert_array_equal(D[:50], D_good)


def _regularised_softmax(q: np.ndarray, lam: float, c: np.ndarray) -> tuple[np.ndarray, float]:
    """argmin −H(x) − qᵀx + λ‖x‖² over Σx = 1, and d(cᵀx)/dλ, independently of the code under
    test: log xᵢ + 1 − qᵢ + 2λxᵢ + ν = 0 solved by bisection (xᵢ in ν, ν in Σx = 1), then
    the implicit derivative (1/xᵢ + 2λ) dxᵢ = −2xᵢ dλ − dν with Σdx = 0."""
    def x_of(nu):
        lo, hi = np.full(q.size, 1e-300), np.full(q.size, 10.0)
        for _ in range(200):
            mid = np.sqrt(lo * hi)
            low = np.log(mid) + 1 - q + 2 * lam * mid + nu < 0
            lo, hi = np.where(low, mid, lo), np.where(low, hi, mid)
        return np.sqrt(lo * hi)

    a, b = -60.0, 60.0
    for _ in range(200):
        mid = 0.5 * (a + b)
        a, b = (mid, b) if x_of(mid).sum() > 1 else (a, mid)
    x = x_of(0.5 * (a + b))
    d = 1 / x + 2 * lam
    dnu = -np.sum(2 * x / d) / np.sum(1 / d)
    return x, float(c @ (-(2 * x + dnu) / d))


@pytest.mark.parametrize("lam, silent", [(3e-10, False), (1e-9, False), (1e-3, True)])
def test_a_regulariser_weight_below_the_solver_tolerance_is_not_silent(lam, silent):
    """λ‖x‖² becomes λ·t with t ≥ ‖x‖² (a second-order cone). At λ below Clarabel's
    tolerance its point leaves t slack with a zero multiplier (relative residual = λ), the
    polish cannot improve it, and the gradient in λ is another piece's (0.18 or −0.02
    against −0.11): that passed silently below a residual of 1e-8. Where the polish
    reaches rounding (λ = 1e-3), the gradient is exact and nothing is said."""
    n = 3
    x, q, weight = cp.Variable(n), cp.Parameter(n), cp.Parameter(nonneg=True)
    prob = cp.Problem(cp.Minimize(-cp.sum(cp.entr(x)) - q @ x + weight * cp.sum_squares(x)), [cp.sum(x) == 1])
    layer = cddn.ConvexLayer(prob, [q, weight], [x])
    rng = np.random.default_rng(0)
    qv, c = 2 * rng.standard_normal(n), rng.standard_normal(n)
    lam_t = torch.tensor(lam, dtype=F64, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = layer(torch.tensor(qv), lam_t)
        (grad,) = torch.autograd.grad(out @ torch.tensor(c), lam_t)
    said = [w for w in caught if issubclass(w.category, (cddn.errors.SolverWarning, cddn.errors.GradientWarning))]
    want_x, want_grad = _regularised_softmax(qv, lam, c)
    if silent:
        assert not said
        np.testing.assert_allclose(out.detach().numpy(), want_x, rtol=0, atol=1e-12)
        assert abs(grad.item() - want_grad) < 1e-9
    else:
        assert said and "polish left it above rounding" in str(said[0].message)


def test_derivative_correction_places_each_block_on_its_rows():
    # Against diffcp's operator taken as 0, the correction is the exact derivative itself:
    # each exponential cone's 3x3 block (K_exp* for a cone, K_exp for a dual cone) on its own
    # rows and columns, assembled here entry by entry; CSR in canonical form, as the triplets gave.
    from diffcp import cones as cone_lib

    from convexddn.convex.exp_cone import derivative_correction

    cones = [(cone_lib.ZERO, 2), (cone_lib.EXP, 2), (cone_lib.POS, 1), (cone_lib.EXP_DUAL, 1)]
    v = np.random.default_rng(5).standard_normal(12)

    class Zero:
        def matvec(self, e):
            return np.zeros_like(e)

    got = derivative_correction(v, cones, Zero())
    want = np.zeros((12, 12))
    for start, dual in ((2, True), (5, True), (9, False)):
        D, known = projection_derivative(v[None, start:start + 3], dual=dual)
        assert known.all()
        for i in range(3):
            for j in range(3):
                want[start + i, start + j] = D[0, i, j]
    assert got.has_canonical_format and got.nnz == 27
    np.testing.assert_array_equal(got.toarray(), want)
