"""Tests of convexddn.nodes.eigen: top-k eigenpairs of symmetric matrices.

Expected values come from the eigen equation X V = V Λ, from torch.linalg.eigvalsh,
from torch's own eigh autograd (an independent implementation) on sign-invariant
losses, and from finite differences (gradcheck); never from the module's own output.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from convexddn.errors import DTypeError, GradientWarning, NonFiniteError, OptionError, ShapeError, SolverError
from convexddn.nodes.eigen import EigenDecomposition, EigenResult, eigen_decomposition


def sym(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(shape, generator=g, dtype=dtype)
    return X + X.mT


def with_spectrum(lam, seed=0, batch=()):
    """Q diag(lam) Qᵀ in float64 for a random orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    n = len(lam)
    Q = torch.linalg.qr(torch.randn(batch + (n, n), generator=g, dtype=torch.float64)).Q
    return Q @ torch.diag(torch.tensor(lam, dtype=torch.float64)) @ Q.mT


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("k", [None, 1, 3])
@pytest.mark.parametrize("largest", [True, False])
def test_eigen_decomposition_eigen_equation(k, largest):
    X = sym((4, 6, 6))
    lam, V = eigen_decomposition(X, k, largest=largest)
    kk = 6 if k is None else k
    assert lam.shape == (4, kk) and V.shape == (4, 6, kk)
    torch.testing.assert_close(X @ V, V * lam.unsqueeze(-2), atol=1e-12, rtol=0)
    torch.testing.assert_close(V.mT @ V, torch.eye(kk, dtype=X.dtype).expand(4, kk, kk), atol=1e-13, rtol=0)
    ref = torch.linalg.eigvalsh(X)  # ascending
    expected = ref.flip(-1)[..., :kk] if largest else ref[..., :kk]
    torch.testing.assert_close(lam, expected, atol=1e-12, rtol=0)


def test_eigen_decomposition_sign_convention():
    V = eigen_decomposition(sym((5, 7, 7), seed=1)).eigenvectors
    # The largest-magnitude component of every returned eigenvector is positive.
    top = V.abs().argmax(-2, keepdim=True)
    assert bool((V.gather(-2, top) > 0).all())


def test_eigen_decomposition_sign_at_an_exact_tie():
    # [[0, 1], [1, 0]]: eigenvectors (1, 1)/√2 and (1, -1)/√2, whose entries tie in
    # magnitude; the first of the tied entries is the positive one (it kept eigh's sign).
    for dtype in (torch.float32, torch.float64):
        V = eigen_decomposition(torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=dtype)).eigenvectors
        h = 0.5 ** 0.5
        torch.testing.assert_close(V, torch.tensor([[h, h], [h, -h]], dtype=dtype))
        Vs = eigen_decomposition(torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=dtype), largest=False).eigenvectors
        torch.testing.assert_close(Vs, torch.tensor([[h, h], [-h, h]], dtype=dtype))


def test_eigen_decomposition_overflow_is_an_error():
    # Finite inputs whose eigenvalues leave the dtype's range (or whose X + Xᵀ did).
    for X in (torch.full((3, 3), 3e38), torch.full((4, 4), 2e4, dtype=torch.float16),
              torch.full((3, 3), 1e308, dtype=torch.float64)):
        with pytest.raises(SolverError, match="overflow"):
            eigen_decomposition(X)
    lam = eigen_decomposition(torch.full((3, 3), 1e307, dtype=torch.float64)).eigenvalues  # X + Xᵀ overflowed
    torch.testing.assert_close(lam[0], torch.tensor(3e307, dtype=torch.float64))


def test_eigen_decomposition_symmetrises_input():
    X = torch.randn(3, 5, 5, dtype=torch.float64)
    lam, V = eigen_decomposition(X)
    S = 0.5 * (X + X.mT)
    torch.testing.assert_close(S @ V, V * lam.unsqueeze(-2), atol=1e-12, rtol=0)


def test_eigen_decomposition_batched():
    X = sym((2, 3, 5, 5), seed=2)
    lam, V = eigen_decomposition(X, 2)
    assert lam.shape == (2, 3, 2) and V.shape == (2, 3, 5, 2)
    lam0, V0 = eigen_decomposition(X[1, 2], 2)
    torch.testing.assert_close(lam[1, 2], lam0)
    torch.testing.assert_close(V[1, 2], V0)
    empty = eigen_decomposition(torch.zeros(0, 4, 4), 2)
    assert empty.eigenvalues.shape == (0, 2) and empty.eigenvectors.shape == (0, 4, 2)


def test_eigen_decomposition_dtype_device():
    X = sym((2, 4, 4), dtype=torch.float32)
    lam, V = eigen_decomposition(X)
    assert lam.dtype == V.dtype == torch.float32 and V.device == X.device
    assert isinstance(eigen_decomposition(X), EigenResult)


# --------------------------------------------------------------------------- backward


