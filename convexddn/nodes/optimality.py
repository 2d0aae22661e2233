"""Is the point that ``solve`` returned a KKT point? Scale-aware first-order checks.

For a declarative node

.. math::

    y(x) \\in \\operatorname*{argmin}_{u} f(x, u)
    \\quad\\text{subject to}\\quad h(x, u) = 0,\\; g(x, u) \\le 0,

the implicit derivative (Gould et al. 2021, Prop. 4.4–4.6) is the derivative of the
first-order conditions at ``y``. It is meaningful only where those conditions hold,

.. math::

    r = \\nabla_y f + A^\\top \\lambda = 0,\\quad h = 0,\\quad g \\le 0,\\quad
    \\lambda_{\\text{ineq}} \\ge 0,

with :math:`\\lambda` the multipliers of eq. 25 (least squares at the given ``y``) and
:math:`A` the Jacobian of the active constraints. :func:`kkt_residuals` measures each
relative to the problem's own scale, so that multiplying the objective, a constraint,
``x`` or ``y`` by a constant does not change the verdict: the stationarity residual is
divided by :math:`\\|H\\|\\,\\|y\\| + \\|B\\|\\,\\|x\\| + \\|\\nabla_y f\\|` (how much
:math:`\\nabla_y L` moves when ``y`` or ``x`` moves by its own size, :math:`H = D^2_{yy} L`,
:math:`B = D^2_{xy} L`, both norms estimated with one Hessian-vector product; and the
size of the gradient the multipliers cancel, the whole scale of a linear program), the
feasibility residual by :math:`\\|A\\|\\,\\|y\\| + \\|D_x c\\|\\,\\|x\\|`. A
correctly rounded solution scores about the dtype's epsilon; ``0.5 x`` for
:math:`\\tfrac12\\|y - x\\|^2` scores 1/4.

References:
    S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks", IEEE TPAMI 2021.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from .._warn import warn
from ..errors import GradientWarning, SolverError
from .krylov import pseudo_random_directions
from .linear_solvers import shown_indices
from .multipliers import dependent, nonnegative_multipliers, scaled_norm, unit_rows
from .step_error import _ROUNDING, _above, _ratio, coordinate_reach, newton_step_error, offset_checked

__all__ = ["SOLUTION_ERROR_TOL", "KKTResiduals", "default_solution_tol", "kkt_residuals", "newton_step_error",
           "term_norms", "verify_kkt"]

Tensor = torch.Tensor

#: Relative KKT residual above which the solution is rejected with a SolverError.
SOLUTION_ERROR_TOL = 0.1


def default_solution_tol(dtype: torch.dtype) -> float:
    """Relative KKT residual above which a solution is reported: ``max(1e-6, sqrt(eps))``.

    float64: 1e-6; float32: 3.5e-4; float16: 0.031; bfloat16: 0.088 (a solve in that
    dtype cannot do much better than its square root of epsilon on a curved objective).
    """
    return max(1e-6, math.sqrt(torch.finfo(dtype).eps))


class KKTResiduals(NamedTuple):
    """Per batch element ``(B,)``: relative residuals, and where complementarity fails."""

    #: ``‖∇f + Aᵀλ₊‖ / (‖H‖‖y‖ + ‖B‖‖x‖ + ‖∇f‖)`` (λ₊: inequality multipliers clamped at 0)
    stationarity: Tensor
    feasibility: Tensor  #: ``‖(h, max(g, 0))‖ / (‖A‖‖y‖ + ‖D_x c‖‖x‖)``
    weakly_active: Tensor  #: an active inequality with a (relatively) zero multiplier
    weakest: Tensor | None = None  #: least ``λ_j ‖a_j‖`` / scale of an active inequality (+inf: none; None: none weak)

    @property
    def worst(self) -> Tensor:
        return torch.maximum(self.stationarity, self.feasibility)


def _row_norm(t: Tensor) -> Tensor:
    return scaled_norm(t.reshape(t.shape[0], -1))


def term_norms(yg: Tensor, xg: Sequence[Tensor], gf: Tensor, probes: tuple) -> tuple:
    """Per element (B,), the sizes of the terms of ``∇_y L`` along the probes ``(H u, Bᵀu …)``:
    ``(‖H u‖, ‖y‖, ‖H u‖‖y‖, own = ‖H u‖‖y‖ + ‖∇_y f‖, own + Σ ‖Bᵀu‖‖x‖, [‖x‖ or None])``
    (each norm once, of detached tensors: ``yg`` and ``xg`` require grad, no norm needs a graph)."""
    hu = scaled_norm(torch.zeros_like(yg) if probes[0] is None else probes[0])
    y = scaled_norm(yg.detach())
    curvature = hu * y
    own = curvature + scaled_norm(gf.detach())
    x_norms = [None if Bu is None else _row_norm(x.detach()) for x, Bu in zip(xg, probes[1:])]
    total = own
    for x_norm, Bu in zip(x_norms, probes[1:]):
        if Bu is not None:
            total = total + _row_norm(Bu) * x_norm
    return hu, y, curvature, own, total, x_norms


def kkt_residuals(yg: Tensor, xg: Sequence[Tensor], gf: Tensor, gL: Tensor, c: Tensor | None, A: Tensor | None,
                  lam: Tensor | None, n_eq: int, inactive: Tensor | None, tol: float, eps: float,
                  probes: tuple | None = None, feasibility_rows: Tensor | None = None,
                  step: Callable[..., Tensor] | None = None, norms: tuple | None = None,
                  rounding: Tensor | None = None) -> KKTResiduals:
    """Relative first-order residuals of ``y`` (see the module docstring).

    Args:
        yg: the solution ``(B, m)``, a leaf that ``gL`` was computed from.
        xg: the inputs ``(B, ...)`` as leaves that require grad.
        gf: :math:`\\nabla_y f` ``(B, m)``.
        gL: :math:`\\nabla_y L` ``(B, m)`` built with ``create_graph=True``.
        c: constraint values ``(B, r)`` (equalities first), or ``None``.
        A: their Jacobian ``(B, r, m)`` with inactive rows zero, or ``None``.
        lam: multipliers ``(B, r)``, or ``None``.
        n_eq: how many of the ``r`` constraints are equalities.
        inactive: ``(B, r)`` mask of inactive inequalities, or ``None``.
        tol: relative level under which an active inequality's multiplier counts as zero:
            its force ``λ_j ‖a_j‖`` against the element's own ``‖H‖‖y‖ + ‖∇_y f‖``.
        eps: the data's rounding level (the caller's dtype's epsilon); each element's
            scale is at least ``eps`` times the largest in the batch.
        probes: ``(H u, Bᵀu …)`` of ``gL`` along :func:`~.krylov.pseudo_random_directions`
            if the caller has them (one double-backward pass); computed here otherwise.
        feasibility_rows: the Jacobian that scales the feasibility residual where it is not
            ``A`` (elements whose rows of ``A`` were zeroed); ``None``: ``A``.
        step: ``(v (B, m), release (B, r) or None) -> δy (B, m)``, the ``y`` part of the KKT
            system's solution for the right-hand side ``[v; 0]`` (:func:`newton_step_error`),
            the constraints ``release`` made inactive; with it, where an offset in the data
            or a stiff direction hides an error, ``y``'s error is also estimated by that step
            (stationarity) and by the least-norm correction of the violation (feasibility),
            against ``‖y‖``. ``None``: both residuals are judged against the scales alone.
        norms: :func:`term_norms` of ``probes``, if the caller has them.
        rounding: ``(B,)`` a residual level not counted, as measured (terms that saturate
            and cancel round far above eps of the scale); ``None``: the scale's alone.
    """
    batch, m = yg.shape
    if probes is None:
        # One double-backward pass: H u (curvature in y) and B^T u (sensitivity to x).
        u = pseudo_random_directions(m, batch, yg.dtype, yg.device)
        probes = torch.autograd.grad(
            (gL * u).sum(), (yg, *xg), retain_graph=True, allow_unused=True
        ) if gL.requires_grad else (None,) * (1 + len(xg))
    # The multipliers' own scale: the gradient they cancel and how much it moves when y
    # moves by its size (the unit of y's accepted error). Not ‖B‖‖x‖ (an offset of inputs
    # the problem does not see called a multiplier of 0.3 zero at x ~ 1e6), nor floored by
    # the batch (a neighbour 1e30 larger called this element's multipliers zero).
    # (Plus the size of the gradient the multipliers cancel: a linear objective whose
    # data enter only the constraints (an LP) has H = 0 and B = 0, and its rounding
    # was divided by 0 (a unique vertex rejected at a residual of 1e292).)
    y = yg.detach()
    hu_norm, y_norm, curvature, force_scale, scale, x_norms = term_norms(yg, xg, gf, probes) if norms is None else norms
    no_length = _no_length(xg)
    noise = _rounding(scale, eps, no_length, hu_norm)
    noise = noise if rounding is None else torch.maximum(noise, rounding)
    r = gf
    if c is not None:
        is_ineq = torch.zeros(c.shape[1], dtype=torch.bool, device=c.device)
        is_ineq[n_eq:] = True
        # Negative multipliers of inequalities cannot cancel the gradient: clamp them, and
        # what they were meant to cancel shows up in the stationarity residual.
        lam_ok = torch.where(is_ineq, lam.clamp_min(0.0), lam)
        r = gf + (A.transpose(1, 2) @ lam_ok.unsqueeze(-1)).squeeze(-1)
        active_ineq = is_ineq & ~inactive if inactive is not None else is_ineq.expand_as(c)
    stationarity = _ratio(_above(scaled_norm(r), noise), _floored(scale, eps))
    if step is not None:
        # (the active inequalities without a multiplier left out of the step: where a negative
        # one was clamped, the residual lies along their rows, and with them kept the step
        # was 0; y = 0 for y >= 0 at x = 0.5 beside a stiff term passed as a "kink")
        stat_step = step if c is None else (lambda v: step(v, active_ineq & (lam_ok.detach() <= 0)))
        stationarity = newton_step_error(stat_step, r.detach(), y, curvature, scale, noise, stationarity, tol, eps,
                                         reach=coordinate_reach(r.detach(), probes[0], m))
    scale = _floored(scale, eps)
    if c is None:
        zero = torch.zeros(batch, dtype=yg.dtype, device=yg.device)
        return KKTResiduals(stationarity.detach(), zero, zero.bool())
    violation = torch.where(is_ineq, c.detach().clamp_min(0.0), c.detach())
    uc = pseudo_random_directions(c.shape[1], batch, c.dtype, c.device)
    dcx = torch.autograd.grad((c * uc).sum(), tuple(xg), retain_graph=True, allow_unused=True)
    rows = (A if feasibility_rows is None else feasibility_rows).detach()
    a_norm = scaled_norm(rows.flatten(1))
    feas_own = a_norm * y_norm
    feas_scale = feas_own
    for x, x_norm, g in zip(xg, x_norms, dcx):
        if g is not None:
            feas_scale = feas_scale + _row_norm(g) * (_row_norm(x.detach()) if x_norm is None else x_norm)
    feas_noise = _rounding(feas_scale, eps, no_length, a_norm)
    # Each row's violation in the units of the largest active row (its own gradient's
    # norm brought to that one's): a constraint written as c·(‖y‖² − r²) beside a bound
    # was judged against the bound's norm, and at c ≤ 1e-6 a 21 % violation passed.
    row = scaled_norm(rows)
    unit = torch.where(row > 0, row.amax(-1, keepdim=True) / row.clamp_min(torch.finfo(row.dtype).tiny), 1.0)
    feasibility = _ratio(_above(scaled_norm(violation * unit), feas_noise), _floored(feas_scale, eps))
    if step is not None:
        # The same for the constraints: ‖D_x c‖‖x‖ grows with an offset in the data they
        # read (Σy = p₁ − p₂ at p ~ 5e6 violated by 0.5 scored 1e-7); the least-norm
        # correction A⁺v of the violation, against ‖y‖.
        feasibility = offset_checked(
            feasibility, violation, y, feas_own, feas_scale, feas_noise,
            tol, eps, lambda v: (torch.linalg.pinv(rows) @ v.unsqueeze(-1)).squeeze(-1))
    # how hard each constraint pushes, in gradient units
    force = lam.detach() * (row if feasibility_rows is None else scaled_norm(A.detach()))
    weakly = (active_ineq & (force <= tol * force_scale.unsqueeze(-1))).any(-1)
    if n_eq and bool(weakly.any()):
        force_scale = torch.where(weakly, _beyond_equalities(curvature, gf, A[:, :n_eq]), force_scale)
        weakly = (active_ineq & (force <= tol * force_scale.unsqueeze(-1))).any(-1)
    weakest = None  # (read only by the warning of weakly active elements: formed only where there are some)
    if bool(weakly.any()):
        row_scale = _row_force_scale(gL, yg, A, y_norm, force_scale - curvature, force_scale, weakly)
        weakly = (active_ineq & (force <= tol * row_scale)).any(-1)
    if bool(weakly.any()):
        weakly = _strictly_complementary_exists(A, gf, active_ineq, r, force_scale, tol, weakly)
        weakest = torch.where(active_ineq, force / row_scale.clamp_min(torch.finfo(force.dtype).tiny),
                              math.inf).amin(-1)
    return KKTResiduals(stationarity.detach(), feasibility.detach(), weakly, weakest)


def _row_force_scale(gL: Tensor, yg: Tensor, A: Tensor, y_norm: Tensor, gradient: Tensor, force_scale: Tensor,
                     weakly: Tensor) -> Tensor:
    """``(B, r)`` each active row's own force scale on the ``weakly`` elements (B,): ``‖H n_j‖ ‖y‖`` (how much
    ``∇_y L`` moves along the row's unit normal ``n_j`` when ``y`` moves by its length) plus ``gradient`` (B,),
    the scale's gradient part; at most ``force_scale`` (B,), which stands for every other element.

    ``‖H u‖`` is the largest curvature's: beside a stiff term ``k (y₂ − x₂)²`` at ``k = 1e6`` the bound ``y₁ ≥ 0``
    of a projection, pushing with a multiplier of 1 against a curvature of 1, was called zero (5.5e-7 of the
    scale) and the solution a kink. One Hessian-vector product per row, only where an element is weakly active.
    """
    from .lagrangian import _batched_vjp  # (lagrangian imports this module)

    whole = force_scale.unsqueeze(-1).expand(A.shape[:2])
    if not gL.requires_grad:  # (H = 0: no curvature along any row)
        return torch.where(weakly.unsqueeze(-1), gradient.unsqueeze(-1), whole)
    units = unit_rows(A.detach())[0].transpose(0, 1)  # (r, B, m)
    curvature = scaled_norm(_batched_vjp(gL, yg, units).detach()).transpose(0, 1) * y_norm.unsqueeze(-1)
    return torch.where(weakly.unsqueeze(-1), torch.minimum(curvature + gradient.unsqueeze(-1), whole), whole)


def _no_length(xg: Sequence[Tensor]) -> Tensor | None:
    """A 0-d flag: every input of every element is exactly zero (None without inputs)."""
    if not xg:
        return None
    return torch.stack([x.detach().abs().amax() if x.numel() else x.new_zeros(()) for x in xg]).amax() == 0


def _floored(scale: Tensor, eps: float) -> Tensor:
    """``scale`` (B,), at least ``eps`` times the batch's largest (never ~0: it divides)."""
    if scale.numel() == 0:
        return scale
    return torch.maximum(scale, eps * scale.amax())


