"""Geometry of the PnP node: axis-angle rotations, the reprojection objective with its
gradient and Hessian, and the checks of its inputs and of the pose (points behind the
camera, a singular Hessian). The starts are in :mod:`._pnp_starts`.

Batched torch code (CPU or CUDA); see :mod:`convexddn.nodes.pnp`.
"""
from __future__ import annotations

import math

import torch

from .._checks import check_device, check_finite, check_tensor
from .._warn import warn
from ..errors import GradientWarning, InputError, ShapeError, SolverWarning
from .dense import checked_solve
from .lagrangian import _batched_vjp
from .degeneracy import failed_indices, named_batch, shown_indices, unravel
from .pooling.penalties import Penalty

__all__ = [
    "axis_angle_to_matrix",
    "canonical_pose",
    "check_alpha_shape",
    "check_intrinsics",
    "check_pose",
    "check_start",
    "checked_inputs",
    "depths",
    "grad_hess",
    "matrix_to_axis_angle",
    "mixed_jvp",
    "objective_gradient",
    "normalised",
    "objective",
    "warn_hessian",
    "warn_holes",
]


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


def canonical_pose(theta: torch.Tensor) -> torch.Tensor:
    """``theta`` ``(B, 6)`` with its rotation vector's angle in ``[0, π]``: the same pose.

    The iterations move the rotation vector freely, and one past π names the rotation
    ``r (1 - 2π/‖r‖)`` names too (a scene's pose came back as a rotation vector of norm
    5.67 for the 0.61 of the reference's).
    """
    r = theta[:, :3]
    angle = r.norm(dim=-1, keepdim=True)
    # The angle modulo 2π, then past π reflected to 2π − angle about the opposite axis
    # (one reflection alone left a vector of norm 10 at 3.72).
    reduced = torch.remainder(angle, 2 * math.pi)
    target = torch.where(reduced > math.pi, reduced - 2 * math.pi, reduced)
    r = torch.where(angle > math.pi, r * (target / torch.where(angle > 0, angle, 1.0)), r)
    return torch.cat([r, theta[:, 3:]], -1)


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


# Below this reprojection distance (relative to alpha) the penalty is evaluated by its
# Taylor expansion φ(0) + φ''(0) z²/2, a smooth function of z² = ‖e‖²: autograd through
# ‖e‖ has no second derivative at e = 0, where noise-free data puts every residual.
# The expansion's relative error there is O((z/alpha)²) <= 1e-8.
_TAYLOR_RADIUS = 1e-4

# A point of weight 0 (padding) whose depth is at most this fraction of its largest
# camera-frame coordinate is projected from a stand-in on the optical axis: at depth 0
# its projection is NaN (a point at the origin under θ = 0), and w·φ = 0·NaN made the
# objective, its derivatives and the solve NaN (a valid init refused); near depth 0 its
# second derivatives (~1/Z³) can overflow to Inf, with 0·Inf the same. Above it, the
# projection (within 1e8 of the axis) and its derivatives are finite, so w·φ and its
# θ-derivatives are exactly 0 and the weight keeps its derivative φ.
_DEPTH_FLOOR = 1e-8


def objective(theta, p2d, p3d, w, K, a, pen: Penalty) -> torch.Tensor:
    """Σ_i w_i φ(‖π_K(R p_i + t) − q_i‖; α) per batch element, (B,); points of weight 0
    at (or near) depth 0 contribute 0 too (see ``_DEPTH_FLOOR``)."""
    X = p3d @ axis_angle_to_matrix(theta[:, :3]).mT + theta[:, None, 3:]
    hole = _holes(X, w)
    depth = torch.where(hole, 1.0, X[..., 2]).unsqueeze(-1)
    proj = torch.where(hole.unsqueeze(-1), 0.0, X[..., :2]) / depth
    if K is not None:
        proj = proj * K[:, None, :2] + K[:, None, 2:]
    e = proj - p2d
    s = (e * e).sum(-1)
    tau2 = (_TAYLOR_RADIUS * a) ** 2
    small = s < tau2
    z = torch.sqrt(torch.where(small, tau2 * torch.ones_like(s), s))
    zero = torch.zeros_like(s)
    near = pen.phi(zero, a) + 0.5 * pen.d2phi(zero, a) * s
    return (w * torch.where(small, near, pen.phi(z, a))).sum(-1)


