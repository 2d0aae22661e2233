"""Tests of convexddn.nodes.entmax: α-entmax, softmax and sparsemax as its special cases."""
from __future__ import annotations

import warnings
from fractions import Fraction

import cvxpy as cp
import numpy as np
import pytest
import torch
from torch.autograd import gradcheck
from torch.autograd.functional import jacobian

from convexddn.errors import (
    DTypeError,
    GradientWarning,
    InputError,
    NonFiniteError,
    OptionError,
    ShapeError,
)
from convexddn.nodes.entmax import Entmax, entmax

F64 = torch.float64
ALPHAS = [1.25, 1.5, 1.75, 2.0, 3.0]


def _x(*shape: int, seed: int = 0, scale: float = 1.0, dtype=F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


def _sparsemax_sort(x: torch.Tensor) -> torch.Tensor:
    """Martins & Astudillo 2016, Alg. 1: the closed form by sorting (last dim)."""
    u, _ = x.sort(-1, descending=True)
    k = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype)
    cs = u.cumsum(-1)
    support = (1 + k * u > cs).sum(-1, keepdim=True)
    tau = (cs.gather(-1, support - 1) - 1) / support
    return (x - tau).clamp(min=0)


def _entmax15_sort(x: torch.Tensor) -> torch.Tensor:
    """Peters, Niculae & Martins 2019, Alg. 2: exact 1.5-entmax by sorting (last dim)."""
    u = x / 2
    u = u - u.amax(-1, keepdim=True)
    us, _ = u.sort(-1, descending=True)
    k = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype)
    mean = us.cumsum(-1) / k
    ss = k * ((us * us).cumsum(-1) / k - mean * mean)
    tau = mean - ((1 - ss) / k).clamp(min=0).sqrt()
    support = (tau <= us).sum(-1, keepdim=True)
    return (u - tau.gather(-1, support - 1)).clamp(min=0) ** 2


def _cvxpy_entmax(x: np.ndarray, alpha: float) -> np.ndarray:
    p = cp.Variable(x.shape[0])
    objective = cp.sum(cp.power(p, alpha)) / (alpha * (alpha - 1)) - x @ p
    cp.Problem(cp.Minimize(objective), [p >= 0, cp.sum(p) == 1]).solve(
        solver=cp.CLARABEL, tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11
    )
    return p.value


# --------------------------------------------------------------------------- solution


def test_entmax_alpha1_is_softmax():
    x = _x(4, 7)
    assert torch.equal(entmax(x, alpha=1.0), torch.softmax(x, -1))
    assert torch.allclose(entmax(x, alpha=1.0 + 1e-6), torch.softmax(x, -1), atol=1e-5)


@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
def test_entmax_alpha2_is_sparsemax(scale):
    x = _x(6, 9, seed=1, scale=scale)
    assert torch.allclose(entmax(x, alpha=2.0), _sparsemax_sort(x), atol=1e-15)


@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
def test_entmax15_matches_sort_closed_form(scale):
    x = _x(6, 9, seed=2, scale=scale)
    p = entmax(x, alpha=1.5)
    assert torch.allclose(p, _entmax15_sort(x), atol=1e-15, rtol=1e-13)
    if scale >= 10:
        assert (p == 0).any()  # sparse once the scores spread out


def test_entmax_long_sparse_rows():
    # Long rows with small supports: the solver drops the entries below τ midway.
    x = _x(16, 500, seed=13, scale=5.0)
    p = entmax(x, alpha=1.5)
    assert (p > 0).sum(-1).max() < 125
    assert torch.allclose(p, _entmax15_sort(x), atol=1e-15, rtol=1e-13)


@pytest.mark.filterwarnings("ignore:Solution may be inaccurate")
@pytest.mark.parametrize("alpha", ALPHAS)
def test_entmax_matches_cvxpy(alpha):
    x = _x(7, seed=3, scale=2.0)
    expected = _cvxpy_entmax(x.numpy(), alpha)
    np.testing.assert_allclose(entmax(x, alpha).numpy(), expected, atol=1e-7)


