"""The generic implicit backward of a declarative node (Gould et al. 2021, Prop. 4.4–4.6, §6.1).

:func:`declarative_vjp` differentiates the solution ``y`` of

.. math::

    y(x_1, \\dots, x_k) \\in \\operatorname*{argmin}_{u} f(x, u)
    \\quad\\text{subject to}\\quad h(x, u) = 0,\\; g(x, u) \\le 0

through its first-order optimality conditions, given only ``f``, ``h`` and ``g`` as
differentiable torch code: one KKT system per batch element (solved by a linear solver
of :mod:`.linear_solvers`) and one autograd vector–Jacobian product, never forming
:math:`D^2_{XY} f` nor :math:`Dy`. Everything is formed and solved in float64 (by
default) whatever the dtype of the data, and cast back at the end.

References:
    S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks",
    IEEE TPAMI 44(8), 2021.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._autograd import outside_compile
from .._warn import warn
from ..errors import GradientWarning, InputError
from .degeneracy import naming_batch, warn_curved
from .graph import second_derivatives
from .implicit_options import check_implicit_options
from .implicit_system import implicit_system
from .lagrangian import ConstraintFn, _grads
from .linear_solvers import LinearSolver

__all__ = ["declarative_vjp"]

Tensor = torch.Tensor


@outside_compile  # (it differentiates the objective more than once: see outside_compile)
def declarative_vjp(
    objective: Callable[..., Tensor],
    xs: Tensor | Sequence[Tensor],
    y: Tensor,
    grad_y: Tensor,
    *,
    equality_constraints: ConstraintFn | None = None,
    inequality_constraints: ConstraintFn | None = None,
    params: Sequence[Tensor] = (),
    known: Sequence[Tensor] = (),
    linear_solver: str | LinearSolver = "auto",
    dense_max: int | None = None,
    active_tol: float = 1e-6,
    cg_options: dict[str, Any] | None = None,
    check_solution: bool = True,
    solution_tol: float | None = None,
    work_dtype: torch.dtype = torch.float64,
    name: str = "",
    batch_shape: Sequence[int] | None = None,
    check_minimum: bool = True,
    inputs_asked: Sequence[bool] | None = None,
) -> tuple[Tensor | tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Vector–Jacobian product of a declarative node's solution, by implicit differentiation.

    ``y`` must satisfy, for every batch element, the first-order optimality conditions

    .. math::

        \\nabla_y f(x, y) + A^\\top \\lambda = 0, \\qquad c_{\\mathcal A}(x, y) = 0,

    where :math:`c_{\\mathcal A}` stacks the equality constraints and the active
    inequality constraints (those with :math:`g_j \\ge -\\text{active\\_tol}\\,
    \\|\\nabla_y g_j\\|\\,\\|y\\|`, a test relative to each constraint's own scale;
    the others are dropped, Prop. 4.6) and :math:`A = D_y c_{\\mathcal A}`. The
    multipliers are recovered from the solution as the least-squares solution of
    :math:`A^\\top \\lambda = -\\nabla_y f` (eq. 25), or the nonnegative least-squares
    one where that gives an active inequality a negative multiplier (dependent active
    constraints, e.g. a degenerate vertex; :mod:`.multipliers`). With the Lagrangian
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
    is formed. ``x`` and ``y`` may have any shape after the batch dimension: ``y`` is
    flattened to ``m`` entries for the linear algebra and handed to the user's
    functions in its own shape.

    Checks, each naming the batch elements concerned:

    - the returned point is verified (``check_solution``): the KKT residuals of
      :func:`~convexddn.nodes.optimality.kkt_residuals`, relative to the problem's
      scale (where an offset in the data inflates that scale, also as ``y``'s error
      relative to ``y``), give a :class:`~convexddn.errors.GradientWarning` above ``solution_tol``
      and a :class:`~convexddn.errors.SolverError` above ``0.1``; an active inequality
      whose multiplier is zero within ``solution_tol`` gives a warning with its size
      (only a truly zero one fails strict complementarity: one-sided derivatives);
    - a singular or ill-conditioned KKT system gives a warning (the pseudo-inverse
      solution is used where singular), on the dense and the CG path alike;
    - a KKT point that is not a local minimiser (``check_minimum``: the KKT matrix's
      inertia shows negative curvature of the Lagrangian's Hessian on the active
      constraints' tangent space, where the dense system is formed) gives a warning:
      its derivative is not the declared argmin's;
    - linearly dependent active constraints give a warning where data entering them
      could break the dependence (the gradient's split among them is then not unique;
      ``(h, 2h)`` is silent, ``Σy = s, Σy = t`` at ``t = s`` warns), and where their
      curvature reaches the gradient (LICQ fails: a bound tangent to a ball, two touching
      disks, ``y₀² = 0``; the multipliers' split enters the Lagrangian's Hessian,
      :class:`~convexddn.nodes.degeneracy.DependenceCheck`);
    - ``objective`` must depend on ``y`` through autograd, and every tensor that
      requires grad in the objective's or the constraints' graph must be in ``xs``,
      ``y`` or ``known`` (else it would silently get no gradient).

    Args:
        objective: ``f(*xs, y) -> (B,)``; each entry must depend only on its own row.
        xs: the inputs, each ``(B, ...)``; a tensor or a sequence of tensors.
        y: the solution ``(B, ...)``.
        grad_y: incoming gradient, shaped like ``y``.
        equality_constraints: ``h(*xs, y) -> (B, ...)``, feasible where zero, or ``None``.
        inequality_constraints: ``g(*xs, y) -> (B, ...)``, feasible where ``<= 0``, or
            ``None``.
        params: further tensors to differentiate with respect to (e.g. a module's
            parameters), each requiring grad. Default ``()``.
        known: tensors that may require grad in the graph without being differentiated
            (e.g. parameters not asked for). ``params`` are always known.
        linear_solver: ``"auto"`` (default: ``"dense"`` for small systems, ``"cg"``
            for large ones; see ``dense_max``), ``"dense"`` (:func:`solve_kkt_dense`),
            ``"cg"`` (:func:`solve_kkt_cg`) or a callable with the same signature.
        dense_max: size limit ``m + p + q`` of the ``"auto"`` dense choice. Default
            ``None``: the measured rule of
            :func:`~convexddn.nodes.linear_solvers.resolve_linear_solver`.
        active_tol: inequality constraint ``j`` is active where ``g_j >= -active_tol *
            ‖∇_y g_j‖ ‖y‖`` (relative to how much ``g_j`` moves when ``y`` moves by its
            own size; at least 8 epsilons of ``y``'s dtype; ``‖y‖`` at least 1e-3 of how
            far the objective's curvature lets ``y`` move). Larger where ``solve`` approaches
            bounds without reaching them (the SolverError names the value). Default ``1e-6``.
        cg_options: keyword arguments of :func:`solve_kkt_cg` (``tol``, ``max_iter``); with
            ``"cg"`` or ``"auto"`` only (``"dense"`` and a callable never run CG: OptionError).
        check_solution: verify the KKT conditions at ``y``. Default ``True``.
        solution_tol: relative residual that triggers the warning. Default ``None``
            (``max(1e-6, sqrt(eps))`` of ``y``'s dtype).
        work_dtype: dtype of the linear algebra. Default float64.
        name: prefix for messages (e.g. the node's class name).
        batch_shape: the caller's batch shape, to report indices in it.
        check_minimum: warn where ``y`` is a saddle point or a maximiser (see above);
            ``False`` for nodes that declare stationary points (e.g. all eigenvectors of
            a symmetric matrix). Default ``True``.
        inputs_asked: one flag per input, whether its gradient is wanted (the others' are
            computed all the same, and returned); the degeneracy warnings judge only what
            is wanted (dependent curved constraints reach an unwanted input's derivative
            alone: no warning). Default ``None``: all.

    Returns:
        ``(grad_xs, grad_params)``: one gradient per input, in the input's dtype
        (a tensor if ``xs`` was a tensor, else a tuple), and one per entry of
        ``params`` (zeros where a parameter is unused).

    Raises:
        ShapeError: if ``objective`` does not return ``(B,)`` or a constraint function
            does not return ``(B, ...)``.
        DTypeError: if one of them returns something other than a tensor.
        ProblemError: if ``objective`` does not depend on ``y``.
        InputError: if one of ``params`` does not require grad.
        InputError: if a tensor outside ``xs``, ``y``, ``params`` and ``known`` requires
            grad in their graph.
        SolverError: if ``y`` is far from a KKT point (relative residual above 0.1).
        ProblemError: if a constraint's value at ``y`` is NaN, or Inf (an inequality's:
            +Inf; not defined there, or overflowing ``work_dtype``), or an active
            constraint's Jacobian in ``y`` is NaN or Inf (not differentiable at the
            solution), or the objective or a constraint uses an operation that torch
            cannot differentiate twice (or does not depend on ``y``).
        OptionError: for an unknown ``linear_solver`` name, ``cg_options`` with a
            ``linear_solver`` that never runs CG, or another option out of range.

    Warns:
        GradientWarning: see the checks above; also when the gradient would contain
        NaN or Inf (those entries are set to zero). A NaN or Inf in ``grad_y`` (upstream's)
        makes those elements' gradients NaN, silently, as torch propagates it.

    .. note::
        Each call synchronises with the device a few times (the checks, and CG
        convergence every ``check_every`` iterations); nothing loops over batch
        elements.

    References:
        S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks", TPAMI 2021,
        Prop. 4.4, 4.5, 4.6, eq. 25, §4.7.4 and §6.1.
    """
    check_implicit_options(linear_solver, dense_max, active_tol, cg_options, check_solution, solution_tol,
                           work_dtype, check_minimum)
    single = isinstance(xs, torch.Tensor)
    xs = (xs,) if single else tuple(xs)
    params = tuple(params)
    # (autograd cannot differentiate them: torch's raw "One of the differentiated Tensors does not require grad")
    frozen = [i for i, p in enumerate(params) if not p.requires_grad]
    if frozen:
        raise InputError(f"{name + ': ' if name else ''}params {frozen} do not require grad: declarative_vjp "
                         "differentiates with respect to params by autograd; pass only tensors that require grad "
                         "(a frozen parameter is a constant of the problem: leave it out)")
    batch = y.shape[0]
    m = math.prod(y.shape[1:])
    prefix = f"{name}." if name else ""
    who = f"{name}: " if name else ""
    if batch == 0 or m == 0:
        zeros = tuple(torch.zeros_like(x) for x in xs)
        return (zeros[0] if single else zeros), tuple(torch.zeros_like(p) for p in params)
    # (its messages name the rows in the caller's batch_shape; after the block, passed explicitly)
    with naming_batch(batch_shape), torch.enable_grad(), second_derivatives(prefix):
        k = implicit_system(objective, xs, y, equality_constraints, inequality_constraints, params, known,
                            linear_solver, dense_max, active_tol, cg_options, check_solution, solution_tol,
                            work_dtype, name, batch_shape, check_minimum)
        xg, gL, c = k.xg, k.gL, k.c
        gy = grad_y.detach().to(work_dtype).reshape(batch, m)
        # A NaN or Inf in the incoming gradient (a fault upstream) must not reach the
        # solver, whose probes and pivots mix batch elements: those rows are solved with
        # zero, and their gradients made NaN below (torch would propagate it).
        upstream = ~torch.isfinite(gy).all(-1)
        w, mu = k.solve(torch.where(k.zero_rhs(upstream).unsqueeze(-1), 0.0, gy))
        if k.dependence is not None:
            warn_curved(who, k.dependence.curvature_reaches(w, asked=inputs_asked))
        # -(w^T D_x (grad_y L) + mu^T D_x c): the product with B = D^2_xy L as one vjp.
        target = -(gL * w.detach()).sum()
        if c is not None:
            target = target - (c * mu.detach()).sum()
        grads = _grads(target, xg + params, create_graph=False)
    grads = tuple(g.detach() for g in grads)
    dtypes = [x.dtype for x in xs] + [p.dtype for p in params]
    cast = tuple(g.to(dt) for g, dt in zip(grads, dtypes))
    # Never hand back NaN or Inf silently: one host sync for the tests below.
    bad = [~torch.isfinite(g) for g in grads]
    lost = [~torch.isfinite(c) & ~b for c, b in zip(cast, bad)]
    flags = torch.stack([t.any() for t in bad + lost] + [upstream.any()]).tolist()
    if any(flags[:-1]):
        counts = [int(b.sum()) for b in bad]
        if sum(counts):
            warn(
                f"{who}the implicit gradient has {sum(counts[:len(xs)])} non-finite "
                f"entries for the inputs and {sum(counts[len(xs):])} for params (the "
                "objective or constraints are not twice differentiable at the "
                "solution?); they are set to zero",
                GradientWarning,
            )
            cast = tuple(torch.where(b, 0.0, c) for c, b in zip(cast, bad))
        over = [int(t.sum()) for t in lost]
        if sum(over):
            warn(
                f"{who}{sum(over)} gradient entries are finite in {work_dtype} but "
                f"overflow the inputs' or parameters' dtype ({dtypes[0]}): they are Inf "
                "(the true gradient is that large; use a wider dtype)",
                GradientWarning,
            )
    if flags[-1]:
        # A NaN or Inf incoming gradient (a fault upstream, or a GradScaler's fp16 overflow) makes those
        # elements' input gradients NaN, and the parameters' (summed over the batch) too, silently, as
        # torch, the native nodes and ConvexLayer propagate it: GradScaler detects the overflow by it, and
        # a warning would fire at each of its skipped steps (the NaN is not this node's).
        cast = tuple(torch.where(upstream.view((-1,) + (1,) * (g.dim() - 1)), math.nan, g)
                     if i < len(xs) and g.dim() and g.shape[0] == batch else torch.full_like(g, math.nan)
                     for i, g in enumerate(cast))
    grad_xs, grad_params = cast[:len(xs)], cast[len(xs):]
    return (grad_xs[0] if single else grad_xs), grad_params