@pytest.mark.parametrize("k", [None, 1, 3])
@pytest.mark.parametrize("largest", [True, False])
def test_eigen_decomposition_grad(k, largest):
    X = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda X: tuple(eigen_decomposition(X, k, largest=largest)), (X,))


def test_eigen_decomposition_grad_matches_torch_eigh():
    # Sign-invariant loss: Σ_i v_iᵀ B v_i + λ_i², compared with autograd through torch.linalg.eigh.
    X = sym((3, 6, 6), seed=3)
    B = sym((3, 6, 6), seed=4)

    def loss(lam, V):
        return ((V * (B @ V)).sum((-2, -1)) + (lam**2).sum(-1)).sum()

    Xa = X.clone().requires_grad_()
    loss(*eigen_decomposition(Xa, 4)).backward()
    Xb = X.clone().requires_grad_()
    lam, V = torch.linalg.eigh(0.5 * (Xb + Xb.mT))
    loss(lam[..., -4:], V[..., -4:]).backward()
    torch.testing.assert_close(Xa.grad, Xb.grad, atol=1e-10, rtol=1e-10)


def test_eigen_decomposition_grad_eigenvalues_only():
    # dλ_i/dX = v_i v_iᵀ (closed form); no eigenvector term, no warning even if degenerate.
    X = with_spectrum([3.0, 3.0, 1.0, -2.0])
    Xg = X.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lam, V = eigen_decomposition(Xg, 4)
        lam[2].backward()
    v = V[:, 2].detach()
    torch.testing.assert_close(Xg.grad, torch.outer(v, v), atol=1e-12, rtol=0)


def test_eigen_decomposition_float32_gradient_is_float32_accurate():
    # Float64 eigenvalue gaps with float32 backward products: the gradient of float32
    # input stays within a few float32 ulps (normwise) of the float64 computation on
    # the same data. A float32 eigh fails this (median 7e-6, max 2e-4 on these).
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(64, 32, 32, dtype=torch.float64, generator=gen)
    X = (X + X.mT).float()
    G = torch.randn(64, 32, 32, generator=gen)
    grads = []
    for dtype in (torch.float32, torch.float64):
        Xd = X.to(dtype, copy=True).requires_grad_()
        (eigen_decomposition(Xd).eigenvectors * G.to(dtype)).sum().backward()
        assert Xd.grad.dtype == dtype
        grads.append(Xd.grad.double())
    err = (grads[0] - grads[1]).flatten(1).norm(dim=1) / grads[1].flatten(1).norm(dim=1)
    assert err.median() < 5e-7 and err.max() < 2e-6, (err.median(), err.max())


def test_eigen_decomposition_float32_near_degenerate():
    # Relative gap 1e-4: a float32 eigen solve would give gradients wrong by ~1e-3·scale/gap.
    X = with_spectrum([1.0, 1.0 + 1e-4, 0.5, -0.3, 0.2, -0.7], seed=5, batch=(4,)).float()
    G = torch.randn(4, 6, 6, generator=torch.Generator().manual_seed(6))
    grads = []
    for dtype in (torch.float32, torch.float64):
        Xd = X.to(dtype, copy=True).requires_grad_()
        V = eigen_decomposition(Xd).eigenvectors
        (V * G.to(dtype)).sum().backward()
        grads.append(Xd.grad.double())
    err = (grads[0] - grads[1]).norm() / grads[1].norm()
    assert err < 1e-3, err


def test_eigen_decomposition_degenerate_warns_and_stays_finite():
    X = torch.stack([with_spectrum([2.0, 2.0, 1.0, -1.0], seed=7), with_spectrum([3.0, 2.0, 1.0, -1.0], seed=8)])
    Xg = X.clone().requires_grad_()
    V = eigen_decomposition(Xg, 2).eigenvectors
    with pytest.warns(GradientWarning, match=r"1 of 2 batch element\(s\) \(indices \[\(0,\)\]"):
        V.sum().backward()
    assert bool(torch.isfinite(Xg.grad).all())


def test_eigen_decomposition_degenerate_subspace_exact():
    # Top-2 eigenvalues equal, well separated from the rest: the projector V Vᵀ is smooth
    # and its gradient needs no dropped term (no warning, gradcheck passes).
    X = with_spectrum([2.0, 2.0, 0.5, -1.0], seed=9, batch=(2,)).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)

        def projector(X):
            V = eigen_decomposition(X, 2).eigenvectors
            return V @ V.mT

        assert torch.autograd.gradcheck(projector, (X,))


def test_eigen_decomposition_gap_tol_option():
    X = with_spectrum([1.0, 1.0 + 1e-6, 0.0], seed=10).requires_grad_()
    V = eigen_decomposition(X, 1, gap_tol=1e-3).eigenvectors
    with pytest.warns(GradientWarning):
        V.sum().backward()
    X.grad = None
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        eigen_decomposition(X, 1, gap_tol=1e-12).eigenvectors.sum().backward()