@pytest.mark.parametrize("alpha", ALPHAS + [1.05, 6.0])
def test_entmax_optimality(alpha):
    # p_i = [(α−1)x_i − τ]_+^{1/(α−1)}: one τ for the support, every other entry below it.
    x = _x(5, 40, seed=4, scale=3.0)
    p = entmax(x, alpha)
    assert torch.allclose(p.sum(-1), torch.ones(5, dtype=F64), atol=1e-15)
    assert (p >= 0).all()
    z = (alpha - 1) * x
    on = p > 0
    tau = torch.where(on, z - p ** (alpha - 1), torch.nan)
    lo = torch.where(on, tau, torch.inf).amin(-1)
    hi = torch.where(on, tau, -torch.inf).amax(-1)
    assert ((hi - lo) < 1e-12 * (1 + z.abs().amax(-1))).all()
    off = torch.where(on, -torch.inf, z).amax(-1)
    assert (off <= hi + 1e-12).all()


def test_entmax_dim_batch_and_dtypes():
    x = _x(2, 5, 3, seed=5)
    for alpha in (1.0, 1.5, 2.0, 2.5):
        p = entmax(x, alpha, dim=1)
        q = entmax(x.transpose(1, 2), alpha).transpose(1, 2)
        assert torch.allclose(p, q, atol=1e-15)
    p32 = entmax(x.float(), 1.5, dim=1)
    assert p32.dtype == torch.float32
    assert torch.allclose(p32.double(), entmax(x, 1.5, dim=1), atol=1e-6)
    p16 = entmax(x.to(torch.bfloat16), 1.5, dim=1)
    assert p16.dtype == torch.bfloat16
    assert entmax(torch.zeros(0, 4, dtype=F64)).shape == (0, 4)
    assert torch.equal(entmax(torch.ones(3, 1, dtype=F64)), torch.ones(3, 1, dtype=F64))


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0, 3.0])
def test_entmax_masked_entries(alpha):
    # -inf masks an entry: probability 0 and the rest as if it were absent.
    x = _x(3, 6, seed=6)
    masked = x.clone()
    masked[:, 2] = -torch.inf
    p = entmax(masked, alpha)
    assert (p[:, 2] == 0).all()
    keep = [0, 1, 3, 4, 5]
    assert torch.allclose(p[:, keep], entmax(x[:, keep], alpha), atol=1e-15)
    xg = masked.clone().requires_grad_()
    (g,) = torch.autograd.grad((entmax(xg, alpha) * x).sum(), xg)
    assert torch.isfinite(g).all() and (g[:, 2] == 0).all()


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("alpha", ALPHAS)
def test_entmax_grad(alpha):
    x = _x(3, 8, seed=7, scale=2.0).requires_grad_()
    assert gradcheck(lambda t: entmax(t, alpha), (x,), atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0])
def test_entmax_jacobian_closed_form(alpha):
    # Peters et al. 2019: J = diag(s) − s sᵀ / 1ᵀs, s = p^{2−α} on the support.
    x = _x(9, seed=8, scale=2.0)
    p = entmax(x, alpha)
    s = torch.where(p > 0, p.clamp(min=1e-300) ** (2 - alpha), torch.zeros_like(p))
    expected = torch.diag(s) - torch.outer(s, s) / s.sum()
    assert torch.allclose(jacobian(lambda t: entmax(t, alpha), x), expected, atol=1e-12)


def test_entmax_grad_dim():
    x = _x(2, 6, 3, seed=9).requires_grad_()
    assert gradcheck(lambda t: entmax(t, 1.5, dim=1), (x,), atol=1e-8, rtol=1e-6)


# --------------------------------------------------------------------------- module, errors


def test_entmax_module():
    m = Entmax(alpha=1.5, dim=1)
    assert repr(m) == "Entmax(alpha=1.5, dim=1)"
    x = _x(2, 5, 3, seed=10)
    assert torch.equal(m(x), entmax(x, 1.5, 1))
    with pytest.raises(OptionError, match="alpha"):
        Entmax(alpha=0.5)
    with pytest.raises(OptionError, match="dim"):
        Entmax(dim=1.0)


