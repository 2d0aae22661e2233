"""The generic implicit backward of a declarative node (Gould et al. 2021, Prop. 4.4–4.6, §6.1).

:func:`declarative_vjp` differentiates the solution ``y`` of

.. math::

    y(x) \\in \\operatorname*{argmin}_{u} f(x, u)
    \\quad\\text{subject to}\\quad h(x, u) = 0,\\; g(x, u) \\le 0

through its first-order optimality conditions, given only ``f``, ``h`` and ``g`` as
differentiable torch code: one KKT system per batch element (solved by a linear solver
of :mod:`.linear_solvers`) and one autograd vector–Jacobian product, never forming
:math:`D^2_{XY} f` nor :math:`Dy`.

References:
    S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks",
    IEEE TPAMI 44(8), 2021.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch

from .._checks import check_positive
from ..errors import DTypeError, GradientWarning, ShapeError
from .linear_solvers import LinearSolver, resolve_linear_solver

__all__ = ["declarative_vjp"]

Tensor = torch.Tensor
ConstraintFn = Callable[[Tensor, Tensor], "Tensor | None"]


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
    name: str, fn: ConstraintFn | None, x: Tensor, y: Tensor
) -> Tensor | None:
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


def declarative_vjp(
    objective: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    grad_y: Tensor,
    *,
    equality_constraints: ConstraintFn | None = None,
    inequality_constraints: ConstraintFn | None = None,
    params: Sequence[Tensor] = (),
    linear_solver: str | LinearSolver = "auto",
    dense_max: int = 64,
    active_tol: float = 1e-6,
    cg_options: dict[str, Any] | None = None,
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
        solver = resolve_linear_solver(
            linear_solver, m + sum(c.shape[1] for c in parts), int(dense_max), cg_options
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