def _holes(X, w):
    """Points of weight 0 at (or near) depth 0 in the camera frame, X (B, N, 3) -> (B, N),
    which :func:`objective` leaves out (`not >`: a NaN depth, from a non-finite θ, is a
    hole too)."""
    return (w == 0) & ~(X[..., 2].abs() > _DEPTH_FLOOR * X.abs().amax(-1))


def warn_holes(theta, p3d, w) -> None:
    """GradientWarning for the points :func:`objective` leaves out at the pose θ (weight 0,
    depth within ``_DEPTH_FLOOR`` of 0), where the gradient w.r.t. their weights is asked
    for: ∂θ/∂w_i = −H⁻¹ ∇_θ φ_i, and ∇_θ φ_i grows like 1/Z_i² as the depth Z_i → 0
    (1.6e20 at Z = 1e-6, 1.3e27 at 5e-9; undefined at 0), so the 0 returned for them is no
    derivative (it was returned silently). Their coordinates' gradients are exact: with
    w_i = 0 the objective does not depend on them."""
    X = p3d @ axis_angle_to_matrix(theta[:, :3]).mT + theta[:, None, 3:]
    hole = _holes(X, w)
    if bool(hole.any()):
        shape = named_batch(hole.shape[0])  # (the caller's batch element, as its other warnings name it)
        pairs = [[b if shape is None else unravel(b, shape), i] for b, i in hole.nonzero()[:8].tolist()]
        warn(f"pnp: the gradient w.r.t. weights of {int(hole.sum())} point(s) of weight 0 at depth 0 under the "
             f"pose (within {_DEPTH_FLOOR:g} of their largest camera-frame coordinate), [batch element, point] "
             f"{pairs}{' ...' if hole.sum() > 8 else ''}, is set to 0: the pose's derivative w.r.t. the weight of a "
             "point at depth 0 is unbounded (its projection is undefined there)", GradientWarning)


def grad_hess(theta, xs, pen, create_graph=False):
    """f, ∇f (B, 6) and the exact Hessian (B, 6, 6) by autograd on the objective."""
    with torch.enable_grad():
        th = theta.detach().requires_grad_()
        f = objective(th, *xs, pen)
        g = torch.autograd.grad(f.sum(), th, create_graph=True)[0]
        # All six Hessian rows in one vmapped backward pass (one per unit vector; one
        # pass each where vmap cannot run, e.g. under anomaly mode).
        eye = torch.eye(6, dtype=th.dtype, device=th.device).unsqueeze(1).expand(6, *g.shape)
        H = _batched_vjp(g, th, eye, create_graph)
    return f.detach(), g if create_graph else g.detach(), H.movedim(0, -2), th


def normalised(p2d: torch.Tensor, K: torch.Tensor | None) -> torch.Tensor:
    return p2d if K is None else (p2d - K[:, None, 2:]) / K[:, None, :2]


