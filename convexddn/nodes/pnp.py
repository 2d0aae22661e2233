"""Perspective-n-point: camera pose from 2-D/3-D correspondences, a declarative node.

.. math::

    \\theta(q, p, w, K) \\in \\operatorname*{argmin}_{\\theta = (r, t) \\in \\mathbb{R}^6}
        \\sum_{i=1}^{N} w_i\\, \\phi\\big(\\|\\pi_K(R(r)\\, p_i + t) - q_i\\|_2; \\alpha\\big)

with :math:`R(r)` the rotation of the axis-angle vector :math:`r` (Rodrigues),
:math:`\\pi_K(X) = (f_x X_1/X_3 + c_x,\\ f_y X_2/X_3 + c_y)` the pinhole projection and
:math:`\\phi` one of the robust penalties of :class:`~convexddn.RobustPool` applied to the
reprojection distance (``quadratic``: least-squares reprojection error; ``huber``: the
reference's ``reproj_huber``).

Forward: a batched direct linear transform (DLT) start (for nearly planar or distant
scenes also the plane's homography and its affine pose pair, the best pose kept), then
damped Newton (Levenberg–Marquardt on the exact 6×6 Hessian, shifted to be positive
definite, each step accepted only if it lowers the objective), all batch elements at
once (those still running, once half have finished), in float64.

Backward (Gould et al. Prop. 4.4, §6.1):
:math:`v = H^{-1} \\bar\\theta` with the exact 6×6 Hessian at the solution, then
:math:`\\bar x = -\\partial_x (\\nabla_\\theta f \\cdot v)` for each input x by one autograd
call on the objective; no solver iteration is differentiated.

Public names: :func:`pnp`, :class:`PnP`.

References:
    S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks", IEEE TPAMI 2021.
    D. Campbell, L. Liu and S. Gould, "Solving the Blind Perspective-n-Point Problem
    End-To-End With Robust Differentiable Geometric Optimization", ECCV 2020.
    R. Hartley and A. Zisserman, "Multiple View Geometry", 2nd ed., §7.1 (DLT), §8.8
    (pose from a plane's homography); Collins & Bartoli, IJCV 2014 (IPPE, the planar pair).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .._autograd import bind_fast, may_carry_tangents, outside_compile, plain, refuse_batched, refuse_transforms
from .._anchor import graph_anchor
from .._first_order import first_order, first_order_jvp
from .._checks import building, check_scale, check_stopping
from .._pow2 import pow2_round
from ._pnp_geometry import (
    axis_angle_to_matrix,
    canonical_pose,
    check_intrinsics,
    check_pose,
    check_start,
    checked_inputs,
    grad_hess,
    mixed_jvp,
    objective,
    objective_gradient,
    warn_hessian,
)
from ._pnp_solvers import from_starts, solve, warn_unfinished
from ._pnp_stationarity import warn_stationarity
from ._pnp_starts import check_dlt_points
from ._repr import format_option
from ._module_options import store_option
from ._overflow import narrowed, widened
from .degeneracy import in_saved_batch, named_batch, naming_batch
from .dense import checked_solve
from .optimality import default_solution_tol
from .pooling.penalties import Penalty, format_penalty

__all__ = ["pnp", "PnP", "axis_angle_to_matrix"]

# Everything runs in float64 (a 6-parameter problem: the cost is in the N points, and
# float32 reprojection errors cannot resolve the pose to much better than 1e-4).
_WORK = torch.float64
# On the step, relative to 1 + max|θ|: f = Σ w φ resolves a step only down to about
# sqrt(eps·f/‖H‖) ~ 1e-9, and the quadratic convergence of Newton's method leaves an
# error of order (last step)² anyway.
_DEFAULT_TOL = 1e-8
_DEFAULT_MAX_ITER = 100


# --------------------------------------------------------------------------- node


@bind_fast
class _PnPFunction(torch.autograd.Function):
    """θ = argmin_θ Σ w_i φ(‖π(R p_i + t) − q_i‖) for (B, N, ·) inputs -> (B, 6)."""

    @staticmethod
    def forward(p2d, p3d, w, K, alpha, init, pen, tol, max_iter, level):  # type: ignore[override]
        """``(θ (B, 6), H (B, 6, 6), ∇_θf (B, 6))``: the pose, the Hessian and the objective's gradient
        there (kept for the backward; ``level``: the stationarity it needs, :mod:`._pnp_stationarity`)."""
        if p2d.shape[0] == 0:  # through apply all the same: the output stays in the graph
            return p2d.new_zeros(0, 6), p2d.new_zeros(0, 6, 6), p2d.new_zeros(0, 6)
        xs = (p2d, p3d, w, K, alpha)
        if init is None:
            theta = from_starts(xs, pen, tol, max_iter)
        else:
            check_start(~torch.isfinite(objective(init, *xs, pen)), True)
            theta, unfinished = solve(init, xs, pen, tol, max_iter)
            warn_unfinished(unfinished, tol, max_iter)
        theta = canonical_pose(theta)
        # The Hessian at the pose itself: at the last iterate but one, a rank-deficient
        # one still has eigenvalues of the order of that iterate's distance.
        _, g, H, _ = grad_hess(theta, xs, pen)
        check_pose(theta, H, p3d, w)
        return theta, H, g

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        p2d, p3d, w, K, alpha = inputs[:5]
        theta, H, g = output
        ctx.mark_non_differentiable(H, g)
        ctx.save_for_backward(p2d, p3d, w, K, alpha, theta, H, g)
        ctx.save_for_forward(p2d, p3d, w, K, alpha, theta, H, g)
        ctx.pen, ctx.tol, ctx.level = inputs[6], inputs[7], inputs[9]
        ctx.anchors = graph_anchor(p2d, p3d, w, K, alpha)  # (their graph, not them: see first_order)
        ctx.named_batch = named_batch(theta.shape[0])  # (pnp's batch shape: the backward's warnings name it)

    @staticmethod
    @first_order_jvp("pnp")
    @in_saved_batch
    def jvp(ctx, *tangents):  # type: ignore[override]
        """Forward mode: dθ = −H⁻¹ (∂∇_θf/∂x · dx), the optimality condition ∇_θf = 0
        differentiated along the tangents dx of the inputs (the backward's system, H
        symmetric; singular elements get 0 and the backward's warning)."""
        p2d, p3d, w, K, alpha, theta, H, g = ctx.saved_tensors
        if theta.shape[0] == 0:
            return theta.new_zeros(theta.shape), None, None
        xs = (p2d, p3d, w, K, alpha)
        moving = [i for i, t in enumerate(tangents[:5]) if t is not None and xs[i] is not None]
        if not moving:
            return torch.zeros_like(theta), None, None
        Bdx = mixed_jvp(xs, theta, moving, tangents, ctx.pen)
        if Bdx is None:  # the moving inputs do not enter the optimality condition
            return torch.zeros_like(theta), None, None
        v, singular, ill, cond = checked_solve(H, Bdx)
        warn_hessian(singular, ill, cond)
        warn_stationarity(theta, g, H, singular, ctx.level, ctx.tol)
        return -v, None, None

    @staticmethod
    @first_order("pnp")
    @in_saved_batch
    def backward(ctx, g_theta, _g_hessian, _g_gradient):  # type: ignore[override]
        refuse_batched("pnp", g_theta)  # (its Hessian checks read on the host)
        p2d, p3d, w, K, alpha, theta, H, g = ctx.saved_tensors
        need = ctx.needs_input_grad[:5]
        if theta.shape[0] == 0:
            return (*[torch.zeros_like(t) if n else None for t, n in zip((p2d, p3d, w, K, alpha), need)],
                    None, None, None, None, None)
        # Scale-aware singularity test: rounding keeps a singular H (too few points or
        # inliers, collinear points) from being exactly singular, where solve_ex reports
        # nothing and returns an arbitrary finite v. Singular elements get v = 0.
        v, singular, ill, cond = checked_solve(H, g_theta)
        warn_hessian(singular, ill, cond)
        # The derivative of ∇_θf = 0 is that of the returned pose only where it holds (a loose tol).
        warn_stationarity(theta, g, H, singular, ctx.level, ctx.tol)
        with torch.enable_grad():
            xs, gf = objective_gradient(theta, (p2d, p3d, w, K, alpha), need, ctx.pen)
            wanted = [t for t, n in zip(xs, need) if n]
            got = iter(torch.autograd.grad((gf * v).sum(), wanted, allow_unused=True)) if wanted else iter(())
        out = []
        for t, n in zip(xs, need):
            gr = next(got) if n else None
            out.append(None if not n else (torch.zeros_like(t) if gr is None else -gr))
        return (*out, None, None, None, None, None)


def _check_options(penalty: Any, alpha: Any, tol: Any, max_iter: Any) -> tuple[Penalty, Any]:
    pen = Penalty.resolve(penalty)
    alpha = check_scale("alpha", alpha)  # (a tensor as check_tensor returns it)
    check_stopping(tol, max_iter)
    return pen, alpha


def pnp(
    p2d: torch.Tensor,
    p3d: torch.Tensor,
    weights: torch.Tensor | None = None,
    K: torch.Tensor | None = None,
    *,
    penalty: str | Penalty = "quadratic",
    alpha: float | torch.Tensor = 1.0,
    init: torch.Tensor | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
) -> torch.Tensor:
    r"""Camera pose from 2-D/3-D correspondences by robust reprojection error.

    .. math::

        \theta = (r, t) \in \operatorname*{argmin}_{r, t}
            \sum_i w_i\, \phi\big(\|\pi_K(R(r) p_i + t) - q_i\|_2; \alpha\big)

    Forward: a weighted DLT start (needs N >= 6 distinct points of nonzero weight not all
    on one line; else pass ``init``), then Levenberg–Marquardt on the exact 6×6 Hessian,
    each step kept only if it lowers the objective, until the step and the undamped
    Newton step are below ``tol``; a nonconvex penalty (Welsch, truncated quadratic)
    first solves the Huber problem of the same ``alpha`` from the DLT start (on clean
    data that start can leave every residual on Welsch's flat tail). Nearly planar
    scenes (off their plane by under a tenth of their extent: a checkerboard) and
    distant ones (normalised image points within 0.1 RMS of their centroid) are also
    solved from the best-fit plane's homography (the only start for coplanar points) and
    its affine part's two mirror-image poses (IPPE), keeping the pose with all points in
    front and the lowest objective. The result is a local minimiser: with gross outliers
    the DLT start (a least-squares fit) can lie outside the basin of the robust minimum,
    so pass ``init`` (e.g. from RANSAC) in that case. The scene's units do not matter:
    :math:`\theta(q, s\,p) = (r, s\,t)` exactly (the solve runs in units of a power of
    two near each scene's extent).

    Backward: :math:`v = H^{-1}\bar\theta` with :math:`H = \nabla^2_{\theta} f` at the
    solution, then :math:`\bar x = -\partial_x(\nabla_\theta f(\theta, x)^\top v)` for
    ``p2d``, ``p3d``, ``weights``, ``K`` and a tensor ``alpha`` (second derivatives of the
    objective by autograd; the solver is not differentiated). A singular :math:`H` gives
    that problem a zero gradient and a :class:`~convexddn.errors.GradientWarning`
    (singular to working precision, by :func:`~convexddn.nodes.dense.checked_solve`).

    Args:
        p2d: image points :math:`q_i`, ``(*, N, 2)`` (pixels with ``K``, else normalised).
        p3d: world points :math:`p_i`, ``(*, N, 3)``.
        weights: nonnegative :math:`w_i`, ``(*, N)``, or ``None`` for ones.
        K: intrinsics ``(*, 4)`` as ``(fx, fy, cx, cy)``, or ``None``.
        penalty: a penalty name of :class:`~convexddn.RobustPool` or a ``Penalty``.
            Default: ``"quadratic"`` (least-squares reprojection error).
        alpha: penalty scale > 0, a number or a tensor broadcastable to ``(*)``.
        init: start ``(*, 6)``, or ``None`` for the DLT.
        tol: step tolerance in (0, 1), relative to ``1 + max|θ|``. Default: 1e-8 (computations
            run in float64 whatever the input dtype; the output has the inputs' dtype).
        max_iter: Levenberg–Marquardt iterations; reaching it issues a
            :class:`~convexddn.errors.SolverWarning`. Default: 100.

    Shape:
        - Input: as above; the batch dims ``*`` broadcast against each other.
        - Output: ``(*, 6)``: axis-angle rotation ``[..., :3]`` (radians, angle in
          :math:`[0, \pi]`) and
          translation ``[..., 3:]``, mapping world to camera coordinates.

    Raises:
        DTypeError: a tensor is not floating point.
        ShapeError: mismatched shapes, N < 6 without ``init``, or a tensor ``alpha``
            that does not broadcast to the batch shape.
        NonFiniteError: an input holds NaN or Inf.
        InputError: negative weights, all-zero weights for a problem, tensors on
            different devices, ``K`` with fx or fy zero, an ``init`` that puts a point of
            nonzero weight at depth 0, or (without ``init``) fewer than 6 distinct points
            of nonzero weight or collinear ones (coincident included).
        OptionError: unknown penalty, ``alpha <= 0``, invalid ``tol`` or ``max_iter``.
        ProblemError: called under a torch.func transform other than ``jvp`` (``grad``,
            ``vmap``, ``jacrev``, ...): use torch.autograd.

    Warns:
        SolverWarning: ``max_iter`` reached; the pose puts points of nonzero weight at or
            behind the camera; the pose is not unique (singular Hessian) or a saddle
            point (a negative eigenvalue of the Hessian); the pose does not fit the
            output dtype (Inf entries).
        GradientWarning: singular or ill-conditioned Hessian in the backward; a gradient
            (or forward-mode tangent) entry beyond its dtype's range, computed in float64
            and ±Inf when cast back (names the input and the batch elements); the weight
            of a zero-weight point at depth 0 (its unbounded gradient is set to 0); a pose
            not stationary (a loose ``tol``, ``max_iter`` reached: one Newton step from it
            beyond the gradient dtype's solution tolerance), whose gradient is not its derivative.

    References:
        S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks", IEEE TPAMI 2021.
        D. Campbell, L. Liu and S. Gould, ECCV 2020 (the reference's PnP node).
    """
    # (torch.func.grad failed in the backward: "requires_grad_() ... unsupported")
    refuse_transforms("pnp", "its solver and its backward differentiate the reprojection error with torch.autograd, "
                      "which those transforms do not allow inside", "torch.autograd (backward(), torch.autograd.grad), "
                      "or torch.func.jvp / torch.autograd.forward_ad for forward mode", allowed=("Jvp",),
                      inputs=(p2d, p3d, weights, K, alpha))
    if torch.is_inference_mode_enabled():
        # The solver differentiates its objective by autograd, which inference mode
        # forbids: run it outside, on detached normal copies of the inputs (copies still
        # attached recorded a graph back to a Parameter), and return an inference tensor
        # as every other node does.
        with torch.inference_mode(False):
            c = [t.detach().clone() if isinstance(t, torch.Tensor) else t for t in (p2d, p3d, weights, K, alpha, init)]
            pose = pnp(*c[:4], penalty=penalty, alpha=c[4], init=c[5], tol=tol, max_iter=max_iter)
        return pose.clone()
    pen, alpha = _check_options(penalty, alpha, tol, max_iter)
    named, batch = checked_inputs(p2d, p3d, weights, K, init, alpha)
    (p2d, _), (p3d, _) = named["p2d"], named["p3d"]
    dtype = _WORK

    # float64 copies (an inference tensor copied first: the solve differentiates the
    # objective it enters), whose gradients go back to the inputs' dtypes through one
    # checked cast: a float16 p3d's gradient of 1.1e5 came back as Inf there, silently.
    keys = [name for name in named if name != "init"]
    wide = dict(zip(keys, widened("pnp", [(name, plain(named[name][0]), named[name][1]) for name in keys])))

    def flat(t, k):
        # (a Size: expand() with no sizes, an unbatched problem's 0-d alpha, is an error)
        return t.expand(torch.Size((*batch, *t.shape[t.ndim - k:]))).reshape(-1, *t.shape[t.ndim - k:])

    q, p = flat(wide["p2d"], 2), flat(wide["p3d"], 2)
    w = flat(wide["weights"], 1) if weights is not None else torch.ones_like(q[..., 0])
    Kf = flat(wide["K"], 1) if K is not None else None
    if isinstance(alpha, torch.Tensor):
        a = flat(wide["alpha"], 0).unsqueeze(-1)
    else:
        a = torch.tensor(float(alpha), dtype=dtype, device=q.device)
    th0 = flat(plain(init).to(dtype), 1) if init is not None else None
    with naming_batch(batch):  # (the checks, as the solver, name the flattened problems in the caller's batch shape)
        if Kf is not None:
            check_intrinsics(q, Kf)
        if th0 is None:
            check_dlt_points(p, w)
    # θ(q, s p) = (r, s t): the projection x/z does not see the scene's scale. Solving in units of
    # a power of two near each scene's extent (exact) keeps rotation and translation steps comparable
    # in the stopping test and the damping (at 1e7 or 1e-7 scene units the rotation froze 4e-3 to
    # 0.05 rad off). The extent is the median size of the points of nonzero weight: the largest made
    # a padding point or one landmark at 1e8 the unit, the pose 1e-2 off, silently.
    size = p.detach().abs().amax(-1).masked_fill(w.detach() <= 0, math.nan).nanmedian(-1).values
    unit = pow2_round(torch.where(size > 0, size, p.detach().abs().amax((1, 2))).clamp_min(torch.finfo(dtype).tiny))
    p = p / unit.view(-1, 1, 1)
    th0 = None if th0 is None else torch.cat([th0[:, :3], th0[:, 3:] / unit.view(-1, 1)], 1)
    args = (q, p, w, Kf, a, None if th0 is None else th0.detach(), pen,
            _DEFAULT_TOL if tol is None else float(tol), _DEFAULT_MAX_ITER if max_iter is None else max_iter,
            default_solution_tol(torch.promote_types(p2d.dtype, p3d.dtype)))  # (the gradient's dtype)
    # An empty batch goes through apply too, so that its output stays in the graph.
    tensors = (q, p, w, a) + (() if Kf is None else (Kf,))
    # (forward mode too: through the solver's own ops its tangents were wrong, -0.41
    # against a central difference of -0.08; the Function's jvp is the implicit one)
    grad = (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) or may_carry_tangents(*tensors)
    with naming_batch(batch):
        theta = _solve(args, grad)
    theta = torch.cat([theta[:, :3], theta[:, 3:] * unit.view(-1, 1)], 1)
    return narrowed(theta.reshape(*batch, 6), torch.promote_types(p2d.dtype, p3d.dtype), "pnp", "the pose", 1,
                    advice="pass p2d and p3d in a wider dtype, or the scene in other units")


@outside_compile  # (it takes gradients and Hessians of the objective with create_graph, which
# compiled autograd cannot trace: a graph break under torch.compile)
def _solve(args: tuple, grad: bool) -> torch.Tensor:
    return _PnPFunction.apply(*args)[0] if grad else _PnPFunction.forward(*args)[0]


class PnP(nn.Module):
    r"""Module form of :func:`pnp`: camera pose from 2-D/3-D correspondences.

    .. math::

        \theta \in \operatorname*{argmin}_{r, t} \sum_i w_i\,
            \phi\big(\|\pi_K(R(r) p_i + t) - q_i\|_2; \alpha\big)

    Args:
        penalty, alpha, tol, max_iter: see :func:`pnp` (an ``nn.Parameter`` alpha is
            learned; another tensor is stored as a buffer).

    Shape:
        - Input: ``p2d (*, N, 2)``, ``p3d (*, N, 3)``, optional ``weights (*, N)``,
          ``K (*, 4)`` and ``init (*, 6)``.
        - Output: ``(*, 6)`` (axis-angle, translation).

    Raises:
        OptionError: invalid options at construction; calls raise as :func:`pnp`.
        DTypeError: at construction, an ``alpha`` tensor that is not floating point.
    """

    @building()
    def __init__(self, penalty: str | Penalty = "quadratic", alpha: float | torch.Tensor = 1.0,
                 tol: float | None = None, max_iter: int | None = None) -> None:
        super().__init__()
        self.penalty = _check_options(penalty, alpha, tol, max_iter)[0]
        store_option(self, "alpha", alpha)
        self.tol, self.max_iter = tol, max_iter

    def forward(self, p2d: torch.Tensor, p3d: torch.Tensor, weights: torch.Tensor | None = None,
                K: torch.Tensor | None = None, init: torch.Tensor | None = None) -> torch.Tensor:
        return pnp(p2d, p3d, weights, K, penalty=self.penalty, alpha=self.alpha, init=init,
                   tol=self.tol, max_iter=self.max_iter)

    def extra_repr(self) -> str:
        parts = [f"penalty={format_penalty(self.penalty)}", f"alpha={format_option(self.alpha)}"]
        parts += [f"{k}={v}" for k, v in (("tol", self.tol), ("max_iter", self.max_iter)) if v is not None]
        return ", ".join(parts)
