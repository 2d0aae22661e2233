"""Batched linear solvers for the KKT systems of implicit differentiation.

Each solver maps ``(hvp, A, inactive, v)`` to ``(w, mu)``, the solution of

.. math::

    \\begin{bmatrix} H & A^\\top \\\\ A & D \\end{bmatrix}
    \\begin{bmatrix} w \\\\ \\mu \\end{bmatrix}
    = \\begin{bmatrix} v \\\\ 0 \\end{bmatrix}

for every batch element, with ``H`` given only through Hessian–vector products and
``D`` the diagonal that pins the multipliers of inactive constraints to zero:
:func:`solve_kkt_dense` forms the matrix and factorises it, :func:`solve_kkt_cg` runs
projected conjugate gradients (:mod:`.krylov`). Both flag the same degeneracies, with
the same :class:`~convexddn.errors.GradientWarning`: a *singular* system (the solution
is not locally unique, so its derivative does not exist; the pseudo-inverse solution is
used) and an *ill-conditioned* one (nearly so). The tests are scale-aware: they look at
the equilibrated matrix, so multiplying the objective or a constraint by 1e10 changes
nothing. CG sees ``H`` only through products, so its own condition estimate (Ritz
values) is not equilibrated: wherever the dense system fits in ``dense_fallback_bytes``,
the dense test decides for every element CG flags or could not check; beyond that, CG's
estimate stands, and an unchecked element gets a warning saying so.
:func:`resolve_linear_solver` is the one place where ``"auto"`` chooses.

References:
    S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks",
    IEEE TPAMI 44(8), 2021 (Prop. 4.5, §4.7.4, §6.1).
"""
from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from typing import Any

import torch

from .._checks import check_choice, check_count, check_number, check_tolerance
from .._pow2 import pow2_floor
from .._warn import warn
from ..errors import GradientWarning, OptionError
from .degeneracy import dependent_to_warn, shown_indices, warn_degenerate
from .dense import ILL_CONDITIONED, DenseResult, default_rcond, dense_kkt, ill_threshold
from .krylov import CG_BUDGET_MIN, CG_ITER_WORK, cg_budget, hvp_of_rows, projected_cg

__all__ = [
    "CG_BUDGET_MIN",
    "CG_ITER_WORK",
    "DENSE_MAX",
    "DENSE_WORK",
    "HVP",
    "ILL_CONDITIONED",
    "LINEAR_SOLVERS",
    "LinearSolver",
    "cg_budget",
    "resolve_linear_solver",
    "shown_indices",
    "solve_kkt_cg",
    "solve_kkt_dense",
]

Tensor = torch.Tensor
#: ``hvp(D)`` maps directions ``D`` of shape ``(k, B, m)`` to ``H_b d`` of the same shape; it
#: may offer ``hvp.rows(idx)``, the products of the elements ``idx`` alone (:func:`.krylov.restricted_hvp`).
HVP = Callable[[Tensor], Tensor]
#: ``solver(hvp, A, inactive, v) -> (w, mu)``; see :func:`solve_kkt_dense`.
LinearSolver = Callable[
    [HVP, "Tensor | None", "Tensor | None", Tensor], "tuple[Tensor, Tensor | None]"
]

#: Names accepted for ``linear_solver``.
LINEAR_SOLVERS = ("auto", "dense", "cg")

#: ``"auto"`` solves densely while ``N = m + p + q <= DENSE_MAX`` or
#: ``B N^3 <= DENSE_WORK`` (``B`` batch elements): measured on CPU (torch 2.13,
#: float64), forming H from m batched Hessian-vector products plus one LU beats CG up
#: to N ~ 500-700 for one element and N ~ 100-130 for 16, on well-conditioned
#: problems (CG needs ~20-60 products per system, each a full autograd pass, and
#: more as the condition number grows: at condition 1e4 dense won everywhere measured).
DENSE_MAX = 64
DENSE_WORK = 3e8

