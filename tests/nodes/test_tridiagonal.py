"""Tests of convexddn.nodes.tridiagonal: every value against a dense float64 LU solve (NumPy)
of the assembled matrix, or float64 central differences."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

from convexddn import TridiagonalSolve
from convexddn.errors import (DoubleBackwardError, DTypeError, GradientWarning, InputError, NonFiniteError, ShapeError,
                              SolverError)
from convexddn.functional import tridiagonal_solve
from convexddn.nodes import _tridiagonal_solver as _solver
from convexddn.nodes._tridiagonal_solver import solve_checked

F64 = torch.float64


def dense(diag, lower, upper):
    return torch.diag_embed(diag) + torch.diag_embed(lower, -1) + torch.diag_embed(upper, 1)


def reference(diag, lower, upper, rhs):
    """Dense LU (LAPACK getrf, partial pivoting) in float64 on the assembled matrix; above
    128 x 128 by NumPy: torch 2.13's batched CPU LU of such matrices returns garbage once the
    process has called torch.set_num_threads(k > 1) (MKL; other tests do; see convexddn._linalg)."""
    vector = rhs.ndim == diag.ndim
    A = dense(diag.double(), lower.double(), upper.double())
    R = rhs.double().unsqueeze(-1) if vector else rhs.double()
    if A.shape[-1] <= 128:  # (also under torch.func.jvp, which the jvp test differentiates)
        x = torch.linalg.solve(A, R)
    else:
        batch = torch.broadcast_shapes(A.shape[:-2], R.shape[:-2])
        A, R = A.cpu().expand(*batch, *A.shape[-2:]), R.cpu().expand(*batch, *R.shape[-2:])
        x = torch.from_numpy(np.linalg.solve(A.numpy(), R.numpy())).to(rhs.device)
    return x.squeeze(-1) if vector else x


def system(batch, n, *, dominant=True, k=None, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    diag = torch.randn(*batch, n, generator=g, dtype=F64)
    lower = torch.randn(*batch, n - 1, generator=g, dtype=F64)
    upper = torch.randn(*batch, n - 1, generator=g, dtype=F64)
    if dominant:  # strictly, by rows: |b_i| >= |a_i| + |c_i| + 0.5
        off = torch.nn.functional.pad(lower.abs(), (1, 0)) + torch.nn.functional.pad(upper.abs(), (0, 1))
        diag = diag.sign() * (diag.abs() + off + 0.5)
    rhs = torch.randn(*batch, n, *(() if k is None else (k,)), generator=g, dtype=F64)
    return tuple(t.to(dtype) for t in (diag, lower, upper, rhs))


@pytest.mark.parametrize("n", [1, 2, 3, 17, 40, 300])
@pytest.mark.parametrize("k", [None, 3])
@pytest.mark.parametrize("batch", [(5,), (70,), (2, 3)])
def test_tridiagonal_solve_matches_dense(batch, n, k):
    # Cyclic reduction (the Thomas path needs M >= 16 N and M N >= 2^16: the next test).
    args = system(batch, n, k=k)
    x = tridiagonal_solve(*args)
    assert x.shape == args[3].shape and x.dtype == F64
    torch.testing.assert_close(x, reference(*args), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dominant", [True, False])
def test_tridiagonal_solve_thomas_path(dominant, monkeypatch):
    # M = 8192 >= 16 N, M N = 2^16: the Thomas algorithm (then checked, refined, pivoted).
    args = system((8192,), 8, k=2, dominant=dominant, seed=10)
    sizes, thomas = [], _solver.eliminate
    monkeypatch.setattr(_solver, "eliminate", lambda b, *rest: sizes.append(b.shape[0]) or thomas(b, *rest))
    x, xr = tridiagonal_solve(*args), reference(*args)
    assert sizes[:1] == [8192]  # (the whole batch went through it)
    cond = torch.linalg.cond(dense(*args[:3]))
    err = (x - xr).abs().amax((-2, -1)) / xr.abs().amax((-2, -1))
    assert bool((err <= 100 * cond * torch.finfo(F64).eps).all())


@pytest.mark.parametrize("batch", [(6,), (200,)])
def test_tridiagonal_solve_non_dominant(batch):
    # Random non-dominant matrices: the unpivoted paths grow (or hit tiny pivots) on some
    # elements; the checked result must still match partial-pivoting LU.
    args = system(batch, 24, dominant=False, k=2, seed=1)
    x = tridiagonal_solve(*args)
    xr = reference(*args)
    cond = torch.linalg.cond(dense(*args[:3]))
    err = ((x - xr).abs().amax((-2, -1)) / xr.abs().amax((-2, -1)))
    assert bool((err <= 100 * cond * torch.finfo(F64).eps).all())


def test_tridiagonal_solve_needs_pivoting():
    # Zero diagonals: [[0, 1], [1, 0]] blocks, no unpivoted elimination can start.
    diag = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1e-300, 0.0]], dtype=F64)
    lower = torch.tensor([[1.0], [2.0], [1.0]], dtype=F64)
    upper = torch.tensor([[1.0], [-3.0], [1.0]], dtype=F64)
    rhs = torch.tensor([[2.0, 5.0], [1.0, 4.0], [3.0, 7.0]], dtype=F64)
    x = tridiagonal_solve(diag, lower, upper, rhs)
    torch.testing.assert_close(x, reference(diag, lower, upper, rhs), rtol=1e-15, atol=0)
    # A longer system whose diagonal is 0 at every other row (cond 35; at odd n it is singular).
    n = 8
    diag = torch.zeros(n, dtype=F64)
    diag[1::2] = 0.5
    off = torch.ones(n - 1, dtype=F64)
    rhs = torch.arange(1.0, n + 1, dtype=F64)
    torch.testing.assert_close(tridiagonal_solve(diag, off, 2 * off, rhs), reference(diag, off, 2 * off, rhs),
                               rtol=1e-13, atol=1e-13)


def test_tridiagonal_solve_ill_conditioned():
    # cond ~1e12 (a 1-D Laplacian shifted to nearly singular): error within cond·eps of dense LU.
    n = 40
    eig_min = 2 - 2 * torch.cos(torch.tensor(torch.pi / (n + 1), dtype=F64))
    diag = torch.full((n,), 2.0, dtype=F64) - eig_min * (1 - 1e-10)
    off = -torch.ones(n - 1, dtype=F64)
    rhs = torch.randn(n, dtype=F64, generator=torch.Generator().manual_seed(2))
    cond = float(torch.linalg.cond(dense(diag, off, off)))
    assert 1e11 < cond < 1e14
    x, xr = tridiagonal_solve(diag, off, off, rhs), reference(diag, off, off, rhs)
    assert float((x - xr).abs().max() / xr.abs().max()) <= 10 * cond * torch.finfo(F64).eps


def test_tridiagonal_solve_singular_names_the_element():
    args = list(system((2, 3), 4, k=2))
    args[0][1, 2, 0] = 0.0
    args[2][1, 2, 0] = 0.0  # a zero first row
    match = r"singular \(an exactly zero pivot.*1 of 6 batch element\(s\) \(indices \[\(1, 2\)\]\)"
    with pytest.raises(SolverError, match=match) as err:
        tridiagonal_solve(*args)
    assert err.value.indices == [(1, 2)] and err.value.statuses == ["singular"]
    with pytest.raises(SolverError, match="singular"):  # the zero matrix
        tridiagonal_solve(torch.zeros(1), torch.zeros(0), torch.zeros(0), torch.ones(1))


def test_tridiagonal_solve_broadcasting():
    diag, lower, upper, rhs = system((4, 1), 7, k=2)
    lower, upper = lower[0, 0], upper[:1]  # (6,) and (1, 1, 6)
    rhs = rhs.expand(4, 3, 7, 2).clone() + torch.arange(3, dtype=F64).view(1, 3, 1, 1)
    x = tridiagonal_solve(diag, lower, upper, rhs)
    assert x.shape == (4, 3, 7, 2)
    torch.testing.assert_close(x, reference(diag.expand(4, 3, 7), lower.expand(4, 3, 6), upper.expand(4, 3, 6), rhs))
    # Vector rhs (as many dims as diag) with a batch of one for the matrix; a (5,) diag with
    # an (8, 5) rhs is one matrix with K = 5 columns of N = 8 rows instead (refused: N = 5).
    d1, l1, u1, _ = system((1,), 5)
    r = torch.randn(8, 5, dtype=F64)
    torch.testing.assert_close(tridiagonal_solve(d1, l1, u1, r), reference(d1.expand(8, 5), l1.expand(8, 4),
                                                                             u1.expand(8, 4), r))


def test_tridiagonal_solve_empty_batch_and_module():
    d, l, u, r = system((0,), 5, k=2)
    assert tridiagonal_solve(d, l, u, r).shape == (0, 5, 2)
    args = system((3,), 6)
    torch.testing.assert_close(TridiagonalSolve()(*args), reference(*args))


def test_tridiagonal_solve_float32_and_half():
    args = system((64,), 200, k=2, dtype=torch.float32)
    x = tridiagonal_solve(*args)
    assert x.dtype == torch.float32
    xr = reference(*args)
    # Row dominance by 0.5 bounds ‖A⁻¹‖∞ by 2 (Varah), so κ∞ <= 2‖A‖∞.
    cond = 2 * dense(*(t.double() for t in args[:3])).abs().sum(-1).amax(-1)
    err = (x.double() - xr).abs().amax((-2, -1)) / xr.abs().amax((-2, -1))
    assert bool((err <= 10 * cond * torch.finfo(torch.float32).eps).all())
    half = tuple(t.to(torch.bfloat16) for t in system((4,), 20))
    xh = tridiagonal_solve(*half)
    assert xh.dtype == torch.bfloat16
    torch.testing.assert_close(xh.double(), reference(*half), rtol=1e-2, atol=1e-2)


def test_tridiagonal_solve_grad():
    args = [t.requires_grad_() for t in system((2, 3), 6, k=2)]
    assert gradcheck(tridiagonal_solve, args)
    # Broadcast inputs: gradients summed over the broadcast dims; vector rhs.
    d, l, u, r = system((3,), 5)
    args = [d.requires_grad_(), l[0].requires_grad_(), u[:1].requires_grad_(), r.requires_grad_()]
    assert gradcheck(tridiagonal_solve, args)


def test_tridiagonal_solve_grad_vs_central_differences():
    # Independent of autograd: the gradient of <v, x> against central differences of the
    # dense float64 solve, at a non-dominant matrix (a pivoted element).
    d, l, u, r = system((), 6, dominant=False, k=2, seed=3)
    d[0] = 0.0  # forces the pivoted path
    v = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    inputs = [t.clone().requires_grad_() for t in (d, l, u, r)]
    (tridiagonal_solve(*inputs) * v).sum().backward()
    h = 1e-6
    for i, t in enumerate((d, l, u, r)):
        fd = torch.zeros_like(t)
        for j in range(t.numel()):
            plus, minus = [s.clone() for s in (d, l, u, r)], [s.clone() for s in (d, l, u, r)]
            plus[i].view(-1)[j] += h
            minus[i].view(-1)[j] -= h
            fd.view(-1)[j] = ((reference(*plus) - reference(*minus)) * v).sum() / (2 * h)
        torch.testing.assert_close(inputs[i].grad, fd, rtol=1e-6, atol=1e-7)


def test_tridiagonal_solve_jvp():
    args = system((3,), 8, k=2, seed=5)
    tangents = system((3,), 8, k=2, seed=6)
    _, jt = torch.func.jvp(tridiagonal_solve, args, tangents)
    _, jd = torch.func.jvp(reference, args, tangents)
    torch.testing.assert_close(jt, jd, rtol=1e-11, atol=1e-12)
    assert gradcheck(tridiagonal_solve, [t.requires_grad_() for t in args], check_forward_ad=True,
                     check_backward_ad=False, check_undefined_grad=False)
    # jacfwd (batched tangents) in one input; a pivoted element.
    d, l, u, r = system((2,), 5, dominant=False, seed=7)
    d[1, 0] = 0.0
    jac = torch.func.jacfwd(tridiagonal_solve, argnums=0)(d, l, u, r)
    torch.testing.assert_close(jac, torch.func.jacfwd(reference, argnums=0)(d, l, u, r), rtol=1e-10, atol=1e-11)


def test_tridiagonal_solve_double_backward_is_refused():
    args = [t.requires_grad_() for t in system((2,), 4)]
    x = tridiagonal_solve(*args)
    (g,) = torch.autograd.grad(x.sum(), args[0], create_graph=True)
    with pytest.raises(DoubleBackwardError):
        g.sum().backward()


def test_tridiagonal_solve_backward_checked():
    # The transposed solve is checked as the forward: a matrix whose transpose needs pivoting.
    d, l, u, r = (t.requires_grad_() for t in (torch.tensor([0.0, 1.0], dtype=F64), torch.tensor([2.0], dtype=F64),
                                               torch.tensor([3.0], dtype=F64), torch.tensor([1.0, 2.0], dtype=F64)))
    tridiagonal_solve(d, l, u, r).sum().backward()
    A = dense(d.detach(), l.detach(), u.detach())
    w = torch.linalg.solve(A.T, torch.ones(2, dtype=F64))
    torch.testing.assert_close(r.grad, w)


def test_tridiagonal_solve_invalid():
    d, l, u, r = system((2,), 4)
    with pytest.raises(DTypeError, match=r"lower must have diag's dtype torch.float64, got torch.float32"):
        tridiagonal_solve(d, l.float(), u, r)
    with pytest.raises(DTypeError, match="rhs must be a torch.Tensor"):
        tridiagonal_solve(d, l, u, [1.0])
    with pytest.raises(ShapeError, match=r"upper must have shape \(\*, N-1\) = \(\*, 3\).*got shape \(2, 4\)"):
        tridiagonal_solve(d, l, d, r)
    with pytest.raises(ShapeError, match=r"rhs must have N=4 rows.*got shape \(2, 5\)"):
        tridiagonal_solve(d, l, u, torch.zeros(2, 5, dtype=F64))
    with pytest.raises(ShapeError, match=r"rhs must have shape \(\*, N\)"):
        tridiagonal_solve(d, l, u, torch.zeros(1, 1, 2, 4, 1, dtype=F64))
    with pytest.raises(ShapeError, match="do not broadcast"):
        tridiagonal_solve(d, l, u, torch.zeros(3, 4, dtype=F64))
    with pytest.raises(ShapeError, match="N >= 1"):
        tridiagonal_solve(torch.zeros(2, 0), torch.zeros(2, 0), torch.zeros(2, 0), torch.zeros(2, 0))
    r2 = r.clone()
    r2[0, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="rhs must be finite, got 1 NaN"):
        tridiagonal_solve(d, l, u, r2)
    with pytest.raises(SolverError, match="overflows"):
        tiny = torch.full((2,), 1e-300, dtype=F64)  # 1e-300·I, well conditioned; x = 1e600
        zero = torch.zeros(1, dtype=F64)
        tridiagonal_solve(tiny, zero, zero, torch.full((2,), 1e300, dtype=F64))
    if torch.cuda.is_available():
        with pytest.raises(InputError, match="rhs must be on diag's device"):
            tridiagonal_solve(d.cuda(), l.cuda(), u.cuda(), r)


@pytest.mark.parametrize("m", [4, 12000])
def test_solve_checked_routes_only_failing_elements(m):
    # Dominant elements keep the fast path (cyclic reduction at M = 4, Thomas at M = 12000:
    # >= 16 N and M N >= 2^16);
    # the one with a zero pivot alone is pivoted.
    d, l, u, r = system((m,), 6, k=1)
    d[2, 0] = 0.0
    x, pivoted = solve_checked(d, l, u, r, "t", (m,))
    assert pivoted.nonzero().flatten().tolist() == [2]
    torch.testing.assert_close(x, reference(d, l, u, r))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tridiagonal_solve_cuda():
    args = system((64,), 1024, k=2, seed=8)
    cuda = [t.cuda().requires_grad_() for t in args]
    cpu = [t.clone().requires_grad_() for t in args]
    x = tridiagonal_solve(*cuda)
    assert x.device.type == "cuda"
    torch.testing.assert_close(x.cpu(), tridiagonal_solve(*cpu).detach(), rtol=1e-12, atol=1e-13)
    x.sum().backward()
    tridiagonal_solve(*cpu).sum().backward()
    for a, b in zip(cuda, cpu):
        torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-10, atol=1e-12)
    # A pivoted element on the GPU, and a singular one.
    d, l, u, r = (t.cuda() for t in system((3,), 8, seed=9))
    d[1, 0] = 0.0
    torch.testing.assert_close(tridiagonal_solve(d, l, u, r).cpu(), reference(d.cpu(), l.cpu(), u.cpu(), r.cpu()))
    d32 = args[0].float().cuda()
    x32 = tridiagonal_solve(d32, args[1].float().cuda(), args[2].float().cuda(), args[3].float().cuda())
    assert x32.dtype == torch.float32
    with pytest.raises(SolverError, match="singular"):
        tridiagonal_solve(torch.zeros(2, 3, device="cuda"), torch.zeros(2, 2, device="cuda"),
                          torch.zeros(2, 2, device="cuda"), torch.ones(2, 3, device="cuda"))


def test_torch_func_jacobians_raise_no_torch_warning():
    """The reduction's fused in-place updates (addcmul_) have no vmap batching rule: under
    torch.func.jacrev / jacfwd torch warned of "a performance drop" at every call. Those run the
    unfused updates; the Jacobian of x with respect to rhs is A's inverse (dense, float64)."""
    import warnings

    diag, lower, upper, rhs = system((), 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        jr = torch.func.jacrev(lambda d: tridiagonal_solve(diag, lower, upper, d))(rhs)
        jf = torch.func.jacfwd(lambda d: tridiagonal_solve(diag, lower, upper, d))(rhs)
    inv = torch.linalg.inv(dense(diag, lower, upper))
    torch.testing.assert_close(jr, inv, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(jf, inv, rtol=1e-12, atol=1e-13)


def _np_dense(diag, lower, upper):
    """The assembled matrix in float64 NumPy (an independent reference: LAPACK's dense LU)."""
    d, lo, up = (np.asarray(t.detach().double().numpy()) for t in (diag, lower, upper))
    return np.diag(d) + np.diag(lo, -1) + np.diag(up, 1)


def test_tridiagonal_solve_torch_func_reproduces_refinement():
    # The forward accepts this element only after one refinement (cond 15). torch.func.grad /
    # vjp / jvp (not vmapped) were run unchecked and jacrev / jacobian(vectorize=True) without
    # the refinement: 1e-7 .. 1e-8 off (expected cond·eps).
    import warnings

    D = torch.tensor([-0.32656363207527145, -6.108665613473521e-11, -1.2870761537214692, -0.8161007281224384],
                     dtype=F64)
    L = torch.tensor([-0.010692579777179443, -0.492115120124441, 0.24329215882343241], dtype=F64)
    U = torch.tensor([0.5546144384648174, 1.1243838758850309, -0.880276756771633], dtype=F64)
    r = torch.tensor([-0.012716081709339381, -0.5121504494954228, 0.005580414163554033, -0.18848662046759887],
                     dtype=F64)
    inv = np.linalg.inv(_np_dense(D, L, U))
    x = inv @ r.numpy()
    tol = dict(rtol=1e-13, atol=1e-13 * np.abs(inv).max())
    solve_r = lambda rr: tridiagonal_solve(D, L, U, rr)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        got = {"grad": (torch.func.grad(lambda rr: solve_r(rr).sum())(r), inv.sum(0)),
               "jvp": (torch.func.jvp(solve_r, (r,), (torch.ones(4, dtype=F64),))[1], inv.sum(1)),
               "jacrev": (torch.func.jacrev(solve_r)(r), inv),
               "jacobian(vectorize)": (torch.autograd.functional.jacobian(solve_r, r, vectorize=True), inv),
               "jacrev(diag)": (torch.func.jacrev(lambda dd: tridiagonal_solve(dd, L, U, r))(D), -inv * x)}
    for name, (value, expected) in got.items():
        np.testing.assert_allclose(value.numpy(), expected, **tol, err_msg=name)


@pytest.mark.parametrize("batch", [(), (2, 3)])
def test_tridiagonal_solve_batched_directions_on_the_pivoted_path(batch):
    # A = [[1, 1, 0], [1, 1, 1], [0, 1, 1]] (det -1) meets a zero pivot without interchanges: its
    # backward takes the equilibrated, pivoted route. Batched cotangents and tangents (jacobian's
    # vectorize=True in both strategies, is_grads_batched) raised torch's raw "Batching rule not
    # implemented for aten::flatten" there. Expected: NumPy's dense inverse (rhs) and -A^-1 diag(x)
    # (diag); in a batch, that element beside diagonally dominant ones.
    D, O = torch.ones(3, dtype=F64), torch.ones(2, dtype=F64)
    r = torch.tensor([1.0, 2.0, 1.0], dtype=F64)
    if batch:
        D = torch.full(batch + (3,), 4.0, dtype=F64)
        D[1, 2] = 1.0  # (the zero-pivot system at batch index (1, 2))
        O = O.expand(batch + (2,))
        r = r.expand(batch + (3,))
    inv = np.linalg.inv(np.stack([_np_dense(d, lo, up) for d, lo, up in
                                  zip(D.reshape(-1, 3), O.reshape(-1, 2), O.reshape(-1, 2))]))
    x = np.einsum("bij,bj->bi", inv, r.reshape(-1, 3).numpy())
    want_r = inv.reshape(batch + (3, 3))
    want_d = (-inv * x[:, None, :]).reshape(batch + (3, 3))
    k = int(np.prod(batch, dtype=int))
    solve_r = lambda rr: tridiagonal_solve(D, O, O, rr)  # noqa: E731
    solve_d = lambda dd: tridiagonal_solve(dd, O, O, r)  # noqa: E731

    def per_element(jac):  # (…, 3, …, 3) -> the (…, 3, 3) blocks of each element
        return jac.reshape(k, 3, k, 3)[torch.arange(k), :, torch.arange(k)].reshape(batch + (3, 3))
    for strategy in ("reverse-mode", "forward-mode"):
        for fn, at, want in ((solve_r, r, want_r), (solve_d, D, want_d)):
            jac = torch.autograd.functional.jacobian(fn, at.contiguous(), vectorize=True, strategy=strategy)
            np.testing.assert_allclose(per_element(jac).numpy(), want, rtol=1e-13, atol=1e-13, err_msg=strategy)
    rr = r.clone().requires_grad_(True)
    out = solve_r(rr)
    eye = torch.eye(3, dtype=F64).reshape((3,) + (1,) * len(batch) + (3,)).expand((3,) + batch + (3,))
    (g,) = torch.autograd.grad(out, rr, eye, is_grads_batched=True)  # row i: e_iᵀ A⁻¹
    np.testing.assert_allclose(g.movedim(0, -2).numpy(), want_r, rtol=1e-13, atol=1e-13)


def test_tridiagonal_solve_half_overflow_is_reported():
    # float16: solved in float32 and cast back; x_0 = 1.0e5 > 65504 came back Inf silently.
    d, o = torch.full((3,), 1e-2, dtype=torch.float16), torch.full((2,), 1e-3, dtype=torch.float16)
    with pytest.raises(SolverError, match=r"overflows torch.float16") as err:
        tridiagonal_solve(d, o, o, torch.tensor([1000.0, 1.0, 1.0], dtype=torch.float16))
    assert err.value.statuses == ["overflow"]
    # x fits (about 100) but the gradients for an incoming gradient of 1000 do not: rhs's is
    # A^-T g ~ 1e5, diag's -w x ~ 1e7 (float64 dense reference), Inf on the cast.
    dd = d.clone().requires_grad_()
    rhs = torch.ones(3, dtype=torch.float16, requires_grad=True)
    x = tridiagonal_solve(dd, o, o, rhs)
    A = _np_dense(d, o, o)
    w = np.linalg.solve(A.T, np.full(3, 1000.0))
    assert np.isfinite(x.detach().numpy()).all() and np.abs(w).max() > 65504
    with pytest.warns(GradientWarning, match=r"gradient with respect to diag .* rhs .*torch.float16"):
        x.backward(torch.full((3,), 1000.0, dtype=torch.float16))


@pytest.mark.parametrize("argnum", [1, 2])
def test_tridiagonal_solve_jacfwd_wrt_off_diagonals(argnum):
    # A tangent in lower or upper alone: multiply() added it in place into the unbatched zero
    # term and torch raised "output with shape ... doesn't match the broadcast shape".
    D, L, U = (torch.tensor(v, dtype=F64) for v in ([4.0, 4.0, 4.0], [1.0, 2.0], [0.5, 1.0]))
    R = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    inv = np.linalg.inv(_np_dense(D, L, U))
    x = inv @ R.numpy()
    # dx/da_j = -A^-1 e_{j+1} x_j (entry (j+1, j)); dx/dc_j = -A^-1 e_j x_{j+1}
    expected = -inv[:, 1:] * x[None, :-1] if argnum == 1 else -inv[:, :-1] * x[None, 1:]
    jac = torch.func.jacfwd(tridiagonal_solve, argnums=argnum)(D, L, U, R)
    np.testing.assert_allclose(jac.numpy(), expected, rtol=1e-13, atol=1e-15)
    both = torch.func.jacfwd(tridiagonal_solve, argnums=(argnum, 3))(D, L, U, R)
    np.testing.assert_allclose(both[1].numpy(), inv, rtol=1e-13, atol=1e-15)


def test_tridiagonal_solve_singularity_is_scale_and_n_free():
    # The threshold N·eps·‖A‖∞ refused a decoupled kappa = 4e12 block at N = 10^4 (not at 10^3),
    # a matrix of entries 1e308 (its row sum overflowed) and diag(1, 1e-20).
    n = 10**4
    D, L, U = torch.full((n,), 4.0, dtype=F64), torch.zeros(n - 1, dtype=F64), torch.zeros(n - 1, dtype=F64)
    D[0], D[1], U[0], L[0] = 1.0, 1.0 + 1e-12, 1.0, 1.0
    R = torch.ones(n, dtype=F64)
    R[1] = 2.0
    block = np.linalg.solve(np.array([[1.0, 1.0], [1.0, 1.0 + 1e-12]]), [1.0, 2.0])
    kappa = np.linalg.cond(np.array([[1.0, 1.0], [1.0, 1.0 + 1e-12]]))
    x = tridiagonal_solve(D, L, U, R)
    np.testing.assert_allclose(x[:2].numpy(), block, rtol=10 * kappa * 2.2e-16)
    assert bool((x[2:] == 0.25).all())
    one = lambda *v: torch.tensor(v, dtype=F64)  # noqa: E731
    torch.testing.assert_close(tridiagonal_solve(one(1e308, 1e308), one(0.0), one(1e308), one(1e308, 1e308)),
                               one(0.0, 1.0), rtol=0, atol=1e-16)
    f32 = [t.float() for t in (one(2e38, 2e38), one(0.0), one(2e38), one(2e38, 2e38))]
    torch.testing.assert_close(tridiagonal_solve(*f32), torch.tensor([0.0, 1.0]), rtol=0, atol=1e-7)
    assert tridiagonal_solve(one(1.0, 1e-20), one(0.0), one(0.0), one(1.0, 1.0)).tolist() == [1.0, 1e20]
    # Singular at rounding level: [[0.1, 0.3], [0.3, 0.9]] (exactly singular in reals; its LU
    # pivot 0.9 - 3·0.3 is 1.9e-16 of its terms): the message says what was found.
    with pytest.raises(SolverError, match=r"singular to working precision.*pivot .* is 1.9e-16 times the terms"):
        tridiagonal_solve(one(0.1, 0.9), one(0.3), one(0.3), one(1.0, 1.0))


def test_tridiagonal_solve_backward_accepts_what_the_forward_did():
    # kappa 1e15: the forward's pivoted LU is fine; that of A^T has a pivot under N·eps·‖A‖, and
    # the backward raised "singular" for the matrix the forward had solved.
    D = torch.tensor([0.0, -0.37940622622859105, 0.001594614031669793, -8.430819640472956, -0.008185308804990065],
                     dtype=F64)
    L = torch.tensor([-0.0014833516111286387, 0.38020577078791756, -0.0005400513546239356, -0.002289123972086582],
                     dtype=F64)
    U = torch.tensor([-8.63536630643578, 1013.2476336141652, 454.3348181070002, -6.300020590615767], dtype=F64)
    R = torch.arange(1.0, 6.0, dtype=F64).requires_grad_()
    A = _np_dense(D, L, U)
    kappa = np.linalg.cond(A)
    w = np.linalg.solve(A.T, np.ones(5))
    tridiagonal_solve(D, L, U, R).sum().backward()
    np.testing.assert_allclose(R.grad.numpy(), w, rtol=10 * kappa * 2.2e-16 / 1e2)


def test_tridiagonal_solve_subnormal_system():
    # Every entry subnormal (O(1) values times 2^-1060): answers came back 1.5e-2 off (the
    # check's 16·eps·scale underflowed; the pivoted answer was not checked). The reference: the
    # same (rounded) systems scaled back by 2^1060 (exact), dense LU.
    g = np.random.default_rng(9)
    M, n = 20, 12
    s = 2.0**-1060
    D, L, U, R = (g.standard_normal(shape) * s for shape in ((M, n), (M, n - 1), (M, n - 1), (M, n)))
    x = tridiagonal_solve(*(torch.tensor(v) for v in (D, L, U, R)))
    D, L, U, R = (v / s for v in (D, L, U, R))
    A = np.stack([np.diag(D[i]) + np.diag(L[i], -1) + np.diag(U[i], 1) for i in range(M)])
    ref = np.linalg.solve(A, R[..., None])[..., 0]
    err = np.abs(x.numpy() - ref).max(1) / np.abs(ref).max(1)
    assert (err <= 100 * np.linalg.cond(A) * 2.2e-16).all(), err.max()


def _graded(seed, span, dtype=F64, pivot=False):
    """The tester's graded systems: A' = R A0 S, d' = R d0 with R, S diagonal powers of two in
    2^[-span, span) and A0 an N = 100 core of O(1) entries (``pivot``: every third diagonal
    entry 0, a third of the rest shrunk 10x: pivots needed); then A'^-1 d' = S^-1 A0^-1 d0
    exactly. Returns the (exactly representable) diag, lower, upper, rhs, the scaling s, the
    reference A0^-1 d0 (dense float64 LU) and cond1(A0)."""
    g, n = np.random.default_rng(seed), 100
    b = g.standard_normal(n) + 3 * np.sign(g.standard_normal(n))
    a, c = g.standard_normal(n - 1), g.standard_normal(n - 1)
    if pivot:
        b[::3], b[1::3] = 0.0, 0.1 * b[1::3]
    r, s = 2.0 ** g.integers(-span, span, n), 2.0 ** g.integers(-span, span, n)
    d0 = g.standard_normal(n)
    if dtype == torch.float32:
        b, a, c, d0 = (v.astype(np.float32).astype(np.float64) for v in (b, a, c, d0))
    A0 = np.diag(b) + np.diag(a, -1) + np.diag(c, 1)
    args = tuple(torch.tensor(v, dtype=dtype) for v in (r * b * s, r[1:] * a * s[:-1], r[:-1] * c * s[1:], r * d0))
    assert all(np.array_equal(t.double().numpy(), v)
               for t, v in zip(args, (r * b * s, r[1:] * a * s[:-1], r[:-1] * c * s[1:], r * d0)))
    return args, s, np.linalg.solve(A0, d0), np.linalg.cond(A0, 1)


@pytest.mark.parametrize("dtype, span, seeds", [(F64, 500, (21, 39, 49, 78)), (torch.float32, 60, (3, 6, 9))])
def test_tridiagonal_solve_graded_systems(dtype, span, seeds):
    # Entries all normal (1e-300..1e300; float32 1e-36..1e36) but a diagonal entry below
    # 1.5e-289 (float32 2.7e-30): every such element was sent to the row-scaled pivoted path,
    # whose answer (up to 6e7 off; float32 3e3) passed a normwise check: returned silently.
    eps = torch.finfo(dtype).eps
    for seed in seeds:
        args, s, y, cond = _graded(seed, span, dtype)
        assert float(args[0].abs().min()) < torch.finfo(dtype).tiny / eps ** 1.2
        x = tridiagonal_solve(*args).double().numpy()
        assert np.abs(s * x - y).max() / np.abs(y).max() <= 50 * cond * eps, seed


def test_tridiagonal_solve_graded_systems_needing_pivots():
    # The same graded systems with pivots needed: the row-scaled pivoted answer came back up to
    # 1e14·cond·eps off, silently (normwise check). Now equilibrated, checked componentwise and
    # refined (twice at most): accurate, or a SolverError (seed 18), never silently wrong.
    eps = torch.finfo(F64).eps
    for seed in (1, 3, 7, 11):
        args, s, y, cond = _graded(seed, 500, pivot=True)
        x = tridiagonal_solve(*args).numpy()
        assert np.abs(s * x - y).max() / np.abs(y).max() <= 50 * cond * eps, seed
    with pytest.raises(SolverError, match="did not reach working accuracy .componentwise backward error"):
        tridiagonal_solve(*_graded(18, 500, pivot=True)[0])
    # The derivatives' unchecked solve (under a vmap) reproduces the route, refinements included.
    flat = [t[None] for t in args[:3]] + [args[3][None, :, None]]  # (seed 11)
    x, route = solve_checked(*flat, "t", (1,))
    assert int(route) > 2
    assert torch.equal(solve_checked(*flat, "t", (1,), route=route, check=False)[0], x)
    # A solution graded within one rhs column, x = (3·2^600, 5·2^-600) (a permutation matrix):
    # the rhs column lowered to its largest entry flushed 2^-1200 to 0: x_2 = 0, silently.
    one = lambda *v: torch.tensor(v, dtype=F64)  # noqa: E731
    rhs = one(2.0**300 * 5 * 2.0**-600, 2.0**-300 * 3 * 2.0**600)
    assert tridiagonal_solve(one(0.0, 0.0), one(2.0**-300), one(2.0**300), rhs).tolist() == [3 * 2.0**600,
                                                                                          5 * 2.0**-600]


def _banded(diag, lower, upper):
    """The float64 band form of scipy.linalg.solve_banded (LAPACK gbsv: LU with partial pivoting)."""
    n = diag.shape[-1]
    ab = np.zeros((3, n))
    ab[0, 1:], ab[1], ab[2, :-1] = upper, diag, lower
    return ab


def test_tridiagonal_solve_float32_non_dominant_takes_the_wide_route(monkeypatch):
    # Random non-dominant float32 systems: two of 64 failed the unpivoted check (and its
    # refinement) and went to the pivoted loop over the rows (2.2-4 s at (1, 20000)). Now their
    # fast path is retried in float64 (route WIDE), checked against 16 eps of float32, and
    # replayed unchecked under a vmap; the pivoted loop is not entered.
    from scipy.linalg import solve_banded
    calls, pivoted = [], _solver.solve_pivoted
    monkeypatch.setattr(_solver, "solve_pivoted", lambda *s: calls.append(1) or pivoted(*s))
    d, l, u, r = system((64,), 256, dominant=False, k=1, dtype=torch.float32, seed=0)
    x, route = solve_checked(d, l, u, r, "t", (64,))
    assert not calls
    wide = (route == _solver.WIDE).nonzero().flatten().tolist()
    assert len(wide) == 2 and bool((route < _solver.WIDE).sum() == 62)
    eps = torch.finfo(torch.float32).eps
    D, L, U, R, X = (t.double().numpy() for t in (d, l, u, r, x))
    for i in wide:
        ref = solve_banded((1, 1), _banded(D[i], L[i], U[i]), R[i])
        assert np.abs(X[i] - ref).max() <= 2 * eps * np.abs(ref).max()
        A = np.diag(D[i]) + np.diag(L[i], -1) + np.diag(U[i], 1)  # ω of the answer, float64
        assert (np.abs(R[i] - A @ X[i]) / (np.abs(A) @ np.abs(X[i]) + np.abs(R[i]))).max() <= 16 * eps
    assert torch.equal(solve_checked(d, l, u, r, "t", (64,), route=route, check=False)[0], x)


def test_tridiagonal_solve_float32_wide_route_gradients(monkeypatch):
    # (1, 20000) float32, diag, lower, upper, rhs all randn: the gradients and the tangent
    # (both solves on the forward's route, WIDE) against the float64 closed form:
    # w = A^-T g, dL/dd = w, dL/db = -w x, dL/da_i = -w_{i+1} x_i, dL/dc_i = -w_i x_{i+1}.
    from scipy.linalg import solve_banded
    n = 20000
    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(1, k, generator=gen, dtype=F64).float() for k in (n, n - 1, n - 1, n)]
    calls, pivoted = [], _solver.solve_pivoted
    monkeypatch.setattr(_solver, "solve_pivoted", lambda *s: calls.append(1) or pivoted(*s))
    x, route = solve_checked(*args[:3], args[3][..., None], "t", (1,))
    assert not calls and route.tolist() == [_solver.WIDE]
    inputs = [t.clone().requires_grad_() for t in args]
    g = torch.randn(1, n, generator=gen, dtype=F64).float()
    out = tridiagonal_solve(*inputs)
    grads = torch.autograd.grad(out, inputs, g)
    _, x_t = torch.func.jvp(lambda rhs: tridiagonal_solve(*args[:3], rhs), (args[3],), (g,))
    assert not calls
    D, L, U, R, G = (t[0].double().numpy() for t in (*args, g))
    ab = _banded(D, L, U)
    xr = solve_banded((1, 1), ab, R)
    w = solve_banded((1, 1), _banded(D, U, L), G)  # A^T: lower and upper swapped
    expected = (-w * xr, -w[1:] * xr[:-1], -w[:-1] * xr[1:], w)
    eps = torch.finfo(torch.float32).eps
    for got, want in zip((out, *grads, x_t), (xr, *expected, solve_banded((1, 1), ab, G))):
        assert np.abs(got[0].detach().double().numpy() - want).max() <= 4 * eps * np.abs(want).max()


def test_tridiagonal_solve_float32_singular_still_refused():
    # The wide route accepts no matrix singular at float32's precision: exactly singular ones
    # break its unpivoted float64 solve or its condition estimate (κ·eps >= 1) and go on to the
    # pivoted path, whose verdict stands as before.
    d, l, u, r = system((3,), 40, dominant=False, dtype=torch.float32, seed=2)
    d[1], l[1], u[1] = 2 * d[0], 2 * l[0], 2 * u[0]  # element 1: A = 2 A_0 with a zero first row
    d[1, 0], u[1, 0] = 0.0, 0.0
    with pytest.raises(SolverError, match=r"singular \(an exactly zero pivot.*indices \[\(1,\)\]"):
        tridiagonal_solve(d, l, u, r)
    # A symmetric non-dominant matrix shifted by one of its eigenvalues (float64), rounded to
    # float32 (cond 4e8 .. 7e8): the unpivoted float32 answer fails, the float64 one passes
    # the backward-error check, but the estimate refers the elements to the pivoted path: one
    # is refused there (a pivot 8e-8 of its terms), the others solved pivoted, as before.
    for seed in range(4):
        d, l, _, r = system((), 200, dominant=False, seed=seed)
        A = np.diag(d.numpy()) + np.diag(l.numpy(), -1) + np.diag(l.numpy(), 1)
        f32 = [(d - np.linalg.eigvalsh(A)[100]).float(), l.float(), l.float(), r.float()]
        if seed == 0:
            with pytest.raises(SolverError, match="singular to working precision"):
                tridiagonal_solve(*f32)
        else:
            _, route = solve_checked(*(t[None] for t in f32[:3]), f32[3][None, :, None], "t", (1,))
            assert int(route) >= _solver.PIVOTED


def test_solve_pivoted_tensor_calls_per_row():
    # The pivoted loop made 66 torch calls a row (indexing included: (1, 20000) float64 took
    # 3.5 s), and each refinement ran the whole elimination again. Now a step works on two whole
    # rows (14 calls a row) and a refinement reuses the interchanges and multipliers (7).
    # Counted, not timed (the calls for N = 128 less those for N = 64); the answers, zero
    # diagonals included (interchanges needed), against scipy's banded LU in float64.
    from scipy.linalg import solve_banded
    from torch.overrides import TorchFunctionMode

    from convexddn.nodes import _tridiagonal_scaled as scaled

    class Count(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    def counted(f, *args):
        Count.calls = 0
        with Count():
            out = f(*args)
        return Count.calls, out

    systems, factor, refine = {}, {}, {}
    for n in (64, 128):
        systems[n] = system((3,), n, dominant=False, k=2, seed=n)
        systems[n][0][:, ::3] = 0.0
        factor[n], out = counted(scaled.solve_pivoted, *systems[n])
    assert (factor[128] - factor[64]) / 64 <= 16
    for n in (64, 128):
        d, l, u, r = systems[n]
        x, ratio, factors = scaled.solve_pivoted(d, l, u, r)
        for i in range(3):
            ref = solve_banded((1, 1), _banded(d[i].numpy(), l[i].numpy(), u[i].numpy()), r[i].numpy())
            np.testing.assert_allclose(x[i].numpy(), ref, rtol=1e-10, atol=1e-12 * np.abs(ref).max())
        assert bool((ratio > 0).all())
        mask = torch.tensor([True, False, True])
        refine[n], y = counted(scaled.refine_pivoted, (d, l, u, r), factors, x, mask)
        assert torch.equal(y[1], x[1]) and torch.allclose(y, x, rtol=1e-12, atol=0)
    assert (refine[128] - refine[64]) / 64 <= 8


@pytest.mark.parametrize("dtype, d1, d2", [
    (F64, 1e-300, 1.7e308), (F64, 1e-308, 1.7e308), (F64, 1e-310, 1e300), (F64, 1e-320, 1e200),
    (torch.float32, 1e-30, 3e38), (torch.float32, 1e-37, 3e38), (torch.float32, 1e-40, 1e30),
    (torch.float32, 9.8e-45, 1e20)])
def test_tridiagonal_solve_rhs_wide_range(dtype, d1, d2):
    # [[0, 1], [1, 0]] (κ = 1): x = (d2, d1) exactly. The pivoted route lowered the rhs column by
    # 2^511 (float64; 2^(emax/2) for its largest entry), flushing d1: a SolverError blaming the
    # conditioning, or (float32, 9.8e-45) x2 = 0 silently.
    d = torch.tensor([d1, d2], dtype=dtype)
    x = tridiagonal_solve(torch.zeros(2, dtype=dtype), torch.ones(1, dtype=dtype), torch.ones(1, dtype=dtype), d)
    assert torch.equal(x, d.flip(0))
    # The unchecked route (a vmap's) reproduces the answer (the lossless shift recorded in the route).
    flat = (torch.zeros(1, 2, dtype=dtype), torch.ones(1, 1, dtype=dtype), torch.ones(1, 1, dtype=dtype),
            d[None, :, None])
    y, route = solve_checked(*flat, "t", (1,))
    assert torch.equal(solve_checked(*flat, "t", (1,), route=route, check=False)[0], y)


def _spd(dtype, big, k):
    """A = [[2, .5], [.5, 1]] (well conditioned), rhs columns all ``big``."""
    leaf = lambda *v: torch.tensor(v, dtype=dtype, requires_grad=True)  # noqa: E731
    return leaf(2.0, 1.0), leaf(0.5), leaf(0.5), torch.full((2, k), big, dtype=dtype, requires_grad=True)


@pytest.mark.parametrize("dtype, big", [(torch.float32, 1e30), (F64, 1e200)])
def test_tridiagonal_solve_grad_cancelling_products(dtype, big, recwarn):
    # Incoming gradient columns +big and -big: dL/db_i = -Σ_k w_ik x_ik = 0 exactly (the columns
    # cancel), every product w_ik x_ik ~ big² beyond the range: plainly NaN for diag, lower and upper.
    b, a, c, d = _spd(dtype, big, 2)
    g = torch.tensor([[big, -big], [big, -big]], dtype=dtype)
    tridiagonal_solve(b, a, c, d).backward(g)
    for t in (b, a, c):
        assert torch.equal(t.grad, torch.zeros_like(t))
    A = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=F64)
    w = torch.linalg.solve(A.T, g.double())  # (closed form: dL/dd = A^-T g)
    torch.testing.assert_close(d.grad.double(), w, rtol=4 * torch.finfo(dtype).eps, atol=0)
    assert not [w for w in recwarn.list if issubclass(w.category, GradientWarning)]


def test_tridiagonal_solve_grad_overflow_warns():
    # K = 1: dL/db_i = -w_i x_i ~ -8e59, beyond float32: -Inf, which now comes with a warning.
    b, a, c, d = _spd(torch.float32, 1e30, 1)
    with pytest.warns(GradientWarning, match="diag"):
        tridiagonal_solve(b, a, c, d).backward(torch.full((2, 1), 1e30))
    assert torch.isinf(b.grad).all() and (b.grad < 0).all()
    # Broadcast over a batch: rows +1e200 and -1e200 (float64) whose per-row gradients ±big² cancel.
    b2, a2, c2 = (t.detach().double()[None].requires_grad_() for t in (b, a, c))
    rhs = torch.full((2, 2), 1e200, dtype=F64)
    x = tridiagonal_solve(b2, a2, c2, rhs)  # (batch 2, one shared matrix: diag (1, 2), rhs (2, 2))
    x.backward(torch.tensor([[1e200, 1e200], [-1e200, -1e200]], dtype=F64))
    assert torch.equal(b2.grad, torch.zeros(1, 2, dtype=F64)) and torch.equal(a2.grad, torch.zeros(1, 1, dtype=F64))


def test_tridiagonal_overflow_warnings_name_the_batch_index():
    # They named (1, 2) of a (2, 3) batch as "flat indices [5]"; now (1, 2). A = I throughout,
    # x = 1e200 at (1, 2) only: dL/db = -w x ~ -1e400 there (backward), x_t = -db x (forward).
    named = r"at 1 of 6 batch element\(s\) \(indices \[\(1, 2\)\]\)"
    b, a, c = torch.ones(2, 3, 2, dtype=F64), torch.zeros(2, 3, 1, dtype=F64), torch.zeros(2, 3, 1, dtype=F64)
    d = torch.ones(2, 3, 2, dtype=F64)
    d[1, 2] = 1e200
    bg = b.clone().requires_grad_()
    with pytest.warns(GradientWarning, match="diag " + named):
        tridiagonal_solve(bg, a, c, d).backward(d)
    db = torch.zeros_like(b)
    db[1, 2, 0] = 1e200
    with pytest.warns(GradientWarning, match="tangent of the solution " + named):
        torch.func.jvp(tridiagonal_solve, (b, a, c, d), (db, a, c, torch.zeros_like(d)))


def test_tridiagonal_solve_jvp_product_overflow():
    # x = (1e200, 1e200) (A = I); tangents db = (1e200, 0), dc = -1e200: (dA x)_1 = 1e400 - 1e400 = 0,
    # plainly Inf - Inf = NaN; the tangent x_t = -A^-1 dA x = 0 exactly.
    one = lambda *v: torch.tensor(v, dtype=F64)  # noqa: E731
    primals = (one(1.0, 1.0), one(0.0), one(0.0), one(1e200, 1e200))
    tangents = (one(1e200, 0.0), one(0.0), one(-1e200), one(0.0, 0.0))
    _, x_t = torch.func.jvp(tridiagonal_solve, primals, tangents)
    assert torch.equal(x_t, torch.zeros(2, dtype=F64))
    # Truly beyond the range: x_t = -(1e400, 0): a GradientWarning naming the tangent.
    with pytest.warns(GradientWarning, match="tangent"):
        _, x_t = torch.func.jvp(tridiagonal_solve, primals, (one(1e200, 0.0), one(0.0), one(0.0), one(0.0, 0.0)))
    assert x_t[0] == -np.inf and x_t[1] == 0


def test_nested_jacfwd_of_one_system_refuses_with_double_backward_error():
    """One system (no batch dims): its batch shape, an empty tuple handed to the Function,
    was a pytree node the vmap rule torch.func generates could not flatten (torch's
    "flat_bdims must not be None" under jacfwd∘jacfwd); now the node's own refusal."""
    g = torch.Generator().manual_seed(0)
    d = 3 + torch.rand(6, dtype=torch.float64, generator=g)
    lo, up = (torch.rand(5, dtype=torch.float64, generator=g) for _ in range(2))
    r = torch.randn(6, dtype=torch.float64, generator=g)
    f = lambda r: tridiagonal_solve(d, lo, up, r)  # noqa: E731
    J = torch.func.jacfwd(f)(r)
    A = torch.diag(d) + torch.diag(lo, -1) + torch.diag(up, 1)
    torch.testing.assert_close(J, torch.linalg.inv(A), atol=1e-12, rtol=0)  # (x = A⁻¹ r)
    with pytest.raises(DoubleBackwardError):
        torch.func.jacfwd(torch.func.jacfwd(lambda r: f(r).pow(2).sum()))(r)


@pytest.mark.parametrize("batch", [(2,), (3, 2)])
@pytest.mark.parametrize("k", [None, 3])
def test_result_edited_in_place_differentiates_or_raises_the_version_error(batch, k):
    # The result was a view made inside the custom Function (a reshape of a (3, 2) batch, the
    # squeeze of a vector rhs): y.add_(1) raised "a view ... created inside a custom Function".
    # Now it is torch's own rule: with one batch dimension the result is the solution the
    # backward saved, so an edit of it fails there as for torch.linalg.solve; with several,
    # the result is a copy, and the edited result differentiates exactly.
    gen = torch.Generator().manual_seed(1)
    d = (torch.randn(*batch, 5, dtype=torch.float64, generator=gen) + 4).requires_grad_()
    lo = torch.randn(*batch, 4, dtype=torch.float64, generator=gen)
    up = torch.randn(*batch, 4, dtype=torch.float64, generator=gen)
    rhs = torch.randn(*batch, 5, *(() if k is None else (k,)), dtype=torch.float64, generator=gen)
    (ref,) = torch.autograd.grad(tridiagonal_solve(d, lo, up, rhs).sum(), d)
    y = tridiagonal_solve(d, lo, up, rhs)
    y.add_(1.0)
    if len(batch) == 1:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(y.sum(), d)
    else:
        (got,) = torch.autograd.grad(y.sum(), d)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["diag", "lower", "upper"])
