"""The optimality conditions of a declarative node at its solution, checked and ready to
differentiate: :func:`implicit_system`, shared by the reverse (:mod:`.implicit`) and the
forward (:mod:`.implicit_jvp`) implicit derivatives.

The inputs and the solution become leaves in the work dtype; the user's objective and
constraints are called and checked (:mod:`.lagrangian`), the active set and the
multipliers recovered (:mod:`.multipliers`), the Lagrangian's gradient built with its graph
and the solution verified (:mod:`.optimality`); :class:`ImplicitSystem` then solves the KKT
system for any right-hand side.

References:
    S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks",
    IEEE TPAMI 44(8), 2021.
"""
from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.autograd.forward_ad as fwAD

from .._autograd import plain
from .._checks import cast_checked
from .._warn import suppressed, warn
from ..errors import GradientWarning
from ._custom_solver_check import checked_custom_solve
from ._strong_zero import strong_zero_fn, zero_passing
from .degeneracy import DependenceCheck, naming, shown_indices
from .graph import check_curvature, check_graph, check_second_order, ill_determined, lagrangian_gradient
from .inputs import input_names
from .krylov import pseudo_random_directions
from .lagrangian import (ROUNDING_MARGIN, _batched_vjp, _check_jacobian, _check_values, _constraint, _constraints,
                         _grads, _kink_length, _lagrangian_parts, _non_finite_derivatives, _objective,
                         _solution_length, gradient_at, kinked, lagrangian_probes, seed_rounding)
from .linear_solvers import LinearSolver, resolve_linear_solver
from .multipliers import inactive_mask, multipliers, near_active, scaled_norm
from .optimality import _ROUNDING, default_solution_tol, kkt_residuals, term_norms, verify_kkt
from .solver_result import checked_solver_result

__all__ = ["ImplicitSystem", "implicit_system"]

Tensor = torch.Tensor


class ImplicitSystem(NamedTuple):
    """The optimality conditions of a declarative node at its solution, ready to
    differentiate (:func:`implicit_system`): the inputs as leaves in the work dtype,
    ``gL`` = ∇_y L with its graph, the active constraints ``c`` and their Jacobian ``A``
    (inactive rows zero), elements whose Lagrangian is not twice differentiable
    (``broken``), and :meth:`solve` for the KKT system [[H, Aᵀ], [A, D]] [w; μ] = [v; 0]."""

    xg: tuple[Tensor, ...]
    gL: Tensor
    c: Tensor | None
    A: Tensor | None
    inactive: Tensor | None
    broken: Tensor | None
    hvp: Callable[[Tensor], Tensor]
    solver: LinearSolver
    checked: bool  # the solver is a user's: its result is checked
    dependence: DependenceCheck | None = None  # where dependent constraints' multipliers reach
    name: str = ""  # the node's, for the solvers' degeneracy warnings
    fallback: LinearSolver | None = None  # the built-in solver, for a user's answer that misses its system
    mixed: Callable[..., tuple[Tensor, Tensor | None]] | None = None  # (B ẋ, C ẋ) in forward mode: _mixed_products

    def zero_rhs(self, rows: Tensor) -> Tensor:
        """Rows solved with a zero right-hand side: ``rows`` and the broken elements."""
        return rows if self.broken is None else rows | self.broken

    def solve(self, v: Tensor) -> tuple[Tensor, Tensor | None]:
        """(w, μ) of the KKT system with right-hand side [v; 0], ``v`` (B, m)."""
        with naming(self.name):
            result = self.solver(self.hvp, self.A, self.inactive, v)
        if not self.checked:  # (ours are checked by construction)
            return result
        # A user's: its structure, then whether it solves the system (else the built-in's answer)
        w, mu = checked_solver_result(result, v.shape[0], v.shape[1], None if self.c is None else self.c.shape[1])
        with naming(self.name):
            return checked_custom_solve(self.hvp, self.A, self.inactive, v, w, mu, self.fallback,
                                        f"{self.name}: " if self.name else "")

    def quiet_step(self, r: Tensor, release: Tensor | None = None) -> Tensor:
        """The ``y`` part of the solution for ``[r; 0]`` (the Newton step of a residual
        ``r`` (B, m)), the active constraints ``release`` (B, r) made inactive, without the
        library's warnings about the system, which the gradient's solve gives (held in this
        thread only: a user's solver's own warnings are not, a warnings filter being
        process-wide)."""
        system = self
        if release is not None and bool(release.any()):
            system = self._replace(A=self.A.masked_fill(release.unsqueeze(-1), 0.0), inactive=self.inactive | release)
        with suppressed():
            return system.solve(r)[0]


