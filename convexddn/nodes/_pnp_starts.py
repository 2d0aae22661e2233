"""Starts of the PnP node: the batched DLT pose, the pose from a plane's homography and
its mirror-image twin, and the measures that choose between them (distinct points, the
spread off the best-fit plane).

Batched torch code (CPU or CUDA); see :mod:`convexddn.nodes.pnp` and
:mod:`._pnp_solvers`, which solves from these starts.

References:
    R. Hartley and A. Zisserman, "Multiple View Geometry", 2nd ed., §7.1 (DLT), §4.1
    (homography), §8.8 (pose from a plane's homography).
    T. Collins and A. Bartoli, "Infinitesimal Plane-Based Pose Estimation", IJCV 2014
    (the two-fold ambiguity of a plane's pose).
"""
from __future__ import annotations

import math

import torch

from .._generic import generic_vector
from ..errors import InputError
from .linear_solvers import shown_indices
from ._pnp_geometry import axis_angle_to_matrix, matrix_to_axis_angle

__all__ = ["COPLANAR", "check_dlt_points", "dlt", "image_spread", "off_plane_spread", "planar_start"]

# Points whose spread off their best-fit plane (line) is below this fraction of their
# largest spread count as coplanar (collinear): the DLT's 2N×12 system then has a null
# space of dimension > 1, and its start is an arbitrary member of it. Well above rounding
# (float32 data round a tilted plane to ~1e-7 of its extent).
COPLANAR = 1e-6

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


