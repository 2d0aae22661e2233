"""ConvexLayer: a convex problem declared in CVXPY syntax, used as a torch module.

The layer computes

.. math::

    y(\\theta) \\in \\operatorname*{argmin}_{u} \\; f(\\theta, u)
    \\quad\\text{s.t.}\\quad g(\\theta, u) \\le 0,\\; h(\\theta, u) = 0

for a disciplined parametrized program (DPP) whose parameters ``θ`` come from
tensors, and differentiates the solution implicitly through the optimality conditions
of its cone program. Two backends: the batched torch interior point
(:mod:`.batched`: every element at once, on the parameters' device) and the
per-element path (:mod:`.per_element`: Clarabel/SCS/ECOS one element at a time, Newton
polish). ``solver="auto"`` uses the batched one where it applies and re-solves any
element it does not certify with the per-element one, before any error.
"""
from __future__ import annotations

import functools
import math
import threading
from typing import Any, Callable, Sequence

import cvxpy as cp
import torch
from cvxpylayers.torch import CvxpyLayer
from torch import nn
from torch.autograd import forward_ad

from .._autograd import refuse_vmap, refusing_export
from .._first_order import first_order_region, single_backward
from .._checks import check_choice, check_int, check_tolerance
from ..errors import OptionError
from .batched import BatchedProgram, UnsupportedProblem
from .canonical import batched_refusal
from .consistent_rows import input_precision, least_precise, read_by_rows
from .finite import finite_problem
from .nonconvex import explain_nonconvex, unsolved
from .per_element import MODES, SOLVERS, CheckedDiffcp, per_element_layer
from .power_cones import power_cone_free
from .second_opinion import solve_with_opinion, unsettled
from .status import (SolveInfo, adopt_certificates, batched_saw, doubt_certificates, failure_error,
                     forward_mode_refused, masked_outputs, merge_resolved, refuse_per_element, warn_masked)
from .spread import in_doubt, warn_unchecked, warn_unconfirmed
from .state import picklable_state, restore_state, uncached
from .validation import check_values, element_subset, flat_values, solver_choice, validate_problem, validate_solver_args

__all__ = ["ConvexLayer"]

#: Accepted ``solver`` values: the two backends' switches and the per-element solvers.
SOLVER_CHOICES = ("auto", "batched") + SOLVERS
ON_FAILURE = ("raise", "mask")


