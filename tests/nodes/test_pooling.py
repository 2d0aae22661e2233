"""Tests of convexddn.nodes.pooling: robust pooling with the five penalties of Gould et al. Table 1.

Reference values come from the paper's definitions written out here (not from the
module), from brute-force minimisation, and from closed forms (the mean).
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from convexddn.nodes.pooling import kernels
from convexddn.nodes.pooling.backward import pool_backward
from convexddn.errors import (
    NonconvexError,
    ConvexDDNWarning,
    DTypeError,
    GradientWarning,
    NonFiniteError,
    OptionError,
    ShapeError,
    SolverWarning,
)
import convexddn as cddn
from convexddn.nodes.pooling import PENALTIES, Penalty, RobustPool, robust_pool

ALPHAS = (0.2, 1.0, 5.0)
CONVEX = ("quadratic", "pseudo_huber", "huber")


def phi_ref(name: str, z: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """Gould et al. Table 1, written out independently of the module."""
    if name == "quadratic":
        return 0.5 * z**2
    if name == "pseudo_huber":
        return alpha**2 * (torch.sqrt(1 + (z / alpha) ** 2) - 1)
    if name == "huber":
        return torch.where(z.abs() <= alpha, 0.5 * z**2, alpha * (z.abs() - 0.5 * alpha))
    if name == "welsch":
        return 1 - torch.exp(-(z**2) / (2 * alpha**2))
    if name == "trunc_quad":
        return torch.where(z.abs() <= alpha, 0.5 * z**2, 0.5 * alpha**2 * torch.ones_like(z))
    raise AssertionError(name)


def objective(name: str, x: torch.Tensor, u: torch.Tensor, alpha) -> torch.Tensor:
    """sum_i phi(u - x_i) over the last dim; u broadcasts against x[..., 0]."""
    return phi_ref(name, u.unsqueeze(-1) - x, alpha).sum(-1)


F64 = torch.float64


def with_outliers(seed: int, shape=(3, 9), dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    # Two gross outliers per row, 6 to 10 away on either side.
    sign = torch.where(torch.rand(shape[:-1] + (2,), generator=g) < 0.5, -1.0, 1.0).to(dtype)
    x[..., :2] = sign * (6 + 4 * torch.rand(shape[:-1] + (2,), generator=g, dtype=dtype))
    return x


def kink_margin(x: torch.Tensor, y: torch.Tensor, alpha: float) -> float:
    return float(((y.detach().unsqueeze(-1) - x.detach()).abs() - alpha).abs().min())


def input_away_from_kinks(penalty: str, alpha: float) -> torch.Tensor:
    """The first seed whose solution keeps every |y - x_i| at least 1e-3 from alpha (the
    kinks of Huber and truncated quadratic), so finite differences stay on one piece."""
    for seed in range(100):
        x = with_outliers(seed)
        y = robust_pool(x, penalty, alpha)
        if penalty not in ("huber", "trunc_quad") or kink_margin(x, y, alpha) > 1e-3:
            return x
    raise AssertionError(f"no seed in 0..99 keeps {penalty} at alpha={alpha} away from kinks")


# --------------------------------------------------------------------------- penalties


def test_penalty_resolve():
    for name in PENALTIES:
        pen = Penalty.resolve(name)
        assert isinstance(pen, Penalty) and pen.name == name
        assert Penalty.resolve(pen) is pen
    assert set(PENALTIES) == {"quadratic", "pseudo_huber", "huber", "welsch", "trunc_quad"}
    assert [Penalty.resolve(p).convex for p in PENALTIES] == [True, True, True, False, False]


def test_penalty_invalid():
    with pytest.raises(OptionError) as err:
        Penalty.resolve("hubber")
    for name in PENALTIES:
        assert name in str(err.value)
    assert "hubber" in str(err.value)
    with pytest.raises(OptionError, match="penalty"):
        Penalty.resolve(3)


@pytest.mark.parametrize("name", PENALTIES)
def test_penalty_derivatives(name):
    """phi matches Table 1; dphi, d2phi and d2phi_dalpha match autograd of Table 1's phi."""
    pen = Penalty.resolve(name)
    g = torch.Generator().manual_seed(1)
    z = 6 * torch.rand(200, generator=g, dtype=torch.float64) - 3
    alpha = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    z = z[((z.abs() - 0.8).abs() > 1e-3)].requires_grad_(True)  # away from the kinks
    ref = phi_ref(name, z, alpha)
    torch.testing.assert_close(pen.phi(z, alpha), ref)
    (d1,) = torch.autograd.grad(ref.sum(), z, create_graph=True)
    torch.testing.assert_close(pen.dphi(z, alpha), d1)
    d2 = torch.autograd.grad(d1.sum(), z, retain_graph=True, allow_unused=True)[0]
    d2 = torch.zeros_like(z) if d2 is None else d2
    torch.testing.assert_close(pen.d2phi(z, alpha), d2)
    # d2phi/dz dalpha, one residual at a time (alpha is shared).
    mixed = torch.stack(
        [
            torch.autograd.grad(d1[i], alpha, retain_graph=True, allow_unused=True)[0]
            or torch.zeros((), dtype=torch.float64)
            for i in range(z.numel())
        ]
    )
    torch.testing.assert_close(pen.d2phi_dalpha(z, alpha), mixed)
    # The scaled weights keep the ratios the backward uses.
    w, wa = pen.weights(z.detach(), alpha.detach())
    w0, wa0 = pen.d2phi(z, alpha).detach(), pen.d2phi_dalpha(z, alpha).detach()
    if w0.abs().sum() > 0:
        torch.testing.assert_close(w / w.sum(), w0 / w0.sum())
        torch.testing.assert_close(wa.sum() / w.sum(), wa0.sum() / w0.sum())


# --------------------------------------------------------------------------- forward


def test_robust_pool_quadratic_is_mean():
    x = with_outliers(0, (4, 6, 11)).requires_grad_(True)
    y = robust_pool(x, "quadratic", alpha=0.3)
    torch.testing.assert_close(y, x.mean(-1))
    g = torch.randn(4, 6, dtype=torch.float64)
    (gx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx, (g / 11).unsqueeze(-1).expand(4, 6, 11))


@pytest.mark.parametrize("name", CONVEX)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_robust_pool_convex_global(name, alpha):
    """Convex penalties: stationary, and no grid point has a lower objective."""
    x = with_outliers(3, (4, 10))
    y = robust_pool(x, name, alpha)
    grid = torch.linspace(-12, 12, 48001, dtype=torch.float64)
    f_grid = objective(name, x.unsqueeze(1), grid.expand(4, -1), alpha)
    assert (objective(name, x, y, alpha) <= f_grid.min(-1).values + 1e-12).all()
    # Optimality: sum_i phi'(y - x_i) = 0.
    u = y.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(name, x, u, alpha).sum(), u)
    assert grad.abs().max() < 1e-9


@pytest.mark.parametrize("alpha", ALPHAS + (0.05, 2.5, 1e-4))  # 1e-4: rows on the segmented sums
@pytest.mark.parametrize("seed", range(4))
def test_robust_pool_trunc_quad_exact(alpha, seed):
    """Truncated quadratic: the global minimiser, by brute force.

    The objective at every mean of a contiguous run of the sorted row (the global
    minimiser is one of them) and on a dense grid is never below the returned value."""
    x = with_outliers(seed, (3, 12))
    x[0, 5:8] = x[0, 2:5] + 0.001 * alpha  # near-duplicates
    y = robust_pool(x, "trunc_quad", alpha)
    f_y = objective("trunc_quad", x, y, alpha)
    s = x.sort(-1).values
    n = s.shape[-1]
    means = torch.stack([s[:, i:j].mean(-1) for i in range(n) for j in range(i + 1, n + 1)], -1)
    f_runs = objective("trunc_quad", x.unsqueeze(1), means, alpha)
    torch.testing.assert_close(f_y, f_runs.min(-1).values, rtol=0, atol=1e-12)
    grid = torch.linspace(-12, 12, 96001, dtype=torch.float64)
    f_grid = objective("trunc_quad", x.unsqueeze(1), grid.expand(3, -1), alpha)
    assert (f_y <= f_grid.min(-1).values + 1e-12).all()


def test_trunc_quad_float32_through_integer_key_sort():
    """float32 rows are sorted through int32 keys (:mod:`convexddn._sort`): the
    solution is the global minimiser found in float64 from the same entries, and a NaN
    with its sign bit set (which the keys put first, not last) still raises."""
    gen = torch.Generator().manual_seed(3)
    x = 3 * torch.randn(4, 40, generator=gen, dtype=torch.float32)
    x[1, 10:] = -x[1, 10:].abs()
    y32 = robust_pool(x, "trunc_quad", 1.0)
    y64 = robust_pool(x.double(), "trunc_quad", 1.0)
    torch.testing.assert_close(y32.double(), y64, rtol=1e-6, atol=1e-6)
    neg_nan = x.clone()
    neg_nan[2, 7] = -torch.tensor(math.nan)
    assert torch.signbit(neg_nan[2, 7])
    with pytest.raises(NonFiniteError, match="1 NaN"):
        robust_pool(neg_nan, "trunc_quad", 1.0)


def test_trunc_quad_duplicates_closer_than_an_ulp_of_alpha():
    # 2 alpha below half an ulp of the duplicates: s_i - 2 alpha rounded to s_i and the
    # run of equal entries was never a candidate (each returned 0, objective 2x the best).
    for x, dtype, alpha, best in (([1000.0, 1000.0, 0.0], torch.float32, 1e-5, 1000.0),
                                  ([1e8, 1e8, 0.0], torch.float32, 1.0, 1e8),
                                  ([3.0, 3.0, 0.0], torch.float64, 1e-17, 3.0)):
        y = robust_pool(torch.tensor([x], dtype=dtype), "trunc_quad", alpha)
        assert float(y) == best


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trunc_quad_runs_empty_exit_runs_never_win(dtype):
    """Empty exit runs are not masked out of the candidates: their value is exactly 0,
    above the first point's own run (-alpha^2), so they never win. Rows of isolated points
    (every exit run empty), clusters, duplicates, signed zeros, spread rows: the minimiser
    is the global one (the best mean of every contiguous run of the sorted row, brute force
    in float64)."""
    from convexddn._sort import sort_values
    from convexddn.nodes.pooling.trunc_quad import trunc_quad_runs

    gen = torch.Generator().manual_seed(5)
    alpha = 0.5
    x = torch.randn(6, 14, generator=gen, dtype=F64)
    x[0] = 3 * alpha * torch.arange(14.0, dtype=F64) - 7  # isolated points
    x[1, :7] = 0.25 * torch.arange(7.0, dtype=F64)  # a cluster among others
    x[2] = torch.round(4 * x[2]) / 4  # duplicates
    x[3, ::2] = torch.tensor([-0.0, 0.0] * 3 + [-0.0], dtype=F64)
    x[4] = 20 * x[4]  # spread: mostly singletons
    x = x.to(dtype)
    a = torch.tensor(alpha, dtype=dtype)
    s = sort_values(x)
    y, *_ = trunc_quad_runs(s, torch.searchsorted(s, s - 2 * a, out_int32=True), a)
    sd = s.double()
    n = sd.shape[-1]
    means = torch.stack([sd[:, i:j].mean(-1) for i in range(n) for j in range(i + 1, n + 1)], -1)
    f_best = objective("trunc_quad", x.double().unsqueeze(1), means, alpha).min(-1).values
    f_y = objective("trunc_quad", x.double(), y.double(), alpha)
    tol = 1e-12 if dtype == F64 else 1e-5
    torch.testing.assert_close(f_y, f_best, rtol=0, atol=tol)


def _root(g, lo: float, hi: float) -> float:
    """A sign change of g in [lo, hi] by plain bisection (Python floats)."""
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if (g(mid) > 0) == (g(hi) > 0):
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


def test_large_scalar_alpha_is_not_ignored():
    # alpha 1e200 given as a number: value / alpha^2 underflowed in the one-pass square,
    # every residual looked like 0 and the result was the mean (a tensor alpha was right).
    # References in units of alpha by bisection on g(u) = sum phi'(u - x_i), and the
    # gradient of Table 1, w_i / sum w with w = phi''.
    xs = [1.0344485964410367, 0.4028616889095925, -1.42300613021659]
    dphi = {"pseudo_huber": lambda r: r / math.sqrt(1 + r * r),
            "welsch": lambda r: r * math.exp(-r * r / 2)}
    d2phi = {"pseudo_huber": lambda r: (1 + r * r) ** -1.5,
             "welsch": lambda r: (1 - r * r) * math.exp(-r * r / 2)}
    x = torch.tensor([xs], dtype=F64) * 1e200
    for name in ("pseudo_huber", "welsch"):
        xg = x.clone().requires_grad_()
        y = robust_pool(xg, name, 1e200)
        u = float(y) / 1e200
        g = lambda v, name=name: sum(dphi[name](v - xi) for xi in xs)  # noqa: E731
        if name == "pseudo_huber":  # convex: the one root
            assert u == pytest.approx(_root(g, min(xs), max(xs)), rel=1e-12)
        else:  # a local minimum: the root of g next to it, with positive curvature
            ref = _root(g, u - 0.05, u + 0.05)
            assert u == pytest.approx(ref, rel=1e-12) and sum(d2phi[name](ref - xi) for xi in xs) > 0
        y.sum().backward()
        w = [d2phi[name](u - xi) for xi in xs]
        torch.testing.assert_close(xg.grad, torch.tensor([[wi / sum(w) for wi in w]], dtype=F64),
                                   rtol=1e-9, atol=1e-12)
    # float32: alpha 1e30 against data of 3e36 (the reference in units of alpha, float64)
    y32 = robust_pool(torch.tensor([[3e36, 0.0, 0.0, 0.0, 0.0]]), "pseudo_huber", 1e30)
    ref = _root(lambda v: dphi["pseudo_huber"](v - 3e6) + 4 * dphi["pseudo_huber"](v), 0.0, 3e6)
    assert float(y32) == pytest.approx(ref * 1e30, rel=1e-5)


def test_robust_pool_trunc_quad_beats_local_search():
    """A row where neither the mean nor the median start leads a local search (repeated
    inlier means) to the global minimiser, the mean of the four points near 20."""
    x = torch.tensor([[0.0, 0.1, 0.2, 2.5, 2.6, 20.0, 20.05, 20.1, 20.15]], dtype=torch.float64)
    for start in (x.mean(-1), x.median(-1).values):
        u = start
        for _ in range(50):
            inl = ((u.unsqueeze(-1) - x).abs() <= 1.0).double()
            u = torch.where(inl.sum(-1) > 0, (inl * x).sum(-1) / inl.sum(-1).clamp(min=1), u)
        assert abs(float(u) - 20.075) > 1.0
    y = robust_pool(x, "trunc_quad", 1.0)
    torch.testing.assert_close(y, torch.tensor([20.075], dtype=torch.float64))


def _welsch_local_min(x: torch.Tensor, u: torch.Tensor, alpha: float) -> torch.Tensor:
    """Reference: plain IRLS (u <- weighted mean), monotone to the local minimum."""
    for _ in range(5000):
        w = torch.exp(-((u.unsqueeze(-1) - x) ** 2) / (2 * alpha**2))
        u = (w * x).sum(-1) / w.sum(-1)
    return u


@pytest.mark.parametrize("alpha", ALPHAS)
def test_robust_pool_welsch_two_starts(alpha):
    x = with_outliers(5, (6, 15))
    y = robust_pool(x, "welsch", alpha)
    f_y = objective("welsch", x, y, alpha)
    mean, median = x.mean(-1), x.median(-1).values
    for start in (mean, median):
        assert (f_y <= objective("welsch", x, start, alpha) + 1e-12).all()
        local = _welsch_local_min(x, start, alpha)
        assert (f_y <= objective("welsch", x, local, alpha) + 1e-10).all()
    # A local minimum: stationary with positive curvature.
    u = y.clone().requires_grad_(True)
    f = objective("welsch", x, u, alpha).sum()
    (g,) = torch.autograd.grad(f, u, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), u)
    assert g.abs().max() < 1e-9 and (h > 0).all()


@pytest.mark.parametrize("copies", [1, 100])
def test_robust_pool_welsch_leaves_a_maximum_both_starts_sit_on(copies):
    # Mean and median of (1, 1, -1, -1, 0) are 0, where the Welsch objective at α = 0.43
    # has zero slope and negative curvature: a local maximum, returned before. (100
    # copies go through the strided-sample starts of long rows.)
    x = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.0], dtype=F64).repeat(copies)
    alpha = 0.43
    y = robust_pool(x, "welsch", alpha)
    grid = torch.linspace(-2, 2, 40001, dtype=F64)
    assert float(objective("welsch", x, y, alpha)) <= float(objective("welsch", x, grid, alpha).min()) + 1e-9
    u = y.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(objective("welsch", x, u, alpha), u, create_graph=True)
    (h,) = torch.autograd.grad(g, u)
    assert abs(float(g.detach())) < 1e-9 * copies and float(h) > 0


