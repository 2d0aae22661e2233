"""Tests of convexddn.nodes.transport: entropic optimal transport (log-domain Sinkhorn)."""
from __future__ import annotations

import math
import re
import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

from convexddn.errors import (
    DTypeError,
    GradientWarning,
    InputError,
    NonFiniteError,
    OptionError,
    ShapeError,
    SolverWarning,
)
from convexddn.nodes.transport import OptimalTransport, sinkhorn

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cost(*shape: int, seed: int = 0, dtype=F64) -> torch.Tensor:
    return torch.rand(*shape, generator=_gen(seed), dtype=dtype)


def _marginal(n: int, seed: int, dtype=F64) -> torch.Tensor:
    v = torch.rand(n, generator=_gen(seed), dtype=dtype) + 0.2
    return v / v.sum()


def _cvxpy_entropic(C: np.ndarray, a: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """Independent solve of argmin <C, P> − eps H(P) s.t. marginals (exponential cone)."""
    P = cp.Variable(C.shape)
    objective = cp.sum(cp.multiply(C, P)) - eps * cp.sum(cp.entr(P))
    constraints = [cp.sum(P, axis=1) == a, cp.sum(P, axis=0) == b]
    cp.Problem(cp.Minimize(objective), constraints).solve(
        solver=cp.CLARABEL, tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11
    )
    return P.value


def _gibbs_residual(P: torch.Tensor, C: torch.Tensor, eps: float) -> torch.Tensor:
    """Max |double-centred log P + C/eps|: zero iff P_ij = exp(α_i + β_j − C_ij/eps).

    The stationarity condition of the entropic problem, checked on the logs, so every
    entry counts equally however small it is.
    """
    L = P.log() + C / eps
    R = L - L.mean(-1, keepdim=True) - L.mean(-2, keepdim=True) + L.mean((-2, -1), keepdim=True)
    return R.abs().max()


# --------------------------------------------------------------------------- solution


@pytest.mark.parametrize("eps", [1.0, 0.1, 0.05])
@pytest.mark.parametrize("shape", [(3, 4), (5, 2), (2, 7, 7)])
def test_sinkhorn_optimality(shape, eps):
    C = _cost(*shape, seed=1)
    m, n = shape[-2:]
    a, b = _marginal(m, 2), _marginal(n, 3)
    P = sinkhorn(C, a, b, eps=eps)
    assert P.shape == C.shape and P.dtype == F64
    assert torch.allclose(P.sum(-1), a.expand(P.shape[:-1]), atol=1e-15, rtol=1e-13)
    # Columns within the default tol (1e-12, relative L1).
    assert (P.sum(-2) - b).abs().sum(-1).max() <= 1e-12
    assert _gibbs_residual(P, C, eps) < 1e-9


@pytest.mark.parametrize("eps", [0.5, 0.1])
def test_sinkhorn_matches_cvxpy(eps):
    C = _cost(3, 4, seed=4)
    a, b = _marginal(3, 5), _marginal(4, 6)
    P = sinkhorn(C, a, b, eps=eps).numpy()
    expected = _cvxpy_entropic(C.numpy(), a.numpy(), b.numpy(), eps)
    # Clarabel's exponential cone stops near 1e-7 here; the objective shows which is
    # closer to the minimum (both are feasible to 1e-12).
    np.testing.assert_allclose(P, expected, atol=1e-6)

    def objective(P):
        return (C.numpy() * P).sum() + eps * (P * np.log(P)).sum()

    assert objective(P) <= objective(expected) + 1e-13


def test_sinkhorn_small_eps_tiny_entries_exact():
    # Costs in [0, 4) at eps = 0.05: entries reach ~1e-31 and below; the log-domain
    # solve keeps their relative precision (checked on the logs).
    C = 4 * _cost(2, 100, 100, seed=7)
    P = sinkhorn(C, eps=0.05)
    assert P.min() < 1e-30
    assert _gibbs_residual(P, C, 0.05) < 1e-9
    assert (P.sum(-2) - 0.01).abs().sum(-1).max() <= 1e-12


def test_sinkhorn_sharp_costs_converge():
    # Gaussian costs at small eps: a nearly-permutation plan, where plain Sinkhorn
    # converges very slowly; the Newton steps finish it to the tolerance.
    C = torch.randn(2, 40, 40, generator=_gen(8), dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverWarning)
        P = sinkhorn(C, eps=0.05)
    assert (P.sum(-2) - 1 / 40).abs().sum(-1).max() < 1e-12
    assert _gibbs_residual(P, C, 0.05) < 1e-8


@pytest.mark.parametrize("scale", [0.5, 2.0, 4.5])
def test_sinkhorn_kernel_path_matches_log_domain(scale):
    # Rows spreading over 5ε, 20ε and 45ε (≤ 50ε): plain Sinkhorn on the kernel serves
    # them; at 45ε it converges slowly and hands over to the Newton rounds. Each must
    # give the plan of the log-domain solver (run directly) to the tolerance.
    from convexddn.nodes import _sinkhorn

    C = scale * _cost(3, 30, 40, seed=11)
    a, b = _marginal(30, 12).expand(3, 30), _marginal(40, 13).expand(3, 40)
    P, err, _ = _sinkhorn.solve(C, a, b, 0.1, 1000, 1e-12)
    st, _ = _sinkhorn._solve_at(C, a, b, 0.1, 1000, 1e-12, None)
    P_log, err_log = st.P, st.err
    assert err.max() <= 1e-12 and err_log.max() <= 1e-12
    torch.testing.assert_close(P, P_log, rtol=1e-9, atol=0)
    assert _gibbs_residual(P, C, 0.1) < 1e-9


def test_sinkhorn_kernel_hands_slow_cases_to_newton(monkeypatch):
    # Gaussian costs at 0.4 scale spread over ~40ε per row: plain Sinkhorn's rate is
    # slow there, so it must stop early and leave the rest to Newton (few iterations).
    from convexddn.nodes import _sinkhorn

    C = 0.4 * torch.randn(2, 60, 60, generator=_gen(14), dtype=F64)
    a = torch.full((2, 60), 1 / 60, dtype=F64)
    used = []
    kernel = _sinkhorn._kernel_sinkhorn
    monkeypatch.setattr(_sinkhorn, "_kernel_sinkhorn", lambda *x: used.append(r := kernel(*x)) or r)
    P, err, _ = _sinkhorn.solve(C, a, a, 0.1, 1000, 1e-12)
    assert err.max() <= 1e-12
    assert used and used[0][3].max() < _sinkhorn.KERNEL_ITERS  # handed over, budget not spent
    assert used[0][1].max() > 1e-12
    assert _gibbs_residual(P, C, 0.1) < 1e-9


def _mixed(m: int, n: int, seed: int) -> torch.Tensor:
    """Five costs at ε = 1: rows of elements 1 and 3 spread over ~100ε (randn·30, the log domain's),
    the others' over ~4ε (the kernel path's)."""
    C = torch.randn(5, m, n, generator=_gen(seed), dtype=F64)
    C[[1, 3]] *= 30
    return C


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("m,n", [(12, 9), (9, 12)])
def test_sinkhorn_mixed_batch_matches_separate_calls(m, n, padded):
    # The path is chosen per element: an element's plan is that of a call on its own path's
    # elements alone, bit for bit, whatever its batch mates need (one hard element used to
    # send every easy one to the log domain: 15-20x slower, 5e-14 apart), and so are its
    # gradients (to rounding).
    C = _mixed(m, n, 60)
    a = torch.rand(5, m, generator=_gen(61), dtype=F64) + 0.2
    b = torch.rand(5, n, generator=_gen(62), dtype=F64) + 0.2
    if padded:  # (zero patterns in both groups)
        a[0, -2:] = a[3, 0] = b[1, 1] = b[4, -1] = 0.0
    W = torch.randn(5, m, n, generator=_gen(63), dtype=F64)

    def run(idx):
        Ci, ai, bi = (t[idx].clone().requires_grad_() for t in (C, a, b))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            P = sinkhorn(Ci, ai, bi, eps=1.0)
            return (P.detach(), *torch.autograd.grad((P * W[idx]).sum(), (Ci, ai, bi)))

    mixed = run([0, 1, 2, 3, 4])
    for idx in ([0, 2, 4], [1, 3]):
        alone = run(idx)
        assert torch.equal(mixed[0][idx], alone[0])
        # (The gradients to rounding: the public function's sums over a's entries, batched
        # differently, may round differently in the last place.)
        # (atol: a few ulp of each gradient's largest entry. The cost gradient's entries
        # near 0 are off by that, far beyond rtol of themselves: up to 3.3e-16 at
        # max |g| = 9.3e-2, the only entries over rtol + 1e-17.)
        for got, want in zip(mixed[1:], alone[1:]):
            torch.testing.assert_close(got[idx], want, rtol=1e-13, atol=1e-14 * float(want.abs().max()))
    # And each plan is the optimum (an independent check: marginals and the Gibbs form).
    P = mixed[0]
    # (b is rescaled to a's mass; the column error is relative to it.)
    bm = b * (a.sum(-1) / b.sum(-1)).unsqueeze(-1)
    torch.testing.assert_close(P.sum(-1), a, rtol=1e-13, atol=1e-16)
    assert ((P.sum(-2) - bm).abs().sum(-1) / a.sum(-1)).max() <= 1e-12
    for k in range(5):
        live = (a[k] > 0).unsqueeze(-1) & (b[k] > 0)
        assert torch.equal(P[k][~live], torch.zeros_like(P[k][~live]))
        Pk, Ck = _live(P[k], a[k], b[k]), _live(C[k], a[k], b[k])
        assert _gibbs_residual(Pk, Ck, 1.0) < 1e-8


class _Calls(torch.overrides.TorchFunctionMode):
    """Counts the torch calls (functions, methods, properties) made under it, and the host
    reads among them (``item``, ``tolist``, ``bool``, ``float``, ``int`` of a tensor)."""

    HOST = {"item", "tolist", "__bool__", "__float__", "__int__"}

    def __init__(self):
        super().__init__()
        self.calls, self.reads = 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        self.reads += getattr(func, "__name__", "") in self.HOST
        return func(*args, **(kwargs or {}))


def test_sinkhorn_easy_batch_setup_reads_host_once():
    # The bench's easy case (#14): (2, 100, 100) costs in [0, 1) at eps = 0.1, a spread of
    # 10ε, which plain kernel Sinkhorn solves in 13 iterations. Its set-up (offset lines,
    # row shifts, spreads, the path split) read the host three times and took as long as
    # those iterations: 7 host reads and 153 torch calls in the whole forward, now 5 (the
    # set-up's one, three error checks of the kernel, the caller's warning test) and 134;
    # 138 with the inputs' graph anchor for the double-backward guard (convexddn._anchor: a
    # checkpointed sinkhorn's create_graph=True gradient needs it), no host read.
    C = _cost(2, 100, 100, seed=0).requires_grad_()
    sinkhorn(C, eps=0.1)  # (first-call set-up out of the count)
    with _Calls() as count:
        P = sinkhorn(C, eps=0.1)
    assert count.reads == 5
    assert count.calls <= 138
    # The plan is the exact one all the same (rows exact, columns within tol).
    assert (P.sum(-1) - 0.01).abs().max() <= 1e-17
    assert (P.sum(-2) - 0.01).abs().sum(-1).max() <= 1e-12
    assert _gibbs_residual(P.detach(), C.detach(), 0.1) < 1e-12


def test_sinkhorn_kernel_path_matches_mpmath():
    # The kernel e^{-D/ε} is formed as 2^{-D·log₂e/ε} (exp2: 0.6 of exp's time): the plan
    # keeps float64's accuracy against a 50-digit solve (eps = 0.1 as C/0.1 at eps = 1).
    mp = pytest.importorskip("mpmath")
    C = _cost(6, 5, seed=9)
    a, b = _marginal(6, 10), _marginal(5, 11)
    P = sinkhorn(C, a, b, eps=0.1, tol=1e-15)
    with mp.workdps(50):
        ref, _ = _entropic_mp([[mp.mpf(v) / mp.mpf("0.1") for v in row] for row in C.tolist()],
                              [mp.mpf(v) for v in a.tolist()], [mp.mpf(v) for v in b.tolist()])
    ref = torch.tensor([[float(v) for v in row] for row in ref], dtype=F64)
    assert ((P - ref).abs() / ref).max() < 1e-13


def test_sinkhorn_mixed_batch_easy_elements_take_kernel_path(monkeypatch):
    # Instrumented: the four elements within 50ε go to plain kernel Sinkhorn as one batch,
    # only the two beyond (rows spreading over ~90ε) to the log-domain solver.
    from convexddn.nodes import _sinkhorn

    C = _cost(6, 10, 8, seed=64)
    C[[2, 5]] *= 100
    used = []
    for name in ("_kernel_sinkhorn", "_solve_at"):
        f = getattr(_sinkhorn, name)
        monkeypatch.setattr(_sinkhorn, name, lambda *x, f=f, name=name: used.append((name, len(x[0]))) or f(*x))
    P = sinkhorn(C, eps=1.0)
    assert used == [("_kernel_sinkhorn", 4), ("_solve_at", 2)]
    assert (P.sum(-2) - 0.125).abs().sum(-1).max() <= 1e-12
    assert _gibbs_residual(P, C, 1.0) < 1e-8


def test_sinkhorn_mixed_batch_gradcheck():
    # The backward of a batch split between the two paths (element 1 beyond 50ε), against
    # central differences in float64, through the costs and both marginals.
    eps = 0.5
    C = _cost(3, 5, 4, seed=65)
    C[1] *= 40
    spread = (C - C.amin(-1, keepdim=True)).amax((-2, -1))
    assert spread[1] > 50 * eps > spread[[0, 2]].max()
    C.requires_grad_()
    a = (_marginal(5, 66) * 2).expand(3, 5).clone().requires_grad_()
    b = _marginal(4, 67).expand(3, 4).clone().requires_grad_()
    assert gradcheck(lambda C, a, b: sinkhorn(C, a, b, eps=eps), (C, a, b), atol=1e-8, rtol=1e-6)


def test_sinkhorn_row_offsets_do_not_change_plan():
    # A constant added to each row of C is absorbed by α: the plan is the same, and
    # the solver's path (chosen by the row ranges) must not change either.
    C = _cost(2, 20, 25, seed=15)
    shift = 100 * torch.randn(2, 20, 1, generator=_gen(16), dtype=F64)
    torch.testing.assert_close(sinkhorn(C + shift, eps=0.05), sinkhorn(C, eps=0.05), rtol=1e-9, atol=0)


def test_sinkhorn_rows_exact_on_both_orientations():
    # M < N is solved transposed (the Schur complement on the smaller side): the rows
    # must still be the exact marginal, the columns within tol.
    for m, n in ((7, 12), (12, 7)):
        C = _cost(m, n, seed=17)
        a, b = _marginal(m, 18), _marginal(n, 19)
        P = sinkhorn(C, a, b, eps=0.1)
        torch.testing.assert_close(P.sum(-1), a, rtol=1e-14, atol=0)
        assert (P.sum(-2) - b).abs().sum() <= 1e-12


def test_sinkhorn_marginal_mass():
    # b is rescaled to a's mass: P1 = a, Pᵀ1 = b Σa / Σb.
    C = _cost(4, 3, seed=9)
    a = torch.tensor([1.0, 2.0, 0.5, 0.5], dtype=F64)
    b = torch.tensor([1.0, 1.0, 2.0], dtype=F64)
    P = sinkhorn(C, a, b, eps=0.3)
    assert torch.allclose(P.sum(-1), a, atol=1e-14)
    assert torch.allclose(P.sum(-2), b * a.sum() / b.sum(), atol=1e-12)
    # Scaling the marginals scales the plan.
    assert torch.allclose(sinkhorn(C, 3 * a, b, eps=0.3), 3 * P, atol=1e-13)


def test_sinkhorn_defaults_uniform():
    C = _cost(3, 5, seed=10)
    P = sinkhorn(C, eps=0.2)
    assert torch.allclose(P.sum(-1), torch.full((3,), 1 / 3, dtype=F64), atol=1e-15)
    assert torch.allclose(P.sum(-2), torch.full((5,), 1 / 5, dtype=F64), atol=1e-13)
    assert torch.allclose(P, sinkhorn(C, torch.ones(3, dtype=F64) / 3, torch.ones(5, dtype=F64), eps=0.2))


def test_sinkhorn_large_eps_is_independent_coupling():
    # eps → ∞: the entropy dominates and P → a bᵀ.
    C = _cost(3, 4, seed=11)
    a, b = _marginal(3, 12), _marginal(4, 13)
    P = sinkhorn(C, a, b, eps=1e6)
    assert torch.allclose(P, a[:, None] * b[None, :], atol=1e-6)


def test_sinkhorn_batched_broadcast():
    C = _cost(2, 3, 4, 5, seed=14)
    a = _marginal(4, 15)  # shared
    b = torch.stack([_marginal(5, 16 + i) for i in range(3)]).unsqueeze(0)  # (1, 3, 5)
    P = sinkhorn(C, a, b, eps=0.2)
    assert P.shape == (2, 3, 4, 5)
    for i in range(2):
        for j in range(3):
            one = sinkhorn(C[i, j], a, b[0, j], eps=0.2)
            assert torch.allclose(P[i, j], one, atol=1e-14)


def test_sinkhorn_empty_batch_and_trivial_sides():
    assert sinkhorn(torch.zeros(0, 3, 4, dtype=F64)).shape == (0, 3, 4)
    a = _marginal(4, 17)
    P = sinkhorn(_cost(4, 1, seed=18), a, eps=0.1)  # one column: P = a
    assert torch.allclose(P[:, 0], a, atol=1e-15)
    assert torch.allclose(sinkhorn(_cost(1, 1, seed=19)), torch.ones(1, 1, dtype=F64))


def test_sinkhorn_float32_and_no_grad():
    C = _cost(2, 6, 5, seed=20)
    P64 = sinkhorn(C, eps=0.1)
    P32 = sinkhorn(C.float(), eps=0.1)
    assert P32.dtype == torch.float32
    assert torch.allclose(P32.double(), P64, rtol=1e-6, atol=1e-9)
    with torch.no_grad():
        assert torch.equal(sinkhorn(C.requires_grad_(), eps=0.1), P64)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("eps", [1.0, 0.2, 0.05])
@pytest.mark.parametrize("shape", [(3, 4), (4, 3)])
def test_sinkhorn_grad(shape, eps):
    m, n = shape
    C = _cost(2, m, n, seed=21).requires_grad_()
    a = (_marginal(m, 22) * 2).requires_grad_()
    b = _marginal(n, 23).expand(2, n).clone().requires_grad_()
    assert gradcheck(lambda C, a, b: sinkhorn(C, a, b, eps=eps), (C, a, b), atol=1e-8, rtol=1e-6)


def test_sinkhorn_grad_small_eps_not_vanishing():
    # At eps = 0.05 a backward through e^{-C/eps} loses the small entries; the implicit
    # one is checked against central differences at 1e-8.
    C = _cost(1, 6, 6, seed=24).requires_grad_()
    assert gradcheck(lambda C: sinkhorn(C, eps=0.05), (C,), atol=1e-8, rtol=1e-6)
    w = torch.randn(1, 6, 6, generator=_gen(25), dtype=F64)
    (g,) = torch.autograd.grad((sinkhorn(C, eps=0.05) * w).sum(), C)
    assert g.abs().max() > 1e-3


def test_sinkhorn_grad_marginal_direction():
    # The gradient with respect to b is orthogonal to b (b is rescaled to a's mass), and
    # scaling a scales P: ⟨∂L/∂a, a⟩ = ⟨∂L/∂P, P⟩.
    C = _cost(3, 4, seed=26)
    a = _marginal(3, 27).requires_grad_()
    b = _marginal(4, 28).requires_grad_()
    V = torch.randn(3, 4, generator=_gen(29), dtype=F64)
    P = sinkhorn(C, a, b, eps=0.3)
    ga, gb = torch.autograd.grad((P * V).sum(), (a, b))
    b = b.detach()
    assert abs(float((gb * b).sum())) < 1e-12
    assert abs(float((ga * a.detach()).sum() - (V * P.detach()).sum())) < 1e-12


def test_doubly_stochastic_attention():
    # Sinkformer-style attention: P = sinkhorn(-QKᵀ/√d, 1, 1) is doubly stochastic;
    # the whole block differentiates through Q, K and V.
    g = _gen(30)
    Q, K, V = (torch.randn(2, 5, 4, generator=g, dtype=F64).requires_grad_() for _ in range(3))
    ones = torch.ones(5, dtype=F64)

    def attention(Q, K, V, eps=1.0):
        P = sinkhorn(-(Q @ K.transpose(-1, -2)) / 2.0, ones, ones, eps=eps)
        return P @ V, P

    _, P = attention(Q, K, V)
    assert torch.allclose(P.sum(-1), torch.ones(2, 5, dtype=F64), atol=1e-14)
    assert torch.allclose(P.sum(-2), torch.ones(2, 5, dtype=F64), atol=1e-12)
    # Its first row normalisation is softmax; balancing the columns moves it off softmax.
    soft = torch.softmax(Q @ K.transpose(-1, -2) / 2.0, -1)
    assert not torch.allclose(P, soft, atol=1e-3)
    q, k, v = (t[:1, :4, :3].detach().clone().requires_grad_() for t in (Q, K, V))
    ones = ones[:4]
    assert gradcheck(lambda Q, K, V: attention(Q, K, V)[0], (q, k, v), atol=1e-8, rtol=1e-6)
    # The small eps of the DDN attention tutorial: sharp, still exact.
    assert gradcheck(lambda Q: attention(Q, k, v, 0.05)[0], (q,), atol=1e-8, rtol=1e-6)


def test_sinkhorn_disconnected_support_warns():
    # Costs so far apart that P is block diagonal to float64: the marginal gradients
    # are not unique there; the cost gradient still is.
    C = torch.tensor([[0.0, 1e4], [1e4, 0.0]], dtype=F64, requires_grad=True)
    a = torch.tensor([0.5, 0.5], dtype=F64, requires_grad=True)
    P = sinkhorn(C, a, eps=1.0)
    with pytest.warns(GradientWarning, match="disconnected"):
        gC, _ = torch.autograd.grad(P[0, 0], (C, a))
    assert torch.isfinite(gC).all()


# --------------------------------------------------------------------------- module, errors


def test_optimal_transport_module():
    ot = OptimalTransport(eps=0.2, max_iter=500)
    assert "eps=0.2" in repr(ot) and "max_iter=500" in repr(ot)
    C = _cost(2, 3, 3, seed=31)
    assert torch.equal(ot(C), sinkhorn(C, eps=0.2, max_iter=500))
    with pytest.raises(OptionError, match="eps"):
        OptimalTransport(eps=0.0)


def test_sinkhorn_not_converged_warns():
    C = torch.randn(1, 30, 30, generator=_gen(32), dtype=F64)
    with pytest.warns(SolverWarning, match="did not reach tol"):
        sinkhorn(C, eps=0.01, max_iter=2)


def test_sinkhorn_invalid():
    C = _cost(3, 4, seed=33)
    with pytest.raises(DTypeError, match="cost"):
        sinkhorn(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ShapeError, match="cost"):
        sinkhorn(torch.ones(4, dtype=F64))
    with pytest.raises(ShapeError, match="cost"):
        sinkhorn(torch.ones(3, 0, dtype=F64))
    with pytest.raises(ShapeError, match="a must have shape"):
        sinkhorn(C, torch.ones(4, dtype=F64))
    with pytest.raises(ShapeError, match="b must have shape"):
        sinkhorn(C, None, torch.ones(3, dtype=F64))
    with pytest.raises(ShapeError, match="broadcast"):
        sinkhorn(_cost(2, 3, 4, seed=34), torch.ones(5, 3, dtype=F64))
    # Checked after the solve (which returns at once on NaN or Inf): every kind of
    # non-finite entry, with and without a graph, on the kernel and the ε-scaling path.
    for value in (float("nan"), float("inf"), float("-inf")):
        for eps in (1.0, 1e-3):
            bad = C.clone()
            bad[1, 2] = value
            with pytest.raises(NonFiniteError, match="cost must be finite"):
                sinkhorn(bad, eps=eps)
            with pytest.raises(NonFiniteError, match="cost must be finite"):
                sinkhorn(bad.requires_grad_(), eps=eps)
    with pytest.raises(NonFiniteError, match="a"):
        sinkhorn(C, torch.tensor([1.0, float("inf"), 1.0], dtype=F64))
    with pytest.raises(InputError, match=r"b must be >= 0 everywhere.*got 1 entry < 0 \(min -0\.5\)"):
        sinkhorn(C, None, torch.tensor([1.0, -0.5, 1.0, 1.0], dtype=F64))
    with pytest.raises(DTypeError, match="a"):
        sinkhorn(C, [1.0, 1.0, 1.0])
    for kwargs in ({"eps": 0.0}, {"eps": -1.0}, {"eps": True}, {"eps": float("inf")},
                   {"max_iter": 0}, {"max_iter": 2.5}, {"tol": -1.0}, {"tol": "x"}):
        with pytest.raises(OptionError):
            sinkhorn(C, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sinkhorn_cuda():
    C = _cost(2, 6, 5, seed=35)
    P = sinkhorn(C.cuda().requires_grad_(), eps=0.1)
    assert P.device.type == "cuda"
    assert torch.allclose(P.cpu(), sinkhorn(C, eps=0.1), atol=1e-12)
    P.sum().backward()
    # Padding (zero marginal entries) on CUDA: the same plan and gradients as on the CPU.
    for scale, eps in _PATHS:
        C, a, b, _ = _padded_batch(6, 5, scale)
        W = torch.randn(4, 6, 5, generator=_gen(36), dtype=F64)
        out = []
        for device in ("cpu", "cuda"):
            Cd, ad, bd = (t.to(device).requires_grad_() for t in (C, a, b))
            Pd = sinkhorn(Cd, ad, bd, eps=eps)
            out.append([t.cpu() for t in (Pd, *torch.autograd.grad((Pd * W.to(device)).sum(), (Cd, ad, bd)))])
        for cpu, cuda in zip(*out):
            assert torch.isfinite(cuda).all()
            torch.testing.assert_close(cuda, cpu, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- audit fixes


def _reference_plan(C: torch.Tensor, eps: float, iters: int = 200_000) -> torch.Tensor:
    """Independent plan for uniform marginals: plain log-domain Sinkhorn in float64,
    run until the column error is below 1e-14 (feasible for moderate C/eps only)."""
    m, n = C.shape[-2:]
    la, lb = -np.log(m), -np.log(n)
    f = torch.zeros(C.shape[:-1], dtype=F64)
    g = torch.zeros(C.shape[:-2] + C.shape[-1:], dtype=F64)
    for k in range(iters):
        f = la - torch.logsumexp(g.unsqueeze(-2) - C / eps, -1)
        g = lb - torch.logsumexp(f.unsqueeze(-1) - C / eps, -2)
        if k % 10 == 0:
            # Columns exact after the g update: the rows' error is the test.
            P = (f.unsqueeze(-1) + g.unsqueeze(-2) - C / eps).exp()
            if (P.sum(-1) - 1 / m).abs().sum(-1).max() < 1e-14:
                return P
    raise AssertionError("reference Sinkhorn did not converge")


def test_sinkhorn_budget_spent_during_scaling_warns():
    # max_iter runs out while ε-scaling is still at a larger ε: that stage's plan passes
    # a loose tol there, but it is not the plan at eps, and must not be returned silently.
    C = torch.rand(4, 4, generator=_gen(3), dtype=F64)
    with pytest.warns(SolverWarning, match="did not reach tol"):
        P = sinkhorn(C, eps=0.01, max_iter=21, tol=1e-3)
    # What is returned is of the form exp(α + β − C/eps) at eps itself, rows exact.
    assert _gibbs_residual(P, C, 0.01) < 1e-9
    torch.testing.assert_close(P.sum(-1), torch.full((4,), 0.25, dtype=F64), rtol=1e-14, atol=0)


def test_sinkhorn_easy_element_not_harmed_by_hard_one():
    # ε-scaling and its budget are per element: an easy element batched with one whose
    # costs spread over 1e5 ε must get its own plan at eps, to tol, within max_iter.
    g = _gen(1)
    easy = torch.rand(1, 8, 8, generator=g, dtype=F64)
    hard = 1000 * torch.randn(1, 8, 8, generator=g, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverWarning)
        P = sinkhorn(torch.cat([easy, hard]), eps=0.05, max_iter=50)
    torch.testing.assert_close(P[0], _reference_plan(easy[0], 0.05), rtol=1e-10, atol=1e-16)
    # A hard element that cannot finish is named, the easy one still exact.
    hard = 30 * torch.randn(1, 40, 40, generator=_gen(2), dtype=F64)
    with pytest.warns(SolverWarning, match=r"index\(es\) \[\(1,\)\]"):
        P = sinkhorn(torch.cat([easy.expand(1, 8, 8).repeat(1, 5, 5), hard]), eps=0.05, max_iter=30)
    C0 = easy[0].repeat(5, 5)
    torch.testing.assert_close(P[0], _reference_plan(C0, 0.05), rtol=1e-10, atol=1e-16)


@pytest.mark.parametrize("offset", ["constant", "columns"])
def test_sinkhorn_large_cost_offsets_converge(offset):
    # Constants added to all costs, or to each column, do not change the plan; the
    # solver subtracts them first, so its potentials do not grow to |C|/eps and the
    # column error still reaches the default 1e-12.
    C = torch.randn(20, 25, generator=_gen(1), dtype=F64)
    shift = 1e4 if offset == "constant" else 1e4 * torch.rand(1, 25, generator=_gen(2), dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverWarning)
        P = sinkhorn(C + shift, eps=0.1)
    assert (P.sum(-2) - 1 / 25).abs().sum() <= 1e-12
    # C + shift is C rounded to ulp(1e4) ≈ 2e-12, i.e. 2e-11 in C/eps.
    torch.testing.assert_close(P, _reference_plan(C, 0.1), rtol=1e-9, atol=0)


def test_sinkhorn_empty_batch_keeps_graph():
    c = torch.rand(0, 3, 4, requires_grad=True)
    a = torch.rand(3, requires_grad=True)
    b = torch.rand(1, 4, dtype=F64, requires_grad=True)
    P = sinkhorn(c, a, b)
    assert P.shape == (0, 3, 4) and P.dtype == torch.float32
    P.sum().backward()
    assert c.grad.shape == c.shape and not a.grad.any() and not b.grad.any()


@pytest.mark.parametrize(
    "c_shape, a_shape, b_shape",
    [((0, 3, 4), (0, 3), (0, 4)), ((0, 3, 4), (0, 3), None), ((0, 3, 4), None, (0, 4)),
     ((3, 4), (0, 3), (4,)), ((2, 1, 3, 4), (0, 3), None)],
)
def test_sinkhorn_empty_marginals(c_shape, a_shape, b_shape):
    # An empty marginal only broadcasts to an empty batch: an empty plan and zero gradients,
    # as without marginals (its values were checked first: aminmax over no entries raised).
    c = torch.rand(c_shape, dtype=F64, requires_grad=True)
    a = None if a_shape is None else torch.ones(a_shape, dtype=F64, requires_grad=True)
    b = None if b_shape is None else torch.full(b_shape, 0.75, dtype=F64, requires_grad=True)
    batch = torch.broadcast_shapes(*[s[:-1] for s in (c_shape[:-1], a_shape, b_shape) if s is not None])
    for P in (sinkhorn(c, a, b, eps=0.5), OptimalTransport(eps=0.5)(c, a, b)):
        assert P.shape == (*batch, 3, 4)
        P.sum().backward()
    for t in (c, a, b):
        assert t is None or (t.grad.shape == t.shape and not t.grad.any())
    # A marginal with entries is still checked when the batch is empty.
    with pytest.raises(InputError, match="a must be >= 0"):
        sinkhorn(torch.rand(0, 3, 4, dtype=F64), torch.tensor([1.0, -1.0, 1.0], dtype=F64))


def test_sinkhorn_overflowing_inputs():
    # A row range beyond float64's largest number cannot be shifted: refused, not NaN.
    with pytest.raises(InputError, match="cost's entries within a row"):
        sinkhorn(torch.tensor([[1e308, -1e308], [0.0, 1.0]], dtype=F64))
    # A marginal whose sum overflows is still solved: Σa P(a/Σa, b/Σb) scaled in two steps.
    C = _cost(3, 4, seed=40)
    a = torch.full((3,), 1e308, dtype=F64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        P = sinkhorn(C, a)
    assert torch.isfinite(P).all()
    torch.testing.assert_close(P / 1e308, 3 * _reference_plan(C, 1.0), rtol=1e-12, atol=0)
    # Its gradient overflows on the way (the plan's upstream gradient times Σa): said.
    with pytest.warns(GradientWarning, match="not finite"):
        P.sum().backward()


def test_sinkhorn_marginal_share_below_float64_refused():
    # An entry below 1e-290 of its marginal's sum would make a plan row sum to 0 (plan
    # entries below 6e-308 are 0): refused by name instead of a LinAlgError.
    C = _cost(4, 5, seed=7)
    b = torch.ones(5, dtype=F64)
    b[2] = 1e-310
    with pytest.raises(InputError, match="b's entries must each be at least"):
        sinkhorn(C, None, b, eps=0.05)
    with pytest.raises(InputError, match="a's entries"):
        sinkhorn(C.T, b, eps=0.05)


# --------------------------------------------------------------------------- padding (zero marginals)

# (scale of the costs, eps): plain kernel Sinkhorn; kernel iterations handed to the Newton
# rounds (rows spread over up to 45ε); log domain with ε-scaling and Newton (80ε).
_PATHS = [(1.0, 1.0), (4.5, 0.1), (4.0, 0.05)]


def _padded_batch(m: int, n: int, scale: float, seed: int = 50):
    """A batch of four, each element with its own zero pattern, and junk padded costs.

    0: a dead row and the dead last column, random costs there; 1: dead first and last
    rows and a dead middle column, costs -40 there; 2: a dead first column only, costs
    1e3 there; 3: a single live column. The dead last column (and, transposed for M < N,
    the dead last row) is the constraint the backward would drop: a live one must be
    held instead.
    """
    g = _gen(seed)
    C = scale * torch.rand(4, m, n, generator=g, dtype=F64)
    a = torch.rand(4, m, generator=g, dtype=F64) + 0.2
    b = torch.rand(4, n, generator=g, dtype=F64) + 0.2
    a[0, 1] = b[0, n - 1] = 0.0
    a[1, 0] = a[1, m - 1] = b[1, 2] = 0.0
    b[2, 0] = 0.0
    b[3, 1:] = 0.0
    dead = (a == 0).unsqueeze(-1) | (b == 0).unsqueeze(-2)
    junk = torch.tensor([0.0, -40.0, 1e3, 7.0], dtype=F64).view(4, 1, 1).expand_as(C)
    C = torch.where(dead & (torch.arange(4) > 0).view(4, 1, 1), junk, C)
    return C, a, b, dead


def _live(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The live block of one element's (M, N) ``t`` (or of an (M,) / (N,) marginal)."""
    rows, cols = a > 0, b > 0
    if t.ndim == 2:
        return t[rows][:, cols]
    return t[rows] if t.shape[0] == a.shape[0] else t[cols]


@pytest.mark.parametrize("scale,eps", _PATHS)
@pytest.mark.parametrize("m,n", [(6, 5), (5, 7)])
def test_sinkhorn_padding_matches_sliced_problem(m, n, scale, eps, monkeypatch):
    # Each element's plan and gradients equal those of its own problem with the dead rows
    # and columns removed (an independent call on the sliced cost and marginals); the
    # plan and the cost gradient are exactly 0 on the dead rows and columns.
    from convexddn.nodes import _sinkhorn

    C, a, b, dead = _padded_batch(m, n, scale)
    W = torch.randn(4, m, n, generator=_gen(51), dtype=F64)
    C, a, b = (t.clone().requires_grad_() for t in (C, a, b))
    used = []
    for name in ("_kernel_sinkhorn", "_solve_at", "schur_solve"):
        f = getattr(_sinkhorn, name)
        monkeypatch.setattr(_sinkhorn, name, lambda *x, f=f, name=name: used.append((name, len(x[0]))) or f(*x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        P = sinkhorn(C, a, b, eps=eps)
        gC, ga, gb = torch.autograd.grad((P * W).sum(), (C, a, b))
    # Each element took the path _PATHS names (Newton steps call schur_solve), from its live
    # entries only: all four on the kernel within 50ε; beyond, element 3 alone, whose single
    # live column (row, for M < N) spreads over nothing.
    names = [name for name, _ in used]
    assert [k for name, k in used if name == "_kernel_sinkhorn"] == [4 if scale <= 50 * eps else 1]
    assert ("_solve_at" in names) == ("schur_solve" in names) == (eps < 1.0)
    monkeypatch.undo()
    for t in (P, gC, ga, gb):
        assert torch.isfinite(t).all()
    assert torch.equal(P[dead], torch.zeros_like(P[dead]))
    assert torch.equal(gC[dead], torch.zeros_like(gC[dead]))
    for k in range(4):
        ak, bk = a[k].detach(), b[k].detach()
        Ck, ak_, bk_ = (_live(t[k].detach(), ak, bk).clone().requires_grad_() for t in (C, a, b))
        Pk = sinkhorn(Ck, ak_, bk_, eps=eps)
        gk = torch.autograd.grad((Pk * _live(W[k], ak, bk)).sum(), (Ck, ak_, bk_))
        torch.testing.assert_close(_live(P[k], ak, bk), Pk, rtol=0, atol=1e-12)
        for full, ref in zip((gC[k], ga[k], gb[k]), gk):
            torch.testing.assert_close(_live(full, ak, bk), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scale,eps", _PATHS)
def test_sinkhorn_padded_and_unpadded_hold_the_same_column(scale, eps, monkeypatch):
    # The Newton steps, the backward and the jvp hold one column's potential at 0. Padding
    # held the largest entry of b, the unpadded solve the largest column sum of P, whose
    # ties (uniform b) rounding decided: the same problem held column 0 padded and another
    # unpadded (raw potentials off by a constant). Both now hold b's heaviest (the first).
    from convexddn.nodes import _sinkhorn, _sinkhorn_function

    m, n = 7, 5
    C = scale * torch.rand(6, m, n, generator=_gen(52), dtype=F64)
    held = {}
    for padded in (False, True):
        Ck, bk = C, torch.ones(6, n, dtype=F64)
        if padded:  # (a dead last column)
            Ck, bk = torch.cat([C, C[..., :1]], -1), torch.cat([bk, torch.zeros(6, 1, dtype=F64)], -1)
        seen = held[padded] = []
        for module in (_sinkhorn, _sinkhorn_function):
            f = module.schur_solve
            monkeypatch.setattr(module, "schur_solve", lambda *x, f=f, seen=seen, **k: seen.append(x[3]) or f(*x, **k))
        Ck, bk = Ck.clone().requires_grad_(), bk.clone().requires_grad_()
        P = sinkhorn(Ck, torch.ones(6, m, dtype=F64), bk, eps=eps)
        torch.autograd.grad((P * P.detach()).sum(), (Ck, bk))
        torch.func.jvp(lambda c: sinkhorn(c, torch.ones(6, m, dtype=F64), bk.detach(), eps=eps), (Ck.detach(),),
                       (torch.ones_like(Ck),))
        monkeypatch.undo()
    assert len(held[False]) == len(held[True]) >= 2
    first = torch.zeros(6, n, dtype=torch.bool)
    first[:, 0] = True
    for fixed in held[False] + [f[..., :n] for f in held[True]]:
        assert fixed is not None and torch.equal(fixed, first)


def _one_sided(f, h: float = 1e-5) -> float:
    """f'(0+) by the second-order one-sided difference (−3f(0) + 4f(h) − f(2h)) / 2h."""
    return (-3 * f(0.0) + 4 * f(h) - f(2 * h)) / (2 * h)


@pytest.mark.parametrize("scale,eps", _PATHS)
@pytest.mark.parametrize("m,n", [(6, 5), (5, 7)])
def test_sinkhorn_padding_marginal_gradient_is_one_sided_limit(m, n, scale, eps):
    # At a zero entry the gradient with respect to it is the one-sided derivative: each
    # dead a_i and b_j is moved from 0 to h and 2h (the problem is then unpadded there)
    # and the difference quotient of the loss compared with the backward's value.
    C, a, b, _ = _padded_batch(m, n, scale)
    W = torch.randn(4, m, n, generator=_gen(52), dtype=F64)

    def loss(a, b):
        return (sinkhorn(C, a, b, eps=eps, tol=1e-14) * W).sum()

    a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
    ga, gb = torch.autograd.grad(loss(a_, b_), (a_, b_))
    checked = 0
    for v, g, which in ((a, ga, "a"), (b, gb, "b")):
        for idx in (v == 0).nonzero().tolist():
            def f(t, v=v, idx=tuple(idx), which=which):
                w = v.clone()
                w[idx] = t
                return float(loss(w, b) if which == "a" else loss(a, w))

            fd = _one_sided(f)
            assert abs(float(g[tuple(idx)]) - fd) <= 1e-6 * max(1.0, abs(fd)), (which, idx)
            checked += 1
    assert checked == int((a == 0).sum() + (b == 0).sum()) == 5 + n


@pytest.mark.parametrize("offset", [-1e10, 1e10, -1e20, -1e300, 1e300])
@pytest.mark.parametrize("m,n", [(4, 5), (5, 4)])
def test_sinkhorn_plan_ignores_a_huge_constant_row_or_column(m, n, offset):
    """Adding a constant to a row or a column of C leaves the plan as it is. A row of
    constant cost -1e10 (in the solver's transposed orientation, a column) sat in the
    minimum of every row that crossed it, which rounded their other costs away: the plan
    was 1e-7 off at -1e10, 4e-5 at -1e14 and 0.14 at -1e20, without a warning. The
    reference is the same problem with that row (column) set to 0, where nothing is large."""
    eps = 0.3
    C = 3 * torch.rand(m, n, generator=_gen(62), dtype=F64)
    a = torch.rand(m, generator=_gen(63), dtype=F64) + 0.1
    b = torch.rand(n, generator=_gen(64), dtype=F64) + 0.1
    for dim in (0, 1):
        big, zero = C.clone(), C.clone()
        big.select(dim, 1).fill_(offset)
        zero.select(dim, 1).fill_(0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            P = sinkhorn(big, a, b, eps=eps)
        torch.testing.assert_close(P, sinkhorn(zero, a, b, eps=eps), rtol=0, atol=1e-14)


@pytest.mark.parametrize("value", [1e300, 1.7e308, -1.7e308])
@pytest.mark.parametrize("eps", [0.3, 1e-10])
def test_sinkhorn_padding_costs_of_any_finite_size(value, eps):
    """Padded costs "may hold any finite values": with a dead row and column of costs
    whose quotient by ε overflows (1.7e308 / 0.3, 1e300 / 1e-10), the backward's
    completion divided them into columns of +inf: every gradient of a and b NaN, without
    a warning; at 1e300 / 0.3 (finite, but the potentials rounded away beside it) the
    dead a_i got a wrong one-sided derivative (0.21 for -0.12). Now the live gradients
    are those of the problem without the padding, and the dead entries' are the
    one-sided differences."""
    C = 10 * eps * torch.rand(4, 5, generator=_gen(60), dtype=F64)  # spread 10 ε: the plain kernel
    C[1, :] = value
    C[:, 2] = value
    a = torch.tensor([0.3, 0.0, 0.5, 0.2], dtype=F64)
    b = torch.tensor([0.2, 0.3, 0.0, 0.1, 0.4], dtype=F64)
    W = torch.randn(4, 5, generator=_gen(61), dtype=F64)

    def loss(C, a, b):
        return (sinkhorn(C, a, b, eps=eps, tol=1e-14) * W).sum()

    C_, a_, b_ = (t.clone().requires_grad_() for t in (C, a, b))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gC, ga, gb = torch.autograd.grad(loss(C_, a_, b_), (C_, a_, b_))
    rows, cols = a > 0, b > 0
    Cs, as_, bs = (t.clone().requires_grad_() for t in (C[rows][:, cols], a[rows], b[cols]))
    ref = torch.autograd.grad((sinkhorn(Cs, as_, bs, eps=eps, tol=1e-14) * W[rows][:, cols]).sum(), (Cs, as_, bs))
    torch.testing.assert_close(gC[rows][:, cols], ref[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ga[rows], ref[1], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gb[cols], ref[2], rtol=1e-9, atol=1e-12)
    assert torch.equal(gC[~rows], torch.zeros(1, 5, dtype=F64))
    assert torch.equal(gC[:, ~cols], torch.zeros(4, 1, dtype=F64))
    for v, g, i, which in ((a, ga, 1, "a"), (b, gb, 2, "b")):
        def f(t, v=v, i=i, which=which):
            w = v.clone()
            w[i] = t
            return float(loss(C, w, b) if which == "a" else loss(C, a, w))

        fd = _one_sided(f)
        assert abs(float(g[i]) - fd) <= 1e-6 * max(1.0, abs(fd)), (which, float(g[i]), fd)


@pytest.mark.parametrize("scale,eps", [(1.0, 0.2), (4.0, 0.05)])
@pytest.mark.parametrize("m,n", [(4, 3), (3, 5)])
def test_sinkhorn_padding_gradcheck_fixed_pattern(m, n, scale, eps):
    # The zero pattern fixed, central differences in every cost (dead ones included:
    # their derivative is 0) and every positive marginal entry.
    C, a, b, _ = _padded_batch(m, n, scale, seed=53)
    C, a, b = C[:3], a[:3], b[:3]
    la, lb = a > 0, b > 0

    def f(C, av, bv):
        return sinkhorn(C, torch.zeros_like(a).masked_scatter(la, av),
                        torch.zeros_like(b).masked_scatter(lb, bv), eps=eps)

    inputs = (C.clone().requires_grad_(), a[la].clone().requires_grad_(), b[lb].clone().requires_grad_())
    assert gradcheck(f, inputs, atol=1e-8, rtol=1e-6)


def test_sinkhorn_padding_defaults_broadcast_and_float32():
    # Padding on one side with the other marginal uniform (None), a zero in a marginal
    # shared across the batch, and float32 inputs: each equals its sliced problem (to
    # the solver's tol: a batch runs until its slowest element converges).
    C, a, b, _ = _padded_batch(5, 4, 1.0, seed=54)
    P = sinkhorn(C, None, b, eps=0.3)
    for k in range(4):
        torch.testing.assert_close(P[k][:, b[k] > 0], sinkhorn(C[k][:, b[k] > 0], None, b[k][b[k] > 0], eps=0.3),
                                   rtol=0, atol=1e-12)
    P = sinkhorn(C.mT, b, None, eps=0.3)  # the same, transposed (solved as M < N)
    for k in range(4):
        torch.testing.assert_close(P[k][b[k] > 0], sinkhorn(C[k][:, b[k] > 0].T, b[k][b[k] > 0], eps=0.3),
                                   rtol=0, atol=1e-12)
    shared = torch.tensor([0.0, 1.0, 2.0, 0.0, 1.0], dtype=F64)
    P = sinkhorn(C, shared, eps=0.3)
    live = shared > 0
    assert not P[:, ~live].any()
    torch.testing.assert_close(P[:, live], sinkhorn(C[:, live], shared[live], eps=0.3), rtol=0, atol=1e-12)
    P32 = sinkhorn(C.float(), a.float(), b.float(), eps=0.3)
    assert P32.dtype == torch.float32
    torch.testing.assert_close(P32, sinkhorn(C, a.float().double(), b.float().double(), eps=0.3).float())


def test_sinkhorn_padding_masks_only_when_zeros(monkeypatch):
    # All-positive marginals take the unmasked path (no Padding formed), forward and
    # backward; zeros form one per call.
    from convexddn.nodes import _sinkhorn_function, _sinkhorn_plan

    made = []
    real = _sinkhorn_plan.Padding
    for module in (_sinkhorn_plan, _sinkhorn_function):  # (the no-grad path, the Function)
        monkeypatch.setattr(module, "Padding", lambda *x: made.append(1) or real(*x))
    C = _cost(2, 4, 3, seed=55).requires_grad_()
    a, b = _marginal(4, 56), _marginal(3, 57)
    sinkhorn(C, a, b, eps=0.5).sum().backward()
    sinkhorn(C, eps=0.5).sum().backward()
    assert made == []
    a[1] = 0.0
    sinkhorn(C, a, b, eps=0.5).sum().backward()
    with torch.no_grad():
        sinkhorn(C, a, b, eps=0.5)
    assert made == [1, 1]


def test_sinkhorn_padding_invalid_marginals():
    C = _cost(2, 3, 4, seed=58)
    with pytest.raises(InputError, match=r"a must be >= 0 everywhere.*got 2 entries < 0"):
        sinkhorn(C, torch.tensor([[1.0, 0.0, -1.0], [-2.0, 1.0, 1.0]], dtype=F64))
    # Zeros are padding, but a marginal needs mass: each element of a batch its own.
    with pytest.raises(InputError, match=r"b must have positive mass.*got 1 marginal whose entries are all 0"):
        sinkhorn(C, None, torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]], dtype=F64))
    with pytest.raises(InputError, match="a must have positive mass"):
        sinkhorn(C[0], torch.zeros(3, dtype=F64))
    # A positive entry below 1e-290 of the sum is still refused beside zeros: its row of
    # the plan could not be exact in float64.
    with pytest.raises(InputError, match=r"b's entries must each be at least 1e-290 .* got 1 entry below"):
        sinkhorn(C, None, torch.tensor([1.0, 0.0, 1e-300, 1.0], dtype=F64))


def test_sinkhorn_invalid_marginal_requiring_grad_raises_without_warnings():
    # The message reads the offending value on the host: for a marginal that requires grad
    # it must do so detached, with the InputError alone (no torch UserWarning beside it).
    C = _cost(1, 3, 4, seed=59)
    cases = (
        (torch.tensor([[0.5, -1e-6, 0.5]], dtype=F64), None, r"a must be >= 0.*\(min -1e-06\)"),
        (None, torch.tensor([1.0, 0.0, 1e-300, 1.0], dtype=F64), r"b's entries.*smallest share 5e-301"),
    )
    for a, b, match in cases:
        a = a.requires_grad_() if a is not None else None
        b = b.requires_grad_() if b is not None else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(InputError, match=match):
                sinkhorn(C, a, b)
        assert [str(w.message) for w in caught] == []


# --------------------------------------------------------------------------- forward mode


@pytest.mark.parametrize("shape,eps", [((2, 5, 4), 0.5), ((2, 3, 6), 0.1), ((1, 6, 6), 0.05)])
def test_sinkhorn_jvp_matches_finite_differences(shape, eps):
    # torch.func.jvp with tangents in the costs and both marginals at once (M < N
    # exercises the transposed solve, eps = 0.05 the log domain) against central
    # differences of the forward itself.
    B, m, n = shape
    C = _cost(B, m, n, seed=71)
    a = _marginal(m, 72).expand(B, m).contiguous()
    b = _marginal(n, 73).expand(B, n).contiguous()
    gen = torch.Generator().manual_seed(74)
    dC, da, db = (torch.randn(t.shape, dtype=F64, generator=gen) for t in (C, a, b))

    def f(C, a, b):
        return sinkhorn(C, a, b, eps=eps)

    _, tangent = torch.func.jvp(f, (C, a, b), (dC, da, db))
    h = 1e-6
    fd = (f(C + h * dC, a + h * da, b + h * db) - f(C - h * dC, a - h * da, b - h * db)) / (2 * h)
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-9)


def test_sinkhorn_forward_ad_dual_api():
    # The dual-tensor API agrees with jvp's rule (here: costs only, against central
    # differences).
    import torch.autograd.forward_ad as fwAD

    C = _cost(2, 4, 3, seed=75)
    dC = torch.randn(C.shape, dtype=F64, generator=torch.Generator().manual_seed(76))
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(sinkhorn(fwAD.make_dual(C, dC), eps=0.3)).tangent
    h = 1e-6
    fd = (sinkhorn(C + h * dC, eps=0.3) - sinkhorn(C - h * dC, eps=0.3)) / (2 * h)
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("scale,eps", _PATHS)
@pytest.mark.parametrize("m,n", [(6, 5), (5, 7)])
def test_sinkhorn_padding_jvp_matches_sliced_problem(m, n, scale, eps):
    # With zero marginal entries, the tangent (costs and the live marginal entries moved
    # at once) equals each element's own sliced problem's tangent on its live block (an
    # unpadded call) and is exactly 0 on the dead rows and columns.
    C, a, b, dead = _padded_batch(m, n, scale)
    g = _gen(52)
    dC = torch.randn(C.shape, dtype=F64, generator=g)
    da = torch.randn(a.shape, dtype=F64, generator=g) * (a > 0)
    db = torch.randn(b.shape, dtype=F64, generator=g) * (b > 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)
        _, got = torch.func.jvp(lambda c, x, y: sinkhorn(c, x, y, eps=eps), (C, a, b), (dC, da, db))
        assert torch.equal(got[dead], torch.zeros_like(got[dead]))
        for k in range(4):
            live = [_live(t[k], a[k], b[k]) for t in (C, a, b, dC, da, db)]
            _, want = torch.func.jvp(lambda c, x, y: sinkhorn(c, x, y, eps=eps), tuple(live[:3]), tuple(live[3:]))
            torch.testing.assert_close(_live(got[k], a[k], b[k]), want, rtol=1e-8, atol=1e-12)


def test_sinkhorn_padding_tangent_at_a_zero_entry_is_refused():
    # Along a zero marginal entry only a >= 0 is feasible: no linear tangent exists.
    C = _cost(2, 4, 3, seed=77)
    a = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=F64)
    with pytest.raises(InputError, match="tangent of a is nonzero.*one-sided"):
        torch.func.jvp(lambda x: sinkhorn(C, x, eps=0.3), (a,), (torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=F64),))
    # M < N: the solver works on the transpose (its a is the caller's b): still named b.
    Ct = _cost(2, 3, 4, seed=78)
    with pytest.raises(InputError, match="tangent of b is nonzero.*one-sided"):
        torch.func.jvp(lambda y: sinkhorn(Ct, None, y, eps=0.3), (a,), (torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=F64),))


def test_sinkhorn_disconnected_support_warns_in_both_modes():
    # Costs of 400 off two diagonal blocks at eps = 1: plan entries there are below
    # e^-400 (zero to the Schur complement), the support splits in two, and the system
    # for the marginals' multipliers is singular. A tangent moving mass between the blocks
    # ([1, 0, -1, 0]) has no exact image; both modes say so instead of returning the
    # least-norm answer silently.
    C = torch.full((1, 4, 4), 400.0, dtype=F64)
    C[0, :2, :2] = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=F64)
    C[0, 2:, 2:] = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=F64)
    a = torch.full((1, 4), 0.25, dtype=F64)
    da = torch.tensor([[1.0, 0.0, -1.0, 0.0]], dtype=F64)
    with pytest.warns(GradientWarning, match="disconnected blocks.*tangent with respect to the marginals"):
        torch.func.jvp(lambda a_: sinkhorn(C, a_, eps=1.0), (a,), (da,))
    a_req = a.clone().requires_grad_(True)
    with pytest.warns(GradientWarning, match="disconnected blocks.*gradients with respect to the marginals"):
        sinkhorn(C, a_req, eps=1.0).sum().backward()


def test_sinkhorn_disconnected_support_is_silent_for_the_cost_alone():
    """The same split support with only the cost differentiated (no marginal passed or asked
    for): the backward and the jvp warned that the marginals' derivatives are not determined,
    and a sort-learning loop at eps = 0.01 saw it on 44 of 200 steps (a tester). The cost's
    derivative is determined (λ_i + μ_j is, within a block, and the plan is 0 across): checked
    against float64 central differences, Richardson-extrapolated."""
    C = torch.full((4, 4), 40.0, dtype=F64)
    C[:2, :2] = C[2:, 2:] = 0.0
    C = C + 0.3 * torch.tensor([[0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0.0]], dtype=F64)
    W = torch.randn(4, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    Cr = C.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        (sinkhorn(Cr, eps=1.0) * W).sum().backward()
        _, tangent = torch.func.jvp(lambda c: (sinkhorn(c, eps=1.0) * W).sum(), (C,), (W,))

    def loss(c):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return (sinkhorn(c, eps=1.0) * W).sum()
    fd = torch.zeros_like(C)
    for i in range(4):
        for j in range(4):
            E = torch.zeros_like(C)
            E[i, j] = 1e-3
            d1 = (loss(C + E) - loss(C - E)) / 2e-3
            d2 = (loss(C + E / 2) - loss(C - E / 2)) / 1e-3
            fd[i, j] = (4 * d2 - d1) / 3
    torch.testing.assert_close(Cr.grad, fd, rtol=0, atol=1e-9)
    torch.testing.assert_close(tangent, (Cr.grad * W).sum(), rtol=1e-12, atol=1e-14)  # (the two modes agree)


def test_sinkhorn_warnings_name_the_batch_index():
    # They named (1, 2) of a (2, 3) batch as "flat indices [5]" (the solver's flattened row);
    # now (1, 2). The split support above at (1, 2) only, costs of 1 (connected) elsewhere.
    C = torch.ones(2, 3, 4, 4, dtype=F64)
    C[1, 2] = 400.0
    C[1, 2, :2, :2] = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=F64)
    C[1, 2, 2:, 2:] = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=F64)
    a = torch.full((2, 3, 4), 0.25, dtype=F64)
    da = torch.tensor([1.0, 0.0, -1.0, 0.0], dtype=F64).expand(2, 3, 4)
    named = r"disconnected blocks.* at 1 of 6 batch element\(s\) \(indices \[\(1, 2\)\]\)"
    with pytest.warns(GradientWarning, match=named):
        torch.func.jvp(lambda a_: sinkhorn(C, a_, eps=1.0), (a,), (da,))
    with pytest.warns(GradientWarning, match=named):
        sinkhorn(C, a.clone().requires_grad_(True), eps=1.0).sum().backward()