@pytest.mark.parametrize("dtype,batch", [(F64, (2,)), (F64, (1,)), (torch.float16, (2,))],
                         ids=["float64", "broadcast", "float16"])
def test_matrix_input_edited_in_place_raises_the_version_error(name, dtype, batch):
    # The backward saved views of the inputs made in setup_context (under no_grad): an edit
    # between the forward and the backward raised torch's "A view was created in no_grad mode
    # ... modified inplace", with advice about no_grad blocks the caller never wrote (a
    # broadcast or float16 input, saved as a copy, passed). Now torch's version error, as
    # torch.sin's for the same composition.
    gen = torch.Generator().manual_seed(2)
    args = {"diag": 4 + torch.rand(*batch, 6, dtype=F64, generator=gen),
            "lower": torch.randn(*batch, 5, dtype=F64, generator=gen),
            "upper": torch.randn(*batch, 5, dtype=F64, generator=gen),
            "rhs": torch.randn(2, 6, dtype=F64, generator=gen)}
    leaves = {k: v.to(dtype).requires_grad_() for k, v in args.items()}
    mids = {k: v * 1 for k, v in leaves.items()}
    y = tridiagonal_solve(**mids)
    mids[name].add_(0.1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation") as info:
        y.sum().backward()
    assert "no_grad" not in str(info.value)


def test_rhs_edited_in_place_differentiates_at_the_forward_point():
    # rhs is not read by the derivatives (x and Aᵀ are): an edit of it after the forward leaves
    # the gradient that of the forward's point, as torch.linalg.solve's (the reference here).
    gen = torch.Generator().manual_seed(3)
    d = 4 + torch.rand(2, 6, dtype=F64, generator=gen)
    lo, up = torch.randn(2, 5, dtype=F64, generator=gen), torch.randn(2, 5, dtype=F64, generator=gen)
    w = torch.randn(2, 6, dtype=F64, generator=gen)
    rhs = torch.randn(2, 6, dtype=F64, generator=gen).requires_grad_()
    r = rhs * 1
    y = tridiagonal_solve(d, lo, up, r)
    r.add_(1.0)
    (got,) = torch.autograd.grad((y * w).sum(), rhs)
    r2 = rhs.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad((torch.linalg.solve(dense(d, lo, up), r2.unsqueeze(-1)).squeeze(-1) * w).sum(), r2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
