"""Solvers of the PnP node: damped Newton from a start, and the choice of starts.

Batched torch code (CPU or CUDA), one host sync per iteration; see
:mod:`convexddn.nodes.pnp` for the problem and :mod:`._pnp_geometry` for the objective
and the starts.
"""
from __future__ import annotations

import torch

from .._warn import warn
from ..errors import SolverWarning
from .degeneracy import shown_indices
from .pooling.penalties import Penalty
from ._pnp_geometry import check_start, depths, grad_hess, normalised, objective
from ._pnp_starts import COPLANAR, dlt, image_spread, off_plane_spread, planar_start

__all__ = ["from_starts", "solve", "warn_unfinished"]


def solve(theta, xs, pen, tol, max_iter):
    """Damped Newton on the exact Hessian: the step solves (H + μI) δ = −∇f with μ the
    amount that makes H + μI positive definite plus a Levenberg–Marquardt damping
    λ·max|diag H| (λ shrinks after an accepted step, grows after a rejected one); a
    step is kept only if f does not rise above its rounding floor.

    Returns ``(theta, unfinished)``: the poses and a ``(B,)`` mask of those that did not
    reach ``tol`` within ``max_iter`` (for :func:`warn_unfinished`).

    The iterations run on the elements still running: once half of them or more have
    finished, the others are gathered into a smaller batch (``idx`` their indices among
    the B), so that an element taking all ``max_iter`` steps does not make the finished
    ones pay every step (one outlier scene beside 63 clean ones: 3-5x the two solved
    apart, 21-28x the clean ones alone). Elements are independent: each takes the steps it
    takes alone, up to the rounding of the autograd Hessian, which depends on the batch's
    size (1e-15; so it did before between a batch and its elements alone)."""
    B = theta.shape[0]
    out, idx = theta, None
    # λ starts small and falls tenfold per accepted step: a damping of λ·max|diag H|
    # slows convergence to a rate of about λ·cond(H), so it must vanish near the minimum.
    lam = torch.full((B,), 1e-6, dtype=theta.dtype, device=theta.device)
    eps = torch.finfo(theta.dtype).eps
    done = torch.zeros(B, dtype=torch.bool, device=theta.device)
    for it in range(max_iter):
        f, g, H, _ = grad_hess(theta, xs, pen)
        # eigh raises on a non-finite matrix: such a Hessian (a point at or near depth 0)
        # is replaced by I. A non-finite objective (only a DLT start can have one: a bad
        # init is refused, and no step to one is accepted) cannot improve: such an
        # element stays where it is (reported by _check_start).
        stuck = ~torch.isfinite(f)
        bad_h = stuck | ~(torch.isfinite(g).all(-1) & torch.isfinite(H).all(-1).all(-1))
        H = torch.where(bad_h[:, None, None], torch.eye(6, dtype=H.dtype, device=H.device), H)
        ev, Q = torch.linalg.eigh(H)
        # (relative: an absolute floor of eps made weights of 1e-28 damp every step to nothing)
        scale = ev.abs().amax(-1).clamp(min=torch.finfo(ev.dtype).tiny)
        shift = (-ev[:, 0]).clamp(min=0) + lam * scale
        gq = (Q.mT @ g.unsqueeze(-1)).squeeze(-1)
        step = -(Q @ (gq / (ev + shift.unsqueeze(-1))).unsqueeze(-1)).squeeze(-1)
        finite = torch.isfinite(step).all(-1)
        step = torch.where(finite.unsqueeze(-1), step, torch.zeros_like(step))
        f_new = objective(theta + step, *xs, pen)
        # f resolves a step only down to ~sqrt(eps·f/‖H‖): below that, where the model is
        # convex and predicts a decrease under f's rounding, the Newton step is taken
        # on the model's word (the quadratic regime, where it is exact to second order).
        pred = -(g * step).sum(-1) - 0.5 * (step * (H @ step.unsqueeze(-1)).squeeze(-1)).sum(-1)
        unresolved = (ev[:, 0] > 0) & (pred <= 1e3 * eps * f.abs())
        ok = finite & torch.isfinite(f_new) & ((f_new <= f + 8 * eps * f.abs()) | unresolved)
        # Done after a step below tol; Newton's quadratic convergence leaves an error far
        # below the last step. The undamped Newton step must be below tol too: a damping
        # that swamps H's small eigenvalues (a far landmark made λ·max|eig| 3e7 beside
        # rotation curvatures of 1) makes the step tiny far from the minimum, and 1e-2
        # rad off was returned as converged, silently.
        bound = tol * (1 + theta.abs().amax(-1))
        small = (step.abs().amax(-1) <= bound) & (_newton_length(ev, Q, gq, eps * scale) <= bound)
        # A finished element stays finished and stays put while others iterate: recomputed
        # each step, its flag flipped back where a step at f ~ 1e-32 was rejected as
        # rounding, and 16 of 64 converged scenes ran all max_iter steps and were reported
        # unfinished (each alone: none).
        move = ok & ~done
        done = done | (small & ok) | stuck
        theta = torch.where(move.unsqueeze(-1), theta + step, theta)
        lam = torch.where(ok, (lam / 10).clamp(min=1e-15), lam * 10)
        n_left = int((~done).sum())  # one host sync per Levenberg–Marquardt step
        if not n_left:
            break
        if 2 * n_left <= done.shape[0] and it < max_iter - 1:
            # Half or more have finished: store the poses, go on with the rest. Halving at
            # least, this happens at most log2(B) times; nonzero_static, of the size just
            # read, is no second sync.
            out = out.index_copy(0, idx, theta) if idx is not None else theta
            keep = (~done).nonzero_static(size=n_left).squeeze(1)
            idx = keep if idx is None else idx.index_select(0, keep)
            theta, lam, done = (t.index_select(0, keep) for t in (theta, lam, done))
            xs = tuple(_rows(t, keep) for t in xs)
    if idx is None:
        return theta, ~done
    unfinished = torch.zeros(B, dtype=torch.bool, device=theta.device).index_copy(0, idx, ~done)
    return out.index_copy(0, idx, theta), unfinished


