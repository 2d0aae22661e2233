"""Batched linear solvers for the KKT systems of implicit differentiation.

Each solver maps ``(hvp, A, inactive, v)`` to ``(w, mu)``, the solution of

.. math::

    \\begin{bmatrix} H & A^\\top \\\\ A & 0 \\end{bmatrix}
    \\begin{bmatrix} w \\\\ \\mu \\end{bmatrix}
    = \\begin{bmatrix} v \\\\ 0 \\end{bmatrix}

for every batch element, with ``H`` given only through Hessian–vector products:
:func:`solve_kkt_dense` forms the (small) matrix and factorises it,
:func:`solve_kkt_cg` runs projected conjugate gradients. :func:`resolve_linear_solver`
is the one place where ``"auto"`` chooses between them.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import torch

from .._checks import check_choice
from ..errors import GradientWarning

__all__ = ["solve_kkt_dense", "solve_kkt_cg", "resolve_linear_solver", "LINEAR_SOLVERS",
           "HVP", "LinearSolver", "shown_indices"]

Tensor = torch.Tensor
#: ``hvp(D)`` maps directions ``D`` of shape ``(k, B, m)`` to ``H_b d`` of the same shape.
HVP = Callable[[Tensor], Tensor]
#: ``solver(hvp, A, inactive, v) -> (w, mu)``; see :func:`solve_kkt_dense`.
LinearSolver = Callable[[HVP, "Tensor | None", "Tensor | None", Tensor], "tuple[Tensor, Tensor | None]"]

#: Names accepted for ``linear_solver``.
LINEAR_SOLVERS = ("auto", "dense", "cg")

_MAX_INDICES_SHOWN = 8


def shown_indices(mask: Tensor) -> str:
    """Format the first few flat batch indices where ``mask`` is true (one host sync)."""
    idx = torch.nonzero(mask).flatten()
    shown = idx[:_MAX_INDICES_SHOWN].tolist()
    more = ", ..." if idx.numel() > _MAX_INDICES_SHOWN else ""
    return f"{idx.numel()} of {mask.numel()} batch element(s) (flat indices {shown}{more})"


def _symmetric_pinv_solve(
    K: Tensor, rhs: Tensor, rcond: float | None = None
) -> tuple[Tensor, Tensor]:
    """Solve ``K s = rhs`` for a batch of symmetric ``K`` with the pseudo-inverse.

    One eigendecomposition serves both as the solve and as the singularity test, so a
    singular element gets the minimum-norm least-squares solution instead of Inf/NaN.
    Returns the solution ``(B, N)`` and a ``(B,)`` mask of the singular elements.
    """
    n = K.shape[-1]
    K = 0.5 * (K + K.transpose(-1, -2))
    evals, evecs = torch.linalg.eigh(K)
    if rcond is None:
        rcond = n * torch.finfo(K.dtype).eps
    scale = evals.abs().amax(dim=-1, keepdim=True)
    keep = evals.abs() > rcond * scale
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), 0.0)
    coeff = (evecs.transpose(-1, -2) @ rhs.unsqueeze(-1)).squeeze(-1) * inv
    sol = (evecs @ coeff.unsqueeze(-1)).squeeze(-1)
    return sol, ~keep.all(dim=-1)


def solve_kkt_dense(
    hvp: HVP,
    A: Tensor | None,
    inactive: Tensor | None,
    v: Tensor,
    *,
    rcond: float | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Solve the batched KKT system by building it densely from Hessian-vector products.

    For each batch element :math:`b` this solves

    .. math::

        \\begin{bmatrix} H_b & A_b^\\top \\\\ A_b & D_b \\end{bmatrix}
        \\begin{bmatrix} w_b \\\\ \\mu_b \\end{bmatrix}
        = \\begin{bmatrix} v_b \\\\ 0 \\end{bmatrix},

    where :math:`H_b` is the Hessian of the Lagrangian in :math:`y`, :math:`A_b` the
    Jacobian of the active constraints (inactive rows zeroed) and :math:`D_b` the
    diagonal with ones on inactive constraints, which pins their :math:`\\mu` to zero.
    :math:`H_b` is assembled from ``m`` Hessian-vector products done in one batched
    autograd call. The solve uses an eigendecomposition of the symmetric KKT matrix:
    where it is singular (relative eigenvalue below ``rcond``) the pseudo-inverse
    (minimum-norm least-squares) solution is used and a
    :class:`~convexddn.errors.GradientWarning` is issued (Gould et al. §4.7.4).

    Args:
        hvp: maps directions ``(k, B, m)`` to Hessian-vector products ``(k, B, m)``.
        A: active-constraint Jacobian ``(B, r, m)`` with inactive rows zero, or ``None``.
        inactive: ``(B, r)`` bool mask of dropped inequality constraints, or ``None``.
        v: right-hand side ``(B, m)`` (the incoming gradient).
        rcond: relative eigenvalue cut-off for singularity. Default
            ``(m + r) * finfo(dtype).eps``.

    Returns:
        ``(w, mu)`` with shapes ``(B, m)`` and ``(B, r)`` (``mu`` is ``None`` without
        constraints).

    Shape:
        Cost ``O(B (m + r)^3)`` time and ``O(B (m + r)^2)`` memory, so meant for small
        ``m + r`` (the ``"auto"`` choice uses it up to 64).

    Warns:
        GradientWarning: when the KKT matrix is singular for some batch elements. Checking
        this costs one host synchronisation per call.

    References:
        Gould, Hartley & Campbell, "Deep Declarative Networks", TPAMI 2021, Prop. 4.5,
        §4.7.4 and §6.1.
    """
    w, mu, singular = _dense_kkt(hvp, A, inactive, v, rcond)
    if bool(singular.any()):
        warnings.warn(
            "the Hessian of the Lagrangian (or the KKT matrix with the active "
            f"constraints) is singular or not finite for {shown_indices(singular)}; the "
            "gradient uses the pseudo-inverse (least-squares) solution, zero where the "
            "matrix is not finite (Gould et al. 2021, §4.7.4)",
            GradientWarning,
            stacklevel=3,
        )
    return w, mu


