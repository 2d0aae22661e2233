"""User-defined declarative nodes and the generic implicit backward.

A declarative node computes

.. math::

    y(x) \\in \\operatorname*{argmin}_{u \\in \\mathbb{R}^m} f(x, u)
    \\quad\\text{subject to}\\quad h(x, u) = 0,\\; g(x, u) \\le 0,

by any algorithm the user likes, and differentiates the solution by the implicit
function theorem instead of by unrolling that algorithm (Gould et al. 2021, Prop. 4.4
to 4.6). Only the objective and the constraints have to be written in differentiable
torch code; the solver does not.

The backward never forms the mixed second derivative :math:`B = D^2_{XY} f` nor the
Jacobian :math:`Dy`. Following §6.1 of the paper it solves one symmetric linear system
per batch element for :math:`\\bar v` and then obtains :math:`\\bar v^\\top B` with a
single autograd vector–Jacobian product.

References:
    S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks",
    IEEE TPAMI 44(8), 2021.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, Optional, Sequence, Union

import torch

from ._checks import check_choice, check_finite, check_positive, check_tensor
from .errors import DTypeError, GradientWarning, ShapeError, SolverError

__all__ = [
    "DeclarativeNode",
    "declarative_vjp",
    "solve_kkt_dense",
    "solve_kkt_cg",
    "LINEAR_SOLVERS",
]

Tensor = torch.Tensor
#: ``hvp(D)`` maps directions ``D`` of shape ``(k, B, m)`` to ``H_b d`` of the same shape.
HVP = Callable[[Tensor], Tensor]
#: ``solver(hvp, A, inactive, v) -> (w, mu)``; see :func:`solve_kkt_dense`.
LinearSolver = Callable[
    [HVP, Optional[Tensor], Optional[Tensor], Tensor], "tuple[Tensor, Optional[Tensor]]"
]
ConstraintFn = Callable[[Tensor, Tensor], Optional[Tensor]]

#: Names accepted for ``linear_solver``.
LINEAR_SOLVERS = ("auto", "dense", "cg")

_MAX_INDICES_SHOWN = 8


# --------------------------------------------------------------------------------------
# Linear solvers for the KKT system
# --------------------------------------------------------------------------------------


def _shown_indices(mask: Tensor) -> str:
    """Format the first few flat batch indices where ``mask`` is true (one host sync)."""
    idx = torch.nonzero(mask).flatten()
    shown = idx[:_MAX_INDICES_SHOWN].tolist()
    more = ", ..." if idx.numel() > _MAX_INDICES_SHOWN else ""
    return f"{idx.numel()} of {mask.numel()} batch element(s) (flat indices {shown}{more})"


def _symmetric_pinv_solve(
    K: Tensor, rhs: Tensor, rcond: Optional[float] = None
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
    A: Optional[Tensor],
    inactive: Optional[Tensor],
    v: Tensor,
    *,
    rcond: Optional[float] = None,
) -> tuple[Tensor, Optional[Tensor]]:
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
            f"constraints) is singular or not finite for {_shown_indices(singular)}; the "
            "gradient uses the pseudo-inverse (least-squares) solution, zero where the "
            "matrix is not finite (Gould et al. 2021, §4.7.4)",
            GradientWarning,
            stacklevel=3,
        )
    return w, mu


def _dense_kkt(
    hvp: HVP,
    A: Optional[Tensor],
    inactive: Optional[Tensor],
    v: Tensor,
    rcond: Optional[float],
) -> tuple[Tensor, Optional[Tensor], Tensor]:
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
    A: Optional[Tensor],
    inactive: Optional[Tensor],
    v: Tensor,
    *,
    tol: Optional[float] = None,
    max_iter: Optional[int] = None,
    check_every: int = 10,
    rcond: Optional[float] = None,
    dense_fallback_max: int = 256,
) -> tuple[Tensor, Optional[Tensor]]:
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
            f"{_shown_indices(failed)}; the Hessian may be singular or indefinite"
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


# --------------------------------------------------------------------------------------
# The vector-Jacobian product
# --------------------------------------------------------------------------------------


def _batched_vjp(output: Tensor, inputs: Tensor, cotangents: Tensor) -> Tensor:
    """``k`` vjps of ``output`` at once: ``cotangents`` is ``(k, *output.shape)``."""
    if not output.requires_grad:
        return cotangents.new_zeros((cotangents.shape[0],) + tuple(inputs.shape))
    if cotangents.shape[0] == 1:
        (g,) = torch.autograd.grad(
            output, inputs, cotangents[0], retain_graph=True, allow_unused=True
        )
        return torch.zeros_like(inputs).unsqueeze(0) if g is None else g.unsqueeze(0)
    try:
        (g,) = torch.autograd.grad(
            output,
            inputs,
            cotangents,
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=True,
        )
    except RuntimeError:
        # Some user ops have no vmap rule; one vjp per direction is the slow, safe path.
        rows = []
        for c in cotangents:
            (gi,) = torch.autograd.grad(
                output, inputs, c, retain_graph=True, allow_unused=True
            )
            rows.append(torch.zeros_like(inputs) if gi is None else gi)
        return torch.stack(rows)
    if g is None:
        return cotangents.new_zeros((cotangents.shape[0],) + tuple(inputs.shape))
    return g


def _check_output(name: str, value: object, shape: tuple[int, ...], what: str) -> Tensor:
    if not isinstance(value, torch.Tensor):
        raise DTypeError(f"{name} must return a torch.Tensor, got {type(value).__name__}")
    if tuple(value.shape) != shape:
        raise ShapeError(f"{name} must return shape {what} = {shape}, got {tuple(value.shape)}")
    return value


def _constraint(
    name: str, fn: Optional[ConstraintFn], x: Tensor, y: Tensor
) -> Optional[Tensor]:
    if fn is None:
        return None
    c = fn(x, y)
    if c is None:
        return None
    if not isinstance(c, torch.Tensor):
        raise DTypeError(f"{name} must return a torch.Tensor or None, got {type(c).__name__}")
    if c.ndim != 2 or c.shape[0] != x.shape[0]:
        raise ShapeError(
            f"{name} must return shape (B, p) with B = {x.shape[0]}, got {tuple(c.shape)}"
        )
    return c


def _resolve_solver(linear_solver: Union[str, LinearSolver], size: int, dense_max: int):
    if callable(linear_solver):
        return linear_solver
    check_choice("linear_solver", linear_solver, LINEAR_SOLVERS)
    if linear_solver == "dense" or (linear_solver == "auto" and size <= dense_max):
        return solve_kkt_dense
    return solve_kkt_cg


def declarative_vjp(
    objective: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    grad_y: Tensor,
    *,
    equality_constraints: Optional[ConstraintFn] = None,
    inequality_constraints: Optional[ConstraintFn] = None,
    params: Sequence[Tensor] = (),
    linear_solver: Union[str, LinearSolver] = "auto",
    dense_max: int = 64,
    active_tol: float = 1e-6,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Vector–Jacobian product of a declarative node's solution, by implicit differentiation.

    ``y`` must satisfy, for every batch element, the first-order optimality conditions

    .. math::

        \\nabla_y f(x, y) + A^\\top \\lambda = 0, \\qquad c_{\\mathcal A}(x, y) = 0,

    where :math:`c_{\\mathcal A}` stacks the equality constraints and the active
    inequality constraints (those with :math:`g_j(x, y) \\ge -\\text{active\\_tol}`; the
    others are dropped, Prop. 4.6) and :math:`A = D_y c_{\\mathcal A}`. The multipliers
    are recovered from the solution as the least-squares solution of
    :math:`A^\\top \\lambda = -\\nabla_y f` (eq. 25). With the Lagrangian
    :math:`L = f + \\lambda^\\top c_{\\mathcal A}`, the returned gradient is

    .. math::

        \\bar x = -\\left(w^\\top D^2_{xy} L + \\mu^\\top D_x c_{\\mathcal A}\\right),
        \\qquad
        \\begin{bmatrix} D^2_{yy} L & A^\\top \\\\ A & 0 \\end{bmatrix}
        \\begin{bmatrix} w \\\\ \\mu \\end{bmatrix}
        = \\begin{bmatrix} \\bar y \\\\ 0 \\end{bmatrix},

    which is :math:`\\bar y^\\top Dy` of Prop. 4.4 (no constraints: :math:`w = H^{-1}\\bar
    y`, so :math:`-w` is the :math:`\\bar v` of §6.1) and Prop. 4.5. The linear
    system is solved once per batch element (§6.1) by ``linear_solver``; the product
    with :math:`D^2_{xy} L` is one autograd vjp, so neither that matrix nor :math:`Dy`
    is formed. Gradients for ``params`` (tensors the
    objective or constraints use, e.g. module parameters) come from the same vjp.

    Degenerate cases: an active inequality with a zero multiplier (no strict
    complementarity) is treated as an equality, which gives one one-sided derivative; a
    negative multiplier means ``y`` is not a KKT point and the gradient is meaningless.
    Linearly dependent active constraints or a singular Hessian give a singular system:
    the pseudo-inverse solution is used with a
    :class:`~convexddn.errors.GradientWarning`.

    Args:
        objective: ``f(x, y) -> (B,)``; each entry must depend only on its own row.
        x: input ``(B, n)``.
        y: solution ``(B, m)``.
        grad_y: incoming gradient ``(B, m)``.
        equality_constraints: ``h(x, y) -> (B, p)``, feasible where zero, or ``None``
            (the default).
        inequality_constraints: ``g(x, y) -> (B, q)``, feasible where ``<= 0``, or
            ``None`` (the default).
        params: further tensors to differentiate with respect to. Default ``()``.
        linear_solver: ``"auto"`` (default: ``"dense"`` when ``m + p + q <=
            dense_max``, else ``"cg"``), ``"dense"`` (:func:`solve_kkt_dense`),
            ``"cg"`` (:func:`solve_kkt_cg`) or a callable with the same signature.
        dense_max: size limit of the ``"auto"`` dense choice. Default ``64``.
        active_tol: inequality constraints with ``g >= -active_tol`` are active.
            Default ``1e-6``.

    Returns:
        ``(grad_x, grad_params)``: ``grad_x`` of shape ``(B, n)`` and one gradient per
        entry of ``params`` (zeros where a parameter is unused).

    Shape:
        - x: :math:`(B, n)`, y and grad_y: :math:`(B, m)`, output :math:`(B, n)`.

    Raises:
        ShapeError: if ``objective`` does not return ``(B,)`` or a constraint function
            does not return ``(B, p)``.
        DTypeError: if one of them returns something other than a tensor.
        OptionError: for an unknown ``linear_solver`` name.

    Warns:
        GradientWarning: when the linear system is singular or CG did not converge, and
            when the gradient would contain NaN or Inf (those entries are set to zero).

    .. note::
        Each call synchronises with the device a few times (singularity and finiteness
        tests, and CG convergence every ``check_every`` iterations); nothing loops over
        batch elements.

    References:
        S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks", TPAMI 2021,
        Prop. 4.4, 4.5, 4.6, eq. 25, §4.7.4 and §6.1.
    """
    check_positive("dense_max", dense_max)
    params = tuple(params)
    batch, m = y.shape
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        yg = y.detach().requires_grad_(True)
        f = _check_output("objective", objective(xg, yg), (batch,), "(B,)")
        eq = _constraint("equality_constraints", equality_constraints, xg, yg)
        ineq = _constraint("inequality_constraints", inequality_constraints, xg, yg)
        parts = [c for c in (eq, ineq) if c is not None]
        solver = _resolve_solver(
            linear_solver, m + sum(c.shape[1] for c in parts), int(dense_max)
        )
        if parts:
            c = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            r = c.shape[1]
            inactive = torch.zeros(batch, r, dtype=torch.bool, device=y.device)
            if ineq is not None:
                inactive[:, r - ineq.shape[1]:] = ineq.detach() < -active_tol
            eye_r = torch.eye(r, dtype=y.dtype, device=y.device)
            A = _batched_vjp(c, yg, eye_r.unsqueeze(1).expand(r, batch, r)).transpose(0, 1)
            A = A.masked_fill(inactive.unsqueeze(-1), 0.0)
            (gf,) = _grads(f.sum(), yg, create_graph=False)
            # eq. 25: the multipliers that best satisfy stationarity at the given y.
            lam = -(torch.linalg.pinv(A.transpose(1, 2)) @ gf.unsqueeze(-1)).squeeze(-1)
            lagrangian = f.sum() + (lam * c).sum()
        else:
            c, A, inactive = None, None, None
            lagrangian = f.sum()
        (gL,) = _grads(lagrangian, yg, create_graph=True)

        def hvp(directions: Tensor) -> Tensor:
            return _batched_vjp(gL, yg, directions)

        w, mu = solver(hvp, A, inactive, grad_y.to(y.dtype))
        # -(w^T D_x (grad_y L) + mu^T D_x c): the product with B = D^2_xy L as one vjp.
        target = -(gL * w.detach()).sum()
        if c is not None:
            target = target - (c * mu.detach()).sum()
        grads = _grads(target, (xg,) + params, create_graph=False)
    grads = tuple(g.detach() for g in grads)
    # Never hand back NaN silently: one host sync to test, zeros with a warning if so.
    bad = [~torch.isfinite(g) for g in grads]
    if bool(torch.stack([b.any() for b in bad]).any()):
        counts = [int(b.sum()) for b in bad]
        warnings.warn(
            f"the implicit gradient has {counts[0]} non-finite entries for x and "
            f"{sum(counts[1:])} for params (the objective or constraints are not twice "
            "differentiable at the solution?); they are set to zero",
            GradientWarning,
            stacklevel=2,
        )
        grads = tuple(torch.where(b, 0.0, g) for g, b in zip(grads, bad))
    return grads[0], grads[1:]