def _rounding(scale: Tensor, eps: float, no_length: Tensor | None, derivative: Tensor) -> Tensor:
    """What of a residual (B,) is not counted: for an element without a scale of its
    own, the batch's rounding level (``8 eps`` times its largest scale; in a batch whose
    inputs are all exactly zero, at least ``8 eps`` times ``derivative``, its norm times
    the coordinates' unit length); 0 for every other element.

    An element at the origin (``x = 0``, ``y`` ~ 1e-20 from an iterative solve) has no
    scale of its own (first and second derivatives cannot form a length): its residual
    and its scale are both the size of ``y``'s error, and their ratio ~1 would call an
    exact minimiser non-stationary. The batch shares one problem and its units, so such
    an element passes within the batch's rounding (:func:`_above`); a batch with no
    length at all (a zero-initialised layer before the node) is measured in the
    coordinates' unit. An element with a scale above that level keeps its own relative
    test: an error small beside a large element is still an error for it.
    """
    if scale.numel() == 0:
        return scale
    level = _ROUNDING * eps * scale.amax()
    if no_length is not None:
        level = torch.where(no_length, torch.maximum(level, _ROUNDING * eps * derivative), level)
    return torch.where(scale <= level, level, 0.0)


def _beyond_equalities(curvature: Tensor, gf: Tensor, A_eq: Tensor) -> Tensor:
    """``(B,)`` ``‖Hu‖‖y‖ + ‖(I − P) ∇_y f‖``, ``P`` the projection onto the span of the
    equalities' gradients ``A_eq`` (B, p, m): the inequality multipliers' own scale.

    An offset of the inputs that the equalities absorb (the simplex projection of
    ``x + c``: ``∇_y f = y − x`` grows with ``c``, the equality's multiplier takes it,
    the bounds' stay ~0.2) inflated ``‖∇_y f‖``, and at ``c = 100`` in float32 (``1e5`` in
    float64) the bounds' multipliers were called zero. :math:`P g = A_{eq}^+ A_{eq} g`.
    ``curvature``: ``‖Hu‖‖y‖`` (B,), as :func:`kkt_residuals` has it.
    """
    A_eq = A_eq.detach()
    g = gf.detach().unsqueeze(-1)
    rest = g - torch.linalg.pinv(A_eq) @ (A_eq @ g)
    return curvature + scaled_norm(rest.squeeze(-1))