def test_gap_tol_below_float64_resolution_is_refused_naming_the_floor():
    """gap_tol = 0 or 1e-20 was taken, below float64's resolution, which the docs name as
    its floor: an exactly tied pair (computed 4e-16 apart) was kept, and its eigenvector
    gradient came back with max |dL/dX| = 2.19e15, silently. Below 10·N·eps of float64
    it is an OptionError naming gap_tol, the floor at N and the value; at the floor the
    pair is dropped with the warning. The Module refuses what no N takes at
    construction (leaving a Module initialised again as it was), the rest at the call."""
    Q = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(60)))[0]
    X = Q @ torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)) @ Q.T
    floor = 10 * 3 * torch.finfo(torch.float64).eps
    for bad in (0.0, 1e-20, floor / 2):
        with pytest.raises(OptionError) as err:
            eigen_decomposition(X, gap_tol=bad)
        msg = str(err.value)
        assert msg.startswith(f"gap_tol must be finite and >= {floor:g}, got {bad!r}") and "N=3" in msg, msg
    Xg = X.clone().requires_grad_()
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    with pytest.warns(GradientWarning, match="eigenvector gradient undefined"):
        (eigen_decomposition(Xg, gap_tol=floor).eigenvectors[:, 0] * w).sum().backward()
    assert Xg.grad.abs().max() < 10
    with pytest.raises(OptionError, match=r"gap_tol must be finite and >= 2\.22045e-15, got 1e-20 .*N=1"):
        EigenDecomposition(gap_tol=1e-20)
    m = EigenDecomposition(k=2, gap_tol=1e-3)
    with pytest.raises(OptionError, match="gap_tol"):
        m.__init__(k=1, gap_tol=0.0)
    assert (m.k, m.gap_tol) == (2, 1e-3) and m.training
    with pytest.raises(OptionError, match=r"gap_tol must be finite and >= 6\.66134e-15, got 3e-15 .*N=3"):
        EigenDecomposition(gap_tol=3e-15)(X)


# --------------------------------------------------------------------------- module and errors


def test_eigen_decomposition_module():
    m = EigenDecomposition(k=2, largest=False)
    assert "k=2" in repr(m) and "largest=False" in repr(m) and "gap_tol=None" in repr(m)
    X = sym((3, 4, 4), seed=11)
    out = m(X)
    torch.testing.assert_close(out.eigenvalues, torch.linalg.eigvalsh(X)[..., :2])


def test_eigen_decomposition_invalid():
    X = sym((2, 4, 4))
    with pytest.raises(DTypeError, match="X"):
        eigen_decomposition(torch.ones(4, 4, dtype=torch.int64))
    with pytest.raises(ShapeError, match="square"):
        eigen_decomposition(torch.randn(3, 4))
    with pytest.raises(ShapeError, match="square"):
        eigen_decomposition(torch.randn(4))
    with pytest.raises(ShapeError, match="N >= 1"):
        eigen_decomposition(torch.randn(0, 0))
    with pytest.raises(OptionError, match="k must be at most N=4"):
        eigen_decomposition(X, 5)
    for bad in (0, True, 1.5):
        with pytest.raises(OptionError, match="k"):
            eigen_decomposition(X, bad)
    with pytest.raises(OptionError, match="largest"):
        eigen_decomposition(X, largest=1)
    with pytest.raises(OptionError, match="gap_tol"):
        eigen_decomposition(X, gap_tol=-1.0)
    with pytest.raises(OptionError, match="k"):
        EigenDecomposition(k=0)
    Xn = X.clone()
    Xn[1, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="1 NaN"):
        eigen_decomposition(Xn)
    # An Inf makes eigh return non-finite eigenvalues instead of failing: the check on
    # the eigenvalues must still name the input's bad entries (with and without grad).
    Xi = X.clone()
    Xi[0, 0, 1] = float("inf")
    with pytest.raises(NonFiniteError, match="0 NaN and 1 Inf"):
        eigen_decomposition(Xi)
    with pytest.raises(NonFiniteError, match="0 NaN and 1 Inf"):
        eigen_decomposition(Xi.requires_grad_())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_eigen_decomposition_cuda():
    X = sym((3, 8, 8)).cuda().requires_grad_()
    lam, V = eigen_decomposition(X, 3)
    assert V.is_cuda
    (V.sum() + lam.sum()).backward()
    Xc = X.detach().cpu().requires_grad_()
    lc, Vc = eigen_decomposition(Xc, 3)
    (Vc.sum() + lc.sum()).backward()
    torch.testing.assert_close(X.grad.cpu(), Xc.grad, atol=1e-9, rtol=1e-9)