@pytest.mark.parametrize("n", [64, 1024])
@pytest.mark.parametrize("ulps", [0.34, 1.0])
@pytest.mark.parametrize("tol", [None, 1e-9])
def test_robust_pool_welsch_stops_on_the_float_grid(n, ulps, tol, monkeypatch):
    # Float32 rows of 0.3 with alpha at most an ulp of 0.3 (3e-8): the minimiser is 0.3
    # (closed form: every residual 0 there, each term's minimum). The mean start, an ulp
    # off, went between -1, +1 and +2 ulps (equal objectives) for all of max_iter = 100
    # sweeps, then the rows were solved again in float64. It stops on the grid's floor
    # now; with a tolerance below the ulp (tol 1e-9) that floor leaves the row unresolved
    # in float32 and float64 solves it (alpha above its ulp: an ordinary descent).
    from convexddn.nodes.pooling import descent
    sweeps = []
    real = descent._sweep

    def counting(pen, rows, *args, **kwargs):
        sweeps.append(rows.x.dtype)
        return real(pen, rows, *args, **kwargs)

    monkeypatch.setattr(descent, "_sweep", counting)
    c = torch.tensor(0.3, dtype=torch.float32)
    alpha = ulps * float(c.nextafter(torch.tensor(1.0)) - c)
    x = torch.full((4, n), 0.3, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = robust_pool(x, "welsch", alpha, tol=tol)
    assert torch.equal(y, c.expand(4))
    assert sweeps.count(torch.float32) <= 5, sweeps
    assert sweeps.count(torch.float64) <= (0 if tol is None else 20), sweeps


def test_robust_pool_welsch_keeps_lower_objective():
    """Mean start and median start reach different local minima; the lower one wins."""
    jitter = 0.01 * torch.arange(10, dtype=torch.float64)
    # Lower median (torch's convention) in the 2-point cluster at 5; the mean (9.8)
    # descends into the 4-point cluster at 12, which has the lower objective.
    x_mean_wins = torch.tensor([0, 0, 0, 5, 5, 12, 12, 12, 12, 40], dtype=torch.float64) + jitter
    # Lower median in the 5-point cluster at 0; the mean (4.8) descends to the 2 points at 6.
    x_median_wins = torch.tensor([0, 0, 0, 0, 0, 6, 6, 12, 12, 12], dtype=torch.float64) + jitter
    x = torch.stack([x_mean_wins, x_median_wins])
    from_mean = _welsch_local_min(x, x.mean(-1), 1.0)
    from_median = _welsch_local_min(x, x.median(-1).values, 1.0)
    torch.testing.assert_close(from_mean, torch.tensor([12.065, 6.055], dtype=torch.float64), rtol=0, atol=0.05)
    torch.testing.assert_close(from_median, torch.tensor([5.035, 0.02], dtype=torch.float64), rtol=0, atol=0.05)
    y = robust_pool(x, "welsch", 1.0)
    expected = torch.stack([from_mean[0], from_median[1]])
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-8)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", PENALTIES)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_robust_pool_grad(name, alpha):
    x = input_away_from_kinks(name, alpha)
    if name in ("huber", "trunc_quad"):
        assert kink_margin(x, robust_pool(x, name, alpha), alpha) > 1e-3
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: robust_pool(t, name, alpha), (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["pseudo_huber", "huber", "welsch"])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_robust_pool_grad_alpha(name, alpha):
    x = input_away_from_kinks(name, alpha).requires_grad_(True)
    # One alpha per row, and one shared alpha.
    a_rows = torch.full((3,), alpha, dtype=torch.float64) * torch.tensor([1.0, 1.1, 0.9], dtype=torch.float64)
    if name == "huber":
        assert kink_margin(x, robust_pool(x, name, a_rows), a_rows.unsqueeze(-1)) > 1e-3
    a_rows.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t, a: robust_pool(t, name, a), (x, a_rows), eps=1e-6, atol=1e-6)
    a_one = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: robust_pool(x.detach(), name, a), (a_one,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["quadratic", "trunc_quad"])
def test_robust_pool_grad_alpha_zero(name):
    """y does not depend on alpha (quadratic) or is locally constant in it (trunc_quad)."""
    x = input_away_from_kinks(name, 1.0)
    a = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    (ga,) = torch.autograd.grad(robust_pool(x, name, a).sum(), a)
    assert ga.item() == 0.0


def test_robust_pool_grad_singular_warns():
    """Welsch at x = (-1, 1), alpha = 1: the minimiser 0 has sum_i phi''(y - x_i) = 0 (the
    implicit gradient does not exist); that row gets a zero gradient and one warning."""
    x = torch.tensor([[-1.0, 1.0], [0.0, 0.5]], dtype=torch.float64, requires_grad=True)
    y = robust_pool(x, "welsch", 1.0)
    assert abs(y[0].item()) < 1e-6
    with pytest.warns(GradientWarning, match=r"1 of 2 batch element\(s\) \(indices \[\(0,\)\]\)") as rec:
        (gx,) = torch.autograd.grad(y.sum(), x)
    assert len([w for w in rec if issubclass(w.category, GradientWarning)]) == 1
    assert torch.isfinite(gx).all()
    assert (gx[0] == 0).all()
    torch.testing.assert_close(gx[1], torch.tensor([0.5, 0.5], dtype=torch.float64))


def _messages(rec, category) -> list[str]:
    return [str(w.message) for w in rec if issubclass(w.category, category)]


@pytest.mark.parametrize("dim", [-1, 1])
def test_robust_pool_gradient_warnings_name_the_batch_indices(dim):
    """The singular-Hessian warning named only a count ("for 1 of 6 row(s)"), where the
    other nodes name the elements: it names them in the caller's batch shape (the pooled
    output's, whichever dim is pooled), in both modes."""
    x = torch.randn(2, 3, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    x[1, 2] = torch.tensor([-1.0, 1.0])  # Welsch, alpha = 1: y = 0 with sum phi'' = 0
    x = (x if dim == -1 else x.transpose(1, 2).contiguous()).requires_grad_()
    with pytest.warns(GradientWarning) as rec:
        robust_pool(x, "welsch", 1.0, dim=dim).sum().backward()
    (msg,) = _messages(rec, GradientWarning)
    assert "singular" in msg and "1 of 6 batch element(s) (indices [(1, 2)])" in msg, msg
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level(), pytest.warns(GradientWarning, match=r"\(indices \[\(1, 2\)\]\)"):
        fwAD.unpack_dual(robust_pool(fwAD.make_dual(x.detach(), torch.ones_like(x)), "welsch", 1.0, dim=dim))


def test_robust_pool_solver_warnings_name_the_batch_indices():
    """The SolverWarnings of unresolved rows (float64 and float32, which goes to float64
    first) and of max_iter named only a count; they name the rows' batch indices."""
    for dtype in (F64, torch.float32):
        x = torch.randn(2, 3, 4, dtype=dtype, generator=torch.Generator().manual_seed(4))
        x[1, 2] = torch.tensor([0.0, 0.0, 1e6, 1e6])  # flat midway: no float can resolve it
        with pytest.warns(SolverWarning) as rec:
            robust_pool(x, "pseudo_huber", 0.8)
        (msg,) = _messages(rec, SolverWarning)
        assert "1 of 6 batch element(s) (indices [(1, 2)]) cannot be resolved" in msg, msg
    x = torch.randn(3, 2, 64, dtype=F64, generator=torch.Generator().manual_seed(5)) * 10
    with pytest.warns(SolverWarning, match=r"6 of 6 batch element\(s\) \(indices \[\(0, 0\), \(0, 1\), "
                                           r"\(1, 0\), .*\(2, 1\)\]\) did not reach tol"):
        robust_pool(x, "pseudo_huber", 0.01, max_iter=1)
    # More rows than are shown: the first eight, then "...".
    with pytest.warns(SolverWarning, match=r"12 of 12 batch element\(s\) \(indices \[\(0, 0\), .*\(3, 1\)\], "
                                           r"\.\.\.\) did not reach tol"):
        robust_pool(torch.cat([x, x]), "pseudo_huber", 0.01, max_iter=1)


def test_robust_pool_huber_flat_minimum():
    """Huber with two far points: every u in [-9, 9] is a minimiser; the result is one of
    them and its gradient is finite."""
    x = torch.tensor([[-10.0, 10.0]], dtype=torch.float64, requires_grad=True)
    y = robust_pool(x, "huber", 1.0)
    assert -9.0 <= y.item() <= 9.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradientWarning)
        (gx,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(gx).all()


def test_robust_pool_grad_welsch_far_outliers():
    """Welsch weights underflow for points hundreds of alphas away; the gradient must
    still be the inlier average, not NaN."""
    x = torch.tensor([[0.0, 0.1, 0.2, 500.0, -800.0]], dtype=torch.float32, requires_grad=True)
    y = robust_pool(x, "welsch", 0.05)
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(gx).all()
    torch.testing.assert_close(gx.sum(), torch.tensor(1.0))


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", PENALTIES)
def test_robust_pool_batched(name):
    x = with_outliers(7, (2, 3, 4, 5))
    y = robust_pool(x, name, 1.0, dim=(2, 3))
    assert y.shape == (2, 3)
    torch.testing.assert_close(y, robust_pool(x.reshape(2, 3, 20), name, 1.0))
    yk = robust_pool(x, name, 1.0, dim=(-1, 2), keepdim=True)
    assert yk.shape == (2, 3, 1, 1)
    torch.testing.assert_close(yk.reshape(2, 3), y)
    y1 = robust_pool(x, name, 1.0, dim=1)
    torch.testing.assert_close(y1, robust_pool(x.movedim(1, -1), name, 1.0))
    # Each row on its own gives the same answer as the batch.
    rows = x.reshape(6, 20)
    torch.testing.assert_close(
        torch.stack([robust_pool(r, name, 1.0) for r in rows]), robust_pool(rows, name, 1.0)
    )
    assert robust_pool(rows[:1], name, 1.0).shape == (1,)
    assert robust_pool(rows[0], name, 1.0).shape == ()


@pytest.mark.parametrize("name", PENALTIES)
def test_robust_pool_empty_batch(name):
    x = torch.empty(0, 3, 7, dtype=torch.float64, requires_grad=True)
    y = robust_pool(x, name, 1.0)
    assert y.shape == (0, 3)
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert gx.shape == x.shape


@pytest.mark.parametrize("name", PENALTIES)
def test_robust_pool_dtype(name):
    x64 = with_outliers(11, (5, 33))
    x32 = x64.float().requires_grad_(True)
    y32 = robust_pool(x32, name, 1.0)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), robust_pool(x64, name, 1.0), rtol=0, atol=1e-4)
    (gx,) = torch.autograd.grad(y32.sum(), x32)
    assert gx.dtype == torch.float32
    # Half precisions are solved in float32 and cast back.
    y16 = robust_pool(x64.bfloat16(), name, 1.0)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.double(), robust_pool(x64.bfloat16().double(), name, 1.0), rtol=0.02, atol=0.02)


def test_robust_pool_alpha_broadcast():
    x = with_outliers(2, (2, 3, 10))
    alpha = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)  # per channel
    y = robust_pool(x, "huber", alpha)
    for c in range(3):
        torch.testing.assert_close(y[:, c], robust_pool(x[:, c], "huber", float(alpha[c])))
    yk = robust_pool(x, "huber", alpha.view(1, 3, 1), keepdim=True)
    torch.testing.assert_close(yk.squeeze(-1), y)


def test_robust_pool_not_converged_warns():
    x = with_outliers(0, (3, 9))
    with pytest.warns(SolverWarning, match="did not reach tol"):
        robust_pool(x, "pseudo_huber", 0.2, max_iter=1)


def test_robust_pool_compile_fallback(monkeypatch):
    """A failing torch.compile falls back to the eager kernels with a warning."""

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(kernels, "_COMPILED", {})
    monkeypatch.setattr(kernels, "_COMPILE_FAILED", set())
    x = with_outliers(0, (3, 9)).requires_grad_(True)
    with pytest.warns(ConvexDDNWarning, match="torch.compile failed"):
        y = robust_pool(x, "huber", 1.0, compile=True)
    torch.testing.assert_close(y, robust_pool(x, "huber", 1.0, compile=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per kernel, not per call
        robust_pool(x, "huber", 1.0, compile=True)


def test_robust_pool_compile_fallback_not_used_up_by_a_failed_call(monkeypatch):
    """Where warnings are errors the compile-failure warning raises and the call fails; the
    kernel was marked eager before the warning, so the identical next call ran eagerly,
    unsaid (a failed call changed state). Now it raises again, and once warnings are shown
    the fallback says so once; the result is the eager one."""

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(kernels, "_COMPILED", {})
    monkeypatch.setattr(kernels, "_COMPILE_FAILED", set())
    x = with_outliers(1, (3, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvexDDNWarning)
        for _ in range(2):
            with pytest.raises(ConvexDDNWarning, match="torch.compile failed"):
                robust_pool(x, "huber", 1.0, compile=True)
    with pytest.warns(ConvexDDNWarning, match="torch.compile failed"):
        y = robust_pool(x, "huber", 1.0, compile=True)
    torch.testing.assert_close(y, robust_pool(x, "huber", 1.0, compile=False))


def test_robust_pool_compile_error_of_the_penalty_is_the_callers(monkeypatch):
    """An error a user's penalty raised inside the compiled kernel was reported as
    "torch.compile failed", swallowed (the call ran eagerly), and the kernel ran eagerly for
    the rest of the process; under -W error it surfaced as that ConvexDDNWarning. It
    propagates now and changes nothing; a failure of the compiler's backend (raised by
    dynamo as BackendCompilerFailed) still falls back to eager, with the warning."""
    import functools

    from convexddn.nodes import Penalty

    class Flaky(Penalty):
        name = "flaky_pseudo_huber"
        convex, strict, smooth = True, True, True
        fail = False

        def phi(self, z, a):
            return a * a * (torch.sqrt(1 + (z / a) ** 2) - 1)

        def dphi(self, z, a):
            if Flaky.fail:
                Flaky.fail = False
                raise RuntimeError("the penalty's own error")
            return z / torch.sqrt(1 + (z / a) ** 2)

        def d2phi(self, z, a):
            return (1 + (z / a) ** 2) ** -1.5

        def d2phi_dalpha(self, z, a):
            return (z / a) ** 3 * (1 + (z / a) ** 2) ** -1.5

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    monkeypatch.setattr(kernels, "_COMPILED", {})
    monkeypatch.setattr(kernels, "_COMPILE_FAILED", set())
    x = with_outliers(2, (3, 9))
    y0 = robust_pool(x, Flaky(), 1.0, compile=True)
    Flaky.fail = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="the penalty's own error"):
            robust_pool(x, Flaky(), 1.0, compile=True)
    assert kernels._COMPILE_FAILED == set()
    torch.testing.assert_close(robust_pool(x, Flaky(), 1.0, compile=True), y0)

    def broken_backend(gm, example_inputs):
        raise RuntimeError("the backend broke")

    monkeypatch.setattr(torch, "compile", functools.partial(torch._dynamo.optimize, broken_backend))
    monkeypatch.setattr(kernels, "_COMPILED", {})
    with pytest.warns(ConvexDDNWarning, match="torch.compile failed"):
        y = robust_pool(x, Flaky(), 1.0, compile=True)
    torch.testing.assert_close(y, y0)
    assert kernels._COMPILE_FAILED


# --------------------------------------------------------------------------- module


def test_robust_pool_module():
    pool = RobustPool("welsch", alpha=0.5, dim=(1, 2), keepdim=True)
    text = repr(pool)
    assert "penalty='welsch'" in text and "alpha=0.5" in text and "dim=(1, 2)" in text
    assert "keepdim=True" in text
    x = with_outliers(4, (2, 5, 6))
    torch.testing.assert_close(pool(x), robust_pool(x, "welsch", 0.5, (1, 2), True))
    # A learnable alpha.
    pool = RobustPool("pseudo_huber", alpha=torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64)))
    assert len(list(pool.parameters())) == 1
    pool(x).sum().backward()
    assert pool.alpha.grad is not None and torch.isfinite(pool.alpha.grad)
    with pytest.raises(OptionError, match="penalty"):
        RobustPool("median")
    with pytest.raises(OptionError, match="alpha"):
        RobustPool("huber", alpha=0.0)


def test_robust_pool_module_repr_tensor_alpha():
    """A tensor alpha shows its value (0-d), Parameter(value) (learnable) or its shape."""
    shown = {
        torch.tensor(2.0): "alpha=2.0,",
        torch.tensor(0.1, dtype=torch.float32): "alpha=0.1,",
        torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64)): "alpha=Parameter(0.5),",
        torch.tensor([2.0]): "alpha=tensor([2.0]),",  # the DDN reference's torch.tensor([alpha])
        torch.ones(4, 1): "alpha=tensor of shape (4, 1),",
        torch.nn.Parameter(torch.ones(3)): "alpha=Parameter of shape (3,),",
    }
    for alpha, expected in shown.items():
        text = repr(RobustPool("huber", alpha=alpha))
        assert expected in text and "Tensor" not in text, text
    assert repr(RobustPool("huber", alpha=1.5)) == "RobustPool(penalty='huber', alpha=1.5, dim=-1, keepdim=False)"


def test_robust_pool_module_repr_after_penalty_reassigned():
    """A name (or alias) assigned to .penalty is what the constructor takes and the forward
    resolves; repr read .name off it and raised AttributeError. A value that does not
    resolve is shown as given: print(model) must not raise."""
    pool = RobustPool("huber")
    pool.penalty = "welsch"
    assert repr(pool) == "RobustPool(penalty='welsch', alpha=1.0, dim=-1, keepdim=False)"
    pool.penalty = "trunc-quad"
    assert "penalty='trunc_quad'" in repr(pool)
    pool.penalty = "median"
    assert "penalty='median'" in repr(pool)
    with pytest.raises(OptionError, match="penalty"):
        pool(torch.randn(2, 5))


