"""convexddn.convex.parametric: whether a rank-deficient per-element adjoint's gradient is unique
(:func:`~convexddn.convex.parametric.unique_anyway`), at any scale of the data."""
from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

import convexddn as cddn
from convexddn.errors import GradientWarning

F64 = torch.float64


def _socp_layer():
    """min c·x + ½‖x‖² s.t. ‖A x − b‖ ≤ t, ‖x‖₁ ≤ 2t: strongly convex, its solution unique and,
    with both cones away from their kinks, differentiable. Its derivative system has null
    directions beyond the homogeneity one (auxiliary variables no parameter reaches)."""
    m, n = 5, 3
    A, b, c, t = cp.Parameter((m, n)), cp.Parameter(m), cp.Parameter(n), cp.Parameter()
    x = cp.Variable(n)
    prob = cp.Problem(cp.Minimize(c @ x + 0.5 * cp.sum_squares(x)),
                      [cp.norm(A @ x - b) <= t, cp.norm(x, 1) <= 2 * t])
    return cddn.ConvexLayer(prob, [A, b, c, t], [x], solver="Clarabel")


def _data(batch: int, seed: int):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((batch, 5, 3))
    b = np.einsum("kij,kj->ki", A, rng.standard_normal((batch, 3))) * 0.5 + 0.3 * rng.standard_normal((batch, 5))
    c = rng.standard_normal((batch, 3)) * 3
    t = np.abs(rng.standard_normal(batch)) + 1.5
    return [torch.tensor(v) for v in (A, b, c, t)], torch.tensor(rng.standard_normal((batch, 3)))


def _grads(layer, values, W):
    values = [v.clone().requires_grad_(True) for v in values]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = layer(*values)
        grads = torch.autograd.grad((W * y).sum(), values)
    return y.detach(), grads, [str(w.message) for w in caught if issubclass(w.category, GradientWarning)]


def test_a_unique_socp_solution_scaled_by_1e3_is_not_called_degenerate():
    """The data b, c, t scaled by s: y(A, s b, s c, s t) = s y(A, b, c, t), so the gradients in b, c, t
    are the unscaled ones and A's s times them. Unscaled, the gradient matches central finite
    differences. At s = 1e3 the solution's uniqueness test took its own null directions, below 1e-9
    of M's largest singular value in M's units, where the adjoint solve had decided the rank in
    equilibrated units: it called null a direction the solve kept (1.2e-10 of the largest; 1.4e-6
    equilibrated), the cotangent reached it, and 10 of 16 elements warned "not unique or not
    differentiable" (8 to 13 over seeds 1-6; 4 of these 8), their gradients equal to the unscaled
    ones to 5e-10."""
    layer = _socp_layer()
    values, W = _data(8, 5)
    y1, g1, warned = _grads(layer, values, W)
    assert not warned, warned
    h = 1e-6  # (float64 central differences of each element's W·y in t, then in each c_j)
    for k, j in [(3, None), (2, 0), (2, 1), (2, 2)]:
        with torch.no_grad():
            step = torch.zeros_like(values[k])
            if j is None:
                step += h
            else:
                step[:, j] = h
            up, down = (layer(*[v + sign * step if i == k else v for i, v in enumerate(values)])
                        for sign in (1, -1))
        fd = (W * (up - down)).sum(-1) / (2 * h)
        torch.testing.assert_close(g1[k] if j is None else g1[k][:, j], fd, atol=1e-6, rtol=1e-6)
    s = 1e3
    y, g, warned = _grads(layer, [v if i == 0 else s * v for i, v in enumerate(values)], W)
    assert not warned, warned
    torch.testing.assert_close(y, s * y1, atol=1e-6 * s, rtol=0)
    for i, (gi, g1i) in enumerate(zip(g, g1)):
        torch.testing.assert_close(gi, s * g1i if i == 0 else g1i, atol=1e-7 * float((s if i == 0 else 1) *
                                                                                          g1i.abs().max()), rtol=0)


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_a_degenerate_lp_still_warns_per_element_at_any_scale(scale):
    """Costs (1, 1, 2) · s on the simplex: every (τ, 1 − τ, 0) is optimal, at any s, and dy/dc does not
    exist; the null directions the solve drops reach the cotangent, so the warning stays."""
    c, y = cp.Parameter(3), cp.Variable(3)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(c @ y), [y >= 0, cp.sum(y) == 1]), [c], [y],
                             solver="Clarabel")
    costs = torch.tensor([[1.0, 1.5, 2.0], [1.0, 1.0, 2.0]], dtype=F64) * scale
    _, _, warned = _grads(layer, [costs], torch.tensor([[1.0, 0.0, 0.0]] * 2, dtype=F64))
    assert len(warned) == 1 and "not unique or not differentiable" in warned[0], warned
    assert "batch indices [(1,)]" in warned[0]


def test_data_tangent_is_the_residual_maps_derivative_along_the_parameters():
    """data_tangent(ω) = Q(dA, db, dc) Π(z), the skew data matrix of the data's derivative
    along ω (built here from its blocks, as the residual map's Q is), with A's entries at
    repeated positions and b's at a row twice summed."""
    import scipy.sparse as sp

    from convexddn.convex.parametric import Parametric, data_tangent

    rng = np.random.default_rng(0)
    m, n, k = 4, 3, 5
    rows, cols, b_rows = np.array([0, 1, 1, 3, 0]), np.array([2, 0, 0, 1, 1]), np.array([1, 2, 2])
    ab_map = sp.csr_matrix(rng.standard_normal((rows.size + b_rows.size, k)))
    c_map = sp.csr_matrix(rng.standard_normal((n, k)))
    par = Parametric(rows, cols, b_rows, ab_map, c_map)
    pi_z, omega = rng.standard_normal(n + m + 1), rng.standard_normal(k)
    d = ab_map @ omega
    dA = sp.coo_matrix((d[:rows.size], (rows, cols)), shape=(m, n)).toarray()
    db = sp.coo_matrix((d[rows.size:], (b_rows, np.zeros(b_rows.size, dtype=int))), shape=(m, 1)).toarray().ravel()
    dc = c_map @ omega
    Q = np.block([[np.zeros((n, n)), dA.T, dc[:, None]], [-dA, np.zeros((m, m)), db[:, None]],
                  [-dc[None, :], -db[None, :], np.zeros((1, 1))]])
    np.testing.assert_allclose(data_tangent(par, pi_z, n, omega), Q @ pi_z, rtol=0, atol=1e-13)