def _grads(out: Tensor, inputs, create_graph: bool) -> tuple[Tensor, ...]:
    """``torch.autograd.grad`` that gives zeros for inputs ``out`` does not depend on."""
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if not out.requires_grad:
        return tuple(torch.zeros_like(t) for t in inputs)
    gs = torch.autograd.grad(
        out, inputs, retain_graph=True, create_graph=create_graph, allow_unused=True
    )
    return tuple(torch.zeros_like(t) if g is None else g for t, g in zip(inputs, gs))


# --------------------------------------------------------------------------------------
# The autograd Function and the Module
# --------------------------------------------------------------------------------------


class _DeclarativeFunction(torch.autograd.Function):
    """Runs ``node.solve`` forward and :func:`declarative_vjp` backward."""

    @staticmethod
    def forward(node: "DeclarativeNode", x: Tensor, *params: Tensor) -> Tensor:
        return node._checked_solve(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        node, x = inputs[0], inputs[1]
        ctx.node = node
        ctx.save_for_backward(x, output, *inputs[2:])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor):
        x, y, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if not any(needs[1:]):
            return (None,) * len(needs)
        node: DeclarativeNode = ctx.node
        wanted = [p for p, need in zip(params, needs[2:]) if need]
        grad_x, grad_wanted = declarative_vjp(
            node.objective,
            x,
            y,
            grad_y,
            equality_constraints=node.equality_constraints,
            inequality_constraints=node.inequality_constraints,
            params=wanted,
            linear_solver=node._linear_solver(),
            dense_max=node.dense_max,
            active_tol=node.active_tol,
        )
        it = iter(grad_wanted)
        grad_params = [next(it) if need else None for need in needs[2:]]
        return (None, grad_x if needs[1] else None, *grad_params)


