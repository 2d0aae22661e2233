"""Whether the interior point's complementary pairs have each chosen a side, in their own units.

The iterations' measures (:class:`~.measures.Measures`) are relative to the whole program,
which a constraint whose own scale is far below it meets long before its pair has a side:
a ball ‖y − c‖_p <= r = 1e-7 around a centre of size 10 met tol (gap 1e-15 of the
program's) with its radius row r − t >= 0 at a slack of 0.34 r beside the largest
multiplier, y held at the centre by the barrier (μ ~ r² there); the polish took the pair as
active and returned the centre with a gradient of 0 for I. The pair decides at μ ≪ r², a
few iterations on, where one member falls to the rounding of its own terms; the ratio
s_i/z_i alone cannot tell (on the wrong side it is s_i²/μ, any size), the members beside
their own scales can: the test of :func:`~.measures.own_complementarity` applied to the
iterate. Only the elements the checks failed iterate on so (``decide_pairs`` of
:func:`~.interior_point.solve_cone_batch`): a second-order cone's iterates degrade at such
μ, and the others' points are not to move.
"""
from __future__ import annotations

import torch

from .kkt import bmv, row_inf
from .measures import own_complementarity
from .symmetric_cones import ConeLayout

__all__ = ["pairs_open"]


def pairs_open(layout: ConeLayout, A: torch.Tensor, b: torch.Tensor, q: torch.Tensor, x: torch.Tensor,
               s: torch.Tensor, z: torch.Tensor, tau: torch.Tensor, tol: float) -> torch.Tensor:
    r"""``(B,)`` whether the iterate ``(x, s, z, τ)`` of ``min ½xᵀPx + qᵀx s.t. Ax + s = b``
    (equilibrated, homogeneous: the point is ``(x, s, z)/τ``) has a nonnegative row both of
    whose members are large beside their own scales: the slack beside its row's terms
    :math:`\rho_i = \max(\tau|b_i|, (|A||x|)_i, |s_i|)`, the multiplier beside the largest one
    (at least ``tol`` of :math:`\tau\|q\|_\infty`), as :func:`~.measures.own_complementarity`
    (whose threshold it shares). Second-order cones are left to the polish."""
    rho = torch.maximum(torch.maximum(tau[:, None] * b.abs(), bmv(A.abs(), x.abs())), s.abs())
    zeta = torch.maximum(row_inf(z), tol * tau * row_inf(q))[:, None].expand_as(z)
    return own_complementarity(ConeLayout(layout.zero, layout.nonneg), s, z, rho, torch.zeros_like(s), zeta) > 0