def test_eigenvalue_gradient_at_repeated_eigenvalues_warns():
    """lambda_max at X = I has no gradient (along e2 e2ᵀ a finite difference gives 1 on
    one side, 0 on the other); the basis eigh picked made it e1 e1ᵀ, silently. A loss
    that weighs a cluster of equal eigenvalues equally (their sum) is differentiable:
    no warning there."""
    for X, k, w in ((torch.eye(2), 1, [1.0]), (torch.diag(torch.tensor([2.0, 1.0, 1.0])), 2, [1.0, 1.0]),
                    (torch.diag(torch.tensor([1.0, 1.0, 0.0])), 2, [1.0, 0.0])):
        X = X.double().requires_grad_(True)
        with pytest.warns(GradientWarning, match="eigenvalue gradient does not exist"):
            lam, _ = eigen_decomposition(X, k=k)
            (lam * torch.tensor(w, dtype=torch.float64)).sum().backward()
    for X, k, w in ((torch.eye(3), 3, [1.0, 1.0, 1.0]), (torch.diag(torch.tensor([2.0, 1.0, 1.0])), 1, [1.0]),
                    (torch.diag(torch.tensor([2.0, 1.0, 1.0])), 3, [3.0, 1.0, 1.0])):
        X = X.double().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            lam, _ = eigen_decomposition(X, k=k)
            (lam * torch.tensor(w, dtype=torch.float64)).sum().backward()
        # Closed form: d(sum_i w_i lambda_i) = sum_i w_i e_i e_iᵀ for a diagonal X.
        expected = torch.zeros(3, dtype=torch.float64)
        expected[:k] = torch.tensor(w, dtype=torch.float64)
        torch.testing.assert_close(X.grad, torch.diag(expected))


def test_smooth_spectral_loss_at_a_near_tie_does_not_warn():
    """A smooth loss weighs near-tied eigenvalues almost equally: sum λ² (= ‖X‖_F², gradient
    2X exactly) at diag(1, 1 + 1e-6, 3) in float32 was reported as having no eigenvalue
    gradient (its weights 2 and 2 + 2e-6 differ, but by ~gap_tol, not by O(1))."""
    X = torch.diag(torch.tensor([1.0, 1.0 + 1e-6, 3.0])).requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lam, _ = eigen_decomposition(X)
        (lam ** 2).sum().backward()
    torch.testing.assert_close(X.grad, 2 * X.detach())