@pytest.mark.parametrize("big", [1e12, 1e16, 1e17, 1e30])
def test_rows_exact_when_the_potentials_are_huge(big):
    """Costs spread over 1e12 ε and more: the potentials reach that size, and forming the
    plan as exp(β − C/ε + α) rounded log a_i away inside α: [[0, big], [0, 0]] with eps 1
    gave rows of 0.5000007 (1e12), 0.472 (1e16) and 1.0 (1e17: the plan of mass 2). The
    unique plan is diag(1/2) (row 1 must avoid the cost `big`)."""
    P = sinkhorn(torch.tensor([[0.0, big], [0.0, 0.0]], dtype=F64), eps=1.0)
    assert P.tolist() == [[0.5, 0.0], [0.0, 0.5]]


def test_rows_exact_at_tiny_eps():
    """rand(4, 4) costs at eps 1e-6 ... 1e-18: rows were off by 8e-13 ... 1.1 %, and at
    1e-18 every row summed to 1 instead of 1/4. Rows and columns within 1e-15 now (the
    columns reach tol there), and the plan is the assignment LP's (a permutation / 4)."""
    C = _cost(4, 4, seed=3)
    for eps in (1e-6, 1e-8, 1e-12, 1e-16, 1e-18):
        P = sinkhorn(C, eps=eps)
        assert (P.sum(-1) - 0.25).abs().max() <= 1e-15
        assert (P.sum(-2) - 0.25).abs().max() <= 1e-15
    assert torch.equal((P > 0.1).sum(-1), torch.ones(4, dtype=torch.long))