def test_entmax_invalid():
    x = _x(2, 4, seed=11)
    with pytest.raises(DTypeError, match="x"):
        entmax(torch.ones(2, 3, dtype=torch.int64))
    for alpha in (0.5, -1.0, float("nan"), float("inf"), True, "1.5"):
        with pytest.raises(OptionError, match="alpha"):
            entmax(x, alpha)
    with pytest.raises(ShapeError, match="dim"):
        entmax(x, 1.5, dim=2)
    with pytest.raises(ShapeError, match="at least one entry"):
        entmax(torch.ones(2, 0, dtype=F64))
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[0, 1] = bad
        with pytest.raises(NonFiniteError, match="x"):
            entmax(y, 1.5)
    y = x.clone()
    y[1] = -torch.inf
    with pytest.raises(InputError, match="all -inf"):
        entmax(y, 1.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_entmax_cuda():
    x = _x(4, 9, seed=12)
    for alpha in (1.0, 1.5, 2.0, 2.5):
        xc = x.cuda().requires_grad_()
        p = entmax(xc, alpha)
        assert p.device.type == "cuda"
        assert torch.allclose(p.cpu(), entmax(x, alpha), atol=1e-12)
        p.pow(2).sum().backward()


# --------------------------------------------------------------------------- accuracy


def _mp_entmax(x, alpha: float, dps: int = 60):
    """Reference α-entmax of one row in mpmath: τ by bisection on Σ[(α−1)xᵢ − τ]_+^k = 1."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = dps
    a = mp.mpf(alpha)
    z = [(a - 1) * mp.mpf(float(v)) for v in x]
    k = 1 / (a - 1)
    lo, hi = max(z) - 1, max(z)
    for _ in range(4 * dps):
        mid = (lo + hi) / 2
        if sum(max(zi - mid, 0) ** k for zi in z) >= 1:
            lo = mid
        else:
            hi = mid
    p = [max(zi - lo, 0) ** k for zi in z]
    return [float(v / sum(p)) for v in p]


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16])
def test_sparsemax_large_scores(dtype):
    # x − (max − 1) rounded to x once ulp(max) ≥ 1: the floor used to swallow every entry.
    big = {torch.float32: 4e7, F64: 1e17, torch.bfloat16: 600.0}[dtype]
    p = entmax(torch.tensor([big, 0.0], dtype=dtype), alpha=2.0)
    assert p.tolist() == [1.0, 0.0]
    p = entmax(torch.tensor([1e30, -1e30, 1e30, 0.0], dtype=torch.float32), alpha=2.0)
    assert p.tolist() == [0.5, 0.0, 0.5, 0.0]
    # Jacobian of sparsemax with support {0, 1}: diag(m) − m mᵀ/2.
    x = torch.tensor([1e30, 1e30, 0.0], requires_grad=True)
    entmax(x, alpha=2.0)[0].backward()
    assert x.grad.tolist() == [0.5, -0.5, 0.0]


def _two_entry(alpha: float, gap: float) -> tuple[float, float]:
    """p₂ and dp₂/dΔ for x = (0, −gap): p₁^{α−1} − p₂^{α−1} = (α−1)·gap, p₁ + p₂ = 1."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 50
    a, g = mp.mpf(alpha), mp.mpf(gap)
    p2 = mp.findroot(lambda q: (1 - q) ** (a - 1) - q ** (a - 1) - (a - 1) * g, (0, 0.5),
                     solver="anderson")
    return float(p2), float(-1 / ((1 - p2) ** (a - 2) + p2 ** (a - 2)))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("alpha,gap", [(10.0, 0.1), (3.0, 0.4999), (4.0, 0.3), (2.5, 0.2)])
def test_entmax_alpha_gt2_two_entries(dtype, alpha, gap):
    # k = 1/(α−1) < 1: the small entry is below τ's rounding (p₂^{α−1} ≪ eps·|τ|), but
    # it is fixed by p₂ = 1 − p₁; dividing by Σp used to spread its error onto p₁
    # (α = 10: [0.863, 0.137] for [0.98836, 0.01164]).
    p2, dp2 = _two_entry(alpha, gap)
    eps = torch.finfo(dtype).eps
    x = torch.tensor([0.0, -gap], dtype=dtype, requires_grad=True)
    p = entmax(x, alpha)
    np.testing.assert_allclose(p.tolist(), [1 - p2, p2], rtol=4 * eps, atol=4 * eps)
    # VJP for g: (g₂ − g₁)·dp₂/dΔ·(1, −1), Δ = x₁ − x₂ (used to be [−3.26, 3.74]).
    p.backward(torch.tensor([1.0, 2.0], dtype=dtype))
    np.testing.assert_allclose(x.grad.tolist(), [dp2, -dp2], rtol=64 * eps)


def test_entmax_alpha_gt2_unresolved_entries_do_not_pollute():
    # Scores built from p = (.5, .3, .14, .02, .02, .02) at α = 10 (xᵢ = pᵢ^{α−1}/(α−1)):
    # the last three are below τ's rounding in float32 and float64. Their individual
    # values are not resolved (they hinge on sub-ulp differences), but the others must
    # meet the documented bound (2 eps/(α−1))·(p_max/pᵢ)^{α−1} and the unresolved ones
    # must carry exactly the mass that is left.
    alpha = 10.0
    target = np.array([0.5, 0.3, 0.14, 0.02, 0.02, 0.02])
    for dtype in (torch.float32, F64):
        x = torch.tensor(target ** (alpha - 1) / (alpha - 1), dtype=dtype)
        ref = np.array(_mp_entmax(x.tolist(), alpha))  # exact for the rounded scores
        eps = torch.finfo(dtype).eps
        p = entmax(x, alpha).double().numpy()
        bound = 2 * eps / (alpha - 1) * (ref.max() / ref[:3]) ** (alpha - 1)
        assert (np.abs(p[:3] - ref[:3]) <= 4 * bound * ref[:3] + 4 * eps).all()
        # Mass conservation: the unresolved entries absorb the error of the others.
        assert abs(p.sum() - 1) <= 8 * eps
        assert abs(p[3:].sum() - ref[3:].sum()) <= np.abs(p[:3] - ref[:3]).sum() + 16 * eps


@pytest.mark.parametrize("alpha", [2.5, 3.0])
def test_entmax_alpha_gt2_near_uniform(alpha):
    # τ ≈ −n^{1−α} ≪ 1: bisection to an absolute width of eps used to leave ~1% errors.
    x = _x(300, seed=14, scale=1e-5)
    ref = np.array(_mp_entmax(x.tolist(), alpha, dps=30))
    p = entmax(x.float(), alpha).double().numpy()
    on = ref > 0.5 * ref.max()
    np.testing.assert_allclose(p[on], ref[on], rtol=1e-5)


def test_entmax_float16_grad_alpha_gt2():
    # s = p^{2−α} overflowed in float16: NaN gradients.
    x = torch.tensor([0.4363, 0.4534], dtype=torch.float16, requires_grad=True)
    p = entmax(x, 10.0)
    p.backward(torch.tensor([1.0, 0.0], dtype=torch.float16))
    # Entry 2 is the large one: Δ = x₂ − x₁ and the loss is p₁ = p_small.
    p2, dp2 = _two_entry(10.0, float(x[1].item() - x[0].item()))
    np.testing.assert_allclose(p.tolist(), [p2, 1 - p2], rtol=2e-3, atol=1e-3)
    np.testing.assert_allclose(x.grad.tolist(), [-dp2, dp2], rtol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, F64])