def _rows(t, idx):
    """The elements ``idx`` of a per-element input (None, and a 0-d alpha, are shared)."""
    return t if t is None or t.dim() == 0 else t.index_select(0, idx)


def _newton_length(ev, Q, gq, flat):
    """max|H⁻¹g| along the eigen-directions where H is not flat (|ev| above ``flat``,
    eps·max|ev|: a singular Hessian is :func:`~._pnp_geometry.check_pose`'s to report);
    inf where H has a negative eigenvalue beyond that (a saddle or a maximum, no
    minimum, whatever the step)."""
    keep = ev.abs() > 8 * flat.unsqueeze(-1)
    newton = (Q @ torch.where(keep, gq / torch.where(keep, ev, 1.0), 0.0).unsqueeze(-1)).squeeze(-1)
    return torch.where((ev[:, 0] < -8 * flat), torch.inf, newton.abs().amax(-1))


def warn_unfinished(unfinished, tol, max_iter) -> None:
    """The SolverWarning for the problems ``unfinished (B,)`` that reached ``max_iter`` first."""
    if bool(unfinished.any()):
        warn(f"pnp: {shown_indices(unfinished)} did not reach tol={tol:g} within "
             f"max_iter={max_iter}; returning the last iterate", SolverWarning)


# Scenes whose points spread off their best-fit plane by less than this fraction of
# their extent are also solved from the plane's starts, and the best pose is kept: there
# the DLT's system is nearly rank-deficient, and with 1e-3 image noise its start led to
# a wrong minimum in front of the camera (relief 1e-3: objective 1.8e-2 against 8e-6,
# t_z 5.3 against 4.0) without a word.
_NEARLY_PLANAR = 0.1
# So are scenes seen under an angle (:func:`~._pnp_starts.image_spread`) below this:
# there the camera is nearly affine, the DLT's start poor and a plane's pose two-fold
# (8 points 2 units across at depth 30, relief 0.3, 0.19 off their plane: from the DLT's
# start 34x the minimum's objective, the pose 40 units off, silently; 10 points 2 units
# across at depth 15, relief 0.3: 259x).
_FAR = 0.1