def _two_clusters(gap: float) -> torch.Tensor:
    """Squared distances between two pairs of points and two pairs of targets, the
    second pair of each ``gap`` along x from the first: cross-cluster plan entries of
    about exp(−gap²) at eps = 1."""
    x = torch.tensor([[0.0, 0.0], [0.3, 0.1], [0.0, 0.0], [0.2, 0.3]], dtype=F64)
    y = torch.tensor([[0.1, 0.2], [0.2, -0.1], [0.1, 0.1], [-0.1, -0.2]], dtype=F64)
    x[2:, 0] += gap
    y[2:, 0] += gap
    return torch.cdist(x, y) ** 2


def test_marginal_gradients_of_a_nearly_disconnected_plan_warn():
    # Cross-cluster mass ~1e-13: the marginals' gradients depend on it through the Schur
    # complement's smallest eigenvalue (~2e-14) and came out 13 % off (against an 80-digit
    # reference) without a warning; the forward's column error (~8e-14) moves that mass
    # by its own size. Said now, in both modes; the cost's gradient is unaffected
    # (its error cancels within each cluster) and stays silent, and so does a tight tol.
    C, ones = _two_clusters(5.8), torch.ones(4, dtype=F64)
    V = torch.randn(4, 4, generator=_gen(3), dtype=F64)
    a = ones.clone().requires_grad_()
    with pytest.warns(GradientWarning, match="marginals are ill-conditioned .* nearly disconnected"):
        (sinkhorn(C, a, ones, eps=1.0) * V).sum().backward()
    with pytest.warns(GradientWarning, match="marginals are ill-conditioned"):
        torch.func.jvp(lambda a_: sinkhorn(C, a_, ones, eps=1.0), (ones,), (torch.tensor([1.0, 0, 0, -1], dtype=F64),))
    # (a tight tol no longer helps: the backward polishes the plan to rounding itself, and
    # 2e-16 over λ_min = 1.2e-14 is beyond what float64 can keep to its promised 1e-8)
    with pytest.warns(GradientWarning, match="marginals are ill-conditioned"):
        (sinkhorn(C, a, ones, eps=1.0, tol=1e-15) * V).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Cr = C.clone().requires_grad_()
        (sinkhorn(Cr, ones, ones, eps=1.0) * V).sum().backward()
        # well separated against eps, but connected (cross mass ~1e-4): no warning either
        (sinkhorn(_two_clusters(3.0), a, ones, eps=1.0) * V).sum().backward()