def test_entmax_huge_alpha(dtype):
    # α − 1 > float32's max became inf in a float32 product: NaN output.
    p = entmax(torch.tensor([0.0, -1.0, 2.0], dtype=dtype), alpha=1e39)
    assert p.tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("alpha", [2.05, 2.5, 2.95])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_entmax_one_hot_rows_stay_one_hot(alpha, dtype):
    # Entries at the floor (never in the support) got the rounding shortfall of the top
    # entry as mass: p = [1 - 6e-8, 3e-8, 3e-8] and a gradient [1, -0.5, -0.5] for the
    # exact [0, 0, 0] (the support is one entry: p is locally constant).
    x = torch.tensor([2.0, 0.0, -1.0], dtype=dtype, requires_grad=True)
    p = entmax(x, alpha=alpha)
    assert p[1] == 0 and p[2] == 0 and abs(float(p[0]) - 1.0) <= 4 * torch.finfo(dtype).eps
    p[0].backward()
    assert bool((x.grad == 0).all())


def _entmax_bisect_ref(x: np.ndarray, alpha: float) -> np.ndarray:
    """α-entmax of one row by bisection on τ in float64 NumPy (an independent solver)."""
    z = (alpha - 1.0) * (x - x.max())
    k = 1.0 / (alpha - 1.0)
    lo, hi = -1.0, 0.0  # f(lo) >= 1 >= f(hi)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if (np.clip(z - mid, 0.0, None) ** k).sum() > 1.0:
            lo = mid
        else:
            hi = mid
    p = np.clip(z - 0.5 * (lo + hi), 0.0, None) ** k
    return p / p.sum()