class DeclarativeNode(torch.nn.Module):
    """Base class for a node whose output is the solution of an optimization problem.

    .. math::

        y(x) \\in \\operatorname*{argmin}_{u \\in \\mathbb{R}^m} f(x, u)
        \\quad\\text{subject to}\\quad h(x, u) = 0,\\; g(x, u) \\le 0.

    Subclass it and write:

    - ``objective(self, x, y)``: :math:`f`, batched: ``x`` ``(B, n)``, ``y`` ``(B, m)``
      to ``(B,)``, in differentiable torch code; row ``b`` must depend only on
      ``x[b]`` and ``y[b]``.
    - ``solve(self, x)``: any algorithm returning the minimiser ``y`` ``(B, m)`` (a
      tensor, not a tuple; multipliers are recovered by least squares, eq. 25). It runs
      without gradient tracking and its steps are never differentiated.
    - optionally ``equality_constraints(self, x, y)`` returning :math:`h` ``(B, p)``
      and ``inequality_constraints(self, x, y)`` returning :math:`g` ``(B, q)``; the
      defaults return ``None`` (no constraints).

    Calling ``node(x)`` returns ``y`` with the implicit backward of
    :func:`declarative_vjp` attached (Prop. 4.4 to 4.6): gradients flow to ``x`` and to
    every parameter of the module that requires grad. A subclass that defines
    ``__init__`` must call ``super().__init__()`` (all arguments are optional).

    The forward synchronises with the device once (to check that ``solve`` returned
    finite values); the backward a few times (see :func:`declarative_vjp`). Double
    backward is not supported.

    Args:
        linear_solver: ``"auto"`` (default), ``"dense"``, ``"cg"`` or a callable; see
            :func:`declarative_vjp`.
        dense_max: largest ``m + p + q`` for which ``"auto"`` picks the dense solve.
            Default ``64``.
        active_tol: inequality constraints with ``g >= -active_tol`` count as active.
            Default ``1e-6``.
        cg_tol: relative residual tolerance of CG. Default ``None`` (``1e-10`` in
            float64, ``1e-5`` otherwise).
        cg_max_iter: CG iteration cap. Default ``None`` (``10 * m``).

    Shape:
        - Input: :math:`(*, n)`; a 1-D input is a single problem.
        - Output: :math:`(*, m)`, same dtype and device as the input.

    Raises:
        DTypeError: if ``x`` is not a floating-point tensor, or ``solve`` returns a
            non-tensor or a tensor of another dtype.
        ShapeError: if ``x`` is 0-dimensional or ``solve`` returns a shape other than
            ``(B, m)``; in backward, if ``objective`` or a constraint returns the wrong
            shape.
        NonFiniteError: if ``x`` contains NaN or Inf.
        SolverError: if ``solve`` returns NaN or Inf (with the failing batch indices).
        OptionError: for invalid options.

    Examples::

        >>> class Mean(DeclarativeNode):
        ...     def objective(self, x, y):
        ...         return ((y - x) ** 2).sum(-1)
        ...     def solve(self, x):
        ...         return x.mean(-1, keepdim=True)
        >>> y = Mean()(torch.randn(4, 10, requires_grad=True))

    References:
        S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks", TPAMI 2021.
    """

    def __init__(
        self,
        *,
        linear_solver: Union[str, LinearSolver] = "auto",
        dense_max: int = 64,
        active_tol: float = 1e-6,
        cg_tol: Optional[float] = None,
        cg_max_iter: Optional[int] = None,
    ) -> None:
        super().__init__()
        if not callable(linear_solver):
            check_choice("linear_solver", linear_solver, LINEAR_SOLVERS)
        check_positive("dense_max", dense_max)
        check_positive("active_tol", active_tol)
        if cg_tol is not None:
            check_positive("cg_tol", cg_tol)
        if cg_max_iter is not None:
            check_positive("cg_max_iter", cg_max_iter)
        self.linear_solver = linear_solver
        self.dense_max = int(dense_max)
        self.active_tol = float(active_tol)
        self.cg_tol = cg_tol
        self.cg_max_iter = cg_max_iter

    # ---- the user's part ------------------------------------------------------------

    def objective(self, x: Tensor, y: Tensor) -> Tensor:
        """The objective :math:`f(x, y)`: ``(B, n), (B, m) -> (B,)``."""
        raise NotImplementedError(f"{type(self).__name__} must define objective(self, x, y)")

    def solve(self, x: Tensor) -> Tensor:
        """A minimiser ``y`` ``(B, m)`` of the problem for each row of ``x`` ``(B, n)``."""
        raise NotImplementedError(f"{type(self).__name__} must define solve(self, x)")

    def equality_constraints(self, x: Tensor, y: Tensor) -> Optional[Tensor]:
        """Equality constraints ``(B, p)``, feasible where zero; ``None`` for none."""
        return None

    def inequality_constraints(self, x: Tensor, y: Tensor) -> Optional[Tensor]:
        """Inequality constraints ``(B, q)``, feasible where ``<= 0``; ``None`` for none."""
        return None

    # ---- machinery ------------------------------------------------------------------

    def _linear_solver(self) -> Union[str, LinearSolver]:
        if self.linear_solver == "dense" or callable(self.linear_solver):
            return self.linear_solver
        cg = functools.partial(solve_kkt_cg, tol=self.cg_tol, max_iter=self.cg_max_iter)
        if self.linear_solver == "cg":
            return cg

        def auto(hvp, A, inactive, v):
            size = v.shape[1] + (0 if A is None else A.shape[1])
            if size <= self.dense_max:
                return solve_kkt_dense(hvp, A, inactive, v)
            return cg(hvp, A, inactive, v)

        return auto

    def _checked_solve(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            y = self.solve(x)
        name = f"{type(self).__name__}.solve"
        if not isinstance(y, torch.Tensor):
            raise DTypeError(f"{name} must return a torch.Tensor, got {type(y).__name__}")
        if y.dtype != x.dtype:
            raise DTypeError(f"{name} must return the dtype of x ({x.dtype}), got {y.dtype}")
        if y.ndim != 2 or y.shape[0] != x.shape[0]:
            raise ShapeError(
                f"{name} must return shape (B, m) with B = {x.shape[0]} for x of shape "
                f"{tuple(x.shape)}, got {tuple(y.shape)}"
            )
        y = y.detach()
        # Returning (a view of) the input would make autograd treat y as x itself.
        if y.numel() and y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            y = y.clone()
        return y

    def forward(self, x: Tensor) -> Tensor:
        """Solve for ``y`` and attach the implicit backward; see the class docstring."""
        x = check_tensor("x", x)
        if x.ndim == 0:
            raise ShapeError("x must have shape (*batch, n) with at least one dimension, got ()")
        check_finite("x", x)
        batch_shape = x.shape[:-1]
        flat = x.reshape(math.prod(batch_shape), x.shape[-1])
        params = tuple(p for p in self.parameters() if p.requires_grad)
        y = _DeclarativeFunction.apply(self, flat, *params)
        bad = ~torch.isfinite(y).all(dim=-1)
        if y.numel() and bool(bad.any()):
            flat_idx = torch.nonzero(bad).flatten()
            if batch_shape:
                idx = torch.stack(torch.unravel_index(flat_idx, tuple(batch_shape)), -1)
                indices = [tuple(i) for i in idx.tolist()]
            else:
                indices = [()]
            raise SolverError(
                f"{type(self).__name__}.solve returned NaN or Inf for {len(indices)} of "
                f"{bad.numel()} batch element(s), at batch indices "
                f"{indices[:_MAX_INDICES_SHOWN]}",
                indices=indices,
                statuses=["non-finite solution"] * len(indices),
            )
        return y.reshape(*batch_shape, y.shape[-1])

    def extra_repr(self) -> str:
        solver = self.linear_solver if isinstance(self.linear_solver, str) else (
            getattr(self.linear_solver, "__name__", repr(self.linear_solver))
        )
        return (
            f"linear_solver={solver!r}, dense_max={self.dense_max}, "
            f"active_tol={self.active_tol:g}, cg_tol={self.cg_tol}, "
            f"cg_max_iter={self.cg_max_iter}"
        )
