"""DeclarativeNode: write the objective and a solver, get the implicit backward.

A declarative node computes

.. math::

    y(x) \\in \\operatorname*{argmin}_{u \\in \\mathbb{R}^m} f(x, u)
    \\quad\\text{subject to}\\quad h(x, u) = 0,\\; g(x, u) \\le 0,

by any algorithm the user likes, and differentiates the solution by the implicit
function theorem (:func:`.implicit.declarative_vjp`) instead of by unrolling that
algorithm. Only the objective and the constraints have to be written in differentiable
torch code; the solver does not.

References:
    S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks",
    IEEE TPAMI 44(8), 2021.
"""
from __future__ import annotations

import math

import torch

from .._checks import check_choice, check_finite, check_int, check_positive, check_tensor
from ..errors import DTypeError, ShapeError, SolverError
from .implicit import declarative_vjp
from .linear_solvers import _MAX_INDICES_SHOWN, LINEAR_SOLVERS, LinearSolver

__all__ = ["DeclarativeNode"]

Tensor = torch.Tensor


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
            linear_solver=node.linear_solver,
            dense_max=node.dense_max,
            active_tol=node.active_tol,
            cg_options={"tol": node.cg_tol, "max_iter": node.cg_max_iter},
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
        linear_solver: str | LinearSolver = "auto",
        dense_max: int = 64,
        active_tol: float = 1e-6,
        cg_tol: float | None = None,
        cg_max_iter: int | None = None,
    ) -> None:
        super().__init__()
        if not callable(linear_solver):
            check_choice("linear_solver", linear_solver, LINEAR_SOLVERS)
        check_int("dense_max", dense_max, minimum=0)
        check_positive("active_tol", active_tol)
        if cg_tol is not None:
            check_positive("cg_tol", cg_tol)
        if cg_max_iter is not None:
            check_int("cg_max_iter", cg_max_iter, minimum=1)
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

    def equality_constraints(self, x: Tensor, y: Tensor) -> Tensor | None:
        """Equality constraints ``(B, p)``, feasible where zero; ``None`` for none."""
        return None

    def inequality_constraints(self, x: Tensor, y: Tensor) -> Tensor | None:
        """Inequality constraints ``(B, q)``, feasible where ``<= 0``; ``None`` for none."""
        return None

    # ---- machinery ------------------------------------------------------------------

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
