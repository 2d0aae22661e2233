"""float32 sparse maps keep the relative accuracy of their small entries.

entmax (1 < α ≤ 2), project_simplex and project_lp(p=1) of float32 input used to form
xᵢ − τ in float32 with τ itself float32-accurate: normwise ~1 ulp, but a small entry was
off by up to 746 ulps (α = 1.5), 85 (α = 2), 73 (simplex), 8 (L1 ball). Each nonzero entry
is checked against an independent exact reference on the same float32 data: mpmath
(bisection on τ, 40 digits) for entmax, exact rational arithmetic (Duchi et al.'s sort)
for the simplex and the L1 ball.
"""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from convexddn import functional as F

mpmath = pytest.importorskip("mpmath")

# Each entry within this many float32 ulps of the exact value (the fix gives ≤ 0.5: the
# float64 result rounded once; the old code gave 8 to 746).
ULPS = 2.0


def _ulps(got: float, exact) -> float:
    """|got − exact| in float32 ulps of the exact value (normal range); exact an mpf or a Fraction."""
    e = math.frexp(float(exact))[1]
    err = abs(Fraction(got) - exact) if isinstance(exact, Fraction) else abs(mpmath.mpf(got) - exact)
    return float(err) / 2.0 ** (e - 24)


def _entmax_exact(row: list[float], alpha: float) -> list:
    """α-entmax of one row in mpmath: τ by bisection on Σ [zᵢ − τ]_+^k = 1, z = (α − 1)x."""
    with mpmath.workdps(40):
        a = mpmath.mpf(alpha)
        k = 1 / (a - 1)
        z = [(a - 1) * mpmath.mpf(v) for v in row]
        lo, hi = max(z) - 1, max(z)  # f(lo) ≥ 0 > f(hi)
        for _ in range(150):
            mid = (lo + hi) / 2
            if sum(max(zi - mid, 0) ** k for zi in z) > 1:
                lo = mid
            else:
                hi = mid
        return [max(zi - lo, 0) ** k for zi in z]


def _simplex_exact(row: list[float], z: Fraction = Fraction(1)) -> list[Fraction]:
    """Euclidean projection onto {y ≥ 0, Σy = z} in exact rationals (Duchi et al. 2008)."""
    v = [Fraction(a) for a in row]
    total, rho, at_rho = Fraction(0), 0, Fraction(0)
    for j, u in enumerate(sorted(v, reverse=True), 1):
        total += u
        if u - (total - z) / j > 0:
            rho, at_rho = j, total
    tau = (at_rho - z) / rho
    return [max(a - tau, Fraction(0)) for a in v]


def _l1_ball_exact(row: list[float]) -> list[Fraction]:
    """Projection onto the unit L1 ball in exact rationals: x inside, else sign(x)·P_Δ(|x|)."""
    if sum(abs(Fraction(a)) for a in row) <= 1:
        return [Fraction(a) for a in row]
    mags = _simplex_exact([abs(a) for a in row])
    return [m if a >= 0 else -m for a, m in zip(row, mags)]


def _worst(y: torch.Tensor, exact_rows: list[list]) -> float:
    """The largest error in ulps over the nonzero exact entries; zeros must match exactly."""
    worst = 0.0
    for got_row, ref_row in zip(y.tolist(), exact_rows):
        for got, ref in zip(got_row, ref_row):
            if ref == 0:
                assert got == 0.0
            else:
                worst = max(worst, _ulps(got, ref))
    return worst


def _rows() -> torch.Tensor:
    torch.manual_seed(5)  # rows with small support entries (746 ulps at α = 1.5 before)
    return torch.randn(32, 16)


@pytest.mark.parametrize("alpha", [1.5, 1.2, 2.0])
def test_entmax_float32_small_entries_within_ulps(alpha):
    x = _rows()
    y = F.entmax(x, alpha)
    exact = [_entmax_exact(r, alpha) for r in x.double().tolist()]
    assert _worst(y, exact) <= ULPS