# The DDN reference's spellings (ddn/basic/robust_nodes.py) and convexddn's spelled-out
# "truncated-quadratic" (not a string of the reference: ddn/pytorch takes classes).
DDN_NAMES = {"pseudo-huber": "pseudo_huber", "trunc-quad": "trunc_quad", "truncated-quadratic": "trunc_quad"}


@pytest.mark.parametrize("alias", sorted(DDN_NAMES))
def test_robust_pool_ddn_penalty_names(alias):
    name = DDN_NAMES[alias]
    assert Penalty.resolve(alias) is Penalty.resolve(name)
    x = with_outliers(12, (4, 11))
    alpha = torch.tensor([0.5, 1.0, 2.0, 1.0], dtype=torch.float64)
    xa, aa = x.clone().requires_grad_(), alpha.clone().requires_grad_()
    xc, ac = x.clone().requires_grad_(), alpha.clone().requires_grad_()
    ya, yc = robust_pool(xa, alias, aa), robust_pool(xc, name, ac)
    assert torch.equal(ya, yc)
    ya.sum().backward()
    yc.sum().backward()
    assert torch.equal(xa.grad, xc.grad) and torch.equal(aa.grad, ac.grad)
    pool = RobustPool(alias, alpha=0.7, dim=(0, 1))
    assert torch.equal(pool(x), RobustPool(name, alpha=0.7, dim=(0, 1))(x))
    assert f"penalty={name!r}" in repr(pool) and alias not in repr(pool)  # canonical name shown


def test_robust_pool_ddn_penalty_names_invalid():
    x = with_outliers(13, (2, 5))
    for bad in ("pseudo huber", "trunc-quadratic", "hubber"):
        for call, args in ((robust_pool, (x, bad)), (RobustPool, (bad,))):
            with pytest.raises(OptionError) as err:
                call(*args)
            msg = str(err.value)
            assert repr(bad) in msg and all(repr(name) in msg for name in PENALTIES)
            assert "pseudo-huber" not in msg  # the error lists the canonical names


# --------------------------------------------------------------------------- bad input


def test_robust_pool_invalid():
    x = with_outliers(0, (3, 9))
    bad = x.clone()
    bad[0, 1] = math.nan
    bad[2, 3] = math.inf
    for name in PENALTIES:
        with pytest.raises(NonFiniteError, match=r"x must be finite, got 1 NaN and 1 Inf"):
            robust_pool(bad, name, 1.0)
    neg = x.clone()
    neg[1, 0] = -math.inf
    with pytest.raises(NonFiniteError, match=r"0 NaN and 1 Inf"):
        robust_pool(neg, "trunc_quad", 1.0)
    with pytest.raises(ShapeError, match="at least one entry along every pooled dim"):
        robust_pool(torch.empty(3, 0), "huber", 1.0)
    with pytest.raises(ShapeError, match="out of range"):
        robust_pool(x, "huber", 1.0, dim=2)
    for alpha in (0.0, -1.0, math.nan):
        with pytest.raises(OptionError, match="alpha must be finite and > 0"):
            robust_pool(x, "huber", alpha)
    with pytest.raises(OptionError, match="alpha must be finite and > 0"):
        robust_pool(x, "huber", torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    with pytest.raises(ShapeError, match=r"alpha must broadcast to the output shape \(3,\)"):
        robust_pool(x, "huber", torch.ones(4, dtype=torch.float64))
    with pytest.raises(OptionError) as err:
        robust_pool(x, "bisquare", 1.0)
    assert all(name in str(err.value) for name in PENALTIES)
    with pytest.raises(DTypeError, match="floating-point dtype.*torch.int64"):
        robust_pool(torch.ones(3, 4, dtype=torch.int64), "huber", 1.0)
    with pytest.raises(DTypeError, match="alpha"):
        robust_pool(x, "huber", torch.tensor(1))
    for name in ("welsch", "trunc_quad"):
        with pytest.raises(NonconvexError, match="nonconvex"):
            cddn.layer("robust_pool", n=9, penalty=name, backend="cvxpy")
    with pytest.raises(OptionError, match="keepdim must be True or False"):
        robust_pool(x, "huber", 1.0, keepdim="no")
    for bad in (True, 1.0):
        with pytest.raises(OptionError, match="dim must be an int"):
            robust_pool(x, "huber", 1.0, dim=bad)
    with pytest.raises(OptionError, match="max_iter"):
        robust_pool(x, "huber", 1.0, max_iter=0)
    with pytest.raises(OptionError, match="tol"):
        robust_pool(x, "huber", 1.0, tol=-1.0)
    with pytest.raises(OptionError, match="compile"):
        robust_pool(x, "huber", 1.0, compile="yes")


def test_robust_pool_alpha_on_another_device_is_an_input_error(on_other_device):
    # An OptionError before; every other node refuses an option on another device with
    # an InputError naming it and both devices.
    from convexddn.errors import InputError

    x = with_outliers(0, (3, 9))
    other = on_other_device(torch.tensor(0.7, dtype=torch.float64))
    for name in ("quadratic", "huber", "welsch"):
        with pytest.raises(InputError, match=r"alpha must be on x's device cpu, got cuda:0") as err:
            robust_pool(x, name, other)
        assert not isinstance(err.value, OptionError)
    with pytest.raises(InputError, match=r"alpha must be on x's device cpu, got cuda:0"):
        RobustPool("huber", torch.nn.Parameter(other))(x)


# ------------------------------------------ alpha outside float32's range, inference-mode x


@pytest.mark.parametrize("penalty", ["pseudo_huber", "huber", "welsch", "trunc_quad"])
@pytest.mark.parametrize("dtype,alpha", [(torch.float16, 1e5), (torch.float16, 1e-8), (torch.bfloat16, 1e-45),
                                         (torch.float32, 1e39), (torch.float32, 1e-50)])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_robust_pool_alpha_beyond_float32_normal_range_matches_float64(penalty, dtype, alpha, as_tensor):
    """A float alpha was made in x's dtype before the float32 solve: 1e5 or 1e-8 on
    float16 x became Inf (every row stopped at its start) or 0 (ZeroDivisionError), and
    1e39 on float32 x Inf; a float64 tensor alpha was cast to float32, with the same
    result. Such rows are solved in float64. Reference: the float64 call on the same
    values, rounded to x's dtype."""
    x = with_outliers(5, (4, 9)).to(dtype)
    a = torch.tensor(alpha, dtype=F64) if as_tensor else alpha
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)  # pseudo_huber at tiny alpha: flat rows
        y = robust_pool(x, penalty, a)
        want = robust_pool(x.double(), penalty, a).to(dtype)
    assert y.dtype == dtype
    if dtype == torch.float16:  # solved in float32 (alpha is a normal float32 there)
        torch.testing.assert_close(y, want, rtol=2e-3, atol=2e-3)
    else:
        torch.testing.assert_close(y, want, rtol=0, atol=0)
    # Independent of the float64 path: the rows spread less than 21, and their entries
    # (9, rounded to x's dtype) lie more than 1e-4 apart or coincide.
    xd = x.double()
    if alpha > 1:  # far above the spread: every point an inlier of the mean (every penalty)
        tol = 2e-3 if dtype == torch.float16 else 1e-6
        torch.testing.assert_close(y.double(), xd.mean(-1).to(dtype).double(), rtol=tol, atol=tol)
    elif penalty in ("huber", "pseudo_huber"):  # far below the gaps: alpha |u - x_i|, the median
        torch.testing.assert_close(y.double(), xd.median(-1).values, rtol=0, atol=0)
    else:  # every data point ties (N - 1 points cost the cap, the gaps' alpha-terms vanish)
        assert (y.double().unsqueeze(-1) == xd).any(-1).all()


def test_robust_pool_alpha_beyond_float32_grad_matches_float64():
    """float32 x, alpha = 1e39 (Inf in float32): the solution and gradients of the
    float64 solve (the mean, the float32 start, was returned). Reference: the float64
    call on the same values."""
    x = with_outliers(6, (3, 9)).float()
    out = []
    for dtype in (torch.float32, F64):
        xg = x.to(dtype).requires_grad_()
        a = torch.tensor([1e39, 2e39, 3e39], dtype=F64, requires_grad=True)
        y = robust_pool(xg, "pseudo_huber", a)
        out.append((y, *torch.autograd.grad(y.sum(), [xg, a])))
    torch.testing.assert_close(out[0][0], out[1][0].float(), rtol=0, atol=0)
    torch.testing.assert_close(out[0][1], out[1][1].float(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out[0][2], out[1][2], rtol=1e-6, atol=1e-60)


@pytest.mark.parametrize("penalty", ["huber", "welsch"])
def test_robust_pool_inference_mode_x_with_learned_alpha(penalty):
    """x made under torch.inference_mode() (a frozen feature extractor), alpha learned:
    torch's "Inference tensors cannot be saved for backward" (robust_vector_pool,
    tv_denoise and the projections took the same call). Reference: y by the float64
    call, dy/dalpha by a central difference of it in float64."""
    with torch.inference_mode():
        x = with_outliers(7, (3, 9))
    a = torch.tensor([0.8, 1.0, 1.3], dtype=F64, requires_grad=True)
    y = robust_pool(x, penalty, a)
    (g,) = torch.autograd.grad(y.sum(), a)
    h = 1e-6
    fd = (robust_pool(x.clone(), penalty, a.detach() + h) - robust_pool(x.clone(), penalty, a.detach() - h)) / (2 * h)
    torch.testing.assert_close(y.detach(), robust_pool(x.clone(), penalty, a.detach()), rtol=0, atol=0)
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-8)


def test_robust_pool_invalid_leaves_input():
    x = with_outliers(0, (3, 9))
    x[0, 0] = math.nan
    before = x.clone()
    with pytest.raises(NonFiniteError):
        robust_pool(x, "welsch", 1.0)
    assert torch.equal(x.isnan(), before.isnan()) and torch.equal(x.nan_to_num(), before.nan_to_num())


# --------------------------------------------------------------------------- cvxpy backend


@pytest.mark.parametrize("name", CONVEX)
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_robust_pool_cvxpy_agrees(name, alpha):
    """The registry's robust_pool problem through ConvexLayer (backend='cvxpy') and the
    native solver agree: solution to 1e-5, gradient to 1e-4, float64."""
    x = input_away_from_kinks(name, alpha)[:, :8].contiguous()
    xn = x.clone().requires_grad_(True)
    xc = x.clone().requires_grad_(True)
    yn = robust_pool(xn, name, alpha)
    yc = cddn.layer("robust_pool", n=8, penalty=name, alpha=alpha, backend="cvxpy")(xc)
    assert yc.dtype == torch.float64 and yc.shape == (3,)
    torch.testing.assert_close(yc, yn, rtol=0, atol=1e-5)
    g = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    (gn,) = torch.autograd.grad(yn, xn, g)
    (gc,) = torch.autograd.grad(yc, xc, g)
    torch.testing.assert_close(gc, gn, rtol=0, atol=1e-4)


def test_robust_pool_layer_auto_is_native():
    """convexddn.layer picks the native node for the convex penalties (the fastest exact path)."""
    layer = cddn.layer("robust_pool", n=8, penalty="huber", alpha=0.5)
    assert not isinstance(layer, cddn.ConvexLayer)
    x = with_outliers(0, (3, 8))
    torch.testing.assert_close(layer(x), robust_pool(x, "huber", 0.5))


@pytest.mark.parametrize("backend", ["auto", "cvxpy"])
def test_robust_pool_layer_takes_the_reference_spelling(backend):
    """The registry problem and its native node take the DDN reference's "pseudo-huber"
    as the node itself does (before: refused by both builders)."""
    x = with_outliers(0, (3, 8))
    layer = cddn.layer("robust_pool", n=8, penalty="pseudo-huber", alpha=0.5, backend=backend)
    torch.testing.assert_close(layer(x), robust_pool(x, "pseudo_huber", 0.5), rtol=0, atol=1e-6)


def test_robust_pool_welsch_no_warning_when_kept_start_converged():
    # The mean start (10) sits where the Welsch objective is flat and stalls; the median
    # start (0) wins and converged, so nothing is reported.
    x = torch.tensor([[0.0] * 9 + [100.0]], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = robust_pool(x, "welsch", 1.0)
    assert abs(float(y)) < 1e-12


def test_robust_pool_warns_when_max_iter_reached():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 50, dtype=torch.float64, generator=gen)
    x[:, :25] += 30.0
    with pytest.warns(SolverWarning, match=r"batch element\(s\) \(indices \[.*\) did not reach tol"):
        robust_pool(x, "huber", 0.1, max_iter=2)


# --------------------------------------------------------------------------- user penalties


class LogCosh(Penalty):
    """phi(z) = alpha^2 log cosh(z / alpha): convex, smooth; not a built-in."""

    name = "log_cosh"
    convex = True

    def phi(self, z, alpha):
        r = z / alpha
        return alpha * alpha * (r.abs() + torch.log1p(torch.exp(-2 * r.abs())) - math.log(2))

    def dphi(self, z, alpha):
        return alpha * torch.tanh(z / alpha)

    def d2phi(self, z, alpha):
        return 1 - torch.tanh(z / alpha) ** 2

    def d2phi_dalpha(self, z, alpha):
        r = z / alpha
        t = torch.tanh(r)
        return t - r * (1 - t * t)


class Cauchy(Penalty):
    """phi(z) = alpha^2 / 2 log(1 + (z / alpha)^2): nonconvex (redescending); not a built-in."""

    name = "cauchy"
    convex = False

    def phi(self, z, alpha):
        return 0.5 * alpha * alpha * torch.log1p((z / alpha) ** 2)

    def dphi(self, z, alpha):
        return z / (1 + (z / alpha) ** 2)

    def d2phi(self, z, alpha):
        q = (z / alpha) ** 2
        return (1 - q) / (1 + q) ** 2

    def d2phi_dalpha(self, z, alpha):
        q = (z / alpha) ** 2
        return 2 * z * q / (alpha * (1 + q) ** 2)


def _bisect_root(fn, lo, hi, iters=200):
    """Root of an increasing scalar function on [lo, hi] by bisection (independent solver)."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if fn(mid) > 0:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


def test_robust_pool_user_convex_penalty_native():
    """A user's convex Penalty subclass runs on the generic native solver: solution equal
    to a bisection on sum_i phi'(u - x_i), gradient to float64 finite differences."""
    pen = LogCosh()
    x = with_outliers(3, (4, 9))
    y = robust_pool(x, pen, 0.7)
    for row, yr in zip(x, y):
        want = _bisect_root(lambda u: float(pen.dphi(u - row, torch.tensor(0.7, dtype=F64)).sum()),
                            float(row.min()), float(row.max()))
        assert abs(float(yr) - want) < 1e-10
    alpha = torch.tensor(0.7, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, a: robust_pool(t, pen, a),
                                    (x.clone().requires_grad_(True), alpha))
    assert "log_cosh" in repr(RobustPool(pen, 0.7)) or "LogCosh" in repr(RobustPool(pen, 0.7))


def test_robust_pool_user_nonconvex_penalty_native():
    """A user's nonconvex Penalty runs natively (majorise-minimise from two starts): the
    result is a stationary point with positive curvature, no worse than either start's
    objective, and its gradient matches finite differences."""
    pen = Cauchy()
    x = with_outliers(4, (5, 11))
    a = torch.tensor(1.0, dtype=F64)
    y = robust_pool(x, pen, 1.0)
    z = y.unsqueeze(-1) - x
    assert float(pen.dphi(z, a).sum(-1).abs().max()) < 1e-9
    assert bool((pen.d2phi(z, a).sum(-1) > 0).all())
    f = pen.objective(x, y, 1.0)
    assert bool((f <= pen.objective(x, x.mean(-1), 1.0) + 1e-12).all())
    assert torch.autograd.gradcheck(lambda t: robust_pool(t, pen, 1.0), (x.clone().requires_grad_(True),))


# --------------------------------------------------------------------------- numerical robustness


@pytest.mark.parametrize("flip", [False, True])
def test_robust_pool_flat_objective_float32(flip):
    """Issue 10: [0, 0, 1000, 1000] with pseudo-Huber, alpha = 0.8, is symmetric about 500,
    its unique minimiser, but nearly flat there (curvature ~1.6e-8): float32 cannot
    resolve the gradient's sign, so the row is solved again in float64 -- no warning,
    and 500 to the tolerance (the old step-length rule stopped at 495.7 / 499.1)."""
    x = torch.tensor([[0.0, 0.0, 1000.0, 1000.0]])
    x = x.flip(-1) if flip else x
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = robust_pool(x, "pseudo_huber", 0.8)
    assert y.dtype == torch.float32
    assert abs(float(y) - 500.0) <= 1e-6 * (0.8 + 500.0)


