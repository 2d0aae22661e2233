"""Tests of convexddn.nodes._overflow's checked casts of a node's tensor options
(:func:`~convexddn.nodes._overflow.option_cast`): a float16 alpha, radius, z, lam or
ridge beside float32 (or wider) data.

References: the same graph with every tensor in float64 (an independent computation of
the same derivative, no cast on the way), or its closed form (0 for mirror-image rows).
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from convexddn.errors import GradientWarning
from convexddn.nodes._overflow import option_rows
from convexddn.functional import (least_squares, linear_fit, project_lp, project_simplex, robust_pool,
                                  robust_vector_pool, tv_denoise)

F16, F32, F64 = torch.float16, torch.float32, torch.float64


def _grad(fn, x, option, upstream):
    """(gradient of (fn(x, option) * upstream).sum() with respect to option, warnings)."""
    option = option.clone().requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = fn(x, option)
        (g,) = torch.autograd.grad((y * upstream.to(y.dtype)).sum(), option)
    return g, [w for w in caught if issubclass(w.category, GradientWarning)]


# Two mirror-image rows (sets, features): their terms in the option's gradient are +c and
# -c with |c| beyond float16's 65504, the exact gradient 0. Rounded to float16 row by row
# before the sum (the option broadcast, then cast), they were +Inf and -Inf: NaN, silently.
_XP = torch.tensor([[0.0, 0.0, 0.0, 10.0], [0.0, 0.0, 0.0, -10.0]])
_MIRROR = torch.tensor([1.0, -1.0, 2.0, -2.0, 0.5, -0.5])
MIRRORS = [
    ("robust_pool huber", _XP, torch.tensor([3e5, 3e5]), lambda x, a: robust_pool(x, "huber", a)),
    ("robust_pool welsch", _XP, torch.tensor([3e5, 3e5]), lambda x, a: robust_pool(x, "welsch", a * 8)),
    ("robust_pool pseudo_huber", _XP, torch.tensor([3e5, 3e5]), lambda x, a: robust_pool(x, "pseudo_huber", a)),
    ("robust_vector_pool huber", _XP.unsqueeze(1).expand(2, 2, 4).contiguous(), torch.tensor([[3e5, 0], [3e5, 0]]),
     lambda x, a: robust_vector_pool(x, "huber", a)),
    ("linear_fit ridge", torch.stack([_MIRROR, -_MIRROR]).unsqueeze(0), torch.tensor([[3e5, 3e5]]),
     lambda x, r: linear_fit(x, torch.tensor([[3.0, -1.0, 5.0, -4.0, 2.0, 0.0]], dtype=x.dtype), ridge=r).coef),
]


@pytest.mark.parametrize("name,x,upstream,fn", MIRRORS, ids=[c[0] for c in MIRRORS])
def test_option_gradient_is_summed_before_it_is_rounded(name, x, upstream, fn):
    g, warned = _grad(fn, x.float(), torch.tensor(1.0, dtype=F16), upstream)
    ref, _ = _grad(fn, x.double(), torch.tensor(1.0, dtype=F64), upstream)
    assert abs(float(ref)) < 1e-6  # the closed form: 0
    assert g.dtype == F16 and float(g) == 0.0 and not warned


def test_robust_pool_float16_alpha_gradient_matches_float64():
    """Welsch over (2000, 7) rows, upstream 42000: 40320 (float64: 40311.7), was NaN."""
    x = torch.randn(2000, 7, generator=torch.Generator().manual_seed(0)) * 3
    up = torch.full((2000,), 42000.0)
    g, warned = _grad(lambda x, a: robust_pool(x, "welsch", a), x, torch.tensor(0.5, dtype=F16), up)
    ref, _ = _grad(lambda x, a: robust_pool(x, "welsch", a), x.double(), torch.tensor(0.5, dtype=F64), up)
    assert not warned
    torch.testing.assert_close(g.double(), ref, rtol=2e-3, atol=0.0)


# The option's exact gradient (float64: -1e5 to -1e9 here) beyond float16's range: Inf, as
# torch's cast gives it, and a GradientWarning naming the option (was silent).
_G = torch.Generator().manual_seed(0)
_X = torch.randn(400, 7, generator=_G) * 3
_UP = torch.linspace(1, 20, 7) * 4e4
OVERFLOWS = [
    ("robust_pool huber", "alpha", _X, _UP.mean(), lambda x, a: robust_pool(x, "huber", a)),
    ("robust_pool welsch", "alpha", _X, _UP.mean(), lambda x, a: robust_pool(x, "welsch", a)),
    ("robust_vector_pool huber", "alpha", _X.reshape(400, 7, 1).expand(400, 7, 2).transpose(1, 2).contiguous(),
     _UP.mean(), lambda x, a: robust_vector_pool(x, "huber", a)),
    ("project_lp L2 ball", "radius", _X, _UP, lambda x, r: project_lp(x, 2, "ball", r)),
    ("project_lp L2 sphere", "radius", _X, _UP, lambda x, r: project_lp(x, 2, "sphere", r)),
    ("project_lp L1 ball", "radius", _X, _UP, lambda x, r: project_lp(x, 1, "ball", r)),
    ("project_lp Linf ball", "radius", _X, _UP, lambda x, r: project_lp(x, "inf", "ball", r)),
    ("project_simplex", "z", _X, _UP, lambda x, z: project_simplex(x, z=z)),
    ("tv_denoise", "lam", _X, _UP, lambda x, lam: tv_denoise(x, lam)),
    ("least_squares", "ridge", torch.randn(400, 6, 2, generator=_G), torch.tensor(-4e5),
     lambda a, r: least_squares(a, torch.ones(6, dtype=a.dtype).expand(a.shape[0], 6), ridge=r)),
]


@pytest.mark.parametrize("name,option,x,upstream,fn", OVERFLOWS, ids=[c[0] for c in OVERFLOWS])
def test_option_gradient_beyond_its_dtype_warns(name, option, x, upstream, fn):
    ref, _ = _grad(fn, x.double(), torch.tensor(0.5, dtype=F64), upstream)
    assert 65504 < abs(float(ref)) < 1e30
    g, warned = _grad(fn, x, torch.tensor(0.5, dtype=F16), upstream)
    assert float(g) == float(ref.sign()) * float("inf")
    assert len(warned) == 1 and f"with respect to {option} at" in str(warned[0].message)
    assert "float16" in str(warned[0].message)


@pytest.mark.parametrize("name,option,x,upstream,fn", OVERFLOWS[:1] + OVERFLOWS[3:4], ids=["robust_pool", "project_lp"])
def test_option_gradient_within_its_dtype_is_not_warned(name, option, x, upstream, fn):
    up = upstream / 1e3
    ref, _ = _grad(fn, x.double(), torch.tensor(0.5, dtype=F64), up)
    g, warned = _grad(fn, x, torch.tensor(0.5, dtype=F16), up)
    assert not warned
    torch.testing.assert_close(g.double(), ref, rtol=2e-3, atol=0.0)


def test_option_tangent_goes_through_the_checked_cast():
    """Forward mode: a float16 alpha's tangent enters in the work dtype (the same value as
    float64's, to float32's rounding)."""
    import torch.autograd.forward_ad as fwAD
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    out = []
    for xd, ad in ((F32, F16), (F64, F64)):
        with fwAD.dual_level():
            a = fwAD.make_dual(torch.tensor(0.5, dtype=ad), torch.tensor(1.0, dtype=ad))
            out.append(fwAD.unpack_dual(robust_pool(x.to(xd), "huber", a)).tangent)
    torch.testing.assert_close(out[0].double(), out[1], rtol=1e-5, atol=1e-6)


# Float16 x, 60,000 rows of 8 (no zero entries): each row's term in the option's gradient is
# at most 2·‖x‖₁/‖x‖₂ ≤ 6, their sum 1.2e5 to 1.5e5, beyond float16's 65504. It was summed in
# float16 inside the kernels (or by autograd, the option cast to x's dtype first): +Inf, even
# for a float32 or float64 option, silently. References: closed forms in float64 (r = z = 1,
# upstream v = 2·sign(x), or 2 for the simplex): dr of ûᵀv (L2, rows outside the ball),
# sᵀv/|S| = 2 (L1, rows outside the ball), Σ sign(yᵢ)vᵢ over the pinned coordinates
# (|xᵢ| ≥ 1, and the pushed one of sphere rows inside: L∞), the support mean of v (simplex).
_G16 = torch.Generator().manual_seed(2)
_X16 = torch.randn(60000, 8, generator=_G16) * 3
_X16 = (_X16.sign() * (_X16.abs() + 0.25)).half()


def _float16_reference(kind: str) -> float:
    x = _X16.double()
    l1, l2, top = x.abs().sum(-1), x.norm(dim=-1), x.abs().amax(-1)
    out = {
        "L2 ball": (2 * l1 / l2)[l2 > 1].sum(),
        "L2 sphere": (2 * l1 / l2).sum(),
        "L1 ball": 2.0 * (l1 > 1).sum(),
        "L1 sphere": 2.0 * x.shape[0],
        "Linf ball": 2.0 * (x.abs() >= 1).sum(),
        "Linf sphere": 2.0 * ((x.abs() >= 1).sum() + (top < 1).sum()),
        "simplex": 2.0 * x.shape[0],
    }[kind]
    return float(out)


FLOAT16_ROWS = [(f"{name} {mode}", p, mode) for name, p in (("L2", 2), ("L1", 1), ("Linf", "inf"))
                for mode in ("ball", "sphere")] + [("simplex", None, None)]


@pytest.mark.parametrize("kind,p,mode", FLOAT16_ROWS, ids=[c[0] for c in FLOAT16_ROWS])
@pytest.mark.parametrize("dtype", [F16, F32, F64])
def test_float16_projection_option_gradient_is_summed_in_float32(kind, p, mode, dtype):
    if p is None:
        fn, up, name = (lambda x, z: project_simplex(x, z=z)), torch.full_like(_X16, 2), "z"
    else:
        fn, up, name = (lambda x, r: project_lp(x, p, mode, r)), 2 * _X16.sign(), "radius"
    ref = _float16_reference(kind)
    assert 65504 < ref < 1e6
    g, warned = _grad(fn, _X16, torch.tensor(1.0, dtype=dtype), up)
    assert g.dtype == dtype
    if dtype == F16:  # the true gradient does not fit the option's dtype: Inf, said
        assert float(g) == math.inf
        assert len(warned) == 1 and f"with respect to {name} at" in str(warned[0].message)
    else:
        assert not warned
        torch.testing.assert_close(g.double(), torch.tensor(ref, dtype=F64), rtol=2e-3, atol=0.0)


def test_option_rows_sums_in_the_option_dtype_where_wider():
    """A float64 option over float32 rows, each row's gradient 1e34 (float32), 60,000 rows:
    6e38 beyond float32's range, summed in float64 (was +Inf: the option cast to float32,
    then broadcast, summed in float32). Also through robust_pool's alpha (float64 reference)."""
    t = torch.tensor(2.0, dtype=F64, requires_grad=True)
    rows = option_rows("node", "alpha", t, F32, (60000,))
    assert rows.dtype == F32 and rows.shape == (60000,)
    (g,) = torch.autograd.grad(rows, t, torch.full((60000,), 1e34))
    torch.testing.assert_close(g, torch.tensor(6e38, dtype=F64), rtol=1e-6, atol=0.0)
    x = torch.randn(60000, 7, generator=torch.Generator().manual_seed(3)) * 3
    up = torch.full((60000,), 3e37)
    ref, _ = _grad(lambda x, a: robust_pool(x, "huber", a), x.double(), torch.tensor(0.5, dtype=F64), up)
    assert abs(float(ref)) > torch.finfo(F32).max
    g, warned = _grad(lambda x, a: robust_pool(x, "huber", a), x, torch.tensor(0.5, dtype=F64), up)
    assert not warned
    torch.testing.assert_close(g, ref, rtol=1e-4, atol=0.0)