def _term_scale(total: Tensor, A: Tensor | None, lam: Tensor | None) -> Tensor:
    """``(B,)`` ``‖Hu‖‖y‖ + ‖∇_y f‖ + Σ ‖Bᵀu‖‖x‖ + Σ_j |λ_j|‖a_j‖``: how large the
    terms of ``∇_y L`` are (``total``: the stationarity scale of
    :func:`~.optimality.term_norms`, and the constraints' terms, which cancel each other
    where active rows are nearly parallel)."""
    return total if A is None else total + (lam.detach().abs() * scaled_norm(A.detach())).sum(-1)


def _measured_rounding(lagrangian: Tensor, yg: Tensor, gL: Tensor) -> Tensor:
    """``(B, m)`` the measured rounding of ``gL`` = ∇_y L (:func:`~.lagrangian.seed_rounding`:
    ``lagrangian`` (B,) differentiated again with incoming gradients near 1)."""
    seed = lagrangian.detach()
    return seed_rounding(lambda c: _grads(lagrangian, yg, False, seed=torch.full_like(seed, c))[0], gL.detach())


def _element_hvp(gL: Tensor, yg: Tensor, broken: Tensor | None) -> Callable[[Tensor], Tensor]:
    """``hvp(D)``: the Hessian of the Lagrangian times directions ``D`` ``(k, B, m)``, one
    vjp of ``gL`` = ∇_y L ``(B, m)``; broken elements get ``H = I`` (and a zero right-hand
    side, :meth:`ImplicitSystem.zero_rhs`, so ``w = 0`` there)."""
    def hvp(directions: Tensor) -> Tensor:
        if broken is None:
            return _batched_vjp(gL, yg, directions)
        return torch.where(broken[:, None], directions, _batched_vjp(gL, yg, directions))
    return hvp


def _rows_hvp(objective, fns, prefix: str, xg, yg: Tensor, event, lam: Tensor | None, inactive: Tensor | None,
              broken: Tensor | None, idx: Tensor) -> Callable[[Tensor], Tensor]:
    """The ``hvp`` of the batch elements ``idx`` ``(n,)`` alone, ``(k, n, m) -> (k, n, m)``:
    their Lagrangian :math:`f + \\lambda^\\top c` built again from their rows of the inputs
    and the solution (the multipliers, fixed, taken from the whole batch's), so a product
    costs ``n`` elements, not ``B``. The linear solvers ask for it once most elements'
    systems are solved (:mod:`.krylov`, :mod:`.linear_solvers`); each element's Hessian
    is its own, as every declarative node's problem is (its value is checked there)."""
    xs = tuple(x.detach().index_select(0, idx) for x in xg)
    ys = yg.detach().index_select(0, idx).requires_grad_(True)
    yv = ys.view((idx.numel(),) + tuple(event))
    pick = (lambda t: None if t is None else t.index_select(0, idx))
    f = _objective(f"{prefix}objective", objective, xs, yv)
    c = _constraints(prefix, fns, xs, yv)
    f_L, c_L = _lagrangian_parts(objective, fns, prefix, xs, yv, f, c, pick(inactive), pick(broken))
    lagrangian = f_L + (0.0 if c_L is None else (pick(lam) * c_L).sum(-1))
    return _element_hvp(lagrangian_gradient(prefix, lagrangian, ys)[0], ys, pick(broken))