def test_robust_pool_flat_objective_float64_warns():
    """Float64: at gap 1000 the rounding noise of the gradient (~1.4e-15) over the
    curvature at 500 (~1.6e-8) is ~9e-8, above tol * (alpha + |y|) = 5e-10 (the old rule
    stopped 2.8e-8 away, silently); at gap 1e6 the curvature is ~1.6e-17 and the noise
    level ~100, far above 5e-7. Neither can be resolved, which is reported (in float32
    too, whose rows go to float64 first); the answers lie within that noise level of
    the midpoint."""
    x = torch.tensor([[0.0, 0.0, 1000.0, 1000.0]], dtype=F64)
    with pytest.warns(SolverWarning, match=r"1 of 1 batch element\(s\) \(indices \[\(0,\)\]\) cannot be "
                                           r"resolved to tol=1e-12"):
        y = robust_pool(x, "pseudo_huber", 0.8)
    assert abs(float(y) - 500.0) <= 1e-6
    for dtype in (F64, torch.float32):
        x = torch.tensor([[0.0, 0.0, 1e6, 1e6]], dtype=dtype)
        with pytest.warns(SolverWarning, match=r"1 of 1 batch element\(s\) \(indices \[\(0,\)\]\) cannot be "
                                               r"resolved to tol=1e-.* in float64"):
            y = robust_pool(x, "pseudo_huber", 0.8)
        assert abs(float(y) - 5e5) <= 1e3
    # A tolerance above the noise level is reachable: no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = robust_pool(torch.tensor([[0.0, 0.0, 1e6, 1e6]], dtype=F64), "pseudo_huber", 0.8, tol=1e-3)
    assert abs(float(y) - 5e5) <= 1e-3 * 5e5


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("gap", [10.0, 1e3, 1e5])
@pytest.mark.parametrize("alpha", [0.1, 1.0])
def test_robust_pool_two_far_clusters(dtype, gap, alpha):
    """Two equal clusters far apart (in units of alpha): the pseudo-Huber minimiser is the
    midpoint by symmetry, wherever the objective is flat. Either it is reached to the
    tolerance, or a SolverWarning says that even float64 cannot resolve it (and the
    answer is within that noise level)."""
    g = torch.Generator().manual_seed(0)
    base = 0.01 * torch.randn(5, generator=g, dtype=F64)
    x = torch.cat([base, gap - base.flip(0)]).unsqueeze(0).to(dtype)  # symmetric about gap / 2
    mid = float(x.double().mean())
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y = robust_pool(x, "pseudo_huber", alpha)
    unresolved = [w for w in rec if "cannot be resolved" in str(w.message)]
    assert all("in float64" in str(w.message) for w in unresolved)  # float32 rows went to float64
    err = abs(float(y) - mid)
    if unresolved:
        assert err <= 1e-4 * gap
    else:
        assert err <= 2 * tol * (alpha + abs(mid)) + 4 * torch.finfo(dtype).eps * gap


