"""Geometry of the PnP node: axis-angle rotations and the batched DLT pose start.

Batched torch code (CPU or CUDA); see :mod:`convexddn.nodes.pnp`.

References:
    R. Hartley and A. Zisserman, "Multiple View Geometry", 2nd ed., §7.1 (DLT).
"""
from __future__ import annotations

import math

import torch

__all__ = ["axis_angle_to_matrix", "matrix_to_axis_angle", "normalised", "dlt"]


def _skew(r: torch.Tensor) -> torch.Tensor:
    z = torch.zeros_like(r[..., 0])
    rows = [z, -r[..., 2], r[..., 1], r[..., 2], z, -r[..., 0], -r[..., 1], r[..., 0], z]
    return torch.stack(rows, -1).unflatten(-1, (3, 3))


def axis_angle_to_matrix(r: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula :math:`R = I + a [r]_\\times + b [r]_\\times^2`, ``(*, 3) -> (*, 3, 3)``.

    :math:`a = \\sin\\theta/\\theta`, :math:`b = (1 - \\cos\\theta)/\\theta^2`,
    :math:`\\theta = \\|r\\|`, by their Taylor series below θ = 1e-2 so that every
    derivative stays finite at r = 0.
    """
    t2 = (r * r).sum(-1)
    small = t2 < 1e-4
    th = torch.sqrt(torch.where(small, torch.ones_like(t2), t2))
    a = torch.where(small, 1 - t2 / 6 + t2 * t2 / 120, torch.sin(th) / th)
    b = torch.where(small, 0.5 - t2 / 24 + t2 * t2 / 720, (1 - torch.cos(th)) / (th * th))
    S = _skew(r)
    eye = torch.eye(3, dtype=r.dtype, device=r.device)
    return eye + a[..., None, None] * S + b[..., None, None] * (S @ S)


def matrix_to_axis_angle(R: torch.Tensor) -> torch.Tensor:
    """Inverse of Rodrigues (used for the start only): ``(B, 3, 3) -> (B, 3)``."""
    v = torch.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1)
    cos = ((R.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    th = torch.acos(cos)
    sin = 0.5 * v.norm(dim=-1)
    general = (th / torch.where(sin > 1e-6, 2 * sin, torch.ones_like(sin))).unsqueeze(-1) * v
    # Near θ = π: (R + I)/2 ≈ r̂ r̂ᵀ; take its largest column, signed like v.
    Bm = 0.5 * (R + torch.eye(3, dtype=R.dtype, device=R.device))
    col = Bm.gather(-1, Bm.diagonal(dim1=-2, dim2=-1).argmax(-1)[:, None, None].expand(-1, 3, 1)).squeeze(-1)
    axis = col / col.norm(dim=-1, keepdim=True).clamp(min=1e-30)
    axis = torch.where((axis * v).sum(-1, keepdim=True) < 0, -axis, axis)
    special = torch.where((cos > 0).unsqueeze(-1), 0.5 * v, th.unsqueeze(-1) * axis)
    r = torch.where((sin > 1e-6).unsqueeze(-1), general, special)
    return r


def normalised(p2d: torch.Tensor, K: torch.Tensor | None) -> torch.Tensor:
    return p2d if K is None else (p2d - K[:, None, 2:]) / K[:, None, :2]


def dlt(q: torch.Tensor, p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted DLT pose start from normalised image points q (B, N, 2) and 3-D points p.

    The camera matrix [M | m] is the smallest right singular vector of the 2N×12
    system on centred, scaled 3-D points; R is the nearest rotation to M (sign chosen so
    the points lie in front of the camera) and t = m / scale.
    """
    B, N, _ = p.shape
    wn = w / w.sum(-1, keepdim=True)
    c = (wn.unsqueeze(-1) * p).sum(-2, keepdim=True)
    sc = ((wn * ((p - c) ** 2).sum(-1)).sum(-1).sqrt() / math.sqrt(3)).clamp(min=1e-30)[:, None, None]
    Xh = torch.cat([(p - c) / sc, torch.ones_like(p[..., :1])], -1)  # (B, N, 4)
    zero = torch.zeros_like(Xh)
    r1 = torch.cat([Xh, zero, -q[..., :1] * Xh], -1)
    r2 = torch.cat([zero, Xh, -q[..., 1:] * Xh], -1)
    A = torch.cat([r1, r2], -2) * w.sqrt().repeat(1, 2).unsqueeze(-1)
    P = torch.linalg.svd(A, full_matrices=False).Vh[:, -1].reshape(B, 3, 4)
    # Undo the 3-D normalisation: P [ (X - c)/s ; 1 ] = [M/s | m - M c/s] [X ; 1].
    M = P[..., :3] / sc
    m = P[..., 3] - (M @ c.mT).squeeze(-1)
    depth = (p @ M.mT + m.unsqueeze(-2))[..., 2]
    flip = ((wn * torch.sign(depth)).sum(-1) < 0)[:, None, None]
    M, m = torch.where(flip, -M, M), torch.where(flip.squeeze(-1), -m, m)
    U, S, Vh = torch.linalg.svd(M)
    d = torch.ones_like(S)
    d[:, 2] = torch.det(U @ Vh)
    R = U @ (d.unsqueeze(-1) * Vh)
    t = m / S.mean(-1, keepdim=True)
    return torch.cat([matrix_to_axis_angle(R), t], -1)