class ConvexLayer(nn.Module):
    """A convex optimization problem as a differentiable torch module.

    .. math::

        y(\\theta) = \\operatorname*{argmin}_{u \\in C(\\theta)} f(\\theta, u)

    Each call fills the CVXPY parameters with tensors, solves the cone program of every
    batch element, checks each solution against its KKT conditions, and returns the
    requested variables. The backward pass differentiates the optimality conditions at
    the solution (no unrolling; forward mode, ``torch.autograd.forward_ad``, solves the
    same system on the batched path and raises a ``ProblemError`` on the per-element
    one); it is first-order only: a second differentiation raises
    :class:`~convexddn.errors.DoubleBackwardError`.

    Args:
        problem: a DPP ``cvxpy.Problem`` (DCP, or DGP with ``gp=True``).
        parameters: the problem's ``cp.Parameter`` objects, in the order the tensors
            are passed to :meth:`forward`. Must list every parameter exactly once.
        variables: the ``cp.Variable`` objects to return, in that order.
        solver: ``"auto"`` (default: the batched torch interior point for LPs, QPs
            and SOCPs that fit in memory, the per-element path otherwise; elements the
            batched iterations do not certify get a second opinion — Clarabel on the
            same program, checked and differentiated by the batched path — and then
            the per-element path), ``"batched"`` (the batched solver first; an
            ``OptionError`` for problems it does not cover), or ``"Clarabel"``,
            ``"SCS"``, ``"ECOS"`` (the per-element path with that first solver; its
            results in doubt — not solved, left above rounding level by the polish, or
            on data spanning more than 1e10 — are solved again by the batched form
            where the problem has one that fits, else a wide one warns; the elements
            not solved wherever one element fits its memory budget);
            case-insensitive. ``last_solve`` says what solved each element.
        solver_args: keyword arguments for the per-element solver, over convexddn's
            tight defaults (e.g. ``{"max_iter": 1000}`` for Clarabel); unknown keys
            raise ``OptionError``. A time limit of 0 or inf means none (SCS's
            ``time_limit_secs`` says it with 0, Clarabel's ``time_limit`` with inf).
        fallback: per-element solver tried where the first one fails (default ``"SCS"``, which also
            polishes its points; where it fails too, with no certificate standing, ECOS once as a last
            resort on cones it takes), or ``None``: no other solver, no last resort. Each that succeeds
            emits a :class:`~convexddn.errors.SolverWarning`, as does SCS from a failed first solver's point.
        adjoint: how the per-element adjoint (and polish) systems are solved: ``"auto"``
            (dense up to 400 rows + columns, above a sparse LU where the cones are small,
            else LSMR), ``"dense"``, ``"sparse"`` (LSMR where its LU is singular), ``"lsmr"`` or ``"lsqr"``.
        tol: largest accepted relative KKT residual of a per-element solution, in (0, 1)
            (default 1e-6); the batched path accepts ``min(tol, 1e-8)``.
        refine: Newton steps polishing each per-element solution (default 5).
        workers: worker processes for the per-element path (default 1: in this process). They are
            spawned and import the main module: a script calling the layer needs ``if __name__ == "__main__":``.
        gp: the problem is a log-log convex program (geometric programming); its
            parameters must be positive. Solved on the per-element path.
        on_failure: ``"raise"`` (default: an error naming the failing batch indices) or
            ``"mask"``: failing elements' outputs are NaN, constants of the graph (no gradient
            flows through them: zero, and in forward mode their tangent is zero),
            ``last_solve.solved`` marks them and a ``SolverWarning`` names them (its ``elements``:
            every one, as index tuples in the batch shape; ``notes``: their statuses).
        check: the problem's own check of each call's tensors (in ``parameters`` order, after the
            checks above), raising an error of :mod:`convexddn.errors` for values outside the
            problem's domain; registry problems supply theirs (:attr:`~convexddn.ProblemSpec.check`).
            Default: ``None``.

    Shape:
        - Input: one tensor per parameter, positionally or by CVXPY name
          (``layer(x=X)``), of shape ``(*batch_i, *param.shape)``; the ``batch_i``
          broadcast together to ``batch`` (unbatched parameters are shared).
        - Output: ``(*batch, *var.shape)`` per variable: a tensor when there is one
          variable, a tuple in ``variables`` order otherwise; the promoted dtype of the
          inputs, on the inputs' device.

    Raises:
        ProblemError, NotDPPError: at construction, for a problem that is not convex
            (DCP/DGP), not DPP, has no parameters or integer variables, or whose
            parameters/variables do not match it (or have no entries: zero size); a NaN
            constant, or an infinite one that is no bound (:mod:`.finite`: an infinite
            entry of an inequality's constant side means no bound, as in CVXPY).
        OptionError: an invalid option, or unknown ``solver_args`` keys; a per-element
            ``solver`` for a problem only the batched solver takes (``quad_form(x, P)``
            of a parameter ``P``) or one with cones it cannot take (ECOS: PSD cones).
        DTypeError: a non-tensor or non-floating tensor.
        ShapeError: wrong number of tensors or names, wrong trailing shape, batch
            shapes that do not broadcast.
        InputError: tensors on several devices; a value that breaks its parameter's
            declared attribute (``nonneg``, ``pos``, ``PSD``, ``bounds`` …) or that ``check`` refuses;
            elements whose objective is not convex (``psd_wrap`` of a value not PSD on the equalities' null space).
        NonFiniteError: NaN or Inf in a parameter (names it and counts them).
        InfeasibleError, UnboundedError, SolverError: a solve failed (with
            ``on_failure="raise"``); the error names the failing batch indices and the
            solver status.

    Example::

        >>> x = cp.Parameter(3); y = cp.Variable(3)
        >>> prob = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y >= 0])
        >>> layer = ConvexLayer(prob, parameters=[x], variables=[y])
        >>> layer(torch.tensor([[1.0, -2.0, 3.0]])).round(decimals=6)
        tensor([[1., 0., 3.]])
    """

    #: The registry problem a layer of :func:`convexddn.layer` solves and its options, shown
    #: first by ``repr`` (``name='entmax', n=4, alpha=1.2``); empty for a layer built by hand.
    origin = ""

    def __init__(
        self,
        problem: cp.Problem,
        parameters: Sequence[cp.Parameter],
        variables: Sequence[cp.Variable],
        *,
        solver: str = "auto",
        solver_args: dict[str, Any] | None = None,
        fallback: str | None = "SCS",
        adjoint: str = "auto",
        tol: float = 1e-6,
        refine: int = 5,
        workers: int = 1,
        gp: bool = False,
        on_failure: str = "raise",
        check: Callable[[list[torch.Tensor]], None] | None = None,
    ) -> None:
        super().__init__()
        solver = solver_choice("solver", solver, SOLVER_CHOICES)
        if fallback is not None:
            fallback = solver_choice("fallback", fallback, SOLVERS, optional=True)
        check_choice("adjoint", adjoint, MODES)
        tol = check_tolerance("tol", tol)
        check_int("refine", refine, minimum=0)
        check_int("workers", workers, minimum=1)
        if not isinstance(gp, bool):
            raise OptionError(f"gp must be True or False, got {gp!r}")
        check_choice("on_failure", on_failure, ON_FAILURE)
        if check is not None and not callable(check):
            raise OptionError(f"check must be a callable or None, got {type(check).__name__}")
        first = solver if solver in SOLVERS else "Clarabel"
        solver_args = validate_solver_args(first, solver_args)
        # True for quad_form(x, P) of a parameter P: the batched solver only (see validate_problem).
        self._qp_only = validate_problem(problem, parameters, variables, gp, solver in ("auto", "batched"), solver)
        # What both backends compile: infinite bounds' rows dropped (y <= [0.1, inf]), other non-finite refused;
        # power cones of exact rational exponents in second-order cones (no DGP problem has power cones).
        program = finite_problem(problem, variables)
        self._program = program if gp else power_cone_free(program, variables)
        self.problem = problem
        self.parameters_ = list(parameters)
        self.variables_ = list(variables)
        self.solver, self.gp, self.on_failure, self.check = solver, gp, on_failure, check
        # The per-element options live in its backend only (one copy; properties read them).
        self._backend = CheckedDiffcp(first, fallback, adjoint, tol, solver_args, refine, workers)
        self._layer: CvxpyLayer | None = None
        self._batched: BatchedProgram | None = None
        if solver in ("auto", "batched") and not gp:
            try:
                self._batched = BatchedProgram(uncached(self._program), self.parameters_, self.variables_,
                                               tol_accept=self.batched_tol)
            except UnsupportedProblem as err:
                if solver == "batched" or self._qp_only:
                    raise batched_refusal(problem, solver, err, self._qp_only) from None
        elif solver == "batched":
            raise OptionError("solver='batched' does not take gp=True problems; use solver='auto'")
        if self._batched is None:
            self._per_element_layer()  # canonicalise now: errors belong to construction
        # The program that gives second opinions on per-element results in doubt: the batched one; for
        # the per-element solvers built on first need (None: not yet, False: the problem has no batched form).
        self._opinion = (self._batched or False) if gp or solver in ("auto", "batched") else None
        self._local, self._build_lock = threading.local(), threading.Lock()

    fallback = property(lambda self: self._backend.fallback, doc="The per-element fallback solver, or None.")
    adjoint = property(lambda self: self._backend.mode, doc="How per-element adjoint systems are solved.")
    tol = property(lambda self: self._backend.tol, doc="Largest accepted KKT residual (per element).")
    batched_tol = property(lambda self: min(self.tol, 1e-8), doc="... and the batched path's.")
    refine = property(lambda self: self._backend.refine, doc="Newton polishing steps (per element).")
    workers = property(lambda self: self._backend.workers, doc="Per-element worker processes.")
    solver_args = property(lambda self: dict(self._backend.solver_args),
                           doc="Per-element solver keyword arguments (a copy).")

    @property
    def last_solve(self) -> SolveInfo | None:
        """This thread's last successful (or masked) call: backend, solver, status, KKT
        residual and solved flag of each element (None before the first call)."""
        return getattr(self._local, "info", None)

    def __getstate__(self) -> dict:
        return picklable_state(self, transient=("_local", "_build_lock"))

    def __setstate__(self, state: dict) -> None:
        # Layers pickled before second opinions (built on need), the check option, QP-only
        # problems, infinite bounds dropped (the problem itself); with cvxpylayers' layer as a submodule:
        restore_state(self, state, {"_opinion": None, "check": None, "_qp_only": False,
                                    "_program": state.get("problem")}, hidden=("_layer",))
        self._local, self._build_lock = threading.local(), threading.Lock()

    def extra_repr(self) -> str:
        params = ", ".join(f"{p.name()}{tuple(p.shape)}" for p in self.parameters_)
        vars_ = ", ".join(f"{v.name()}{tuple(v.shape)}" for v in self.variables_)
        return ((f"{self.origin}, " if self.origin else "") + f"parameters=[{params}], variables=[{vars_}], "
                f"solver={self.solver!r}, fallback={self.fallback!r}, adjoint={self.adjoint!r}, tol={self.tol:g}, "
                f"refine={self.refine}, workers={self.workers}"
                + (", gp=True" if self.gp else "")
                + (f", on_failure={self.on_failure!r}" if self.on_failure != "raise" else "")
                + (f", check={getattr(self.check, '__qualname__', self.check)}" if self.check else ""))

    # ------------------------------------------------------------------ the backends

    def _per_element_layer(self) -> CvxpyLayer:
        """cvxpylayers' canonicalisation with our checked per-element solver (built once)."""
        if self._layer is None:  # (kept out of the module tree: an internal, empty module)
            object.__setattr__(self, "_layer", per_element_layer(uncached(self._program), self.parameters_,
                                                                 self.variables_, self._backend, self.gp))
        return self._layer

    def _use_batched(self, device: torch.device) -> bool:
        return self._batched is not None and (self.solver == "batched" or self._qp_only or self._batched.fits(device))

    def _solve_per_element(self, flat: list[torch.Tensor], solver_args: dict,
                           where: tuple[Sequence[int], tuple[int, ...]]) -> tuple[list, dict]:
        refuse_per_element(flat, where, self.solver)
        cpu = [v.to(device="cpu", dtype=torch.float64) for v in flat]
        with self._build_lock:
            layer = self._per_element_layer()
        self._backend._local.where = where  # for its messages (this thread's call)
        self._backend._local.needs = [v.requires_grad for v in cpu]  # for its backward's uniqueness test
        try:
            sols = layer(*cpu, solver_args=solver_args)
        finally:
            self._backend._local.where = self._backend._local.needs = None
        info = self._backend.last_info
        # (NaN or Inf incoming gradients: NaN gradients for those elements, by the backend's
        # backward, CheckedDiffcp.derivative_torch_batch, as the batched path's: upstream.py)
        sols = single_backward(sols)
        return sols, {"backend": ["per_element"] * len(info.solved), "solvers": info.solvers,
                            "statuses": info.statuses, "residuals": [float(r) for r in info.residuals],
                            "solved": info.solved, "kinds": info.kinds, "spreads": info.spreads,
                            "conditions": info.conditions}

    # ------------------------------------------------------------------ the call

    def _opinion_program(self, device: torch.device, pays: bool = True) -> BatchedProgram | None:
        """The batched form of the problem for second opinions, or None if it has none,
        one element exceeds its memory budget on ``device``, or (``pays``) dense batched
        factorisation is slower there than the per-element path (:meth:`BatchedProgram.fits`)."""
        if self._opinion is None:
            with self._build_lock:
                if self._opinion is None:
                    try:
                        self._opinion = BatchedProgram(uncached(self._program), self.parameters_, self.variables_,
                                                       tol_accept=self.batched_tol)
                    except UnsupportedProblem:
                        self._opinion = False
        if not self._opinion:
            return None
        usable = self._opinion.fits(device) if pays else self._opinion.max_batch(device) >= 1
        return self._opinion if usable else None

    @refusing_export("ConvexLayer")  # (outside the break, where strict torch.export can see it)
    @torch.compiler.disable  # a clean graph break: the solve is not traceable
    def forward(self, *values: torch.Tensor, solver_args: dict[str, Any] | None = None,
                **named: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Solve the problem for the given parameter values (see the class docstring); ``solver_args``
        (per call) are merged over the constructor's for the per-element solver."""
        call_args = validate_solver_args(self._backend.solver, solver_args, "solver_args (per call)")
        labels = getattr(self._local, "labels", None)  # this call's names (LearnedLayer's inputs)
        refuse_vmap("ConvexLayer", *values, *named.values(), jacrev=False, constants=False)
        values, batch = check_values(values, named, self.parameters_, self.check, labels)
        # Both backends differentiate once: differentiating again (w.r.t. grad_outputs too) raises DoubleBackwardError.
        values, close = first_order_region("ConvexLayer", values)

        out_dtype = functools.reduce(torch.promote_types, [v.dtype for v in values])
        device = values[0].device
        n_batch = math.prod(batch)
        out_shapes = [batch + tuple(v.shape) for v in self.variables_]
        if n_batch == 0:
            # Keep the graph connected so that backward on an empty output works.
            zero = sum((v.sum() * 0 for v in values), torch.zeros((), dtype=out_dtype, device=device))
            outs = tuple(torch.zeros(s, dtype=out_dtype, device=device) + zero for s in out_shapes)
            # Nothing solved, but last_solve must describe this call, not the one before.
            self._local.info = SolveInfo([], [], [], [], torch.zeros(batch, dtype=torch.bool, device="cpu"))
            return outs[0] if len(outs) == 1 else outs

        flat = flat_values(values, self.parameters_, batch, labels)  # (float64, gradients checked)
        with input_precision(lambda: read_by_rows(self._batched or self._opinion_program(device, False), values),
                             self.tol):  # (the inputs dependent equality rows' b_E reads: .consistent_rows)
            sols, info = self._solve(flat, device, call_args, batch)
        failed = unsolved(info)
        # (elements whose objective is nonconvex at their values, failed or, under a psd_wrap, any: unsolved or raised)
        failed = explain_nonconvex(self._batched or self._opinion, self.problem, self.parameters_, flat, failed, info,
                                   batch, self.on_failure == "raise", least_precise(values))
        if failed and self.on_failure == "raise":
            raise failure_error(failed, [info["statuses"][i] for i in failed], batch,
                                [info["kinds"][i] for i in failed])
        solved = torch.tensor(info["solved"], dtype=torch.bool, device="cpu").reshape(batch)
        if failed:
            warn_masked(failed, [info["statuses"][i] for i in failed], batch)
        outs = close(masked_outputs(sols, out_shapes, solved, device, out_dtype))
        self._local.info = SolveInfo(info["backend"], info["solvers"], info["statuses"],
                                     info["residuals"], solved)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _solve(self, flat: list[torch.Tensor], device: torch.device,
               call_args: dict, batch: tuple[int, ...]) -> tuple[list[torch.Tensor], dict]:
        """Both backends: batched first where it applies, then per element for the rest."""
        if not self._use_batched(device):
            sols, info = self._solve_per_element(flat, call_args, (range(math.prod(batch)), batch))
            info = {k: list(v) for k, v in info.items()}
            # Results in doubt (spread.in_doubt): the batched form's second opinion replaces them.
            doubt, wide = in_doubt(info, self.refine)
            program = self._opinion_program(device) if doubt else None
            asked = doubt
            if program is None and doubt:
                # Too slow batched to check every result in doubt (fits() is a speed choice), but an
                # element not solved is lost otherwise: the batched form takes those wherever memory
                # holds one element (entmax, n = 100, alpha = 1.25: Clarabel and SCS stalled at 2e-6,
                # the batched form agrees with the closed form to 1.5e-12).
                asked = [i for i in doubt if not info["solved"][i]]
                program = self._opinion_program(device, pays=False) if asked else None
            checked = []
            if program is not None:
                sub = element_subset(self.parameters_, flat, asked)
                fixed, part = solve_with_opinion(program, self.parameters_, sub, (asked, batch))
                merge_resolved(sols, info, asked, fixed, part, take=part["solved"])
                adopt_certificates(info, asked, list(zip(part["kinds"], part["statuses"])))
                doubt_certificates(info, asked, part["points"])
                checked = [i for i, ok in zip(asked, part["solved"]) if ok]
            # (the solved results in doubt were checked only where every one was asked)
            warn_unchecked((range(math.prod(batch)), batch), doubt, checked, wide, info,
                           program is not None and asked is doubt)
            return sols, info
        dual = any(forward_ad.unpack_dual(v).tangent is not None for v in flat)  # (forward mode: batched only)
        sols, info = solve_with_opinion(self._batched, self.parameters_, flat, (range(math.prod(batch)), batch),
                                        not (dual or self._qp_only))
        redo = unsettled(info)
        if redo and not self._qp_only:  # (which the per-element path cannot take)
            # Then per element; autograd flows to each element through the path that solved it.
            verdicts = [(info["kinds"][i], info["statuses"][i]) for i in redo]
            # Forward mode (dual): solved without tangents (failures need none: masked or raised as
            # in reverse mode); an element it solves needs a tangent it cannot give: refused.
            sub = [forward_ad.unpack_dual(v).primal for v in element_subset(self.parameters_, flat, redo)]
            fixed, part = self._solve_per_element(sub, call_args, (redo, batch))
            if dual and any(part["solved"]):
                took = [i for i, ok in zip(redo, part["solved"]) if ok]
                raise forward_mode_refused((took, batch), "were solved by the per-element path (the batched "
                                           "path did not certify them)")
            merge_resolved(sols, info, redo, fixed, part)
            warn_unconfirmed((redo, batch), [j for j in in_doubt(part, self.refine)[0] if part["solved"][j]],
                             part["residuals"], True, part["conditions"])
            adopt_certificates(info, redo, verdicts)
            batched_saw(info, (range(math.prod(batch)), batch), redo)
        return sols, info
