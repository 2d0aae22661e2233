"""Kinks of the projection onto K* on the per-element path (:mod:`convexddn.convex.kinks`):
a cone block that is not strictly complementary, found and moved to either side, and
the GradientWarning the backward gives there where the side matters.

Before, only nonnegative rows were checked: a PSD, second-order or exponential cone at
a kink left the derivative system nonsingular, and the backward returned one side's
derivative (or a blend) silently. The expected values are closed forms (Daleckii–Krein
for the PSD projection, the second-order cone's projection derivative, a soft
threshold) and the one-sided limits the closed forms give at the kink.
"""
from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from diffcp import cones as cone_lib

import convexddn as cddn
from convexddn.convex import cone
from convexddn.convex.kinks import kink_sides
from convexddn.errors import GradientWarning

F64 = torch.float64
_Q = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]


def _sym(lam) -> np.ndarray:
    return (_Q * np.asarray(lam, dtype=float)) @ _Q.T


def _sides(kind, size, v: np.ndarray):
    """kink_sides for one block holding v (y, s its positive and negative parts there)."""
    cones = cone_lib.parse_cone_dict({kind: size})
    y = cone_lib.pi(v, cones, dual=True)
    return kink_sides(cones, y, y - v, 1e-12)


@pytest.mark.parametrize("lam, kink", [((2.0, 1.0, 0.0), True), ((1.0, 0.0, -1.0), True), ((0.0, 0.0, -1.0), True),
                                       ((2.0, 1.0, 0.5), False), ((2.0, -1.0, -3.0), False)])
def test_psd_block_sides_set_the_zero_eigenvalues(lam, kink):
    # rank Y + rank S < 3 exactly where an eigenvalue of V = Y − S is 0; each side puts it
    # at ±step, the others kept.
    sides = _sides("s", [3], cone_lib.vec_symm(_sym(lam)))
    assert (sides is not None) == kink
    if kink:
        for side, sign in zip(sides, (1.0, -1.0)):
            want = np.sort(np.where(np.asarray(lam) == 0.0, sign * 1e-12, lam))
            np.testing.assert_allclose(np.linalg.eigvalsh(cone_lib.unvec_symm(side, 3)), want, atol=1e-14, rtol=0)


@pytest.mark.parametrize("v, kink", [([1.0, 0.6, 0.8], True), ([-1.0, 0.6, 0.8], True), ([0.0, 0.0, 0.0], True),
                                     ([0.5, 0.6, 0.8], False), ([2.0, 0.6, 0.8], False), ([-2.0, 0.6, 0.8], False)])
def test_second_order_block_sides(v, kink):
    # spectral values t ± ‖u‖ (s = 0 with y on ∂K, y = 0 with s on ∂K, both 0 at the tip)
    sides = _sides("q", [3], np.array(v))
    assert (sides is not None) == kink
    if kink:
        lam = np.array([v[0] + np.linalg.norm(v[1:]), v[0] - np.linalg.norm(v[1:])])
        for side, sign in zip(sides, (1.0, -1.0)):
            got = np.array([side[0] + np.linalg.norm(side[1:]), side[0] - np.linalg.norm(side[1:])])
            np.testing.assert_allclose(got, np.where(lam == 0.0, sign * 1e-12, lam), atol=1e-16, rtol=0)


@pytest.mark.parametrize("v, kink", [
    ([0.0, 0.0, 0.0], True),               # y = s = 0
    ([-1.0, 0.0, 1.0 / np.e], True),       # s = 0, y on ∂K_exp* (u e^{v/u}: 1 = e w)
    ([1.0, 0.0, -0.5], True),              # y = 0, s = (−1, 0, 0.5) on K_exp's face r <= 0 = s
    ([1.0, 0.5, 0.0], True),               # s = (−1, 0, 0) and y = (0, 0.5, 0): faces of dimensions 1 + 1 < 3
    ([-1.0, 1.0, 1.0], False),             # inside K_exp*
    ([1.0, -1.0, -1.0], False),            # inside the polar
    ([1.0, 0.5, -0.5], False),             # s on the face's interior, y on the conjugate ray's
])
def test_exponential_block_kinks(v, kink):
    # (the cone's multiplier y = Π_{K_exp*}(v), its slack s = Π_{K_exp}(−v))
    assert (_sides("ep", 1, np.array(v)) is not None) == kink


