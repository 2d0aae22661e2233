"""A native node's SolverError names the failing elements in the caller's batch shape (``err.indices``,
``err.statuses``, as :class:`convexddn.errors.SolverError` promises), and sinkhorn refuses a cost whose
row or column spans beyond float64 (tester Y). ``indices`` was ``[]`` for projections, eigen, vector
pooling and a custom linear solver's NaN, and flat ``(i,)`` for total variation (``(4,)`` in a batch of
(2, 3)); a cost row from -1e308 to 1e308 gave a plan 20 % off its marginals, only warned."""
from __future__ import annotations

import pytest
import torch

import convexddn as cddn
import convexddn.functional as F
from convexddn.errors import InputError, SolverError

F64 = torch.float64


def _indices(fn) -> list:
    with pytest.raises(SolverError) as err:
        fn()
    assert len(err.value.statuses) == len(err.value.indices)
    return err.value.indices


def test_total_variation_max_iter_names_signals_in_the_batch():
    x = torch.randn(2, 3, 64, dtype=F64, generator=torch.Generator().manual_seed(0))
    x[1, 0] = torch.linspace(-5, 5, 64, dtype=F64) ** 3
    expected = []
    for i in range(2):
        for j in range(3):
            try:
                cddn.TotalVariation1d(lam=0.5, max_iter=3)(x[i, j])
            except SolverError:
                expected.append((i, j))
    assert expected and sorted(_indices(lambda: cddn.TotalVariation1d(lam=0.5, max_iter=3)(x))) == expected
    assert _indices(lambda: cddn.TotalVariation1d(lam=0.5, max_iter=3)(x[1, 1])) == [()]


def test_overflow_errors_name_the_elements():
    x = torch.randn(2, 3, 4)
    r = torch.ones(2, 3, dtype=F64)
    r[0, 2] = 1e39  # (only that vector's sphere does not fit float32)
    assert _indices(lambda: F.project_lp(x, p=2, mode="sphere", radius=r)) == [(0, 2)]
    S = torch.randn(2, 3, 4, 4)
    S = S + S.mT
    S[1, 2] = 3e38
    assert _indices(lambda: cddn.EigenDecomposition()(S)) == [(1, 2)]
    xv = torch.randn(2, 3, 5, 2, dtype=F64)
    xv[1, 0, 0, 0] = 1e200
    assert _indices(lambda: cddn.RobustVectorPool(penalty="welsch", alpha=1.0)(xv)) == [(1, 0)]


def test_a_custom_linear_solvers_nan_names_the_element():
    class Mean(cddn.DeclarativeNode):
        def objective(self, x, y):
            return 0.5 * ((y - x) ** 2).sum(-1)

        def solve(self, x):
            return x.clone()

    def solver(hvp, A, inactive, v, **kw):
        w = v.clone()
        w.view(2, 3, -1)[1, 2] = float("nan")
        return w, None

    x = torch.randn(2, 3, 4, dtype=F64, requires_grad=True)
    assert _indices(lambda: Mean(batch_dims=2, linear_solver=solver)(x).sum().backward()) == [(1, 2)]


def test_sinkhorn_refuses_a_cost_spanning_beyond_float64():
    C = torch.rand(2, 3, 5, 6, dtype=F64, generator=torch.Generator().manual_seed(0))
    C[1, 0, 0, 0], C[1, 0, 0, 1] = 1e308, -1e308
    with pytest.raises(InputError, match="must differ by at most"):
        cddn.OptimalTransport(eps=1.0)(C)


def test_input_errors_for_one_element_name_it():
    """Entmax's row of -inf and PnP's problem with all-zero weights name where they are (the
    messages counted them only)."""
    x = torch.zeros(2, 3, 4, dtype=F64)
    x[1, 2] = -float("inf")
    with pytest.raises(InputError, match=r"1 row\(s\) along dim=2 .*at indices \[\(1, 2\)\]"):
        F.entmax(x, 1.5)
    g = torch.Generator().manual_seed(0)
    p = torch.randn(3, 12, 3, dtype=F64, generator=g) + torch.tensor([0.0, 0.0, 6.0], dtype=F64)
    q = p[..., :2] / p[..., 2:]
    w = torch.ones(3, 12, dtype=F64)
    w[1] = 0.0
    with pytest.raises(InputError, match=r"1 of weights' 3 problem\(s\) are, at indices \[\(1,\)\]"):
        F.pnp(q, p, w)