def _strictly_complementary_exists(A, gf, active_ineq, r, scale, tol, weakly) -> Tensor:
    """``weakly``, cleared where other multipliers push every active inequality.

    With dependent active constraints (a degenerate vertex) the multipliers are not
    unique, and the recovered ones can be zero on a constraint that another valid
    choice pushes strictly (the derivative then exists). Asking for every active
    inequality multiplier to be at least twice the "zero" level, by nonnegative
    least squares with shifted bounds: if that fits stationarity as well as ``lam``
    did, strict complementarity holds.
    """
    rows = torch.nonzero(weakly).flatten()
    rows = rows[dependent(A[rows].detach())]  # independent: the multipliers are unique
    if rows.numel() == 0:
        return weakly
    Ar, act, sc = A[rows].detach(), active_ineq[rows], scale[rows].unsqueeze(-1)
    lower = 2 * tol * sc / Ar.norm(dim=-1).clamp_min(torch.finfo(A.dtype).tiny)
    lam = nonnegative_multipliers(Ar, gf[rows], act, torch.where(act, lower, 0.0))
    fit = (gf[rows] + (Ar.transpose(1, 2) @ lam.unsqueeze(-1)).squeeze(-1)).norm(dim=-1)
    ok = fit <= r[rows].norm(dim=-1) + 0.1 * tol * sc.squeeze(-1)
    return weakly.index_put((rows,), ~ok)


