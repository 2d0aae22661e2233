"""Robust pooling of rows near the end of the float range (entries up to ±0.97 max, spreads beyond max).

References are independent of the library: the convex penalties' minimisers by bisection of
g(u) = sum_i phi'(u - x_i) in mpmath at 60 digits (no overflow there) and a sign certificate
g(y - d) <= 0 <= g(y + d); Welsch's a local-minimum check in mpmath; the gradients from the closed
form of Gould et al. Table 1, dy/dx_i = phi''(y - x_i) / sum_j phi''(y - x_j), evaluated in mpmath.
"""
import warnings

import mpmath
import pytest
import torch

from convexddn.errors import SolverWarning
from convexddn.functional import robust_pool
from convexddn.nodes.pooling.penalties import Penalty
from convexddn.nodes.pooling.bisection import bisect_rows

mpmath.mp.dps = 60


def _dphi(name, z, a):
    r = z / a
    if name == "pseudo_huber":
        return z / mpmath.sqrt(1 + r * r)
    if name == "huber":
        return max(-a, min(a, z))
    return z * mpmath.exp(-r * r / 2)  # welsch (times alpha^2: the same roots and weight ratios)


def _d2phi(name, z, a):
    r = z / a
    if name == "pseudo_huber":
        return (1 + r * r) ** mpmath.mpf(-1.5)
    if name == "huber":
        return mpmath.mpf(1 if abs(z) <= a else 0)
    return (1 - r * r) * mpmath.exp(-r * r / 2)


def _g(name, u, xs, a):
    return mpmath.fsum(_dphi(name, u - v, a) for v in xs)


def _root(name, xs, a):
    """The root of the non-decreasing g between the row's ends, by bisection in mpmath."""
    lo, hi = min(xs), max(xs)
    for _ in range(260):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _g(name, mid, xs, a) < 0 else (lo, mid)
    return (lo + hi) / 2


def _call(x, name, alpha):
    x = x.clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y = robust_pool(x, name, alpha)
        (gx,) = torch.autograd.grad(y.sum(), x)
    return y.detach(), gx, [w for w in rec if issubclass(w.category, SolverWarning)]


M64 = torch.finfo(torch.float64).max
ROW = torch.tensor([-0.77, -0.34, 0.62], dtype=torch.float64) * M64  # x_max - x_min = 1.39 max


def test_pseudo_huber_row_spread_over_the_range():
    """Returned the row's minimum (8.6 alpha off), silently, with the gradient (0.998, 0.0015, 5e-5)."""
    alpha = 0.05 * M64
    xs = [mpmath.mpf(v) for v in ROW.tolist()]
    ref = _root("pseudo_huber", xs, mpmath.mpf(alpha))
    y, gx, warned = _call(ROW, "pseudo_huber", alpha)
    assert not warned
    assert abs(mpmath.mpf(y.item()) - ref) <= 1e-11 * (abs(ref) + alpha)
    w = [_d2phi("pseudo_huber", ref - v, mpmath.mpf(alpha)) for v in xs]
    expected = torch.tensor([float(wi / mpmath.fsum(w)) for wi in w], dtype=torch.float64)
    torch.testing.assert_close(gx, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["huber", "welsch", "pseudo_huber"])
def test_no_false_warning_on_row_near_the_end(name):
    """Huber's exact answer came with "cannot be resolved ... so flat there"; the row scaled by 2^-4 none."""
    alpha = 0.05 * M64
    y, _, warned = _call(ROW, name, alpha)
    y_s, _, warned_s = _call(ROW * 2.0 ** -4, name, alpha * 2.0 ** -4)
    assert not warned_s
    assert not warned
    assert y.item() / M64 == pytest.approx(y_s.item() * 16 / M64, rel=1e-13, abs=1e-13)
    if name == "huber":
        assert y.item() == ROW[1].item()  # closed form: g(u) = u - x_2 near x_2, slope 1


@pytest.mark.parametrize("name", ["welsch", "huber", "pseudo_huber"])
@pytest.mark.parametrize("n", [1, 5, 1000])
def test_constant_rows_at_the_float_max(name, n):
    """A single-entry Welsch row at the float max warned "cannot be resolved"; its answer is the entry."""
    x = torch.full((n,), M64, dtype=torch.float64)
    y, _, warned = _call(x, name, 1.0)
    assert not warned
    assert y.item() == M64


def test_bisect_rows_far_row():
    """The convex fallback bisected unscaled: pseudo-Huber's phi'(inf) is NaN, and it returned the row's min."""
    alpha = 0.05 * M64
    ref = _root("pseudo_huber", [mpmath.mpf(v) for v in ROW.tolist()], mpmath.mpf(alpha))
    y, _ = bisect_rows(Penalty.resolve("pseudo_huber"), ROW.unsqueeze(0), torch.tensor(alpha, dtype=torch.float64))
    assert abs(mpmath.mpf(y.item()) - ref) <= 1e-13 * (abs(ref) + alpha)


def _rows(dtype, n, count, seed):
    gen = torch.Generator().manual_seed(seed)
    m = torch.finfo(dtype).max
    x = ((torch.rand(count, n, generator=gen, dtype=torch.float64) * 2 - 1) * 0.97 * m).to(dtype)
    alpha = ((torch.rand(count, generator=gen, dtype=torch.float64) * 0.2 + 0.01) * m).to(dtype)
    return x, alpha


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["pseudo_huber", "huber", "welsch"])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_sweep_of_small_rows(dtype, name, n):
    """Rows in ±0.97 max (19 of them silently wrong for pseudo-Huber in float64, 0.3 to 15 alpha off)."""
    x, alpha = _rows(dtype, n, 16, 1000 * n + (dtype == torch.float32))
    rel = 1e-9 if dtype == torch.float64 else 2e-5
    y, gx, warned = _call(x, name, alpha)
    s = 2.0 ** -8
    _, _, warned_s = _call(x * s, name, alpha * s)
    if not warned_s:
        assert not warned, [str(w.message) for w in warned]
    for i in range(x.shape[0]):
        xs = [mpmath.mpf(v) for v in x[i].double().tolist()]
        a = mpmath.mpf(alpha[i].item())
        yi = mpmath.mpf(y[i].item())
        d = rel * (abs(yi) + a)
        # y is within d of a minimiser: g changes sign across [y - d, y + d] (convex), or is a
        # stationary point with positive curvature (Welsch: a local minimum).
        if name == "welsch":
            h = mpmath.fsum(_d2phi(name, yi - v, a) for v in xs)
            assert h > 0
            assert abs(_g(name, yi, xs, a)) <= d * h
        else:
            assert _g(name, yi - d, xs, a) <= 0 <= _g(name, yi + d, xs, a)
            if name == "pseudo_huber":
                assert abs(yi - _root(name, xs, a)) <= d
        w = [_d2phi(name, yi - v, a) for v in xs]
        sw = mpmath.fsum(w)
        if name == "huber" and sw == 0:
            continue  # no inlier: the gradient does not exist (zero, with a GradientWarning)
        expected = torch.tensor([float(wi / sw) for wi in w], dtype=torch.float64)
        torch.testing.assert_close(gx[i].double(), expected, rtol=0, atol=1e-7 if dtype == torch.float64 else 2e-3)
