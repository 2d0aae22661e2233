"""The active constraints' Jacobian (convexddn/nodes/constraint_rows.py) and the implicit systems
built on it, for constraints written in units whose squares leave float64's range."""
from __future__ import annotations

import warnings

import pytest
import torch

from convexddn.nodes.constraint_rows import constraint_gram, independent_rows
from convexddn.nodes.declarative import DeclarativeNode
from convexddn.nodes.multipliers import multipliers, unit_rows

DT = torch.float64


class _Simplex(DeclarativeNode):
    """The Euclidean projection onto the simplex, with the constraints written in units ``Se``
    (Σy = 1) and ``Si`` (y >= 0), which change neither the solution nor its derivative."""

    def __init__(self, Se: float, Si: float, **kw):
        super().__init__(**kw)
        self.Se, self.Si = Se, Si

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x, y):
        return self.Se * (y.sum(-1, keepdim=True) - 1)

    def inequality_constraints(self, x, y):
        return -self.Si * y

    def solve(self, x):  # the sort-based projection (exact zeros off the support)
        u, _ = x.sort(-1, descending=True)
        css = u.cumsum(-1) - 1
        k = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype)
        rho = ((u - css / k) > 0).sum(-1, keepdim=True)
        return (x - css.gather(-1, rho - 1) / rho).clamp_min(0)


@pytest.mark.parametrize("linear_solver", ["dense", "cg"])
@pytest.mark.parametrize("Se, Si", [(1.0, 1.0), (1e200, 1e160), (1e-170, 1e-200), (1e300, 1e-300)])
def test_constraints_in_extreme_units_grad(Se, Si, linear_solver):
    """Rows of −1e160 or 1e-200: unit_rows' norm overflowed (or underflowed), the multipliers came
    out 0 and the exact solution was rejected as no KKT point; the Gram matrix A Aᵀ overflowed
    (a row called null: the unconstrained gradient, silently), and CG's (A Aᵀ)⁺ underflowed.
    Closed form: ∂(Σ c_i y_i)/∂x = c_S − mean(c_S) on the support S, 0 off it."""
    x = torch.tensor([[0.8, 0.6, -1.0], [0.1, 0.2, 0.3]], dtype=DT, requires_grad=True)
    c = torch.tensor([1.0, 2.0, 3.0], dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (_Simplex(Se, Si, linear_solver=linear_solver)(x) * c).sum().backward()
    expected = torch.tensor([[-0.5, 0.5, 0.0], [-1.0, 0.0, 1.0]], dtype=DT)
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", [1e160, 1e-170])
def test_rows_and_multipliers_at_extreme_scales(scale):
    # Two rows: a·(0, 1) and a·(1, 1); gf = (1, 2) = λ₁ a (0, 1) + λ₂ a (1, 1) with λ = (1, 1) / a.
    A = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]], dtype=DT) * scale
    An, inv = unit_rows(A)
    torch.testing.assert_close(An[0, 1], torch.tensor([1.0, 1.0], dtype=DT) / 2 ** 0.5, rtol=1e-15, atol=0)
    torch.testing.assert_close(inv.squeeze(), torch.tensor([1.0, 2 ** -0.5], dtype=DT) / scale, rtol=1e-15, atol=0)
    lam = multipliers(A, torch.tensor([[-1.0, -2.0]], dtype=DT), 0, torch.tensor([[False, False]]))
    torch.testing.assert_close(lam * scale, torch.tensor([[1.0, 1.0]], dtype=DT), rtol=1e-12, atol=0)
    A2, pin, T, dependent = independent_rows(A, None, 1e-12)
    assert not bool(dependent.any()) and not bool(pin.any())  # both rows kept: they are independent
    # A' = Tᵀ A, with orthogonal rows, and the multipliers map back: Aᵀ (T μ') = A'ᵀ μ' for any μ'.
    gram = A2 @ A2.transpose(1, 2)
    assert bool(torch.isfinite(gram).all()) and abs(float(gram[0, 0, 1])) <= 1e-12 * float(gram.abs().amax())
    mu = torch.tensor([[[0.3], [-1.7]]], dtype=DT)
    torch.testing.assert_close(A.transpose(1, 2) @ (T @ mu), A2.transpose(1, 2) @ mu, rtol=1e-12, atol=0)
    Minv, deficit = constraint_gram(A / scale, None, 1e-12)
    assert deficit.tolist() == [0]


def test_row_prescale_limits():
    """The rows' prescale is 1 / max |A_ij|, and 1 on zero rows, rows with an Inf or NaN (an
    Inf row got 0: its prescaled row 0 * Inf = NaN) and rows below 1 / the dtype's max."""
    from convexddn.nodes.constraint_rows import _row_prescale

    A = torch.tensor([[[-1e160, 2.0], [0.0, 0.0], [torch.inf, 1.0], [torch.nan, 1.0], [1e-310, 0.0],
                       [0.5, -4.0]]], dtype=DT)
    p = _row_prescale(A)
    assert torch.equal(p, torch.tensor([[1e-160, 1.0, 1.0, 1.0, 1.0, 0.25]], dtype=DT))