def _entropic_mp(C: list, a: list, b: list, start=None):
    """Reference entropic plan (eps = 1) at 50 digits (mpmath): Newton on the dual
    (f, g), g_N = 0, from ``start`` or from 60 log-domain Sinkhorn steps, to a residual
    of 1e-45. Returns Σa · P(a/Σa, b/Σb) and the potentials (a warm start). Run it
    within ``mpmath.workdps(50)``."""
    mp = pytest.importorskip("mpmath")
    m, n = len(a), len(b)
    an, bn = [v / mp.fsum(a) for v in a], [v / mp.fsum(b) for v in b]
    K = [[mp.exp(-C[i][j]) for j in range(n)] for i in range(m)]
    if start is None:
        f, g = [mp.mpf(0)] * m, [mp.mpf(0)] * n
        for _ in range(60):
            f = [mp.log(an[i] / mp.fsum(K[i][j] * mp.exp(g[j]) for j in range(n))) for i in range(m)]
            g = [mp.log(bn[j] / mp.fsum(K[i][j] * mp.exp(f[i]) for i in range(m))) for j in range(n)]
        f, g = [v + g[-1] for v in f], [v - g[-1] for v in g]
    else:
        f, g = start
    for _ in range(50):
        P = [[mp.exp(f[i] + g[j]) * K[i][j] for j in range(n)] for i in range(m)]
        res = [mp.fsum(P[i]) - an[i] for i in range(m)]
        res += [mp.fsum(P[i][j] for i in range(m)) - bn[j] for j in range(n - 1)]
        if max(abs(v) for v in res) < mp.mpf(10) ** -45:
            break
        J = mp.matrix(m + n - 1, m + n - 1)
        for i in range(m):
            J[i, i] = mp.fsum(P[i])
            for j in range(n - 1):
                J[i, m + j] = J[m + j, i] = P[i][j]
        for j in range(n - 1):
            J[m + j, m + j] = mp.fsum(P[i][j] for i in range(m))
        d = mp.lu_solve(J, mp.matrix(res))
        f, g = [f[i] - d[i] for i in range(m)], [g[j] - d[m + j] for j in range(n - 1)] + [g[-1]]
    s = mp.fsum(a)
    return [[s * mp.exp(f[i] + g[j]) * K[i][j] for j in range(n)] for i in range(m)], (f, g)


