"""Tests of convexddn.nodes.least_squares: weighted ridge least squares and LS pooling.

Expected values come from the normal equations written out here, from
torch.linalg.lstsq (LAPACK), from consistent systems with a known solution, and from
finite differences (gradcheck).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from convexddn.errors import (
    DTypeError,
    GradientWarning,
    InputError,
    NonFiniteError,
    OptionError,
    ShapeError,
    SolverError,
    SolverWarning,
)
from convexddn.nodes.least_squares import least_squares
from convexddn.nodes.linear_fit import LeastSquares, LinearFit, WeightedLeastSquares, linear_fit

D = torch.float64


def rand(*shape, seed=0, dtype=D):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def normal_equations(A, b, w, rho):
    """(AᵀWA + diag ρ)⁻¹ AᵀWb, written out for b (*, M, K)."""
    Aw = A * w.unsqueeze(-1)
    H = Aw.mT @ A + torch.diag_embed(rho.expand(*A.shape[:-2], A.shape[-1]))
    return torch.linalg.solve(H, Aw.mT @ b)


def with_condition(cond, m=12, n=5, batch=3, seed=0):
    """A = U diag(s) Vᵀ with singular values log-spaced from 1 to 1/cond (float64)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(batch, m, n, generator=g, dtype=D)).Q
    V = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=D)).Q
    s = torch.logspace(0, -torch.log10(torch.tensor(float(cond))).item(), n, dtype=D)
    return U @ torch.diag(s) @ V.mT


# --------------------------------------------------------------------------- forward


def test_least_squares_matches_lstsq():
    A, b = rand(4, 9, 3), rand(4, 9, seed=1)
    x = least_squares(A, b)
    ref = torch.linalg.lstsq(A, b.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)
    torch.testing.assert_close(x, ref, atol=1e-12, rtol=1e-12)
    B = rand(4, 9, 2, seed=2)
    torch.testing.assert_close(least_squares(A, B), torch.linalg.lstsq(A, B, driver="gelsd").solution)