def test_entmax_float32_compacted_rows_within_ulps():
    # n > 64 with a small support: the float32 solve works on each row's largest entries
    # (compaction), and the float64 result is scattered back.
    torch.manual_seed(1)
    x = torch.randn(4, 200) * 3
    y = F.entmax(x, 1.5)
    exact = [_entmax_exact(r, 1.5) for r in x.double().tolist()]
    assert _worst(y, exact) <= ULPS


def test_project_simplex_float32_small_entries_within_ulps():
    x = _rows()
    exact = [_simplex_exact(r) for r in x.double().tolist()]
    assert _worst(F.project_simplex(x), exact) <= ULPS


def test_project_l1_ball_float32_small_entries_within_ulps():
    x = _rows()
    exact = [_l1_ball_exact(r) for r in x.double().tolist()]
    assert _worst(F.project_lp(x, p=1), exact) <= ULPS



def test_entries_within_float32_rounding_of_the_max_stay_in_the_support():
    """[1, 1e-9, 1e-9, 1e-9]: the small entries round onto the row max in float32 (t = x − max), so the
    float32 support was {1}; the simplex gave [1, 0, 0, 0] for [1, 2.5e-10 ×3] (and its gradient 0), and
    the L1 ball, whose float32 threshold put the row (outside by 3e-9) inside, returned x unchanged.
    The float64 steps count the support again, from just below the float32 threshold."""
    x = torch.tensor([[1.0, 1e-9, 1e-9, 1e-9]])
    rows = x.double().tolist()
    # (each small entry within 2 ulps: forming 1e-9 − θ in float64 leaves ~1e-16 absolute, 0.9 ulp here)
    assert _worst(F.project_simplex(x), [_simplex_exact(r) for r in rows]) <= ULPS
    assert _worst(F.project_lp(x, p=1), [_l1_ball_exact(r) for r in rows]) <= ULPS
    for project in (F.project_simplex, lambda v: F.project_lp(v, p=1)):
        xg = x.clone().requires_grad_()
        g = torch.tensor([[1.0, -1.1, 1.2, -1.3]])
        (grad,) = torch.autograd.grad((project(xg) * g).sum(), [xg])
        torch.testing.assert_close(grad, g - g.mean(), rtol=0, atol=1e-6)  # (every entry in the support)

def test_float32_huge_offsets_keep_the_answer():
    # The threshold relative to the row max: 3e38 − 2 is 3e38 in float64, so forming
    # x − (top + θ) there, not (x − top) − θ, lost θ (NaN rows in development).
    x = torch.tensor([[3e38, 3e38 - 2**104, -3e38, -math.inf]])
    for alpha in (1.5, 1.2, 2.0):
        assert torch.equal(F.entmax(x, alpha), F.entmax(x.double(), alpha).float())
    x = x[:, :3]
    assert torch.equal(F.project_simplex(x), F.project_simplex(x.double()).float())
    assert torch.equal(F.project_lp(x, p=1), F.project_lp(x.double(), p=1).float())


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_entmax_float32_backward_reads_the_forward_support(alpha):
    # The VJP's support and s = p^{2−α} come from the returned p: zero gradient exactly
    # off the support (and on no wider set than float64's), float64's to float32 accuracy on it.
    x = _rows().requires_grad_()
    g = torch.randn(32, 16)
    y = F.entmax(x, alpha)
    (gx,) = torch.autograd.grad(y, x, g)
    x64 = x.detach().double().requires_grad_()
    y64 = F.entmax(x64, alpha)
    (gx64,) = torch.autograd.grad(y64, x64, g.double())
    assert torch.equal(y.detach() == 0, y64.detach() == 0)
    assert bool((gx[y.detach() == 0] == 0).all())
    torch.testing.assert_close(gx.double(), gx64, rtol=1e-5, atol=1e-6)