def _balanced_two_clusters(g: torch.Generator, gap: float, m: int = 4):
    """``(C, a, b, V)``: an m × m cost of two clusters ``gap`` apart (entries in [0, ½) within
    them), random marginals balanced between the clusters (each cluster's masses equal, so
    the plan needs no cross-cluster mass), and a random cotangent ``V``, all from ``g``."""
    h = m // 2
    C = 0.5 * torch.rand(m, m, generator=g, dtype=F64)
    C[:h, h:] += gap
    C[h:, :h] += gap
    a = torch.rand(m, generator=g, dtype=F64) + 0.2
    a = a / a.sum()
    b = torch.rand(m, generator=g, dtype=F64) + 0.2
    b = torch.cat([b[:h] / b[:h].sum() * a[:h].sum(), b[h:] / b[h:].sum() * a[h:].sum()])
    return C, a, b, torch.randn(m, m, generator=g, dtype=F64)


def _two_cluster_reference(C: torch.Tensor, a: torch.Tensor, b: torch.Tensor, V: torch.Tensor, grad: bool = True):
    """(plan, λ_min of its Schur complement's leading block, d⟨V, P⟩/da or None), all
    from :func:`_entropic_mp` (the gradient by central differences, h = 1e-20)."""
    mp = pytest.importorskip("mpmath")
    Cm = [[mp.mpf(v) for v in row] for row in C.tolist()]
    am, bm = [mp.mpf(v) for v in a.tolist()], [mp.mpf(v) for v in b.tolist()]
    with mp.workdps(50):
        Pm, start = _entropic_mp(Cm, am, bm)
    P = np.array([[float(v) for v in row] for row in Pm]) / float(a.sum())
    S = np.diag(P.sum(0)) - P.T @ np.diag(1 / P.sum(1)) @ P
    lam = np.linalg.eigvalsh(S[:-1, :-1])[0]
    if not grad:
        return P, lam, None
    h = mp.mpf(10) ** -20

    def loss(x):
        return mp.fsum(p * v for pr, vr in zip(_entropic_mp(Cm, x, bm, start)[0], V.tolist()) for p, v in zip(pr, vr))

    step = [[h if k == i else 0 for k in range(len(am))] for i in range(len(am))]
    with mp.workdps(50):
        g = [(loss([x + e for x, e in zip(am, s)]) - loss([x - e for x, e in zip(am, s)])) / (2 * h) for s in step]
    return P, lam, np.array([float(v) for v in g])


