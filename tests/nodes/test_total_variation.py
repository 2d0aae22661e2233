"""Tests of convexddn.nodes.total_variation: exact 1-D total variation denoising."""
from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch
from torch.autograd import gradcheck
from torch.autograd.functional import jacobian

from convexddn.errors import (
    DTypeError,
    GradientWarning,
    NonFiniteError,
    OptionError,
    ShapeError,
    SolverError,
)
from convexddn.nodes.total_variation import TotalVariation1d, tv_denoise

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _signal(kind: str, b: int, n: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    if kind == "walk":
        return torch.randn(b, n, generator=g, dtype=F64).cumsum(1)
    if kind == "noise":
        return torch.randn(b, n, generator=g, dtype=F64)
    if kind == "steps":  # the DDN tutorial's signal
        base = torch.floor(torch.linspace(-5, 5, n, dtype=F64))
        return base + 0.5 * torch.randn(b, n, generator=g, dtype=F64)
    if kind == "ties":  # small integers: many equal neighbours and exact ties
        return torch.floor(torch.rand(b, n, generator=g, dtype=F64) * 3)
    raise ValueError(kind)


def _certificate(x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor) -> tuple[float, float]:
    """Violation of the optimality conditions, from x and y only (independent of the solver).

    y is optimal iff z = cumsum(y − x) (the dual, with z_n = 0) has |z_i| ≤ λ and
    z_i = λ sign(y_{i+1} − y_i) wherever y jumps. Returns (box violation, sign violation),
    relative to the scale of the data.
    """
    scale = x.abs().amax(-1, keepdim=True) + lam
    z = torch.cumsum(y - x, -1)
    end = z[..., -1:].abs() / scale
    z = z[..., :-1]
    box = ((z.abs() - lam).clamp(min=0) / scale).amax(-1, keepdim=True)
    jump = y[..., 1:] - y[..., :-1]
    moving = jump.abs() > 1e-9 * scale
    sign = torch.where(moving, (z - lam * jump.sign()).abs() / scale, torch.zeros_like(z))
    return float(torch.maximum(box, end).max()), float(sign.max())


def _cvxpy_tv(x: np.ndarray, lam: float) -> np.ndarray:
    u = cp.Variable(x.shape[0])
    objective = 0.5 * cp.sum_squares(u - x) + lam * cp.norm1(cp.diff(u))
    cp.Problem(cp.Minimize(objective)).solve(
        solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12
    )
    return u.value


# --------------------------------------------------------------------------- solution


def test_tv_two_points_closed_form():
    # n = 2: y moves each point λ towards the other, or both to the mean if they meet.
    x = torch.tensor([[0.0, 3.0], [0.0, 1.0], [2.0, -2.0], [1.0, 1.5]], dtype=F64)
    lam = 0.75
    d = x[:, 1] - x[:, 0]
    step = torch.where(d.abs() > 2 * lam, lam * d.sign(), d / 2)
    expected = torch.stack([x[:, 0] + step, x[:, 1] - step], 1)
    assert torch.allclose(tv_denoise(x, lam), expected, atol=1e-15)


def test_tv_docstring_example():
    y = tv_denoise(torch.tensor([0.0, 0.1, 2.0, 2.1]), lam=0.5)
    assert torch.allclose(y, torch.tensor([0.3, 0.3, 1.8, 1.8]), atol=1e-6)


@pytest.mark.parametrize("kind", ["walk", "noise", "steps", "ties"])
@pytest.mark.parametrize("lam", [0.01, 0.5, 5.0, 100.0])
def test_tv_optimality_certificate(kind, lam):
    x = _signal(kind, 16, 200, seed=1)
    y = tv_denoise(x, lam)
    box, sign = _certificate(x, y, torch.tensor(lam, dtype=F64))
    assert box < 1e-12 and sign < 1e-12


@pytest.mark.parametrize("lam", [0.3, 2.0, 30.0])
def test_tv_matches_cvxpy(lam):
    x = _signal("walk", 1, 30, seed=2)[0]
    np.testing.assert_allclose(tv_denoise(x, lam).numpy(), _cvxpy_tv(x.numpy(), lam), atol=1e-8)


def test_tv_limits():
    x = _signal("walk", 4, 50, seed=3)
    assert torch.equal(tv_denoise(x, 0.0), x)
    # λ beyond max |cumsum(x − mean)|: one segment, the mean.
    big = float((x - x.mean(1, keepdim=True)).cumsum(1).abs().max()) * 1.01
    assert torch.allclose(tv_denoise(x, big), x.mean(1, keepdim=True).expand_as(x), atol=1e-12)
    assert torch.equal(tv_denoise(torch.ones(3, 1, dtype=F64), 1.0), torch.ones(3, 1, dtype=F64))


def test_tv_per_row_lambda_dim_and_dtypes():
    x = _signal("steps", 3, 40, seed=4)
    lam = torch.tensor([0.1, 1.0, 10.0], dtype=F64)
    y = tv_denoise(x, lam)
    for i in range(3):
        assert torch.allclose(y[i], tv_denoise(x[i], float(lam[i])), atol=1e-14)
    xt = x.T.reshape(40, 3, 1)
    assert torch.allclose(tv_denoise(xt, lam.view(3, 1), dim=0).reshape(40, 3).T, y, atol=1e-14)
    y32 = tv_denoise(x.float(), lam.float())
    assert y32.dtype == torch.float32 and torch.allclose(y32.double(), y, atol=1e-5)
    assert tv_denoise(torch.zeros(0, 5, dtype=F64), 1.0).shape == (0, 5)


def test_tv_large_batch_long_signal():
    x = _signal("walk", 8, 3000, seed=5)
    y = tv_denoise(x, 3.0)
    box, sign = _certificate(x, y, torch.tensor(3.0, dtype=F64))
    assert box < 1e-11 and sign < 1e-11


# --------------------------------------------------------------------------- gradients


def _segments(y: torch.Tensor) -> list[list[int]]:
    runs, start = [], 0
    for i in range(1, y.shape[0] + 1):
        if i == y.shape[0] or abs(float(y[i] - y[i - 1])) > 1e-12:
            runs.append(list(range(start, i)))
            start = i
    return runs


def test_tv_jacobian_closed_form():
    # dy/dx averages over each constant segment; dy/dλ = (σ_e − σ_{s−1}) / length.
    x = _signal("steps", 1, 25, seed=6)[0]
    lam = 0.8
    y = tv_denoise(x, lam)
    J = torch.zeros(25, 25, dtype=F64)
    dlam = torch.zeros(25, dtype=F64)
    segs = _segments(y)
    assert 1 < len(segs) < 25
    for seg in segs:
        s, e = seg[0], seg[-1]
        left = float(torch.sign(y[s] - y[s - 1])) if s > 0 else 0.0
        right = float(torch.sign(y[e + 1] - y[e])) if e < 24 else 0.0
        J[s:e + 1, s:e + 1] = 1.0 / len(seg)
        dlam[s:e + 1] = (right - left) / len(seg)
    assert torch.allclose(jacobian(lambda t: tv_denoise(t, lam), x), J, atol=1e-14)
    lam_t = torch.tensor(lam, dtype=F64)
    assert torch.allclose(jacobian(lambda l: tv_denoise(x, l), lam_t), dlam, atol=1e-14)


@pytest.mark.parametrize("kind", ["walk", "steps", "noise"])
def test_tv_grad(kind):
    x = _signal(kind, 3, 12, seed=7).requires_grad_()
    lam = torch.tensor([0.2, 0.7, 1.5], dtype=F64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)  # generic data: no ties
        assert gradcheck(lambda x, l: tv_denoise(x, l), (x, lam), atol=1e-8, rtol=1e-6)
    scalar = torch.tensor(0.5, dtype=F64, requires_grad=True)
    assert gradcheck(lambda x, l: tv_denoise(x, l), (x, scalar), atol=1e-8, rtol=1e-6)


def test_tv_pass_through_gradient_is_wrong():
    # The DDN tutorial's backward passes the gradient through (identity); the true
    # Jacobian averages over segments, so they differ on any signal with merged points.
    x = _signal("steps", 1, 20, seed=8).requires_grad_()
    w = torch.randn(1, 20, generator=_gen(9), dtype=F64)
    (g,) = torch.autograd.grad((tv_denoise(x, 1.0) * w).sum(), x)
    assert (g - w).abs().max() > 0.1


def test_tv_tie_warns():
    # x = (0, 1), λ = 1/2: the two points just meet; the derivative does not exist.
    x = torch.tensor([0.0, 1.0], dtype=F64, requires_grad=True)
    y = tv_denoise(x, 0.5)
    assert torch.allclose(y, torch.full((2,), 0.5, dtype=F64))
    with pytest.warns(GradientWarning, match="tie"):
        y.sum().backward()


def test_tv_tie_warning_counts_the_rows():
    """The tie warning named at most 10 rows, with no count and no "...": 130 tied rows of 200
    read as 10. Pairs (0, d) along dim 0 of a (2, 5, 4) x, λ = 1/2: the two points meet
    exactly where |d| = 2λ = 1 (closed form: they merge for |d| <= 2λ), a tie; d = 3 (a jump)
    and d = 0.25 (merged, |z| < λ) are not. Ties at 12 of the 20 signals of the (5, 4) batch:
    the warning says 12 of 20 and the first 8 as index tuples into (5, 4), then "..."."""
    d = torch.tensor([1.0, 3.0, -1.0, 0.25, 1.0] * 4, dtype=F64)
    tied = [divmod(i, 4) for i in range(20) if abs(float(d[i])) == 1.0]
    x = torch.stack([torch.zeros(20, dtype=F64), d]).reshape(2, 5, 4).requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tv_denoise(x, 0.5, dim=0).sum().backward()
    said = [str(w.message) for w in caught if issubclass(w.category, GradientWarning)]
    assert len(tied) == 12 and said == [
        f"tv_denoise: in 12 of 20 batch element(s) (indices {tied[:8]}, ...), each a signal along dim, the "
        "solution is at a tie (an edge where |z| = lam exactly, or a jump of size 0): the derivative does not exist "
        "there; the gradient of the current segmentation (a one-sided one) is returned"], said



@pytest.mark.parametrize("mode", ["backward", "forward"])
def test_tv_tie_warning_names_the_batch_index(mode):
    """The warnings named the flattened row ("flat indices [5]") of a (2, 3, n) x, which the
    caller cannot index with; they name (1, 2), its position in x's batch. Pairs (0, d) along
    dim -1, λ = 1/2: d = 1 at (1, 2) is a tie (|d| = 2λ), d = 3 elsewhere a jump."""
    d = torch.full((2, 3), 3.0, dtype=F64)
    d[1, 2] = 1.0
    x = torch.stack([torch.zeros_like(d), d], -1)
    with pytest.warns(GradientWarning, match=r"in 1 of 6 batch element\(s\) \(indices \[\(1, 2\)\]\), each a signal"):
        if mode == "backward":
            tv_denoise(x.requires_grad_(), 0.5).sum().backward()
        else:
            jacobian(lambda t: tv_denoise(t, 0.5), x, strategy="forward-mode", vectorize=True)


# --------------------------------------------------------------------------- module, errors


def test_total_variation_module_repr_tensor_lam():
    """A tensor lam shows its value (0-d), Parameter(value) (learnable) or its shape."""
    tail = "dim=-1, max_iter=None)"
    assert repr(TotalVariation1d(lam=torch.tensor(0.25))) == f"TotalVariation1d(lam=0.25, learnable=False, {tail}"
    assert repr(TotalVariation1d(lam=0.5, learnable=True)) == (
        f"TotalVariation1d(lam=Parameter(0.5), learnable=True, {tail}")
    assert repr(TotalVariation1d(lam=torch.ones(4, 1))) == (
        f"TotalVariation1d(lam=tensor of shape (4, 1), learnable=False, {tail}")
    assert repr(TotalVariation1d(lam=2.0)) == f"TotalVariation1d(lam=2.0, learnable=False, {tail}"


def test_total_variation_module_learns_lambda():
    torch.manual_seed(0)
    tv = TotalVariation1d(lam=0.02, learnable=True)  # under-smoothing at first
    assert isinstance(tv.lam, torch.nn.Parameter)
    assert "learnable=True" in repr(tv)
    clean = torch.floor(torch.linspace(0, 4, 60, dtype=F64)).expand(8, 60)
    noisy = clean + 0.3 * torch.randn(8, 60, generator=_gen(10), dtype=F64)
    opt = torch.optim.Adam(tv.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (tv(noisy.float()) - clean.float()).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]
    assert float(tv.lam.detach()) > 0.1
    fixed = TotalVariation1d(lam=2.0)
    assert fixed.lam == 2.0 and "learnable=False" in repr(fixed)
    assert torch.equal(fixed(noisy), tv_denoise(noisy, 2.0))


def test_tv_invalid():
    x = _signal("walk", 2, 6, seed=11)
    with pytest.raises(DTypeError, match="x"):
        tv_denoise(torch.ones(2, 3, dtype=torch.int64))
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="x"):
        tv_denoise(bad)
    for lam in (-1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(OptionError, match="lam"):
            tv_denoise(x, lam)
    with pytest.raises(OptionError, match="lam"):
        tv_denoise(x, torch.tensor([1.0, -1.0], dtype=F64))
    with pytest.raises(DTypeError, match="lam"):
        tv_denoise(x, torch.tensor([1, 2]))
    with pytest.raises(ShapeError, match="lam must broadcast"):
        tv_denoise(x, torch.ones(3, dtype=F64))
    with pytest.raises(ShapeError, match="dim"):
        tv_denoise(x, 1.0, dim=3)
    with pytest.raises(ShapeError, match="at least one entry"):
        tv_denoise(torch.ones(2, 0, dtype=F64))
    with pytest.raises(OptionError, match="max_iter"):
        tv_denoise(x, 1.0, max_iter=0)
    with pytest.raises(OptionError, match="lam"):
        TotalVariation1d(lam=-0.1)
    with pytest.raises(OptionError, match="learnable"):
        TotalVariation1d(learnable="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tv_cuda():
    x = _signal("steps", 4, 50, seed=12)
    lam = torch.tensor(0.7, dtype=F64, device="cuda", requires_grad=True)
    xc = x.cuda().requires_grad_()
    y = tv_denoise(xc, lam)
    assert y.device.type == "cuda"
    assert torch.allclose(y.cpu(), tv_denoise(x, 0.7), atol=1e-12)
    y.pow(2).sum().backward()
    assert lam.grad is not None and xc.grad.device.type == "cuda"


# --------------------------------------------------------------------------- audit fixes


def test_tv_lam_zero_is_identity_with_equal_neighbours():
    # λ = 0: y = x for every x, so ∂y/∂x = I, also across runs of equal entries (the
    # old backward averaged over them: [0.5, 0.5, 0] for y[0] of [1, 1, 2]).
    x = torch.tensor([1.0, 1.0, 2.0], dtype=F64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)  # y = x: differentiable
        y = tv_denoise(x, 0.0)
        y[0].backward()
    assert torch.equal(y.detach(), x.detach())
    assert torch.equal(x.grad, torch.tensor([1.0, 0.0, 0.0], dtype=F64))
    # Per row (λ = 0, 0.6, 0 in one batch): identity on the λ = 0 rows; the λ = 0.6 row
    # of [0, 0, 3] is segments {0, 1}, {2}: the averaging block (closed form).
    xs = _signal("ties", 3, 8, seed=13)
    xs[1] = torch.tensor([0.0, 0.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0], dtype=F64)
    lam = torch.tensor([0.0, 0.6, 0.0], dtype=F64)
    assert bool((xs[0, 1:] == xs[0, :-1]).any()) and bool((xs[2, 1:] == xs[2, :-1]).any())
    assert torch.equal(tv_denoise(xs, lam)[[0, 2]], xs[[0, 2]])
    J = jacobian(lambda t: tv_denoise(t, lam), xs)  # (3, 8, 3, 8)
    expected = torch.zeros(3, 8, 3, 8, dtype=F64)
    expected[0, :, 0, :] = expected[2, :, 2, :] = torch.eye(8, dtype=F64)
    expected[1, :2, 1, :2] = 0.5
    expected[1, 2:, 1, 2:] = 1.0 / 6
    assert torch.allclose(J, expected, atol=1e-15)


def test_tv_lam_zero_one_sided_lambda_derivative():
    # λ ≥ 0 is the domain, so d y/dλ at λ = 0 is the derivative at 0+: y is piecewise
    # affine in λ, so a forward difference with a small h is exact up to rounding.
    x = _signal("ties", 4, 30, seed=14)
    lam = torch.zeros(4, dtype=F64)
    h = 1e-7
    fd = (tv_denoise(x, h) - tv_denoise(x, 0.0)) / h
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)  # x is a constant: it exists
        J = jacobian(lambda t: tv_denoise(x, t), lam)  # (4, 30, 4)
    assert torch.allclose(J.diagonal(dim1=0, dim2=2).T, fd, atol=1e-7)
    # Closed form for [1, 1, 2]: segment {0, 1} gains λ/2 each, the last entry loses λ.
    one = jacobian(lambda t: tv_denoise(torch.tensor([1.0, 1.0, 2.0], dtype=F64), t), lam[0])
    assert torch.equal(one, torch.tensor([0.5, 0.5, -1.0], dtype=F64))
    # A jump of one subnormal ulp is still a jump at λ = 0+ (dx/4 underflowed to 0).
    tiny = torch.tensor([0.0, 5e-324], dtype=F64)
    expected = torch.tensor([1.0, -1.0], dtype=F64)
    assert torch.equal(jacobian(lambda t: tv_denoise(tiny, t), lam[0]), expected)
    # Both x and λ: the partials, with a warning that (x, λ) -> y is not differentiable
    # at λ = 0 with equal neighbours (∂y/∂x is I at λ = 0, the segment average above it).
    xg = torch.tensor([1.0, 1.0, 2.0], dtype=F64, requires_grad=True)
    lg = torch.tensor(0.0, dtype=F64, requires_grad=True)
    with pytest.warns(GradientWarning, match="lam = 0 with equal neighbours"):
        tv_denoise(xg, lg)[0].backward()
    assert torch.equal(xg.grad, torch.tensor([1.0, 0.0, 0.0], dtype=F64))
    assert torch.equal(lg.grad, torch.tensor(0.5, dtype=F64))


def test_tv_float64_near_overflow():
    # [1e308, -1e308, 1e308], λ = 1e308 ≥ max |cumsum(x − mean)| = 2e308/3: one segment,
    # the mean 1e308/3 (x + λt overflowed: [0, inf, 0]); ∂y/∂x = 1/3, ∂y/∂λ = 0.
    x = torch.tensor([1e308, -1e308, 1e308], dtype=F64, requires_grad=True)
    lam = torch.tensor(1e308, dtype=F64, requires_grad=True)
    y = tv_denoise(x, lam)
    assert torch.allclose(y, torch.full((3,), 1e308 / 3, dtype=F64), rtol=1e-15, atol=0)
    y.backward(torch.tensor([1.0, 2.0, 4.0], dtype=F64))
    assert torch.allclose(x.grad, torch.full((3,), 7.0 / 3, dtype=F64), rtol=1e-15)
    assert float(lam.grad) == 0.0
    # Segments {0, 1}, {2}: 1.5e308 − λ/2 and −1e308 + λ (the sum 3e308 overflowed).
    y = tv_denoise(torch.tensor([1.5e308, 1.5e308, -1e308], dtype=F64), 1e307)
    expected = torch.tensor([1.45e308, 1.45e308, -9e307], dtype=F64)
    assert torch.allclose(y, expected, rtol=1e-15, atol=0)
    # A random walk times 2^1020 (max |x| ≈ 1e308): CVXPY's solution of the unscaled
    # problem, times 2^1020 (the old code ran into max_iter on the overflowing iterates).
    c = 2.0**1020
    w = _signal("walk", 2, 30, seed=15)
    assert 1e307 < float(w.abs().max()) * c < 1.5e308
    for lam in (0.3, 2.0, 5.0):
        big = tv_denoise(w * c, lam * c)
        for i in range(2):
            ref = _cvxpy_tv(w[i].numpy(), lam)
            np.testing.assert_allclose((big[i] / c).numpy(), ref, atol=1e-8)


def test_tv_single_entry_and_empty_batch_stay_in_the_graph():
    # n = 1 (y = x: ∂y/∂x = 1, ∂y/∂λ = 0) and an empty batch: the output must depend on
    # x and λ in autograd (the old code returned x.clone(): backward raised for λ).
    tv = TotalVariation1d(0.5, learnable=True)
    x = torch.randn(3, 1, generator=_gen(16), dtype=F64, requires_grad=True)
    y = tv(x)
    assert torch.equal(y.detach(), x.detach())
    y.backward(torch.tensor([[1.0], [2.0], [3.0]], dtype=F64))
    assert torch.equal(tv.lam.grad, torch.tensor(0.0))
    assert torch.equal(x.grad, torch.tensor([[1.0], [2.0], [3.0]], dtype=F64))
    tv.lam.grad = None
    tv(torch.randn(0, 5)).sum().backward()
    assert torch.equal(tv.lam.grad, torch.tensor(0.0))
    lam = torch.tensor([0.1, 0.0], dtype=F64, requires_grad=True)  # per row, n = 1 along dim 0
    (g,) = torch.autograd.grad(tv_denoise(torch.ones(1, 2, dtype=F64), lam, dim=0).sum(), lam)
    assert torch.equal(g, torch.zeros(2, dtype=F64))


def test_tv_reads_the_host_once_per_step(host_reads, tv_steps):
    # Each host read is a sync on CUDA: the active-set loop reads one pair of flags per
    # step (does a row finish, is one left). Before: two bool() reads per step plus three
    # boolean-mask stores per step in which rows finished (30 reads for 8 steps here).
    steps = tv_steps  # (rows per step)
    x = torch.randn(16, 300, generator=torch.Generator().manual_seed(0), dtype=F64).cumsum(1)
    with host_reads.counting():
        y = tv_denoise(x, 0.5)
    assert len(steps) >= 5
    assert host_reads.count <= len(steps) + 2
    # The stores by torch.where keep every row's own solution (rows finish at different steps).
    assert torch.equal(y, torch.stack([tv_denoise(row, 0.5) for row in x]))


def test_tv_finished_rows_leave_the_working_set(tv_steps):
    """Finished rows were only frozen: every step still ran on all B rows, so one smooth
    row (218 steps) beside 255 noisy ones (1 step) made tv_denoise 40x slower than solving
    them apart. Now the rows still running are gathered out once half have finished: the
    rows per step fall (counted at the once-per-step segment ids), and each row's result
    is still bit for bit its result alone. Reference for the ramp: cvxpy + Clarabel."""
    rows = tv_steps
    x = torch.randn(64, 200, generator=torch.Generator().manual_seed(0), dtype=F64)
    ramp = 10 * torch.linspace(0, 1, 200, dtype=F64) ** 2  # moves its active set slowly
    x[37] = ramp
    y = tv_denoise(x, 10.0)
    assert rows[0] == 64 and rows[-1] == 1 and rows == sorted(rows, reverse=True)
    assert sum(rows) < 64 * len(rows) / 3  # (all 64 rows in each of the 38 steps before)
    assert torch.equal(y, torch.stack([tv_denoise(row, 10.0) for row in x]))
    np.testing.assert_allclose(y[37].numpy(), _cvxpy_tv(ramp.numpy(), 10.0), atol=1e-8)
    # Rows still running at max_iter are named by their index in the batch, not in the
    # working set (here two compactions before the error).
    x[5] = ramp.flip(0)
    with pytest.raises(SolverError, match=r"2 signal\(s\) \(batch indices \[\(5,\), \(37,\)\]\)") as err:
        tv_denoise(x, 10.0, max_iter=20)
    assert err.value.indices == [(5,), (37,)]


def test_tv_lam_on_another_device_is_an_input_error_not_a_shape_error(monkeypatch):
    # A device mismatch raised ShapeError; it is no shape problem, and the other nodes
    # raise InputError for it. No second device here: the meta device stands for it,
    # with the option check (which reads λ's values, and refuses meta) passed over.
    import convexddn.nodes.total_variation as tv
    from convexddn.errors import InputError

    monkeypatch.setattr(tv, "_check_lam_option", lambda lam: lam)
    x = torch.ones(3, 5, dtype=F64)
    with pytest.raises(InputError, match=r"lam must be on x's device cpu, got meta") as err:
        tv_denoise(x, torch.empty(3, dtype=F64, device="meta"))
    assert not isinstance(err.value, ShapeError)
    # The shape check still comes first and is still a ShapeError.
    with pytest.raises(ShapeError, match="lam must broadcast"):
        tv_denoise(x, torch.empty(4, dtype=F64, device="meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tv_cuda_lam_on_cpu_is_an_input_error():
    from convexddn.errors import InputError

    with pytest.raises(InputError, match=r"lam must be on x's device cuda:0, got cpu") as err:
        tv_denoise(torch.ones(2, 5, dtype=F64, device="cuda"), torch.tensor(0.5, dtype=F64))
    assert not isinstance(err.value, ShapeError)


def test_tv_module_learns_a_parameter_passed_as_lam():
    """An nn.Parameter passed as lam was copied into a buffer unless learnable=True: the
    optimiser never saw it and its .grad stayed None (every other node keeps an
    nn.Parameter option as the parameter). Reference: ∂/∂λ of Σ y for a fused pair
    (x = (0, 1), λ < 1/2: y = (λ, 1 − λ), Σ y = 1, so use y0 = λ: gradient 1)."""
    lam = torch.nn.Parameter(torch.tensor(0.2, dtype=torch.float64))
    tv = TotalVariation1d(lam=lam)
    assert any(p is lam for p in tv.parameters()) and "learnable=True" in repr(tv)
    y = tv(torch.tensor([[0.0, 1.0]], dtype=torch.float64))
    y[0, 0].backward()
    assert float(lam.grad) == pytest.approx(1.0, abs=1e-12)


def test_tv_denoise_other_dim_returns_a_contiguous_tensor():
    """dim != -1 returned the solver's rows moved back (strides (30, 1, 6) here):
    y.view(-1) raised. Same values as on the moved input."""
    x = torch.randn(2, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = tv_denoise(x, 0.5, dim=1)
    assert y.is_contiguous()
    torch.testing.assert_close(y, tv_denoise(x.transpose(1, 2), 0.5).transpose(1, 2), rtol=0, atol=0)
    y.view(-1)


# --------------------------------------------------------------------------- forward mode
# The review's bug: forward mode skipped _TVFn (nothing requiring grad) and differentiated
# the solver's ops: one-sided tangents with no warning at ties, 0 for the λ-tangent at
# λ = 0 (the backward's is the one-sided P t at 0+); and where an input also required grad
# (a learnable λ) it went through _TVFn, which had no jvp: NotImplementedError.


def _fd(x: torch.Tensor, lam: torch.Tensor, dx: torch.Tensor, dlam: torch.Tensor,
        h: float = 1e-6) -> torch.Tensor:
    # y is piecewise affine: at generic points central differences are exact to rounding.
    return (tv_denoise(x + h * dx, lam + h * dlam) - tv_denoise(x - h * dx, lam - h * dlam)) / (2 * h)


def _dual_tangent(x: torch.Tensor, lam: torch.Tensor, dx: torch.Tensor | None,
                  dlam: torch.Tensor | None) -> torch.Tensor:
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        xd = x if dx is None else fwAD.make_dual(x, dx)
        ld = lam if dlam is None else fwAD.make_dual(lam, dlam)
        t = fwAD.unpack_dual(tv_denoise(xd, ld)).tangent
    return torch.zeros_like(x) if t is None else t


def _reverse_jacobians(x: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """∂y/∂x (B·n, B·n) and ∂y/∂λ (B·n, λ.numel()) by the backward: vjp on basis vectors."""
    xg, lg = x.clone().requires_grad_(), lam.clone().requires_grad_()
    y = tv_denoise(xg, lg).reshape(-1)
    rows = [torch.autograd.grad(y, (xg, lg), torch.eye(y.numel(), dtype=F64)[k], retain_graph=True)
            for k in range(y.numel())]
    return (torch.stack([r[0].reshape(-1) for r in rows]), torch.stack([r[1].reshape(-1) for r in rows]))


@pytest.mark.parametrize("per_row", [False, True], ids=["scalar_lam", "per_row_lam"])
def test_tv_forward_ad_matches_central_differences(per_row):
    g = _gen(20)
    x = _signal("walk", 3, 12, seed=21)
    lam = torch.tensor([0.2, 0.7, 1.5], dtype=F64) if per_row else torch.tensor(0.6, dtype=F64)
    dx = torch.randn(3, 12, generator=g, dtype=F64)
    dlam = torch.randn(lam.shape, generator=g, dtype=F64)
    zero = torch.zeros_like
    # Constant λ, then a learnable one (requires grad, as in training: the old code went
    # through _TVFn there and raised NotImplementedError, it had no jvp).
    for lam_in in (lam, lam.clone().requires_grad_()):
        with warnings.catch_warnings():
            warnings.simplefilter("error", GradientWarning)  # generic data: no ties
            both = _dual_tangent(x, lam_in, dx, dlam)
            only_x = _dual_tangent(x, lam_in, dx, None)
            only_lam = _dual_tangent(x, lam_in, None, dlam)
        torch.testing.assert_close(both.detach(), _fd(x, lam, dx, dlam), atol=1e-7, rtol=0)
        torch.testing.assert_close(only_x.detach(), _fd(x, lam, dx, zero(dlam)), atol=1e-7, rtol=0)
        torch.testing.assert_close(only_lam.detach(), _fd(x, lam, zero(dx), dlam), atol=1e-7, rtol=0)
        torch.testing.assert_close(only_x + only_lam, both, atol=1e-14, rtol=0)  # linear


def test_tv_forward_ad_gradcheck():
    x = _signal("steps", 3, 12, seed=22)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        for lam in (torch.tensor([0.2, 0.7, 1.5], dtype=F64), torch.tensor(0.5, dtype=F64)):
            assert gradcheck(lambda a, b: tv_denoise(a, b), (x.clone().requires_grad_(), lam.requires_grad_()),
                             check_forward_ad=True, atol=1e-8, rtol=1e-6)
        # The module with a learnable λ (a Parameter that requires grad while x carries
        # the tangent: the old code raised NotImplementedError).
        tv = TotalVariation1d(0.5, learnable=True).double()
        assert gradcheck(tv, (x.clone().requires_grad_(),), check_forward_ad=True, atol=1e-8, rtol=1e-6)


def test_tv_func_jvp_agrees_and_warns_at_ties():
    # torch.func.jvp and jacfwd: the node's jvp (also under functorch), the same tangent
    # as the dual-tensor API, central differences and the backward's Jacobian.
    g = _gen(23)
    x = _signal("noise", 2, 9, seed=24)
    lam = torch.tensor([0.3, 0.8], dtype=F64)
    dx, dlam = torch.randn(2, 9, generator=g, dtype=F64), torch.randn(2, generator=g, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        y, t = torch.func.jvp(lambda a, b: tv_denoise(a, b), (x, lam), (dx, dlam))
        jx = torch.func.jacfwd(lambda a: tv_denoise(a, lam))(x)
        jl = torch.func.jacfwd(lambda b: tv_denoise(x, b))(lam)
    assert torch.equal(y, tv_denoise(x, lam))
    torch.testing.assert_close(t, _dual_tangent(x, lam, dx, dlam), atol=1e-15, rtol=0)
    torch.testing.assert_close(t, _fd(x, lam, dx, dlam), atol=1e-7, rtol=0)
    rev_x, rev_l = _reverse_jacobians(x, lam)
    torch.testing.assert_close(jx.reshape(18, 18), rev_x, atol=1e-15, rtol=0)
    torch.testing.assert_close(jl.reshape(18, 2), rev_l, atol=1e-15, rtol=0)
    # At the review's tie (x = (0, 1), λ = 1/2): the warning, and the backward's Jacobian.
    tie = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.warns(GradientWarning, match="tie"):
        _, t = torch.func.jvp(lambda a: tv_denoise(a, 0.5), (tie,), (torch.tensor([-1.0, 0.0], dtype=F64),))
    torch.testing.assert_close(t, torch.tensor([-0.5, -0.5], dtype=F64), atol=1e-15, rtol=0)


def test_tv_forward_ad_equals_reverse_jacobian():
    # A random input with per-row λ, one row at λ = 0 (the domain's edge: ∂y/∂λ is the
    # one-sided P t at 0+ in the backward; the old forward mode gave 0 there).
    g = _gen(25)
    x = _signal("walk", 3, 10, seed=26)
    lam = torch.tensor([0.0, 0.4, 1.3], dtype=F64)
    dx, dlam = torch.randn(3, 10, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)
    rev_x, rev_l = _reverse_jacobians(x, lam)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        t = _dual_tangent(x, lam, dx, dlam)
    expected = (rev_x @ dx.reshape(-1) + rev_l @ dlam).reshape(3, 10)
    torch.testing.assert_close(t, expected, atol=1e-14, rtol=0)
    assert rev_l[:10, 0].abs().sum() > 1.0  # the λ = 0 row's λ-derivative is not 0
    # Tangent basis vectors: the whole Jacobian, column by column.
    cols = torch.stack([_dual_tangent(x, lam, e.reshape(3, 10), None).reshape(-1)
                        for e in torch.eye(30, dtype=F64)], 1)
    torch.testing.assert_close(cols, rev_x, atol=1e-15, rtol=0)


def _warnings_of(fn, *args) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args)
    return out, [str(w.message) for w in caught if issubclass(w.category, GradientWarning)]


@pytest.mark.parametrize("case", ["tie", "lam_zero_plateau"])
def test_tv_forward_ad_warns_like_reverse_and_gives_its_jacobian(case):
    # The review's tie (x = (0, 1), λ = 1/2: the two points just meet) and λ = 0 with
    # equal neighbours (x and λ differentiated together): forward mode warned nothing
    # and gave the solver's one-sided tangent ((-1, 0) for ẋ = (-1, 0) at the tie).
    if case == "tie":
        x, lam = torch.tensor([[0.0, 1.0]], dtype=F64), torch.tensor(0.5, dtype=F64)
    else:
        x, lam = torch.tensor([[1.0, 1.0, 2.0]], dtype=F64), torch.tensor(0.0, dtype=F64)
    n = x.shape[1]
    (rev_x, rev_l), rev_warn = _warnings_of(_reverse_jacobians, x, lam)
    assert rev_warn and len(set(rev_warn)) == 1
    for dx in torch.cat([torch.eye(n, dtype=F64), -torch.eye(n, dtype=F64)]):
        for dlam in (torch.tensor(1.0, dtype=F64), torch.tensor(-1.0, dtype=F64)):
            t, fwd_warn = _warnings_of(_dual_tangent, x, lam, dx.view(1, n), dlam)
            # The same warning, naming the same rows; "tangent" where it says "gradient".
            assert [m.replace("tangent", "gradient") for m in fwd_warn] == rev_warn[:1]
            torch.testing.assert_close(t.reshape(-1), rev_x @ dx + rev_l[:, 0] * dlam, atol=1e-15, rtol=0)
    if case == "tie":
        assert "tie" in rev_warn[0]
        with pytest.warns(GradientWarning, match="tie"):
            t = _dual_tangent(x, lam, torch.tensor([[-1.0, 0.0]], dtype=F64), None)
        torch.testing.assert_close(t, torch.tensor([[-0.5, -0.5]], dtype=F64), atol=1e-15, rtol=0)
    else:
        # Only x (or only λ) carrying a tangent: the partials exist, no warning (as in reverse).
        assert "lam = 0 with equal neighbours" in rev_warn[0]
        with warnings.catch_warnings():
            warnings.simplefilter("error", GradientWarning)
            assert torch.equal(_dual_tangent(x, lam, torch.ones(1, 3, dtype=F64), None), torch.ones(1, 3, dtype=F64))
            torch.testing.assert_close(_dual_tangent(x, lam, None, torch.tensor(1.0, dtype=F64)),
                                       torch.tensor([[0.5, 0.5, -1.0]], dtype=F64), atol=1e-15, rtol=0)


def test_tv_tangent_differentiated_again_raises():
    # The tangent is the first-order Jacobian product, computed without a graph: reverse
    # mode over it, or torch.func.grad over torch.func.jvp, gave zeros silently.
    import torch.autograd.forward_ad as fwAD

    from convexddn.errors import DoubleBackwardError

    x = _signal("walk", 1, 8, seed=27)[0].requires_grad_()
    v = torch.randn(8, generator=_gen(28), dtype=F64)
    with fwAD.dual_level():
        t = fwAD.unpack_dual(tv_denoise(fwAD.make_dual(x, v), 0.5)).tangent
        with pytest.raises(DoubleBackwardError):
            torch.autograd.grad(t[0], x)
    with pytest.raises(DoubleBackwardError):
        torch.func.grad(lambda z: torch.func.jvp(lambda u: tv_denoise(u, 0.5), (z,), (v,))[1][0])(x.detach())


def test_tv_one_huge_entry_does_not_decide_the_small_entries():
    # One bound per row, 4n·eps·max|x|, let the 1e12 entry's rounding (1e-4) decide the
    # active set of the entries of ~0.5: y[3:8] = −0.1314 came back (a merged segment),
    # silently. The exact segments [0], [1, 2], [3..6], [7] with jumps down, down, up give
    # the closed form below (segment mean of x + λ(σ_end − σ_before)/len), whose dual
    # certificate the helper's 50-digit reference confirmed.
    x = torch.tensor([1e12, 0.451, 0.517, -0.91, 0.129, -0.503, -1.245, 0.872], dtype=F64)
    y = tv_denoise(x, 1.0)
    expected = torch.tensor([1e12 - 1, 0.484, 0.484] + [(-0.91 + 0.129 - 0.503 - 1.245 + 2) / 4] * 4 + [0.872 - 1],
                            dtype=F64)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-15 * 1e12)
    assert (y[1:] - expected[1:]).abs().max() < 1e-15


@pytest.mark.parametrize("offset", [1e10, 1e12])
def test_tv_an_offset_changes_nothing_but_the_offset(offset):
    # y(x + c) = y(x) + c: with the bound set by the offset, 1e12 gave 53 segments for
    # the exact 52 (0.064 off). Compared to the small call, shifted, to the offset's rounding.
    x = torch.randn(150, generator=_gen(7), dtype=F64).cumsum(0)
    y = tv_denoise(x, 1.0)
    y_off = tv_denoise(x + offset, 1.0)
    ulp = torch.finfo(F64).eps * offset
    assert (y_off - (y + offset)).abs().max() <= 4 * ulp
    assert torch.equal(torch.sign(y_off.diff()), torch.sign(y.diff()))


def test_tv_subnormal_rows_are_solved_scaled_up():
    # Rounding bounds of eps·1e-310 underflowed to 0 and the active set cycled at this
    # merge point (SolverError whatever max_iter); the row is now scaled up exactly.
    x = torch.tensor([-7.831196841283e-311, -9.0447532036066e-311, -1.29673363768974e-310,
                      3.149331895396e-311, -7.2772445688775e-311], dtype=F64)
    lam = 9.460566964626e-311
    s = 2.0**60
    assert torch.equal(tv_denoise(x, lam), tv_denoise(x * s, lam * s) / s)


def test_tv_a_long_smooth_signal_converges_at_the_default_max_iter():
    # A ramp moves its active set a bounded distance per step: 1953 steps at n = 10⁴,
    # beyond the old fixed default of 1000 (SolverError). The default is max(1000, 2n).
    x = torch.arange(10_000, dtype=F64)
    y = tv_denoise(x, 4e6)
    box, sign = _certificate(x, y, torch.tensor(4e6, dtype=F64))
    assert box < 1e-12 and sign < 1e-12


def test_tv_lam_zero_neighbours_that_centring_rounds_together():
    # x = [-3, -3, 0.1, nextafter(0.1)]: centred on the median both last entries are 3.1,
    # and at λ = 0 they made one segment: dy3/dλ = -0.5 where it is -1 (the exact limit at
    # λ = 1e-30, and the documented rule: segments are runs of equal entries), silently.
    x = torch.tensor([-3.0, -3.0, 0.1, 0.1], dtype=torch.float64)
    x[3] = torch.nextafter(x[2], torch.tensor(1.0, dtype=torch.float64))
    lam = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tv_denoise(x[None], lam)[0, 3].backward()
    assert float(lam.grad) == -1.0


def test_tv_tiny_row_beside_an_all_zero_row():
    # A row of 1e-313 entries solves alone; beside an all-zero row with λ = 0 the batch's
    # smallest magnitude was 0, which turned the scale-up of tiny rows off: SolverError.
    x = torch.linspace(0, 10, 21, dtype=torch.float64) * 1e-313
    lam = torch.tensor([3 * 1e-313, 0.0], dtype=torch.float64)  # (3 * 1e-313: the failing subnormal)
    alone = tv_denoise(x[None], lam[:1])
    both = tv_denoise(torch.stack([x, torch.zeros_like(x)]), lam)
    assert torch.equal(both[:1], alone) and torch.equal(both[1], torch.zeros_like(x))


@pytest.mark.parametrize("jac", [torch.func.jacfwd, torch.func.jacrev])
@pytest.mark.parametrize("shape", [(0, 4), (2, 0, 4)])
def test_tv_jacobians_on_an_empty_batch(jac, shape):
    """On an empty batch, torch.func.jacfwd raised torch's "cannot reshape tensor of 0 elements
    into shape [0, -1, 4]" (rows reshaped with -1 beside the tangents' vmap dim of 0) and jacrev
    "Batching rule not implemented for aten::clamp_" (the backward's segment counts built from
    the vmapped cotangent). Plain torch gives an empty Jacobian, (*y.shape, *x.shape): so now
    do x's and lam's."""
    x = torch.randn(*shape, dtype=torch.float64)
    assert jac(lambda x: tv_denoise(x, 0.3))(x).shape == (*shape, *shape)
    lam = torch.full(shape[:-1], 0.3, dtype=torch.float64)
    assert jac(lambda lam: tv_denoise(x, lam))(lam).shape == (*shape, *shape[:-1])