def planar_start(q: torch.Tensor, p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Pose starts from the homography of the points' best-fit plane, ``(B, N, 2),
    (B, N, 3), (B, N) -> (B, 3, 6)``: the homography's own pose and the two poses of its
    first-order (affine) part at the centroid. For (nearly) planar scenes, where the
    DLT's 2N×12 system has a null space of dimension > 1 (up to noise), and for scenes
    seen under a small angle, where it is ill-conditioned.

    With plane axes :math:`e_1, e_2` (and normal :math:`e_3 = e_1 \\times e_2`) through
    the weighted centroid c and plane coordinates (u, v), a point maps to the camera
    frame as :math:`[R e_1, R e_2, R c + t]\\,(u, v, 1)^T`, which is the homography H
    from (u, v) to the image, up to scale: :math:`R = [h_1, h_2, h_1 \\times h_2]`
    (normalised, nearest rotation) :math:`E^T`, :math:`t = h_3 - R c`.

    A plane seen under a small angle has two poses that fit its image to first order,
    tilted either way about the line of sight (the two-fold ambiguity; IPPE, Collins &
    Bartoli 2014), and at a distance the homography's perspective part is mostly noise:
    its pose was 100x the minimum's objective where the IPPE poses were within 30 %. From
    the Jacobian J (2×2) of H at the centroid's image :math:`x_0` and the rotation
    :math:`R_v` taking the optical axis to the line of sight :math:`(x_0, 1)`:
    :math:`A = ([I_2, -x_0] R_v[:, :2])^{-1} J = \\gamma \\tilde R` with γ its largest
    singular value, the rotations :math:`R_v [\\tilde r_1, \\tilde r_2;\\ \\pm b^T]` (columns
    completed to unit length, b's sign shared; third column the cross product)
    :math:`E^T`, each with its least-squares t (the projection equations
    :math:`x_i (R p_i + t)_3 = (R p_i + t)_{1,2}` are linear in t). Either one can be the
    lower minimum: at depth 30, 1 to 3 scenes in 30 ended in the other one, up to 34x
    the objective, without a word.
    """
    wn = w / w.sum(-1, keepdim=True)
    c = (wn.unsqueeze(-1) * p).sum(-2, keepdim=True)
    Vh = torch.linalg.svd((p - c) * wn.sqrt().unsqueeze(-1), full_matrices=False).Vh  # rows: plane axes
    e1, e2 = Vh[:, 0], Vh[:, 1]
    E = torch.stack([e1, e2, torch.linalg.cross(e1, e2)], -1)  # (B, 3, 3), right-handed
    uv = (p - c) @ E[..., :2]
    sc = ((wn * (uv * uv).sum(-1)).sum(-1).sqrt() / math.sqrt(2)).clamp(min=1e-30)[:, None, None]
    U = torch.cat([uv / sc, torch.ones_like(uv[..., :1])], -1)  # (B, N, 3)
    zero = torch.zeros_like(U)
    rows = torch.cat([torch.cat([U, zero, -q[..., :1] * U], -1), torch.cat([zero, U, -q[..., 1:] * U], -1)], -2)
    Hm = torch.linalg.svd(rows * w.sqrt().repeat(1, 2).unsqueeze(-1), full_matrices=False).Vh[:, -1].reshape(-1, 3, 3)
    h1, h2, h3 = Hm[..., 0] / sc[..., 0], Hm[..., 1] / sc[..., 0], Hm[..., 2]
    lam = 0.5 * (h1.norm(dim=-1) + h2.norm(dim=-1)).clamp(min=1e-300)
    # The sign that puts the centroid in front of the camera (depth h3_z / λ > 0).
    lam = torch.where(h3[:, 2] < 0, -lam, lam).unsqueeze(-1)
    a1, a2 = h1 / lam, h2 / lam
    U3, _, V3 = torch.linalg.svd(torch.stack([a1, a2, torch.linalg.cross(a1, a2)], -1))
    d = torch.ones_like(h1)
    d[:, 2] = torch.det(U3 @ V3)
    R = (U3 @ (d.unsqueeze(-1) * V3)) @ E.mT
    t = h3 / lam - (R @ c.mT).squeeze(-1)
    poses = [torch.cat([matrix_to_axis_angle(R), t], -1)]
    # IPPE: J = (∂x/∂(u, v)) at (0, 0), x = (H (u, v, 1))_{1,2} / (H (u, v, 1))_3.
    x0 = h3[:, :2] / h3[:, 2:]
    J = torch.stack([h1, h2], -1)
    J = (J[:, :2] - x0.unsqueeze(-1) * J[:, 2:]) / h3[:, 2, None, None]
    s = torch.cat([x0, torch.ones_like(x0[:, :1])], -1)
    axis = torch.stack([-s[:, 1], s[:, 0], torch.zeros_like(s[:, 0])], -1)  # e_3 × s
    sin = axis.norm(dim=-1, keepdim=True)
    Rv = axis_angle_to_matrix(axis / sin.clamp(min=1e-300) * torch.atan2(sin, s[:, 2:]))
    Bv = torch.cat([torch.eye(2, dtype=p.dtype, device=p.device).expand_as(J), -x0.unsqueeze(-1)], -1) @ Rv[..., :2]
    A = torch.linalg.solve_ex(Bv, J)[0]
    Rt = A / torch.linalg.matrix_norm(A, ord=2).clamp(min=1e-300)[:, None, None]
    b = (1 - (Rt * Rt).sum(-2)).clamp(min=0).sqrt()  # completes each column to unit length
    b = torch.stack([b[:, 0], torch.where((Rt[:, :, 0] * Rt[:, :, 1]).sum(-1) > 0, -b[:, 1], b[:, 1])], -1)
    ones, zeros = torch.ones_like(q[..., 0]), torch.zeros_like(q[..., 0])
    M = torch.cat([torch.stack([ones, zeros, -q[..., 0]], -1), torch.stack([zeros, ones, -q[..., 1]], -1)], -2)
    Mw = M * w.repeat(1, 2).unsqueeze(-1)
    for sign in (1.0, -1.0):
        c1, c2 = torch.cat([Rt[..., 0], sign * b[:, :1]], -1), torch.cat([Rt[..., 1], sign * b[:, 1:]], -1)
        R = Rv @ torch.stack([c1, c2, torch.linalg.cross(c1, c2)], -1) @ E.mT
        X = p @ R.mT
        rhs = torch.cat([q[..., 0] * X[..., 2] - X[..., 0], q[..., 1] * X[..., 2] - X[..., 1]], -1)
        t = torch.linalg.solve_ex(Mw.mT @ M, (Mw.mT @ rhs.unsqueeze(-1)))[0].squeeze(-1)
        poses.append(torch.cat([matrix_to_axis_angle(R), t], -1))
    return torch.stack(poses, 1)


def image_spread(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """RMS distance of the normalised image points of nonzero weight from their weighted
    centroid, ``(B, N, 2), (B, N) -> (B,)``: about the angle (radians) under which the
    scene is seen, whatever its pose. Below ~0.1 the camera is nearly affine: the
    perspective that tells a pose from its mirror-image twin (and conditions the DLT) is
    of second order in it."""
    wn = w / w.sum(-1, keepdim=True)
    c = (wn.unsqueeze(-1) * q).sum(-2, keepdim=True)
    return (wn * ((q - c) ** 2).sum(-1)).sum(-1).sqrt()


def off_plane_spread(p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Spread of the points of nonzero weight off their best-fit plane, relative to their
    largest spread: σ_min / σ_max of the weighted, centred points, (B, N, 3) -> (B,).

    Invariant to the scale, position and orientation of the points; 0 for coplanar,
    collinear or coincident points (and rounding level, ~1e-16 in float64 or ~1e-7 for
    float32 data, for points that are coplanar up to the precision of the input).
    """
    s = _spread_values(p, w)
    return s[:, -1] / s[:, 0].clamp(min=torch.finfo(s.dtype).tiny)


def _spread_values(p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Singular values of the weighted, centred points, (B, N, 3) -> (B, 3), descending."""
    wn = w / w.sum(-1, keepdim=True)
    c = (wn.unsqueeze(-1) * p).sum(-2, keepdim=True)
    return torch.linalg.svdvals((p - c) * wn.sqrt().unsqueeze(-1))


def check_dlt_points(p, w) -> None:
    """The starts need, per problem, >= 6 distinct points of nonzero weight (fewer leave
    the DLT's 2N×12 system a null space of dimension > 1; a point repeated to pad to a
    fixed N counts once: 4 points three times each gave an arbitrary start, a pose 1 rad
    off, silently) not all on one line (no plane, so no pose, is determined); coplanar
    points are solved from the plane's homography (:func:`planar_start`).

    One line: the directions from a middle point of nonzero weight to the others span
    one dimension (σ₂/σ₁ of the unit directions at most ``COPLANAR``): unlike the points'
    own spread, this does not call ten points in general position collinear beside one
    landmark 1e8 away."""
    live = w > 0
    distinct, order = _distinct_points(p, live)
    few = distinct < 6
    if bool(few.any()):
        # The argument to blame: p3d where its points are too few even counting every
        # weight as nonzero (repeated points, or no weights passed), else the weights.
        short = _distinct_points(p, torch.ones_like(live))[0] < 6
        blame_p = bool(short[few].all())
        raise InputError(f"{'p3d' if blame_p else 'weights'}: the DLT start needs >= 6 distinct points"
                         f"{'' if blame_p else ' of nonzero weight'} per problem, got {int(distinct.min())} "
                         f"for {shown_indices(few)}; pass init")
    mid = order.gather(-1, (live.sum(-1, keepdim=True) // 2))
    d = p - p.gather(1, mid.unsqueeze(-1).expand(-1, 1, 3))
    n = torch.linalg.vector_norm(d, dim=-1, keepdim=True)
    s = torch.linalg.svdvals(torch.where((n > 0) & live.unsqueeze(-1), d / torch.where(n > 0, n, 1.0), 0.0))
    spread = s[:, 1] / s[:, 0].clamp(min=torch.finfo(s.dtype).tiny)
    line = spread <= COPLANAR
    if bool(line.any()):
        raise InputError(f"p3d: the pose needs points (of nonzero weight) not all on one line, got points "
                         f"whose directions from a middle one spread {float(spread[line].max()):.1e} off a "
                         f"line for {shown_indices(line)}; pass init")


def _distinct_points(p, live):
    """The number of distinct points among those ``live``, (B,), and the order that sorts
    them by a generic key (the live ones first)."""
    key = (p @ generic_vector(3, p.dtype, p.device)).masked_fill(~live, math.inf)  # generic: distinct keys
    key, order = key.sort(-1)
    fresh = torch.cat([key[:, :1] < math.inf, (key[:, 1:] != key[:, :-1]) & (key[:, 1:] < math.inf)], -1)
    return fresh.sum(-1), order