def _column_error(P: torch.Tensor, b: torch.Tensor) -> float:
    """The returned plan's relative column error, as the solver measures it."""
    return float((P.sum(-2) / P.sum() - b / b.sum()).abs().sum())


def test_marginal_gradient_warns_where_the_estimate_of_lambda_min_was_too_large():
    # Two clusters 26 apart at eps = 1 (cross mass 5.7e-12), masses balanced between them:
    # the plan is exact to 1e-13 but d<V, P>/da was 1.1e-2 off (along (1, 1, -1, -1))
    # without a warning. Its column error over λ_min is 0.18 (above the documented 0.1),
    # but one inverse-iteration step from a generic vector put λ_min at 8.3e-12, 2.9 times
    # the true 2.9e-12 (an upper bound), and the ratio at 0.064. Reference: 50 digits.
    g = _gen(27)
    C = 0.5 * torch.rand(4, 4, generator=g, dtype=F64)
    V = torch.randn(4, 4, generator=g, dtype=F64)
    C[:2, 2:] += 26.0
    C[2:, :2] += 26.0
    a, b = torch.tensor([0.2, 0.3, 0.1, 0.4], dtype=F64), torch.tensor([0.25, 0.25, 0.3, 0.2], dtype=F64)
    P_ref, lam, g_ref = _two_cluster_reference(C, a, b, V)
    # The warning names the bracket of λ_min of the Schur complement scaled by the column
    # masses (the heaviest column, 2, held): 4 times the unscaled one here (columns of ~1/4).
    c = P_ref.sum(0)
    S = np.diag(c) - P_ref.T @ np.diag(1 / P_ref.sum(1)) @ P_ref
    keep, d = [0, 1, 3], 1 / np.sqrt(c[[0, 1, 3]])
    lam_scaled = np.linalg.eigvalsh(d[:, None] * S[np.ix_(keep, keep)] * d[None, :])[0]
    a_req = a.clone().requires_grad_()
    with pytest.warns(GradientWarning, match=r"ill-conditioned .* smallest eigenvalue .* scaled") as said:
        P = sinkhorn(C, a_req, b, eps=1.0)
        grad, = torch.autograd.grad(P, a_req, V)
    lo, hi = (float(v) for v in re.search(r"masses is (\S+) to (\S+) at", str(said[0].message)).groups())
    assert 0.98 * lam_scaled < lo <= hi < 1.02 * lam_scaled and 3.5 * lam < lam_scaled < 4.5 * lam
    assert np.abs(P.detach().numpy() / float(a.sum()) - P_ref).max() < 1e-12  # the plan is right
    assert _column_error(P.detach(), b) / lam > 0.1  # the documented level is passed
    # The backward polishes the plan (Newton on the marginals): 1.1e-2 off before, 4e-6 now,
    # still above float64's promised 1e-8 (2e-16 over λ_min is 8e-5), so it warns.
    assert np.abs(grad.numpy() - g_ref).max() < 1e-5
    with pytest.warns(GradientWarning, match="tangent with respect to the marginals are ill-conditioned"):
        torch.func.jvp(lambda x: sinkhorn(C, x, b, eps=1.0), (a,), (torch.tensor([1.0, 1, -1, -1], dtype=F64),))


@pytest.mark.parametrize("seed", [1, 13, 17, 20, 22, 27])
def test_marginal_gradient_is_polished_and_warns_beyond_the_promise(seed):
    # Balanced two-cluster 4 × 4 problems 24 to 28 apart at eps = 1, whose column error
    # over λ_min (of the 50-digit plan, 6e-13 to 3e-12) is 0.034 to 0.27: gradients 1e-4 to
    # 1.4e-2 off, and seeds 17 and 22 (ratios 0.050 and 0.034) were silent. The backward
    # now polishes the plan to rounding (gradients 4e-6 to 2.5e-5 off) and warns at every
    # one: 2e-16 over λ_min is still beyond float64's promised 1e-8.
    g = _gen(100 + seed)
    gap = 24.0 + 4 * torch.rand((), generator=g, dtype=F64).item()
    C, a, b, V = _balanced_two_clusters(g, gap)
    _, lam, _ = _two_cluster_reference(C, a, b, V, grad=False)
    a_req = a.clone().requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        P = sinkhorn(C, a_req, b, eps=1.0)
        torch.autograd.grad(P, a_req, V)
    warned = any(issubclass(w.category, GradientWarning) and "ill-conditioned" in str(w.message) for w in caught)
    assert warned and _column_error(P.detach(), b) / lam > 0.03


@pytest.mark.parametrize("seed, gap, tol", [(5, 13.0, 1e-8), (10, 13.0, 1e-8), (2, 14.0, 1e-9), (7, 15.0, 3e-10)])
def test_marginal_gradient_is_accurate_after_polishing(seed, gap, tol):
    # Two clusters 12 to 15 apart at eps = 1 (λ_min 1.4e-7 to 1.3e-6), solved to a column
    # error of 1e-10 to 1e-8: its ratio to λ_min is 2.8e-4 to 7.8e-3, and d<V, P>/da came
    # back 8.6e-6 to 8.7e-4 off (relative) without a warning (below the 0.1 that warned).
    # The backward polishes the plan (Newton on the marginals, to rounding) and the
    # gradient is that of the exact plan: within 2e-8 of the 50-digit reference (what is
    # left is the returned plan's own error through Σa·P), and quiet.
    g = _gen(200 + seed)
    C, a, b, V = _balanced_two_clusters(g, gap)
    _, lam, g_ref = _two_cluster_reference(C, a, b, V)
    a_req = a.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        P = sinkhorn(C, a_req, b, eps=1.0, tol=tol)
        grad, = torch.autograd.grad(P, a_req, V)
    assert 2e-4 < _column_error(P.detach(), b) / lam < 0.1  # (silent, and wrong, before)
    assert np.abs(grad.numpy() - g_ref).max() < 2e-8 * np.abs(g_ref).max()


@pytest.mark.parametrize("m, gap, seed", [(6, 16.0, 2), (4, 18.0, 2), (4, 20.0, 4), (6, 20.0, 1)])
def test_float32_marginal_gradient_is_accurate_to_float32_or_warns(m, gap, seed):
    # float32 inputs (the solve runs in float64; the promise is float32's 1e-7): two
    # clusters 16 to 20 apart (λ_min 7e-10 to 4e-8) gave d<V, P>/da 1e-7 to 1.4e-6 off,
    # silently. Polished, it is within 1e-7 of the 50-digit reference (at the float32
    # inputs) where quiet, and warns otherwise.
    g = _gen(1000 + seed + int(gap) * 10 + m)
    C, a, b, V = _balanced_two_clusters(g, gap, m)
    C, a, b = C.float(), a.float(), b.float()
    _, _, g_ref = _two_cluster_reference(C.double(), a.double(), b.double(), V)
    a_req = a.clone().requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grad, = torch.autograd.grad(sinkhorn(C, a_req, b, eps=1.0), a_req, V.float())
    warned = any(issubclass(w.category, GradientWarning) and "ill-conditioned" in str(w.message) for w in caught)
    assert warned or np.abs(grad.double().numpy() - g_ref).max() < 1e-7 * np.abs(g_ref).max()


def test_marginal_gradient_of_a_transposed_solve_is_polished_on_both_marginals():
    # M < N is solved transposed, its rows (the caller's) made exact: the column error is
    # the other marginal's, and a polish that measured only one side stopped at once. Two
    # clusters 13 apart (λ_min 7.7e-7): the gradient and the tangent were 4.3e-8 and 7.9e-8
    # off (above float64's promised 1e-8), silently; now 2e-11, against 50 digits.
    g = _gen(301)
    C = 0.5 * torch.rand(4, 6, generator=g, dtype=F64)
    C[:2, 3:] += 13.0
    C[2:, :3] += 13.0
    a = torch.rand(4, generator=g, dtype=F64) + 0.2
    a = a / a.sum()
    b = torch.rand(6, generator=g, dtype=F64) + 0.2
    b = torch.cat([b[:3] / b[:3].sum() * a[:2].sum(), b[3:] / b[3:].sum() * a[2:].sum()])
    V = torch.randn(4, 6, generator=g, dtype=F64)
    _, _, g_ref = _two_cluster_reference(C, a, b, V)
    da = torch.tensor([1.0, -2.0, 0.5, 0.5], dtype=F64)
    a_req = a.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        grad, = torch.autograd.grad(sinkhorn(C, a_req, b, eps=1.0, tol=1e-8), a_req, V)
        _, tangent = torch.func.jvp(lambda x: sinkhorn(C, x, b, eps=1.0, tol=1e-8), (a,), (da,))
    assert np.abs(grad.numpy() - g_ref).max() < 1e-9 * np.abs(g_ref).max()
    assert abs(float((tangent * V).sum()) - float(g_ref @ da.numpy())) < 1e-9 * abs(float(g_ref @ da.numpy()))