def _mixed_products(objective, fns, prefix: str, xg, yg: Tensor, event, lam: Tensor | None,
                    inactive: Tensor | None, broken: Tensor | None, tangents) -> tuple[Tensor, Tensor | None]:
    """``(B ẋ, C ẋ)`` ``(B, m)``, ``(B, r)``: the derivatives of ``∇_y L`` and of the constraints
    along the inputs' ``tangents`` (one per entry of ``xg``, or None), by forward mode over one
    reverse product: the Lagrangian built again from dual inputs, its gradient in y taken once.
    Needs forward derivatives of what the objective and constraints do to the inputs, where
    the reverse-over-reverse products of :mod:`.implicit_jvp` need their double backward (which
    a once-differentiable operation on the inputs alone, e.g. a native node, lacks).

    Called from the node's ``jvp``, that is inside the caller's forward-mode level, where
    torch neither nests another level (``torch.func.jvp`` too) nor propagates tangents: the
    duals are made at the caller's level with forward gradients enabled for this evaluation
    (of detached copies, so nothing of the caller's graph gets a tangent); outside any level
    (a direct call), in a level of its own."""
    ys = yg.detach()
    level = contextlib.nullcontext() if fwAD._current_level >= 0 else fwAD.dual_level()
    with level, fwAD._set_fwd_grad_enabled(True), torch.enable_grad():
        xs = tuple(x.detach() if t is None else fwAD.make_dual(x.detach(), t) for x, t in zip(xg, tangents))
        point = ys.clone().requires_grad_(True)
        yv = point.view((ys.shape[0],) + tuple(event))
        f = _objective(f"{prefix}objective", objective, xs, yv)
        c = _constraints(prefix, fns, xs, yv)
        f_L, c_L = _lagrangian_parts(objective, fns, prefix, xs, yv, f, c, inactive, broken)
        lagrangian = f_L + (0.0 if c_L is None else (lam * c_L).sum(-1))
        (g,) = torch.autograd.grad(lagrangian.sum(), point, allow_unused=True)
        # (no tangent where nothing read a dual input)
        Bx = None if g is None else fwAD.unpack_dual(g).tangent
        Cx = None if c is None else fwAD.unpack_dual(c).tangent
    return (torch.zeros_like(ys) if Bx is None else Bx.detach(),
            None if c is None else (torch.zeros_like(c.detach()) if Cx is None else Cx.detach()))


def _isolate(fns: tuple, inactive: Tensor, broken: Tensor, n_eq: int) -> tuple:
    """``fns`` (equality, inequality constraint functions) whose inequalities' graphs keep
    inactive rows out of the derivatives (:func:`~._strong_zero.strong_zero_fn`): evaluated
    once for the elements that are not ``broken`` (B,) and once per pattern of inactive rows
    among those that are (one group for a row inactive everywhere)."""
    ineq = inactive[:, n_eq:]
    groups = [] if bool(broken.all()) else [(~broken, ineq[~broken].all(0))]
    patterns, which = torch.unique(ineq[broken], dim=0, return_inverse=True)
    idx = broken.nonzero().squeeze(-1)
    for k in range(patterns.shape[0]):
        groups.append((torch.zeros_like(broken).index_fill(0, idx[which == k], True), patterns[k]))
    return fns[0], strong_zero_fn(fns[1], groups)