def test_least_squares_weighted_ridge_closed_form():
    A, b = rand(3, 8, 4), rand(3, 8, 2, seed=1)
    w = torch.rand(3, 8, generator=torch.Generator().manual_seed(2), dtype=D)
    for ridge, rho in ((0.3, torch.tensor([0.3], dtype=D)),
                       (torch.tensor([[0.1], [0.2], [0.5]], dtype=D), torch.tensor([[0.1], [0.2], [0.5]], dtype=D)),
                       (torch.tensor([0.0, 1.0, 2.0, 0.5], dtype=D), torch.tensor([0.0, 1.0, 2.0, 0.5], dtype=D))):
        x = least_squares(A, b, w, ridge)
        torch.testing.assert_close(x, normal_equations(A, b, w, rho), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("ridge", [1e8, 1e24, 1e40])
def test_least_squares_ridge_far_above_the_data_keeps_full_accuracy(ridge, exact_solve):
    # H = AᵀA + ρI has condition ~1, but the QR of [A; √ρ I] in that row order erred by
    # eps·√ρ/‖A‖ (4.6e-5 at 1e24; x = 0 from 1e34 on).
    g = torch.Generator().manual_seed(0)
    A, b = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    solve, normal_equations = exact_solve
    exact = solve(*normal_equations(A.tolist(), b.tolist(), ridge=ridge))
    x = least_squares(A, b, ridge=ridge)
    assert float((x - exact).norm() / exact.norm()) < 1e-14


def test_least_squares_heavy_weights_on_the_last_rows_keep_full_accuracy(exact_solve):
    # Weights 1e24 on the last rows: 3.3e-5 relative before the rows were sorted.
    g = torch.Generator().manual_seed(1)
    A, b = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    w = torch.tensor([1.0] * 6 + [1e24] * 2, dtype=torch.float64)
    solve, normal_equations = exact_solve
    exact = solve(*normal_equations(A.tolist(), b.tolist(), w.tolist()))
    x = least_squares(A, b, weights=w)
    assert float((x - exact).norm() / exact.norm()) < 1e-13


def test_least_squares_underdetermined_with_ridge():
    A, b = rand(2, 3, 6), rand(2, 3, seed=1)
    x = least_squares(A, b, ridge=0.5)
    ref = normal_equations(A, b.unsqueeze(-1), torch.ones(2, 3, dtype=D), torch.tensor([0.5], dtype=D))
    torch.testing.assert_close(x, ref.squeeze(-1), atol=1e-12, rtol=1e-10)


def test_least_squares_broadcast_shared_matrix():
    A, b = rand(1, 10, 3), rand(5, 10, seed=1)
    x = least_squares(A, b)
    assert x.shape == (5, 3)
    torch.testing.assert_close(x[2], least_squares(A[0], b[2]))
    assert least_squares(rand(0, 4, 2), rand(0, 4)).shape == (0, 2)


def test_least_squares_float32_ill_conditioned():
    # cond(A) = 1e6 in float32: solved in float64, so the answer is the float64 answer
    # of the same (float32-representable) data, and so are the gradients.
    A = with_condition(1e6).float()
    b = (A.double() @ rand(3, 5, seed=3).unsqueeze(-1)).squeeze(-1).float() + 1e-3 * rand(3, 12, seed=4, dtype=torch.float32)
    w = torch.rand(3, 12, generator=torch.Generator().manual_seed(5)) + 0.5
    ref = torch.linalg.lstsq((A.double() * w.double().sqrt().unsqueeze(-1)), (b.double() * w.double().sqrt()).unsqueeze(-1),
                             driver="gelsd").solution.squeeze(-1)
    x32 = least_squares(A, b, w)
    assert x32.dtype == torch.float32
    assert ((x32.double() - ref).norm() / ref.norm()) < 1e-6
    grads = []
    for dtype in (torch.float32, D):
        leaves = [t.to(dtype, copy=True).requires_grad_() for t in (A, b, w)]
        x = least_squares(*leaves)
        (x * torch.arange(1.0, 6.0, dtype=dtype)).sum().backward()
        grads.append([t.grad.double() for t in leaves])
    for g32, g64 in zip(*grads):
        assert ((g32 - g64).norm() / g64.norm()) < 1e-3


# --------------------------------------------------------------------------- backward


def test_least_squares_grad():
    A = rand(2, 7, 3).requires_grad_()
    b = rand(2, 7, seed=1).requires_grad_()
    B = rand(2, 7, 2, seed=2).requires_grad_()
    w = (torch.rand(2, 7, generator=torch.Generator().manual_seed(3), dtype=D) + 0.1).requires_grad_()
    r_row = torch.tensor([[0.2], [0.7]], dtype=D, requires_grad=True)
    r_coord = torch.tensor([0.1, 0.05, 0.4], dtype=D, requires_grad=True)
    r_scalar = torch.tensor(0.3, dtype=D, requires_grad=True)
    # fast_mode: finite differences along random directions (a few solves, not one per entry).
    def gc(fn, inputs):
        return torch.autograd.gradcheck(fn, inputs, fast_mode=True)

    assert gc(lambda A, b: least_squares(A, b), (A, b))
    assert gc(lambda A, b, w, r: least_squares(A, b, w, r), (A, b, w, r_row))
    assert gc(lambda A, B, w, r: least_squares(A, B, w, r), (A, B, w, r_coord))
    assert gc(lambda A, b, r: least_squares(A[:1], b, None, r), (A, b, r_scalar))


def test_least_squares_grad_closed_form():
    # x = A⁺b for full-rank A: d/db of gᵀx is A⁺ᵀ g (pinv written independently).
    A, b = rand(6, 3), rand(6, seed=1).requires_grad_()
    g = rand(3, seed=2)
    (least_squares(A, b) * g).sum().backward()
    torch.testing.assert_close(b.grad, torch.linalg.pinv(A).mT @ g, atol=1e-12, rtol=1e-10)


# --------------------------------------------------------------------------- linear_fit and modules


def test_linear_fit_matches_lstsq_with_intercept():
    x, t = rand(4, 3, 10), rand(10, seed=1)
    fit = linear_fit(x, t, ridge=0.0)
    A = torch.cat([x.mT, torch.ones(4, 10, 1, dtype=D)], -1)
    ref = torch.linalg.lstsq(A, t.expand(4, 10).unsqueeze(-1)).solution.squeeze(-1)
    torch.testing.assert_close(fit.coef, ref[:, :3])
    torch.testing.assert_close(fit.intercept, ref[:, 3])


def test_linear_fit_intercept_not_regularised():
    # A huge ridge drives the slope to 0; the intercept is then the weighted mean target.
    x, t = rand(2, 4, 9), rand(2, 9, seed=1)
    w = torch.rand(2, 9, generator=torch.Generator().manual_seed(2), dtype=D)
    fit = linear_fit(x, t, w, ridge=1e12)
    assert fit.coef.abs().max() < 1e-9
    torch.testing.assert_close(fit.intercept, (w * t).sum(-1) / w.sum(-1), atol=1e-9, rtol=0)
    nob = linear_fit(x, t, w, ridge=0.1, bias=False)
    assert bool((nob.intercept == 0).all())


def test_linear_fit_grad():
    x = rand(2, 3, 8).requires_grad_()
    t = torch.arange(8.0, dtype=D).requires_grad_()
    w = (torch.rand(2, 8, generator=torch.Generator().manual_seed(1), dtype=D) + 0.1).requires_grad_()
    rho = torch.tensor(0.2, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, t, w, r: tuple(linear_fit(x, t, w, r)), (x, t, w, rho), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x, t, r: tuple(linear_fit(x, t, None, r, bias=False)), (x, t, rho),
                                    fast_mode=True)


def test_least_squares_modules():
    x, t = rand(3, 4, 12), torch.linspace(0, 1, 12, dtype=D)
    m = LeastSquares(ridge=0.01)
    assert repr(m) == "LeastSquares(ridge=0.01, bias=True)"
    out = m(x, t)
    assert isinstance(out, LinearFit) and out.coef.shape == (3, 4) and out.intercept.shape == (3,)
    w = torch.rand(3, 12, dtype=D)
    wm = WeightedLeastSquares(ridge=torch.nn.Parameter(torch.tensor(0.05, dtype=D)))
    fit = wm(x, t, w)
    torch.testing.assert_close(fit.coef, linear_fit(x, t, w, 0.05).coef)
    fit.coef.sum().backward()
    assert wm.ridge.grad is not None and torch.isfinite(wm.ridge.grad)
    buf = LeastSquares(ridge=torch.tensor(0.1))
    assert "ridge" in dict(buf.named_buffers())


# --------------------------------------------------------------------------- errors


def test_least_squares_invalid():
    A, b = rand(2, 5, 3), rand(2, 5)
    with pytest.raises(DTypeError, match="A"):
        least_squares(torch.ones(5, 3, dtype=torch.int64), b[0])
    with pytest.raises(DTypeError, match="b must have A's dtype"):
        least_squares(A, b.float())
    with pytest.raises(ShapeError, match="b must have M=5"):
        least_squares(A, rand(2, 4))
    with pytest.raises(ShapeError, match=r"\(\*, M\) or \(\*, M, K\)"):
        least_squares(A, rand(5))
    with pytest.raises(ShapeError, match="weights"):
        least_squares(A, b, torch.ones(2, 4, dtype=D))
    with pytest.raises(ShapeError, match="do not broadcast"):
        least_squares(A, rand(3, 5))
    with pytest.raises(ShapeError, match="M >= N"):
        least_squares(rand(2, 3), rand(2))
    with pytest.raises(ShapeError, match="ridge"):
        least_squares(A, b, ridge=torch.ones(2, dtype=D))
    with pytest.raises(InputError, match="weights must be >= 0"):
        least_squares(A, b, -torch.ones(2, 5, dtype=D))
    with pytest.raises(InputError, match="ridge must be >= 0"):
        least_squares(A, b, ridge=torch.tensor([-1.0], dtype=D))
    for bad in (-1.0, float("inf"), "x", True):
        with pytest.raises(OptionError, match="ridge"):
            least_squares(A, b, ridge=bad)
    An = A.clone()
    An[0, 1, 1] = float("inf")
    with pytest.raises(NonFiniteError, match="A must be finite, got 0 NaN and 1 Inf"):
        least_squares(An, b)
    with pytest.raises(OptionError, match="ridge"):
        LeastSquares(ridge=-1.0)
    with pytest.raises(OptionError, match="bias"):
        LeastSquares(bias=None)
    with pytest.raises(ShapeError, match="target"):
        linear_fit(rand(2, 3, 8), rand(7))


def test_least_squares_checks_do_not_round_through_the_output_dtype():
    # A finite solution whose sum overflows the output dtype (float16: 300 entries of
    # 700, max 65504) was reported as "the solution overflowed"; closed form x = b[:3].
    A = torch.cat([torch.eye(3), torch.zeros(1, 3)]).expand(100, 4, 3).contiguous()
    b = torch.full((100, 4), 700.0)
    b[:, 3] = 0
    x = least_squares(A.half(), b.half())
    assert x.dtype == torch.float16 and bool((x == 700).all())
    # A float64 weight of -1e-300 with float32 data passed the sign test as float32 -0.0
    # and then overflowed the solve: the error is the weight's.
    w = torch.tensor([1, 1, 1, 1, 1, -1e-300], dtype=D)
    with pytest.raises(InputError, match="weights must be >= 0.*-1e-300"):
        least_squares(torch.randn(6, 3), torch.randn(6), w)


def test_least_squares_rank_deficient():
    A = rand(3, 6, 3)
    A[1, :, 2] = A[1, :, 0]  # element 1 is rank deficient
    with pytest.raises(SolverError, match=r"1 of 3 batch element\(s\).*\[\(1,\)\]") as info:
        least_squares(A, rand(3, 6))
    assert info.value.indices == [(1,)]
    least_squares(A, rand(3, 6), ridge=1e-3)  # regularised: fine


def test_least_squares_exactly_singular_is_reported_as_rank_deficient():
    # An exact zero on R's diagonal makes x non-finite: still "rank deficient", with the
    # element named (it was reported as an overflow, with no indices).
    A = rand(3, 6, 2)
    A[1, :, 1] = 0
    with pytest.raises(SolverError, match="rank deficient") as info:
        least_squares(A, rand(3, 6))
    assert info.value.indices == [(1,)]
    w = torch.tensor([1.0, 0, 0, 0, 0, 0], dtype=D)  # one row left for two unknowns
    with pytest.raises(SolverError, match="rank deficient"):
        least_squares(rand(6, 2), rand(6), w)


def test_least_squares_numeric_ridge_in_float64():
    # A numeric ridge is exact in the float64 solve: 1/3 as a float equals it as a float64
    # tensor (it was rounded to float32 first), and one beyond float32's range is fine.
    # Reference: the normal equations with A = [x^T, 1] and ridge (1/3, ..., 1/3, 0).
    x, t = rand(5, 10), rand(10, seed=1)
    A = torch.cat([x.mT, torch.ones(10, 1, dtype=D)], -1)
    rho = torch.tensor([1 / 3] * 5 + [0.0], dtype=D)
    exact = normal_equations(A, t.unsqueeze(-1), torch.ones(10, dtype=D), rho).squeeze(-1)
    torch.testing.assert_close(linear_fit(x, t, ridge=1 / 3).coef, exact[:5], rtol=1e-12, atol=1e-14)
    big = least_squares(rand(6, 2).float(), rand(6, seed=1).float(), ridge=1e39)
    assert big.dtype == torch.float32 and bool(torch.isfinite(big).all()) and float(big.abs().max()) < 1e-30


def test_least_squares_no_unknowns():
    assert least_squares(rand(2, 5, 0), rand(2, 5)).shape == (2, 0)
    # linear_fit without features: the intercept alone, the (weighted) mean target.
    t, w = rand(2, 5, seed=1), torch.rand(2, 5, dtype=D) + 0.1
    fit = linear_fit(rand(2, 0, 5), t, w)
    assert fit.coef.shape == (2, 0)
    torch.testing.assert_close(fit.intercept, (w * t).sum(-1) / w.sum(-1))


def test_least_squares_module_checks_tensor_ridge_when_built():
    with pytest.raises(OptionError, match="ridge must be >= 0"):
        LeastSquares(ridge=torch.tensor(-1.0))
    with pytest.raises(NonFiniteError, match="ridge"):
        WeightedLeastSquares(ridge=torch.tensor(float("nan")))
    with pytest.raises(OptionError, match="ridge"):
        linear_fit(rand(2, 3, 8), rand(8), ridge=float("inf"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_least_squares_cuda():
    A = rand(4, 9, 3).cuda().requires_grad_()
    b = rand(4, 9, seed=1).cuda().requires_grad_()
    w = torch.rand(4, 9, dtype=D).cuda().requires_grad_()
    x = least_squares(A, b, w, 0.1)
    assert x.is_cuda
    x.sum().backward()
    Ac, bc, wc = (t.detach().cpu().requires_grad_() for t in (A, b, w))
    least_squares(Ac, bc, wc, 0.1).sum().backward()
    torch.testing.assert_close(A.grad.cpu(), Ac.grad)
    torch.testing.assert_close(w.grad.cpu(), wc.grad)


def test_numpy_scalar_ridge_is_accepted():
    """ridge=np.float32(0.1) (or np.int64) was 'ridge must be a number >= 0 or a tensor':
    only np.float64 subclasses float. Reference: the normal equations in float64."""
    import numpy as np

    from convexddn.functional import least_squares

    A, b = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    for r in (np.float32(0.5), np.int64(1)):
        x = least_squares(A, b, ridge=r)
        ref = torch.linalg.solve(A.T @ A + float(r) * torch.eye(3, dtype=torch.float64), A.T @ b)
        torch.testing.assert_close(x, ref)


def test_linear_fit_refuses_tensors_on_another_device_naming_them(monkeypatch):
    """A target on another device than x (the docstring's CPU time index with CUDA
    features) raised least_squares' 'b must be on A's device', naming neither argument.
    No second device here: the meta device stands for it, with the meta check (which
    would refuse it first) passed over."""
    import sys

    lf = sys.modules["convexddn.nodes.linear_fit"]  # (the package's linear_fit is the function)
    monkeypatch.setattr(lf, "check_tensor", lambda name, value: value)
    x = rand(2, 3, 8)
    meta = torch.empty(8, dtype=D, device="meta")
    with pytest.raises(InputError, match=r"target must be on x's device cpu, got meta"):
        linear_fit(x, meta)
    with pytest.raises(InputError, match=r"weights must be on x's device cpu, got meta"):
        linear_fit(x, rand(8), torch.empty(2, 8, dtype=D, device="meta"))
    with pytest.raises(InputError, match=r"ridge must be on x's device cpu, got meta"):
        linear_fit(x, rand(8), None, torch.empty(2, dtype=D, device="meta"))


def test_linear_fit_casts_a_target_of_another_dtype():
    x = rand(3, 4, 10, dtype=torch.float32)
    t64 = torch.arange(10.0, dtype=D)
    fit = linear_fit(x, t64, ridge=1e-2)
    ref = linear_fit(x, t64.float(), ridge=1e-2)
    assert fit.coef.dtype == torch.float32
    torch.testing.assert_close(fit.coef, ref.coef)
    torch.testing.assert_close(fit.intercept, ref.intercept)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_linear_fit_cuda_target_on_cpu_is_refused_by_name():
    x = rand(2, 3, 10).cuda()
    with pytest.raises(InputError, match=r"target must be on x's device cuda:0, got cpu"):
        linear_fit(x, torch.arange(10.0))
    fit = linear_fit(x, torch.arange(10.0, device=x.device))
    torch.testing.assert_close(fit.coef.cpu(), linear_fit(x.cpu(), torch.arange(10.0)).coef)


def test_rank_test_is_invariant_to_column_scale():
    """The rank test compared |diag R| with eps times its largest entry: a unit intercept
    column beside features of 1e15 was refused as "rank deficient" (the problem with its
    columns rescaled has condition ~1). Reference: numpy's lstsq on the column-rescaled
    problem; a truly dependent (duplicated, rescaled) column is still refused."""
    import numpy as np

    x = torch.randn(2, 16, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.arange(20.0, dtype=torch.float64)
    for s in (1e15, 1e20):
        fit = linear_fit(x * s, t, ridge=1e-3)
        X = x[0].numpy().T
        M = np.r_[np.c_[X, np.ones(20)], np.c_[np.sqrt(1e-3) / s * np.eye(16), np.zeros(16)]]
        ref = np.linalg.lstsq(M, np.r_[t.numpy(), np.zeros(16)], rcond=None)[0]
        np.testing.assert_allclose(fit.intercept[0].item(), ref[-1], rtol=1e-10)
        np.testing.assert_allclose(fit.coef[0].numpy() * s, ref[:16], rtol=0, atol=1e-10 * np.abs(ref).max())
    A = torch.randn(3, 10, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    A = torch.cat([A, 1e15 * A[..., :1]], -1)  # column 2 = 1e15 × column 0
    with pytest.raises(SolverError, match="rank deficient"):
        least_squares(A, torch.randn(3, 10, dtype=torch.float64))


def _scaled_solve(A, b, w, gx, tangents):
    """x, the gradients of gx·x w.r.t. (A, b, w) and the jvp along ``tangents`` (A, b)."""
    leaves = [t.clone().requires_grad_(True) for t in (A, b, w)]
    x = least_squares(*leaves)
    with warnings.catch_warnings():  # (finite gradients: nothing to warn about)
        warnings.simplefilter("error", GradientWarning)
        grads = torch.autograd.grad(x, leaves, gx)
    _, dx = torch.func.jvp(lambda A, b: least_squares(A, b, w), (A, b), tangents)
    return x.detach(), grads, dx


@pytest.mark.parametrize("sa, sw", [(1e-170, 1.0), (1e-160, 1.0), (1e150, 1.0), (1e154, 1.0), (1e200, 1.0),
                                    (1e100, 1e200), (1e-100, 1e-150)])
def test_least_squares_is_invariant_to_the_scale_of_the_problem(sa, sw):
    """cond(A) ~ 2, and x(s_a A, s_a b, s_w w) = x: the column norms of the factor were
    sums of squares, Inf beyond ~1e154 and 0 below ~1e-162 (of √w·A), and the rank test
    refused the problem as "rank deficient"; the backward's H⁻¹g (~1/s²) and the jvp's
    right-hand side (~s²) left float64's range where the gradients do not. Expected:
    torch.linalg.lstsq of the unscaled problem; the gradients of the unscaled problem
    times the scale's power (A, b: 1/s_a; w: 1/s_w), the jvp along (s_a dA, s_a db)
    that of the unscaled problem along (dA, db)."""
    A, b = rand(2, 6, 3), rand(2, 6, seed=1)
    w = torch.rand(2, 6, generator=torch.Generator().manual_seed(2), dtype=D) + 0.5
    gx, dA, db = rand(2, 3, seed=3), rand(2, 6, 3, seed=4), rand(2, 6, seed=5)
    sqw = w.sqrt().unsqueeze(-1)
    ref = torch.linalg.lstsq(sqw * A, sqw * b.unsqueeze(-1)).solution.squeeze(-1)
    x0, g0, dx0 = _scaled_solve(A, b, w, gx, (dA, db))
    x, g, dx = _scaled_solve(A * sa, b * sa, w * sw, gx, (dA * sa, db * sa))
    torch.testing.assert_close(x, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(dx, dx0, rtol=1e-12, atol=1e-12 * dx0.abs().max().item())
    for got, want, s in zip(g, g0, (sa, sa, sw)):
        torch.testing.assert_close(got * s, want, rtol=1e-10, atol=1e-12 * want.abs().max().item())


@pytest.mark.parametrize("s", [1e20, 1e-25])
def test_least_squares_float32_beyond_the_range_of_its_squares(s):
    """float32 entries of 1e20 (squares 1e40 > 3.4e38) or 1e-25 (squares below float32's
    smallest number): the solve runs in float64, so x and the gradients scale as the
    float64 problem's do. Expected: the unscaled float64 problem, times 1/s for the
    gradients."""
    A, b = rand(6, 3), rand(6, seed=1)
    gx = rand(3, seed=2)
    x0, g0, _ = _scaled_solve(A, b, torch.ones(6, dtype=D), gx, (A, b))
    A32, b32 = (A * s).float().requires_grad_(True), (b * s).float().requires_grad_(True)
    x = least_squares(A32, b32)
    gA, gb = torch.autograd.grad(x, (A32, b32), gx.float())
    torch.testing.assert_close(x.double(), x0, rtol=1e-5, atol=0)
    for got, want in zip((gA, gb), g0[:2]):
        torch.testing.assert_close(got.double() * s, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


# --------------------------------------------------------------------------- gradient range


def _tiny_float32(batch=4, seed=0):
    """float32 A ~ 1e-20: x ~ 1e20 and H⁻¹ ~ 1e40, so dA ~ 1e40, beyond float32's 3.4e38."""
    A = (rand(batch, 10, 3, seed=seed) * 1e-20).float().requires_grad_(True)
    b = rand(batch, 10, seed=seed + 1).float().requires_grad_(True)
    return A, b


@pytest.mark.parametrize("extra", ["none", "weights", "ridge"])
def test_least_squares_grad_overflow_warns(extra):
    """Finite inputs, finite forward, finite incoming gradient: the gradient holds Inf
    because the true one exceeds float32's range; that is said, never silent."""
    A, b = _tiny_float32()
    kwargs = {}
    if extra == "weights":
        kwargs["weights"] = torch.rand(4, 10, generator=torch.Generator().manual_seed(2)) + 0.5
    if extra == "ridge":  # dρ = -v∘x ~ 1e40·1e20: only the ridge's gradient overflows
        A = (rand(4, 10, 3) * 1e-15).float().requires_grad_(True)
        kwargs["ridge"] = torch.full((4, 1), 1e-30, requires_grad=True)
    x = least_squares(A, b, **kwargs)
    assert torch.isfinite(x).all()
    inputs = [A, b] + ([kwargs["ridge"]] if extra == "ridge" else [])
    with pytest.warns(GradientWarning, match=r"exceeds the range of torch.float32.*float64"):
        grads = torch.autograd.grad(x.sum(), inputs)
    assert not all(torch.isfinite(g).all() for g in grads)  # the case is the one described


def test_least_squares_grad_overflow_names_batch_elements():
    """Only element 2 has a tiny A; elements 0, 1, 3 are ordinary."""
    A = rand(4, 10, 3).float()
    A[2] *= 1e-20
    A.requires_grad_(True)
    b = rand(4, 10, seed=1).float()
    x = least_squares(A, b)
    with pytest.warns(GradientWarning, match=r"respect to A at 1 of 4 batch element\(s\) \(indices \[\(2,\)\]\)"):
        torch.autograd.grad(x.sum(), A)


def test_least_squares_warnings_name_the_batch_index():
    """The overflow and inaccuracy warnings named the element by its flat position ("flat
    indices [5]" for (1, 2) of a (2, 3) batch), which the caller cannot index with; they name
    (1, 2). Overflow: a float32 A ~ 1e-20 at (1, 2) only (dA ~ 1e40), in reverse and forward
    mode; inaccuracy: two equal columns at (1, 2) with ridge 1e-28 (float64)."""
    named = r"1 of 6 batch element\(s\) \(indices \[\(1, 2\)\]\)"
    A = rand(6, 10, 3).float().reshape(2, 3, 10, 3)
    A[1, 2] *= 1e-20
    b = rand(6, 10, seed=1).float().reshape(2, 3, 10)
    with pytest.warns(GradientWarning, match="respect to A at " + named):
        torch.autograd.grad(least_squares(A.requires_grad_(), b).sum(), A)
    with pytest.warns(GradientWarning, match="forward mode.* at " + named):
        torch.func.jvp(lambda a: least_squares(a, b), (A.detach(),), (torch.ones_like(A),))
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(2, 3, 8, 4, dtype=D, generator=gen)
    A[1, 2, :, 3] = A[1, 2, :, 0]
    with pytest.warns(SolverWarning, match="x may be inaccurate for " + named):
        least_squares(A, torch.randn(2, 3, 8, dtype=D, generator=gen), ridge=1e-28)


def test_least_squares_grad_overflow_skips_elements_with_non_finite_incoming_gradient():
    """A NaN coming in at element 1 is the caller's, not an overflow: it is left out."""
    A, b = _tiny_float32()
    x = least_squares(A, b)
    g = torch.ones_like(x)
    g[1, 0] = float("nan")
    with pytest.warns(GradientWarning, match=r"3 of 4 batch element\(s\) \(indices \[\(0,\), \(2,\), \(3,\)\]\)"):
        torch.autograd.grad(x, A, g)


def test_least_squares_grad_float32_silent():
    """An ordinary float32 problem (weights and a tensor ridge too): no warning."""
    A, b = rand(4, 10, 3).float().requires_grad_(True), rand(4, 10, seed=1).float().requires_grad_(True)
    w = (torch.rand(4, 10, generator=torch.Generator().manual_seed(2)) + 0.5).requires_grad_(True)
    rho = torch.full((4, 1), 0.1, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads = torch.autograd.grad(least_squares(A, b, w, rho).sum(), [A, b, w, rho])
    assert all(torch.isfinite(g).all() for g in grads)


def test_least_squares_inference_mode_data_with_learned_argument():
    """A and b made under torch.inference_mode() (a frozen extractor), b or the weights
    learned: torch's "Inference tensors cannot be saved for backward" (pnp, linear_fit
    and the pools took the same call). Closed forms (normal equations in float64): for
    loss sum(x), grad b = A (AᵀA)⁻¹ 1; grad w by a central difference of the closed form."""
    with torch.inference_mode():
        A, b0 = rand(4, 9, 3), rand(4, 9, seed=1)
    b = rand(4, 9, seed=2).requires_grad_(True)
    x = least_squares(A, b)
    H = A.mT @ A
    torch.testing.assert_close(x.detach(), torch.linalg.solve(H, (A.mT @ b.detach().unsqueeze(-1))).squeeze(-1))
    (gb,) = torch.autograd.grad(x.sum(), b)
    ones = torch.ones(4, 3, 1, dtype=D)
    torch.testing.assert_close(gb, (A @ torch.linalg.solve(H, ones)).squeeze(-1), rtol=1e-10, atol=1e-12)

    def closed(w):
        Aw = A * w.unsqueeze(-1)
        return torch.linalg.solve(Aw.mT @ A, Aw.mT @ b0.unsqueeze(-1)).squeeze(-1)

    w = (torch.rand(4, 9, generator=torch.Generator().manual_seed(3), dtype=D) + 0.5).requires_grad_(True)
    (gw,) = torch.autograd.grad(least_squares(A, b0, w).sum(), w)
    h, fd = 1e-6, torch.zeros_like(gw)
    for i in range(9):
        e = torch.zeros(9, dtype=D)
        e[i] = h
        fd[:, i] = (closed(w.detach() + e).sum(-1) - closed(w.detach() - e).sum(-1)) / (2 * h)
    torch.testing.assert_close(gw, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_least_squares_backward_reads_nothing_unless_its_gain_is_extreme(dtype, host_reads):
    """The overflow check (a host read, a sync on CUDA) runs only where the forward's
    gain estimate says a gradient can leave the dtype's range; it had run on every
    backward (1.06-1.14× at small sizes). Tiny A still warns (the tests above)."""
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(4, 10, 3, dtype=dtype, generator=gen).requires_grad_(True)
    b = torch.randn(4, 10, dtype=dtype, generator=gen).requires_grad_(True)
    y = least_squares(A, b, ridge=0.1)
    with host_reads.counting():
        torch.autograd.grad(y, [A, b], torch.ones_like(y))
    assert host_reads.count == 0


# --------------------------------------------------------------------------- forward mode


@pytest.mark.parametrize("case", ["vector", "matrix_b_broadcast"])
def test_least_squares_jvp_matches_finite_differences(case):
    # Forward mode through torch.func.jvp: torch's geqrf/ormqr have no forward
    # derivative, so this exercises the Function's own jvp (the derivative of the normal
    # equations), with tangents in A, b, the weights and the ridge at once.
    from convexddn.functional import least_squares

    gen = torch.Generator().manual_seed(3)
    if case == "vector":
        A = torch.randn(2, 8, 3, dtype=torch.float64, generator=gen)
        b = torch.randn(2, 8, dtype=torch.float64, generator=gen)
    else:  # one shared A broadcast over a batch of matrix right-hand sides
        A = torch.randn(1, 7, 4, dtype=torch.float64, generator=gen)
        b = torch.randn(3, 7, 2, dtype=torch.float64, generator=gen)
    w = torch.rand(A.shape[:-1], dtype=torch.float64, generator=gen) + 0.5
    rd = torch.rand(A.shape[:-2] + A.shape[-1:], dtype=torch.float64, generator=gen) + 0.1
    primals = (A, b, w, rd)
    tangents = tuple(torch.randn(t.shape, dtype=t.dtype, generator=gen) for t in primals)

    def f(A, b, w, rd):
        return least_squares(A, b, weights=w, ridge=rd)

    _, t = torch.func.jvp(f, primals, tangents)
    h = 1e-6
    plus = f(*(p + h * d for p, d in zip(primals, tangents)))
    minus = f(*(p - h * d for p, d in zip(primals, tangents)))
    fd = (plus - minus) / (2 * h)
    assert t.shape == fd.shape
    torch.testing.assert_close(t, fd, rtol=1e-7, atol=1e-8)


def test_linear_fit_forward_ad_dual_tensors():
    # The dual-tensor API (torch.autograd.forward_ad) on linear_fit, which solves through
    # least_squares: coefficients and intercept against central differences.
    import torch.autograd.forward_ad as fwAD

    from convexddn.functional import linear_fit

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 9, dtype=torch.float64, generator=gen)
    y = torch.randn(2, 9, dtype=torch.float64, generator=gen)
    dx = torch.randn(x.shape, dtype=x.dtype, generator=gen)
    with fwAD.dual_level():
        out = linear_fit(fwAD.make_dual(x, dx), y)
        tangents = [fwAD.unpack_dual(v).tangent for v in out]
    h = 1e-6
    for t, p, m in zip(tangents, linear_fit(x + h * dx, y), linear_fit(x - h * dx, y)):
        torch.testing.assert_close(t, (p - m) / (2 * h), rtol=1e-7, atol=1e-8)


def test_least_squares_no_rows_with_ridge_is_zero():
    # M = 0 with a ridge: the minimiser of ½ρ‖x‖² is 0, and its gradients exist (A, b
    # are empty; ridge's gradient −v·x is 0). It raised IndexError (amax of an empty b).
    A = torch.zeros(2, 0, 3, dtype=D, requires_grad=True)
    b = torch.zeros(2, 0, dtype=D, requires_grad=True)
    ridge = torch.full((2, 3), 0.5, dtype=D, requires_grad=True)
    x = least_squares(A, b, ridge=ridge)
    assert x.shape == (2, 3) and torch.equal(x, torch.zeros_like(x))
    x.sum().backward()
    assert torch.equal(ridge.grad, torch.zeros_like(ridge))


def test_a_singular_matrix_whose_unpivoted_factor_hides_it_is_refused():
    """Kahan's matrix with its smallest singular value set to 0 (σ_min/σ_max = 5e-20 by
    numpy's SVD, numerical rank 59 of 60): the unpivoted QR's smallest diagonal ratio is
    2.3e-12, above the n·eps test, and an x of norm 2e19 came back (the minimum-norm
    solution's is 118) without an error."""
    n, th = 60, 1.2
    K = torch.diag(math.sin(th) ** torch.arange(n, dtype=torch.float64)) @ (
        torch.triu(-math.cos(th) * torch.ones(n, n, dtype=torch.float64), 1) + torch.eye(n, dtype=torch.float64))
    U, S, Vh = torch.linalg.svd(K)
    S[-1] = 0.0
    A = (U * S) @ Vh
    s = torch.linalg.svdvals(A)
    assert float(s[-1] / s[0]) < 1e-15  # (the reference: singular to float64 precision)
    with pytest.raises(SolverError, match="rank deficient"):
        least_squares(A, torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))


def _exact_weighted(A, b, w, g):
    """x, and the gradients b̄ = W A v, Ā = W (r vᵀ − A v xᵀ) (v = H⁻¹ g, r = b − A x), in
    exact rational arithmetic from integer data (Gauss–Jordan on H = AᵀWA)."""
    from fractions import Fraction as Q

    M, N = len(A), len(A[0])

    def solve(H, rhs):
        aug = [[Q(v) for v in row] + [Q(r)] for row, r in zip(H, rhs)]
        for i in range(N):
            p = next(k for k in range(i, N) if aug[k][i] != 0)
            aug[i], aug[p] = aug[p], aug[i]
            for k in range(N):
                if k != i and aug[k][i] != 0:
                    f = aug[k][i] / aug[i][i]
                    aug[k] = [a - f * c for a, c in zip(aug[k], aug[i])]
        return [aug[i][N] / aug[i][i] for i in range(N)]

    H = [[sum(Q(w[m]) * A[m][i] * A[m][j] for m in range(M)) for j in range(N)] for i in range(N)]
    x = solve(H, [sum(Q(w[m]) * A[m][i] * b[m] for m in range(M)) for i in range(N)])
    v = solve(H, g)
    Av = [sum(Q(A[m][i]) * v[i] for i in range(N)) for m in range(M)]
    r = [b[m] - sum(Q(A[m][i]) * x[i] for i in range(N)) for m in range(M)]
    gb = [w[m] * Av[m] for m in range(M)]
    gA = [[w[m] * (r[m] * v[i] - Av[m] * x[i]) for i in range(N)] for m in range(M)]
    return x, gb, gA


@pytest.mark.parametrize("heavy", [1e12, 1e20, 1e30])
def test_gradients_with_a_heavy_row_weight_are_exact(heavy):
    # A weight far above the rest: (A v)_m and r_m are ~1/w_m there and, formed directly,
    # carried an error of eps times w_m into W A v (dL/db 100 % off at 1e16, 1e13-fold at
    # 1e30). Through Q they are exact to rounding; the forward was already.
    gen = torch.Generator().manual_seed(3)
    A = torch.randint(-5, 6, (8, 3), generator=gen).to(D)
    b = torch.randint(-5, 6, (8,), generator=gen).to(D)
    g = torch.tensor([1.0, -2.0, 3.0], dtype=D)
    w = torch.ones(8, dtype=D)
    w[2] = heavy
    x_ex, gb_ex, gA_ex = _exact_weighted(A.long().tolist(), b.long().tolist(), [int(v) for v in w.tolist()],
                                         g.long().tolist())
    A_, b_ = A.clone().requires_grad_(), b.clone().requires_grad_()
    x = least_squares(A_, b_, w)
    gA, gb = torch.autograd.grad(x, (A_, b_), g)
    for got, exact in ((x, x_ex), (gb, gb_ex), (gA, gA_ex)):
        ref = torch.tensor([[float(v) for v in row] for row in exact] if isinstance(exact[0], list)
                           else [float(v) for v in exact], dtype=D)
        assert (got.detach() - ref).abs().max() <= 1e-13 * ref.abs().max()
    # Forward mode along b: x is linear in b, so the difference quotient is exact.
    t = torch.randn(8, dtype=D, generator=gen)
    _, jv = torch.func.jvp(lambda bb: least_squares(A, bb, w), (b,), (t,))
    ref = (least_squares(A, b + t, w) - least_squares(A, b - t, w)) / 2
    assert (jv - ref).abs().max() <= 1e-13 * ref.abs().max()


def test_an_ill_conditioned_problem_warns_and_a_well_conditioned_one_does_not():
    # Two equal columns and a ridge of 1e-28: H is singular to float64 precision (κ(H)
    # ~1e29) but R passed the singularity test, and x came back off by 1e11 relative,
    # silently. Least squares is that sensitive (eps·κ(1 + κ tan θ)): now said.
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(8, 3, dtype=D, generator=gen)
    A = torch.cat([A, A[:, :1]], 1)
    b = torch.randn(8, dtype=D, generator=gen)
    with pytest.warns(SolverWarning, match=r"x may be inaccurate for 1 of 1 batch element"):
        least_squares(A, b, ridge=1e-28)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dtype in (torch.float32, D):
            least_squares(torch.randn(64, 40, 12, generator=gen).to(dtype), torch.randn(64, 40, generator=gen).to(dtype))
        # a row weighted 1e20 above the rest: κ of the weighted design ~1e10, x exact (sorted rows)
        w = torch.ones(8, dtype=D)
        w[2] = 1e20
        least_squares(A[:, :3], b, w)


def test_a_kahan_design_whose_float32_gradient_overflows_warns():
    # min R_ii² overstates σ_min² by 2e8 for a Kahan-type design (condition 4.5e5): the
    # gain said the backward could not overflow, and dA came back with 24 Inf, silently.
    n, c = 40, 0.3
    K = torch.diag(math.sqrt(1 - c * c) ** torch.arange(n, dtype=D)) @ (torch.eye(n, dtype=D) - c * torch.ones(n, n, dtype=D).triu(1))
    A = torch.cat([K * 1e-15, torch.zeros(4, n, dtype=D)]).float().requires_grad_()
    b = torch.cat([torch.zeros(n), torch.ones(4)])  # orthogonal to the range: x = 0
    x = least_squares(A, b)
    g = torch.randn(n, generator=torch.Generator().manual_seed(0))
    with pytest.warns(GradientWarning, match="gradient with respect to A"):
        (gA,) = torch.autograd.grad(x, A, g)
    assert not torch.isfinite(gA).all()  # the true max |dA|, 1.35e39, is beyond float32


def test_float16_weights_beside_float32_data_warn_where_their_gradient_overflows():
    # The overflow gate was judged on A's dtype (float32), the weights' gradient returned in float16.
    torch.manual_seed(0)
    A, b = torch.randn(20, 3), torch.randn(20) * 1e5
    w = torch.rand(20).half().requires_grad_()
    x = least_squares(A, b, w)
    with pytest.warns(GradientWarning, match="gradient with respect to weights"):
        torch.autograd.grad(x.sum(), w)


def test_linear_fit_errors_name_its_own_arguments():
    # least_squares' messages named its internal A and b (x transposed, a ones column):
    # a NaN in x read "A must be finite ... (shape (2, 6, 4))", and all-zero weights with a
    # ridge advised "pass ridge > 0", which cannot help the unregularised intercept.
    x, t = torch.randn(2, 3, 6), torch.arange(6.0)
    xn = x.clone()
    xn[0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"x must be finite, got 1 NaN .* \(shape \(2, 3, 6\)\)"):
        linear_fit(xn, t)
    with pytest.raises(NonFiniteError, match=r"target must be finite.* \(shape \(6,\)\)"):
        linear_fit(x, torch.full((6,), float("nan")))
    with pytest.raises(ShapeError, match=r"linear_fit needs at least C \+ 1 = 7 vectors .* \(2, 6, 4\)"):
        linear_fit(torch.randn(2, 6, 4), torch.arange(4.0), None, 0.0)
    with pytest.raises(SolverError, match="weights are all zero .* no ridge helps") as err:
        linear_fit(x, t, torch.zeros(2, 6), 10.0)
    assert err.value.indices == [(0,), (1,)]


def test_linear_fit_keeps_a_float64_ridge_beside_float32_features():
    # The tensor ridge was cast to x's dtype: a float64 ridge of 1e39 became Inf in float32
    # and was refused as not finite; least_squares takes it as it is.
    x, t = torch.randn(2, 3, 6), torch.arange(6.0)
    fit = linear_fit(x, t, ridge=torch.full((2,), 1e39, dtype=D))
    assert torch.isfinite(fit.coef).all() and fit.coef.abs().max() < 1e-30


def test_an_overflowing_solution_names_its_batch_elements():
    # SolverError documents indices of the failing elements; the overflow error had none.
    torch.manual_seed(0)
    A, b = torch.randn(4, 5, 2), torch.randn(4, 5)
    A[2] *= 1e-30
    b[2] *= 1e30  # x ~ 1e60, beyond float32
    with pytest.raises(SolverError, match=r"overflowed .*indices \[\(2,\)\]") as err:
        least_squares(A, b)
    assert err.value.indices == [(2,)]


def test_a_forward_mode_tangent_beyond_float32_warns():
    # The reverse mode warned where its gradient overflowed; the jvp returned Inf silently
    # (float32 A ~ 1e-20: the true tangent, 2.6e39, is beyond float32).
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    A, b = torch.randn(6, 3) * 1e-20, torch.randn(6)
    tA = torch.zeros(6, 3)
    tA[0, 0] = 1.0
    with pytest.warns(GradientWarning, match=r"least_squares \(forward mode\)"):
        with fwAD.dual_level():
            fwAD.unpack_dual(least_squares(fwAD.make_dual(A, tA), b))
    with warnings.catch_warnings():  # an ordinary one: no warning
        warnings.simplefilter("error")
        with fwAD.dual_level():
            t = fwAD.unpack_dual(least_squares(fwAD.make_dual(torch.randn(6, 3), tA), b)).tangent
    assert torch.isfinite(t).all()


def test_zero_weight_or_zero_row_keeps_the_accuracy_warning():
    # Two nearly equal columns (κ ~ 1e14): the call warns. A zero weight or an all-zero
    # row (nothing added to the problem) counted as a "graded" design, whose estimate is
    # skipped: 39 % off without a warning. It must warn as the problem without that row.
    g = torch.Generator().manual_seed(5)
    A = torch.randn(12, 3, generator=g, dtype=torch.float64)
    A[:, 2] = A[:, 1] + 1e-14 * torch.randn(12, generator=g, dtype=torch.float64)
    b = torch.randn(12, generator=g, dtype=torch.float64)
    w = torch.ones(12, dtype=torch.float64)
    w[0] = 0.0
    A0 = A.clone()
    A0[0] = 0.0
    for kwargs in ({"weights": w}, {}):
        with pytest.warns(SolverWarning, match="least_squares"):
            least_squares(A if kwargs else A0, b, **kwargs)


def test_no_right_hand_sides():
    # b of shape (…, M, 0): an empty x as torch.linalg.lstsq gives (a raw IndexError before).
    A = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)
    x = least_squares(A, torch.zeros(3, 5, 0, dtype=torch.float64))
    assert x.shape == (3, 2, 0)
    x.sum().backward()
    assert torch.equal(A.grad, torch.zeros_like(A))


def test_linear_fit_all_zero_weights_with_a_tensor_ridge():
    # A tensor (or NumPy) ridge > 0 got least_squares' advice "pass ridge > 0": linear_fit
    # says the intercept is undetermined, whatever the ridge's type.
    x, t = torch.randn(2, 3, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    for ridge in (torch.tensor(1e-3, dtype=torch.float64), np.float32(1e-3)):
        with pytest.raises(SolverError, match="weights are all zero .* no ridge helps"):
            linear_fit(x, t, weights=torch.zeros(2, 6, dtype=torch.float64), ridge=ridge)


def _nearly_parallel_design():
    # Six rows, the second column -1.664 times the first up to 1e-13: κ ~1e13.
    g = torch.Generator().manual_seed(0)
    u = torch.randn(6, generator=g, dtype=D)
    A = torch.stack([u, -1.664 * u * (1 + 1e-13 * torch.randn(6, generator=g, dtype=D))], -1)
    A[:, 1] += 1e-13 * torch.randn(6, generator=g, dtype=D)
    b = A @ torch.tensor([4.2e7, 2.5e7], dtype=D) + 1e-3 * torch.randn(6, generator=g, dtype=D)
    return A, b


@pytest.mark.parametrize("case", ["a light row", "a heavy row and a ridge"])
def test_graded_rows_keep_the_accuracy_warning_where_columns_are_nearly_dependent(case, exact_solve):
    # Rows over 1024× apart are sorted, and their estimate was switched off (κ overstates
    # what only the row scales do). But sorted QR is stable row by row only: nearly
    # dependent columns still cost κ's digits. One row 1e-4 times the rest appended to the
    # design above: x ~1e-3 off, silently; rows all nearly parallel, one 1.6e7 times the
    # rest, ridge 1.4e-13: 2.6 % off, silently.
    if case == "a light row":
        A, b = _nearly_parallel_design()
        A, b, ridge = torch.cat([A, 0.9e-4 * A[:1]]), torch.cat([b, 1e-4 * b[:1]]), 0.0
    else:
        A = torch.tensor([[16084567.230692301, -1562462.8581052257], [0.3440707284705858, -0.033423201637073865],
                          [0.6733452341406669, -0.0654090908345613], [0.6268988226967864, -0.060897263333547905]],
                         dtype=D)
        b = torch.tensor([-196.69478910124124, -209.07592112364858, 253.17716454967498, 115.2249668471303], dtype=D)
        ridge = 1.4203211378916627e-13
    solve, normal_equations = exact_solve
    exact = solve(*normal_equations(A.tolist(), b.tolist(), ridge=ridge))
    with pytest.warns(SolverWarning, match=r"x may be inaccurate for 1 of 1 batch element"):
        x = least_squares(A, b, ridge=ridge)
    assert float((x - exact).abs().max() / exact.abs().max()) > 1e-5  # (the warning is due)


def test_graded_rows_with_well_determined_columns_stay_silent_and_exact(exact_solve):
    # The converse: rows 1e-4 or 1e10 (a weight of 1e20) times the rest, columns well
    # determined row by row: the normwise κ ~1e10 would call them inaccurate; they are exact.
    g = torch.Generator().manual_seed(2)
    A, b = torch.randn(8, 3, generator=g, dtype=D), torch.randn(8, generator=g, dtype=D)
    solve, normal_equations = exact_solve
    for w, scale in ((torch.tensor([1.0] * 2 + [1e20] + [1.0] * 5, dtype=D), None), (None, 1e-4)):
        AA, bb = (A, b) if scale is None else (torch.cat([A, scale * A[:1]]), torch.cat([b, scale * b[:1]]))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            x = least_squares(AA, bb, w)
        exact = solve(*normal_equations(AA.tolist(), bb.tolist(), None if w is None else w.tolist()))
        assert float((x - exact).abs().max() / exact.abs().max()) < 1e-13


def test_graded_rows_warn_where_the_unpivoted_factor_is_not_stable_row_by_row(exact_solve):
    # Sorted rows make Householder QR stable row by row only with column pivoting too (Cox
    # & Higham), which geqrf lacks: columns 0 and 1 equal to ~2e-13 leave a pivot of 7e-7
    # before one of 9e4, and x came out 1.6e-5 off while the row-wise estimate said 2.8e-14,
    # silently. (A row-sorted, column-pivoted QR gets 2e-15.)
    A = torch.tensor([[-1.6212133821796382, -1.6212133821799681, -1.936465810165677, 0.4455440879385614,
                       -0.9931720164626999],
                      [1.7260815817568498, 1.726081581755227, 0.8584564409854354, -0.6825613444795653,
                       1.499831435855922],
                      [1.278960070295762, 1.2789600702970023, 0.17507081530356994, 0.42389048400778434,
                       0.3666717709975949],
                      [-0.34482807774479834, -0.34482807774599755, 1.1874496694577081, -1.1108658188675227,
                       -0.05950182029500596],
                      [-0.5892631140796216, -0.5892631140769508, -0.46985621794370336, 1.9022307886175074,
                       -1.7072894528587799]], dtype=D)
    b = torch.tensor([3.0218091829410256, -2.409810480541574, -2.141638597848091, 0.31658387348937156,
                      -0.07266461744708608], dtype=D)
    w = torch.tensor([3830403867.8188066, 152623151519.63568, 121176512182.75479, 3.797579849225966e-06,
                      1.1232074944534307], dtype=D)
    solve, normal_equations = exact_solve
    exact = solve(*normal_equations(A.tolist(), b.tolist(), w.tolist(), ridge=1e-14))
    with pytest.warns(SolverWarning, match=r"x may be inaccurate for 1 of 1 batch element"):
        x = least_squares(A, b, w, 1e-14)
    assert float((x - exact).norm() / exact.norm()) > 1e-6  # (the warning is due)


@pytest.mark.parametrize("s", [2.0**27, 2.0**30, 2.0**40])
def test_an_invertible_square_system_with_graded_rows_is_solved_not_refused(s, exact_solve):
    # Rows s, 1, 1/s of a well-conditioned 3×3 grade the column-scaled factor's diagonal
    # (1, 1/s, 1/s²) without the matrix being singular row by row: from s ~1e8 on it was
    # refused as rank deficient (torch.linalg.solve gets x to 1e-16). Powers of two: the
    # scaled rows, and the weights s², are exact, so x is A0⁻¹ b.
    A0 = torch.tensor([[1.0, 2.0, 0.5], [-0.3, 1.0, 2.0], [1.5, -1.0, 1.0]], dtype=D)
    b = torch.tensor([1.0, 2.0, 3.0], dtype=D)
    Dr = torch.tensor([s, 1.0, 1 / s], dtype=D)
    solve, _ = exact_solve
    exact = solve(A0.tolist(), b.tolist())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x in (least_squares(Dr[:, None] * A0, Dr * b), least_squares(A0, b, Dr**2)):
            assert float((x - exact).abs().max() / exact.abs().max()) < 1e-13


@pytest.mark.parametrize("dup", [(0, 1), (1, 2)])
def test_a_rank_deficient_design_with_graded_rows_is_still_refused(dup):
    # The converse of the above: two equal columns stay singular whatever the row scales
    # (the equal pair first, where a later column follows the zero pivot, or last).
    A = rand(6, 3, seed=3)
    A[:, dup[1]] = A[:, dup[0]]
    Dr = 2.0 ** torch.tensor([30.0, 0, -30, 10, -10, 0], dtype=D)
    with pytest.raises(SolverError, match="rank deficient"):
        least_squares(Dr[:, None] * A, rand(6, seed=4))
    with pytest.raises(SolverError, match="rank deficient"):
        least_squares(A, rand(6, seed=4), Dr**2)


def test_least_squares_jacrev_wrt_A_on_an_empty_batch_and_a_full_one():
    """torch.func.jacrev w.r.t. A on an empty batch (0, 5, 2) raised torch's "Batching rule not
    implemented for aten::baddbmm_" (the backward's in-place product under the vmap over
    cotangents); plain torch gives an empty Jacobian (0, 2, 0, 5, 2). On a full batch the
    Jacobian matches torch.linalg.lstsq's (normal equations, differentiated by autograd)."""
    A0, b0 = torch.randn(0, 5, 2, dtype=D), torch.randn(0, 5, dtype=D)
    assert torch.func.jacrev(lambda A: least_squares(A, b0))(A0).shape == (0, 2, 0, 5, 2)
    g = torch.Generator().manual_seed(3)
    A, b = torch.randn(3, 5, 2, dtype=D, generator=g), torch.randn(3, 5, dtype=D, generator=g)
    J = torch.func.jacrev(lambda A: least_squares(A, b))(A)
    ref = torch.autograd.functional.jacobian(lambda A: torch.linalg.solve(A.mT @ A, (A.mT @ b[..., None]))[..., 0], A)
    torch.testing.assert_close(J, ref, rtol=1e-10, atol=1e-12)
