"""The structured polish of programs without second-order cones: one Newton step through the
reduced KKT system that the interior point factorises (:func:`polish_nonnegative`); the LU
Newton steps of every cone are :func:`~.polish.polish`'s."""
from __future__ import annotations

import torch

from .symmetric_cones import ConeLayout, NTScaling

__all__ = ["polish_nonnegative"]


def polish_nonnegative(systems, q, b, layout: ConeLayout, x, s, z, residual_fn, live: torch.Tensor,
                       residual: torch.Tensor, refine: int = 2):
    """One Newton step for programs without second-order cones, through the reduced KKT.

    On :math:`\\mathbb{R}_+` the Nesterov–Todd linearisation *is* the Jordan one
    (:math:`H = S Z^{-1}`), so the interior-point method's affine direction with a full
    step is a Newton step on :math:`s \\circ z = 0`, and the cheap structured
    factorisation serves (one step: after it :math:`s_i z_i \\approx 0` and :math:`z/s`
    would overflow the next factorisation).

    Args:
        systems: ``scaling -> KKTSystem`` on the same data, with its
            :class:`~.kkt.DataOps` as ``.ops`` (:class:`~.kkt.KKTFactory`).
        live: ``(B,)`` the elements that may take the step; the others, infeasibility
            certificates, keep their rays.
        residual: ``residual_fn(x, s, z)``, which the caller has measured.

    Returns:
        ``(x, s, z, residual, improved)``.
    """
    z0 = layout.zero
    res = residual
    ok = (s[:, z0:] > 0).all(1) & (z[:, z0:] > 0).all(1)
    sc = torch.where(ok[:, None], s[:, z0:], 1.0)
    zc = torch.where(ok[:, None], z[:, z0:], 1.0)
    kkt, ops = systems(NTScaling(layout, sc, zc)), systems.ops
    rx = ops.Pv(x) + ops.ATv(z) + q
    rz = ops.Av(x) + s - b
    rhs_z = torch.cat([-rz[:, :z0], s[:, z0:] - rz[:, z0:]], 1)
    dx, dz, _ = kkt.solve(-rx.unsqueeze(-1), rhs_z.unsqueeze(-1), refine)
    dx, dz = dx.squeeze(-1), dz.squeeze(-1)
    ds = -rz - ops.Av(dx)
    ds = torch.cat([torch.zeros_like(ds[:, :z0]), ds[:, z0:]], 1)
    xn, sn, zn = x + dx, s + ds, z + dz
    rn = residual_fn(xn, sn, zn)
    take = live & ok & ~kkt.failed & (rn < res)
    pick = lambda new, old: torch.where(take[:, None], new, old)  # noqa: E731
    return pick(xn, x), pick(sn, s), pick(zn, z), torch.where(take, rn, res), take
