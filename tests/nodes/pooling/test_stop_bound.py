"""The stopping bound of robust pooling at a loose ``tol``: a row stops within ``tol * (alpha + |y|)`` of its
(local) minimiser, ``|y|`` counted up to the row's spread for a row on one side of 0 (see ``robust_pool``'s
Stopping). Welsch rows at ``tol = 1e-2`` shifted off 0 stopped on a short Newton step where the curvature was
about to change sign: 0.58 from the local minimum (bound 0.083), not stationary, and not the shifted result of
the same row at 0 (tester 25M). The references are independent: the root of ``g`` (float64) bracketed from the
returned point along the descent direction and found by :func:`scipy.optimize.brentq`."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import convexddn.functional as F

brentq = pytest.importorskip("scipy.optimize").brentq

ROW = np.array([
    3.090809221203017, -0.3749818298365426, -0.11011664092438878, -2.3850027697008045, -0.23088673888196354,
    -4.429727314647607, 2.7111567754182033, -1.7434311835349945, -3.610559122473205, -1.8739462605717563,
    -0.19038353659379936, -1.0490708510260447, 0.771491209143278, -1.4173687784841604, 1.1673502604007808,
    2.726395294932445, -3.385243169395835, 1.1076555763465876, -2.868757097809066, -2.7762425997261744,
    0.23225521413587558, -3.056600550035, 2.1429147857397766, 1.0682698280488694, -2.0470671350685734,
    -0.3478749412661273, 0.641279703571854, 0.6753992191643192, 3.3221540332451696, 1.3973347677238053])


def _dphi(penalty: str, z: np.ndarray, a: float) -> np.ndarray:
    if penalty == "welsch":
        return z * np.exp(-z * z / (2 * a * a))
    if penalty == "pseudo_huber":
        return z / np.sqrt(1 + (z / a) ** 2)
    return np.clip(z, -a, a)  # huber


def _grad(penalty: str, u: float, x: np.ndarray, a: float) -> float:
    return float(_dphi(penalty, u - x, a).sum())


def _stationary_point(penalty: str, y: float, x: np.ndarray, a: float) -> float:
    """The root of g reached from ``y`` downhill: steps growing by 1.2 from 1e-7 alpha to the first sign
    change of g, then brentq (float64). For a convex penalty the minimiser."""
    g0 = _grad(penalty, y, x, a)
    if g0 == 0:
        return y
    s, step, u = -np.sign(g0), 1e-7 * a, y
    while np.sign(_grad(penalty, u + s * step, x, a)) == np.sign(g0):
        u += s * step
        step *= 1.2
        assert step < 100 * a + (x.max() - x.min()), "no root of g downhill"
    lo, hi = sorted([u, u + s * step])
    return brentq(lambda v: _grad(penalty, v, x, a), lo, hi, xtol=1e-15, rtol=1e-15)


def _bound(x: np.ndarray, y: float, a: float, tol: float, eps: float) -> float:
    """robust_pool's documented bound, plus y's own rounding (a few ulps)."""
    if x.min() > 0 or x.max() < 0:  # one side of 0: |y| counts up to the spread, beyond by min(tol, 64 eps)
        b = tol * a + max(tol * min(abs(y), x.max() - x.min()), min(tol, 64 * eps) * abs(y))
    else:
        b = tol * (a + abs(y))
    return b + 8 * eps * abs(y)


def _minimisers(penalty: str, y: float, x: np.ndarray, a: float) -> tuple[float, float]:
    """The (local) minimisers ``[lo, hi]`` the result should lie near: Welsch's stationary point reached from
    ``y``; a convex penalty's set ``{g <= 0} & {g >= 0}`` by bisection on the sign of g (non-decreasing) over
    the row's range, to within float64 rounding of g (Huber's is an interval where no entry lies within alpha
    of it and as many lie above as below)."""
    if penalty == "welsch":
        ym = _stationary_point(penalty, y, x, a)
        return ym, ym
    noise = 1e-12 * a * x.size

    def first(pred):  # the least u in [min x, max x] with pred(g(u)) (pred monotone in u)
        lo, hi = float(x.min()), float(x.max())
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if pred(_grad(penalty, mid, x, a)) else (mid, hi)
        return hi

    return first(lambda g: g >= -noise), first(lambda g: g > noise)


def _distance(y: float, ends: tuple[float, float]) -> float:
    return max(ends[0] - y, y - ends[1], 0.0)


def _pool(x: torch.Tensor, penalty: str, a: float, tol: float) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no SolverWarning: the rows are well resolved
        return F.robust_pool(x, penalty, a, tol=tol).double().reshape(-1).numpy()


@pytest.mark.parametrize("offset", [0.0, 100.0, 1e4])
def test_welsch_loose_tol_row_stops_within_the_bound_at_any_offset(offset):
    a, tol = 0.5, 1e-2
    x = ROW + offset
    y = float(_pool(torch.tensor(x), "welsch", a, tol)[0])
    ym = _stationary_point("welsch", y, x, a)
    # The local minimum the starts lead to, the same at every offset (0.7433 above it; old: 0.1607 off 0).
    assert abs(ym - offset - 0.743273) < 1e-5
    assert abs(y - ym) <= _bound(x, ym, a, tol, np.finfo(np.float64).eps)
    # Stationary to that bound: |g(y)| <= h(ym) times it, h(ym) = sum (1 - z^2 / a^2) exp(-z^2 / 2a^2) > 0.
    z = ym - x
    h = float(((1 - z * z / (a * a)) * np.exp(-z * z / (2 * a * a))).sum())
    assert h > 0 and abs(_grad("welsch", y, x, a)) <= 2 * h * _bound(x, ym, a, tol, np.finfo(np.float64).eps)


@pytest.mark.parametrize("penalty", ["welsch", "pseudo_huber", "huber"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_loose_tol_result_is_translation_equivariant(penalty, dtype):
    # Random rows of 30 (uniform, Gaussian, two clusters) at alpha 0.3 and 0.5, tol 1e-2, shifted by t: each
    # result within the bound of the stationary point reached from it, and y(x + t) - t within both bounds of
    # y(x) (plus the rounding of t). Old code: Welsch rows up to 7x beyond the bound at t = 100.
    rng = np.random.default_rng(7)
    eps = float(torch.finfo(dtype).eps)
    tol = 1e-2
    base = np.concatenate([rng.uniform(-4.5, 3.5, (48, 30)), 2 * rng.normal(size=(48, 30)),
                           rng.normal(size=(48, 30)) + 3 * (rng.random((48, 30)) < 0.4)])
    for a in (0.3, 0.5):
        ys, xs, sets = {}, {}, {}
        for t in (0.0, 100.0, -1e4):
            xt = torch.tensor(base + t, dtype=dtype)
            xs[t], ys[t] = xt.double().numpy(), _pool(xt, penalty, a, tol)
            sets[t] = [_minimisers(penalty, y, x, a) for x, y in zip(xs[t], ys[t])]
            for i in range(base.shape[0]):
                ends = sets[t][i]
                assert _distance(ys[t][i], ends) <= _bound(xs[t][i], ends[0], a, tol, eps), (a, t, i, ys[t][i], ends)
        for t in (100.0, -1e4):
            for i in range(base.shape[0]):
                # (x + t rounds in float32: its entries move by up to eps |t| / 2)
                allowed = (_bound(xs[0.0][i], ys[0.0][i], a, tol, eps) + _bound(xs[t][i], ys[t][i], a, tol, eps)
                           + eps * abs(t))
                # Where the minimiser is unique, y(x + t) - t within both bounds of y(x); Huber's may be an
                # interval, any point of which is a minimiser: there within both bounds of that set.
                lo, hi = sets[0.0][i]
                ref = ys[0.0][i] if hi - lo <= 1e-9 else min(max(ys[t][i] - t, lo), hi)
                assert abs(ys[t][i] - t - ref) <= allowed, (a, t, i, ys[t][i] - t, ys[0.0][i], (lo, hi))
