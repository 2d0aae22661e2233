"""Is a batched cone program's solution unique? The test in the limit system.

The backward (:mod:`.vjp`) differentiates through the KKT system factorised at the
solution, with each active row's slack lifted to 1e-12 (a weight ~z/1e-12). A
non-unique solution (an LP with an edge of optima, an SOCP with a disc) makes that system
singular in exact arithmetic, but rounding caps the blow-up of its solve at about
lift/(eps·max z): 2.5e3 to 1.6e6 on the audit's LPs and SOCPs, never the 1e7 the
amplification test needs. So uniqueness is tested in the limit system itself:

.. math::

    S_{\\lim} = P + C^\\top C,

``C`` the rows that constrain ``x`` at the solution, each scaled to unit length (only
whether a row is present matters; rows 1e-4 next to 1e4 in one cone, squared, had a
condition of 1e16 at a unique solution): the equalities, the nonnegative rows and, per
second-order cone, its two Jordan-frame directions and its tangent rows, all but those
decided inactive. ``x`` is unique iff :math:`S_{\\lim}` is nonsingular; a right-hand side
that reaches its null space is amplified by ~1/(n eps) (2.7e14 to 1.4e15 measured),
one that does not by at most its condition (2.2e5 over the test suite and the bench
problems). An auxiliary variable that is not unique (an epigraph variable between two
inactive bounds) is reached neither by the requested outputs' probe nor, usually, by
the cotangent: no warning for it.
"""
from __future__ import annotations

import math

import torch

from .._generic import generic_vector
from .certify import decided, soc_frame

__all__ = ["LIMIT_AMPLIFICATION", "limit_matrix", "limit_nonunique"]

# Amplification of the Jacobi-scaled limit matrix above which a right-hand side reaches
# a null direction (see the module docstring: ~1e15 there, at most 2.2e5 elsewhere).
LIMIT_AMPLIFICATION = 1e10


def _present(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Whether a direction with slack part ``a`` and multiplier part ``b`` constrains the
    limit system: all but those decided inactive (H = ∞, :func:`~.certify.decided`)."""
    return ~decided(a, b)[1]


def _unit_rows(C: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    norm = C.norm(dim=-1)
    keep = present & (norm > 0)
    return C * torch.where(keep, 1.0 / torch.where(keep, norm, 1.0), 0.0).unsqueeze(-1)


def _tangent_rows(layout, u: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """``(B, msoc)`` mask of the tangent rows :math:`t_j = A_j - u_j\\,u^\\top A_{tail}`
    (``j`` a tail row, :math:`t = (I - u u^\\top) A_{tail}`) that enter the limit system.

    A cone's tangent rows carry :math:`H = s_0/z_0` (:class:`~.limit_scaling.LimitScaling`):
    the boundary's curvature weighted by the multiplier, finite wherever the multiplier
    does not vanish, i.e. unless both Jordan-frame pairs are decided inactive (``on`` ``(B, nsoc)`` False). :math:`s_0/z_0` itself converges to a
    value of the data's order, not to 0 or ∞: tested against :data:`~.certify.DECIDED`
    it dropped a strictly complementary cone's curvature at :math:`z_0 < 10^{-2} s_0`
    and called a unique solution not unique.

    The rows are dependent, :math:`\\sum_j u_j t_j = u^\\top (I - u u^\\top) A_{tail} = 0`:
    the row at ``u``'s largest entry is a combination of the others (coefficients
    :math:`|u_i/u_j| \\le 1`) and is left out. Where ``u`` is a coordinate axis it is
    zero up to rounding, and scaled to unit length it was a constraint that does not exist
    (a segment of optima along a ray of the cone passed as unique)."""
    idx = layout.index(u.device)
    B, msoc = u.shape
    pos = torch.arange(msoc, device=u.device).expand(B, msoc)
    cone = idx.soc_id.expand(B, msoc)
    mag = (u * idx.tail).abs()
    top = mag.new_zeros(B, len(layout.soc)).scatter_reduce(1, cone, mag, "amax")
    first = torch.where((mag == layout._spread(top)) & (mag > 0), pos, msoc)
    first = torch.full_like(top, msoc, dtype=torch.long).scatter_reduce(1, cone, first, "amin")
    return layout._spread(on) & (idx.tail > 0) & (pos != layout._spread(first))


def limit_matrix(d, layout, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``(B, n, n)`` :math:`P + C^\\top C` of the equilibrated data ``d`` at the
    equilibrated ``(s, z)`` ``(B, m)`` (see the module docstring)."""
    z0, k = layout.zero, layout.nonneg
    A, rows = d.A, []
    if z0:
        rows.append(_unit_rows(A[:, :z0], torch.ones_like(A[:, :z0, 0], dtype=torch.bool)))
    if k:
        rows.append(_unit_rows(A[:, z0:z0 + k], _present(s[:, z0:z0 + k], z[:, z0:z0 + k])))
    if layout.soc:
        off, idx = z0 + k, layout.index(A.device)
        As = A[:, off:]
        a1, a2, b1, b2, u = soc_frame(layout, s[:, off:], z[:, off:])
        head = torch.zeros_like(u)
        head[:, idx.heads] = 1.0
        tangent, on = As, torch.zeros_like(a1, dtype=torch.bool)
        for a, b, sign in ((a1, b1, 1.0), (a2, b2, -1.0)):
            f = (head + sign * u) / math.sqrt(2.0)
            g = layout._seg(f.unsqueeze(-1) * As)  # fᵀA per cone
            present = _present(a, b)
            rows.append(_unit_rows(g, present))
            tangent = tangent - f.unsqueeze(-1) * layout._spread(g)
            on = on | present  # (decided on the frame pairs, not on s0/z0: see _tangent_rows)
        rows.append(_unit_rows(tangent, _tangent_rows(layout, u, on)))
    C = torch.cat(rows, 1) if rows else A[:, :0]
    return torch.baddbmm(d.P, C.mT, C)


