"""The registry's cone-program layers (``convexddn._registry_layers``): shift-symmetric
problems solved on x centred per row (``CentredLayer``), and ``lp_ball``'s warning about
the ratio |x| / r (``ScaledBallLayer``) where the projection cancels only.

References are independent of the cone program: the native nodes (taut string, sort-based
projections, RobustPool's Newton steps) on the offset-free input, hand-computed values, and
the closed forms of the Lp-ball projections. The offset-free input is ``(x0 + c) - c``, which
is exact in float64 (Sterbenz), so the expected answer at offset c is known to rounding."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import convexddn as cddn
from convexddn.errors import GradientWarning, NonFiniteError, SolverWarning

F64 = torch.float64
OFFSETS = (1e4, 1e6, 3e7, 1e9)
EPS = torch.finfo(F64).eps


def _offset_input(off: float, shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``x0 + off`` and their exact offset-free part ``(x0 + off) - off``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, dtype=F64, generator=gen) + off
    return x, x - off


def _solve_and_grad(layer, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's output at ``x`` and the vector-Jacobian product with ``g``; no warning allowed."""
    xx = x.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = layer(xx)
        (grad,) = torch.autograd.grad((y * g).sum(), xx)
    return y.detach(), grad


def test_tv1d_keeps_its_denoising_at_a_large_offset():
    """x = [0.6, 0.25, 1.3, 0] + c, λ = 0.3: by hand (taut string) y = [0.575, 0.575, 0.7, 0.3] + c,
    Jacobian rows 0 and 1 = (0.5, 0.5, 0, 0). At c = 3e7 the cone program returned x (an error of
    2λ = 0.6), reported solved, with no warning."""
    cone = cddn.layer("tv1d", n=4, lam=0.3, backend="cvxpy")
    x0 = torch.tensor([0.6, 0.25, 1.3, 0.0], dtype=F64)
    want = torch.tensor([0.575, 0.575, 0.7, 0.3], dtype=F64)
    for off in (1e4, 1e6, 3e7):
        y, grad = _solve_and_grad(cone, x0 + off, torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64))
        # x0 + off rounds x0 by up to ulp(off) / 2, and y + off rounds again
        torch.testing.assert_close(y - off, want, atol=4 * EPS * off + 1e-9, rtol=0)
        torch.testing.assert_close(grad, torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=F64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("off", OFFSETS)
def test_tv1d_at_offsets_against_the_native_node(off):
    native = cddn.layer("tv1d", n=6, lam=0.3)
    cone = cddn.layer("tv1d", n=6, lam=0.3, backend="cvxpy")
    x, x0 = _offset_input(off, (2, 3, 6))
    g = torch.randn(2, 3, 6, dtype=F64, generator=torch.Generator().manual_seed(1))
    y, grad = _solve_and_grad(cone, x, g)
    want, want_grad = _solve_and_grad(native, x0, g)  # offset-free: equivariance gives y(x0) + off
    assert y.shape == (2, 3, 6)
    torch.testing.assert_close(y, want + off, atol=4 * EPS * off + 1e-9, rtol=0)
    torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("penalty", ["quadratic", "huber", "pseudo_huber"])
@pytest.mark.parametrize("off", OFFSETS)
def test_robust_pool_at_offsets_against_the_native_node(penalty, off):
    """u(x + c1) = u(x) + c: a scalar per row, shape (*batch,). The quadratic's is the mean."""
    native = cddn.layer("robust_pool", n=6, penalty=penalty)
    cone = cddn.layer("robust_pool", n=6, penalty=penalty, backend="cvxpy")
    x, x0 = _offset_input(off, (2, 3, 6))
    g = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    u, grad = _solve_and_grad(cone, x, g)
    want, want_grad = _solve_and_grad(native, x0, g)
    if penalty == "quadratic":
        torch.testing.assert_close(want, x0.mean(-1), atol=1e-12, rtol=0)
    assert u.shape == (2, 3)
    torch.testing.assert_close(u, want + off, atol=4 * EPS * off + 1e-9, rtol=0)
    torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name, options", [("simplex", {}), ("sparsemax", {}), ("entmax", {"alpha": 1.5})])
@pytest.mark.parametrize("off", OFFSETS)
def test_shift_invariant_problems_at_offsets_against_the_native_node(name, options, off):
    native = cddn.layer(name, n=6, **options)
    cone = cddn.layer(name, n=6, backend="cvxpy", **options)
    x, x0 = _offset_input(off, (4, 6))
    g = torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(1))
    p, grad = _solve_and_grad(cone, x, g)
    want, want_grad = _solve_and_grad(native, x0, g)
    torch.testing.assert_close(p, want, atol=1e-9, rtol=0)
    torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=0)