def _format_indices(mask: Tensor, batch_shape: Sequence[int] | None) -> list[tuple[int, ...]]:
    flat = torch.nonzero(mask).flatten()
    if batch_shape is None:
        return [(int(i),) for i in flat.tolist()]
    if len(batch_shape) == 0:
        return [() for _ in flat.tolist()]
    idx = torch.stack(torch.unravel_index(flat, tuple(batch_shape)), -1)
    return [tuple(i) for i in idx.tolist()]


def verify_kkt(prefix: str, res: KKTResiduals, tol: float, batch_shape,
               near_active: Callable[[Tensor], tuple | None] | None = None) -> None:
    """Raise or warn where ``y`` is not a KKT point; warn where complementarity fails.
    ``near_active``: :func:`~.multipliers.near_active` of the reported elements (B,), if inequalities slack
    within a larger ``active_tol`` may be the cause."""
    worst = res.worst
    error_tol = max(SOLUTION_ERROR_TOL, 10 * tol)
    fatal = ~(worst <= error_tol)  # (NaN: a residual that could not be measured is no pass)
    poor = (worst > tol) & ~fatal
    hint = ("solve stopped early or returned a wrong point, the objective or constraints do not describe what solve "
            "computes (e.g. a clamp without its inequality constraints), an inequality multiplier is negative, or the "
            "objective is non-smooth at the solution (e.g. |u| at u = 0), where the derivative does not exist, or "
            "what the problem reads changed between the forward and the backward, which evaluates it again (a "
            "Python number or a dict entry rebound; a tensor changed in place or a tensor attribute rebound raises), "
            "or the objective is random (dropout in training mode: each evaluation is another problem)")
    stat, feas = float(res.stationarity.amax()), float(res.feasibility.amax())
    found = None if near_active is None or not bool((fatal | poor).any()) else near_active(fatal | poor)
    if found is not None:
        # (an interior point solver's bounds at +1e-6 were rejected with causes that did not name active_tol,
        # and check_solution=False, which the error advised, gave the gradient with those bounds free: wrong)
        size = f"{found[1]:.1e}" + ("" if f"{found[1]:.1e}" == f"{found[2]:.1e}" else f" to {found[2]:.1e}")
        hint = (f"inequality constraints slack by only {size} of the solution's scale (-g_j / (‖∇g_j‖ ‖y‖)) count "
                f"as inactive at active_tol={found[3]:g}, and counted active they cut the stationarity residual "
                f"to {found[4]:.1e} of its value: solve approaches bounds without reaching them (as an interior "
                "point method does); pass "
                f"active_tol={found[0]:g} or larger (below the slack of the truly inactive ones) to count them active "
                "(check_solution=False would keep them free: a wrong gradient)")
    skip = ("" if found is not None else ". check_solution=False skips this check, but the gradient is then that of a "
            "point that is not a KKT point (wrong unless this check is): fix solve or the declaration instead")
    if bool(fatal.any()):
        indices = _format_indices(fatal, batch_shape)
        raise SolverError(
            f"{prefix}solve returned a point that is not a KKT point of the declared problem for {len(indices)} of "
            f"{fatal.numel()} batch element(s), at batch indices {indices[:8]}: relative stationarity residual "
            f"{stat:.2e}, feasibility residual {feas:.2e} (rejected above {error_tol:g}); likely "
            f"{'cause' if found is not None else 'causes'}: {hint}{skip}",
            indices=indices, statuses=["not a KKT point"] * len(indices))
    if bool(poor.any()):
        warn(f"{prefix}solve returned a point that satisfies the first-order (KKT) conditions only approximately for "
             f"{shown_indices(poor)}: relative stationarity residual {stat:.2e}, feasibility residual {feas:.2e} "
             f"(solution_tol={tol:g}); the gradient is that of a nearby problem. Likely "
             f"{'cause' if found is not None else 'causes'}: {hint}", GradientWarning)
    if bool(res.weakly_active.any()):
        warn(f"{prefix}solve returned a point where an active inequality constraint has a multiplier that is zero "
             f"within solution_tol for {shown_indices(res.weakly_active)}{_weakness(res, tol)}; or the constraint "
             "is slack but within active_tol of the solution's scale (g_j >= -active_tol ‖∇g_j‖ ‖y‖: a bound 0.5 "
             "from a solution of 1e6 counts as active at the default 1e-6), where a smaller active_tol gives the "
             "exact gradient if solve is exact entry by entry", GradientWarning)