def test_robust_pool_no_spurious_warnings():
    """Ordinary rows (outliers included) reach the tolerance silently in both dtypes."""
    for dtype in (torch.float32, F64):
        x = with_outliers(3, (64, 300), dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for name in PENALTIES:
                robust_pool(x, name, 0.7)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name", PENALTIES)
def test_robust_pool_scale_invariant(dtype, name):
    """y(2^k x, 2^k alpha) = 2^k y(x, alpha) and the gradient is unchanged, from 2^-100
    to near the end of the float range (power-of-two scaling is exact in floating
    point, so any difference is the solver's): no overflow, no NaN, no loss."""
    x = with_outliers(1, (4, 40), F64)
    kmax = 120 if dtype == torch.float32 else 1015
    tol = 2e-5 if dtype == torch.float32 else 1e-9
    ref = robust_pool(x.to(dtype), name, 1.0).double()
    for k in (-100, -40, 40, kmax):
        s = 2.0 ** k
        xs = (x * s).to(dtype).requires_grad_(True)
        y = robust_pool(xs, name, torch.tensor(s, dtype=dtype))
        (gx,) = torch.autograd.grad(y.sum(), xs)
        assert torch.isfinite(y).all() and torch.isfinite(gx).all(), k
        torch.testing.assert_close(y.double() / s, ref, rtol=tol, atol=tol, msg=f"k={k}")


def test_robust_pool_quadratic_no_overflow():
    """Issue 10: the float32 mean of entries near 3e38 overflowed to inf."""
    x = torch.tensor([[1e38, 2e38, 3e38, 3.3e38], [-3.3e38, 3.3e38, 1.0, 3e38]])
    y = robust_pool(x, "quadratic")
    torch.testing.assert_close(y.double(), x.double().mean(-1), rtol=1e-6, atol=0)


def test_robust_pool_trunc_quad_tiny_alpha():
    """Issue 10: trunc_quad gave NaN once alpha < ~1e-16 |x|. With alpha far below the
    spacing of the entries each point is its own inlier run; the duplicated pair has the
    lowest objective ((4 - 2) alpha^2 / 2 against (4 - 1) alpha^2 / 2)."""
    for dtype in (torch.float32, F64):
        x = torch.tensor([[3e20, 1e20, 5e20, 1e20], [1e38 / 4, 1e38 / 8, 1e38 / 8, 1e38 / 2]], dtype=dtype)
        for alpha in (1.0, 1e-20):
            y = robust_pool(x, "trunc_quad", alpha)
            torch.testing.assert_close(y, torch.tensor([1e20, 1e38 / 8], dtype=dtype))


@pytest.mark.parametrize("dtype,unit", [(F64, 1e-310), (torch.float32, 1e-40)])
def test_robust_pool_trunc_quad_subnormal_rows(dtype, unit):
    """Rows of subnormal entries: the power of two of the row's half-range that the
    candidate sums are taken in was subnormal itself, its inverse Inf, and float64 rows
    returned NaN (alpha = 1 as well as alpha of the entries' size) with a zero gradient.
    References in the test: alpha = 1 makes every point an inlier of the mean (gradient
    1/N each); for alpha of 1, 2.5 and 4 units, brute force over the means of the sorted
    row's contiguous runs (the minimiser is one of them), in units of 2^-e (normal)."""
    x = (torch.tensor([[1.0, 2.0, 5.0, 9.0], [3.0, 3.0, 0.5, 7.0]], dtype=F64) * unit).to(dtype)
    xd = x.double()
    tiny = torch.finfo(dtype).tiny * torch.finfo(dtype).eps  # the smallest subnormal
    xg = x.clone().requires_grad_()
    y = robust_pool(xg, "trunc_quad", 1.0)
    torch.testing.assert_close(y, xd.mean(-1).to(dtype), rtol=1e-12, atol=tiny)
    torch.testing.assert_close(torch.autograd.grad(y.sum(), xg)[0], torch.full_like(x, 0.25))
    e = -math.frexp(unit)[1]  # x * 2^e is of the order of 1 (2^e, in two exact steps)
    s = xd.sort(-1).values * 2.0**(e // 2) * 2.0**(e - e // 2)
    means = torch.stack([s[:, i:j].mean(-1) for i in range(4) for j in range(i + 1, 5)], -1)
    for k in (1.0, 2.5, 4.0):
        a = k * unit
        f = torch.minimum((means.unsqueeze(-1) - s.unsqueeze(1)) ** 2,
                          torch.tensor(math.ldexp(a, e) ** 2, dtype=F64)).sum(-1)
        want = means.gather(-1, f.argmin(-1, keepdim=True)).squeeze(-1) / 2.0**(e // 2) / 2.0**(e - e // 2)
        torch.testing.assert_close(robust_pool(x, "trunc_quad", a), want.to(dtype), rtol=1e-12, atol=tiny)
    assert robust_pool(x, "trunc_quad", 1.0 * unit)[0].item() == pytest.approx(1.5 * unit, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_robust_pool_alpha_limits(dtype):
    """alpha far below the spread: pseudo-Huber and Huber tend to the median (L1); far
    above it: every penalty but the truncated quadratic's ties tends to the mean."""
    x = torch.tensor([[1.0, 2.0, 3.0, 4.5, -2.0]], dtype=dtype)
    for name in ("pseudo_huber", "huber"):
        torch.testing.assert_close(robust_pool(x, name, 1e-20), torch.tensor([2.0], dtype=dtype))
    for name in ("quadratic", "pseudo_huber", "huber", "welsch", "trunc_quad"):
        torch.testing.assert_close(robust_pool(x, name, 1e20), torch.tensor([1.7], dtype=dtype))


@pytest.mark.parametrize("log_base", [1.0, math.log(2.0)], ids=["exp", "exp2"])
@pytest.mark.parametrize("name", [n for n in PENALTIES if n != "quadratic"])
def test_penalty_fused_sums_match_derived(name, log_base, monkeypatch):
    """The built-ins' hand-fused row sums equal the base class's, derived from phi, dphi,
    d2phi, d2phi_dalpha and irls_weight (up to the one positive factor per row the
    methods allow), for a float alpha and a per-row alpha tensor; Welsch's with its
    exponentials in either base (``exp_log_base`` picks one by the CPU's vector kernels)."""
    from convexddn.nodes.pooling import builtin

    monkeypatch.setattr(builtin, "exp_log_base", lambda device_type: log_base)
    pen = Penalty.resolve(name)
    x = with_outliers(2, (5, 30))
    u = x.median(-1, keepdim=True).values + 0.3
    a_rows = torch.tensor([0.5, 1.0, 2.0, 0.8, 3.0], dtype=F64).unsqueeze(-1)
    for alpha, a_t in ((0.7, torch.tensor(0.7, dtype=F64)), (a_rows, a_rows)):
        z = u - x
        work = [torch.empty_like(z) for _ in range(2)]
        if pen.convex:
            g, h, d1 = pen.newton_sums(z.clone(), alpha, work)
            g0, h0, d10 = Penalty.newton_sums(pen, z.clone(), a_t, None)
            c = h0 / h
            torch.testing.assert_close(g * c, g0)
            torch.testing.assert_close(d1 * c, d10)
        if name == "welsch":
            f, g, h, w, d1 = pen.descent_sums(z.clone(), alpha, work)
            f0, g0, h0, w0, d10 = Penalty.descent_sums(pen, z.clone(), a_t, None)
            c = w0 / w
            for got, want in ((g, g0), (h, h0), (d1, d10)):
                torch.testing.assert_close(got * c, want)
            torch.testing.assert_close(f + 30, f0)  # -sum e against sum (1 - e): a constant apart
        w, wa, size = pen.hessian_weights(z.clone(), alpha, work, True)
        w0, wa0 = pen.d2phi(z, a_t), pen.d2phi_dalpha(z, a_t).sum(-1, keepdim=True)
        assert (size is not None) == (name == "welsch")  # the only signed weights
        if size is not None:  # a bound on sum |w| (same factor as w)
            assert bool((size >= w.abs().sum(-1, keepdim=True) * (1 - 1e-12)).all())
        ok = w0.sum(-1, keepdim=True).abs() > 1e-12
        torch.testing.assert_close((w / w.sum(-1, keepdim=True))[ok.squeeze(-1)],
                                   (w0 / w0.sum(-1, keepdim=True))[ok.squeeze(-1)])
        torch.testing.assert_close((wa / w.sum(-1, keepdim=True))[ok], (wa0 / w0.sum(-1, keepdim=True))[ok])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", PENALTIES)
def test_robust_pool_cuda_matches_cpu(name):
    """The native path on CUDA tensors: same values and gradients as on the CPU, outputs
    on the device."""
    x = with_outliers(6, (3, 8, 600))
    alpha = torch.tensor(0.9, dtype=F64, requires_grad=True)
    outs = []
    for device in ("cpu", "cuda"):
        xd = x.to(device).requires_grad_(True)
        ad = alpha.detach().to(device).requires_grad_(name != "quadratic")
        y = robust_pool(xd, name, ad)
        grads = torch.autograd.grad(y.sum(), [xd, ad] if name != "quadratic" else [xd])
        assert y.device.type == device and all(gr.device.type == device for gr in grads)
        outs.append([y.cpu(), *[gr.cpu() for gr in grads]])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["pseudo_huber", "huber", "welsch"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_whole_row_loop_matches_compacting_loop(name, dtype, monkeypatch):
    """On CUDA the Newton and descent loops keep every row (their iterations replay as
    captured graphs, whose shapes cannot shrink): stopped rows stay put instead of being
    gathered out. Each row's iterates are its own, so the results are bit-identical to the
    compacting loop's (here on the CPU, where the same loop runs its bodies eagerly),
    clamped blocks and Welsch's second start included."""
    from convexddn.nodes.pooling import iterations

    g = torch.Generator().manual_seed(21)
    x = torch.randn(3, 300, 700, generator=g, dtype=dtype)
    x[0, :, :70] += 6.0  # a clump of outliers
    x[1, :4, 5] = 3e19 if dtype == torch.float32 else 1e200  # squares overflow: clamped
    x[2] = torch.rand(300, 700, generator=g, dtype=dtype) * 12.0  # flat, multimodal rows
    from convexddn.nodes.pooling import descent

    compactions = []
    compact = iterations._compact
    for module in (iterations, descent):
        monkeypatch.setattr(module, "_compact", lambda *a: compactions.append(1) or compact(*a))
    ref = robust_pool(x, name, 0.7)
    assert compactions  # the reference did gather its running rows
    monkeypatch.setattr(iterations, "_WHOLE_ROWS", True)
    compactions.clear()
    assert torch.equal(robust_pool(x, name, 0.7), ref)
    assert not compactions


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["pseudo_huber", "huber", "welsch"])
def test_robust_pool_cuda_graphs_match_eager(name, monkeypatch, step_graphs):
    """On CUDA the iterations replay as captured graphs: the same values and gradients as
    with every step eager (CONVEXDDN_CUDA_GRAPHS=0), and the graphs did replay."""
    made = step_graphs
    x = with_outliers(6, (4, 64, 1000)).float().cuda()
    outs, replays = {}, {}
    for flag in ("1", "0"):
        monkeypatch.setenv("CONVEXDDN_CUDA_GRAPHS", flag)
        made.clear()
        xd = x.clone().requires_grad_(True)
        y = robust_pool(xd, name, 0.9)
        outs[flag] = (y.detach(), torch.autograd.grad(y.sum(), xd)[0])
        assert all(m.reason is None for m in made), [m.reason for m in made]
        replays[flag] = sum(m.replays for m in made)
    assert replays["1"] > 0 and replays["0"] == 0
    # (the eager loop gathers the running rows: CUDA's row sums over fewer rows may round
    # differently, within the solver's float32 tolerance)
    for a, b in zip(outs["1"], outs["0"]):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


def test_start_is_robust_and_exact_on_short_rows():
    """The solvers' start: the lower median of (at most 129 strided entries of) rows up
    to 512; beyond, the repeated median of three of 81 strided entries, which outliers
    (a contiguous run of 10 %, or 30 % scattered at random) do not move off the inliers."""
    from convexddn.nodes.pooling.solvers import _median_start

    gen = torch.Generator().manual_seed(5)
    short = torch.randn(7, 129, dtype=torch.float64, generator=gen)
    assert torch.equal(_median_start(short), short.sort(-1).values[:, 64:65])
    n = 2048
    x = torch.randn(64, n, dtype=torch.float64, generator=gen)
    run = x.clone()
    run[:, : n // 10] += 1e6
    scattered = x.clone()
    scattered[torch.rand(64, n, generator=gen) < 0.3] = -1e6
    for data in (run, scattered):
        u = _median_start(data).squeeze(-1)
        assert u.abs().max() < 5.0  # an inlier (inliers are N(0, 1))
        assert bool((data == u.unsqueeze(-1)).any(-1).all())  # an entry of its row


def test_pool_backward_rows_whose_weights_underflow():
    """Every point ~1e200 from y: pseudo-Huber's phi'' = (1 + r^2)^-3/2 underflows to 0
    for all of them, so the backward takes the careful, rescaled weights. The rows are
    symmetric about y = 0 (the minimiser), so dy/dx_i = w_i / sum_j w_j = 1/2 each,
    times each row's own upstream gradient."""
    pen = Penalty.resolve("pseudo_huber")
    x = torch.tensor([[-1e200, 1e200], [-3e200, 3e200]], dtype=torch.float64)
    y = torch.zeros(2, dtype=torch.float64)
    gy = torch.tensor([1.0, 2.0], dtype=torch.float64)
    gx, _, ok, all_ok, _, _ = pool_backward(pen, x, y, torch.tensor(1.0, dtype=torch.float64), gy,
                                            True, False, False)
    assert all_ok and bool(ok.all())
    expected = torch.tensor([[0.5, 0.5], [1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(gx, expected, rtol=1e-12, atol=0)


def test_robust_pool_backward_tiny_alpha():
    """alpha = 1e-160: Welsch's phi''(0) = 1 / alpha^2 would overflow float64 (the
    weights are formed times alpha^2, so they do not). y sits on the pair (the lower
    objective), which shares the gradient equally; the far point gets none."""
    x = torch.tensor([[0.0, 0.0, 5.0], [3.0, 7.0, 7.0]], dtype=torch.float64, requires_grad=True)
    y = robust_pool(x, "welsch", 1e-160)
    torch.testing.assert_close(y, torch.tensor([0.0, 7.0], dtype=torch.float64))
    (gx,) = torch.autograd.grad(y, x, torch.tensor([1.0, 2.0], dtype=torch.float64))
    expected = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(gx, expected)


@pytest.mark.parametrize("n, alpha", [(65536, 0.003), (20000, 0.01)])
def test_rows_of_repeated_values_are_not_stopped_by_their_sums_rounding(n, alpha):
    """Half zeros, half ones: the pseudo-Huber minimiser is 0.5 by symmetry. The sum of
    the gradient's terms rounds systematically on such rows (2.2 eps sum |d1|, 550 times
    the random walk's 4 eps ||d1||_2 the noise model assumed): float32 stopped 1.9e-3 from
    0.5 (3800 times the tolerance) without a warning. Now float32 rows that rounding
    cannot resolve are solved again in float64, and float64 rows it cannot resolve warn."""
    x = torch.zeros(n)
    x[n // 2:] = 1.0
    assert abs(robust_pool(x, "pseudo_huber", alpha).item() - 0.5) <= 1e-6 * (alpha + 0.5)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y64 = robust_pool(x.double(), "pseudo_huber", alpha).item()
    assert abs(y64 - 0.5) <= 1e-12 * (alpha + 0.5) or any("cannot be resolved" in str(r.message) for r in rec)


@pytest.mark.filterwarnings("ignore:.*cannot be resolved to tol=1e-15")  # the reference solve
@pytest.mark.parametrize("name", ["pseudo_huber", "welsch"])
def test_smooth_penalties_stop_within_their_tolerance(name):
    """Rows of 2048 entries with a clump of outliers: every row stops within its
    tolerance ``tol * (alpha + |y|)`` of the minimiser (float32 against float64 on the
    same entries; float64 against a solve to 1e-15). The stopping rule predicted the
    error after the last Newton step from the secant of h over the step before, which
    after a step of several alpha missed how g'' changed: float32 rows stopped up to
    45x (pseudo-Huber) and 760x (Welsch) beyond the tolerance, float64 rows 12x."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(256, 2048, generator=gen) * torch.rand(256, 1, generator=gen) * 3
    x[:, :300] += torch.rand(256, 1, generator=gen) * 8
    for alpha in (0.3, 1.0):
        y32 = robust_pool(x, name, alpha).double()
        y64 = robust_pool(x.double(), name, alpha)
        assert ((y32 - y64).abs() / (1e-6 * (alpha + y64.abs()))).max() <= 1.5
        exact = robust_pool(x.double(), name, alpha, tol=1e-15)
        # The reference is a minimiser by the penalty's own formulas (not the solver's
        # fused sums): positive curvature, Newton distance at rounding level.
        pen, z, a = Penalty.resolve(name), exact[:, None] - x.double(), torch.tensor(alpha, dtype=F64)
        g, h = pen.dphi(z, a).sum(-1), pen.d2phi(z, a).sum(-1)
        assert bool((h > 0).all()) and ((g / h).abs() / (alpha + exact.abs())).max() <= 1e-13
        assert ((y64 - exact).abs() / (1e-12 * (alpha + exact.abs()))).max() <= 1.5


@pytest.mark.parametrize("name", ["pseudo_huber", "huber", "welsch"])
def test_running_rows_gathered_block_by_block_give_the_same_result(name, monkeypatch):
    """Selections of running rows at least ``_LAZY_BYTES`` large are gathered from x block
    by block as each pass reads them (the bench's shapes reach that size, the tests'
    would not): forced here for every selection, the results are bit-identical to the
    copied selections', including the second start that Welsch solves apart and the
    blocks whose residuals are clamped."""
    from convexddn.nodes.pooling import rows as rows_module

    g = torch.Generator().manual_seed(21)
    x = torch.randn(3, 300, 700, generator=g)
    x[0, :, :70] += 6.0  # a clump of outliers
    x[1, :4, 5] = 3e19  # residuals over alpha whose squares overflow float32: clamped
    x[2] = torch.rand(300, 700, generator=g) * 12.0  # flat, multimodal rows for Welsch
    copied = robust_pool(x, name, 0.7)
    calls = []
    block = rows_module.Rows.block

    def counting_block(self, sl):
        calls.append(self.index is not None)
        return block(self, sl)

    monkeypatch.setattr(rows_module, "_LAZY_BYTES", 0)
    monkeypatch.setattr(rows_module.Rows, "block", counting_block)
    gathered = robust_pool(x, name, 0.7)
    assert any(calls), "no selection was gathered lazily"
    assert torch.equal(gathered, copied)


@pytest.mark.parametrize("max_iter", [2, 3, 4])
def test_welsch_start_cut_off_by_max_iter_warns(max_iter):
    """max_iter is per start: the mean start, cut off on its way down to the lower
    minimum, lost to the median start's higher one, whose flags alone counted: no
    warning. A row with a start stopped by max_iter has not finished its search."""
    x = torch.tensor([[0.4665011177358571, 1.0121884235723466, -0.12908945086582727, 0.40038290849888614,
                       -0.8615405017212683, -0.8736921815374873, -0.54055186729248, -0.2970691967399302,
                       2.2136449197787673]], dtype=F64)
    alpha = 0.03893456654378396
    with pytest.warns(SolverWarning, match="had a start stopped by max_iter"):
        cut = robust_pool(x, "welsch", alpha, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = robust_pool(x, "welsch", alpha)
    # Given the iterations, the mean start reaches a minimum 0.39 lower (near 0.4334)
    # than the median start's (at the data point -0.129) returned when cut off.
    assert float(objective("welsch", x[0], y, alpha)) < float(objective("welsch", x[0], cut, alpha)) - 0.3


def test_welsch_float32_start_stuck_on_rounding_is_solved_in_float64():
    """Where alpha is about an ulp of the data (float32 rows near 1e5, alpha 0.01) a start
    can be stuck, every Newton step rounding back to it: it ran into max_iter and the row
    was reported as "had a start stopped by max_iter ... might have reached a lower
    objective", though the float64 solve of the same rows is silent with the same
    objective. Such rows are solved again in float64, as unresolved ones are."""
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(32, 2000, generator=g, dtype=F64) * 1e3 + 1e5
    x32 = x64.float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y32 = robust_pool(x32, "welsch", 0.01)
        y64 = robust_pool(x32.double(), "welsch", 0.01)
    # Points ~0.5 apart at alpha 0.01: every data point is a local minimum of objective
    # ~N - 1 (which one wins is rounding); both dtypes return one.
    for y in (y32.double(), y64):
        assert (objective("welsch", x32.double(), y, 0.01) <= 2000 - 1 + 1e-3).all()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_welsch_second_starts_ride_in_the_same_solve(dtype, monkeypatch):
    """Rows of more than 512 whose two refined starts differ solve their second start as
    extra rows of the one iteration: blocks of the first rows are read as views of x
    (only a block holding repeated rows is gathered), and every row's result is the
    lower of its two starts' local minima -- the same, bit for bit, as solving the
    second starts on their own."""
    from convexddn.nodes.pooling import Welsch, descent, rows as rows_module, solvers

    g = torch.Generator().manual_seed(5)
    x = torch.randn(640, 1024, generator=g, dtype=dtype)  # more than one block of rows
    # Bimodal rows: clusters at 0 and 6 of nearly equal weight, so the mean and the
    # repeated median start towards different minima.
    x[::8, : 1024 * 9 // 20] += 6.0
    alpha = 1.0
    extended, views, gathered_first = [], [], []
    make, block = rows_module.Rows.extended, rows_module.Rows.block

    def spy_extended(self, idx):
        extended.append(idx.numel())
        return make(self, idx)

    def spy_block(self, sl):
        out = block(self, sl)
        if self.prefix and sl.stop <= self.prefix:
            (views if out.data_ptr() == self.x[sl].data_ptr() else gathered_first).append(sl)
        return out

    monkeypatch.setattr(rows_module.Rows, "extended", spy_extended)
    monkeypatch.setattr(rows_module.Rows, "block", spy_block)
    y = robust_pool(x, "welsch", alpha)
    assert extended and extended[0] > 0, "no second start was solved"
    assert views and not gathered_first

    # The second starts on their own: the refined starts of the rows apart, from the
    # solver's own sample (as before the merge), then each row's lower objective.
    pen, a = Welsch(), torch.tensor(alpha, dtype=dtype)
    xs = solvers._strided_sample(x, solvers._NC_SAMPLE).contiguous()
    s0 = solvers._sample_starts(xs)
    starts = solvers._refine_on_sample(pen, xs, a, s0, False)
    tol = 1e-6 if dtype == torch.float32 else 1e-12  # robust_pool's defaults
    rows = solvers._rows(x, a)
    first = descent.descent_rows(pen, rows, starts[:, :1], None, tol, 100, False)
    apart = ((starts[:, 0] - starts[:, 1]).abs() > solvers._MERGE * alpha).nonzero().squeeze(-1)
    second = descent.descent_rows(pen, rows.select(apart), starts[apart, 1:], None, tol, 100, False)
    u, f = first.u[:, 0].clone(), first.f[:, 0]
    lower = second.f[:, 0] < f[apart]
    u[apart[lower]] = second.u[lower, 0]
    assert torch.equal(y, u)
    # And that is the lower of the two local minima, by plain IRLS from each cluster
    # (the clusters are 6 alphas apart: 300 steps converge to far below the margin).
    xb = x[:40:8].double()
    f_y = objective("welsch", xb, y[:40:8].double(), alpha)
    for start in (0.0, 6.0):
        u = torch.full((5,), start, dtype=F64)
        for _ in range(300):
            w = torch.exp(-((u.unsqueeze(-1) - xb) ** 2) / (2 * alpha**2))
            u = (w * xb).sum(-1) / w.sum(-1)
        assert (f_y <= objective("welsch", xb, u, alpha) + 1e-3).all()


def test_extended_rows_are_views_then_gathered():
    """Rows.extended: the rows, then the rows ``idx`` again; per-row alpha follows. On a
    CPU the first rows stay views of x; elsewhere (here the meta device, as CUDA) one
    tensor is made, which the captured graphs need."""
    from convexddn.nodes.pooling.rows import Rows

    x = torch.arange(20.0).reshape(5, 4)
    alpha = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]])
    idx = torch.tensor([3, 0])
    ext = Rows(x, alpha, None).extended(idx)
    assert ext.count == 7
    head = ext.block(slice(0, 5))
    assert head.data_ptr() == x.data_ptr()
    assert torch.equal(ext.block(slice(5, 7)), x[idx])
    assert torch.equal(ext.block(slice(3, 7)), torch.cat([x[3:], x[idx]]))  # across the seam
    assert torch.equal(ext.alpha.reshape(-1), torch.tensor([1.0, 2, 3, 4, 5, 4, 1]))
    # A selection of it, and an extension of a selection, read the right rows.
    sel = ext.select(torch.tensor([6, 1]))
    assert torch.equal(sel.block(slice(0, 2)), x[[0, 1]])
    meta = Rows(x.to("meta"), alpha.to("meta"), None).extended(idx.to("meta"))
    assert meta.index is None and meta.x.shape == (7, 4)


@pytest.mark.parametrize("penalty", ["pseudo_huber", "huber", "welsch"])
def test_iterations_read_the_host_once_per_step(penalty, host_reads, monkeypatch):
    # Each host read is a sync on CUDA. The Newton and descent loops read one list per
    # step (rows still active per block); compactions and the first pass add a few.
    # Before: int(active.sum()) and the block flags, two reads per step (76 for ~30 steps).
    from convexddn.nodes.pooling import descent, iterations

    steps = []
    live = iterations._live
    for module in (iterations, descent):  # Newton's loop and the descent loop
        monkeypatch.setattr(module, "_live", lambda *a: steps.append(1) or live(*a))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 512, generator=gen, dtype=torch.float64)
    x[torch.rand(x.shape, generator=gen, dtype=torch.float64) < 0.3] *= 1e3
    with host_reads.counting():
        robust_pool(x, penalty, 1e-4)
    assert len(steps) >= 20
    # (+4: pseudo-Huber leaves rows unresolved by Newton here, which are bisected, a nonzero and a
    # count, and its warning names those left: a nonzero and its list, on that rare path only)
    assert host_reads.count <= len(steps) + 16 + (4 if penalty == "pseudo_huber" else 0)


def test_trunc_quad_outlier_clusters_far_on_both_sides():
    # Three outliers near each of -B and +B, four inliers near 0.25, alpha = 1. The
    # inliers' run is summed relative to its own segment, not after the squares of the
    # outliers below it: with one centre for the row, B = 1e8 returned the lower
    # cluster's mean (objective 4.5 against 3.0) and B = 1e15 the inliers' mean as 0.2375.
    inl = [0.1, 0.2, 0.3, 0.4]
    for B in (1e8, 1e12, 1e15, 1e100):
        row = [-B - 1.0, -B, -B + 1.0] + inl + [B - 1.0, B, B + 1.0]
        for perm in ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 3, 0, 5, 7, 1, 8, 2, 6, 4]):
            y = robust_pool(torch.tensor([[row[i] for i in perm]], dtype=F64), "trunc_quad", 1.0)
            # Objective (exact, Python floats): inliers' mean 0.25 costs 6 * 0.5 + 0.025 = 3.025;
            # a cluster's mean costs 1 + 7 * 0.5 = 4.5.
            assert float(y) == pytest.approx(0.25, rel=1e-15, abs=0), B
    y32 = robust_pool(torch.tensor([[-1e8, -1e8, -1e8, 0.1, 0.2, 0.3, 0.4, 1e8, 1e8, 1e8]]), "trunc_quad", 1.0)
    assert float(y32) == pytest.approx(0.25, rel=1e-7)


def _trunc_quad_exact(row: list[float], alpha: float) -> float:
    """The global minimiser in rationals: the mean of the run (span <= 2 alpha) that
    minimises SSE - alpha^2 |run| (Gould et al.'s truncated quadratic, brute force)."""
    from fractions import Fraction

    xs, a2, best = sorted(row), Fraction(alpha) ** 2, None
    for i in range(len(xs)):
        for j in range(i + 1, len(xs) + 1):
            if xs[j - 1] - xs[i] > 2 * alpha:
                break
            run = [Fraction(v) for v in xs[i:j]]
            mu = sum(run) / len(run)
            g = sum((v - mu) ** 2 for v in run) - a2 * len(run)
            if best is None or g < best[0]:
                best = (g, mu)
    return float(best[1])


@pytest.mark.parametrize("cells", [False, True])
def test_trunc_quad_mean_of_a_small_run_among_far_points_is_exact(cells, monkeypatch):
    """The winning run's mean was a difference of row-wide prefix sums, which carry the
    rounding of every entry before the run: 5 inliers near 0.3 among 876 points spread
    over 1255 alpha came back 1.5e-11 off (float64; 2.8e5 ulps), and rows of randn * 100
    up to 1e-12 (alpha + |y|). Such means are now summed again from the run's own
    entries: within a few ulps of the exact minimiser. (``cells``: every row takes the
    local sums, whose prefix sums carry that rounding too.)"""
    from convexddn.nodes.pooling import trunc_quad

    if cells:
        monkeypatch.setattr(trunc_quad, "_TQ_RISK", 0.0)
    g = torch.Generator().manual_seed(142)
    out = torch.rand(876, generator=g, dtype=F64) * 2511.0 - 1255.5
    inliers = torch.tensor([0.41, 0.12, 0.55, 0.37, 0.58], dtype=F64)
    rows = [torch.cat([out, inliers])]
    rows += list(torch.randn(3, 300, generator=g, dtype=F64) * 100)
    for row in rows:
        exact = _trunc_quad_exact(row.tolist(), 1.0)
        y = float(robust_pool(row, "trunc_quad", 1.0))
        assert abs(y - exact) <= 4 * torch.finfo(F64).eps * (1.0 + abs(exact)), (y, exact)


def test_trunc_quad_cells_and_centred_sums_agree():
    # Both anchorings of the prefix sums (the row's centre, and each chunk's first point
    # in trunc_quad_cells) give the same minimiser on ordinary rows (where the centred
    # one is trusted), and the far-spread rows are the ones flagged.
    from convexddn.nodes.pooling.trunc_quad import trunc_quad_cells, trunc_quad_runs

    gen = torch.Generator().manual_seed(11)
    x = torch.randn(64, 257, dtype=F64, generator=gen)
    x[::4, :40] += 30.0  # a second cluster in every fourth row
    s = x.sort(-1).values
    a = torch.tensor(0.7, dtype=F64)
    lft = torch.searchsorted(s, s - 2 * a, out_int32=True)
    y_c, risky, _, _ = trunc_quad_runs(s, lft, a)
    y_s, unsure, _, _ = trunc_quad_cells(s, lft, a)
    assert not bool(unsure.any()) and not bool(risky.any())
    torch.testing.assert_close(y_s, y_c, rtol=1e-14, atol=1e-14)
    far = s.clone()
    far[:, -3:] = 1e9
    _, risky, *_ = trunc_quad_runs(far, torch.searchsorted(far, far - 2 * a, out_int32=True), a)
    assert bool(risky.all())


def _trunc_quad_local(s: torch.Tensor, u: torch.Tensor, alpha: float) -> torch.Tensor:
    """The truncated-quadratic objective of sorted float64 rows ``s (R, N)`` at ``u (R, m)``,
    summing only the squares of the inliers (|s - u| <= alpha, found by searchsorted):
    no prefix sums, so no cancellation whatever the row's length or spread."""
    n = s.shape[-1]
    lo = torch.searchsorted(s, u - alpha)
    cnt = torch.searchsorted(s, u + alpha, right=True) - lo
    sq = torch.zeros_like(u)
    for j in range(int(cnt.max())):
        r = s.gather(-1, (lo + j).clamp(max=n - 1)) - u
        sq += torch.where(j < cnt, r * r, 0.0)
    return 0.5 * sq + 0.5 * alpha**2 * (n - cnt).to(s.dtype)


def _trunc_quad_min_local(s: torch.Tensor, alpha: float) -> torch.Tensor:
    """Brute force: the least objective over the means of every window of at most W
    consecutive sorted points, W the most points within 2 alpha of one (every minimiser
    is the mean of its inliers, such a window); each mean relative to its window's first
    point, each objective by :func:`_trunc_quad_local`."""
    n = s.shape[-1]
    w_max = int((torch.searchsorted(s, s + 2 * alpha, right=True) - torch.arange(n)).max())
    best = torch.full(s.shape[:1], math.inf, dtype=s.dtype)
    for w in range(1, w_max + 1):
        win = s.unfold(-1, w, 1)
        u = win[..., 0] + (win - win[..., :1]).mean(-1)
        best = torch.minimum(best, _trunc_quad_local(s, u, alpha).min(-1).values)
    return best


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_trunc_quad_long_chain(dtype):
    """One chain of 150000 points 1.9 alpha apart (no gap wider than 2 alpha: one
    segment) plus a close pair, near the end or 300 points before it, whose mean wins
    by 0.875 alpha^2. Anchored at the segment's first point, the offsets reached
    2.85e5 alpha and the prefix sums of their squares 4e15 alpha^2, whose rounding
    picked another run: the objective exceeded the minimum by 0.44 alpha^2 (in both
    dtypes, both rows). Checked against a brute force with local sums (float64)."""
    n, alpha = 150_000, 1.0
    rows = []
    for where in (3, 300):
        x = torch.arange(n, dtype=F64) * 1.9 * alpha
        k = n - where
        rows.append(torch.cat([x[: k + 1], x[k : k + 1] + 0.5 * alpha, x[k + 1 :]]))
    x = torch.stack(rows).to(dtype)
    y = robust_pool(x, "trunc_quad", alpha)
    s = x.double().sort(-1).values
    f_min = _trunc_quad_min_local(s, alpha)
    f_y = _trunc_quad_local(s, y.double().unsqueeze(-1), alpha).squeeze(-1)
    # float32: y rounded to an ulp of 2.85e5 (1/32) costs up to 2.4e-4 alpha^2.
    tol = 1e-3 if dtype == torch.float32 else 1e-9
    assert (f_y - f_min <= tol * alpha**2).all(), (f_y - f_min).tolist()
    pair = x.double()[:, [n - 3, n - 300]].diagonal() + 0.25 * alpha
    torch.testing.assert_close(y.double(), pair, rtol=0, atol=0.02 if dtype == torch.float32 else 1e-9)


def test_trunc_quad_cells_flags_what_it_cannot_rank(monkeypatch):
    """Rows whose local sums of squares still exceed the rounding bound (some 1e7 dense
    entries; here the bound is lowered) are reported, pointing at the caller."""
    from convexddn.nodes.pooling import trunc_quad

    x = with_outliers(0, (3, 12))
    x[1, -3:] = 1e9  # far spread: this row goes to trunc_quad_cells
    y_ref = robust_pool(x, "trunc_quad", 1.0)
    monkeypatch.setattr(trunc_quad, "_CELLS_RISK", 0.0)
    with pytest.warns(SolverWarning, match=r"1 of 3 batch element\(s\) \(indices \[\(1,\)\]\) have sums of "
                                           r"squares too large") as rec:
        y = robust_pool(x, "trunc_quad", 1.0)
    assert rec[0].filename == __file__
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)


# ------------------------------------------------------------- far tails, overflow, subclass checks


def test_pseudo_huber_far_out_on_the_tails_is_not_taken_for_converged():
    """alpha far below the data's spacing: from the start (a data point) g = -alpha and
    h = 1 (that point's own curvature) claimed a root within noise / h, but h collapses
    (~alpha^3 / |z|^3) a few alphas away: float32 returned the data point 999.3667 with
    the gradient [1, 0, 0, 0], silently, where the root is 999.67378 (bisection on
    sum phi'(u - x_i) in Python floats) with the gradient w / sum w. Rows the float32
    iterations cannot certify go to float64; what float64 cannot resolve is reported."""
    xs = [999.3667, 999.98004, 998.0, 1001.5]
    alpha = 1e-4
    x32 = torch.tensor([xs], dtype=torch.float32)
    xs = x32[0].double().tolist()  # the float32 data, exactly
    ref = _root(lambda u: sum((u - v) / math.sqrt(1 + ((u - v) / alpha) ** 2) for v in xs), 998.0, 1001.5)
    x = x32.clone().requires_grad_(True)
    y = robust_pool(x, "pseudo_huber", alpha)
    assert abs(float(y) - ref) <= 1e-6 * (alpha + abs(ref))
    (gx,) = torch.autograd.grad(y, x)
    w = [(1 + ((ref - v) / alpha) ** 2) ** -1.5 for v in xs]
    expected = torch.tensor([[wi / sum(w) for wi in w]])
    torch.testing.assert_close(gx, expected, rtol=1e-3, atol=1e-6)
    # Shifted data agree (the old answer depended on the offset).
    y0 = robust_pool(x32 - 999.0, "pseudo_huber", alpha)
    assert abs(float(y0) + 999.0 - ref) <= 1e-3
    # Two points 2e10 apart with alpha 1e-3 (float64): the objective is flat to rounding
    # between them and the root (6e10, by symmetry) cannot be resolved; the old rule
    # returned 5e10 as converged (a Newton step of alpha "below" tol (alpha + |u|)).
    with pytest.warns(SolverWarning, match=r"cannot be resolved"):
        robust_pool(torch.tensor([[5e10, 7e10]], dtype=F64), "pseudo_huber", 1e-3)


def test_huber_alpha_gradient_with_overflowing_residuals_is_zero_not_nan():
    """Entries near the float range's end: y - x overflows to ±inf, and the alpha weight
    sum_inliers z * w met inf * 0 = NaN. y = x_3 whatever alpha is (the two others are
    symmetric outliers), so dy/dalpha = 0 exactly."""
    for dtype, big in ((torch.float32, 3e38), (F64, 1.7e308)):
        x = torch.tensor([[big, -big, big / 3]], dtype=dtype, requires_grad=True)
        a = torch.tensor(1.0, dtype=dtype, requires_grad=True)
        # alpha is far below one ulp of y: the gradient's rounding noise (h |y| eps)
        # exceeds alpha, the step of g along a flat piece, so Newton cannot certify a stop
        # there; the sign of g is exact and bisected (see test_huber_noise_above_alpha_is_bisected).
        with warnings.catch_warnings():
            warnings.simplefilter("error", SolverWarning)
            y = robust_pool(x, "huber", a)
        assert float(y) == float(x[0, 2])
        gx, ga = torch.autograd.grad(y, (x, a))
        assert float(ga) == 0.0
        assert gx.tolist() == [[0.0, 0.0, 1.0]]


def test_user_penalty_alpha_gradient_overflowing_in_float32():
    """Cauchy's d2phi_dalpha = 2 z q / (alpha (1 + q)^2), q = (z / alpha)^2, is inf / inf
    at z = 1e15 in float32: alpha's gradient was NaN without a word. It is formed again
    in float64 and agrees with the float64 computation (Table 1: -sum d2phi_dalpha /
    sum phi'', Python floats at the float64 solution); where even float64 overflows it
    is zero with a GradientWarning (it was NaN after a warning saying "set to zero")."""
    xs = [0.0, 0.1, -0.2, 1e15]
    x = torch.tensor([xs], requires_grad=True)
    a = torch.tensor(1.0, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # (The mean start, 2.5e14 out, is still on its way in when max_iter stops it: the
        # median start's minimum is returned, with a warning that says so.)
        warnings.filterwarnings("ignore", "robust_pool.*had a start stopped by max_iter", SolverWarning)
        y = robust_pool(x, Cauchy(), a)
        ga = torch.autograd.grad(y, a)[0]
    y64 = float(robust_pool(torch.tensor([xs], dtype=F64), Cauchy(), 1.0))
    zs = [y64 - v for v in xs]
    d2 = sum((1 - z * z) / (1 + z * z) ** 2 for z in zs)
    d2a = sum(2 * z * z * z / (1 + z * z) ** 2 for z in zs)
    assert math.isfinite(float(ga))
    assert abs(float(ga) - (-d2a / d2)) <= 1e-4 * abs(d2a / d2)


def test_penalty_subclass_missing_class_attributes_is_an_option_error():
    """A subclass without `convex` failed at the first call, one without `name` only in
    the backward (and in repr), with torch's AttributeError."""

    class NoConvex(LogCosh):
        convex = None

    class NoName(LogCosh):
        name = None

    for pen, attr in ((NoConvex(), "convex"), (NoName(), "name")):
        with pytest.raises(OptionError, match=rf"penalty {type(pen).__name__} must set the class attribute {attr}"):
            RobustPool(pen)
        with pytest.raises(OptionError, match=rf"class attribute {attr}"):
            robust_pool(torch.randn(2, 5), pen)


def test_user_penalty_overflowing_in_float32_is_solved_in_float64():
    """Cauchy's (z / alpha)^2 is inf at z = 1e20 in float32: every sum overflowed, the
    answer was the mean (2.5e19) under a 'did not reach tol within max_iter' warning,
    and the backward zeroed the gradient. Such rows go to float64 (forward and
    backward). Reference: bisection on sum phi'(u - x_i) in Python floats (the far point
    adds ~1e-20), and Table 1's w_i / sum w."""
    xs = [0.0, 0.1, -0.2, 1e20]
    x = torch.tensor([xs], requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # (The mean start, 2.5e19 out, is still on its way in when max_iter stops it.)
        warnings.filterwarnings("ignore", "robust_pool.*had a start stopped by max_iter", SolverWarning)
        y = robust_pool(x, Cauchy(), 1.0)
        (gx,) = torch.autograd.grad(y, x)
    dphi = lambda z: z / (1 + z * z)  # noqa: E731
    ref = _bisect_root(lambda u: sum(dphi(u - v) for v in xs), -0.2, 0.1)
    assert abs(float(y) - ref) <= 1e-6
    w = [(1 - (ref - v) ** 2) / (1 + (ref - v) ** 2) ** 2 for v in xs]
    torch.testing.assert_close(gx, torch.tensor([[wi / sum(w) for wi in w]]), rtol=1e-4, atol=1e-7)


class _OverflowingAlphaWeight(LogCosh):
    """LogCosh whose d2phi_dalpha formula overflows even in float64 (a user's formula
    with a huge intermediate), while phi'' is fine."""

    name = "log_cosh_overflowing"

    def d2phi_dalpha(self, z, alpha):
        return super().d2phi_dalpha(z, alpha) * 1e300 * 1e300 / 1e300


def test_alpha_gradient_that_overflows_in_float64_is_zero_with_a_warning():
    """Where the penalty's d2phi_dalpha sum is not finite even when formed again in
    float64, alpha's gradient from those rows is zero and a GradientWarning says so
    (before: NaN, silently); x's gradient is unaffected (LogCosh's, Table 1)."""
    x = torch.tensor([[0.0, 0.3, -0.2, 0.9]], dtype=F64, requires_grad=True)
    a = torch.tensor(1.0, dtype=F64, requires_grad=True)
    with pytest.warns(GradientWarning, match=r"d2phi_dalpha.*not finite.*set to zero"):
        y = robust_pool(x, _OverflowingAlphaWeight(), a)
        gx, ga = torch.autograd.grad(y, (x, a))
    assert float(ga) == 0.0
    y0 = robust_pool(x.detach(), LogCosh(), 1.0)
    (gx0,) = torch.autograd.grad(robust_pool(x, LogCosh(), 1.0), x)
    assert float(y) == float(y0)
    torch.testing.assert_close(gx, gx0)


def test_alpha_gradient_lost_names_the_batch_indices():
    """The warning of a lost alpha gradient named a count only; it names the rows: a
    constant row has z = 0, whose d2phi_dalpha is 0 even with the overflowing formula."""
    x = torch.zeros(2, 2, 4, dtype=F64)
    x[1, 0] = torch.tensor([0.0, 0.3, -0.2, 0.9])
    a = torch.tensor(1.0, dtype=F64, requires_grad=True)
    with pytest.warns(GradientWarning, match=r"d2phi_dalpha.*not finite for 1 of 4 batch element\(s\) "
                                             r"\(indices \[\(1, 0\)\]\)"):
        (ga,) = torch.autograd.grad(robust_pool(x, _OverflowingAlphaWeight(), a).sum(), a)
    assert float(ga) == 0.0


# --------------------------------------------------------------------------- forward mode


@pytest.mark.parametrize("name", PENALTIES)
def test_robust_pool_jvp_matches_finite_differences(name):
    # torch.func.jvp with tangents in x and a per-row alpha at once, against central
    # differences of the forward (outliers at +4 so the robust penalties downweight them).
    gen = torch.Generator().manual_seed(81)
    x = torch.randn(3, 4, 9, dtype=torch.float64, generator=gen)
    x[..., :2] += 4.0
    alpha = torch.rand(3, 4, dtype=torch.float64, generator=gen) + 0.5
    dx = torch.randn(x.shape, dtype=x.dtype, generator=gen)
    da = torch.randn(alpha.shape, dtype=alpha.dtype, generator=gen)

    def f(x, a):
        return robust_pool(x, name, a)

    _, tangent = torch.func.jvp(f, (x, alpha), (dx, da))
    h = 1e-6
    fd = (f(x + h * dx, alpha + h * da) - f(x - h * dx, alpha - h * da)) / (2 * h)
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-8)


def test_robust_pool_forward_ad_dual_module_and_float_alpha():
    # The dual-tensor API through the Module with a float alpha (tangent in x only, the
    # pooled dim not last): the tangent is Σ_i w_i dx_i / Σ w_i, checked by differences.
    import torch.autograd.forward_ad as fwAD

    gen = torch.Generator().manual_seed(82)
    x = torch.randn(2, 7, 3, dtype=torch.float64, generator=gen)
    dx = torch.randn(x.shape, dtype=x.dtype, generator=gen)
    pool = RobustPool("pseudo_huber", alpha=0.7, dim=1)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(pool(fwAD.make_dual(x, dx))).tangent
    h = 1e-6
    torch.testing.assert_close(tangent, (pool(x + h * dx) - pool(x - h * dx)) / (2 * h), rtol=1e-6, atol=1e-8)


def _pseudo_huber_alpha_grad_f64(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """Table 1's dy/dalpha = -sum (r s)^3 / sum s^3 (r = (y - x) / alpha, s = (1 + r^2)^-1/2),
    evaluated in float64 at the given y: the closed form the float32 backward must match."""
    r = (y.double().unsqueeze(-1) - x.double()) / alpha
    s = (1 + r * r).rsqrt()
    return -((r * s) ** 3).sum(-1) / (s ** 3).sum(-1)


def test_pseudo_huber_alpha_gradient_float32_with_residuals_far_beyond_alpha():
    """Residuals far beyond alpha make each d2phi/dalpha = (r s)^3 about +-1 while their
    row sum is ~1e-9: rounded term by term in float32, dy/dalpha came out -3.6e-3 on a
    symmetric row (exact: 0, y = 1.5 for every alpha), 11 % off on another, and 33 % off
    (median) on random rows of 16 at alpha = 0.003, without a warning."""
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    a = torch.tensor(0.01, requires_grad=True)
    y = robust_pool(x, "pseudo_huber", a)
    (ga,) = torch.autograd.grad(y, a)
    assert float(y) == 1.5
    # The terms' own scale: |(r s)^3| / sum s^3 ~ 36 here; float32 rounding of that is ~4e-6.
    assert abs(float(ga)) < 1e-5
    x = torch.tensor([[-1.0, -0.5, -0.2, 0.3, 0.7, 1.2]])
    a = torch.tensor(0.02, requires_grad=True)
    (ga,) = torch.autograd.grad(robust_pool(x, "pseudo_huber", a), a)
    f = lambda al: float(robust_pool(x.double(), "pseudo_huber", al))  # noqa: E731
    fd = (f(0.02 + 1e-5) - f(0.02 - 1e-5)) / 2e-5
    assert abs(float(ga) - fd) <= 1e-3 * abs(fd)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    a = torch.tensor(0.003, requires_grad=True)
    y = robust_pool(x, "pseudo_huber", a)
    ref = _pseudo_huber_alpha_grad_f64(x, y.detach(), 0.003)
    got = torch.stack([torch.autograd.grad(y[i], a, retain_graph=True)[0] for i in range(64)]).double()
    assert float(((got - ref).abs() / ref.abs()).median()) < 1e-3


def test_pseudo_huber_rescaled_weight_sums_keep_the_alpha_sum():
    """The careful path's rescaled weights (rows whose weights underflow): the ratio of
    their alpha sum to their sum is Table 1's dy/dalpha, which rounding each (r s)^3 to
    +-1 lost (float32 residuals 2e5 to 6e5 alpha)."""
    from convexddn.nodes.pooling.builtin import PseudoHuber
    z = torch.tensor([[2.5, 1.5, -1.0, -2.0], [3.0, -1.2, -0.7, 0.4]]) * 2e5
    w, sw, swa = PseudoHuber().weight_sums(z, torch.tensor(1.0), True)
    r = z.double()
    s = (1 + r * r).rsqrt()
    ref = ((r * s) ** 3).sum(-1) / (s ** 3).sum(-1)
    assert torch.allclose((swa / sw).squeeze(-1).double(), ref, rtol=1e-4)
    assert torch.allclose(w.double() / sw.double(), (s ** 3) / (s ** 3).sum(-1, keepdim=True), rtol=1e-5)


def test_pseudo_huber_alpha_gradient_at_the_end_of_the_float64_range():
    """x and alpha near 1.8e308: the careful weights subtracted y - x before scaling it
    down, which overflowed to inf, and alpha's gradient became 0 with a warning blaming
    the penalty's formula. dy/dalpha is scale-invariant: the same problem divided by
    2^1023 (exactly) gives the reference."""
    big = torch.finfo(F64).max * 0.99
    x = torch.tensor([[big, big * 0.999999, big * 0.9999995, -big]], dtype=F64)
    a = torch.tensor(big * 1e-6, dtype=F64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (ga,) = torch.autograd.grad(robust_pool(x, "pseudo_huber", a), a)
    k = 2.0 ** 1023
    ar = (a.detach() / k).requires_grad_(True)
    (ref,) = torch.autograd.grad(robust_pool(x / k, "pseudo_huber", ar), ar)
    assert abs(float(ga) - float(ref)) <= 1e-9 * abs(float(ref))


@pytest.mark.parametrize("alpha", [1.0, 300.0])
def test_pseudo_huber_alpha_gradient_float32_with_residuals_well_inside_alpha(alpha):
    """Residuals 1e-2 of alpha (or less): each (r s)^3 ~ r^3 formed as a difference from
    +-1 carried eps absolute, 2 % median error and sign flips; formed directly it is
    exact to its own rounding. Reference: Table 1's closed form in float64 at the
    float64 solution."""
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0)) * 0.01
    a = torch.tensor(alpha, requires_grad=True)
    y = robust_pool(x, "pseudo_huber", a)
    got = torch.stack([torch.autograd.grad(y[i], a, retain_graph=True)[0] for i in range(64)]).double()
    y64 = robust_pool(x.double(), "pseudo_huber", torch.tensor(alpha, dtype=F64))
    ref = _pseudo_huber_alpha_grad_f64(x, y64, alpha)
    assert (got.sign() == ref.sign()).all()
    assert float(((got - ref).abs() / ref.abs()).median()) < 1e-5


def _fd_gradients(x: torch.Tensor, penalty: str, alpha: float, h: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dy/dx (R, N), dy/dalpha (R,))`` of each row by central differences of float64
    solves (``x`` float64, near 0: the tolerance there is ~1e-14 alpha), one column of
    every row at a time (the rows are independent)."""
    def f(xs, al):
        return robust_pool(xs, penalty, torch.tensor(al, dtype=F64))
    gx = torch.empty_like(x)
    for j in range(x.shape[1]):
        e = torch.zeros_like(x)
        e[:, j] = h
        gx[:, j] = (f(x + e, alpha) - f(x - e, alpha)) / (2 * h)
    return gx, (f(x, alpha + h) - f(x, alpha - h)) / (2 * h)


@pytest.mark.parametrize("dtype, offset", [(torch.float32, 1000.0), (F64, 2.0 ** 37)])
@pytest.mark.parametrize("penalty", ["pseudo_huber", "welsch", "huber"])
def test_gradients_far_from_zero_in_units_of_alpha(penalty, dtype, offset):
    """Data at 1000 + 0.01 randn in float32, alpha 0.003 (|y| / alpha ~ 3e5): y is known
    to its rounding only, up to 0.16 alpha here, and the weights phi''(y - x_i) were taken
    at that y: dy/dx off by 0.16 (pseudo-Huber) and 0.3 (Welsch), dy/dalpha by 0.14 and
    1.2, Huber's inlier sets wrong (an entry off by 1/|S|), without a warning. The same
    in float64 at 2^37 (rounding 1e-2 alpha). Reference: central differences of float64
    solves of the same data less the offset (exact: y(x + t) = y(x) + t)."""
    g = torch.Generator().manual_seed(3)
    x = (offset + 0.01 * torch.randn(32, 64, generator=g, dtype=F64)).to(dtype)
    a = torch.full((32,), 0.003, dtype=dtype, requires_grad=True)
    xg = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        gx, ga = torch.autograd.grad(robust_pool(xg, penalty, a).sum(), (xg, a))
    ref_x, ref_a = _fd_gradients(x.double() - offset, penalty, 0.003, 1e-7)
    # Float32 gradients formed in float64 at the refined residuals: their rounding, and
    # the differences' (~1e-7 here), not y's 0.16 alpha.
    assert float((gx.double() - ref_x).abs().max()) < 1e-5
    assert float((ga.double() - ref_a).abs().max()) < 1e-5 * max(1.0, float(ref_a.abs().max()))


@pytest.mark.parametrize("alpha", [1e-4, 3e-4])
def test_gradient_between_float32_neighbours_by_symmetry(alpha):
    """Four consecutive float32 values at 1e4 (ulp 9.8e-4, 3 to 10 alpha): the minimiser
    lies midway (symmetry), half an ulp from either float32 y. The weights at y gave one
    point 0.95-0.998 of the gradient and dy/dalpha 0.92-0.99; by symmetry dy/dalpha is 0
    and the middle pair share alike (Table 1's weights at the midpoint, in float64), to
    float32's resolution of this flat minimum (the gradient's rounding over the curvature,
    ~6e-5 alpha at alpha 1e-4), as for the same floats near 0."""
    ulp = 2.0 ** -10
    x = (1e4 + ulp * torch.arange(4, dtype=F64)).float().reshape(1, 4).requires_grad_(True)
    a = torch.tensor(alpha, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        gx, ga = torch.autograd.grad(robust_pool(x, "pseudo_huber", a).sum(), (x, a))
    z = torch.tensor([-1.5, -0.5, 0.5, 1.5], dtype=F64) * ulp / alpha
    w = (1 + z * z) ** -1.5
    torch.testing.assert_close(gx.double().reshape(-1), w / w.sum(), rtol=1e-4, atol=1e-6)
    assert abs(float(ga)) < 1e-4


def test_gradient_warns_where_y_is_too_coarse_to_refine():
    """The same four floats with alpha 3e-5: the midpoint is 16 alpha from y, where the
    curvature is that one point's. The weights there gave that point the whole gradient
    (0.9999) without a word; Newton steps from y (at most alpha / 2 each, 16 of them) do
    not reach the midpoint: a GradientWarning says so."""
    ulp = 2.0 ** -10
    x = (1e4 + ulp * torch.arange(4, dtype=F64)).float().reshape(1, 4).requires_grad_(True)
    a = torch.tensor(3e-5, requires_grad=True)
    with pytest.warns(GradientWarning, match=r"y's rounding exceeds .* for 1 of 1 batch element\(s\) "
                                             r"\(indices \[\(0,\)\]\)"):
        robust_pool(x, "pseudo_huber", a).sum().backward()


def _trunc_quad_gradient_by_runs(x: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dy/dx (R, N), unique (R,))`` of the truncated quadratic's global minimiser, by brute
    force in float64: every run of the sorted row, its mean and the objective there (Table
    1's phi, summed directly); the minimiser is the best mean m, a local quadratic's, so
    dy/dx_i = 1/|W| on its inliers W = {i : |x_i - m| <= alpha} and 0 elsewhere. ``unique``:
    no run whose mean has other inliers ties with the best (within 1e-11 alpha^2, far above
    the sums' rounding and below the gaps of distinct runs' objectives here, ~1e-9 alpha^2 at
    least; float32 data on a grid of 0.2 alpha do tie exactly). The rows are taken less their
    median first: exact for the callers' rows (each within a binade), and the runs' means
    then carry no rounding of |x|. Checks that no point sits within 1e-6 alpha of a kink."""
    d = x.double() - x.double().median(-1, keepdim=True).values
    s = d.sort(-1).values
    n = s.shape[-1]
    means = torch.stack([s[:, i:j].mean(-1) for i in range(n) for j in range(i + 1, n + 1)], -1)
    f = objective("trunc_quad", d.unsqueeze(1), means, alpha)
    best, k = f.min(-1, keepdim=True)
    inliers = (d.unsqueeze(1) - means.unsqueeze(-1)).abs() <= alpha  # (R, runs, N)
    chosen = inliers.gather(1, k.unsqueeze(-1).expand(-1, 1, n))
    m = means.gather(-1, k)
    assert float(((d - m).abs() - alpha).abs().min()) > 1e-6 * alpha
    unique = ~((f <= best + 1e-11 * alpha**2) & (inliers != chosen).any(-1)).any(-1)
    w = chosen.squeeze(1).double()
    return w / w.sum(-1, keepdim=True), unique


@pytest.mark.parametrize("dtype, offset, alpha", [(torch.float32, 3e4, 0.01), (F64, 1e12, 1e-3)])
def test_trunc_quad_gradient_far_from_zero_is_the_forwards_inlier_mean(dtype, offset, alpha):
    """Rows of 33 at offset + alpha randn (float32 at 3e4, alpha 0.01: |y| / alpha ~ 3e6;
    float64 at 1e12, alpha 1e-3: 1e15). The forward returns the global minimiser, rounded,
    but the backward refined y by Newton steps, which on this nonconvex objective reached the
    local minimum around the rounded y: another inlier set on 17 of 63 float32 rows (the
    first, at y = 30000.001953125, took 22 points with mean 30000.00204, objective 8.3411e-4,
    for the minimiser's 21 with mean 30000.00251, 8.3324e-4: a point 1.032 alpha out got
    dy/dx 0.0455) and 5 of 63 float64 rows, silently, in the vjp and the jvp alike. Both are
    now the gradient of the mean of the minimiser's own inliers (brute force over runs; rows
    where two sets tie exactly, one of 64 each here, have no derivative and are left out)."""
    g = torch.Generator().manual_seed(20)
    # (float32: the first row is the one found, drawn as it was, the fifth of the repro's rows,
    # at 3e4; then more of the same kind)
    for _ in range(4):
        torch.randn(33, generator=g, dtype=F64)
    first = (3e4 + 0.01 * torch.randn(33, generator=g, dtype=F64)) - 3e4
    z = alpha * torch.randn(64, 33, generator=g, dtype=F64)
    if dtype == torch.float32:
        z[0] = first
    x = (offset + z).to(dtype)
    want, unique = _trunc_quad_gradient_by_runs(x, alpha)
    assert bool(unique[0]) and int(unique.sum()) >= 60
    xg = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        (gx,) = torch.autograd.grad(robust_pool(xg, "trunc_quad", alpha).sum(), xg)
        t = torch.randn(x.shape, generator=g, dtype=F64).to(dtype)
        _, tangent = torch.func.jvp(lambda v: robust_pool(v, "trunc_quad", alpha), (x,), (t,))
    tol = 8 * torch.finfo(dtype).eps
    torch.testing.assert_close(gx.double()[unique], want[unique], rtol=0, atol=tol)
    jvp_want = (want * t.double()).sum(-1)
    torch.testing.assert_close(tangent.double()[unique], jvp_want[unique], rtol=0, atol=tol * 64)


@pytest.mark.parametrize("penalty", ["huber", "welsch", "quadratic"])
def test_robust_pool_under_jacfwd_jacrev_and_batched_directions(penalty):
    """jacfwd and jacrev failed with torch's "does not have vmap support" and
    is_grads_batched / vectorize=True with "Batching rule not implemented for
    aten::div.out"; then a ProblemError refused them (until 2026-12-06). The rows'
    derivative vectors (the backward at an incoming gradient of 1, unbatched) times the
    batched directions: the row-by-row Jacobian, in x and a tensor alpha. A vmap around
    grad is still refused (its wrappers hide the rows to stack)."""
    from convexddn.errors import ProblemError
    x = torch.randn(3, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    alpha = torch.tensor([1.0, 0.5, 2.0], dtype=F64)
    f = lambda r, a: robust_pool(r, penalty, a)  # noqa: E731
    want = torch.autograd.functional.jacobian(f, (x, alpha))
    torch.testing.assert_close(want[0].sum(-1), torch.eye(3, dtype=F64))  # dy_i/dx_i sums to 1 per row
    for got in (torch.func.jacfwd(f, argnums=(0, 1))(x, alpha), torch.func.jacrev(f, argnums=(0, 1))(x, alpha),
                torch.autograd.functional.jacobian(f, (x, alpha), vectorize=True, strategy="forward-mode"),
                torch.autograd.functional.jacobian(f, (x, alpha), vectorize=True)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    xg = x.clone().requires_grad_(True)
    (rows,) = torch.autograd.grad(f(xg, alpha), xg, torch.eye(3, dtype=F64), is_grads_batched=True)
    torch.testing.assert_close(rows, want[0], rtol=1e-10, atol=1e-10)
    with pytest.raises(ProblemError, match="inside torch.func.vmap"):
        torch.func.vmap(torch.func.grad(lambda r: f(r, 1.0).sum()))(x.unsqueeze(1))


@pytest.mark.parametrize("penalty", PENALTIES)
def test_robust_pool_under_vmap_is_the_stacked_call(penalty):
    """torch.func.vmap raised a ProblemError (the solver decides on the host, which vmap
    cannot batch). The rows are solved independently, so a vmapped call is now the call
    on the stacked rows: the same values and gradients as the batched call, with x
    vmapped along any dim, alpha vmapped too, nested vmaps and keepdim."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 7, dtype=F64, generator=gen)
    x[..., :2] += 5.0
    alpha = torch.rand(4, dtype=F64, generator=gen) + 0.5
    leaf = x.clone().requires_grad_()
    y = torch.func.vmap(lambda r: robust_pool(r, penalty, 1.0))(leaf)
    ref_leaf = x.clone().requires_grad_()
    ref = robust_pool(ref_leaf, penalty, 1.0)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    w = torch.randn(4, 3, dtype=F64, generator=gen)
    (g,) = torch.autograd.grad((y * w).sum(), leaf)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), ref_leaf)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=0)
    # x vmapped along dim 1, alpha along dim 0, keepdim: y[i] pools x[:, i] with alpha[i]
    yk = torch.func.vmap(lambda r, a: robust_pool(r, penalty, a, dim=-1, keepdim=True),
                         in_dims=(1, 0))(x.transpose(0, 1), alpha)
    want = robust_pool(x, penalty, alpha[:, None], dim=-1, keepdim=True)
    torch.testing.assert_close(yk, want, rtol=0, atol=0)
    # nested: the inner vmap batches 3, the outer 4
    yn = torch.func.vmap(torch.func.vmap(lambda r: robust_pool(r, penalty, 1.0)))(x)
    torch.testing.assert_close(yn, ref.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("penalty", PENALTIES)
def test_expanded_input_along_the_pooled_dim(penalty, dtype):
    """An input expanded (stride 0) along the pooled dim gives the contiguous copy's
    result and gradient. torch 2.13's CPU median over a stride-0 dim returned
    uninitialised memory (4e-314 for rows of 1.5): pseudo-Huber and Huber, whose start
    is that median, returned it for constant rows, and 0 instead of -0.75 in float32."""
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(3, 2, 1, dtype=F64, generator=gen).to(dtype)
    for v in (base, torch.full_like(base, -0.75)):
        leaf = v.clone().requires_grad_()
        x = leaf.expand(3, 2, 64)
        assert x.stride(-1) == 0
        y = robust_pool(x, penalty, 1.0)
        (g,) = torch.autograd.grad(y.sum(), leaf)
        leaf2 = v.clone().requires_grad_()
        y2 = robust_pool(leaf2.expand(3, 2, 64).contiguous(), penalty, 1.0)
        (g2,) = torch.autograd.grad(y2.sum(), leaf2)
        # Constant rows: the minimiser is the constant, the gradient 1 (weights sum to 1).
        torch.testing.assert_close(y, v[..., 0], rtol=0, atol=4 * torch.finfo(dtype).eps)
        # (the same up to a reduction's order: a sum over a stride-0 dim is another kernel)
        torch.testing.assert_close(y, y2, rtol=0, atol=8 * torch.finfo(dtype).eps)
        torch.testing.assert_close(g, torch.ones_like(g), rtol=0, atol=64 * torch.finfo(dtype).eps)
        torch.testing.assert_close(g, g2, rtol=0, atol=64 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("penalty", ["pseudo_huber", "huber", "welsch"])
def test_a_zero_width_bracket_ends_inside_it_from_any_start(monkeypatch, penalty):
    """A stop keeps the iterate inside the bracket: rows whose bracket has zero width
    (constant rows) end on it even from a start outside it, where the stop returned the
    start unchanged (the garbage median of an expanded input came back as the result)."""
    from convexddn.nodes.pooling import solvers

    bad = lambda x: torch.full_like(x[..., :1], 1e6)  # noqa: E731
    for name in ("_start", "_median_start", "_remedian"):
        monkeypatch.setattr(solvers, name, bad)
    x = torch.full((4, 40), 1.5, dtype=F64)
    torch.testing.assert_close(robust_pool(x, penalty, 1.0), torch.full((4,), 1.5, dtype=F64), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["pseudo_huber", "huber", "welsch", "trunc_quad"])
@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_a_common_offset_moves_the_pooled_value_by_exactly_the_offset(name, offset):
    """argmin_u Σ φ(u − xᵢ − c) = c + argmin_u Σ φ(u − xᵢ): in float64 the two agree to the
    offset's rounding (128 eps |c| here; the stop allows 64). The stop ``tol (alpha + |u|)``
    counted the offset as accuracy to spare: pseudo-Huber was 7e-7 off at c = 1e6, Welsch
    2e-7, where the rounding is 2e-10."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 64, dtype=F64, generator=gen)
    x[..., :6] += 8  # outliers
    base = robust_pool(x, name, 1.0)
    shifted = robust_pool(x + offset, name, 1.0) - offset
    eps = torch.finfo(F64).eps
    assert (shifted - base).abs().max() <= 128 * eps * (offset + x.abs().max())


def _huber_root(x: torch.Tensor, alpha: float) -> float:
    """A minimiser of the Huber objective of row ``x`` by bisection on its (monotone)
    derivative in float64: the paper's definition, independent of the module."""
    xs = x.double()
    lo, hi = float(xs.min()), float(xs.max())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float((mid - xs).clamp(-alpha, alpha).sum()) < 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def test_huber_does_not_stop_on_a_step_across_a_kink():
    """Huber's g is piecewise linear: a Newton step is exact only up to the next kink.
    A row started at a data point with alpha far below the data's spacing has the slope
    of one inlier there, and its step of a few alpha passed the tolerance test: 0..199
    returned 98.000000000003 (alpha 1e-12) and 98.03 (alpha 0.01, tol 1e-3) where the
    minimisers fill [99 + alpha, 100 - alpha]."""
    x = torch.arange(200, dtype=F64)
    y = float(robust_pool(x, "huber", 1e-12))
    assert 99.0 <= y <= 100.0
    y = float(robust_pool(x, "huber", 0.01, tol=1e-3))
    assert 99.01 - 0.1 <= y <= 99.99 + 0.1  # within tol (alpha + |y|) of the flat minimum


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_huber_tied_clusters_small_alpha(dtype):
    """256 ones and 257 twos: the minimiser is 2 - 256 alpha / 257 (the twos' slope
    piece). In float32 with alpha 1e-6 (8 ulps of 1) the row stopped at 1 + 8 ulp, where
    g was within a rounding noise of 1.2e-4 that exceeds alpha, silently 1 off; such a
    row is unresolved in float32 and solved again in float64. Against bisection for
    alphas from below an ulp to 1."""
    tol = 1e-6 if dtype == torch.float32 else 1e-12  # robust_pool's defaults
    eps = torch.finfo(dtype).eps
    for n1, n2 in ((256, 257), (3, 4), (1000, 1001)):
        x = torch.cat([torch.ones(n1), torch.full((n2,), 2.0)]).to(dtype)
        for alpha in (1e-8, 1e-7, 4e-7, 1e-6, 1e-5, 1e-3, 0.1, 1.0):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # resolved, in float64 where float32 cannot
                y = float(robust_pool(x, "huber", alpha))
            ref = _huber_root(x, alpha)
            assert abs(y - ref) <= 4 * tol * (alpha + abs(ref)) + 4 * eps * abs(ref), (n1, alpha, y, ref)


def test_huber_noise_above_alpha_is_bisected():
    """Where g's rounding noise (h |y| eps) exceeds alpha even in float64, Newton's stop on a
    gradient within the noise cannot tell a flat piece's g = +-alpha from the minimum (it was
    reported, a SolverWarning); the sign of g, exact there (its terms are +-alpha and 0), is
    bisected to the minimiser, the median 1e6 + 1 (257 of 513 entries), without a warning."""
    x = torch.cat([torch.full((256,), 1e6), torch.full((257,), 1e6 + 1)]).to(F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(robust_pool(x, "huber", 1e-14)) == 1e6 + 1


@pytest.mark.parametrize("penalty", ["huber", "pseudo_huber"])
def test_a_far_row_does_not_move_its_neighbours(penalty):
    """The rows' brackets are their own: a block's min and max, shared, let a row at
    1e300 widen its neighbours' brackets, whose bisection went out to 5e299 (Huber:
    1.6e270 for a row whose minimiser is -101.3; pseudo-Huber 3.2e70 for one at 500)."""
    torch.manual_seed(0)
    row = torch.randn(256, dtype=F64) * 1000
    pair = torch.tensor([-1000.0, 2000.0], dtype=F64)
    for near, far in ((row, torch.full((256,), 1e300, dtype=F64)), (pair, torch.full((2,), 1e100, dtype=F64)),
                      (row.float(), torch.full((256,), 3e38))):
        # (The pair is so far apart for alpha 1 that pseudo-Huber's objective is flat to
        # rounding between them: unresolved alone and beside the far row alike.)
        with warnings.catch_warnings(record=True) as w_alone:
            warnings.simplefilter("always")
            alone = robust_pool(near, penalty, 1.0)
        with warnings.catch_warnings(record=True) as w_both:
            warnings.simplefilter("always")
            both = robust_pool(torch.stack([far, near]), penalty, 1.0)
        assert float(both[0]) == float(far[0])
        assert abs(float(both[1]) - float(alone)) <= 1e-6 * (1 + abs(float(alone)))
        assert not any("max_iter" in str(w.message) for w in w_both + w_alone)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_quadratic_at_the_float_range_end(dtype):
    """The mean rescales rows whose sum overflows by the power of two below their
    largest entry; for the dtype's largest number log2 rounded up and that power was
    Inf (the mean of two such entries NaN)."""
    top = torch.finfo(dtype).max
    y = robust_pool(torch.tensor([[top, top], [top, -top]], dtype=dtype), "quadratic")
    assert y.tolist() == [top, 0.0]


def test_keepdim_shaped_alpha_under_vmap():
    """An alpha shaped like the kept output ((3, 1, 1) for x (3, 3, 6) pooled over dim 1):
    taken by the plain call, refused under torch.func.vmap ("must broadcast to the output
    shape (2, 3, 6)": vmap's stacked shape). Both take it now, with the same values."""
    x = torch.randn(3, 3, 6, dtype=F64, generator=torch.Generator().manual_seed(0))
    al = torch.tensor([0.5, 1.0, 2.0], dtype=F64).view(3, 1, 1)
    plain = robust_pool(x, "huber", al, dim=1, keepdim=True)
    mapped = torch.func.vmap(lambda t: robust_pool(t, "huber", al, dim=1, keepdim=True))(torch.stack([x, x + 1]))
    assert plain.shape == (3, 1, 6) and mapped.shape == (2, 3, 1, 6)
    torch.testing.assert_close(mapped[0], plain, rtol=0, atol=1e-12)
    torch.testing.assert_close(mapped[1], plain + 1, rtol=0, atol=1e-12)


def test_keepdim_alpha_error_names_both_shapes_it_takes():
    """With keepdim an alpha is read against the output without the kept dims, or, of x's
    rank, against the kept output (documented). An alpha (3, 4, 1) for x (2, 3, 4, 5)
    pooled over the last dim fits neither; the error named only (2, 3, 4), and the user
    saw an output of (2, 3, 4, 1)."""
    x = torch.randn(2, 3, 4, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    al = torch.linspace(0.5, 2.0, 12, dtype=F64).view(3, 4, 1)
    want = robust_pool(x, "huber", al.unsqueeze(0), dim=-1, keepdim=True)
    torch.testing.assert_close(robust_pool(x, "huber", al.view(3, 4), dim=-1, keepdim=True), want, rtol=0, atol=0)
    with pytest.raises(ShapeError, match=r"shape \(2, 3, 4\) \(or, with keepdim=True, be shaped like the kept "
                                         r"output \(2, 3, 4, 1\), of x's rank\), got shape \(3, 4, 1\)"):
        robust_pool(x, "huber", al, dim=-1, keepdim=True)


def test_pseudo_huber_cvxpy_form_takes_a_huge_alpha():
    # Its constant −n·alpha**2 raised OverflowError from alpha ~ 1.3e154 (a Python float
    # power), where the native node returns the mean; the constant is left out there.
    import cvxpy as cp

    z = cp.Variable(4)
    assert Penalty.resolve("pseudo_huber").cvxpy(z, 1e155).is_convex()
    # Where it is finite the constant stays: the penalty sum is 0 at z = 0.
    z.value = [0.0, 0.0, 0.0, 0.0]
    assert Penalty.resolve("pseudo_huber").cvxpy(z, 2.0).value == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("n, k", [(1024, 8), (4096, 32), (512, 4), (288, 3)])
def test_welsch_does_not_depend_on_the_order_of_the_pooled_entries(n, k):
    # Its starts came from an evenly strided sample: a stripe in every k-th column lined
    # up with the stride and filled the sample, and Welsch returned the stripe (30.0, at
    # an objective 5x the main cluster's) where a shuffled row gives ~0, silently.
    g = torch.Generator().manual_seed(0)
    x = 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    x[::k] += 30.0
    y = robust_pool(x, "welsch", 1.0, dim=0)
    shuffled = robust_pool(x[torch.randperm(n, generator=g)], "welsch", 1.0, dim=0)
    assert abs(y.item()) < 0.1 and abs(y.item() - shuffled.item()) < 1e-6


def test_user_penalty_subclassing_a_builtin_with_new_formulas_is_refused():
    # An asymmetric Huber written as a subclass of Huber ran Huber's fused sums and
    # solver: y = 2.25, Huber's answer, where its own objective's minimiser is 1.8
    # (silently). A subclass that only renames the built-in is fine.
    class Asymmetric(cddn.nodes.pooling.builtin.Huber):
        name = "asymmetric"

        def dphi(self, z, alpha):
            return torch.clamp(z, -alpha, 3 * alpha)

    class Renamed(cddn.nodes.pooling.builtin.Huber):
        name = "renamed"

    x = torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0]], dtype=torch.float64)
    with pytest.raises(OptionError, match="subclasses the built-in Huber and redefines dphi"):
        robust_pool(x, Asymmetric(), 1.0)
    torch.testing.assert_close(robust_pool(x, Renamed(), 1.0), robust_pool(x, "huber", 1.0))


def test_user_penalty_with_a_nan_derivative_returns_the_last_finite_iterate():
    # phi' of NaN beyond |z| > 3 (a formula outside its domain) with a finite phi'':
    # the stop took u - NaN, a NaN result under the warning "returning the last finite
    # iterate".
    class Broken(Cauchy):
        name = "broken"

        def dphi(self, z, alpha):
            return torch.where(z.abs() > 3, torch.nan, super().dphi(z, alpha))

    x = torch.tensor([[0.0, 0.1, 0.3, 0.35, 5.0]], dtype=torch.float64)
    with pytest.warns(SolverWarning, match="returning the last finite iterate"):
        y = robust_pool(x, Broken(), 1.0)
    assert torch.isfinite(y).all() and 0.0 <= float(y) <= 5.0


def test_gradient_where_residuals_overflow_the_float_range():
    """Welsch in float32 at alpha = max/2 on data spread over more than the range: y - x_i
    overflowed to inf for the far points, whose weights came out 0 (grad_x (0.502, 0.498,
    0, 0) for the true (0.608, 0.603, -0.016, -0.196)), silently; with alpha a tensor
    requiring grad its saturation clamp raised a raw RuntimeError. Expected: Table 1's
    weights w_i / sum w at the returned y, formed in float64 (where nothing overflows)."""
    xs = [3.0321514783773683e38, 3.084192896234802e38, -3.0338923175936498e38, -9.45222453115603e37]
    x = torch.tensor(xs, requires_grad=True)
    a = 0.5 * torch.finfo(torch.float32).max
    y = robust_pool(x, "welsch", a)
    (gx,) = torch.autograd.grad(y, x)
    z = y.detach().double() - x.detach().double()
    w = Penalty.resolve("welsch").d2phi(z, torch.tensor(a, dtype=F64))
    torch.testing.assert_close(gx.double(), w / w.sum(), atol=1e-5, rtol=0)
    assert (gx[2:] < 0).all()
    at = torch.tensor(a, requires_grad=True)
    (ga,) = torch.autograd.grad(robust_pool(x.detach(), "welsch", at), at)
    assert torch.isfinite(ga)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("n", [7, 256])
def test_results_do_not_depend_on_the_memory_layout(n, dtype):
    """A strided view of the same values (every other entry of a stacked tensor, or a
    transposed copy) gives the contiguous tensor's results bit for bit, with every
    penalty: Welsch's mean start (and the quadratic's mean) summed a strided row in
    another order, and Welsch's result was up to 148 ulp off in float32 (91 of 256 rows
    differed), its gradient in 1022 entries."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, n, dtype=dtype, generator=gen)
    w = torch.linspace(-1, 1, 64, dtype=dtype)
    for penalty in PENALTIES:
        leaf = x.clone().requires_grad_()
        y = robust_pool(leaf, penalty, 0.8)
        (g,) = torch.autograd.grad((y * w).sum(), leaf)
        for make in (lambda t: torch.stack([t, t], -1)[..., 0], lambda t: t.T.contiguous().T):
            leaf_v = x.clone().requires_grad_()
            view = make(leaf_v)
            assert not view.is_contiguous() and torch.equal(view, x)
            y_v = robust_pool(view, penalty, 0.8)
            (g_v,) = torch.autograd.grad((y_v * w).sum(), leaf_v)
            assert torch.equal(y_v, y), penalty
            assert torch.equal(g_v, g), penalty


def test_welsch_rows_up_to_129_do_not_depend_on_the_order_of_their_entries():
    """The documented limit of the order dependence: rows of at most 129 entries start
    from their exact lower median and their mean, so a permutation of the entries (two
    clusters of 53 % and 47 %, where the start decides the local minimum) returns the
    same point up to rounding. (Longer rows start from entries at fixed positions: see robust_pool's
    docstring, docs/nodes-pooling.md.)"""
    gen = torch.Generator().manual_seed(0)
    x = 0.4 * torch.randn(256, 129, dtype=F64, generator=gen)
    x = torch.where(torch.rand(256, 129, generator=gen) < 0.47, x + 2.5, x)
    perm = torch.argsort(torch.rand(256, 129, generator=gen), -1)
    y = robust_pool(x, "welsch", 0.6)
    y_p = robust_pool(x.gather(-1, perm), "welsch", 0.6)
    torch.testing.assert_close(y_p, y, rtol=0, atol=1e-9)


@pytest.mark.parametrize("penalty", ["quadratic", "huber", "welsch"])
@pytest.mark.parametrize("shape", [(4,), (2, 3, 4)])
def test_robust_pool_nonfinite_error_names_the_callers_shape(penalty, shape):
    # The solver checks finiteness on its rows: (4,) was reported as (1, 4), (2, 3, 4) as (6, 4).
    x = torch.zeros(shape, dtype=torch.float64)
    x.view(-1)[1] = float("nan")
    want = rf"x must be finite, got 1 NaN and 0 Inf value\(s\) among {x.numel()} \(shape {re_shape(shape)}\)"
    with pytest.raises(NonFiniteError, match=want):
        robust_pool(x, penalty)


def re_shape(shape: tuple[int, ...]) -> str:
    return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


@pytest.mark.parametrize("penalty", ["huber", "pseudo_huber", "welsch", "trunc_quad"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_robust_pool_nonfinite_incoming_gradient_propagates(penalty, bad):
    """A NaN or Inf in the incoming gradient (a fault upstream) propagates, as torch does and
    as the quadratic penalty's mean does. It was zeroed: the row's gradient came out 0 and a
    shared alpha's finite (pseudo-Huber 0.0075 instead of NaN; -0.023 with a finite
    cotangent), under a GradientWarning that blamed a singular Hessian. The other rows'
    gradients match central differences of the solution (float64)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, dtype=F64, generator=gen)
    alpha = torch.tensor(1.3, dtype=F64, requires_grad=True)
    xr = x.clone().requires_grad_()
    gout = torch.tensor([bad, 0.7, -1.1], dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)  # the Hessian is regular: nothing to say
        robust_pool(xr, penalty, alpha).backward(gout)
    assert not torch.isfinite(xr.grad[0]).any() and not torch.isfinite(alpha.grad)
    dx = torch.randn(3, 7, dtype=F64, generator=gen)
    dx[0] = 0.0
    h = 1e-6
    fd = ((robust_pool(x + h * dx, penalty, 1.3) - robust_pool(x - h * dx, penalty, 1.3)) / (2 * h))[1:] @ gout[1:]
    torch.testing.assert_close((xr.grad[1:] * dx[1:]).sum(), fd, rtol=1e-6, atol=1e-9)


def test_robust_pool_gradient_over_a_tiny_hessian_is_not_called_singular():
    """gy / sum_j w_j overflowing float32 with a finite gy is no singular Hessian: pseudo-Huber
    points 1e10 alpha either side of y weigh about 1e-30 each, and gy = 1e9 gave Inf there;
    the row's gradient was set to zero under a singular-Hessian warning. By symmetry each
    point's gradient is gy / 2 (the weights' ratio, formed in float64)."""
    x = torch.tensor([[-1e10, 1e10], [0.0, 1.0]], requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)  # (the flat objective's resolution)
        y = robust_pool(x, "pseudo_huber", 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        y.backward(torch.tensor([1e9, 1.0]))
    torch.testing.assert_close(x.grad, torch.tensor([[5e8, 5e8], [0.5, 0.5]]), rtol=1e-6, atol=0)
    # That row's careful pass also forms alpha's gradient again where it is not finite: a
    # NaN incoming gradient on the other row stays NaN there, not zero under a warning that
    # the penalty's formula overflows.
    alpha = torch.tensor(1.0, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)
        y = robust_pool(x.detach(), "pseudo_huber", alpha)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        y.backward(torch.tensor([1e9, math.nan]))
    assert torch.isnan(alpha.grad)