#: Largest dense KKT batch (bytes, float64) that "auto" and the CG fallback will form.
_DENSE_BYTES = 1 << 30
def dense_bytes(batch: int, size: int) -> int:
    """Memory of a dense float64 KKT batch ``(B, N, N)`` plus its factorisation."""
    return 3 * 8 * batch * size * size


# --------------------------------------------------------------------------- dense


def solve_kkt_dense(
    hvp: HVP,
    A: Tensor | None,
    inactive: Tensor | None,
    v: Tensor,
    *,
    rcond: float | None = None,
    ill_conditioned: float = ILL_CONDITIONED,
    warn_dependent: bool = True,
    check_minimum: bool = True,
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
    autograd call. The matrix :math:`K_b` is equilibrated (symmetric Ruiz scaling, so
    the tests below do not depend on the units of the objective or of the constraints)
    and LU-factorised; its condition number :math:`\\kappa` is estimated by three
    power and inverse iterations. Where :math:`\\kappa \\ge 1/\\text{rcond}` the system
    is singular: the minimum-norm least-squares (pseudo-inverse) solution is used
    (Gould et al. §4.7.4) and a :class:`~convexddn.errors.GradientWarning` names the
    batch elements; where :math:`\\kappa \\ge` ``ill_conditioned`` the warning says the
    system is ill-conditioned.

    Args:
        hvp: maps directions ``(k, B, m)`` to Hessian-vector products ``(k, B, m)``.
        A: active-constraint Jacobian ``(B, r, m)`` with inactive rows zero, or ``None``.
        inactive: ``(B, r)`` bool mask of dropped inequality constraints, or ``None``.
        v: right-hand side ``(B, m)`` (the incoming gradient).
        rcond: reciprocal condition number below which the system counts as singular.
            Default: an eigenvalue within ``4 eps`` of the largest (:data:`~.dense.SINGULAR_EPS`),
            judged where the estimate exceeds ``1/((m + r) eps)``.
        ill_conditioned: condition number from which a warning is issued, at most
            1e-3/eps of the solve's dtype (three correct digits: 1.7e4 in float32).
            Default :data:`ILL_CONDITIONED` (``1e10``).
        warn_dependent: warn about linearly dependent active constraints (whose
            multipliers are then not unique); or a callable ``(B,) mask -> (B,) mask``
            keeping the dependent elements whose gradient that non-uniqueness reaches.
            :func:`declarative_vjp` turns it off when no input or parameter enters the
            constraints: the gradient is then unique.
        check_minimum: warn where :math:`K_b`'s inertia shows that :math:`H_b` has
            negative curvature on the active constraints' tangent space (more negative
            eigenvalues than independent active constraints, from an
            :math:`LDL^\\top`, about the cost of the LU: 5–10 % of a node's backward on
            CPU): the point is a saddle or a maximiser, not the minimiser the node
            declares. Not judged where the active constraints are dependent.

    Returns:
        ``(w, mu)`` with shapes ``(B, m)`` and ``(B, r)`` (``mu`` is ``None`` without
        constraints).

    Shape:
        Cost ``O(B (m + r)^3)`` time and ``O(B (m + r)^2)`` memory; see
        :data:`DENSE_MAX` for where ``"auto"`` stops using it.

    Warns:
        GradientWarning: when the KKT matrix is singular or ill-conditioned for some
        batch elements (one host synchronisation per call).

    References:
        Gould, Hartley & Campbell, "Deep Declarative Networks", TPAMI 2021, Prop. 4.5,
        §4.7.4 and §6.1.
    """
    res = dense_kkt(hvp, A, inactive, v, rcond, ill_conditioned, check_minimum)
    warn_degenerate(res.singular, dependent_to_warn(res.dependent, warn_dependent), res.ill,
                    res.cond, not_minimum=res.not_minimum if check_minimum else None)
    return res.w, res.mu


# --------------------------------------------------------------------------- CG


def _default_cg_tol(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-5


# Largest cond·tol (the error bound of CG's answer) taken without the dense check.
_CG_ERROR = {torch.float64: 1e-4, torch.float32: 1e-2}


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
    ill_conditioned: float = ILL_CONDITIONED,
    dense_fallback_bytes: int = _DENSE_BYTES,
    warn_dependent: bool = True,
    budget: int | Callable[[int], int] | None = None,
    check_minimum: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Solve the batched KKT system matrix-free with projected conjugate gradients.

    Same system as :func:`solve_kkt_dense`. CG runs on :math:`H w = v` restricted to
    the null space of the active constraints,

    .. math::

        P H P\\, w = P v, \\qquad P = I - A^\\top (A A^\\top + D)^{+} A, \\qquad
        \\mu = (A A^\\top + D)^{+} A (v - H w),

    using only Hessian-vector products (Gould, Hribar & Nocedal 2001), so, like the
    dense path, it needs :math:`H` positive definite only on that null space. Alongside
    the system it iterates on a fixed pseudo-random probe: CG started at zero on a
    consistent singular system converges quietly to the minimum-norm solution, and
    the probe is what reveals the singularity (a breakdown, :math:`p^\\top H p \\approx
    0`) or an ill-conditioned system (no convergence in ``max_iter``). Dependent active
    constraints (:math:`A A^\\top` singular) count as singular. The warnings are those
    of :func:`solve_kkt_dense`.

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
        rcond: reciprocal condition number for :math:`A A^\\top` and for the dense
            fallback; see :func:`solve_kkt_dense`.
        ill_conditioned: passed to the dense fallback. Default ``1e10``.
        warn_dependent, check_minimum: see :func:`solve_kkt_dense` (the inertia is known
            only for the elements the dense fallback solves: those where CG breaks
            down, as it does on negative curvature, or does not converge).
        budget: with a dense fallback available, stop CG after this many iterations
            (instead of ``max_iter``) and hand every element whose system or probe is
            unfinished to the dense solve: CG is only worth it when it converges fast
            (the ``"auto"`` choice sets it). Or a callable ``n -> iterations`` for ``n``
            elements still running (``"auto"``: :func:`cg_budget`), where ``hvp`` offers
            products of fewer elements and they reproduce the batch's
            (:func:`~.krylov.restricted_hvp`): then both the remaining CG steps and the
            dense fallback cost only those elements (otherwise ``budget(B)``). Default
            ``None``.
        dense_fallback_bytes: where CG fails for some batch elements (no convergence, or
            :math:`H` indefinite on the null space), or its probe flags them as singular
            or ill-conditioned or does not finish, or the error bound of its answer,
            ``tol`` times the probe's condition estimate, exceeds 1e-4 (float64; 1e-2 in
            float32), and the dense system of the batch fits in this many bytes, those
            elements get the dense solution and its scale-aware tests. Default 1 GiB.

    Returns:
        ``(w, mu)`` with shapes ``(B, m)`` and ``(B, r)`` (``mu`` is ``None`` without
        constraints).

    Warns:
        GradientWarning: singular or ill-conditioned systems (as the dense path), and past
        the dense fallback's size: CG failures (those elements keep the last, finite, CG
        iterate), elements whose probe did not finish (degeneracy not checked) and those
        whose error bound exceeds the limit above.

    Raises:
        OptionError: ``max_iter``, ``check_every``, ``budget`` not integers >= 1,
            ``dense_fallback_bytes`` not a number >= 0, ``ill_conditioned`` not a number > 1,
            ``tol`` or ``rcond`` not in (0, 1).

    References:
        Gould, Hartley & Campbell, "Deep Declarative Networks", TPAMI 2021, Prop. 4.5
        and §6.1. N. I. M. Gould, M. E. Hribar and J. Nocedal, "On the solution of
        equality constrained quadratic programming problems arising in optimization",
        SIAM J. Sci. Comput. 23(4), 2001.
    """
    batch, m = v.shape
    tol = _default_cg_tol(v.dtype) if tol is None else check_tolerance("cg tol", tol)
    max_iter = 10 * m if max_iter is None else check_count("cg max_iter", max_iter)
    check_every = check_count("check_every", check_every)
    if isinstance(dense_fallback_bytes, bool) or not isinstance(dense_fallback_bytes, numbers.Real) \
            or not dense_fallback_bytes >= 0:  # inf: always
        raise OptionError(f"dense_fallback_bytes must be a number >= 0 (inf: no limit), got {dense_fallback_bytes!r}")
    check_number("ill_conditioned", ill_conditioned, above=1)
    size = m + (0 if A is None else A.shape[1])
    # (the dense fallback gets the caller's rcond: its default decides on the exact spectrum)
    dense_rcond = rcond = None if rcond is None else check_tolerance("cg rcond", rcond)
    rcond = default_rcond(size, v.dtype) if rcond is None else rcond
    can_fall_back = dense_bytes(batch, size) <= dense_fallback_bytes
    # The budget counts the elements still running only where they alone pay for the
    # products and the fallback (the rows of hvp, where projected_cg uses them); otherwise
    # the whole batch's.
    cap = budget if callable(budget) and getattr(hvp, "rows", None) is not None and can_fall_back else None
    if callable(budget):
        budget = budget(batch)
    budget = None if budget is None else check_count("budget", budget)
    if budget is not None and can_fall_back:
        max_iter = min(max_iter, budget)
    # (In units of a power of two near each v's largest entry: CG's squared norms of a v
    # of 1e160 overflowed, of 1e-200 underflowed, and both "converged" at w = 0.)
    top = v.abs().amax(-1, keepdim=True)
    unit = pow2_floor(torch.where(top > 0, top, 1.0))
    out = projected_cg(hvp, A, inactive, v / unit, tol, max_iter, check_every, rcond, cap)
    w, mu = out.w * unit, None if out.mu is None else out.mu * unit
    # Ritz values lie inside the spectrum, so even an unfinished probe's estimate bounds
    # the condition number from below: ill-conditioning is that estimate's verdict only.
    ill = (out.cond >= ill_threshold(ill_conditioned, v.dtype)) & ~out.singular
    singular, dependent = out.singular, out.dependent
    # A relative residual of tol leaves an error of up to cond·tol in w: beyond _CG_ERROR
    # that is no answer (condition 7.5e9, below ill_conditioned: 29 % off, silently).
    inaccurate = (out.cond * tol > _CG_ERROR.get(v.dtype, _CG_ERROR[torch.float32])) & ~out.singular & ~ill
    failed = ~out.converged
    not_minimum = None  # (known only where the dense system is formed)
    if can_fall_back:
        # The probe's verdicts are not the dense test's: an unfinished probe is no
        # evidence of ill-conditioning (a system solved in one step was warned about), and
        # its Ritz estimate is not equilibrated (diag(1e-11, 1, 1, 1), exact in float64,
        # was called ill-conditioned at 1e11). Where the dense system fits, it decides
        # (the singular verdict too: a converged CG solve is no pseudo-inverse solution).
        failed = failed | out.unfinished | ill | inaccurate | singular
    cond = out.cond
    if bool(failed.any()):
        if can_fall_back:
            # (H formed for the failed elements alone where hvp offers their rows: m products
            # of the whole batch formed 64 Hessians for 1 failed element)
            idx = failed.nonzero().squeeze(-1)
            sub, pick = hvp_of_rows(hvp, idx, v), (lambda t: None if t is None else t.index_select(0, idx))
            opts = (dense_rcond, ill_conditioned, check_minimum)
            res = (DenseResult(*map(pick, dense_kkt(hvp, A, inactive, v, *opts))) if sub is None
                   else dense_kkt(sub, pick(A), pick(inactive), pick(v), *opts))
            w = w.index_copy(0, idx, res.w)
            mu = None if mu is None else mu.index_copy(0, idx, res.mu)
            singular = singular.index_copy(0, idx, res.singular)
            ill = ill.index_copy(0, idx, res.ill)
            cond = cond.index_copy(0, idx, res.cond)
            not_minimum = torch.zeros_like(failed).index_copy(0, idx, res.not_minimum) if check_minimum else None
        else:
            stuck = failed & singular
            warn(f"conjugate gradients did not reach tol={tol:g} (worst relative residual "
                 f"{float(out.residual.amax()):.2e}) for {shown_indices(failed)}, and the dense system "
                 f"({dense_bytes(batch, size) / 2**30:.1f} GiB) is over dense_fallback_bytes: those elements keep "
                 "the last CG iterate" + (f" (singular for {shown_indices(stuck)}: no derivative exists there)"
                                          if bool(stuck.any()) else ""), GradientWarning)
            # Said above: the singular warning's pseudo-inverse solution is not what they got.
            singular, ill = singular & ~failed, ill & ~failed
    if not can_fall_back:
        inaccurate = inaccurate & ~failed
        if bool(inaccurate.any()):
            warn(f"conjugate gradients stopped at a relative residual of tol={tol:g} on KKT systems of "
                 f"condition {float(cond[inaccurate].amax()):.1e} (a lower bound) for "
                 f"{shown_indices(inaccurate)}: their gradients may be off by that product; the dense "
                 "system is over dense_fallback_bytes (pass a smaller cg tol, or raise dense_fallback_bytes)",
                 GradientWarning)
        unchecked = out.unfinished & ~failed & ~ill
        if bool(unchecked.any()):
            warn(f"the singularity probe of conjugate gradients did not finish within max_iter={max_iter} for "
                 f"{shown_indices(unchecked)}, and the dense system is over dense_fallback_bytes: whether their "
                 "KKT system is singular or ill-conditioned was not checked (raise max_iter or "
                 "dense_fallback_bytes)", GradientWarning)
    warn_degenerate(singular, dependent_to_warn(dependent, warn_dependent), ill, cond,
                    not_minimum=not_minimum)
    return w, mu


