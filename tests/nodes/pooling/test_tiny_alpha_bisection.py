"""Convex penalties with alpha far below the data's spacing (:func:`convexddn.nodes.pooling.bisection.bisect_rows`):
the minimiser is the median, whose gradient sum alpha·(#below − #above) is exact, but Newton's test cannot tell
the flat pieces from the minimum and stopped at its start: alpha = 1e-20 on 1001 N(0, 1) values gave a point 0.058
from the median, 27 ranks off, with a SolverWarning calling that gradient noise (tester I)."""
from __future__ import annotations

import warnings

import pytest
import torch

import convexddn.functional as F
from convexddn.errors import SolverWarning
from convexddn.nodes.pooling.bisection import _keys, _values


@pytest.mark.parametrize("penalty", ["huber", "pseudo_huber"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("alpha, offset", [(1e-20, 0.0), (1e-11, 1e6)])
def test_tiny_alpha_gives_the_median(penalty, dtype, alpha, offset):
    x = (offset + torch.randn(3, 1001, dtype=torch.float64, generator=torch.Generator().manual_seed(0))).to(dtype)
    x.requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = F.robust_pool(x, penalty, alpha=alpha)
    med = x.detach().median(-1).values  # (odd N: the middle entry)
    if offset:
        # Within the default tol (1e-12 of |y|: Newton stopped 21 and 49 ulps off on two rows; the third,
        # bisected, is exact; before, it was 0.06 off). The backward warns there that y's rounding exceeds
        # alpha (|y| / alpha beyond 1/eps), as documented.
        torch.testing.assert_close(y.detach(), med, rtol=1e-12, atol=0)
        return
    assert torch.equal(y.detach(), med)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y.sum().backward()
    # The median's derivative: 1 at the middle entry, 0 elsewhere (pseudo-Huber's curvature there ~(alpha/|z|)^3).
    torch.testing.assert_close(x.grad, (x.detach() == med[:, None]).to(dtype), rtol=0, atol=1e-20)



@pytest.mark.parametrize("alpha, scale", [(1e-160, 1.0), (1e-300, 1.0), (1.0, 1e200)])
def test_spread_beyond_the_square_s_range_gives_the_median(alpha, scale):
    """Spread over alpha past ~1e154 (float64): pseudo-Huber's phi' = z (1 + (z/alpha)^2)^(-1/2) read 0 at
    every far point (the square overflowed), and the bisection returned the row's minimum, 0.0 for the
    median 0.2, under a warning calling its gradient noise (tester terr); the bisection clamps residuals
    where the penalty saturates, as the iterations do. (Huber gave 0.2 all along.)"""
    x = torch.tensor([0.0, 0.1, 0.2, 5.0, 9.0], dtype=torch.float64) * scale
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for penalty in ("pseudo_huber", "huber"):
            y = F.robust_pool(x, penalty, alpha=alpha)
            assert float(y) == float(x[2]), penalty


@pytest.mark.parametrize("row, alpha, middle", [([-1.0, 1.0], 1e-300, 0.0), ([1.0, 1.0, 2.0, 2.0], 1e-300, 1.5),
                                                ([1e40, 2e40], 1.0, 1.5e40), ([-1e200, 1e200], 1.0, 0.0)])
def test_a_flat_middle_stretch_returns_its_middle_and_warns(row, alpha, middle):
    """Rows whose middle stretch is flat to working precision (every phi' is +-alpha there, and g is 0
    from one data point to the next): the crossing found was one end, the row's minimum returned silently
    (the minimiser is the middle, by symmetry); the stretch's ends are bisected, its middle returned, and
    the row named as unresolvable."""
    with pytest.warns(SolverWarning, match="cannot be resolved"):
        y = F.robust_pool(torch.tensor(row, dtype=torch.float64), "pseudo_huber", alpha=alpha)
    assert float(y) == pytest.approx(middle, rel=1e-15, abs=0.0)

def test_keys_order_every_float_and_come_back():
    v = torch.tensor([-float("inf"), -1e308, -1.0, -5e-324, 0.0, 5e-324, 1.0, 1e308, float("inf")],
                     dtype=torch.float64)
    k = _keys(v)
    assert bool((k[1:] > k[:-1]).all()) and int(k[4]) == 0 and int(_keys(-v[4:5])) == 0  # (-0.0 is 0.0)
    assert torch.equal(_values(k), v)
    assert int(k[5] - k[3]) == 2  # (adjacent floats: adjacent keys, across 0)