@pytest.mark.parametrize("eps, tol", [(1.0, None), (0.1, None), (0.05, 1e-9)])
def test_marginal_gradients_of_connected_plans_do_not_warn(eps, tol):
    # No false alarm where the plan is well connected: random costs, plain and padded
    # batches (the held columns of the padding), in both modes.
    C = torch.rand(6, 9, 7, generator=_gen(5), dtype=F64)
    Cp, ap, bp, _ = _padded_batch(9, 7, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        for C_, a, b in ((C, _marginal(9, 1), _marginal(7, 2)), (Cp, ap, bp), (C.mT, 1.0, 1.0)):
            # (contiguous: torch.func.jvp's make_dual refuses an expanded primal)
            a = torch.as_tensor(a, dtype=F64).expand(C_.shape[:-1]).contiguous()
            b = torch.as_tensor(b, dtype=F64).expand(C_.shape[:-2] + C_.shape[-1:]).contiguous()
            a_req, b_req = a.clone().requires_grad_(), b.clone().requires_grad_()
            P = sinkhorn(C_, a_req, b_req, eps=eps, tol=tol)
            torch.autograd.grad(P, (a_req, b_req), torch.randn(P.shape, generator=_gen(6), dtype=F64))
            da = a * torch.rand(a.shape, generator=_gen(7), dtype=F64)
            torch.func.jvp(lambda x: sinkhorn(C_, x, b, eps=eps, tol=tol), (a,), (da,))


@pytest.mark.parametrize("case", ["b last", "b first", "a last, M < N", "b last, jvp"])
def test_marginal_gradient_at_a_light_entry_is_exact_and_quiet(case):
    # A marginal entry of 1e-13 of the mass on a well-conditioned plan (eps = 1000 against
    # costs in [0, 3): P ≈ a bᵀ): held in place of the last column's constraint, its own
    # left the others' common offset against it to rounding over 1e-13, and the gradient
    # (and tangent) along it came back 6.7e-3 off (a tiny a entry with M < N: 1.1e-3), with
    # a warning blaming a nearly disconnected support, also when it sat first (exact
    # there). The heaviest column is held now, and conditioning is judged in units of the
    # column masses. Reference: the 50-digit plan (:func:`_entropic_mp`, costs over eps),
    # central differences along the light entry.
    mp = pytest.importorskip("mpmath")
    g = _gen(17)
    m, n = (5, 6) if "M < N" in case else (6, 5)
    C = 3 * torch.rand(m, n, generator=g, dtype=F64)
    a = torch.rand(m, generator=g, dtype=F64) + 0.1
    b = torch.rand(n, generator=g, dtype=F64) + 0.1
    V = torch.randn(m, n, generator=g, dtype=F64)
    x, j = (a, m - 1) if case.startswith("a") else (b, 0 if "first" in case else n - 1)
    x[j] = 1e-13 * (x.sum() - x[j])
    Cm = [[mp.mpf(v) / 1000 for v in row] for row in C.tolist()]
    am, bm = [mp.mpf(v) for v in a.tolist()], [mp.mpf(v) for v in b.tolist()]
    with mp.workdps(50):
        _, start = _entropic_mp(Cm, am, bm)
        h = mp.mpf(x[j].item()) * mp.mpf(10) ** -20

        def loss(sign):
            am_, bm_ = list(am), list(bm)
            (am_ if x is a else bm_)[j] += sign * h
            return mp.fsum(p * v for pr, vr in zip(_entropic_mp(Cm, am_, bm_, start)[0], V.tolist())
                           for p, v in zip(pr, vr))

        ref = float((loss(1) - loss(-1)) / (2 * h))
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        if "jvp" in case:
            e = torch.zeros(n, dtype=F64)
            e[j] = 1.0
            got = float((torch.func.jvp(lambda t: sinkhorn(C, a, t, eps=1000.0), (b,), (e,))[1] * V).sum())
        else:
            x_req = x.clone().requires_grad_()
            P = sinkhorn(C, x_req, b, eps=1000.0) if x is a else sinkhorn(C, a, x_req, eps=1000.0)
            got = float(torch.autograd.grad(P, x_req, V)[0][j])
    assert abs(got - ref) <= 1e-9 * abs(ref), (got, ref)


@pytest.mark.parametrize("kind", ["random", "two clusters", "three clusters", "held columns", "light columns"])
def test_lambda_min_bracket_holds_the_smallest_eigenvalue(kind):
    # The backward's bracket of the smallest eigenvalue of the Schur complement's solved
    # block scaled by the column masses, D^(-1/2) S D^(-1/2), from its one probe solve
    # y = S⁻¹c: Collatz–Wielandt's lower bound (S⁻¹D ≥ 0), never below λ_min/√N over the
    # spread √(c_max/c_min), and the Rayleigh quotient above; against numpy's eigvalsh.
    # The held column is the heaviest (random: uniform marginals, ties; light columns: one
    # entry of 1e-13 of the mass, whose unscaled eigenvalue ~1e-13 is no ill-conditioning).
    from convexddn.nodes._sinkhorn_schur import held_columns, lambda_min_lower, lambda_min_upper, schur_solve

    n = 12
    C = torch.rand(3, n, n, generator=_gen(8), dtype=F64)
    b = torch.ones(3, n, dtype=F64)
    if "clusters" in kind:
        k = 2 if kind == "two clusters" else 3
        lab = torch.arange(n) * k // n
        C = C + torch.tensor([[10.0], [20.0], [27.0]], dtype=F64).unsqueeze(-1) * (lab[:, None] != lab[None, :])
    if kind == "light columns":
        b = torch.rand(3, n, generator=_gen(9), dtype=F64) + 0.1
        b[0, -1] = b[1, 0] = b[2, 5] = 1e-13 * b.sum(-1).mean()
    P = sinkhorn(C, torch.ones(3, n, dtype=F64), b, eps=1.0 if "clusters" in kind else 0.1)
    P = P / P.sum((-2, -1), keepdim=True)
    fixed = held_columns(b)  # (the heaviest column of b held: uniform b, the first)
    if kind == "held columns":
        fixed = torch.zeros(3, n, dtype=torch.bool)
        fixed[0, -1] = fixed[1, [0, 5]] = fixed[2, [3, 4, 11]] = True
    r, c = P.sum(-1), P.sum(-2)
    _, bad, y = schur_solve(P, r, torch.zeros(3, n, dtype=F64), fixed, probe=c)
    lo, hi = lambda_min_lower(y).numpy(), lambda_min_upper(y, c).numpy()
    held = fixed.numpy()
    assert not bad.any()
    if kind != "held columns":
        assert (held.argmax(-1) == b.argmax(-1).numpy()).all() and (held.sum(-1) == 1).all()
    for i in range(3):
        Pi = P[i].numpy()
        S = np.diag(Pi.sum(0)) - Pi.T @ np.diag(1 / Pi.sum(1)) @ Pi
        keep = np.flatnonzero(~held[i])
        d = 1 / np.sqrt(Pi.sum(0)[keep])
        ev = np.linalg.eigvalsh(d[:, None] * S[np.ix_(keep, keep)] * d[None, :])
        spread = d.max() / d.min()
        lam, slack = ev[0], 1e-6 * ev[0] + n * np.finfo(float).eps * ev[-1]  # (eigvalsh's rounding)
        assert lam / (math.sqrt(len(keep)) * spread) <= lo[i] <= lam + slack, (lo[i], lam)
        assert lam - slack <= hi[i] <= 1.01 * lam, (hi[i], lam)
        if kind in ("random", "light columns"):  # (connected: no small eigenvalue, scaled)
            assert lo[i] > 1e-2


@pytest.mark.parametrize("scale, eps", [(1e100, 1e-211), (1.0, 1e-320)])
def test_a_spread_over_eps_beyond_float64_is_an_input_error(scale, eps):
    # The shifted costs over eps overflowed: NaN plans, with only a column-error warning
    # ("raise max_iter or eps") and gradient warnings blaming the incoming gradient.
    C = torch.rand(3, 4, generator=_gen(1), dtype=F64) * scale
    with pytest.raises(InputError, match="spread within a row over eps"):
        sinkhorn(C, eps=eps)


def test_a_float16_plan_beyond_its_range_warns():
    # Solved in float64 and cast back: entries of 1.5e5 became Inf in float16, silently.
    C = torch.rand(2, 2, generator=_gen(2)).half()
    with pytest.warns(SolverWarning, match="beyond torch.float16's range"):
        P = sinkhorn(C, torch.tensor([3e5, 3e5]))
    assert torch.isinf(P).all()


@pytest.mark.parametrize("big", [1e16, 1e20, 1e300])
def test_one_sided_gradients_at_padding_do_not_depend_on_its_costs(big):
    # A constant added to a dead column leaves the plan unchanged, and so the one-sided
    # derivative there. With one live column, each row's shift (its live cost) was
    # subtracted from the padding too, and K − lo rounded to K: grad b at the padded
    # entries moved from (−1.127, 0.942) at K = 0 to (3.15, 1.13) at 1e16, silently.
    C0 = torch.randn(4, 3, generator=_gen(1), dtype=F64)
    V = torch.randn(4, 3, generator=_gen(2), dtype=F64)
    a = torch.rand(4, generator=_gen(3), dtype=F64) + 0.1
    b = torch.tensor([1.0, 0.0, 0.0], dtype=F64)

    def grad_b(k):
        C = C0.clone()
        C[:, 1:] = k
        bb = b.clone().requires_grad_()
        (sinkhorn(C, a, bb, eps=0.5) * V).sum().backward()
        return bb.grad

    torch.testing.assert_close(grad_b(big), grad_b(0.0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("big", [1e20, 1e30, 1e300])
def test_sinkhorn_masked_by_huge_costs(big):
    # Doubly-stochastic attention masked by a huge finite cost (+inf is refused): query 0
    # sees key 1 only, so P[0, 1] = 1 and the rest is the 5 × 5 problem without row 0 and
    # column 1 (an independent call). The ε-scaling stages carried β's free constant
    # and multiplied it by 4 each stage (1e18 at 1e20): β's differences rounded away and
    # the 5 × 5 block came back uniform, its marginals exact, without a warning.
    S = torch.randn(6, 6, generator=_gen(25), dtype=F64)
    live = torch.ones(6, 6, dtype=torch.bool)
    live[0] = False
    live[0, 1] = True
    ones = torch.ones(6, dtype=F64)
    want = torch.zeros(6, 6, dtype=F64)
    want[0, 1] = 1.0
    rows, cols = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 2, 3, 4, 5])
    want[rows[:, None], cols] = sinkhorn(-S[rows][:, cols], ones[1:], ones[1:], eps=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        P = sinkhorn((-S).masked_fill(~live, big), ones, ones, eps=1.0)
    torch.testing.assert_close(P, want, rtol=0, atol=1e-10)


def test_sinkhorn_padding_of_extreme_values_and_a_span_over_eps_beyond_the_range():
    # A dead row of 1e308 across a dead column of -1e308 (padding "may hold any finite
    # values"): the dead entry, shifted with its row, became -inf and an InputError named
    # the dead row. A live row spanning 1e308 at eps 0.2 (5e308 over eps) ran its
    # eps-scaling into max_iter (a SolverWarning, the plan 0.55 off) where the docs
    # promise an InputError.
    g = _gen(16)
    C = torch.randn(5, 4, generator=g, dtype=F64)
    a = torch.rand(5, generator=g, dtype=F64) + 0.1
    b = torch.rand(4, generator=g, dtype=F64) + 0.1
    a[3], b[1] = 0.0, 0.0
    rows, cols = torch.tensor([0, 1, 2, 4]), torch.tensor([0, 2, 3])
    want = sinkhorn(C[rows][:, cols], a[rows], b[cols], eps=0.2)
    Cp = C.clone()
    Cp[3, :], Cp[:, 1] = 1e308, -1e308
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        P = sinkhorn(Cp, a, b, eps=0.2)
    torch.testing.assert_close(P[rows][:, cols], want, rtol=0, atol=1e-14)
    Cp = C.clone()
    Cp[0, 0] = 1e308
    with pytest.raises(InputError, match="spread within a row over eps"):
        sinkhorn(Cp, eps=0.2)


@pytest.mark.parametrize("grad", [False, True])
def test_rows_exact_when_max_iter_runs_out_in_eps_scaling(grad):
    # M < N is solved transposed, the caller's rows made exact by scaling the solver's
    # columns. With max_iter spent during ε-scaling, the plan at eps (of the stage's
    # potentials) had a column underflowed entirely: the caller's row 1 came back as 0
    # (it must sum to a[1] = 0.2587) while the SolverWarning said "the plan's rows are
    # exact". Rows are a to rounding now, in a batch too, and the warned column error is
    # the returned plan's.
    C = torch.tensor([[0.059996917501365286, 2.027617259274005, -1.9547938113231125, 1.2243100307902006],
                      [1.0516795374097947, -0.22991855108718087, -0.9017682810562575, 1.7907328199442303],
                      [-0.9914213330446372, -0.6164285061386324, 1e20, 1e20]], dtype=F64)
    a = torch.tensor([0.3105214784673205, 0.25872652854301637, 0.38618179236957484], dtype=F64)
    b = torch.tensor([1.2157070006754272e-116, 0.5393994577530568, 0.4568464954138003, 0.16599274286219445],
                     dtype=F64)
    easy = torch.rand(3, 4, generator=_gen(5), dtype=F64)
    Cb = torch.stack([C, easy]).requires_grad_(grad)
    with pytest.warns(SolverWarning, match="did not reach tol") as rec:
        P = sinkhorn(Cb, a, b, eps=0.003788659875186879, max_iter=1000).detach()
    torch.testing.assert_close(P.sum(-1), a.expand(2, 3), rtol=1e-14, atol=0)
    msg = str(next(w.message for w in rec if issubclass(w.category, SolverWarning)))
    assert "batch index(es) [(0,)]" in msg
    # (Relative: the plan for unit masses against b / Σb; here Σa = 0.955 and Σb = 1.162.)
    col_err = float((P[0].sum(-2) / a.sum() - b / b.sum()).abs().sum())
    warned = float(msg.split("column error up to ")[1].split(")")[0])
    assert warned == pytest.approx(col_err, rel=5e-3)


def test_sinkhorn_one_slow_kernel_element_alone_reaches_newton(monkeypatch):
    # Instrumented: one element within 50ε but slow on the kernel path (costs to 45ε and
    # peaked marginals) among 15 easy ones: only it goes on to the Newton rounds; the easy
    # ones converge on the kernel (all 16 went to Newton, 12x the two groups apart at 512).
    from convexddn.nodes import _sinkhorn

    g = torch.Generator().manual_seed(3)
    B, n = 16, 40
    C = torch.rand(B, n, n, dtype=torch.float64, generator=g)
    a = torch.full((B, n), 1 / n, dtype=torch.float64)
    b = a.clone()
    C[-1] = 45 * torch.rand(n, n, dtype=torch.float64, generator=g)
    a[-1] = torch.softmax(5 * torch.randn(n, dtype=torch.float64, generator=g), 0)
    b[-1] = torch.softmax(5 * torch.randn(n, dtype=torch.float64, generator=g), 0)
    sizes = []
    solve_at = _sinkhorn._solve_at
    monkeypatch.setattr(_sinkhorn, "_solve_at", lambda *x: sizes.append(len(x[0])) or solve_at(*x))
    P = sinkhorn(C, a, b, eps=1.0)
    assert sizes == [1]
    # Independent checks: the marginals, the Gibbs form, and each element solved alone.
    assert (P.sum(-2) - b).abs().sum(-1).max() <= 1e-10 and (P.sum(-1) - a).abs().sum(-1).max() <= 1e-12
    for k in (0, B - 1):
        assert _gibbs_residual(P[k:k + 1], C[k:k + 1], 1.0) < 1e-8
        assert torch.allclose(P[k], sinkhorn(C[k:k + 1], a[k:k + 1], b[k:k + 1], eps=1.0)[0], atol=1e-12, rtol=0)


def test_sinkhorn_slow_kernel_element_keeps_its_own_budget():
    # One element slow on the kernel path (costs to 45ε, peaked marginals) among three whose
    # own rate is fast (costs to 20ε): their second kernel round (42 iterations) came off its
    # Newton budget, so at max_iter = 50 it had 4 Newton iterations instead of 46 (it needs 16):
    # a SolverWarning and a plan 8.6e-3 off. Now it is solved as alone: marginals, Gibbs form
    # and the plan of the element alone (to 1e-12).
    g = torch.Generator().manual_seed(4)
    B, n = 4, 40
    C = 20 * torch.rand(B, n, n, dtype=F64, generator=g)
    a = torch.full((B, n), 1 / n, dtype=F64)
    b = a.clone()
    C[-1] = 45 * torch.rand(n, n, dtype=F64, generator=g)
    a[-1] = torch.softmax(5 * torch.randn(n, dtype=F64, generator=g), 0)
    b[-1] = torch.softmax(5 * torch.randn(n, dtype=F64, generator=g), 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverWarning)
        P = sinkhorn(C, a, b, eps=1.0, max_iter=50)
        alone = sinkhorn(C[-1:], a[-1:], b[-1:], eps=1.0, max_iter=50)
    assert (P.sum(-2) - b).abs().sum(-1).max() <= 1e-10 and (P.sum(-1) - a).abs().sum(-1).max() <= 1e-12
    assert _gibbs_residual(P[-1:], C[-1:], 1.0) < 1e-8
    assert torch.allclose(P[-1], alone[0], atol=1e-12, rtol=0)


# --------------------------------------------------------------------------- the caller's dtype


def _central(f, x: torch.Tensor, idx: tuple, h: float) -> float:
    """Float64 central difference of the scalar f at x along the entry idx."""
    e = torch.zeros_like(x)
    e[idx] = h
    return float((f(x + e) - f(x - e)) / (2 * h))


@pytest.mark.parametrize("dtype, lo, span, eps, scale", [
    (torch.float16, 6.2e-5, 3e-5, 1e-6, 10.0),
    (torch.float32, 0.0, 1e-36, 2e-38, 1000.0),
])
def test_a_cost_gradient_beyond_its_dtype_warns(dtype, lo, span, eps, scale):
    # Solved and differentiated in float64, the gradient went back to the cost's dtype by
    # autograd's cast: float16 entries of 1.7e5 (float32: 2e39) became Inf, silently.
    C = (lo + span * torch.rand(2, 5, 6, generator=_gen(0), dtype=F64)).to(dtype)
    W = (scale * torch.randn(2, 5, 6, generator=_gen(1), dtype=F64)).to(dtype)
    c = C.clone().requires_grad_()
    with pytest.warns(GradientWarning, match=rf"gradient with respect to cost at .* range of {dtype}"):
        grad, = torch.autograd.grad(sinkhorn(c, eps=eps), c, W)
    # Reference: float64 central differences on the same (rounded) costs.
    Cd, Wd = C.double(), W.double()
    big = torch.isinf(grad).nonzero()[0].tolist()
    fd = _central(lambda x: (sinkhorn(x, eps=eps) * Wd).sum(), Cd, tuple(big), 1e-4 * eps)
    assert abs(fd) > torch.finfo(dtype).max and grad[tuple(big)] == math.copysign(math.inf, fd)
    small = (1, 4, 5)
    fd = _central(lambda x: (sinkhorn(x, eps=eps) * Wd).sum(), Cd, small, 1e-4 * eps)
    assert float(grad[small]) == pytest.approx(fd, rel=2e-3, abs=1e-3 * torch.finfo(dtype).max)


def test_a_plan_tangent_beyond_its_dtype_warns():
    # Forward mode: the float16 tangent (4.2e5 in float64) became Inf, silently.
    import torch.autograd.forward_ad as fwAD

    C = (6.2e-5 + 3e-5 * torch.rand(2, 5, 6, generator=_gen(0), dtype=F64)).half()
    T = (10 * torch.randn(2, 5, 6, generator=_gen(1), dtype=F64)).half()
    with pytest.warns(GradientWarning, match=r"forward mode\): the tangent of the plan .* range of torch.float16"):
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(sinkhorn(fwAD.make_dual(C, T), eps=1e-6)).tangent
    h = 1e-4 * 1e-6  # reference: a float64 central difference along T
    Cd, Td = C.double(), T.double()
    fd = (sinkhorn(Cd + h * Td, eps=1e-6) - sinkhorn(Cd - h * Td, eps=1e-6)) / (2 * h)
    over = fd.abs() > torch.finfo(torch.float16).max
    assert over.any() and torch.isinf(tangent[over]).all()


def test_a_cost_gradient_beyond_float64_warns():
    # grad = P ∘ (λ + μ − V)/eps overflowed float64 itself at eps = 2e-307, silently
    # (reverse and forward mode). Reference: P(C, eps) = P(C/s, eps/s), so the gradient
    # is that of the scaled problem over s: float64 central differences there.
    s = 1e-306
    C = s * torch.rand(2, 5, 6, generator=_gen(0), dtype=F64)
    W = 1e3 * torch.randn(2, 5, 6, generator=_gen(1), dtype=F64)
    c = C.clone().requires_grad_()
    with pytest.warns(GradientWarning, match=r"gradient with respect to cost at .* range of torch.float64"):
        grad, = torch.autograd.grad(sinkhorn(c, eps=2e-307), c, W)
    idx = tuple(torch.isinf(grad).nonzero()[0].tolist())
    fd = _central(lambda x: (sinkhorn(x, eps=0.2) * W).sum(), C / s, idx, 1e-5)
    assert abs(fd) / s > torch.finfo(F64).max
    import torch.autograd.forward_ad as fwAD

    with pytest.warns(GradientWarning, match=r"forward mode\): the tangent of the plan"):
        with fwAD.dual_level():
            sinkhorn(fwAD.make_dual(C, W), eps=2e-307)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_plan_beyond_its_dtype_warns_for_every_narrower_cost(dtype):
    # float64 marginals beside a float32 cost: a plan of +Inf, silently (only float16 and
    # bfloat16 costs were checked). Rows of mass 1e40/3 over 4 columns hold an entry of
    # at least 8.3e38 (float16: 1e6/3 over 4, 8.3e4): beyond the range.
    mass = 1e6 if dtype == torch.float16 else 1e40
    a = torch.full((2, 3), mass / 3, dtype=F64)
    with pytest.warns(SolverWarning, match=rf"the plan does not fit {dtype}: .* beyond {dtype}'s range"):
        P = sinkhorn(_cost(2, 3, 4).to(dtype), a)
    assert torch.isinf(P).any()


def test_a_plan_whose_rows_round_to_zero_warns():
    # a = 1e-50 with a float32 cost: an all-zero plan (its rows must sum to 1e-50),
    # silently. Padding rows (a_i = 0) are zero by definition and are not counted.
    a = torch.tensor([[1e-50, 0.0, 1e-50], [1e-50, 1e-50, 1e-50]], dtype=F64)
    with pytest.warns(SolverWarning, match=r"5 of 6 rows rounded to all zeros"):
        P = sinkhorn(_cost(2, 3, 4, dtype=torch.float32), a)
    assert (P == 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sinkhorn(_cost(2, 3, 4, dtype=torch.float32), a * 1e20)  # padding alone: no warning


def test_a_marginal_gradient_beyond_its_dtype_warns():
    # A float16 a beside a float32 cost: its gradient (1.2e5) became Inf, silently.
    C = _cost(2, 4, 5, dtype=torch.float32)
    a = (torch.rand(2, 4, generator=_gen(1)) + 0.5).half()
    V = 8e4 * torch.randn(2, 4, 5, generator=_gen(2))
    x = a.clone().requires_grad_()
    with pytest.warns(GradientWarning, match=r"gradient with respect to a at .* range of torch.float16"):
        grad, = torch.autograd.grad(sinkhorn(C, x, eps=0.05), x, V)
    idx = tuple(torch.isinf(grad).nonzero()[0].tolist())
    fd = _central(lambda v: (sinkhorn(C.double(), v, eps=0.05) * V.double()).sum(), a.double(), idx, 1e-6)
    assert abs(fd) > torch.finfo(torch.float16).max


def test_sinkhorn_tensor_eps_is_refused_through_the_shared_option_check():
    """A tensor eps (a constant of the node, as the registry's eps) was refused as "eps must
    be a positive number, got Parameter containing: tensor(0.5000, ...)" -- 0.5 is positive,
    and the repr ran over lines. It now says what every other constant option says."""
    for eps in (torch.tensor(0.5), torch.nn.Parameter(torch.tensor(0.5, dtype=F64))):
        with pytest.raises(OptionError, match=r"^eps must be a number \(a Python or NumPy scalar\) > 0, got a "
                                              r"tensor of shape \(\): .*pass float\(t\)"):
            OptimalTransport(eps=eps)
    for bad, match in ((True, "eps must be a number > 0, got True"), (0.0, "eps must be finite and > 0, got 0.0")):
        with pytest.raises(OptionError, match=match):
            sinkhorn(_cost(3, 4, seed=1), eps=bad)
    assert OptimalTransport(eps=np.float32(0.5)).eps == 0.5


def test_a_cost_that_requires_grad_and_does_not_converge_warns_only_the_solver_warning():
    """The failing path's overflow check read a float of the cost's spread, built from a cost in
    the graph: torch's 'Converting a tensor with requires_grad=True to a scalar' UserWarning came
    beside the SolverWarning (torch warns once a process; set_warn_always shows every one)."""
    C = (5 * torch.randn(4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))).requires_grad_()
    before = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sinkhorn(C, eps=0.05, max_iter=3)
    finally:
        torch.set_warn_always(before)
    kinds = {type(w.message).__name__ for w in caught}
    assert "SolverWarning" in kinds
    assert not [w for w in caught if "requires_grad=True to a scalar" in str(w.message)]
