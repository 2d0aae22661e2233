"""Tests of convexddn.nodes.linear_solvers: which KKT solver ``"auto"`` runs, and its answer.

Gradients are checked against closed forms written out here (``y = Q^{-1} x`` for a
quadratic objective, so ``dL/dx = Q^{-1} v`` with ``Q^{-1}`` from its eigenvectors);
which path ran is read from the calls to the dense solve, never from timings.
"""
from __future__ import annotations

import math

import pytest
import torch

from convexddn.nodes import linear_solvers
from convexddn.nodes.declarative import DeclarativeNode
from convexddn.nodes.linear_solvers import CG_BUDGET_MIN, CG_ITER_WORK, cg_budget

DT = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class _RotatedDiagonal(DeclarativeNode):
    """argmin_u ½ uᵀQu − xᵀu = Q⁻¹x with Q = P diag(d) P, P = I − 2uuᵀ (a Householder
    reflection; ``u = None``: P = I). Q is dense for a dense ``u``; its products cost O(m)."""

    def __init__(self, d: torch.Tensor, u: torch.Tensor | None = None, **kw):
        super().__init__(**kw)
        self.register_buffer("d", d)
        self.register_buffer("u", torch.zeros_like(d) if u is None else u)

    def _reflect(self, z):
        return z - 2.0 * (z @ self.u).unsqueeze(-1) * self.u

    def objective(self, x, y):
        py = self._reflect(y)
        return 0.5 * (self.d * py * py).sum(-1) - (x * y).sum(-1)

    def solve(self, x):
        return self._reflect(self._reflect(x) / self.d)


def _dense_calls(monkeypatch) -> list[int]:
    """Count the dense solves, chosen up front (solve_kkt_dense) or as CG's fallback (dense_kkt)."""
    calls: list[int] = []
    dense_kkt, solve_dense = linear_solvers.dense_kkt, linear_solvers.solve_kkt_dense
    monkeypatch.setattr(linear_solvers, "dense_kkt", lambda *a, **k: calls.append(1) or dense_kkt(*a, **k))
    monkeypatch.setattr(linear_solvers, "solve_kkt_dense", lambda *a, **k: calls.append(2) or solve_dense(*a, **k))
    return calls


@pytest.mark.parametrize("rotated", [False, True], ids=["diagonal", "dense"])
def test_auto_keeps_cg_on_moderately_conditioned_hessians(monkeypatch, rotated):
    """m = 2000, B = 2, condition 300: CG converges in a few hundred iterations, where the
    old budget, max(50, N // 16) = 125, handed both systems to a dense solve 20x slower
    with 10x the memory. Now CG finishes and the gradient is the closed form Q⁻¹v."""
    m, batch = 2000, 2
    d = torch.logspace(0, math.log10(300.0), m, dtype=DT)
    u = None
    if rotated:
        u = torch.randn(m, generator=_gen(1), dtype=DT)
        u = u / u.norm()
    node = _RotatedDiagonal(d, u)
    x = torch.randn(batch, m, generator=_gen(2), dtype=DT, requires_grad=True)
    v = torch.randn(batch, m, generator=_gen(3), dtype=DT)
    calls = _dense_calls(monkeypatch)
    (g,) = torch.autograd.grad(node(x), x, v)
    assert calls == []  # neither the dense solve nor the fallback ran
    ref = v / d if u is None else node._reflect(node._reflect(v) / d)
    torch.testing.assert_close(g, ref, rtol=1e-7, atol=1e-9)


def test_auto_still_hands_stalling_cg_to_the_dense_solve(monkeypatch):
    """Condition 1e9 (m = 700, B = 1): CG cannot finish in its budget (86 iterations), so
    the dense solve answers, exactly: the fallback stays for genuinely stalling systems."""
    m = 700
    d = torch.logspace(0, 9, m, dtype=DT)
    x = torch.randn(1, m, generator=_gen(4), dtype=DT, requires_grad=True)
    v = torch.randn(1, m, generator=_gen(5), dtype=DT)
    calls = _dense_calls(monkeypatch)
    (g,) = torch.autograd.grad(_RotatedDiagonal(d)(x), x, v)
    assert calls == [1]
    torch.testing.assert_close(g, v / d, rtol=1e-10, atol=0)