def _active_jacobian(c: Tensor, ineq: Tensor | None, yg: Tensor, gf: Tensor, n_eq: int, active_tol,
                     dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``(A, inactive, A_all, length)``: the constraints' Jacobian ``(B, r, m)`` in ``yg``, rows of
    the inactive inequalities (``(B, r)`` mask, from :func:`~.multipliers.inactive_mask`) zero; the
    Jacobian with every row (``A_all``, for :func:`~.multipliers.near_active`'s report) and the
    solution's length (None without inequalities)."""
    batch, r = c.shape
    eye_r = torch.eye(r, dtype=yg.dtype, device=yg.device)
    A = _batched_vjp(c, yg, eye_r.unsqueeze(1).expand(r, batch, r)).transpose(0, 1)
    inactive = torch.zeros(batch, r, dtype=torch.bool, device=yg.device)
    length = None
    if ineq is not None:
        length = _solution_length(gf, yg)
        inactive[:, n_eq:] = inactive_mask(ineq.detach(), A[:, n_eq:], length, active_tol, dtype)
    return A.masked_fill(inactive.unsqueeze(-1), 0.0), inactive, A, length


def implicit_system(objective, xs: tuple[Tensor, ...], y: Tensor, equality_constraints, inequality_constraints,
                    params: tuple[Tensor, ...], known, linear_solver, dense_max, active_tol, cg_options,
                    check_solution: bool, solution_tol, work_dtype: torch.dtype, name: str,
                    batch_shape, check_minimum: bool = True) -> ImplicitSystem:
    """The checks and the system shared by :func:`declarative_vjp` and
    :func:`~convexddn.nodes.implicit_jvp.declarative_jvp` (arguments as theirs); call
    under ``torch.enable_grad()`` and ``second_derivatives``."""
    batch = y.shape[0]
    m = math.prod(y.shape[1:])
    prefix = f"{name}." if name else ""
    who = f"{name}: " if name else ""
    # (plain: an input made under torch.inference_mode() that is already of the working
    # dtype would be the inference tensor itself, which refuses requires_grad -- forward
    # mode saves its inputs as they came)
    # (checked casts: float64 data beyond float32's range with implicit_dtype=float32 became
    # Inf, and the backward blamed the objective's derivatives, "not twice differentiable")
    names = input_names(len(xs))
    into, fix = "the backward's implicit_dtype", "pass implicit_dtype=torch.float64"
    xg = tuple(cast_checked(n, plain(x.detach()), work_dtype, into, fix).requires_grad_(True)
               for n, x in zip(names, xs))
    yg = cast_checked(f"{prefix}solve's output y", y.detach(), work_dtype, into, fix).reshape(batch, m)
    yg.requires_grad_(True)
    yv = yg.view(y.shape)
    f = _objective(f"{prefix}objective", objective, xg, yv)
    eq = _constraint(f"{prefix}equality_constraints", equality_constraints, xg, yv)
    ineq = _constraint(f"{prefix}inequality_constraints", inequality_constraints, xg, yv)
    custom = []
    _, of_c = check_graph(name, f, {"equality_constraints": eq, "inequality_constraints": ineq}, yg,
                          allowed=xg + params + tuple(known), custom=custom)
    # Dependent constraints make the multipliers non-unique; that matters for the
    # gradient through data that enters the constraints, where the data can break the
    # dependence, and through the constraints' curvature, where the split enters the
    # Lagrangian's Hessian (LICQ fails: degeneracy.DependenceCheck).
    # (a parameter read in another dtype enters as its cast: a computed leaf)
    data_in_constraints = any(id(t) in of_c for t in xg + params) or any(
        t.grad_fn is not None for t in of_c.values())
    parts = [c for c in (eq, ineq) if c is not None]
    n_eq = 0 if eq is None else eq.shape[1]
    c = A = lam = inactive = near = None
    # (with a graph where the activity test probes its curvature, _solution_length)
    (gf,) = _grads(f.sum(), yg, create_graph=ineq is not None)
    fns = (equality_constraints, inequality_constraints)
    isolated = False  # (inactive rows kept out of the second derivatives: _isolate, where needed)
    if parts:
        c = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        _check_values(prefix, c, n_eq, batch_shape)
        gf_graph = gf
        A, inactive, A_all, length = _active_jacobian(c, ineq, yg, gf_graph, n_eq, active_tol, y.dtype)
        gf = gf.detach()
        if not bool(torch.isfinite(A).all()):
            if bool(inactive.any()):  # (maybe an inactive row's 0 · ∞ through y: _strong_zero)
                with zero_passing(c, (yv, *xg)):
                    A, inactive, A_all, length = _active_jacobian(c, ineq, yg, gf_graph, n_eq, active_tol, y.dtype)
            _check_jacobian(prefix, A, n_eq, batch_shape)
        if ineq is not None:
            # (the slack rows kept for the report: near_active, read only where a check fails)
            near = functools.partial(near_active, ineq.detach(), A_all, length, gf, n_eq, inactive, active_tol)
        # eq. 25: multipliers that best satisfy stationarity at the given y
        # (nonnegative on active inequalities where least squares is not).
        lam = multipliers(A, gf, n_eq, inactive)
    broken = None
    diff = []  # (the kink probe's central difference, for the resolution test below)
    while True:
        # Elements whose Lagrangian cannot be differentiated (first pass: those without
        # an active constraint are left out of the constraint part; last: broken
        # ones altogether) enter it through detached inputs, see _lagrangian_parts.
        f_L, c_L = _lagrangian_parts(objective, fns, prefix, xg, yv, f, c, inactive, broken)
        lagrangian = f_L + (0.0 if c is None else (lam * c_L).sum(-1))
        gL, seed = lagrangian_gradient(prefix, lagrangian, yg)
        # (measured at most once per Lagrangian: the second-order check and the KKT re-test
        # below may both need it, where saturated terms round above the scale's floor)
        rounding = functools.cache(functools.partial(_measured_rounding, lagrangian, yg, gL))
        if broken is not None:
            break
        u = pseudo_random_directions(m, batch, yg.dtype, yg.device)
        grad_at = gradient_at(objective, fns, prefix, xg, y.shape, lam, inactive)  # (∇_y L at other points)
        *probes, d_seed = lagrangian_probes(gL, yg, xg, seed, u)
        probes = tuple(probes)
        norms = term_norms(yg, xg, gf, probes)
        terms = _term_scale(norms[4], A, lam)
        if custom:  # (torch's own operations cannot drop a graph: their gap is rounding)
            check_second_order(prefix, gL, u, d_seed, terms, batch_shape, rounding=rounding)
            curvature = torch.zeros_like(terms) if probes[0] is None else probes[0].detach().abs().amax(-1)
            length = _kink_length(yg.detach(), curvature, terms.detach())
            check_curvature(prefix, grad_at, yg.detach(), u, probes[0], length, custom, batch_shape)
        broken = _non_finite_derivatives(gL, probes)
        if broken is not None and not isolated and ineq is not None and bool((inactive & broken[:, None]).any()):
            # (maybe an inactive row's NaN, 0 · ∞, through y: the constraints built again, isolated)
            isolated, fns, broken = True, _isolate(fns, inactive, broken, n_eq), None
            c = _constraints(prefix, fns, xg, yv)
            continue
        if broken is not None:
            warn(
                f"{who}the first or second derivatives of the Lagrangian in y are NaN or Inf at "
                f"the solution for {shown_indices(broken)}: the objective or a constraint is not "
                "twice differentiable there as written (e.g. sqrt or a norm at 0, whose autograd "
                "derivatives are 0/0 even where the function is smooth: write ‖u‖³ as "
                "(u*u).sum()**1.5), so no implicit derivative can be formed; their gradients "
                "(tangents, in forward mode) are set to zero", GradientWarning)
        elif check_solution:
            broken = kinked(grad_at, yg, u, probes[0], gf, gL, terms.detach(), diff=diff)
            if broken is not None:
                warn(
                    f"{who}the gradient of the Lagrangian in y jumps at the solution for "
                    f"{shown_indices(broken)}: the objective or a constraint has a kink there "
                    "(e.g. |y_i| at y_i = 0, a vertex of an L1 ball, max or clamp at a tie), where "
                    "autograd's derivatives are one-sided choices and the implicit derivative "
                    "(which needs twice-differentiable functions) would be that of another "
                    "problem; their gradients (tangents, in forward mode) are set to zero "
                    "(check_solution=False skips this probe)", GradientWarning)
        if broken is None:
            break
        gf = torch.where(broken.unsqueeze(-1), 0.0, gf)
        if c is not None:  # their constraints as inactive: zero rows, pinned multipliers
            inactive = inactive | broken.unsqueeze(-1)
            A_rows, A = A, A.masked_fill(broken[:, None, None], 0.0)
    c = c_L

    hvp = _element_hvp(gL, yg, broken)
    # (the Lagrangian of the elements idx alone, built again: a graph over the whole batch
    # costs the whole batch per product, also where only one element's solve is left)
    hvp.rows = functools.partial(_rows_hvp, objective, fns, prefix, xg, yg, y.shape[1:], lam, inactive, broken)
    mixed = functools.partial(_mixed_products, objective, fns, prefix, xg, yg, y.shape[1:], lam, inactive, broken)

    solver = resolve_linear_solver(linear_solver, m + (0 if c is None else c.shape[1]),
                                   dense_max, cg_options, batch)
    fallback = None
    if isinstance(linear_solver, str):
        dependence = None if c is None else DependenceCheck(c, A, inactive, yg, xg, params,
                                                             first_order=data_in_constraints)
        solver = functools.partial(solver, warn_dependent=dependence or False, check_minimum=check_minimum)
    else:
        dependence = None
        # (where a user's answer misses its system: _custom_solver_check; dependent constraints are
        # not judged on this path, as with the user's own solver)
        fallback = functools.partial(resolve_linear_solver("auto", m + (0 if c is None else c.shape[1]), dense_max,
                                                           None, batch),
                                     warn_dependent=False, check_minimum=check_minimum)
    system = ImplicitSystem(xg, gL, c, A, inactive, broken, hvp, solver, callable(linear_solver), dependence, name,
                            fallback, mixed)
    if check_solution:
        tol = default_solution_tol(y.dtype) if solution_tol is None else solution_tol
        # (the probes of the pass above, unless the Lagrangian was rebuilt after it; the
        # feasibility against the constraints' own rows, also where broken elements' rows
        # were zeroed: against zero rows, an equality's rounding was an error of 1e292;
        # the Newton step of the residual where offsets inflate its scale, solved
        # quietly: the system's warnings come with the gradient's own solve)
        steps = []

        def step(r: Tensor, release: Tensor | None = None) -> Tensor:
            # (once: the re-test below, whose rounding floor is higher, reads the step only
            # where the first pass did, and each element's step is its own; release is
            # the same in both, from the same multipliers)
            if not steps:
                steps.append(system.quiet_step(r) if release is None else system.quiet_step(r, release))
            return steps[0]

        kkt = functools.partial(
            kkt_residuals, yg, xg, gf, gL, c, A, lam, n_eq, inactive, tol, eps=torch.finfo(y.dtype).eps,
            probes=probes if broken is None else None, norms=norms if broken is None else None,
            step=step, feasibility_rows=None if broken is None or c is None else A_rows)
        res = kkt()
        if bool((res.stationarity > tol).any()):
            # Before reporting: a residual within the measured rounding of ∇_y L is not
            # counted, in the units of the scale's own floor (_ROUNDING eps of it), which
            # saturated terms that cancel exceed (a pooling's Newton step of its rounding
            # was a "poor" solution for 1 in 2000; the measured rounding of that residual
            # was at least half of it, at most twice).
            res = kkt(rounding=_ROUNDING * scaled_norm(rounding()))
        verify_kkt(prefix, res, tol, batch_shape, near_active=near if broken is None else None)
        # (rows with an active constraint are judged by the KKT system's conditioning; broken ones have no gradient)
        free = None if c is None else inactive.all(-1)
        if broken is not None:
            free = ~broken if free is None else free & ~broken
        loose = None if not diff else ill_determined(gradient_at(objective, fns, prefix, xg, y.shape, lam, inactive),
                                                     yg.detach(), u, probes[0], *diff[0], terms.detach(), tol, free)
        if loose is not None:
            warn(f"{who}the Hessian of the Lagrangian in y is near singular at {yg.dtype}'s precision for "
                 f"{shown_indices(loose)}: the rounding of its gradient (terms that cancel at the solution, e.g. "
                 "saturated penalties, are far larger than its curvature) leaves the solution determined only to "
                 f"more than solution_tol={tol:g} of its length, so the implicit gradient is unreliable "
                 "(ill-conditioned). Rescale the problem (e.g. a wider penalty) so that the curvature at the "
                 "solution is not lost in rounding", GradientWarning)
    return system