def test_returned_eigenvectors_own_their_storage():
    """k < N: the eigenvectors were a view of all N (a custom Function's view output:
    torch refused any in-place edit, e.g. a user's own sign convention, and under
    no_grad k = 1 of N = 400 pinned the 400 × 400 matrix). Now an in-place edit is
    differentiated as written; with k = N the output is the saved matrix, and editing
    it fails at backward, as for torch.linalg.eigh."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(3, 5, 5, dtype=torch.float64, generator=gen)
    X = (X + X.mT).requires_grad_(True)
    G = torch.randn(3, 5, 2, dtype=torch.float64, generator=gen)
    _, V = eigen_decomposition(X, 2)
    V.mul_(-1.0)
    (g_edited,) = torch.autograd.grad((V * G).sum(), X)
    _, V = eigen_decomposition(X, 2)
    (g_negated,) = torch.autograd.grad((V * -G).sum(), X)
    torch.testing.assert_close(g_edited, g_negated, rtol=0, atol=0)
    with torch.no_grad():
        _, V1 = eigen_decomposition(X, 1)
    assert V1.untyped_storage().nbytes() == 3 * 5 * 1 * 8
    _, V = eigen_decomposition(X)
    V.mul_(-1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(V.sum(), X)


# --------------------------------------------------------------------------- forward mode


def _tangents(X, T, **kw):
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        lam, V = eigen_decomposition(fwAD.make_dual(X, T), **kw)
        return fwAD.unpack_dual(lam).tangent, fwAD.unpack_dual(V).tangent


@pytest.mark.parametrize("k, largest", [(None, True), (2, True), (3, False)])
def test_eigen_forward_mode_matches_central_differences(k, largest):
    # A non-symmetric input and direction: the node differentiates sym(X) along sym(T).
    g = torch.Generator().manual_seed(3)
    X = torch.randn(2, 5, 5, generator=g, dtype=torch.float64)
    T = torch.randn(2, 5, 5, generator=g, dtype=torch.float64)
    dlam, dV = _tangents(X, T, k=k, largest=largest)
    h = 1e-6
    (lp, Vp), (lm, Vm) = (eigen_decomposition(X + s * h * T, k, largest=largest) for s in (1, -1))
    torch.testing.assert_close(dlam, (lp - lm) / (2 * h), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(dV, (Vp - Vm) / (2 * h), rtol=1e-6, atol=1e-6)


def test_eigen_forward_mode_gradcheck_and_torch_func():
    X = sym((2, 4, 4), seed=5)
    T = sym((2, 4, 4), seed=6)
    assert torch.autograd.gradcheck(lambda x: eigen_decomposition(x, 2), (X.clone().requires_grad_(),),
                                    check_forward_ad=True, check_backward_ad=False, check_undefined_grad=False)
    _, (dlam, dV) = torch.func.jvp(lambda x: tuple(eigen_decomposition(x, 2)), (X,), (T,))
    ref_lam, ref_V = _tangents(X, T, k=2)
    torch.testing.assert_close(dlam, ref_lam, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dV, ref_V, rtol=1e-12, atol=1e-12)


def test_eigen_forward_mode_at_a_repeated_eigenvalue_warns_and_stays_finite():
    """Forward mode went through eigh's own derivative: NaN and -inf tangents at a
    double eigenvalue, 4.5e14 at a near tie, no warning (reverse mode warned)."""
    X = torch.diag(torch.tensor([3.0, 1.0, 1.0], dtype=torch.float64))
    T = torch.tensor([[0.0, 0.2, 0.1], [0.2, 0.0, 0.5], [0.1, 0.5, 0.0]], dtype=torch.float64)
    for Xi in (X, torch.diag(torch.tensor([3.0, 1.0 + 1e-15, 1.0], dtype=torch.float64))):
        with pytest.warns(GradientWarning, match="forward-mode tangent undefined"):
            dlam, dV = _tangents(Xi, T, k=2)
        assert torch.isfinite(dlam).all() and torch.isfinite(dV).all()
        # The top eigenvector e1 (gap 2) has its tangent, whatever basis eigh picks for the
        # tie: (I − e1 e1ᵀ) T e1 / (3 − 1), and λ1' = e1ᵀ T e1 = 0.
        torch.testing.assert_close(dV[:, 0], torch.tensor([0.0, 0.1, 0.05], dtype=torch.float64))
        assert dlam[0] == 0


def test_eigen_forward_mode_along_a_tie_keeping_direction_is_exact_and_quiet():
    # diag(3, 1, 1) + t diag(0, 1, 1): the tie moves as one, λ' = (0, 1, 1), V' = 0.
    X = with_spectrum([3.0, 1.0, 1.0], seed=2)
    Q = torch.linalg.eigh(X).eigenvectors
    T = Q @ torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)) @ Q.mT  # eigh: ascending
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dlam, dV = _tangents(X, T)
    torch.testing.assert_close(dlam, torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(dV, torch.zeros(3, 3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_eigen_forward_mode_float32_agrees_with_float64():
    X, T = sym((3, 6, 6), seed=7), sym((3, 6, 6), seed=8)
    d32 = _tangents(X.float(), T.float(), k=4)
    d64 = _tangents(X, T, k=4)
    for a, b in zip(d32, d64):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_eigen_jacfwd_matches_reverse_mode():
    # jacfwd vmaps the jvp: it worked through eigh's derivative before, and must still.
    X = sym((5, 5), seed=9)
    f = lambda x: eigen_decomposition(x, 2)[1]  # noqa: E731
    torch.testing.assert_close(torch.func.jacfwd(f)(X), torch.autograd.functional.jacobian(f, X),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k", [None, 2])
def test_eigen_forward_mode_on_an_empty_batch(k):
    """Forward mode on a (0, 4, 4) batch raised torch's raw "amin(): Expected reduction dim"
    (the gap scale's minimum over no matrices); reverse mode gave its (0, 4, 4) gradient.
    The tangents of no matrices are empty, of the outputs' shapes and dtype."""
    n = 4 if k is None else k
    for dtype in (torch.float64, torch.float32):
        X = torch.zeros(0, 4, 4, dtype=dtype)
        with fwAD.dual_level():
            out = eigen_decomposition(fwAD.make_dual(X, torch.ones_like(X)), k)
            dlam, dV = (fwAD.unpack_dual(t).tangent for t in out)
        assert dlam.shape == (0, n) and dV.shape == (0, 4, n) and dlam.dtype == dV.dtype == dtype
        _, dlam = torch.func.jvp(lambda z: eigen_decomposition(z, k).eigenvalues, (X,), (torch.ones_like(X),))
        assert dlam.shape == (0, n)
        J = torch.func.jacfwd(lambda z: eigen_decomposition(z, k).eigenvectors)(X)
        assert J.shape == (0, 4, n, 0, 4, 4)


def test_eigen_forward_mode_float32_tie_keeping_direction_is_quiet():
    """In float32 a direction keeping the tie had M_ii − M_jj of one ulp (6e-8 relative),
    above the 1e-8 limit: 30 of 40 random ties warned."""
    for seed in range(10):
        X = with_spectrum([-2.0, 1.0, 1.0, 3.0], seed=seed)
        Q = torch.linalg.eigh(X).eigenvectors  # ascending: -2, 1, 1, 3
        T = Q @ torch.diag(torch.tensor([0.3, -0.5, -0.5, 1.2], dtype=torch.float64)) @ Q.mT
        with warnings.catch_warnings():
            warnings.simplefilter("error", GradientWarning)
            dlam, _ = _tangents(X.float(), T.float())
        torch.testing.assert_close(dlam.double(), torch.tensor([1.2, -0.5, -0.5, 0.3], dtype=torch.float64),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_jacrev_of_eigenvalues_is_the_outer_product_of_eigenvectors(k):
    # dλ_i/dX = v_i v_iᵀ for a symmetric X (the node symmetrises: sym of it). jacrev
    # of an eigenvalue-only output raised torch's broadcasting RuntimeError (an in-place
    # add of the batched cotangent into an unbatched buffer).
    g = torch.Generator().manual_seed(3)
    X = torch.randn(4, 4, dtype=torch.float64, generator=g)
    X = X + X.T
    J = torch.func.jacrev(lambda s: eigen_decomposition(s, k).eigenvalues)(X)
    V = torch.linalg.eigh(X).eigenvectors.flip(-1)[:, :k]
    torch.testing.assert_close(J, torch.einsum("ik,jk->kij", V, V), rtol=0, atol=1e-12)


def test_float32_projector_loss_at_a_repeated_eigenvalue_does_not_warn():
    # ⟨V₃V₃ᵀ, C⟩ with eigenvalues (5, 3, 3, 1, 0.5, −2): the top three span a whole
    # cluster, so the gradient exists. The dropped pair's term is exactly zero, but in
    # float32 it came out at W's rounding (~1e-7 relative) and warned in 13 of 20 cases.
    # Reference: the spectral projector's derivative, Σ_{i≤3<j} (v_jᵀ sym(C) v_i)/(λ_i − λ_j)
    # (v_j v_iᵀ + v_i v_jᵀ), in float64 at the float32 input.
    g = torch.Generator().manual_seed(1)
    lam = torch.tensor([5.0, 3.0, 3.0, 1.0, 0.5, -2.0], dtype=torch.float64)
    for _ in range(20):
        Q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=g))
        C = torch.randn(6, 6, dtype=torch.float64, generator=g)
        X = (Q @ torch.diag(lam) @ Q.T).float().requires_grad_()
        V = eigen_decomposition(X, 3).eigenvectors
        with warnings.catch_warnings():
            warnings.simplefilter("error", GradientWarning)
            ((V @ V.mT) * C.float()).sum().backward()
        l, U = torch.linalg.eigh(X.detach().double())
        l, U = l.flip(-1), U.flip(-1)
        Cs = (C + C.T) / 2
        G = sum(2 * (U[:, j] @ Cs @ U[:, i]) / (l[i] - l[j]) * torch.outer(U[:, j], U[:, i])
                for i in range(3) for j in range(3, 6))
        G = (G + G.T) / 2
        assert float((X.grad.double() - G).norm() / G.norm()) < 1e-6