def _weakness(res: KKTResiduals, tol: float) -> str:
    """The weakly active elements' smallest multipliers, in the warning's words: one below
    ``tol`` of its scale is zero as far as a solve accurate to ``tol`` shows, but only a
    true zero makes the derivative one-sided (float32's ``tol`` is 3.5e-4: a multiplier
    of 4.8e-3 beside ‖y‖ = 12 was said to put the solution at a kink)."""
    kink = (" (a zero multiplier: strict complementarity fails), the solution is at a kink of its own, only "
            "one-sided derivatives exist, and the gradient treats the constraint as an equality (Gould et al. 2021)")
    w = None if res.weakest is None else res.weakest[res.weakly_active]
    if w is None or float(w.amax()) <= _ROUNDING * torch.finfo(w.dtype).eps:
        return ": it is zero" + kink
    lo, hi = float(w.amin()), float(w.amax())
    return (f" (its force λ_j ‖∇g_j‖ is {lo:.1e}" + ("" if hi == lo else f" to {hi:.1e}") + " of the element's "
            f"scale ‖H‖‖y‖ + ‖∇_y f‖, at most solution_tol={tol:g}). If it is truly zero{kink}; if it is small but "
            "nonzero, the gradient is exact (a smaller solution_tol, where solve is that accurate, tells them apart)")