def depths(theta: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Camera-frame depth of each point under the pose θ = (r, t): (B, 6), (B, N, 3) -> (B, N)."""
    R = axis_angle_to_matrix(theta[:, :3])
    return (p @ R[:, 2].unsqueeze(-1)).squeeze(-1) + theta[:, 5:]


# --------------------------------------------------------------------------- checks


def check_intrinsics(q, K) -> None:
    """Refuse fx = 0 or fy = 0 (or one so small that p2d / f overflows): the normalised
    image points, and so the DLT start and the objective, are then undefined."""
    bad = (K[:, :2] == 0).any(-1) | ~torch.isfinite(normalised(q, K)).all(-1).all(-1)
    if bool(bad.any()):
        raise InputError(f"K must have nonzero focal lengths fx = K[..., 0] and fy = K[..., 1] with "
                         f"p2d / f finite, got {float(K[:, :2].abs().min()):g} as the smallest |f| "
                         f"({shown_indices(bad)})")


def checked_inputs(p2d, p3d, weights, K, init, alpha) -> tuple[dict, torch.Size]:
    """:func:`~.pnp.pnp`'s tensors checked (dtype, shape, device, finite values, weights
    >= 0 and not all zero): ``({name: (tensor, its number of core dims)}, batch shape)``,
    the tensors as :func:`~convexddn._checks.check_tensor` returns them (a tensor ``alpha``
    as given, checked to broadcast to the batch shape)."""
    p2d, p3d = check_tensor("p2d", p2d), check_tensor("p3d", p3d)
    if p2d.ndim < 2 or p2d.shape[-1] != 2 or p3d.ndim < 2 or p3d.shape[-1] != 3 or p2d.shape[-2] != p3d.shape[-2]:
        raise ShapeError(f"p2d must be (*, N, 2) and p3d (*, N, 3) with the same N, got shapes "
                         f"{tuple(p2d.shape)} and {tuple(p3d.shape)}")
    n = p2d.shape[-2]
    if n == 0:
        raise ShapeError(f"pnp needs at least one correspondence (N >= 1), got shapes {tuple(p2d.shape)} "
                         f"and {tuple(p3d.shape)}")
    if init is None and n < 6:
        raise ShapeError(f"pnp needs N >= 6 correspondences for its DLT start, got N={n}; pass init")
    named = {"p2d": (p2d, 2), "p3d": (p3d, 2)}
    if weights is not None:
        named["weights"] = (check_tensor("weights", weights), 1)
        if weights.ndim < 1 or weights.shape[-1] != n:
            raise ShapeError(f"weights must be (*, N) with N={n}, got shape {tuple(weights.shape)}")
    if K is not None:
        named["K"] = (check_tensor("K", K), 1)
        if K.ndim < 1 or K.shape[-1] != 4:
            raise ShapeError(f"K must be (*, 4) as (fx, fy, cx, cy), got shape {tuple(K.shape)}")
    if init is not None:
        named["init"] = (check_tensor("init", init), 1)
        if init.ndim < 1 or init.shape[-1] != 6:
            raise ShapeError(f"init must be (*, 6), got shape {tuple(init.shape)}")
    try:
        batch = torch.broadcast_shapes(*[t.shape[: t.ndim - k] for t, k in named.values()])
    except RuntimeError:
        shapes = ", ".join(f"{k} {tuple(t.shape[: t.ndim - c])}" for k, (t, c) in named.items())
        raise ShapeError(f"the batch shapes of {shapes} do not broadcast") from None
    if isinstance(alpha, torch.Tensor):
        check_alpha_shape(alpha, batch)
        named["alpha"] = (alpha, 0)
    for name, (t, _) in named.items():
        check_device(name, t, p2d, "p2d")
        check_finite(name, t)
    if weights is not None and weights.numel():
        if bool((weights < 0).any()):
            raise InputError(f"weights must be >= 0, got a minimum of {float(weights.min()):g}")
        zero = weights.sum(-1) == 0
        if bool(zero.any()):
            where = failed_indices(zero, zero.shape)
            raise InputError(f"weights must not be all zero for a problem (the pose is then undetermined): "
                             f"{len(where)} of weights' {zero.numel()} problem(s) are, at indices {where[:8]}")
    return named, batch


def check_start(bad, from_init: bool) -> None:
    """Refuse an ``init`` whose reprojection error is undefined (``bad``: a non-finite
    objective, a point of nonzero weight at depth 0: :func:`objective` leaves out those
    of weight 0); a DLT start with one (measure zero) stays unsolved."""
    if not bool(bad.any()):
        return
    if from_init:
        raise InputError(f"init must put every point at a nonzero depth (every point of nonzero weight: the "
                         f"projection divides by it), got "
                         f"a non-finite reprojection error at init for {shown_indices(bad)}")
    warn(f"pnp: the DLT start puts a point of nonzero weight at depth 0 for {shown_indices(bad)}; the "
         "start is returned unsolved (pass init)", SolverWarning)


def check_pose(theta, H, p3d, w) -> None:
    """SolverWarnings for a pose that is no answer: points of nonzero weight at or behind
    the camera (a spurious minimum: the projection cannot tell depth z from −z), or a
    minimiser that is not isolated (Hessian singular to working precision: too few
    points or inliers, collinear or coincident points)."""
    n_behind = ((depths(theta, p3d) <= 0) & (w > 0)).sum(-1)
    behind = n_behind > 0
    if bool(behind.any()):
        counts = n_behind[behind][:8].tolist()
        warn(f"pnp: the pose puts points at or behind the camera (depth <= 0) for {shown_indices(behind)}, "
             f"{counts} of {p3d.shape[-2]} point(s) each: a spurious minimum (e.g. from gross outliers or "
             "a poor start); pass init", SolverWarning)
    # A negative eigenvalue beyond H's rounding: the solve stopped at a saddle (or a
    # maximum), where the gradient vanishes too.
    ev = torch.linalg.eigvalsh(torch.where(torch.isfinite(H), H, 0.0))
    saddle = ev[:, 0] < -64 * torch.finfo(H.dtype).eps * ev.abs().amax(-1)
    if bool(saddle.any()):
        warn(f"pnp: the pose is a saddle point of the objective, not a minimum, for {shown_indices(saddle)} "
             "(its Hessian has a negative eigenvalue); pass init", SolverWarning)
    singular = checked_solve(H, torch.zeros_like(theta))[1]
    if bool(singular.any()):
        warn(f"pnp: the pose is not unique for {shown_indices(singular)} (the Hessian of the objective "
             "is singular there: fewer than 3 points or inliers, or collinear or coincident points); "
             "the returned pose is one of many", SolverWarning)


def check_alpha_shape(alpha: torch.Tensor, batch: torch.Size) -> None:
    """A tensor alpha broadcasts *to* the batch shape: one that enlarged it would solve
    every problem once per alpha and return more poses than problems."""
    try:
        fits = torch.broadcast_shapes(batch, alpha.shape) == batch
    except RuntimeError:
        fits = False
    if not fits:
        raise ShapeError(f"alpha must broadcast to the batch shape {tuple(batch)} of the other inputs, "
                         f"got shape {tuple(alpha.shape)}")


def warn_hessian(singular: torch.Tensor, ill: torch.Tensor, cond: torch.Tensor) -> None:
    """The backward's GradientWarnings for Hessians singular (gradient set to zero) or
    ill-conditioned at the solution, from :func:`~.dense.checked_solve`'s masks."""
    if bool(singular.any()):
        warn(f"pnp: the Hessian at the solution is singular for {shown_indices(singular)}: the pose "
             "is not locally unique, so its derivative does not exist; their gradient is set to zero",
             GradientWarning)
    if bool(ill.any()):
        warn(f"pnp: the Hessian at the solution is ill-conditioned (condition number up to "
             f"{float(torch.where(ill, cond, 0).amax()):.1e}) for {shown_indices(ill)}: the pose is "
             "close to non-unique and the gradient is very sensitive to the data", GradientWarning)