def test_a_tie_of_the_sign_convention_is_warned_about():
    """X = [[2, 1], [1, 2]]: v₂ = (1, −1)/√2 has its two components equal in magnitude,
    where the convention (largest |component| positive) flips: X₀₀ + 1e-9 returns −v₂.
    The gradient through v₂ (one side's) came without a warning; v₁ = (1, 1)/√2 is no tie."""
    X = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    E = torch.zeros(2, 2, dtype=torch.float64)
    E[0, 0] = 1e-9
    v_here, v_moved = (eigen_decomposition(Y).eigenvectors[:, 1] for Y in (X, X + E))
    assert float((v_here + v_moved).abs().max()) < 1e-8  # (the jump the warning is about)
    Xg = X.clone().requires_grad_(True)
    with pytest.warns(GradientWarning, match="sign convention"):
        eigen_decomposition(Xg).eigenvectors[0, 1].backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        eigen_decomposition(Xg).eigenvectors[0, 0].backward()
        eigen_decomposition(Xg).eigenvalues.sum().backward()
    with fwAD.dual_level(), pytest.warns(GradientWarning, match="sign convention"):
        eigen_decomposition(fwAD.make_dual(X, E)).eigenvectors


def _grad(X, loss, **kw):
    X = X.clone().requires_grad_()
    loss(*eigen_decomposition(X, **kw)).backward()
    return X.grad


def test_a_matrix_function_at_repeated_eigenvalues_warns():
    # sum(V Λ Vᵀ) = sum(sym X): the true gradient is all ones. At X = I the pair terms
    # are 0/0 (W_ji − W_ij = (λ_i − λ_j) S_ij) and their limit is what the loss needs: the
    # node returned I silently. It now says so; the projector stays exact and silent.
    X = torch.eye(3, dtype=torch.float64)
    with pytest.warns(GradientWarning, match=r"reads the eigenvalues too"):
        _grad(X, lambda lam, V: ((V * lam) @ V.mT).sum())
    T = torch.arange(9.0, dtype=torch.float64).reshape(3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = _grad(torch.diag(torch.tensor([2.0, 2.0, 0.5], dtype=torch.float64)),
                  lambda lam, V: ((V @ V.mT) * T).sum(), k=2)
    # P₂ = e₁e₁ᵀ + e₂e₂ᵀ is constant under symmetric perturbations within the eigenspace:
    # dP = (terms between the group and e₃)/(2 − 0.5); closed form sym of T there.
    S = (T + T.mT) / 2
    expected = torch.zeros(3, 3, dtype=torch.float64)
    expected[:2, 2] = S[:2, 2] / 1.5
    expected[2, :2] = S[2, :2] / 1.5
    assert torch.allclose(g, expected, atol=1e-14)


@pytest.mark.parametrize("transform", ["jacrev", "jacfwd", "vectorize", "vectorize forward"])
def test_batched_directions_at_a_degenerate_spectrum_match_the_row_by_row_jacobian(transform):
    # The per-direction checks read the host, which a vmap refuses ("data-dependent
    # control flow"): batched directions get one unchecked warning instead, where the
    # returned eigenvalue (5) is tied with another. (Autograd's vmap of the tangents,
    # "vectorize forward", was refused until 2026-12-06 as batched cotangents.)
    X = torch.diag(torch.tensor([5.0, 5.0, 1.0], dtype=torch.float64))
    f = lambda A: eigen_decomposition(A, 1).eigenvectors  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradientWarning)
        expected = torch.autograd.functional.jacobian(f, X)
    with pytest.warns(GradientWarning, match="batched directions"):
        if transform.startswith("vectorize"):
            strategy = "forward-mode" if transform.endswith("forward") else "reverse-mode"
            J = torch.autograd.functional.jacobian(f, X, vectorize=True, strategy=strategy)
        else:
            J = getattr(torch.func, transform)(f)(X)
    assert torch.allclose(J, expected, atol=1e-15)