def _solve_robust(theta, xs, pen, tol, max_iter):
    """:func:`solve` from ``theta``; a nonconvex penalty first solves the Huber problem of
    the same alpha from there (convex in the residuals, robust to outliers): from the
    DLT start, which can leave every residual on Welsch's flat tail (f = 14.9998 of 15 on
    clean data, focal length 4e4 px), it stopped at a saddle with one inlier, silently."""
    if not pen.convex:
        theta = solve(theta, xs, Penalty.resolve("huber"), tol, max_iter)[0]
    return solve(theta, xs, pen, tol, max_iter)


def from_starts(xs, pen, tol, max_iter):
    """The pose from the DLT start and, for nearly planar scenes or scenes seen under a
    small angle, also from the plane's three starts (:func:`~._pnp_starts.planar_start`:
    the homography's pose, which replaces the DLT's for coplanar points, and the pose
    pair of its affine part): all starts are solved as one batch, and the pose with every
    point of nonzero weight in front of the camera and the lowest objective is kept
    (ties: the first start). One host read beyond the solves'."""
    p2d, p3d, w, K, alpha = xs
    B = p3d.shape[0]
    qn = normalised(p2d, K)
    theta = dlt(qn, p3d, w)
    spread = off_plane_spread(p3d, w)
    idx = torch.nonzero((spread <= _NEARLY_PLANAR) | (image_spread(qn, w) <= _FAR)).squeeze(1)
    owner = torch.arange(B, device=p3d.device)  # the problem each start belongs to
    if idx.numel():
        pick = lambda t: _rows(t, idx)  # noqa: E731
        planes = planar_start(pick(qn), pick(p3d), pick(w))  # (k, 3, 6)
        # Coplanar points leave the DLT's start an arbitrary member of its null space:
        # the homography's pose takes its place (and is solved twice, as before).
        flat = (pick(spread) <= COPLANAR).unsqueeze(-1)
        theta = theta.index_copy(0, idx, torch.where(flat, planes[:, 0], pick(theta)))
        theta = torch.cat([theta, planes.transpose(0, 1).flatten(0, 1)])
        owner = torch.cat([owner, idx.repeat(3)])
        xs = tuple(_rows(t, owner) for t in xs)
    bad_start = ~torch.isfinite(objective(theta, *xs, pen))
    theta, unfinished = _solve_robust(theta, xs, pen, tol, max_iter)
    if owner.shape[0] > B:
        # The objective, +inf with a point of nonzero weight at or behind the camera; per
        # problem the first start of the lowest score (scatter_reduce: no host read).
        behind = ((depths(theta, xs[1]) <= 0) & (xs[2] > 0)).any(-1)
        f = objective(theta, *xs, pen)
        score = torch.where(behind | ~torch.isfinite(f), torch.inf, f)
        best = score.new_full((B,), torch.inf).scatter_reduce(0, owner, score, "amin")
        order = torch.arange(owner.shape[0], device=owner.device)
        first = torch.where(score == best[owner], order, owner.shape[0])
        keep = torch.full((B,), owner.shape[0], device=owner.device).scatter_reduce(0, owner, first, "amin")
        # What is said is said of the poses kept: a start's warnings are moot where
        # another replaced it (14 of 20 nearly planar scenes had warned).
        theta, unfinished, bad_start = theta[keep], unfinished[keep], bad_start[keep]
    check_start(bad_start, False)
    warn_unfinished(unfinished, tol, max_iter)
    return theta