def objective_gradient(theta, xs, need, pen):
    """``(inputs, ∇_θf)``: detached copies of ``xs`` that require grad where ``need``
    says, and the objective's gradient at θ as a graph over them (call with grad
    enabled): the backward's and :func:`mixed_jvp`'s mixed derivatives both start here."""
    if need[2]:
        warn_holes(theta, xs[1], xs[2])
    args = [None if t is None else t.detach().requires_grad_(n) for t, n in zip(xs, need)]
    th = theta.detach().requires_grad_()
    return args, torch.autograd.grad(objective(th, *args, pen).sum(), th, create_graph=True)[0]


def mixed_jvp(xs, theta, moving, tangents, pen):
    """J dx with J = ∂∇_θf/∂x (inputs ``moving``, tangents dx), or None where they do
    not enter ∇_θf. Inside torch.func transforms by torch.func; under a dual level
    (``torch.autograd.forward_ad``, where forward mode cannot nest) by reverse mode
    twice: J dx = ∂/∂u ⟨Jᵀu, dx⟩, Jᵀu being linear in u."""
    if torch._C._are_functorch_transforms_active():
        if 2 in moving:  # (the other branch warns in objective_gradient)
            warn_holes(theta, xs[1], xs[2])
        def grad_theta(*moved):
            args = list(xs)
            for i, t in zip(moving, moved):
                args[i] = t
            return torch.func.grad(lambda th: objective(th, *args, pen).sum())(theta)

        # torch.func.jvp makes each primal a dual tensor, which torch refuses for one whose
        # elements share memory: an input broadcast to the batch (a K of shape (4,), a 0-d
        # alpha), which torch.func hands in with a zero tangent all the same.
        return torch.func.jvp(grad_theta, tuple(_own_memory(xs[i]) for i in moving),
                              tuple(_own_memory(tangents[i]) for i in moving))[1]
    with torch.enable_grad():
        args, gf = objective_gradient(theta, xs, [i in moving for i in range(len(xs))], pen)
        u = torch.zeros_like(gf, requires_grad=True)
        jtu = torch.autograd.grad(gf, [args[i] for i in moving], u, create_graph=True, allow_unused=True)
        inner = [(j * tangents[i]).sum() for j, i in zip(jtu, moving) if j is not None]
        if not inner:
            return None
        return torch.autograd.grad(sum(inner), u, allow_unused=True)[0].detach()


def _own_memory(t):
    """``t``, copied where its elements share memory (a stride 0 over a dimension of more
    than one element, as ``expand`` leaves it); otherwise itself, uncopied."""
    shared = any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape))
    return t.contiguous() if shared else t