@pytest.mark.parametrize("transform", ["jacrev", "jacfwd"])
def test_batched_directions_ignore_ties_among_unreturned_eigenvalues(transform):
    # S = Q diag(5, 4, 1, 1, 1) Qᵀ, k = 2: the tie 1 = 1 = 1 enters no term of the returned
    # pairs (its eigenspace's projector is defined), yet jacrev/jacfwd warned "undefined"
    # (every consecutive gap was tested). Silent now, and against float64 central differences.
    Q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    S = Q @ torch.diag(torch.tensor([5.0, 4.0, 1.0, 1.0, 1.0], dtype=torch.float64)) @ Q.T
    f = lambda A: eigen_decomposition(A, 2).eigenvectors  # noqa: E731
    g = lambda A: eigen_decomposition(A, 2).eigenvalues  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        J = getattr(torch.func, transform)(f)(S)
        Jl = getattr(torch.func, transform)(g)(S)
    h, Jf, Jlf = 1e-6, torch.zeros_like(J), torch.zeros_like(Jl)
    for i in range(5):
        for j in range(5):
            E = torch.zeros(5, 5, dtype=torch.float64)
            E[i, j] = h
            Jf[..., i, j] = (f(S + E) - f(S - E)) / (2 * h)
            Jlf[..., i, j] = (g(S + E) - g(S - E)) / (2 * h)
    assert torch.allclose(J, Jf, atol=1e-8) and torch.allclose(Jl, Jlf, atol=1e-8)


def test_eigenvalues_near_the_float_range_have_finite_gradients():
    # 2(λ_i − λ_j) overflowed from |λ| ~ 9e307 (inf − inf: NaN everywhere); the closed
    # form for a diagonal X: dX_ij = G_ji/(2(λ_i − λ_j)) + G_ij/(2(λ_j − λ_i)) off the diagonal.
    d = torch.tensor([1.0e308, 0.9e308, 1.0], dtype=torch.float64)
    G = torch.ones(3, 3, dtype=torch.float64)
    G[0] = 0.3
    g = _grad(torch.diag(d), lambda lam, V: (V * G).sum())
    expected = torch.zeros(3, 3, dtype=torch.float64)
    for i in range(3):
        for j in range(3):
            if i != j:
                expected[i, j] = (G[j, i] / (d[i] - d[j]) + G[i, j] / (d[j] - d[i])) / 2
    assert torch.isfinite(g).all()
    assert torch.allclose(g, expected, rtol=1e-12, atol=0)


def test_float32_subnormal_eigenvalues_have_the_float64_gradient():
    # A float32 gap of 1e-39 had an infinite reciprocal: 0·inf = NaN, even for a zero cotangent.
    X = torch.diag(torch.tensor([3e-39, 2e-39, 1e-39]))
    G = torch.full((3, 3), 1e-10)
    G[0] = 3e-11
    g32 = _grad(X, lambda lam, V: (V * G).sum())
    g64 = _grad(X.double(), lambda lam, V: (V * G.double()).sum())
    assert torch.equal(g32, g64.float())
    assert torch.equal(_grad(X, lambda lam, V: (V * 0).sum()), torch.zeros(3, 3))


def test_a_gradient_beyond_float16_warns():
    # Gap 7.6e-6 with gap_tol=1e-6: the true entry −1.97e5 is beyond float16's 65504.
    X = torch.diag(torch.tensor([0.01, 0.01001, -0.01], dtype=torch.float16))
    G = torch.ones(3, 3, dtype=torch.float16)
    G[0] = -2.0
    with pytest.warns(GradientWarning, match="exceeds the range of torch.float16"):
        _grad(X, lambda lam, V: (V * G).sum(), gap_tol=1e-6)


