"""The registry's matrix problems with a row-shift symmetry, solved on their matrix parameter
centred per row (``CentredLayer``): ``birkhoff`` (X + u1ᵀ leaves the projection unchanged),
``ot_lp`` and ``ot_entropic`` (C + u1ᵀ leaves the plan unchanged, a and b as given).

At X = randn + 1e9 the Birkhoff cone program was off by 7e-8 and ``ot_entropic`` at C + 1e8
by 5e-10 (1e-16 offset-free), without a warning or with an unhelpful one. References are
independent of the cone program and posed on the offset-free input ``(X0 + c) - c`` (exact in
float64, Sterbenz): Clarabel at 1e-12 and the closed-form Jacobian of the Birkhoff projection
(the orthogonal projection onto the directions that keep the support's row and column sums),
the native Sinkhorn node for the entropic plan and its gradients, and HiGHS for the LP."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import convexddn as cddn
from convexddn.errors import NonFiniteError

F64 = torch.float64
OFFSETS = (1e8, 1e9)
BATCHES = ((), (2,), (2, 3))


def _offset(shape: tuple[int, ...], off: float, seed: int, rand: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``X0 + off`` and its exact offset-free part ``(X0 + off) - off``."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand if rand else torch.randn)(*shape, dtype=F64, generator=gen) + off
    return x, x - off


def _birkhoff_reference(x0: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The projection of ``x0`` ``(n, n)`` onto the doubly stochastic matrices (Clarabel at
    1e-12) and the vector-Jacobian product with ``g`` in closed form: on the support S of the
    solution (strictly complementary for random input) the Jacobian is the orthogonal projection
    onto {D on S : D1 = 0, Dᵀ1 = 0}."""
    import cvxpy as cp
    from scipy.linalg import null_space

    n = x0.shape[0]
    p = cp.Variable((n, n))
    cp.Problem(cp.Minimize(cp.sum_squares(p - x0)), [p >= 0, cp.sum(p, 0) == 1, cp.sum(p, 1) == 1]).solve(
        solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    sol = p.value
    support = np.argwhere(sol > 1e-7)
    assert not ((sol > 1e-10) & (sol < 1e-5)).any()  # (the support is clear-cut)
    sums = np.zeros((2 * n, len(support)))
    for k, (i, j) in enumerate(support):
        sums[i, k] = sums[n + j, k] = 1.0
    basis = null_space(sums)
    gs = g[support[:, 0], support[:, 1]]
    grad = np.zeros((n, n))
    grad[support[:, 0], support[:, 1]] = basis @ (basis.T @ gs)
    return sol, grad


def _strict(layer, *values: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The layer's output and the gradients of ⟨g, output⟩ w.r.t. ``values``; no warning allowed."""
    leaves = [v.clone().requires_grad_() for v in values]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = layer(*leaves)
        grads = torch.autograd.grad((y * g).sum(), leaves)
    return y.detach(), grads


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("off", OFFSETS)
def test_birkhoff_at_offsets_against_clarabel_and_the_closed_form_jacobian(off, batch):
    n = 5
    cone = cddn.layer("birkhoff", n=n, backend="cvxpy")
    x, x0 = _offset(batch + (n, n), off, seed=0)
    g = torch.randn(batch + (n, n), dtype=F64, generator=torch.Generator().manual_seed(1))
    p, (grad,) = _strict(cone, x, g=g)
    assert p.shape == batch + (n, n)
    refs = [_birkhoff_reference(a, b) for a, b in zip(x0.reshape(-1, n, n).numpy(), g.reshape(-1, n, n).numpy())]
    want = torch.from_numpy(np.stack([r[0] for r in refs])).reshape(p.shape)
    want_grad = torch.from_numpy(np.stack([r[1] for r in refs])).reshape(p.shape)
    # (offset-free, the cone program agrees with Clarabel to ~1e-11; uncentred it was off by 9e-9 at 1e8)
    torch.testing.assert_close(p, want, atol=1e-9, rtol=0)
    torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=0)


def test_birkhoff_float32_is_centred_in_float64_and_returned_in_float32():
    """float32 X at 1e6 (ulp 0.0625): the offset-free part is exact in float64, its projection
    the reference; the output and the gradient come back in float32."""
    n, off = 4, 1e6
    cone = cddn.layer("birkhoff", n=n, backend="cvxpy")
    gen = torch.Generator().manual_seed(3)
    x32 = (torch.randn(3, n, n, generator=gen) + off).float()
    x0 = x32.double() - off
    g = torch.randn(3, n, n, dtype=F64, generator=gen)
    p, (grad,) = _strict(cone, x32, g=g.float())
    assert p.dtype == grad.dtype == torch.float32
    refs = [_birkhoff_reference(a, b) for a, b in zip(x0.numpy(), g.numpy())]
    want = torch.from_numpy(np.stack([r[0] for r in refs])).float()
    torch.testing.assert_close(p, want, atol=2 * torch.finfo(torch.float32).eps, rtol=0)
    torch.testing.assert_close(grad, torch.from_numpy(np.stack([r[1] for r in refs])).float(), atol=1e-5, rtol=0)


def _marginals(m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.tensor([0.2, 0.3, 0.5][:m], dtype=F64)
    b = torch.tensor([0.4, 0.35, 0.25][:n], dtype=F64)
    return a / a.sum(), b / b.sum()


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("off", OFFSETS)
def test_ot_entropic_at_offsets_against_the_native_node(off, batch):
    """The plan and the registry's gradients w.r.t. C, a and b (b's last entry implied) equal
    the native Sinkhorn node's on the offset-free C. a is shared across the batch (broadcast),
    b carries the batch: the centred C goes beside them as given."""
    m = n = 3
    cone = cddn.layer("ot_entropic", m=m, n=n, eps=1.0, backend="cvxpy")
    native = cddn.layer("ot_entropic", m=m, n=n, eps=1.0, backend="native")
    c, c0 = _offset(batch + (m, n), off, seed=4, rand=True)
    a, b = _marginals(m, n)
    b = b.expand(batch + (n,)).clone()
    g = torch.randn(batch + (m, n), dtype=F64, generator=torch.Generator().manual_seed(5))
    p, (gc, ga, gb) = _strict(cone, c, a, b, g=g)
    want, (wc, wa, wb) = _strict(native, c0, a, b, g=g)
    assert p.shape == batch + (m, n)
    # (uncentred: 5e-10 at 1e8 with a SolverWarning, 1.7e-12 at 1e6; offset-free ~1e-16)
    torch.testing.assert_close(p, want, atol=1e-12, rtol=0)
    for got, ref in ((gc, wc), (ga, wa), (gb, wb)):
        torch.testing.assert_close(got, ref, atol=1e-7, rtol=0)


def test_ot_entropic_float32_and_a_float64_marginal():
    """float32 C, a, b: the plan and every gradient in float32; a float64 ``a`` promotes the
    plan to float64 (the cone program's dtype rule), the centred C's float32 gradient unchanged."""
    m = n = 3
    off = 1e4
    cone = cddn.layer("ot_entropic", m=m, n=n, eps=1.0, backend="cvxpy")
    native = cddn.layer("ot_entropic", m=m, n=n, eps=1.0, backend="native")
    c32 = (torch.rand(2, m, n, generator=torch.Generator().manual_seed(6)) + off).float()
    c0 = c32.double() - off  # exact
    a, b = _marginals(m, n)
    g = torch.randn(2, m, n, dtype=F64, generator=torch.Generator().manual_seed(7))
    want, (wc, wa, wb) = _strict(native, c0, a, b, g=g)
    p, grads = _strict(cone, c32, a.float(), b.float(), g=g.float())
    assert p.dtype == torch.float32 and all(v.dtype == torch.float32 for v in grads)
    torch.testing.assert_close(p, want.float(), atol=2 * torch.finfo(torch.float32).eps, rtol=0)
    for got, ref in zip(grads, (wc, wa, wb)):
        torch.testing.assert_close(got, ref.float(), atol=1e-5, rtol=0)
    p, (gc, _, _) = _strict(cone, c32, a, b.float(), g=g)
    assert p.dtype == F64 and gc.dtype == torch.float32
    torch.testing.assert_close(p, want, atol=1e-7, rtol=0)  # (a float32 b's rounding: its own problem)


@pytest.mark.parametrize("off", (0.0, 1e9))
def test_ot_lp_at_offsets_against_highs(off):
    """A generic LP plan is a vertex: HiGHS on the offset-free C; its gradient w.r.t. C is 0."""
    from scipy.optimize import linprog

    m, n = 3, 3
    cone = cddn.layer("ot_lp", m=m, n=n, backend="cvxpy")
    c, c0 = _offset((2, m, n), off, seed=8, rand=True)
    a, b = _marginals(m, n)
    p, (gc,) = _strict(lambda v: cone(v, a, b), c, g=torch.ones(2, m, n, dtype=F64))
    eq = np.vstack([np.kron(np.eye(m), np.ones(n)), np.kron(np.ones(m), np.eye(n))])
    for k in range(2):
        res = linprog(c0[k].numpy().ravel(), A_eq=eq, b_eq=np.concatenate([a.numpy(), b.numpy()]), method="highs")
        torch.testing.assert_close(p[k], torch.from_numpy(res.x.reshape(m, n)), atol=1e-9, rtol=0)
    torch.testing.assert_close(gc, torch.zeros_like(gc), atol=1e-9, rtol=0)


def test_matrix_shift_layers_take_an_empty_batch():
    """An empty X or C, and an empty batch through a marginal beside a (centred) C: empty outputs
    of the right shape, and backward through them."""
    birk = cddn.layer("birkhoff", n=4, backend="cvxpy")
    x = torch.zeros(0, 4, 4, dtype=F64, requires_grad=True)
    y = birk(x)
    assert y.shape == (0, 4, 4)
    y.sum().backward()
    assert x.grad.shape == (0, 4, 4)
    ot = cddn.layer("ot_entropic", m=3, n=3, backend="cvxpy")
    a, b = _marginals(3, 3)
    assert ot(torch.zeros(0, 3, 3, dtype=F64), a, b).shape == (0, 3, 3)
    c = torch.rand(3, 3, dtype=F64) + 1e8
    assert ot(c, a.expand(0, 3), b).shape == (0, 3, 3)


def test_matrix_shift_layers_name_nonfinite_parameters():
    """NaN / Inf in the centred parameter or beside it: the layer's own error, naming it."""
    birk = cddn.layer("birkhoff", n=4, backend="cvxpy")
    x = torch.zeros(2, 3, 4, 4, dtype=F64)
    x[0, 1, 2, 2] = float("nan")
    want = r"^parameter 0 \(X\) must be finite, got 1 NaN and 0 Inf value\(s\) among 96 \(shape \(2, 3, 4, 4\)\)$"
    with pytest.raises(NonFiniteError, match=want):
        birk(x)
    ot = cddn.layer("ot_entropic", m=3, n=3, backend="cvxpy")
    a, b = _marginals(3, 3)
    c = torch.rand(2, 3, 3, dtype=F64) + 1e8
    bad = c.clone()
    bad[1, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"^parameter 0 \(C\) must be finite, got 0 NaN and 1 Inf"):
        ot(bad, a, b)
    with pytest.raises(NonFiniteError, match=r"^parameter 1 \(a\) must be finite, got 1 NaN and 0 Inf"):
        ot(c, torch.tensor([0.5, float("nan"), 0.5], dtype=F64), b)