def test_masked_scores_far_below_the_top_at_an_offset():
    """Finite scores 1e300 below the top one and -inf (masked) ones, at an offset of 1e9: the
    row's floor and centre keep the cone program at O(1). Reference: the native Entmax on the
    masked row (probabilities of the two top scores; the others 0)."""
    cone = cddn.layer("sparsemax", n=4, backend="cvxpy")
    x = torch.tensor([[1e9 + 0.5, -1e300, 1e9, -math.inf]], dtype=F64)
    want = cddn.layer("sparsemax", n=4)(x - 1e9)
    torch.testing.assert_close(want, torch.tensor([[0.75, 0.0, 0.25, 0.0]], dtype=F64), atol=1e-15, rtol=0)
    p = cone(x)
    torch.testing.assert_close(p, want, atol=1e-9, rtol=0)
    assert p[0, 3] == 0.0


@pytest.mark.parametrize("name, options", [("tv1d", {"lam": 0.3}), ("robust_pool", {"penalty": "huber"}),
                                           ("entmax", {"alpha": 1.5})])
def test_float32_input_is_centred_in_float64_and_returned_in_float32(name, options):
    native = cddn.layer(name, n=5, **options)
    cone = cddn.layer(name, n=5, backend="cvxpy", **options)
    off = 1e3
    x32 = (torch.randn(3, 5, generator=torch.Generator().manual_seed(0)) + off).float()
    x0 = x32.double() - off  # exact
    shift = off if name != "entmax" else 0.0
    want = native(x0) + shift
    xx = x32.clone().requires_grad_()
    y = cone(xx)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, want.float(), atol=2 * torch.finfo(torch.float32).eps * max(off, 1.0), rtol=0)
    y.sum().backward()
    assert xx.grad.dtype == torch.float32
    x64 = x0.clone().requires_grad_()
    native(x64).sum().backward()
    torch.testing.assert_close(xx.grad, x64.grad.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tv1d", "robust_pool", "simplex", "sparsemax"])
def test_centred_layer_empty_batch_and_nonfinite_input(name):
    cone = cddn.layer(name, n=4, backend="cvxpy")
    empty = cone(torch.zeros(0, 4, dtype=F64))
    assert empty.shape == ((0, 4) if name != "robust_pool" else (0,))
    x = torch.zeros(2, 3, 4, dtype=F64)
    x[0, 1, 2] = float("nan")
    want = r"^parameter 0 \(x\) must be finite, got 1 NaN and 0 Inf value\(s\) among 24 \(shape \(2, 3, 4\)\)$"
    with pytest.raises(NonFiniteError, match=want):
        cone(x)


def test_centred_layer_forward_mode_matches_the_native_node():
    """torch.func.jvp through the centring (c detached: exact, J 1 = 1) at an offset of 3e7."""
    cone = cddn.layer("tv1d", n=4, lam=0.3, backend="cvxpy")
    native = cddn.layer("tv1d", n=4, lam=0.3)
    x, x0 = _offset_input(3e7, (2, 4))
    t = torch.randn(2, 4, dtype=F64, generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradientWarning)
        y, dy = torch.func.jvp(cone, (x,), (t,))
    want, want_dy = torch.func.jvp(native, (x0,), (t,))
    torch.testing.assert_close(y, want + 3e7, atol=4 * EPS * 3e7, rtol=0)
    torch.testing.assert_close(dy, want_dy, atol=1e-6, rtol=0)


def test_lp_ball_inf_is_not_warned_at_a_large_ratio():
    """A clamp cancels nothing: at |x| / r = 1e10 the result and its Jacobian are exact
    (closed form clip(x, -r, r), J = diag(|x| < r)), and no SolverWarning is due."""
    x = torch.tensor([[1e10, 0.3, -0.2], [0.5, -2.0, 0.7]], dtype=F64, requires_grad=True)
    cone = cddn.layer("lp_ball", n=3, p="inf", radius=1.0, backend="cvxpy")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverWarning)
        y = cone(x)
    torch.testing.assert_close(y.detach(), x.detach().clamp(-1.0, 1.0), atol=1e-12, rtol=0)
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, (x.detach().abs() < 1.0).to(F64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("p", [1, 2])
def test_lp_ball_ratio_warning_names_only_the_rows_outside_past_the_bound(p):
    """eps |x|_inf / r > tol (1e-6) from |x| / r = 4.5e9: rows (0, 0) and (1, 1) only; (0, 1)
    lies outside at a ratio of 2, (1, 0) inside."""
    x = torch.tensor([[[1e10, 0.3, -0.2], [0.5, -2.0, 0.7]],
                      [[0.1, 0.1, -0.1], [3.0, -2e10, 1.0]]], dtype=F64)
    cone = cddn.layer("lp_ball", n=3, p=p, radius=1.0, backend="cvxpy")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cone(x)
    ours = [w.message for w in caught if issubclass(w.category, SolverWarning) and "times the radius" in str(w.message)]
    assert len(ours) == 1
    assert ours[0].elements == [(0, 0), (1, 1)]
    assert "2 batch element(s) (batch indices [(0, 0), (1, 1)])" in str(ours[0])
    assert "2e+10 times the radius" in str(ours[0])
