"""Tests of the polish of robust vector pooling (convexddn.nodes._vector_pool_polish):
its stopping rule at data points, on flat objectives and at maxima.

References are written out here in float64 numpy: Newton on the geometric median, the
symmetry of a set, and a one-dimensional Welsch objective's roots by bisection.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from convexddn.errors import GradientWarning, SolverWarning
from convexddn.nodes.vector_pool import robust_vector_pool

D = torch.float64

# Five points whose coordinate-wise median (the convex penalties' start) is the data
# point (10, 10), which is not the geometric median: |Σ of the other points' unit
# vectors| = 1.21 > 1 there.
P = np.array([[0, 0], [1, 0.1], [1.1, -0.1], [-3, 1], [-0.1, -3]]) + 10.0


def geometric_median(X: np.ndarray, u: np.ndarray) -> np.ndarray:
    """argmin Σ ‖u − x_i‖ by Newton from u (away from every data point), float64."""
    for _ in range(50):
        d = u - X
        z = np.linalg.norm(d, axis=1)
        n = d / z[:, None]
        g = n.sum(0)
        H = sum((np.eye(len(u)) - np.outer(ni, ni)) / zi for ni, zi in zip(n, z))
        u = u - np.linalg.solve(H, g)
    return u


@pytest.mark.parametrize("name", ["pseudo_huber", "huber"])
@pytest.mark.parametrize("dtype,alpha", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_polish_leaves_a_data_point_that_is_not_the_minimiser(name, dtype, alpha):
    """The start, a data point, was returned: the IRLS and Newton steps there are about
    alpha long (one point's φ''(0) dominates the Hessian), below tol (alpha + |y|), and
    were taken for convergence, 0.225 from the minimiser (objective 0.32 % too high).
    For alpha far below the spread both penalties' minimisers are the geometric median
    within about alpha."""
    ref = geometric_median(P, np.array([10.2, 9.9]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverWarning)
        y = robust_vector_pool(torch.tensor(P.T[None].copy(), dtype=dtype), name, alpha)[0].double().numpy()
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(y, ref, rtol=0, atol=tol)


def test_polish_does_not_move_on_rounding_where_the_objective_is_flat():
    """Points 0, 0.1, ..., 0.9 on a line: the minimiser is 0.45 by symmetry (strictly
    convex), where the mean start lies. With alpha = 1e-8 the objective is so flat between
    0.4 and 0.5 that its gradient's rounding hides the minimiser: a Newton step on that
    rounding went to 0.450297 (3e-4 off, tolerance 4.5e-13), silently; float32 returned
    a data point. Now the row stays where the gradient is at its noise level and is
    reported unresolved; alpha = 1e-4 ran to max_iter from the exact start."""
    pts = np.linspace(0, 1, 11)[:10]
    for C, alpha in ((1, 1e-8), (2, 1e-8), (2, 1e-4)):
        x = torch.zeros(1, C, 10, dtype=D)
        x[0, 0] = torch.tensor(pts)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = robust_vector_pool(x, "pseudo_huber", alpha)
        messages = [str(w.message) for w in caught if issubclass(w.category, SolverWarning)]
        assert abs(float(y[0, 0]) - 0.45) <= 1e-12
        assert not any("did not reach" in m for m in messages)
        # (Resolved or reported so: with alpha = 1e-8 the gradient's noise over its
        # curvature, ~1e-3, is far beyond the tolerance.)
        if alpha == 1e-8:
            assert any("cannot be resolved" in m for m in messages)
    x = torch.zeros(1, 2, 10)
    x[0, 0] = torch.tensor(pts, dtype=torch.float32)
    with pytest.warns(SolverWarning, match="cannot be resolved"):
        robust_vector_pool(x, "pseudo_huber", 1e-8)


def _welsch_1d(u, xs):
    """f, f', f'' of Σ 1 − exp(−(u − x_i)² / 2) (alpha = 1)."""
    e = np.exp(-((u - xs) ** 2) / 2)
    return (1 - e).sum(), ((u - xs) * e).sum(), ((1 - (u - xs) ** 2) * e).sum()


@pytest.mark.parametrize("C", [1, 3])
def test_polish_does_not_stop_at_a_welsch_maximum(C):
    """Two points 2.01 alpha apart: the midpoint, the mean start, has a zero gradient by
    symmetry and negative curvature (a maximum, f = 0.793004); it was returned, with a
    backward of (0.5, 0.5) and no warning. The minima (f = 0.792914) are the roots of f'
    between the midpoint and each point (bisection here). C = 3: the pair on a line in
    3-D (more components than points: the Woodbury form of the Hessian)."""
    xs = np.array([0.0, 2.01])
    lo, hi = 1.005 + 1e-9, 2.01 - 1e-9  # f' < 0 just past the maximum, > 0 near the point
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _welsch_1d(mid, xs)[1] < 0 else (lo, mid)
    right = (lo + hi) / 2
    f_min = _welsch_1d(right, xs)[0]
    rot = torch.linalg.qr(torch.randn(C, C, dtype=D, generator=torch.Generator().manual_seed(0)))[0]
    x = (torch.tensor(xs, dtype=D).unsqueeze(-1) * rot[:, 0]).T.unsqueeze(0).clone().requires_grad_(True)  # (1, C, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverWarning)
        warnings.simplefilter("error", GradientWarning)
        y = robust_vector_pool(x, "welsch", 1.0)
        t = float(y[0].detach() @ rot[:, 0])  # the coordinate along the line
        assert min(abs(t - right), abs(t - (2.01 - right))) <= 1e-9  # either minimum (mirror images)
        assert _welsch_1d(t, xs)[0] <= f_min + 1e-12 and _welsch_1d(t, xs)[2] > 0
        torch.testing.assert_close(y[0], t * rot[:, 0], rtol=0, atol=1e-9)  # on the line
        (y[0] @ rot[:, 0]).backward()
    # Implicit function: dt/dx_i = φ''(t − x_i) / f''(t) along the line (φ'' of Welsch).
    d2 = (1 - (t - xs) ** 2) * np.exp(-((t - xs) ** 2) / 2)
    want = d2 / d2.sum()
    torch.testing.assert_close(x.grad[0].T @ rot[:, 0], torch.tensor(want, dtype=D), rtol=1e-7, atol=1e-9)


def _grads(x: torch.Tensor, pen: str, alpha: float, G: torch.Tensor, forward_mode: bool = False):
    """(the gradient of ⟨G, y⟩ in x, or the tangent of y along G-shaped dx = x's signs, in
    x's dtype as float64; the GradientWarnings' texts)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if forward_mode:
            out = torch.func.jvp(lambda v: robust_vector_pool(v, pen, alpha), (x,), (x.sign(),))[1]
        else:
            xr = x.clone().requires_grad_()
            (robust_vector_pool(xr, pen, alpha) * G.to(x.dtype)).sum().backward()
            out = xr.grad
    return out.double(), [str(w.message) for w in caught if issubclass(w.category, GradientWarning)]


@pytest.mark.parametrize("pen", ["pseudo_huber", "huber"])
@pytest.mark.parametrize("alpha", [1e-3, 1e-4])
@pytest.mark.parametrize("forward_mode", [False, True])
def test_float32_sets_far_from_their_points_give_float32_gradients_quietly(pen, alpha, forward_mode):
    # Sets of 50 standard-normal 3-D points, float32, alpha 1e-3 and 1e-4: y's grid is
    # coarse against alpha, the refinement's polish cannot reach 2^-13 alpha (the rounding
    # of far points' terms, ~eps over the spread), and 19 of 64 and 64 of 64 sets were
    # called unresolved (GradientWarning), in both modes. Yet y is >= 9 alpha from every
    # point, where those terms vary on their distance: the gradients match the float64
    # solve of the same data to float32's accuracy. Quiet now.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 50, generator=g)
    G = torch.randn(16, 3, generator=g)
    got, said = _grads(x, pen, alpha, G, forward_mode)
    ref, said64 = _grads(x.double(), pen, alpha, G, forward_mode)
    assert not said and not said64
    err = (got - ref).abs().flatten(1).amax(-1) / ref.abs().flatten(1).amax(-1)
    assert err.max() < 2e-6


@pytest.mark.parametrize("n_far, warns", [(8000, True), (200, False)])
def test_float32_refinement_warns_where_a_point_near_y_makes_it_true(n_far, warns):
    # The other side: 8000 points in mirrored pairs about c (their pulls cancel) and one
    # point 2 alpha from c, alpha 1e-4, pseudo-Huber: y sits within alpha of that point,
    # whose term varies on the scale alpha, and the float32 rounding of the far terms
    # leaves y too coarse for it: the float32 gradient is 1e-5 to 8e-5 off float64's
    # (float32's accuracy: ~2e-7), and that is warned. With 200 far points the rounding is
    # 40 times smaller: accurate and quiet.
    g = torch.Generator().manual_seed(0)
    half = torch.randn(2, n_far // 2, 3, generator=g, dtype=D)
    c = torch.tensor([0.5, -0.3, 0.2], dtype=D)
    near = c + 2e-4 * torch.nn.functional.normalize(torch.randn(2, 1, 3, generator=g, dtype=D), dim=-1)
    x = torch.cat([c + half, c - half, near], 1).float().transpose(1, 2).contiguous()
    G = torch.randn(2, 3, generator=g)
    got, said = _grads(x, "pseudo_huber", 1e-4, G)
    ref, said64 = _grads(x.double(), "pseudo_huber", 1e-4, G)
    err = (got - ref).abs().flatten(1).amax(-1) / ref.abs().flatten(1).amax(-1)
    assert not said64
    if warns:
        assert len(said) == 1 and "did not resolve their minimiser" in said[0] and err.min() > 5e-6
    else:
        assert not said and err.max() < 1e-6