def test_a_strictly_complementary_exponential_pair_on_the_boundary_is_no_kink():
    # v = −(σ a(ρ) + μ b(ρ)): s = σ a(ρ) on ∂K, y = μ b(ρ)... both nonzero, a smooth piece
    for rho in (-3.0, 0.0, 2.0):
        e = np.exp(rho)
        a, b = np.array([rho, 1.0, e]), np.array([e, (1 - rho) * e, -1.0])
        assert _sides("ep", 1, -(0.7 * a + 1.3 * b)) is None


def _psd_layer():
    A, X = cp.Parameter((3, 3), symmetric=True), cp.Variable((3, 3), symmetric=True)
    return cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(X - A)), [X >> 0]), [A], [X])


def _daleckii_krein(lam, W: np.ndarray) -> np.ndarray:
    """Gradient of <W, Π_PSD(A)> in A = Q diag(λ) Qᵀ (distinct λ, none 0; W symmetric):
    Q (G ∘ QᵀWQ) Qᵀ with G_ij = (λ_i⁺ − λ_j⁺) / (λ_i − λ_j), G_ii = [λ_i > 0]."""
    lam = np.asarray(lam, dtype=float)
    pos, diff = np.maximum(lam, 0.0), lam[:, None] - lam[None, :]
    G = np.where(np.eye(3, dtype=bool), (lam > 0)[:, None] * 1.0,
                 (pos[:, None] - pos[None, :]) / np.where(diff == 0, 1.0, diff))
    return _Q @ (G * (_Q.T @ W @ _Q)) @ _Q.T


def test_psd_projection_at_a_zero_eigenvalue_warns_naming_the_elements():
    """Π_PSD(A) at A with eigenvalues (2, 1, 0) or (1, 0, −1): along vvᵀ (v the zero
    eigenvector) the one-sided derivatives of trace Π are 1 and 0; the gradient came
    back as one of them with no warning. Elements (0, 1) and (1, 0) of a 2 × 2 batch sit
    at the kink; the others, strictly complementary, keep the closed form to 1e-8."""
    lams = [[(2.0, 1.0, -1.0), (2.0, 1.0, 0.0)], [(1.0, 0.0, -1.0), (3.0, 0.5, 0.25)]]
    A = torch.tensor(np.array([[_sym(lam) for lam in row] for row in lams]), dtype=F64, requires_grad=True)
    W = np.random.default_rng(1).normal(size=(3, 3))
    W = W + W.T
    with pytest.warns(GradientWarning, match="not unique or not differentiable") as rec:
        (_psd_layer()(A) * torch.tensor(W)).sum().backward()
    flagged = [w.message for w in rec if issubclass(w.category, GradientWarning)]
    assert len(flagged) == 1 and sorted(flagged[0].elements) == [(0, 1), (1, 0)]
    for i, j in [(0, 0), (1, 1)]:
        np.testing.assert_allclose(A.grad[i, j].numpy(), _daleckii_krein(lams[i][j], W), atol=1e-8, rtol=0)


def test_psd_kink_the_outputs_do_not_see_is_not_warned(monkeypatch):
    """A second PSD block projected from a constant singular matrix (a kink) that neither
    the output nor a parameter reaches: both sides give the same gradient, no warning."""
    seen, real = [], cone.kink_sides
    monkeypatch.setattr(cone, "kink_sides", lambda *a: seen.append(real(*a) is not None) or real(*a))
    A, X, Z = cp.Parameter((3, 3), symmetric=True), cp.Variable((3, 3), symmetric=True), cp.Variable((3, 3), PSD=True)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(X - A) + cp.sum_squares(Z - _sym((1.0, 0.0, -1.0)))), [X >> 0])
    At = torch.tensor(_sym((2.0, 1.0, -1.0)), requires_grad=True)
    W = np.diag([1.0, 2.0, 3.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        (cddn.ConvexLayer(prob, [A], [X])(At) * torch.tensor(W)).sum().backward()
    np.testing.assert_allclose(At.grad.numpy(), _daleckii_krein((2.0, 1.0, -1.0), W), atol=1e-8, rtol=0)
    assert seen == [True], "no kink found: the test lost its subject"


@pytest.mark.parametrize("c, want", [(0.5, None), (0.7, 1.0), (0.3, 0.0)])
def test_lambda_max_soft_threshold(c, want):
    """min_u λmax(X0 + u diag(1, −1, 0)) + (u − c)² with X0 = diag(1, 1, 0): u* is the soft
    threshold of c at ½. At c = ½ the SDP's multiplier loses rank (right derivative 1,
    left 0): du/dc came back 0 with no warning. Off the kink: the closed form, silently."""
    cp_c, X0, u = cp.Parameter(), cp.Parameter((3, 3), symmetric=True), cp.Variable()
    prob = cp.Problem(cp.Minimize(cp.lambda_max(X0 + u * np.diag([1.0, -1.0, 0.0])) + cp.square(u - cp_c)))
    layer = cddn.ConvexLayer(prob, [cp_c, X0], [u])
    ct = torch.tensor(c, dtype=F64, requires_grad=True)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        layer(ct, torch.tensor(np.diag([1.0, 1.0, 0.0]))).backward()
    warned = any(issubclass(w.category, GradientWarning) for w in rec)
    assert warned == (want is None)
    if want is not None:
        assert abs(ct.grad.item() - want) < 1e-7


def _exp_layer():
    a, y = cp.Parameter(3), cp.Variable(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - a)), [cp.constraints.ExpCone(y[0], y[1], y[2])])
    return cddn.ConvexLayer(prob, [a], [y])


