"""The derivative's KKT system solved densely (:mod:`convexddn.convex.dense_kkt`), where the
factorised form cannot: its acceptance.

Reference: ``u*(q) = argmin_{u >= 0} u^p − q u = (q/p)^(1/(p−1))``, whose derivative is
``du*/dq = u* / ((p − 1) q)``. CVXPY writes ``u^p`` for ``p`` near 1 as a chain of
second-order cones whose limit system the reduced factorisation cannot solve; the dense
LU solves it to ~1e-8, but its residual relative to the right-hand side stayed at 6e-6
to 1.5e-3 (the rounding of ``K u`` alone, with ``u`` ~1e6 beside entries of 7e5), above
the backward's acceptance: the gradient was zeroed with a warning calling the solution
not unique (from ``u* ~ 20`` on at ``p = 1.005``, 30 at ``p = 1.02``).
"""
from __future__ import annotations

import warnings

import cvxpy as cp
import pytest
import torch

from convexddn.convex import vjp
from convexddn.convex.layer import ConvexLayer
from convexddn.errors import GradientWarning

F64 = torch.float64


@pytest.mark.parametrize("p,u_star", [(1.005, (1.02 / 1.005) ** 200), (1.005, 30.0), (1.005, 100.0),
                                      (1.02, 30.0), (1.02, 100.0)])
def test_a_power_near_one_has_its_closed_form_gradient(p, u_star, monkeypatch):
    u, q = cp.Variable(), cp.Parameter(name="q")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (CVXPY's note on the rational approximation)
        layer = ConvexLayer(cp.Problem(cp.Minimize(cp.power(u, p) - q * u), [u >= 0]), [q], [u])
    calls = []
    solve = vjp.dense_limit_solve
    monkeypatch.setattr(vjp, "dense_limit_solve", lambda *args: calls.append(args[2].numel()) or solve(*args))
    qv = p * u_star ** (p - 1)
    Q = torch.tensor(qv, dtype=F64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("error", GradientWarning)
        y = layer(Q)
        (g,) = torch.autograd.grad(y, Q)
    assert layer.last_solve.backend == ["batched"]
    torch.testing.assert_close(y.detach(), torch.tensor(u_star, dtype=F64), rtol=1e-8, atol=0)
    torch.testing.assert_close(g, torch.tensor(u_star / ((p - 1) * qv), dtype=F64), rtol=1e-6, atol=0)
    assert sum(calls) > 0  # (solved densely: the factorised refinement stalls here)


@pytest.mark.parametrize("mode", ["backward", "forward mode"])
def test_a_system_not_even_the_dense_solve_solves_is_warned_as_such(mode, monkeypatch):
    """Where the dense solve fails too (forced here: every factorised solve taken as
    stalled, every dense one as failed), the gradient is zeroed with a warning that says
    the system could not be solved, not that the solution is not unique: the projection
    onto y <= 0 has a unique solution (it called it not unique)."""
    x, y = cp.Parameter(3, name="x"), cp.Variable(3)
    layer = ConvexLayer(cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - x)), [y <= 0]), [x], [y])
    densely = vjp._densely_where_unsolved

    def forced(sol, layout, kkt, *args):
        kkt.solve_residual = torch.ones_like(kkt.solve_residual)
        return densely(sol, layout, kkt, *args)

    def failed(sol, layout, idx, rx, rz):
        return torch.zeros_like(rx), torch.zeros_like(rz), rx.new_full((rx.shape[0],), torch.inf)

    monkeypatch.setattr(vjp, "_densely_where_unsolved", forced)
    monkeypatch.setattr(vjp, "dense_limit_solve", failed)
    X = torch.tensor([[0.5, -1.0, 2.0], [-0.3, 0.2, -0.1]], dtype=F64, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if mode == "backward":
            (g,) = torch.autograd.grad(layer(X).sum(), X)
        else:
            import torch.autograd.forward_ad as fwAD

            with fwAD.dual_level():
                g = fwAD.unpack_dual(layer(fwAD.make_dual(X.detach(), torch.ones_like(X)))).tangent
    texts = [str(w.message) for w in caught if issubclass(w.category, GradientWarning)]
    assert len(texts) == 1 and "could not be solved accurately" in texts[0] and "not unique" not in texts[0], texts
    assert f"ConvexLayer {mode}" in texts[0] and "batch indices [(0,), (1,)]" in texts[0], texts
    assert torch.equal(g, torch.zeros_like(g))