# --------------------------------------------------------------------------- choice


def resolve_linear_solver(
    linear_solver: str | LinearSolver,
    size: int,
    dense_max: int | None,
    cg_options: dict[str, Any] | None = None,
    batch: int = 1,
) -> LinearSolver:
    """The solver for a batch of ``batch`` KKT systems of ``size = m + p + q`` unknowns.

    ``"dense"``, ``"cg"`` (with ``cg_options`` such as ``tol`` and ``max_iter``), or
    ``"auto"``: dense up to ``dense_max`` unknowns when it is given; otherwise dense
    while ``size <= DENSE_MAX`` or ``batch * size**3 <= DENSE_WORK`` (the measured
    crossover), and the dense batch fits in 1 GiB; CG above, for at most
    :func:`cg_budget` iterations before unconverged elements go to the dense solve
    (unless ``cg_options`` sets ``max_iter``). A callable is returned as is.

    Raises:
        OptionError: an unknown name.
    """
    if callable(linear_solver):
        return linear_solver
    check_choice("linear_solver", linear_solver, LINEAR_SOLVERS, or_else=" or a callable")
    if dense_max is not None:
        small = size <= dense_max
    else:
        small = size <= DENSE_MAX or batch * size**3 <= DENSE_WORK
    if linear_solver == "dense" or (
        linear_solver == "auto" and small and dense_bytes(batch, size) <= _DENSE_BYTES
    ):
        return solve_kkt_dense
    options = {k: v for k, v in (cg_options or {}).items() if v is not None}
    if linear_solver == "auto" and "max_iter" not in options:
        # Ski rental: CG gets about the time of the dense solve, then the unconverged
        # elements go to the dense solve if it fits in memory (the budget of the elements
        # still running, where they alone pay for the products and the fallback).
        options["budget"] = functools.partial(cg_budget, size)
    return functools.partial(solve_kkt_cg, **options) if options else solve_kkt_cg