def test_exponential_projection_kinks_warn():
    """Π_{K_exp}(a) at the tip (a = 0: along e₃ the one-sided derivatives are Π(e₃) = e₃
    and −Π(−e₃) = 0), at a on −∂K* (a = (1, 0, −1/e): projection 0, multiplier on ∂K*) and
    at a on the face r <= 0 = s (a = (−1, 0, ½): along e₂, Π moves with a₂ on one side
    only). Element 3, a = (−1, −½, ½), lies inside the quadrant r, s <= 0 < t, where
    Π(a) = (a₀, 0, a₂) (a smooth piece): not named, gradient (w₀, 0, w₂)."""
    pts = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, -1.0 / np.e], [-1.0, 0.0, 0.5], [-1.0, -0.5, 0.5]])
    at = torch.tensor(pts, requires_grad=True)
    with pytest.warns(GradientWarning, match="not unique or not differentiable") as rec:
        (_exp_layer()(at) * torch.tensor([0.3, 1.0, 0.7], dtype=F64)).sum().backward()
    flagged = [w.message for w in rec if issubclass(w.category, GradientWarning)]
    assert sorted(flagged[0].elements) == [(0,), (1,), (2,)]
    np.testing.assert_allclose(at.grad[3].numpy(), [0.3, 0.0, 0.7], atol=1e-8, rtol=0)


def test_exponential_projection_off_its_kinks_is_silent_and_exact():
    """Strictly complementary points of every smooth piece (inside, on the boundary with a
    positive multiplier, polar, quadrant): no warning, and the gradient matches central
    differences of the layer's own solution map."""
    layer = _exp_layer()
    pts = np.array([[-1.0, 1.0, 2.0], [1.0, 1.0, 1.0], [2.0, -1.0, 0.5], [-0.5, 2.0, -1.0], [1.0, -1.0, -1.0]])
    w = torch.tensor([0.3, 1.0, 0.7], dtype=F64)
    at = torch.tensor(pts, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        (layer(at) * w).sum().backward()
    h = 1e-6
    with torch.no_grad():
        fd = np.stack([((layer(torch.tensor(pts + h * e)) - layer(torch.tensor(pts - h * e))) * w).sum(1).numpy()
                       / (2 * h) for e in np.eye(3)], 1)
    np.testing.assert_allclose(at.grad.numpy(), fd, atol=1e-6, rtol=0)


def _soc_grad(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """wᵀ DΠ_SOC(a) for a outside K and −K: ½ [[1, uᵀ], [u, (1 + t/‖x‖) I − (t/‖x‖) u uᵀ]]."""
    t, x = a[0], a[1:]
    nx = np.linalg.norm(x)
    u = x / nx
    tail = (1 + t / nx) * np.eye(x.size) - t / nx * np.outer(u, u)
    D = 0.5 * np.block([[np.ones((1, 1)), u[None]], [u[:, None], tail]])
    return w @ D


def test_second_order_cone_kink_on_the_per_element_path_warns():
    """Π_SOC(a) at a = (−1, 0.6, 0.8) on −∂K (projection 0, multiplier on ∂K): the
    one-sided partials in a₀ are 0.73 and 0 (w = (0.3, 1, 0.7)); the batched path warned
    there, solver="Clarabel" did not. a = (0.5, 0.6, 0.8), strictly complementary, is
    silent and exact."""
    a, y = cp.Parameter(3), cp.Variable(3)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - a)), [cp.norm(y[1:]) <= y[0]]), [a], [y],
                             solver="Clarabel")
    w = np.array([0.3, 1.0, 0.7])
    at = torch.tensor([[-1.0, 0.6, 0.8], [0.5, 0.6, 0.8]], dtype=F64, requires_grad=True)
    with pytest.warns(GradientWarning, match="not unique or not differentiable") as rec:
        (layer(at) * torch.tensor(w)).sum().backward()
    flagged = [m.message for m in rec if issubclass(m.category, GradientWarning)]
    assert sorted(flagged[0].elements) == [(0,)]
    np.testing.assert_allclose(at.grad[1].numpy(), _soc_grad(np.array([0.5, 0.6, 0.8]), w), atol=1e-8, rtol=0)


