"""DeclarativeNode: write the objective and a solver, get the implicit backward.

A declarative node computes

.. math::

    y(x_1, \\dots, x_k) \\in \\operatorname*{argmin}_{u} f(x_1, \\dots, x_k, u)
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

import functools
import math
from typing import Any

import torch
from torch.autograd import forward_ad
from torch.nn.utils.stateless import _reparametrize_module

from .._autograd import may_carry_tangents, outside_compile, refuse_export
from .._checks import check_int
from ..errors import InputError, ProblemError, SolverError
from ._guarded_state import GuardedState
from ._kept_grads import SolveZeroGrad, solve_view
from ._parametrize_cache import uncached
from ._read_guard import check_outside_tangents, watch
from ._reference_hooks import warn_reference_hooks
from ._swap_guard import guarded, named_state, read_as
from .declarative_probe import probe
from .declarative_function import (DeclarativeFunction, check_structure, differentiated_parameters, parameter_leaves,
                                   refuse_functorch, solve_input_names, y_by_keyword)
from .implicit import declarative_vjp
from .implicit_options import check_implicit_options
from .implicit_jvp import declarative_jvp
from .optimality import _format_indices
from .inputs import checked_solution, flatten_inputs
from .linear_solvers import LinearSolver

__all__ = ["DeclarativeNode"]

_METHODS = ("objective", "equality_constraints", "inequality_constraints")  # (the problem, as the user states it)

Tensor = torch.Tensor


class DeclarativeNode(SolveZeroGrad, GuardedState):
    """Base class for a node whose output is the solution of an optimization problem.

    .. math::

        y(x_1, \\dots, x_k) \\in \\operatorname*{argmin}_{u} f(x, u)
        \\quad\\text{subject to}\\quad h(x, u) = 0,\\; g(x, u) \\le 0.

    Subclass it and write:

    - ``objective(self, *xs, y)``: :math:`f`, batched, in differentiable torch code,
      returning shape ``(B,)``; row ``b`` must depend only on the rows ``b`` of the
      inputs and of ``y``. ``def objective(self, x, y)`` (positional ``y``) and
      ``def objective(self, a, b, *, y)`` both work.
    - ``solve(self, *xs)``: any algorithm returning the minimiser ``y``, shape
      ``(B, ...)`` of any trailing shape (a tensor, not a tuple: multipliers are
      recovered by least squares, eq. 25). It runs without gradient tracking and its
      steps are never differentiated.
    - optionally ``equality_constraints(self, *xs, y)`` returning :math:`h` and
      ``inequality_constraints(self, *xs, y)`` returning :math:`g`, each ``(B, ...)``
      of any trailing shape; the defaults return ``None`` (no constraints).

    Every input and ``y`` have the batch dimension first (``batch_dims`` leading
    dimensions, flattened into one for the user's methods, which always see
    ``(B, ...)``); the rest is the example's shape, whatever it is.
    Calling ``node(*xs)`` returns ``y`` with the implicit backward of
    :func:`~convexddn.nodes.implicit.declarative_vjp` attached (Prop. 4.4 to 4.6):
    gradients flow to every input and every parameter of the module that requires
    grad. The backward forms and solves the implicit system in ``implicit_dtype``
    (float64 by default) whatever the inputs' dtype: the parameters and buffers of the
    node are cast for the duration (so they must be parameters or buffers, not plain
    tensor attributes, when a float64 objective needs them), and the gradients are
    cast back. It also verifies the returned solution (``check_solution``), reports
    singular or ill-conditioned systems (non-unique solutions) and active
    inequalities with zero multipliers, each with a
    :class:`~convexddn.errors.GradientWarning` naming the batch elements.

    Forward mode (``torch.autograd.forward_ad``) gives the Jacobian–vector product of
    :func:`~convexddn.nodes.implicit_jvp.declarative_jvp` (same system, solver and
    checks). ``torch.func`` transforms (``vmap``, ``grad``, ``jvp``, ``jacrev``, ...)
    raise a :class:`~convexddn.errors.ProblemError` (``functional_call`` works).

    A subclass that defines ``__init__`` must call ``super().__init__()`` (all
    arguments are optional). Double backward is not supported (it raises
    :class:`~convexddn.errors.DoubleBackwardError`, a
    :class:`~convexddn.errors.ProblemError` and a ``NotImplementedError``).

    Args:
        linear_solver: ``"auto"`` (default), ``"dense"``, ``"cg"`` or a callable; see
            :func:`~convexddn.nodes.implicit.declarative_vjp`.
        dense_max: largest ``m + p + q`` for which ``"auto"`` picks the dense solve.
            Default ``None``: the measured rule of
            :func:`~convexddn.nodes.linear_solvers.resolve_linear_solver` (dense up to
            64 unknowns, or while ``B (m + p + q)^3 <= 3e8``, CG above with a dense
            fallback when it does not converge quickly).
        active_tol: inequality constraint ``j`` counts as active where ``g_j >= -active_tol * ‖∇_y g_j‖ ‖y‖``,
            relative to the constraint's own scale (at least 8 epsilons of the inputs' dtype). ``‖y‖`` is the
            whole solution's norm (for a solution near 0, at least 1e-3 of how far the objective's curvature
            lets it move): where ``y`` mixes scales, pass a smaller value if ``solve`` is exact entry by entry;
            a larger one where ``solve`` approaches bounds without reaching them (an interior point method's
            ``1e-6`` for 0: the SolverError names the slack and the value). Default ``1e-6``.
        cg_tol: relative residual tolerance of CG, in (0, 1); with ``"cg"`` or ``"auto"`` only (``"dense"`` and a
            callable never run CG: OptionError). Default ``None`` (``1e-10`` in float64, ``1e-5`` in float32).
        cg_max_iter: CG iteration cap, likewise with ``"cg"`` or ``"auto"`` only. Default ``None`` (``10 * m``).
        batch_dims: how many leading dimensions of every input (and of the output)
            are batch dimensions. ``0``: the inputs are one problem. Default ``1``.
        check_solution: verify in backward that ``solve`` returned a KKT point
            (relative residuals; warning above ``solution_tol``, SolverError above 0.1),
            and that the Lagrangian's gradient does not jump there (a kink: ``|y_i|``
            at ``y_i = 0``, a vertex of an L1 ball, ``max`` at a tie, where autograd's
            one-sided derivatives would give the derivative of another problem; a
            GradientWarning, and those elements' gradients set to zero). The kink probe
            costs two more gradient evaluations of the objective and constraints.
            Default ``True``.
        solution_tol: relative KKT residual that triggers the warning, in (0, 1)
            (``check_solution=False`` turns the check off). Default ``None``:
            ``max(1e-6, sqrt(eps))`` of the inputs' dtype.
        implicit_dtype: ``torch.float64`` (default) or ``torch.float32``: the dtype the
            backward's linear algebra runs in. Inputs (or a solution) beyond its range
            raise ``InputError`` in backward, naming them (float64 ``x`` of 1e40 with
            float32: the cast made them Inf).
        check_minimum: warn in backward where ``solve`` returned a KKT point that is not
            a local minimiser (a saddle point or a maximiser: the Lagrangian's Hessian
            has negative curvature on the active constraints' tangent space, seen from
            the KKT matrix's inertia where it is formed densely), whose derivative is
            not the declared argmin's (no verdict where the active constraints are
            dependent). It costs one more factorisation of the KKT matrix per dense
            backward (5–10 % of the backward on CPU). ``False`` for nodes that declare
            stationary points (e.g. all eigenvectors of a symmetric matrix), or to save
            that cost. Default ``True``.

    Shape:
        - Inputs: :math:`(*\\text{batch}, *S_i)`, the same batch shape for all.
        - Output: :math:`(*\\text{batch}, *S_y)`, same dtype and device as the inputs.

    Raises:
        DTypeError: an input is not a floating-point tensor, inputs differ in dtype,
            ``solve`` returns a non-tensor or another dtype, or the objective or a
            constraint returns a complex or integer tensor.
        ShapeError: an input has fewer than ``batch_dims`` dimensions, batch shapes
            differ, or ``solve``, ``objective`` or a constraint returns the wrong shape.
        InputError: inputs on different devices, keyword inputs, a call with a number
            of inputs the methods do not take, ``solve`` returning a tensor on another
            device, or a tensor requiring grad that is neither an input nor a
            parameter used in the objective or constraints; in backward, a tensor this
            backward's objective or constraints read (a buffer, frozen parameter, plain
            tensor attribute or view, or one from outside the node that an earlier call
            read) was modified in place after the forward (it needs the forward's values).
        ProblemError: ``objective`` or ``solve`` is not defined, ``__init__`` did not call
            ``super().__init__()``, ``solve`` modified an input or a parameter in place, the objective or
            constraints wrote to the node's state, deep-copied or pickled the node or deep-copied a parameter
            that requires grad (of a submodule), the objective does not depend on ``y``, a row of the objective
            or a constraint reads another batch row (first call with two rows or more), or (in backward) an
            active constraint's Jacobian is NaN or Inf, or a term's backward cannot be differentiated. (A DDN
            reference's method that would be ignored, ``linear_constraint_parameters`` or ``gradient`` say, is
            a ``ConvexDDNWarning`` at the class's definition: see the guide "Migrating from the DDN reference".)
        NonFiniteError: an input contains NaN or Inf.
        SolverError: ``solve`` returns NaN or Inf, or (in backward) a point far from
            a KKT point; with the failing batch indices.
        OptionError: invalid options (``cg_tol`` or ``cg_max_iter`` with a ``linear_solver`` that never runs CG).

    The shape, dependency and closed-over-tensor checks run at the first forward with
    grad mode on or with forward-mode tangents (and at every forward with grad mode on
    whose output would neither require grad nor carry a tangent), before any backward or
    jvp: one evaluation of the objective and constraints. The rows' independence needs
    two rows: where the first batch has 0 or 1, the checks run again at the first batch
    of two or more. A copy (pickle, ``copy.deepcopy``) checks again at its first call.

    .. note::
        During the backward the node's parameters and buffers are swapped for the ones
        its forward saw (under ``torch.func.functional_call``, the tensors passed there)
        and read as ``implicit_dtype`` casts (also while a forward checks the problem).
        Threads may share an instance: a swap runs alone (forwards in other threads wait for it, it for theirs; a
        waiting swap goes first; ``state_dict()``, loads, pickle, copies and ``.to()`` wait for it too); ``node.weight``
        read meanwhile is the swapped tensor. A wait that would never end (two nodes whose objectives read each
        other's ``state_dict()``, in two threads) raises a ``ProblemError`` in the thread that closes the cycle.
        Calls with grad mode on and nothing requiring grad (nor a tangent) check the problem each time, a swap:
        wrap inference in ``torch.no_grad()`` to run them together. A ``solve`` that runs autograd on CUDA tensors
        must not share its node with threads backpropagating through it (their backward, on the device's autograd
        thread, waits for that forward). ``nn.DataParallel``'s replicas are not supported.

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

    # Whether the probe's row check ran (needs two rows). A class default: a node pickled before it checks again.
    _rows_checked = False

    def __init__(
        self,
        *,
        linear_solver: str | LinearSolver = "auto",
        dense_max: int | None = None,
        active_tol: float = 1e-6,
        cg_tol: float | None = None,
        cg_max_iter: int | None = None,
        batch_dims: int = 1,
        check_solution: bool = True,
        solution_tol: float | None = None,
        implicit_dtype: torch.dtype = torch.float64,
        check_minimum: bool = True,
    ) -> None:
        super().__init__()
        check_implicit_options(linear_solver, dense_max, active_tol, {"tol": cg_tol, "max_iter": cg_max_iter},
                               check_solution, solution_tol, implicit_dtype, check_minimum, "implicit_dtype")
        check_int("batch_dims", batch_dims, minimum=0)
        self.linear_solver = linear_solver
        self.dense_max = None if dense_max is None else int(dense_max)
        self.active_tol = float(active_tol)
        self.cg_tol = cg_tol
        self.cg_max_iter = None if cg_max_iter is None else int(cg_max_iter)
        self.batch_dims = int(batch_dims)
        self.check_solution = check_solution
        self.solution_tol = solution_tol
        self.implicit_dtype = implicit_dtype
        self.check_minimum = check_minimum
        self._probed_names: frozenset[str] | None = None  # all of the state's names at the probe; None: not yet
        self._ddn_initialised = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        warn_reference_hooks(cls, DeclarativeNode)  # (a DDN reference method kept in a port is never called)
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_ddn_checked", False):
            return

        @functools.wraps(init)
        def checked_init(self, *args: Any, **kw: Any) -> None:
            init(self, *args, **kw)
            if not self.__dict__.get("_ddn_initialised", False):
                raise ProblemError(
                    f"{type(self).__name__}.__init__ must call super().__init__() (the "
                    "DeclarativeNode options are keyword arguments of it, all optional)"
                )

        checked_init._ddn_checked = True  # type: ignore[attr-defined]
        cls.__init__ = checked_init  # type: ignore[misc]

    # ---- the user's part ------------------------------------------------------------

    def objective(self, *xs: Tensor, y: Tensor) -> Tensor:
        """The objective :math:`f(x, y)`: inputs ``(B, ...)``, ``y`` ``(B, ...)`` -> ``(B,)``."""
        raise NotImplementedError

    def solve(self, *xs: Tensor) -> Tensor:
        """A minimiser ``y`` ``(B, ...)`` of the problem for each batch element."""
        raise NotImplementedError

    def equality_constraints(self, *xs: Tensor, y: Tensor) -> Tensor | None:
        """Equality constraints ``(B, ...)``, feasible where zero; ``None`` for none."""
        return None

    def inequality_constraints(self, *xs: Tensor, y: Tensor) -> Tensor | None:
        """Inequality constraints ``(B, ...)``, feasible where ``<= 0``; ``None`` for none."""
        return None

    # ---- machinery ------------------------------------------------------------------

    def __getstate__(self) -> dict:  # (a lock does not pickle; nn.Module drops a compiled call)
        return {k: v for k, v in super().__getstate__().items() if k != "_swap_guard"}

    def __setstate__(self, state: dict) -> None:
        # A copy probes again: the outside tensors the probe found are watched per node object, and may not be
        # the copy's (deepcopy copies a list's). A closed-over w changed before backward gave 2.0 for 1.0, silently.
        super().__setstate__({**state, "_probed_names": None})

    def _call(self, method: str, versions=None):
        """The user's ``method`` as ``fn(*xs, y)``, whatever its way of taking ``y``; checked
        against in-place changes since the forward of ``versions`` (a ``ForwardVersions``)."""
        fn = getattr(self, method)
        call = (lambda *args: fn(*args[:-1], y=args[-1])) if y_by_keyword(type(self), method) else fn
        return uncached(self, call if versions is None else versions.checked(self, call))

    def _check_options(self) -> None:
        """The options as the constructor checks them, at each call: they may be reassigned
        (``node.batch_dims = -1`` was taken, ``1.5`` raised a raw TypeError)."""
        check_implicit_options(self.linear_solver, self.dense_max, self.active_tol,
                               {"tol": self.cg_tol, "max_iter": self.cg_max_iter}, self.check_solution,
                               self.solution_tol, self.implicit_dtype, self.check_minimum, "implicit_dtype")
        check_int("batch_dims", self.batch_dims, minimum=0)

    def _checked_solve(self, xs: tuple[Tensor, ...]) -> Tensor:
        # solve may minimise with autograd (torch.optim): its gradients reach neither the inputs nor the
        # parameters (detached: versions shared, an in-place change is still refused) nor their .grad.
        xs = tuple(x.detach() for x in xs)
        with torch.no_grad(), solve_view(self):
            y = self.solve(*xs)
        return checked_solution(f"{type(self).__name__}.solve", y, xs)

    @outside_compile  # (the swaps too: under compile, guarded() would hold no lock)
    def _vjp(self, xs, y, grad_y, params, batch_shape, state, versions, asked=None):
        # The parameters and buffers the forward solved with (``state``): under
        # torch.func.functional_call they were swapped in for the forward only, and the
        # backward differentiated the module's own ones (gradient 0 for the swapped-in).
        # Each method raises where what it reads changed in place since (``versions``).
        with guarded(self, swap=True), _reparametrize_module(self, state), read_as(self, self.implicit_dtype):
            return declarative_vjp(self._call("objective", versions), tuple(xs), y, grad_y, params=tuple(params),
                                   inputs_asked=asked, **self._implicit_options(batch_shape, versions))

    @outside_compile
    def _jvp(self, xs, y, tangents, params, param_tangents, batch_shape, state, names, versions):
        if self._probe_due(y.shape[0], state):  # (before the jvp, which assumes the rows apart)
            self._probe(xs, y, (versions,))
        leaves, state = parameter_leaves(params, state, names)
        with guarded(self, swap=True), _reparametrize_module(self, state), read_as(self, self.implicit_dtype):
            return declarative_jvp(self._call("objective", versions), tuple(xs), y, tuple(tangents), params=leaves,
                                   param_tangents=tuple(param_tangents),
                                   **self._implicit_options(batch_shape, versions))

    def _probe_due(self, rows: int, state: dict) -> bool:
        """Whether the problem must be probed before it is differentiated: never probed yet, its
        rows' independence not yet checked and this batch has two rows or more (a first batch of
        0 or 1 has none to couple: a later batch of 5 coupled through y.mean(0) was accepted, its
        gradient 1.41 off), or a parameter or buffer added since (does the problem read it?)."""
        return (not self._rows_checked and rows >= 2) or self._probed_names != frozenset(state)

    def _probe(self, xs: tuple[Tensor, ...], y: Tensor, record=()) -> None:
        self._probed_names, rows, outside = probe(self, xs, y)
        self._rows_checked = self._rows_checked or rows
        watch(self, outside, record)  # (tensors from outside the node: each forward notes their versions)

    def _implicit_options(self, batch_shape, versions=None) -> dict[str, Any]:
        """The keyword arguments the vjp and the jvp share."""
        return dict(equality_constraints=self._call("equality_constraints", versions),
                    inequality_constraints=self._call("inequality_constraints", versions),
                    known=tuple(self.parameters()), linear_solver=self.linear_solver, dense_max=self.dense_max,
                    active_tol=self.active_tol, cg_options={"tol": self.cg_tol, "max_iter": self.cg_max_iter},
                    check_solution=self.check_solution, solution_tol=self.solution_tol,
                    work_dtype=self.implicit_dtype, name=type(self).__name__, batch_shape=batch_shape,
                    check_minimum=self.check_minimum)

    def forward(self, *xs: Tensor, **named: Any) -> Tensor:
        """Solve for ``y`` and attach the implicit backward; see the class docstring."""
        if named:
            # The user's methods take the inputs positionally (solve(self, *xs)): a keyword has no position.
            raise InputError(
                f"{type(self).__name__} takes its inputs positionally, node(x1, x2, ...); "
                f"got keyword input(s) {sorted(named)}"
            )
        refuse_export(type(self).__name__)  # (first: strict torch.export cannot trace the checks)
        check_structure(self, len(xs), DeclarativeNode)
        self._check_options()
        refuse_functorch(type(self).__name__)
        if not xs:
            raise InputError(f"{type(self).__name__} needs at least one input tensor")
        flat, batch_shape = flatten_inputs(xs, self.batch_dims, solve_input_names(type(self), len(xs)))
        with guarded(self, swap=False):  # (not while another thread's backward swaps them)
            state = dict(named_state(self))
            named = differentiated_parameters(self)
            record: list = []  # (the call's ForwardVersions)
            y = DeclarativeFunction.apply(self, len(flat), (batch_shape, state, tuple(n for n, _ in named), record),
                                          *flat, *(p for _, p in named))
        bad = ~torch.isfinite(y).reshape(y.shape[0], math.prod(y.shape[1:])).all(dim=-1)
        if y.numel() and bool(bad.any()):
            indices = _format_indices(bad, batch_shape)
            raise SolverError(f"{type(self).__name__}.solve returned NaN or Inf for {len(indices)} of "
                              f"{bad.numel()} batch element(s), at batch indices {indices[:8]}",
                              indices=indices, statuses=["non-finite solution"] * len(indices))
        # Probed wherever the call is differentiated: with grad mode on, and in forward mode under no_grad too (the
        # jvp, as the backward, solves each row's problem on its own: a coupled objective's tangent was 0.87 off,
        # silently; the jvp probes first where due). Also at every reverse-mode call where nothing requires grad.
        grad = torch.is_grad_enabled()
        tangent = may_carry_tangents() and forward_ad.unpack_dual(y).tangent is not None
        check_outside_tangents(self, lambda: [self._call(m) for m in _METHODS], flat, y)  # (forward mode: else dropped)
        if (grad or tangent) and (self._probe_due(y.shape[0], state)
                                  or (grad and not tangent and not y.requires_grad)):
            self._probe(flat, y, record)
        return y.reshape(tuple(batch_shape) + tuple(y.shape[1:]))

    def extra_repr(self) -> str:
        solver = self.linear_solver if isinstance(self.linear_solver, str) else (
            getattr(self.linear_solver, "__name__", repr(self.linear_solver)))
        return (f"linear_solver={solver!r}, dense_max={self.dense_max}, active_tol={self.active_tol:g}, "
                f"cg_tol={self.cg_tol}, cg_max_iter={self.cg_max_iter}, batch_dims={self.batch_dims}, "
                f"check_solution={self.check_solution}, solution_tol={self.solution_tol}, "
                f"implicit_dtype={self.implicit_dtype}, check_minimum={self.check_minimum}")
