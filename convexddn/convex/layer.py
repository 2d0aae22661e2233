"""ConvexLayer: a convex problem declared in CVXPY syntax, used as a torch module.

The layer computes

.. math::

    y(\\theta) \\in \\operatorname*{argmin}_{u} \\; f(\\theta, u)
    \\quad\\text{s.t.}\\quad g(\\theta, u) \\le 0,\\; h(\\theta, u) = 0

for a disciplined parametrized program (DPP) whose parameters ``θ`` come from
tensors, and differentiates the solution implicitly through the KKT conditions
of its cone program (cvxpylayers + diffcp; Agrawal et al., NeurIPS 2019). What it
adds over calling cvxpylayers directly: any leading batch shape per parameter,
the caller's dtype and device, accurate defaults, every solve verified, and
precise errors.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import cvxpy as cp
import torch
from cvxpylayers.torch import CvxpyLayer
from torch import nn

from .._checks import check_choice, check_finite, check_int, check_positive, check_tensor
from ..errors import (
    InfeasibleError,
    InputError,
    NotDPPError,
    OptionError,
    ProblemError,
    ShapeError,
    SolverError,
    UnboundedError,
)
from .per_element import MODES, SOLVERS, CheckedDiffcp, ConeSolveFailure, SolveInfo, canonical_solver_name

__all__ = ["ConvexLayer"]


def _offending_expression(problem: cp.Problem) -> str:
    """Name the first objective or constraint that breaks DCP or DPP, where CVXPY can."""
    parts = [("objective", problem.objective)] + [
        (f"constraint {i}", c) for i, c in enumerate(problem.constraints)
    ]
    for label, part in parts:
        try:
            if not part.is_dcp():
                return f"{label} `{part}` is not DCP"
            if not part.is_dcp(dpp=True):
                return f"{label} `{part}` is not DPP"
        except Exception:  # noqa: BLE001 — CVXPY raises various errors here
            continue
    return "CVXPY could not pin down the expression"


def _validate_problem(problem: Any, parameters: Sequence, variables: Sequence) -> None:
    if not isinstance(problem, cp.Problem):
        raise ProblemError(f"problem must be a cvxpy.Problem, got {type(problem).__name__}")
    if not problem.is_dcp():
        raise ProblemError(
            f"problem must be convex (DCP): {_offending_expression(problem)}")
    if not problem.is_dpp():
        raise NotDPPError(
            "problem must be DPP (disciplined parametrized programming: parameters may "
            "enter only affinely, or multiply parameter-free expressions) so that it "
            f"can be canonicalised once: {_offending_expression(problem)}")
    if not isinstance(parameters, (list, tuple)) or not all(
            isinstance(p, cp.Parameter) for p in parameters):
        raise ProblemError("parameters must be a list of cvxpy.Parameter")
    if not isinstance(variables, (list, tuple)) or not variables or not all(
            isinstance(v, cp.Variable) for v in variables):
        raise ProblemError("variables must be a non-empty list of cvxpy.Variable")
    declared = {p.id for p in problem.parameters()}
    given = [p.id for p in parameters]
    if len(set(given)) != len(given) or set(given) != declared:
        names = sorted(p.name() for p in problem.parameters())
        raise ProblemError(
            f"parameters must list each of the problem's parameters exactly once "
            f"({names}), got {[p.name() for p in parameters]}")
    known = {v.id for v in problem.variables()}
    for v in variables:
        if v.id not in known:
            raise ProblemError(f"variable {v.name()} is not a variable of the problem")


class ConvexLayer(nn.Module):
    """A convex optimization problem as a differentiable torch module.

    .. math::

        y(\\theta) = \\operatorname*{argmin}_{u \\in C(\\theta)} f(\\theta, u)

    Each call fills the CVXPY parameters with tensors, solves one cone program per
    batch element, checks each solution against its KKT conditions, and returns the
    requested variables. The backward pass differentiates the cone program's
    optimality conditions (no unrolling).

    Args:
        problem: a DPP ``cvxpy.Problem``.
        parameters: the problem's ``cp.Parameter`` objects, in the order the tensors
            are passed to :meth:`forward`. Must list every parameter exactly once.
        variables: the ``cp.Variable`` objects to return, in that order.
        solver: ``"Clarabel"`` (default, interior point, accurate), ``"SCS"`` or
            ``"ECOS"``; case-insensitive.
        solver_args: keyword arguments for the solver, over convexddn's tight
            defaults (e.g. ``{"max_iter": 1000}`` for Clarabel).
        fallback: solver tried on the batch elements where ``solver`` fails
            (default ``"SCS"``), or ``None``. A fallback that succeeds emits a
            :class:`~convexddn.errors.SolverWarning`.
        adjoint: how the adjoint (and refinement) systems are solved: ``"auto"``
            (dense factorisation for small cone programs, LSMR above 400 rows +
            columns), ``"dense"``, ``"lsmr"`` or ``"lsqr"``.
        tol: largest accepted relative KKT residual of a solution (default 1e-6).
        refine: at most this many Newton steps on the cone program's residual map
            polish each solution (default 5; the point with the lowest KKT residual
            is kept). Interior-point solvers stall near 1e-5 on projections whose
            squared objective became a second-order cone; refinement brings them to
            ~1e-12.
        workers: number of worker processes that solve and differentiate chunks of
            the batch (default 1: in this process). Workers start on the first
            batched call (about a second: they import torch) and live with the layer.

    Shape:
        - Input: one tensor per parameter, of shape ``(*batch_i, *param.shape)``;
          the ``batch_i`` broadcast together to ``batch`` (unbatched parameters are
          shared by every element).
        - Output: ``(*batch, *var.shape)`` per variable: a tensor when there is one
          variable, a tuple in ``variables`` order otherwise. dtype is the promoted
          dtype of the inputs, device the inputs' device (the solve runs on the CPU
          in float64).

    Raises:
        ProblemError, NotDPPError: at construction, for a problem that is not convex,
            not DPP, or whose parameters/variables do not match.
        OptionError: unknown solver, fallback or adjoint; tol <= 0; refine or workers
            not an integer in range.
        DTypeError: a non-tensor or non-floating tensor.
        ShapeError: wrong number of tensors, wrong trailing shape, batch shapes that
            do not broadcast, tensors on different devices.
        NonFiniteError: NaN or Inf in a parameter (names it and counts them).
        InfeasibleError, UnboundedError, SolverError: a solve failed; the error names
            the failing batch indices and the solver status.

    Example::

        >>> x = cp.Parameter(3); y = cp.Variable(3)
        >>> prob = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y >= 0])
        >>> layer = ConvexLayer(prob, parameters=[x], variables=[y])
        >>> layer(torch.tensor([[1.0, -2.0, 3.0]]))
        tensor([[1., 0., 3.]])
    """

    def __init__(
        self,
        problem: cp.Problem,
        parameters: Sequence[cp.Parameter],
        variables: Sequence[cp.Variable],
        *,
        solver: str = "Clarabel",
        solver_args: dict[str, Any] | None = None,
        fallback: str | None = "SCS",
        adjoint: str = "auto",
        tol: float = 1e-6,
        refine: int = 5,
        workers: int = 1,
    ) -> None:
        super().__init__()
        try:
            solver = canonical_solver_name(solver)
        except KeyError:
            raise OptionError(f"solver must be one of {list(SOLVERS)}, got {solver!r}") from None
        if fallback is not None:
            try:
                fallback = canonical_solver_name(fallback)
            except KeyError:
                raise OptionError(
                    f"fallback must be one of {list(SOLVERS)} or None, got {fallback!r}") from None
        check_choice("adjoint", adjoint, MODES)
        check_positive("tol", tol)
        check_int("refine", refine, minimum=0)
        check_int("workers", workers, minimum=1)
        if solver_args is not None and not isinstance(solver_args, dict):
            raise OptionError(f"solver_args must be a dict, got {type(solver_args).__name__}")
        _validate_problem(problem, parameters, variables)

        self.problem = problem
        self.parameters_ = list(parameters)
        self.variables_ = list(variables)
        # The solver options live in the backend only (read back through properties), so
        # there is one copy of them and no attribute that silently does nothing.
        self._backend = CheckedDiffcp(solver, fallback, adjoint, tol, dict(solver_args or {}),
                                      refine, workers)
        try:
            self._layer = CvxpyLayer(problem, parameters=list(parameters),
                                     variables=list(variables), solver=self._backend)
        except (ValueError, NotImplementedError, AssertionError) as err:
            raise ProblemError(f"cvxpylayers cannot use this problem: {err}") from err
        # cvxpylayers keeps its problem matrices as sparse CSR buffers for its GPU path.
        # We always hand it CPU float64 tensors (it then uses scipy copies), and sparse
        # buffers break deepcopy, DistributedDataParallel and .to(): drop them.
        for name in ("P", "q", "A"):
            self._layer._buffers.pop(name, None)
            object.__setattr__(self._layer, name, None)

    solver = property(lambda self: self._backend.solver, doc="The first solver.")
    fallback = property(lambda self: self._backend.fallback, doc="The fallback solver, or None.")
    adjoint = property(lambda self: self._backend.mode, doc="How adjoint systems are solved.")
    tol = property(lambda self: self._backend.tol, doc="Largest accepted KKT residual.")
    refine = property(lambda self: self._backend.refine, doc="Newton polishing steps.")
    workers = property(lambda self: self._backend.workers, doc="Worker processes.")
    solver_args = property(lambda self: dict(self._backend.solver_args),
                           doc="Solver keyword arguments (a copy).")

    @property
    def last_solve(self) -> SolveInfo | None:
        """Solver, status and KKT residual of each element of the last successful call."""
        return self._backend.last_info

    def extra_repr(self) -> str:
        params = ", ".join(f"{p.name()}{tuple(p.shape)}" for p in self.parameters_)
        vars_ = ", ".join(f"{v.name()}{tuple(v.shape)}" for v in self.variables_)
        return (f"parameters=[{params}], variables=[{vars_}], solver={self.solver!r}, "
                f"fallback={self.fallback!r}, adjoint={self.adjoint!r}, tol={self.tol:g}, "
                f"refine={self.refine}, workers={self.workers}")

    def _batch_shape(self, values: Sequence[torch.Tensor]) -> tuple[int, ...]:
        batch_shapes = []
        for i, (value, param) in enumerate(zip(values, self.parameters_)):
            k = len(param.shape)
            if value.dim() < k or tuple(value.shape[value.dim() - k:]) != tuple(param.shape):
                raise ShapeError(
                    f"parameter {i} ({param.name()}) must have shape (*batch, "
                    f"{', '.join(map(str, param.shape))}) i.e. trailing shape "
                    f"{tuple(param.shape)}, got {tuple(value.shape)}")
            batch_shapes.append(tuple(value.shape[: value.dim() - k]))
        try:
            return tuple(torch.broadcast_shapes(*batch_shapes))
        except RuntimeError:
            desc = ", ".join(f"{p.name()}: {s}" for p, s in zip(self.parameters_, batch_shapes))
            raise ShapeError(f"batch shapes of the parameters do not broadcast: {desc}") from None

    def forward(self, *values: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Solve the problem for the given parameter values; see the class docstring."""
        if len(values) != len(self.parameters_):
            raise ShapeError(
                f"expected {len(self.parameters_)} tensor(s), one per parameter "
                f"{[p.name() for p in self.parameters_]}, got {len(values)}")
        for i, (value, param) in enumerate(zip(values, self.parameters_)):
            check_tensor(f"parameter {i} ({param.name()})", value)
        devices = {v.device for v in values}
        if len(devices) > 1:
            raise InputError(f"all parameters must be on one device, got {sorted(map(str, devices))}")
        batch = self._batch_shape(values)
        for i, (value, param) in enumerate(zip(values, self.parameters_)):
            check_finite(f"parameter {i} ({param.name()})", value)

        out_dtype = values[0].dtype
        for v in values[1:]:
            out_dtype = torch.promote_types(out_dtype, v.dtype)
        device = values[0].device
        n_batch = math.prod(batch)
        out_shapes = [batch + tuple(v.shape) for v in self.variables_]

        if n_batch == 0:
            # Keep the graph connected so that backward on an empty output works.
            zero = sum((v.sum() * 0 for v in values), torch.zeros((), dtype=out_dtype, device=device))
            outs = tuple(torch.zeros(s, dtype=out_dtype, device=device) + zero for s in out_shapes)
            return outs[0] if len(outs) == 1 else outs

        flat = []
        for value, param in zip(values, self.parameters_):
            k = len(param.shape)
            v64 = value.to(device="cpu", dtype=torch.float64)
            if value.dim() == k and batch:
                flat.append(v64)  # unbatched: cvxpylayers shares it across the batch
            elif batch:
                flat.append(v64.expand(batch + tuple(param.shape)).reshape((n_batch,) + tuple(param.shape)))
            else:
                flat.append(v64)
        try:
            sols = self._layer(*flat)
        except ConeSolveFailure as fail:
            raise self._solver_error(fail, batch) from None
        outs = tuple(
            s.reshape(shape).to(device=device, dtype=out_dtype) for s, shape in zip(sols, out_shapes)
        )
        return outs[0] if len(outs) == 1 else outs

    def _solver_error(self, fail: ConeSolveFailure, batch: tuple[int, ...]) -> SolverError:
        if batch:
            idx = [tuple(int(j) for j in torch.unravel_index(torch.tensor(i), batch)) for i in fail.indices]
        else:
            idx = [() for _ in fail.indices]
        lowered = [s.lower() for s in fail.statuses]
        if all("infeasible" in s for s in lowered):
            cls, what = InfeasibleError, "infeasible"
        elif all("unbounded" in s for s in lowered):
            cls, what = UnboundedError, "unbounded"
        else:
            cls, what = SolverError, "not solved"
        shown = "; ".join(f"{i}: {s}" for i, s in list(zip(idx, fail.statuses))[:5])
        more = f" (and {len(idx) - 5} more)" if len(idx) > 5 else ""
        return cls(
            f"problem {what} at {len(idx)} batch index(es) {idx[:20]}{'…' if len(idx) > 20 else ''} "
            f"of batch shape {batch}; solver status: {shown}{more}",
            indices=idx, statuses=fail.statuses)