def test_gap_tol_takes_numpy_scalars_and_refuses_huge_integers_by_name():
    np = pytest.importorskip("numpy")
    X = torch.randn(2, 4, 4, dtype=torch.float64)
    for tol in (np.float32(1e-3), np.int64(1)):
        eigen_decomposition(X, gap_tol=tol)
    with pytest.raises(OptionError, match=r"gap_tol must be finite and >= 8\.88178e-15, got 10{400}"):
        eigen_decomposition(X, gap_tol=10**400)
    with pytest.raises(OptionError, match=r"gap_tol must be finite and >= 2\.22045e-15, got 10{400}"):
        EigenDecomposition(gap_tol=10**400)


@pytest.mark.parametrize("dtype,gap_tol", [(torch.float16, 0.01), (torch.bfloat16, 0.02), (torch.float16, None),
                                           (torch.float64, None)])
def test_eigenvalue_loss_at_a_tie_warns_whatever_gap_tol(dtype, gap_tol):
    # λ₁ + 0.5 λ₂ at diag(3, 3, 1): one-sided derivatives along e₂e₂ᵀ are 1 and 0.5, no
    # gradient exists. The weights' tolerance was 100·gap_tol·max|g|, which is max|g|
    # itself from gap_tol = 0.01 (float16's default is larger): no warning there.
    X = torch.diag(torch.tensor([3.0, 3.0, 1.0])).to(dtype).requires_grad_()
    lam, _ = eigen_decomposition(X, 2, gap_tol=gap_tol)
    with pytest.warns(GradientWarning, match="weighted unequally"):
        (lam[0] + 0.5 * lam[1]).backward()


def test_eigen_forward_mode_tangent_overflow_warns():
    # A float16 pair 2^-10 apart and a tangent of 100 across it: ±102400 (float64), beyond
    # float16; the jvp returned ±inf silently where the backward warns.
    import torch.autograd.forward_ad as fwAD

    X = torch.tensor([[1.0, 0.0], [0.0, 1.0 + 2.0**-10]], dtype=torch.float16)
    T = torch.tensor([[0.0, 100.0], [100.0, 0.0]], dtype=torch.float16)
    with fwAD.dual_level(), pytest.warns(GradientWarning, match=r"eigen_decomposition \(forward mode\)"):
        fwAD.unpack_dual(eigen_decomposition(fwAD.make_dual(X, T), gap_tol=1e-6)[1])


def test_eigen_overflow_warning_names_the_batch_index():
    # The overflow warnings named (1, 2) of a (2, 3) batch as "flat indices [5]": now (1, 2).
    # The pair above at (1, 2) only; diag(1, 2) with a zero tangent elsewhere.
    import torch.autograd.forward_ad as fwAD

    X = torch.diag(torch.tensor([1.0, 2.0])).expand(2, 3, 2, 2).clone()
    X[1, 2] = torch.tensor([[1.0, 0.0], [0.0, 1.0 + 2.0**-10]])
    T = torch.zeros_like(X)
    T[1, 2] = torch.tensor([[0.0, 100.0], [100.0, 0.0]])
    named = r"at 1 of 6 batch element\(s\) \(indices \[\(1, 2\)\]\)"
    with fwAD.dual_level(), pytest.warns(GradientWarning, match=r"\(forward mode\).* " + named):
        fwAD.unpack_dual(eigen_decomposition(fwAD.make_dual(X.half(), T.half()), gap_tol=1e-6)[1])
    # Backward: an upstream gradient of 1e3 across the pair: dX ~ 1e3 / 2^-10 > float16's 65504.
    G = torch.zeros_like(X)
    G[1, 2] = torch.tensor([[1.0, 2.0], [-3.0, 0.5]]) * 1e3
    Xg = X.half().requires_grad_()
    with pytest.warns(GradientWarning, match="respect to X " + named):
        (eigen_decomposition(Xg, gap_tol=1e-6)[1] * G.half()).sum().backward()


def test_sign_tie_tangent_that_keeps_the_eigenvectors_is_quiet():
    # At [[2, 1], [1, 2]] (a sign tie) a tangent commuting with X moves only the
    # eigenvalues (eigenvector tangent exactly 0): it was warned about as "one side's";
    # one that rotates the eigenvectors still is.
    X = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    with fwAD.dual_level():
        with warnings.catch_warnings():
            warnings.simplefilter("error", GradientWarning)
            V = fwAD.unpack_dual(eigen_decomposition(fwAD.make_dual(X, X.clone()))[1]).tangent
        assert torch.equal(V, torch.zeros_like(V))
        with pytest.warns(GradientWarning):
            eigen_decomposition(fwAD.make_dual(X, torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))))


def test_eigenvalue_loss_at_the_zero_matrix_warns():
    # X = 0: every eigenvalue tied, and λ₁ + 0.5 λ₂ has no gradient. The pairs' gaps
    # relative to max|λ| were 0/0 = NaN there, which silenced the warning.
    X = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
    lam, _ = eigen_decomposition(X, 2)
    with pytest.warns(GradientWarning, match="weighted unequally"):
        (lam[0] + 0.5 * lam[1]).backward()