def _dense_kkt(
    hvp: HVP,
    A: Tensor | None,
    inactive: Tensor | None,
    v: Tensor,
    rcond: float | None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """:func:`solve_kkt_dense` without the warning; also returns the singular mask."""
    batch, m = v.shape
    basis = torch.eye(m, dtype=v.dtype, device=v.device).unsqueeze(1).expand(m, batch, m)
    # hvp(e_j)[j, b, :] is column j of H_b.
    H = hvp(basis).permute(1, 2, 0)
    if A is None:
        K, rhs = H, v
    else:
        r = A.shape[1]
        pin = torch.diag_embed(inactive.to(v.dtype)) if inactive is not None else (
            v.new_zeros(batch, r, r)
        )
        K = torch.cat(
            [torch.cat([H, A.transpose(1, 2)], dim=2), torch.cat([A, pin], dim=2)], dim=1
        )
        rhs = torch.cat([v, v.new_zeros(batch, r)], dim=1)
    # A NaN/Inf Hessian (e.g. from sqrt at 0 in the objective) would make eigh fail for
    # the whole batch; such elements get a zero solution and are reported as singular.
    finite = torch.isfinite(K).all(dim=-1).all(dim=-1) & torch.isfinite(rhs).all(dim=-1)
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    K = torch.where(finite[:, None, None], K, eye)
    rhs = torch.where(finite[:, None], rhs, 0.0)
    sol, singular = _symmetric_pinv_solve(K, rhs, rcond)
    singular = singular | ~finite
    if A is None:
        return sol, None, singular
    return sol[:, :m], sol[:, m:], singular


def _default_cg_tol(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-5


def _batched_cg(
    hvp: HVP, R: Tensor, tol: float, max_iter: int, check_every: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Conjugate gradients on ``H_b z = r_kb`` for every system of ``R`` ``(k, B, m)``.

    Systems that converge or break down (non-positive curvature) are frozen in place
    while the others go on. Returns the iterates, the converged mask ``(k, B)`` and the
    final relative residuals ``(k, B)``.
    """
    eps = torch.finfo(R.dtype).eps
    tiny = torch.finfo(R.dtype).tiny
    Z = torch.zeros_like(R)
    res = R.clone()
    P = res.clone()
    rs = (res * res).sum(-1, keepdim=True)
    b2 = rs.clone()
    thresh = (tol * tol) * b2
    done = rs <= thresh
    broken = torch.zeros_like(done)
    curv = torch.zeros_like(rs)
    for it in range(max_iter):
        HP = hvp(P)
        pp = (P * P).sum(-1, keepdim=True)
        pHp = (P * HP).sum(-1, keepdim=True)
        curv = torch.maximum(curv, pHp / pp.clamp_min(tiny))
        running = ~(done | broken)
        # A direction with (numerically) no positive curvature means H is singular or
        # indefinite on it: stop that system at its current iterate instead of dividing.
        bad = running & (pHp <= 100 * eps * curv * pp)
        step = running & ~bad
        alpha = torch.where(step, rs / torch.where(step, pHp, torch.ones_like(pHp)), 0.0)
        Z = Z + alpha * P
        res = res - alpha * HP
        rs_new = (res * res).sum(-1, keepdim=True)
        beta = torch.where(step, rs_new / rs.clamp_min(tiny), 0.0)
        P = torch.where(step, res + beta * P, P)
        rs = torch.where(step, rs_new, rs)
        broken = broken | bad
        done = done | (step & (rs_new <= thresh))
        # Convergence is tested only every few iterations to limit host syncs.
        if (it + 1) % check_every == 0 and bool((done | broken).all()):
            break
    rel = (rs / b2.clamp_min(tiny)).sqrt().squeeze(-1)
    return Z, done.squeeze(-1), rel


def solve_kkt_cg(
    hvp: HVP,
    A: Tensor | None,
    inactive: Tensor | None,
    v: Tensor,
    *,
    tol: float | None = None,
    max_iter: int | None = None,
    check_every: int = 10,
    rcond: float | None = None,
    dense_fallback_max: int = 256,
) -> tuple[Tensor, Tensor | None]:
    """Solve the batched KKT system matrix-free with conjugate gradients.

    Same system as :func:`solve_kkt_dense`. Without constraints it runs batched CG on
    :math:`H_b w_b = v_b` using only Hessian-vector products. With ``r`` constraints it
    eliminates :math:`w` through the Schur complement:

    .. math::

        (A H^{-1} A^\\top + D)\\,\\mu = A H^{-1} v, \\qquad
        w = H^{-1} v - H^{-1} A^\\top \\mu,

    with CG run on the ``r + 1`` right-hand sides :math:`[v, A^\\top]` at once and the
    small ``r × r`` system solved densely. This needs :math:`H` (the Hessian of the
    Lagrangian) positive definite, which is stricter than the dense path, where
    :math:`H` need only be positive definite on the null space of :math:`A`. Started at
    zero, CG on a singular positive semi-definite :math:`H` with a consistent right-hand
    side converges to the minimum-norm (pseudo-inverse) solution.

    Args:
        hvp: maps directions ``(k, B, m)`` to Hessian-vector products ``(k, B, m)``.
        A: active-constraint Jacobian ``(B, r, m)`` with inactive rows zero, or ``None``.
        inactive: ``(B, r)`` bool mask of dropped inequality constraints, or ``None``.
        v: right-hand side ``(B, m)``.
        tol: relative residual at which a system counts as solved. Default ``1e-10`` for
            float64 and ``1e-5`` otherwise.
        max_iter: iteration cap. Default ``10 * m``.
        check_every: iterations between convergence tests (each one host sync).
            Default ``10``.
        rcond: cut-off for the dense Schur-complement solve; see :func:`solve_kkt_dense`.
        dense_fallback_max: when CG fails for some batch elements and ``m + r`` is at
            most this, the whole KKT system is rebuilt densely and those elements get
            the pseudo-inverse solution of :func:`solve_kkt_dense`. Default ``256``.

    Returns:
        ``(w, mu)`` with shapes ``(B, m)`` and ``(B, r)`` (``mu`` is ``None`` without
        constraints).

    Warns:
        GradientWarning: when CG did not reach ``tol`` (singular, indefinite or badly
        conditioned :math:`H`) or the Schur complement is singular; the affected
        elements get the dense pseudo-inverse solution, or past ``dense_fallback_max``
        the last CG iterate, which is always finite.

    References:
        Gould, Hartley & Campbell, "Deep Declarative Networks", TPAMI 2021, Prop. 4.5
        and §6.1.
    """
    batch, m = v.shape
    if tol is None:
        tol = _default_cg_tol(v.dtype)
    if max_iter is None:
        max_iter = 10 * m
    R = v.unsqueeze(0) if A is None else torch.cat([v.unsqueeze(0), A.transpose(0, 1)], 0)
    Z, converged, rel = _batched_cg(hvp, R, tol, max_iter, check_every)
    if A is None:
        w, mu = Z[0], None
    else:
        ZA = Z[1:]
        S = torch.einsum("bim,jbm->bij", A, ZA)
        if inactive is not None:
            S = S + torch.diag_embed(inactive.to(v.dtype))
        mu, singular = _symmetric_pinv_solve(S, torch.einsum("bim,bm->bi", A, Z[0]), rcond)
        # A singular Schur complement is handled like a CG failure: dense pinv if allowed.
        converged = converged & ~singular.unsqueeze(0)
        w = Z[0] - torch.einsum("jbm,bj->bm", ZA, mu)
    failed = ~converged.all(dim=0)
    if bool(failed.any()):
        what = (
            f"conjugate gradients did not reach tol={tol:g} (worst relative residual "
            f"{float(rel.amax()):.2e}) or the active constraints are dependent for "
            f"{shown_indices(failed)}; the Hessian may be singular or indefinite"
        )
        size = m + (0 if A is None else A.shape[1])
        if size <= dense_fallback_max:
            w_d, mu_d, _ = _dense_kkt(hvp, A, inactive, v, rcond)
            w = torch.where(failed.unsqueeze(-1), w_d, w)
            if mu is not None:
                mu = torch.where(failed.unsqueeze(-1), mu_d, mu)
            how = "those elements use the dense pseudo-inverse (least-squares) solution"
        else:
            how = (
                f"m + r = {size} exceeds dense_fallback_max={dense_fallback_max}, so "
                "those elements use the last (finite) CG iterate"
            )
        warnings.warn(
            f"{what}; {how} (Gould et al. 2021, §4.7.4)", GradientWarning, stacklevel=3
        )
    return w, mu


def resolve_linear_solver(linear_solver: str | LinearSolver, size: int, dense_max: int,
                          cg_options: dict[str, Any] | None = None) -> LinearSolver:
    """The solver for a KKT system of ``size = m + p + q`` unknowns.

    ``"dense"``, ``"cg"`` (with ``cg_options`` such as ``tol`` and ``max_iter``), or
    ``"auto"``: dense up to ``dense_max`` unknowns, CG above. A callable is returned as is.

    Raises:
        OptionError: an unknown name.
    """
    if callable(linear_solver):
        return linear_solver
    check_choice("linear_solver", linear_solver, LINEAR_SOLVERS)
    if linear_solver == "dense" or (linear_solver == "auto" and size <= dense_max):
        return solve_kkt_dense
    return functools.partial(solve_kkt_cg, **(cg_options or {})) if cg_options else solve_kkt_cg