def test_cg_budget_follows_the_dense_cost():
    """At least CG_BUDGET_MIN; growing with the batch; all N unknowns once the dense batch
    holds CG_ITER_WORK floats (memory counts); never below the old rule, max(50, N // 16)."""
    assert cg_budget(100, 1) == CG_BUDGET_MIN
    assert cg_budget(1000, 1) < cg_budget(1000, 2) < 1000  # the dense solve's cost grows with B
    n = math.ceil(math.sqrt(CG_ITER_WORK))
    assert cg_budget(n, 1) == n and cg_budget(3000, 2) == 3000 and cg_budget(500, 64) == 500
    for size in (64, 700, 2000, 5000):
        for batch in (1, 16):
            assert max(CG_BUDGET_MIN, size // 16) <= cg_budget(size, batch) <= max(CG_BUDGET_MIN, size)



class _ScaledRotated(DeclarativeNode):
    """argmin_u ½ Σ d (Pu)² − xᵀu = P((Px) / d), with ``d`` an input (one Hessian per
    element) and P = I − 2uuᵀ a fixed Householder reflection (products O(m))."""

    def __init__(self, u: torch.Tensor, **kw):
        super().__init__(**kw)
        self.register_buffer("u", u)

    def _reflect(self, z):
        return z - 2.0 * (z @ self.u).unsqueeze(-1) * self.u

    def objective(self, x, d, y):
        py = self._reflect(y)
        return 0.5 * (d * py * py).sum(-1) - (x * y).sum(-1)

    def solve(self, x, d):
        return self._reflect(self._reflect(x) / d)


def _mixed_batch(m: int, batch: int):
    """``batch - 1`` elements of condition 1.1 and one, the last, of condition 1e8."""
    d = 1 + 0.1 * torch.rand(batch, m, generator=_gen(6), dtype=DT)
    d[-1] = torch.logspace(0, 8, m, dtype=DT)
    u = torch.randn(m, generator=_gen(7), dtype=DT)
    return d, u / u.norm()


def test_auto_cg_compacts_to_the_unfinished_element(monkeypatch):
    """m = 400, B = 32, one element of condition 1e8: CG ran 400 products of all 32
    elements (the budget of 32, though 31 were solved in 10), then formed the dense
    Hessians of all 32 for the one it kept. Now, once half are solved, the products are
    the unfinished element's alone, its budget is one element's (50 steps), and the dense
    fallback forms its Hessian only; gradients are the closed form P((Pv)/d)."""
    from convexddn.nodes import implicit_system

    m, batch = 400, 32
    d, u = _mixed_batch(m, batch)
    rows: list[tuple[int, int]] = []  # (directions, elements) of each product
    vjp = implicit_system._batched_vjp
    monkeypatch.setattr(implicit_system, "_batched_vjp",
                        lambda out, y, cot, *a: rows.append(tuple(cot.shape[:2])) or vjp(out, y, cot, *a))
    node = _ScaledRotated(u)
    x = torch.randn(batch, m, generator=_gen(8), dtype=DT, requires_grad=True)
    v = torch.randn(batch, m, generator=_gen(9), dtype=DT)
    calls = _dense_calls(monkeypatch)
    (g,) = torch.autograd.grad(node(x, d), x, v)
    assert calls == [1]  # the CG fallback, not the dense solve chosen up front
    whole = [k for k, n in rows if n == batch]
    assert len(whole) <= 12, whole  # 10 CG steps and one check of the restricted products
    assert all(n == 1 for k, n in rows if k == m)  # H formed for the unfinished element only
    assert sum(1 for k, n in rows if n == 1) <= CG_BUDGET_MIN  # its budget: one element's
    ref = node._reflect(node._reflect(v) / d)
    torch.testing.assert_close(g, ref, rtol=1e-8, atol=1e-12)


def test_restricted_products_must_reproduce_the_batch():
    """A ``rows`` that does not give the batch's own products (an objective that mixes
    elements) is refused: CG and its fallback keep the whole batch's products, and the
    answer is still H⁻¹v (from torch.linalg.solve)."""
    m, batch = 40, 8
    d, _ = _mixed_batch(m, batch)
    H = torch.diag_embed(d)
    seen: list[int] = []

    def hvp(D):
        seen.append(D.shape[1])
        return torch.einsum("bij,kbj->kbi", H, D)

    hvp.rows = lambda idx: (lambda D: 2.0 * torch.einsum("bij,kbj->kbi", H[idx], D))  # wrong by 2x
    v = torch.randn(batch, m, generator=_gen(10), dtype=DT)
    w, _ = linear_solvers.solve_kkt_cg(hvp, None, None, v, budget=lambda n: 20)
    assert set(seen) == {batch}
    torch.testing.assert_close(w, torch.linalg.solve(H, v), rtol=1e-9, atol=0)


def test_refused_restricted_products_keep_the_batch_budget(monkeypatch):
    """Where ``restricted_hvp`` refuses the rows (here wrong by 2x), the whole batch pays
    for every product, so CG keeps the batch's budget: the element of condition 1e4 got
    one element's budget (10 steps, 12 products of the 110 it needs) and went to the dense
    solve. Now CG converges alone, to the answer of a fixed budget (no compaction) to
    1e-12 and to H⁻¹v (torch.linalg.solve)."""
    m, batch = 40, 8
    d, _ = _mixed_batch(m, batch)
    d[-1] = torch.logspace(0, 4, m, dtype=DT)
    H = torch.diag_embed(d)

    def hvp(D):
        return torch.einsum("bij,kbj->kbi", H, D)

    hvp.rows = lambda idx: (lambda D: 2.0 * torch.einsum("bij,kbj->kbi", H[idx], D))  # refused
    v = torch.randn(batch, m, generator=_gen(10), dtype=DT)
    calls = _dense_calls(monkeypatch)
    w, _ = linear_solvers.solve_kkt_cg(hvp, None, None, v, budget=lambda n: 200 if n == batch else 10)
    assert calls == []  # no dense fallback: CG converged within the batch's budget
    w_fixed, _ = linear_solvers.solve_kkt_cg(hvp, None, None, v, budget=200)
    torch.testing.assert_close(w, w_fixed, rtol=0, atol=1e-12)
    torch.testing.assert_close(w, torch.linalg.solve(H, v), rtol=1e-8, atol=0)


class _ScaledSimplexPlane(DeclarativeNode):
    """argmin_u ½ Σ d u² − xᵀu s.t. Σ u = 1 (and ‖u‖² ≤ 1e6, inactive): u = (x + ν) / d."""

    def objective(self, x, d, y):
        return 0.5 * (d * y * y).sum(-1) - (x * y).sum(-1)

    def equality_constraints(self, x, d, y):
        return y.sum(-1, keepdim=True) - 1.0

    def inequality_constraints(self, x, d, y):
        return (y * y).sum(-1, keepdim=True) - 1e6

    def solve(self, x, d):
        nu = (1.0 - (x / d).sum(-1, keepdim=True)) / (1.0 / d).sum(-1, keepdim=True)
        return (x + nu) / d


def test_auto_cg_compaction_keeps_multipliers_and_active_sets(monkeypatch):
    """The restricted products carry each element's multipliers and active set: with an
    equality and an inactive inequality, the mixed batch's gradient is the closed form
    D⁻¹v − D⁻¹1 (1ᵀD⁻¹v) / (1ᵀD⁻¹1), and the unfinished element's products are its own."""
    from convexddn.nodes import implicit_system

    m, batch = 400, 32
    d, _ = _mixed_batch(m, batch)
    rows: list[int] = []
    vjp = implicit_system._batched_vjp
    monkeypatch.setattr(implicit_system, "_batched_vjp",
                        lambda out, y, cot, *a: rows.append(cot.shape[1]) or vjp(out, y, cot, *a))
    x = torch.randn(batch, m, generator=_gen(11), dtype=DT, requires_grad=True)
    v = torch.randn(batch, m, generator=_gen(12), dtype=DT)
    (g,) = torch.autograd.grad(_ScaledSimplexPlane()(x, d), x, v)
    assert rows.count(1) > 0 and rows.count(batch) <= 20
    ref = v / d - (1 / d) * (v / d).sum(-1, keepdim=True) / (1 / d).sum(-1, keepdim=True)
    torch.testing.assert_close(g, ref, rtol=1e-8, atol=1e-12)


def _products(H: torch.Tensor):
    """hvp of the matrices ``H`` (B, m, m): directions (k, B, m) -> products (k, B, m)."""
    return lambda D: torch.einsum("bij,kbj->kbi", H, D)


def _exact_solve(H: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """H⁻¹v for the values H holds (float64 exactly), solved with 60 digits (mpmath)."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(60):
        x = mpmath.lu_solve(mpmath.matrix(H.double().tolist()), mpmath.matrix(v.double().tolist()))
        return torch.tensor([float(t) for t in x], dtype=torch.float64)


@pytest.mark.parametrize("dtype, n, kappa", [(torch.float32, 20, 1e6), (torch.float64, 20, 6e14)])
def test_dense_kkt_solves_a_system_its_dtype_resolves(dtype, n, kappa):
    """A symmetric positive-definite system of condition κ below 1/(4 eps) (1e6 in float32:
    1/eps = 8.4e6; 6e14 in float64: 4.5e15) is regular to working precision: the screen
    (n + r) eps (2.4e-6 in float32) called it singular, and its pseudo-inverse solution
    was 87 % (float32) and 100 % (float64) off, where the LU solution is 0.2 % off. The
    reference: the exact solution of the matrix as stored (60 digits)."""
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=_gen(0), dtype=DT))
    H = (Q * torch.logspace(0, math.log10(kappa), n, dtype=DT)) @ Q.T
    H = (0.5 * (H + H.T)).to(dtype).unsqueeze(0)
    v = torch.randn(1, n, generator=_gen(1), dtype=DT).to(dtype)
    res = linear_solvers.dense_kkt(_products(H), None, None, v)
    exact = _exact_solve(H[0], v[0])
    assert not bool(res.singular.any()) and bool(res.ill.all())
    assert float((res.w[0].double() - exact).norm() / exact.norm()) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("formed", ["rounded", "summed"])
def test_dense_kkt_still_calls_a_rank_deficient_system_singular(dtype, formed):
    """The other side: a singular matrix rounded to the dtype (``rounded``), or formed in it
    as a Gram matrix GᵀG summed over 400 rows whose first and last columns cancel exactly
    (``summed``: its rounding left eigenvalues of up to 2.5 eps), is singular; its solution
    is the minimum-norm one, Q diag(1/λ, 0) Qᵀ v from the eigenvectors of the exact matrix."""
    n = 20
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=_gen(2), dtype=DT))
    lam = torch.cat([torch.logspace(0, 3, n - 1, dtype=DT), torch.zeros(1, dtype=DT)])
    if formed == "rounded":
        H = ((Q * lam) @ Q.T).to(dtype)
    else:
        G = torch.randn(20 * n, n, generator=_gen(3), dtype=DT) * torch.logspace(0, 1, n, dtype=DT)
        G[:, -1] = -G[:, 0]
        G = G.to(dtype)
        H = G.T @ G  # summed in dtype
        lam, Q = torch.linalg.eigh(G.double().T @ G.double())  # null vector (1, 0, ..., 0, 1)/√2
        lam[lam.abs().argmin()] = 0.0
    H = (0.5 * (H + H.T)).unsqueeze(0)
    v = torch.randn(1, n, generator=_gen(4), dtype=DT)
    res = linear_solvers.dense_kkt(_products(H), None, None, v.to(dtype))
    assert bool(res.singular.all())
    inv = torch.where(lam > 0, 1.0 / torch.where(lam > 0, lam, 1.0), 0.0)
    want = ((v @ Q) * inv) @ Q.T
    tol = 1e-3 if dtype == torch.float32 else 1e-9
    assert float((res.w.double() - want).norm() / want.norm()) < tol