def test_pair_tolerances_scale_with_their_rows():
    """A row times d: its slack's tolerance times d, its multiplier's over d (the pair's own
    scale); one absolute tolerance made pairs of rows scaled by 1e-8 kinks at a tenth of their
    size. The other rows' tolerances do not move."""
    from convexddn.convex.kinks import pair_tolerances

    rng = np.random.default_rng(3)
    A = sp.csc_matrix(rng.standard_normal((4, 3)))
    b, c, x, y, s = rng.standard_normal(4), rng.standard_normal(3), rng.standard_normal(3), rng.random(4), rng.random(4)
    d = np.array([1e-8, 1.0, 1.0, 1.0])
    cones = cone_lib.parse_cone_dict({"l": 4})
    ts, ty = pair_tolerances(A, b, c, x, y, s, 0.0, cones)
    ts2, ty2 = pair_tolerances(sp.csc_matrix(sp.diags(d) @ A), d * b, c, x, y / d, d * s, 0.0, cones)
    np.testing.assert_allclose(ts2, d * ts, rtol=1e-12)
    np.testing.assert_allclose(ty2, ty / d, rtol=1e-12)


def test_pair_tolerances_follow_each_blocks_own_columns():
    """Two second-order cones on separate variables, one at the solution's scale 1, one at
    1e-6 (a ball of radius 1e-6 beside unit data): each block's slack tolerance follows its
    own columns' x, so a slack of 1e-12 in the small ball (1e-6 of its size) is no kink; with
    the whole solution's scale it was, and the backward warned "not unique". A block whose
    columns are ~0 (below 1e-8 of the solution: a cone at its tip) keeps the solution's (and
    the tip's accuracy floor; the others, away from their tips, the finer one)."""
    from convexddn.convex.kinks import _RESOLVED_FLOOR, _UNDECIDED_FLOOR, pair_tolerances

    A = sp.csc_matrix(-np.eye(9))
    cones = cone_lib.parse_cone_dict({"q": [3, 3, 3]})
    x = np.concatenate([[1.0, 0.6, 0.8], [1e-6, 6e-7, 8e-7], [0.0, 1e-17, 0.0]])
    ts, _ = pair_tolerances(A, np.zeros(9), np.ones(9), x, np.zeros(9), x, 0.0, cones)
    np.testing.assert_allclose(ts[3:6], 1e-6 * ts[0], rtol=1e-12)
    np.testing.assert_allclose(ts[6:] / _UNDECIDED_FLOOR, ts[0] / _RESOLVED_FLOOR, rtol=1e-12)


@pytest.mark.parametrize("t", [1 + 1e-6, 1 - 1e-6])
def test_ball_just_off_its_sphere_is_no_kink_on_the_per_element_path(t):
    """‖y − c‖₂ <= r = 1e-6, x = c + t r u a millionth of r off the sphere: outside, the
    multiplier's spectral value is 2e-12 (‖x − y‖, exact to rounding: the slack's block is
    away from its tip); inside, the slack's is 1e-12 r. The tolerance floor for tips (1e-10
    of the block's dual scale, 1) made both kinks: "not unique or not differentiable" beside
    exact gradients. Closed form: dy/dx = I inside, (r/‖d‖)(I − d dᵀ/‖d‖²) outside."""
    g = np.random.default_rng(1)
    r = 1e-6
    x, y = cp.Parameter(3), cp.Variable(3)
    for _ in range(2):
        c, u = g.normal(size=3), g.normal(size=3)
        u /= np.linalg.norm(u)
        layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - x)), [cp.norm(y - c, 2) <= r]),
                                 [x], [y], solver="Clarabel")
        X = torch.tensor(c + t * r * u, requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error", GradientWarning)
            Y = layer(X)
            J = torch.stack([torch.autograd.grad(Y[i], X, retain_graph=True)[0] for i in range(3)]).numpy()
        d = X.detach().numpy() - c
        n = np.linalg.norm(d)
        ref = np.eye(3) if n <= r else (r / n) * (np.eye(3) - np.outer(d, d) / n ** 2)
        assert np.abs(J - ref).max() <= 1e-8
