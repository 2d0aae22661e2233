"""The reverse-mode degeneracy check judges only the derivatives asked for
(:meth:`convexddn.nodes.degeneracy.DependenceCheck.curvature_reaches`, ``asked``): ``E y = f``
with a row the input makes zero (``E[1] = 0``, ``f[1] = 0``) splits the multipliers freely, and
that split reaches only ``E``'s derivative. With only ``x`` requiring grad the gradient is exact
(the projection onto ``{y0 + y1 + y2 = 1}``) and forward mode says nothing; reverse mode warned
that the constraints are "curved" and the gradient "can be wrong for every input" (tester S)."""
from __future__ import annotations

import warnings

import torch

import convexddn as cddn

F64 = torch.float64


class EqualityProjection(cddn.DeclarativeNode):
    def objective(self, E, f, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, E, f, x, y):
        return (E @ y.unsqueeze(-1)).squeeze(-1) - f

    def solve(self, E, f, x):
        r = (E @ x.unsqueeze(-1)).squeeze(-1) - f
        return x - (torch.linalg.pinv(E) @ r.unsqueeze(-1)).squeeze(-1)


def _run(E_requires: bool):
    E = torch.tensor([[[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]], dtype=F64, requires_grad=E_requires)
    f = torch.tensor([[1.0, 0.0]], dtype=F64)
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        EqualityProjection()(E, f, x)[:, 0].sum().backward()
    return x.grad, [str(w.message) for w in caught if "curved" in str(w.message)]


def test_only_x_asked_gives_no_curved_warning_and_the_exact_gradient():
    gx, curved = _run(False)
    assert not curved
    torch.testing.assert_close(gx, torch.tensor([[2 / 3, -1 / 3, -1 / 3]], dtype=F64), rtol=0, atol=1e-12)


def test_E_asked_too_is_still_warned():
    gx, curved = _run(True)
    assert len(curved) == 1
    torch.testing.assert_close(gx, torch.tensor([[2 / 3, -1 / 3, -1 / 3]], dtype=F64), rtol=0, atol=1e-12)