def limit_nonunique(d, layout, s: torch.Tensor, z: torch.Tensor, rx: torch.Tensor,
                    cols: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(outputs, reached)`` ``(B,)`` masks: the requested outputs (the variables
    ``cols``, all if ``None``) are not unique — a fixed generic vector on their columns
    reaches a null direction of :func:`limit_matrix` — and the cotangent ``rx`` ``(B, n)``
    (equilibrated) reaches one. One Cholesky of the Jacobi-scaled matrix plus ``n eps I``
    and one solve with both columns. float64 only (in float32 a null direction amplifies
    by ~1/(n eps) ≈ 1e6, no margin over ill-conditioned unique solutions): all False
    for other dtypes."""
    B, n = rx.shape
    none = torch.zeros(B, dtype=torch.bool, device=rx.device)
    if rx.dtype != torch.float64 or n == 0:
        return none, none
    S = limit_matrix(d, layout, s, z)
    dg = S.diagonal(dim1=1, dim2=2)
    dj = torch.where(dg > 0, dg, 1.0).rsqrt()
    S = dj[:, :, None] * S * dj[:, None, :]
    S.diagonal(dim1=1, dim2=2).add_(n * torch.finfo(S.dtype).eps)
    L, info = torch.linalg.cholesky_ex(S)
    probe = generic_vector(n, S.dtype, S.device)
    if cols is not None:
        cols = cols.to(S.device)
        probe = torch.zeros_like(probe).index_copy(0, cols, probe.index_select(0, cols))
    R = dj[:, :, None] * torch.stack([probe.expand(B, n), rx], -1)
    amp = torch.cholesky_solve(R, L).abs().amax(1) / R.abs().amax(1).clamp_min(torch.finfo(S.dtype).tiny)
    amp = torch.where(torch.isnan(amp), torch.inf, amp)
    return (amp[:, 0] > LIMIT_AMPLIFICATION) | (info != 0), amp[:, 1] > LIMIT_AMPLIFICATION
