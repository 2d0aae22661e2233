"""Forward mode of a declarative node: the Jacobian–vector product of its solution by
implicit differentiation, the twin of :func:`.implicit.declarative_vjp`.

Differentiating the optimality conditions :math:`\\nabla_y L(x, y, \\lambda) = 0,\\
c_{\\mathcal A}(x, y) = 0` along a tangent :math:`\\dot x` of the inputs (and parameters)
gives (Gould et al. 2021, Prop. 4.5 read forwards)

.. math::

    \\begin{bmatrix} H & A^\\top \\\\ A & 0 \\end{bmatrix}
    \\begin{bmatrix} \\dot y \\\\ \\dot\\lambda \\end{bmatrix}
    = -\\begin{bmatrix} B \\dot x \\\\ C \\dot x \\end{bmatrix},
    \\qquad H = D^2_{yy} L,\\ A = D_y c_{\\mathcal A},\\ B = D^2_{xy} L,\\ C = D_x c_{\\mathcal A}.

:math:`B \\dot x` and :math:`C \\dot x` come from one reverse product of the optimality
conditions, differentiated once more along :math:`\\dot x` (that product is linear in its
cotangent, so its gradient with respect to the cotangent is the forward product); neither
:math:`B` nor :math:`D y` is formed. The system is solved by the node's own linear solver,
which takes a zero second block: :math:`\\dot y = \\dot y_0 + w` with
:math:`\\dot y_0 = -A^+ C \\dot x` (the least-norm step that keeps the active constraints)
and :math:`[H, A^\\top; A, D]\\,[w; \\cdot] = [-B \\dot x - H \\dot y_0;\\ 0]`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._autograd import outside_compile
from .._warn import warn
from ..errors import GradientWarning, ProblemError
from .degeneracy import naming_batch, warn_curved
from .graph import second_derivatives, twice_refused
from .implicit_options import check_implicit_options
from .implicit_system import implicit_system
from .lagrangian import ConstraintFn
from .linear_solvers import LinearSolver, shown_indices
from .multipliers import unit_rows

__all__ = ["declarative_jvp"]

Tensor = torch.Tensor


@outside_compile  # (it differentiates the objective more than once: see outside_compile)
def declarative_jvp(
    objective: Callable[..., Tensor],
    xs: Tensor | Sequence[Tensor],
    y: Tensor,
    tangents: Tensor | None | Sequence[Tensor | None],
    *,
    equality_constraints: ConstraintFn | None = None,
    inequality_constraints: ConstraintFn | None = None,
    params: Sequence[Tensor] = (),
    param_tangents: Sequence[Tensor | None] = (),
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
) -> Tensor:
    """Jacobian–vector product :math:`\\dot y = D y\\, \\dot x` of a declarative node's
    solution, by implicit differentiation (see the module docstring for the system).

    Arguments as :func:`~convexddn.nodes.implicit.declarative_vjp`'s, with the incoming
    gradient replaced by tangents: ``tangents`` one per input (shaped like it; ``None``
    for none), ``param_tangents`` one per entry of ``params``. The same checks run (the
    solution, the active set, singular or ill-conditioned systems, dependent
    constraints), with the same warnings and errors.

    Shape:
        ``xs`` each ``(B, ...)``, ``y`` ``(B, ...)`` -> ``ẏ`` shaped like ``y``, in its dtype.

    Warns:
        GradientWarning: as the vjp's. A tangent that is not finite makes the rows it
        reaches NaN (a parameter's: every row), silently, as torch propagates it.
    """
    check_implicit_options(linear_solver, dense_max, active_tol, cg_options, check_solution, solution_tol,
                           work_dtype, check_minimum)
    xs = (xs,) if isinstance(xs, torch.Tensor) else tuple(xs)
    tangents = (tangents,) if tangents is None or isinstance(tangents, torch.Tensor) else tuple(tangents)
    params, param_tangents = tuple(params), tuple(param_tangents) or (None,) * len(params)
    batch, m = y.shape[0], math.prod(y.shape[1:])
    pairs = [(i, t) for i, t in enumerate(tangents + param_tangents) if t is not None]
    if batch == 0 or m == 0 or not pairs:
        return torch.zeros_like(y)
    prefix, who = (f"{name}.", f"{name}: ") if name else ("", "")
    # (its messages name the rows in the caller's batch_shape; after the block, passed explicitly)
    with naming_batch(batch_shape), torch.enable_grad(), second_derivatives(prefix, forward=True):
        k = implicit_system(objective, xs, y, equality_constraints, inequality_constraints, params, known,
                            linear_solver, dense_max, active_tol, cg_options, check_solution, solution_tol,
                            work_dtype, name, batch_shape, check_minimum)
        leaves = k.xg + params
        dirs = [(leaves[i], t.detach().to(leaves[i].dtype)) for i, t in pairs]
        # A tangent that is not finite (a fault upstream) must not reach the solver, whose
        # probes and pivots mix batch elements: those rows are solved with zero and made
        # NaN below; a parameter's reaches every row.
        upstream = torch.zeros(batch, dtype=torch.bool, device=y.device)
        for i, t in pairs:
            ok = torch.isfinite(t)
            upstream |= (~ok.reshape(batch, -1).all(-1) if i < len(xs) else ~ok.all().expand(batch))
        Bx, Cx = _mixed(k, dirs, pairs, len(xs), prefix)
        # Finite tangents with non-finite products: the mixed second derivatives (or the
        # constraints' derivatives in x) are NaN or Inf there, as the vjp finds them.
        mixed = ~torch.isfinite(Bx).all(-1)
        if Cx is not None:
            mixed |= ~torch.isfinite(Cx).all(-1)
        mixed &= ~upstream
        zero = k.zero_rhs(upstream | mixed).unsqueeze(-1)
        y0 = None
        if Cx is not None:
            # The least-norm step with A ẏ₀ = −C ẋ on the active rows (A's inactive and
            # broken rows are zero, so are theirs here).
            Cx = torch.where(zero | k.inactive, 0.0, Cx)
            # (Rows at unit length first: pinv's cut-off is relative to the largest
            # singular value, and a constraint written as 1e-20·(y₀ − d₀) = 0 lost its
            # row beside the others, a tangent 100 % off, silently.)
            An, inv = unit_rows(k.A)
            y0 = -(torch.linalg.pinv(An) @ (Cx.unsqueeze(-1) * inv)).squeeze(-1)
        rhs = -Bx if y0 is None else -Bx - k.hvp(y0.unsqueeze(0))[0]
        w, _ = k.solve(torch.where(zero, 0.0, rhs).detach())
        ydot = w if y0 is None else w + y0
        if k.dependence is not None:
            warn_curved(who, k.dependence.curvature_reaches(ydot, dirs), "tangent")
    ydot = ydot.detach()
    out = ydot.to(y.dtype)
    bad, lost = ~torch.isfinite(ydot), ~torch.isfinite(out)
    n_bad, n_lost, n_up, n_mixed = torch.stack([bad.sum(), (lost & ~bad).sum(), upstream.sum(),
                                                mixed.sum()]).tolist()
    if n_mixed:
        warn(f"{who}the mixed second derivatives of the Lagrangian (in y and the inputs or "
             f"parameters) or the constraints' derivatives are NaN or Inf for {shown_indices(mixed, batch_shape)} "
             "(not differentiable there as written, e.g. sqrt or a norm at 0); their tangents "
             "are set to zero", GradientWarning)
    if n_bad:
        warn(f"{who}the implicit tangent has {n_bad} non-finite entries (the objective or constraints "
             "are not twice differentiable at the solution?); they are set to zero",
             GradientWarning)
        out = torch.where(bad, 0.0, out)
    if n_lost:
        warn(f"{who}{n_lost} tangent entries are finite in {work_dtype} but overflow the solution's "
             f"dtype ({y.dtype}): they are Inf (the true tangent is that large; use a wider dtype)",
             GradientWarning)
    if n_up:  # (a NaN or Inf tangent: those output tangents are NaN, silently, as in reverse mode)
        out = torch.where(upstream.unsqueeze(-1), math.nan, out)
    return out.reshape(y.shape)


def _mixed(k, dirs: list[tuple[Tensor, Tensor]], pairs: list[tuple[int, Tensor]], n_inputs: int,
           prefix: str) -> tuple[Tensor, Tensor | None]:
    """``(B ẋ, C ẋ)`` by a second reverse product (:func:`_forward_products`) or, where that
    is refused or its graph lost (a once-differentiable operation on the inputs alone, such
    as a native node's ``robust_pool(x)``, whose forward derivative exists), by forward mode
    over one reverse product (:func:`~.implicit_system._mixed_products`); a parameter's
    tangent has only the first (the objective reads the parameters itself), where a product
    without a graph counts as zero (``sign``, ``round``: the old reading) and only torch's
    once-differentiable marker as lost."""
    params = any(i >= n_inputs for i, _ in pairs)
    refused = None
    try:
        products = _forward_products(k.gL, k.c, dirs, graphless_lost=not params)
    except (NotImplementedError, RuntimeError) as err:
        if not twice_refused(err):
            raise
        products, refused = None, err
    if products is not None:
        return products
    tangents = [None] * n_inputs
    try:
        if params:
            raise NotImplementedError("a parameter's tangent")
        for (_, t), (i, _) in zip(dirs, pairs):
            tangents[i] = t
        return k.mixed(tangents)
    except (NotImplementedError, RuntimeError, AttributeError):  # (AttributeError: a private torch API gone)
        if refused is not None:
            raise refused from None  # (second_derivatives names both ways)
        raise ProblemError(
            f"{prefix}objective or constraints apply to the inputs or parameters an operation whose backward "
            "is not itself differentiable (its gradient carries no autograd graph: a custom "
            "torch.autograd.Function marked once_differentiable, or whose backward runs under no_grad) and "
            "that has no forward derivative (jvp) where forward mode needs it (an input's tangent; a "
            "parameter's needs the double backward): forward mode forms the mixed derivative B·ẋ from one "
            "of the two. Give the Function a jvp or a differentiable backward, or compute the term outside "
            "the node and pass it as an input") from None


def _marked(g: Tensor) -> bool:
    """Whether ``g`` carries torch's once-differentiable marker (its grad_fn, named ``Error``
    in torch 2.13), whose second backward returns nothing where it should raise: the gradient
    to the cotangent came back None, and the tangent as 0, silently."""
    return type(g.grad_fn).__name__ == "Error"


def _forward_products(gL: Tensor, c: Tensor | None, dirs: list[tuple[Tensor, Tensor]], graphless_lost: bool = True
                      ) -> tuple[Tensor, Tensor | None] | None:
    """``(B ẋ, C ẋ)``: the derivatives of ``gL`` ``(B, m)`` and ``c`` ``(B, r)`` along the
    tangents ``dirs`` (leaf, tangent pairs), as the gradient of ⟨Bᵀu + Cᵀv, ẋ⟩ with
    respect to the cotangents ``(u, v)`` at 0 (the reverse product is linear in them);
    ``None`` where a first product lost its graph: the once-differentiable marker
    (:func:`_marked`), or, with ``graphless_lost``, no graph at all (a backward run under
    no_grad; also a true zero, ``sign``'s, which the caller's other way then gives).
    Without it, a product with no graph counts as zero."""
    us = [torch.zeros_like(gL, requires_grad=True)] + ([] if c is None else [torch.zeros_like(c, requires_grad=True)])
    outs = [gL] + ([] if c is None else [c])
    total = sum((o * u).sum() for o, u in zip(outs, us) if o.requires_grad)
    leaves = [leaf for leaf, _ in dirs]
    back = (torch.autograd.grad(total, leaves, create_graph=True, allow_unused=True)
            if isinstance(total, Tensor) and total.requires_grad else [None] * len(leaves))
    if any(g is not None and (_marked(g) or graphless_lost and not g.requires_grad) for g in back):
        return None
    inner = [(g * t).sum() for g, (_, t) in zip(back, dirs) if g is not None and g.requires_grad]
    if not inner:
        return torch.zeros_like(gL), (None if c is None else torch.zeros_like(c))
    grads = torch.autograd.grad(sum(inner), us, allow_unused=True)
    Bx, *rest = (torch.zeros_like(u) if g is None else g for g, u in zip(grads, us))
    return Bx.detach(), (rest[0].detach() if rest else None)