@pytest.mark.parametrize("alpha", [4.0])
def test_entmax_long_rows_and_padding_keep_their_mass(alpha):
    """alpha > 2 in float32: the missing mass 1 - sum p was dropped as rounding below
    4 (n + 1) eps, n the full row length: rows of 4096 summed to 1 - 1e-4 (entries off by
    1e-4), and 1000 masked -inf entries moved a 3-entry row's second entry by 7 %."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4096, generator=gen)
    p = entmax(x, alpha)
    ref = np.stack([_entmax_bisect_ref(r, alpha) for r in x.double().numpy()])
    assert float((p.double() - torch.from_numpy(ref)).abs().max()) < 1e-5
    assert float((p.double().sum(-1) - 1).abs().max()) < 1e-5
    row = [3.116879463195801, 3.1135170459747314, 3.271545648574829]
    ref = _entmax_bisect_ref(np.array(row), alpha)
    padded = [entmax(torch.tensor(row + [float("-inf")] * pad), alpha)[:3] for pad in (0, 1000)]
    for p in padded:
        np.testing.assert_allclose(p.double().numpy(), ref, rtol=0, atol=2e-7)
    assert float((padded[0] - padded[1]).abs().max()) <= 1e-7
    # A near-uniform row of 3000 at alpha = 3 summed to 0.99915 (its shortfall was dropped).
    x = torch.zeros(3000)
    x[5] = 1e-3
    ref = _entmax_bisect_ref(x.double().numpy(), 3.0)
    p = entmax(x, 3.0)
    assert abs(float(p.double().sum()) - 1.0) < 1e-5
    assert float((p.double() - torch.from_numpy(ref)).abs().max()) < 1e-8


def test_entmax_alpha_just_above_one_is_not_uniform():
    """alpha = 1 + 1e-9 in float32 returned [1/3, 1/3, 1/3] (n^(-1/k) rounds to 1): such
    rows are solved in float64, and below alpha - 1 = 1e-10 the softmax limit is used.
    Reference: entmax tends to softmax as alpha -> 1 (difference O((alpha - 1) x^2))."""
    x = torch.tensor([1.0, 0.0, -0.5])
    soft = torch.softmax(x.double(), 0)
    for a in (1 + 1e-9, 1 + 1e-6):  # solved in float64 (below 1 + 1e-10: softmax itself)
        torch.testing.assert_close(entmax(x, a).double(), soft, rtol=1e-5, atol=0)
    ref = torch.from_numpy(_entmax_bisect_ref(x.double().numpy(), 1.01))
    torch.testing.assert_close(entmax(x, 1.01).double(), ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("alpha", [1.5, 2.0, 3.0])
def test_entmax_forward_mode_matches_finite_differences(alpha):
    # Forward mode skipped the Function (nothing requires grad) and differentiated the
    # solver: NaN tangents at alpha = 3 (bisection on bit patterns), and at alpha = 2
    # tangents off the simplex ([0, -0.3, -0.3, -0.3] for a one-hot row).
    import torch.autograd.forward_ad as fwAD

    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 7, dtype=F64, generator=g)
    x[0] = torch.tensor([4.0, 0.0, 0.1, -0.2, 0.3, 0.0, 0.2], dtype=F64)  # one dominant score
    v = torch.randn(6, 7, dtype=F64, generator=g)
    h = 1e-6
    fd = (entmax(x + h * v, alpha) - entmax(x - h * v, alpha)) / (2 * h)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(entmax(fwAD.make_dual(x, v), alpha)).tangent
    _, tangent_func = torch.func.jvp(lambda z: entmax(z, alpha), (x,), (v,))
    for t in (tangent, tangent_func):
        torch.testing.assert_close(t, fd, atol=1e-7, rtol=0)
        torch.testing.assert_close(t.sum(-1), torch.zeros(6, dtype=F64), atol=1e-12, rtol=0)


def test_entmax_tangent_differentiated_again_raises():
    # The jvp's tangent taken through reverse mode gave NaN (p.sqrt() at p = 0), and
    # torch.func.grad over torch.func.jvp zeros: both are a second derivative, which the
    # node does not provide.
    import torch.autograd.forward_ad as fwAD

    from convexddn.errors import DoubleBackwardError

    x = torch.tensor([0.3, -1.2, 2.0, 0.1, 0.9, -0.4], dtype=F64, requires_grad=True)
    v = torch.tensor([1.0, 2.0, -1.0, 0.5, 0.3, -0.2], dtype=F64)
    with fwAD.dual_level():
        t = fwAD.unpack_dual(entmax(fwAD.make_dual(x, v), 1.5)).tangent
        with pytest.raises(DoubleBackwardError):
            torch.autograd.grad(t[0], x)
    with pytest.raises(DoubleBackwardError):
        torch.func.grad(lambda z: torch.func.jvp(lambda u: entmax(u, 1.5), (z,), (v,))[1][0])(x.detach())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparsemax_masked_long_half_rows(dtype):
    """Masked attention in half precision: two live keys (0.25 and 0) among 4096 -inf:
    sparsemax is (0.625, 0.375, 0, …), exact in both dtypes. bfloat16 gave (0.992,
    0.742) before (prefix sums in bfloat16)."""
    x = torch.full((4096,), -float("inf"), dtype=dtype)
    x[:2] = torch.tensor([0.25, 0.0])
    p = entmax(x, 2.0)
    assert p.dtype == dtype
    assert p[:2].tolist() == [0.625, 0.375] and not p[2:].any()


def test_entmax_alpha_gt2_gradient_with_a_tiny_support_entry_is_finite():
    """alpha = 30, float32: s_j = p_min^(2 - alpha) of the small support entry p = 1.2e-3
    is 1e82, beyond float32, while each product s_i (h_i - c) is about 1: formed as two
    factors it met inf * 0 and every entry of the gradient (and tangent) was NaN, in 181
    of 20000 random rows at alpha = 25 and from alpha ~ 18 on. The support is two entries,
    so the gradient is the two-entry closed form (mpmath) on them and 0 elsewhere."""
    vals = [0.13086582720279694, 0.09433448314666748, 0.016212550923228264,
            0.16417434811592102, -0.10875751078128815, 0.09494283050298691]
    x = torch.tensor(vals, requires_grad=True)
    p = entmax(x, 30.0)
    assert (p > 0).tolist() == [True, False, False, True, False, False]
    (g,) = torch.autograd.grad(p[3], x)
    # p_0 is the small entry: dp_3/dx_0 = -dp_3/dx_3 = dp_small/dgap, gap = x_3 - x_0.
    _, dp2 = _two_entry(30.0, vals[3] - vals[0])
    np.testing.assert_allclose(g.tolist(), [dp2, 0, 0, -dp2, 0, 0], rtol=1e-4, atol=0)
    rows = torch.randn(4000, 6, generator=torch.Generator().manual_seed(0)) * 0.1
    for alpha in (18.0, 25.0, 100.0):
        xr = rows.clone().requires_grad_(True)
        pr = entmax(xr, alpha)
        (gr,) = torch.autograd.grad(pr, xr, torch.randn(pr.shape, generator=torch.Generator().manual_seed(1)))
        assert torch.isfinite(gr).all()
        assert gr.sum(-1).abs().max() <= 1e-4 * gr.abs().amax(-1).clamp_min(1).max()
        _, t = torch.func.jvp(lambda z: entmax(z, alpha), (rows,), (torch.ones_like(rows).cumsum(-1),))
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("alpha,gap", [(100.0, 0.005), (1000.0, 2e-4)])
def test_entmax_alpha_gt2_gradient_far_beyond_float64s_range(alpha, gap):
    """float64, two entries: s_small = p_small^(2 - alpha) passes 1e308 (1e392 at
    alpha = 100) while the gradient is about 1; the two-entry closed form (mpmath)."""
    p2, dp2 = _two_entry(alpha, gap)
    x = torch.tensor([0.0, -gap], dtype=F64, requires_grad=True)
    p = entmax(x, alpha)
    np.testing.assert_allclose(p[1].item(), p2, rtol=1e-6)
    p.backward(torch.tensor([1.0, 2.0], dtype=F64))
    np.testing.assert_allclose(x.grad.tolist(), [dp2, -dp2], rtol=1e-6)
    x = torch.tensor([0.0, -1e-3, -2e-3, -5.0, -5.0], dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(entmax(x, 1000.0)[0], x)
    assert torch.isfinite(g).all() and abs(float(g.sum())) <= 1e-12 * float(g.abs().max())


@pytest.mark.parametrize("x, alpha, tied", [
    (torch.tensor([1.0, 1.0, 0.0]), 150.0, 2),  # float32: the threshold is below 2^-126
    (torch.tensor([1.0, 1.0, 0.0], dtype=F64), 1100.0, 2),  # float64: below 2^-1074, i.e. 0
    (torch.zeros(2, 1024), 15.0, 1024),  # an all-equal attention row
    (torch.zeros(64, dtype=torch.bfloat16), 30.0, 64),
    (torch.tensor([0.5, 0.5, 0.5, -1e9]), 120.0, 3),  # masked by a large negative constant
])
def test_tied_maxima_share_the_mass_at_any_alpha(x, alpha, tied):
    # k entries tied at the top, the rest far below: p = 1/k on the ties (symmetry). The
    # threshold p_max^(α−1) left the working dtype's range and every entry came out NaN.
    p = entmax(x, alpha)
    expected = torch.where(x == x.amax(-1, keepdim=True), 1.0 / tied, 0.0).to(x.dtype)
    assert torch.equal(p, expected)


def test_a_near_tie_at_large_alpha_matches_the_closed_form():
    # x = (0, −δ) at α = 50: p₁ − p₂ solves p₁^{49} − p₂^{49} = 49 δ with p₁ + p₂ = 1; the
    # rescaled weights must not change a row whose threshold is representable.
    x = torch.tensor([0.0, -1e-30], dtype=F64)
    p = entmax(x, 50.0)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-15)
    assert torch.isfinite(p).all() and (p - 0.5).abs().max() < 1e-12


def test_a_gradient_beyond_the_dtype_range_warns():
    # zeros(9) at α = 50: p = 1/9, s = p^{2−α} = 9^48 ≈ 6e45 > float32's max, so the true
    # gradient s(g − mean g) overflows float32: said, not a silent Inf.
    x = torch.zeros(9, requires_grad=True)
    p = entmax(x, 50.0)
    with pytest.warns(GradientWarning, match="exceeds the range of torch.float32"):
        p[0].backward()
    # float64 holds it: finite and the closed form, no warning.
    x64 = torch.zeros(9, dtype=F64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        entmax(x64, 50.0)[0].backward()
    expected = 9.0**48 * (torch.eye(9, dtype=F64)[0] - 1 / 9)
    assert torch.allclose(x64.grad, expected, rtol=1e-12)


@pytest.mark.parametrize("dim", [-1, 1])
def test_the_gradient_overflow_warning_names_the_batch_index(dim):
    # It named (1, 2) of a (2, 3) batch as "flat indices [5]"; now (1, 2), whichever dim is
    # reduced. zeros(9) at (1, 2) (the overflow above), a one-hot p (gradient 0) elsewhere.
    x = torch.zeros(2, 3, 9)
    x[..., 0] = 100.0
    x[1, 2] = 0.0
    x = x.movedim(-1, dim).contiguous().requires_grad_()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with pytest.warns(GradientWarning, match=r"x at 1 of 6 batch element\(s\) \(indices \[\(1, 2\)\]\)"):
        torch.autograd.grad(entmax(x, 50.0, dim=dim), x, g)

@pytest.mark.parametrize("alpha, match", [
    (10**400, "alpha must be finite and >= 1"),
    (Fraction(10**400, 3), "alpha must be finite and >= 1"),
    (torch.tensor(1.5), "alpha must be a number .* got a tensor .* a constant of the node"),
])
def test_alpha_beyond_the_float_range_or_a_tensor_is_refused_by_name(alpha, match):
    with pytest.raises(OptionError, match=match):
        entmax(_x(3), alpha)
    with pytest.raises(OptionError, match=match):
        Entmax(alpha=alpha)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_entmax_half_inputs_are_rounded_once(dtype, alpha):
    # Half inputs are solved in float32 and rounded once: every entry within one ulp of
    # the float64 answer on the same (half) values. x − max was taken in the half dtype
    # (0.4 % off in bfloat16), and sparsemax's threshold was rounded to it before the
    # subtraction: bfloat16 rows of 4096 summed to 1 ± 1.2e-2, support entries 100 % off.
    x = (torch.randn(4, 4096, generator=torch.Generator().manual_seed(7)) * 2).to(dtype)
    p = entmax(x, alpha)
    want = entmax(x.to(F64), alpha)
    ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
    assert ((p.to(F64) - want).abs() <= ulp * want + 1e-30).all()


def test_entmax_half_support_read_before_rounding():
    """float16 [0, 0, -1.4140625] at α = 1.5: p₃ = 5.7e-9 > 0 rounds to 0 in float16, and
    the backward read the support from that rounded p: column 3 of the Jacobian 0 where
    it is −s₁s₃/Σs = −3.8e-5 (s = p^{1/2}). Reference: τ by bisection in float64 on the
    same float16 values (Σ[z − τ]₊² = 1, z = x/2), J = diag(s) − s sᵀ/Σs on the support."""
    x = torch.tensor([0.0, 0.0, -1.4140625], dtype=torch.float16)
    z = x.double().numpy() / 2
    lo, hi = z.max() - 1.0, z.max()
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (np.clip(z - mid, 0, None) ** 2).sum() > 1 else (lo, mid)
    s = np.clip(z - lo, 0, None)  # p^{1/2}
    assert 0 < s[2] ** 2 < 2.9e-8  # in the support, below float16's smallest subnormal / 2
    ref = np.diag(s) - np.outer(s, s) / s.sum()
    xr = x.clone().requires_grad_()
    assert entmax(xr, alpha=1.5)[2].item() == 0.0
    rows = torch.stack([torch.autograd.grad(entmax(xr, alpha=1.5)[i], xr)[0] for i in range(3)]).double()
    torch.testing.assert_close(rows, torch.from_numpy(ref), rtol=2e-3, atol=1e-7)
    cols = [torch.func.jvp(lambda t: entmax(t, alpha=1.5), (x,), (torch.eye(3, dtype=torch.float16)[j],))[1]
            for j in range(3)]
    torch.testing.assert_close(torch.stack(cols, -1).double(), torch.from_numpy(ref), rtol=2e-3, atol=1e-7)
