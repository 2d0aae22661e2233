"""``CvxpyLayer``: cvxpylayers' interface on top of :class:`ConvexLayer`.

A cvxpylayers user migrates by changing one import::

    from cvxpylayers.torch import CvxpyLayer     # before
    from convexddn import CvxpyLayer             # after

The constructor and the call take exactly cvxpylayers 1.2's arguments
(``CvxpyLayer(problem, parameters, variables, solver=None, gp=False, verbose=False,
canon_backend=None, solver_args=None)``; ``layer(*params, solver_args=None,
warm_start=False)``) and the call always returns a tuple, one tensor per variable, so
``x, = layer(A, b)`` and ``layer(A, b)[0]`` mean what they meant. What changes is what
:class:`ConvexLayer` adds: every solution verified against its KKT conditions and
polished, exact gradients, the caller's dtype and device, any leading batch shape, and
errors from :mod:`convexddn.errors`.

``solver_args`` are read the way a cvxpylayers user means them, in three groups:

- **applied**: ``solve_method`` picks the solver (``"SCS"``, ``"ECOS"`` or
  ``"Clarabel"``; ``None``, as if not given: the layer's solver); ``max_iters`` (or
  Clarabel's ``max_iter``), ``time_limit_secs`` (SCS's per-solve time limit, diffcp's
  default solver, 0 meaning none; or Clarabel's ``time_limit``) and ``verbose``
  (:data:`APPLIED_SOLVER_ARGS`) reach that solver under its own spelling, and any other
  setting that solver takes (Clarabel's ``direct_solve_method``, ``equilibrate_enable``,
  ...; ECOS's ``nitref``; SCS's ``log_csv_filename`` and ``linear_solver``) reaches it as
  written, checked as :class:`ConvexLayer` checks it (:mod:`.solver_args`; SCS also judges
  its settings itself, so one its build lacks is refused when the layer takes it). With the
  default solver they reach
  only the per-element one, Clarabel, which solves just the elements the batched interior
  point does not certify (the one warning says so). A setting of another solver raises
  :class:`~convexddn.errors.OptionError` naming its solver (cvxpylayers 1.2 passes it on:
  ECOS and SCS raise a ``TypeError``, Clarabel an ``AttributeError``): a time limit with
  ``solve_method="ECOS"``, ECOS's ``nitref`` with Clarabel; SCS's own settings with the default solver are ignored with
  the one warning (cvxpylayers' default solver is SCS, which does not run here);
- **ignored, with a warning naming each key once per layer** (a later call's keys not named
  yet get a warning of their own) (:data:`IGNORED_SOLVER_ARGS`): solver
  tolerances (SCS's ``eps``, ECOS's ``abstol``, Clarabel's ``tol_*``, ...), SCS's
  convergence tuning (``acceleration_lookback``, ``normalize``, ...), diffcp's
  derivative settings (``mode``, ``n_jobs_forward``, ``n_jobs_backward``): each solution
  is polished by Newton steps and accepted only with a KKT residual below the layer's
  ``tol``, and the adjoint is solved to full accuracy, so these keys cannot make the
  answer more accurate; diffcp's ``warm_starts`` (each problem is solved from scratch:
  a warm start changes SCS's speed, not the answer) and ``raise_on_error`` (a failed
  solve always raises :class:`~convexddn.errors.InfeasibleError`,
  :class:`~convexddn.errors.UnboundedError` or :class:`~convexddn.errors.SolverError`;
  with ``False`` diffcp returned SCS's unverified iterate instead). An ignored key's value
  is checked all the same, as the solver (or diffcp) that takes it would take it: ``eps=-1``
  or ``mode="fast"`` raises :class:`~convexddn.errors.OptionError`, not a no-op;
- **a replaced solver's settings**: with ``solver="MOREAU"`` or ``"MPAX"`` (replaced by the
  default solver, said in the warning) a key no solver here takes is that solver's setting
  (Moreau's ``tol``, MPAX's ``algorithm``) and is ignored with it, named in the same warning
  (Moreau itself skips a key it has no setting for); ``max_iters``, ``verbose`` and the
  others above keep their meaning;
- otherwise a key no solver takes raises :class:`~convexddn.errors.OptionError` listing the
  valid keys.

``canon_backend`` (CVXPY's canonicalisation backend) is checked, case-insensitively, against
CVXPY's backends (``"CPP"``, ``"SCIPY"``, ...; an :class:`~convexddn.errors.OptionError` naming
them otherwise, where cvxpylayers raises CVXPY's ``ValueError: Unknown backend``) and then
ignored with the warning: the problem is canonicalised once here.
"""
from __future__ import annotations

from typing import Any, Sequence

import cvxpy as cp
import torch
from torch import nn

from .._autograd import refuse_vmap, refusing_export
from .._checks import check_flag
from .._warn import warn
from ..errors import ConvexDDNWarning, OptionError, ShapeError
from .compat_args import (ALIASES, APPLIED_SOLVER_ARGS, AUTO_ONLY, BACKENDS, IGNORED_SOLVER_ARGS, REPLACED_BACKENDS,
                          SOLVER_NAMES, canon_backend as check_canon_backend, classify, per_element, solver_name)
from .declarations import parameter_label
from .layer import ConvexLayer
from .solver_args import spelled, validate_solver_args
from .state import picklable_state
from .validation import check_leaf_list

__all__ = ["CvxpyLayer", "APPLIED_SOLVER_ARGS", "IGNORED_SOLVER_ARGS"]

# The buffers of cvxpylayers' CvxpyLayer (its canonical problem data), dropped on load.
_CVXPYLAYERS_BUFFERS = ("P", "q", "A")


class CvxpyLayer(nn.Module):
    """cvxpylayers' ``CvxpyLayer``, solved and differentiated by :class:`ConvexLayer`.

    .. math::

        (x_1^\\star, \\dots, x_k^\\star)(\\theta) = \\operatorname*{argmin}_{x}
        f(\\theta, x) \\quad\\text{s.t.}\\quad x \\in C(\\theta)

    Args:
        problem: a DPP ``cvxpy.Problem`` (with ``gp=True``: a DGP problem, DPP under
            ``is_dgp(dpp=True)``).
        parameters: its ``cp.Parameter`` objects, in the order tensors are passed.
        variables: the ``cp.Variable`` objects to return, in that order.
        solver: ``None``, ``"DIFFCP"`` or ``"CUCLARABEL"`` (default: the
            ``solve_method`` of ``solver_args`` if given, else :class:`ConvexLayer`'s
            ``"auto"``: a batched interior point for LPs, QPs and SOCPs, per-element
            Clarabel otherwise); ``"CLARABEL"``, ``"SCS"``, ``"ECOS"`` pick that
            per-element solver; ``"MOREAU"`` and ``"MPAX"`` are replaced by the default
            with the one warning, as are their own settings in ``solver_args`` (keys no
            solver here takes). Case-insensitive.
        gp: the problem is log-log convex (geometric program): parameters and
            variables are positive and the problem is solved in log space.
        verbose: print the solver's log (``verbose=True`` for the solver).
        canon_backend: None or one of CVXPY's backends (``"CPP"``, ``"SCIPY"``, ...),
            checked and then ignored (with the one warning).
        solver_args: defaults for every call; see the module docstring.

    A per-element solver falls back to Clarabel where SCS or ECOS fails and to SCS where
    Clarabel fails (a :class:`~convexddn.errors.SolverWarning` says so). The layer's knobs
    (``tol``, ``refine``, ``adjoint``, ``workers``) keep :class:`ConvexLayer`'s defaults;
    use :class:`ConvexLayer` directly to change them.

    Shape:
        - Input: one tensor per parameter, ``(*batch_i, *param.shape)``; the batch
          shapes broadcast into one of them (cvxpylayers allows one optional leading
          dimension; any number works here, and an unbatched or size-1 batch is shared),
          but not into a grid that none of them has: ``(B,)`` beside ``(B, 1)`` raises
          :class:`~convexddn.errors.ShapeError`, as cvxpylayers raises (:class:`ConvexLayer`
          broadcasts there).
        - Output: a tuple with one ``(*batch, *var.shape)`` tensor per variable, even for
          one variable. dtype is the inputs' promoted dtype (cvxpylayers always returns
          float64), device the inputs' device.

    Raises:
        OptionError: an unknown solver, a custom ``SolverInterface``, ``solver_args``
            that is not a dict or has a key no solver takes (the message lists the
            valid ones; with ``solver="MOREAU"`` or ``"MPAX"`` such a key is that solver's,
            ignored), a ``canon_backend`` CVXPY does not have, a setting of another solver
            than the chosen one (a time limit
            with ``solve_method="ECOS"``: ECOS has none), a solver that cannot take the
            problem (a per-element one for ``quad_form(x, P)`` of a parameter ``P``;
            ECOS for PSD cones: named as chosen, ``solver`` or
            ``solver_args['solve_method']``), ``warm_start=True``.
        ProblemError, NotDPPError: the problem is not DCP/DPP (DGP with ``gp=True``) or
            the parameters/variables do not match it (ValueError subclasses, as in
            cvxpylayers).
        ShapeError, DTypeError, NonFiniteError: bad tensors (see :class:`ConvexLayer`),
            and batch shapes that broadcast into a grid none of them has (above).
        InfeasibleError, UnboundedError, SolverError: a solve failed (RuntimeError
            subclasses; cvxpylayers raises ``diffcp.SolverError`` there).

    Example::

        >>> x = cp.Variable(2); A = cp.Parameter((3, 2)); b = cp.Parameter(3)
        >>> prob = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b)), [x >= 0])
        >>> layer = CvxpyLayer(prob, parameters=[A, b], variables=[x])
        >>> solution, = layer(torch.randn(3, 2), torch.randn(3))
    """

    def __init__(
        self,
        problem: cp.Problem,
        parameters: Sequence[cp.Parameter],
        variables: Sequence[cp.Variable],
        solver: Any = None,
        gp: bool = False,
        verbose: bool = False,
        canon_backend: str | None = None,
        solver_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # The keys each notice has named (each key once per layer; not a flag: a later call's new keys are named).
        self._warned_keys: set[str] = set()
        self._warned_auto_keys: set[str] = set()
        self._gp = gp
        # A single leaf or expression is iterable (over its entries): named as ConvexLayer names it, not as
        # x[0]; None (not iterable) as ConvexLayer names it, not as Python's TypeError.
        for what, given, kind in (("parameters", parameters, cp.Parameter), ("variables", variables, cp.Variable)):
            if given is None or isinstance(given, cp.Expression):
                check_leaf_list(what, given, kind)
        # (nn.Module owns the names _parameters and parameters: keep the CVXPY objects apart)
        self._declared = (problem, list(parameters), list(variables))
        # The constructor's solver_args as given (less solve_method): each solver a call
        # picks reads them again (_make), as cvxpylayers merges them into every call's.
        method, self._args = self._translate(solver_args, "solver_args")
        backend = self._backend(solver)
        # cvxpylayers takes any truthy value; a string ("yes") was taken as True here too.
        if check_flag("verbose", verbose):
            self._args["verbose"] = True
        self._solver = method or backend or "auto"
        # cvxpylayers' MOREAU or MPAX (as written), which this layer's solver replaces: the keys of
        # solver_args (the constructor's and each call's) that no solver here takes are its settings,
        # ignored as it is, with the one warning (classify); Moreau itself skips a key it lacks.
        replaced = isinstance(solver, str) and solver.lower() in REPLACED_BACKENDS
        self._replaced = solver if replaced else None
        applied, ignored = classify(self._args, self._solver, self._replaced)
        if check_canon_backend(canon_backend) is not None:
            ignored["canon_backend"] = "CVXPY's canonicalisation backend (the problem is canonicalised once here)"
        if replaced:
            ignored[f"solver={solver!r}"] = "another algorithm, replaced by the default solver"
        # One ConvexLayer per solver used; a per-call solve_method adds one on first use.
        option = "solver_args['solve_method']" if method else "solver"
        self.layers = nn.ModuleDict({self._solver: self._make(self._solver, option)})
        self._warn(ignored, auto_only=self._auto_only(self._solver, applied))

    @staticmethod
    def _backend(solver: Any) -> str | None:
        if solver is None:
            return None
        if isinstance(solver, str):
            key = solver.lower()
            if key in BACKENDS:
                return None
            if key in SOLVER_NAMES:
                return SOLVER_NAMES[key]
        valid = ["DIFFCP", "CUCLARABEL", "MOREAU", "MPAX", *sorted(SOLVER_NAMES.values())]
        raise OptionError(
            f"solver must be None or one of {valid} (a custom SolverInterface cannot be "
            f"used: convexddn solves with its own checked backend), got {solver!r}")

    @staticmethod
    def _translate(args: Any, what: str) -> tuple[str | None, dict[str, Any]]:
        """cvxpylayers' solver_args -> (the solver its ``solve_method`` names, or None;
        the other keys), refusing a non-dict, an unknown ``solve_method`` and both
        spellings of one setting (the keys themselves are judged per solver: classify)."""
        if args is None:
            return None, {}
        if not isinstance(args, dict):
            raise OptionError(f"{what} must be a dict or None, got {type(args).__name__}")
        method = solver_name(args.get("solve_method"), f"{what}['solve_method']")
        for key, alias in ALIASES:
            if key in args and alias in args:
                raise OptionError(f"{what} gives both {key} and {alias}; give one")
        return method, {k: v for k, v in args.items() if k != "solve_method"}

    @staticmethod
    def _auto_only(solver: str, applied: dict[str, Any]) -> list[str]:
        """The applied keys that, with the default solver, reach only the per-element
        solver: it solves just the elements the batched interior point does not certify,
        so ``max_iters`` and ``verbose`` seldom have an effect there (said in the warning)."""
        return list(applied) if solver == "auto" else []

    def _warn(self, ignored: dict[str, str], auto_only: Sequence[str] = ()) -> None:
        """The two notices, each naming a key once per layer: keys ignored (key -> why), and
        keys that reach only the per-element solver under the default solver (attributed to
        the caller's line). A later call's keys not named yet get a notice of their own (a
        flag per layer left a later call's new keys, mode='dense' after eps, unsaid). The
        keys count as named once the warning has returned: under ``simplefilter("error")``
        the warning raises, the call fails, and a failed call changes nothing."""
        said = self.__dict__.get("_warned_keys", set())  # (layers pickled before it: a flag, no keys)
        new = {k: reason for k, reason in ignored.items() if k not in said}
        if new:
            why = "; ".join(sorted({f"{k}: {reason}" for k, reason in new.items()}))
            warn(
                f"CvxpyLayer ignores {list(new)} ({why}). convexddn accepts a solution only "
                f"with a KKT residual <= {self.convex_layer.batched_tol:g} (its batched solver; "
                f"{self.convex_layer.tol:g} for a per-element one) and differentiates it "
                "exactly. Each key is named once per layer.",
                ConvexDDNWarning)
            self._warned_keys = said | set(new)
        said = self.__dict__.get("_warned_auto_keys", set())
        new_auto = [k for k in auto_only if k not in said]
        if new_auto:
            warn(f"CvxpyLayer: {new_auto} {AUTO_ONLY}. Each key is named once per layer.", ConvexDDNWarning)
            self._warned_auto_keys = said | set(new_auto)

    @staticmethod
    def _native(applied: dict[str, Any], solver: str) -> dict[str, Any]:
        """cvxpylayers' spelling -> the solver's spelling (a key the solver takes as written
        stays), each value checked as that solver takes it (``OptionError`` for a key the
        solver has no setting for: a time limit with ECOS; or for a value it refuses,
        naming the key as the user wrote it: ``solver_args['max_iters']``, not the
        ``max_iter`` it became for Clarabel)."""
        missing = sorted(k for k in applied if k in APPLIED_SOLVER_ARGS and solver not in APPLIED_SOLVER_ARGS[k])
        if missing:
            takes = sorted(s for s in APPLIED_SOLVER_ARGS[missing[0]] if s != "auto")
            raise OptionError(
                f"solver_args {missing} cannot reach solver {solver!r}: it has no such setting (a time "
                f"limit is taken by {takes}; cvxpylayers raises a TypeError here too); pass "
                f"solve_method={takes[-1]!r} or drop the key")
        # One user key per native key (_translate refuses both spellings of one setting).
        spell = {k: APPLIED_SOLVER_ARGS[k][solver] if k in APPLIED_SOLVER_ARGS else k for k in applied}
        names = {native: k for k, native in spell.items()}
        native = {spell[k]: v for k, v in applied.items()}
        # "auto" passes them to its per-element solver, Clarabel (as ConvexLayer does).
        return validate_solver_args(per_element(solver), native, "solver_args", names)

    def _make(self, solver: str, option: str) -> ConvexLayer:
        """The ConvexLayer of ``solver`` (with the constructor's solver_args), which the user
        chose by ``option``: its errors about that choice name the option so."""
        native = self._native(classify(self._args, solver, getattr(self, "_replaced", None))[0], solver)
        remedy = ("drop solve_method: the default solver takes it" if option != "solver"
                  else "use solver=None (the default solver takes it)")
        fallback = "Clarabel" if solver in ("SCS", "ECOS") else "SCS"
        with spelled(solver=option, batched_remedy=remedy):
            return ConvexLayer(*self._declared, solver=solver, fallback=fallback, solver_args=native, gp=self._gp)

    def __getstate__(self) -> dict:
        return picklable_state(self)  # (the problem in _declared, without a solve's cached model)

    @property
    def convex_layer(self) -> ConvexLayer:
        """The :class:`ConvexLayer` of the constructor's solver (``last_solve``, ``tol``, ...)."""
        return self.layers[self._solver]

    def extra_repr(self) -> str:
        return f"solver={self._solver!r}, gp={self._gp}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # cvxpylayers saves its canonical problem matrices (P, q, A) as buffers; they
        # follow from the problem, which this layer canonicalises itself: a checkpoint
        # of a model that used cvxpylayers loads without them (strict or not).
        for key in _CVXPYLAYERS_BUFFERS:
            state_dict.pop(prefix + key, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @refusing_export("CvxpyLayer")  # (outside the break, as ConvexLayer's)
    @torch.compiler.disable  # the solve is not traceable (nor its solver_args checks: lru_cache)
    def forward(
        self,
        *params: torch.Tensor,
        solver_args: dict[str, Any] | None = None,
        warm_start: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """Solve for the given parameter values: a tuple, one tensor per variable.

        Args:
            *params: one tensor per parameter, in the constructor's order.
            solver_args: per-call solver arguments, over the constructor's (see the
                module docstring); a ``solve_method`` here picks the solver of this call.
            warm_start: must be False (cvxpylayers supports it only with ``MOREAU``).
        """
        if check_flag("warm_start", warm_start):
            raise OptionError(
                "warm_start=True is not supported: convexddn solves each problem from "
                "scratch (cvxpylayers supports it only with solver='MOREAU')")
        # (named as the caller's layer, before any check reads the values: a trace recorded those)
        refuse_vmap("CvxpyLayer", *params, jacrev=False, constants=False)
        _one_batch(params, self._declared[1])
        method, args = self._translate(solver_args, "solver_args")
        solver = method or self._solver
        # Checked here, under the user's keys (ConvexLayer would name the translated ones),
        # and before the once-per-layer notices: a call refused for its solver_args does
        # not use them up.
        applied, ignored = classify(args, solver, getattr(self, "_replaced", None))  # (layers pickled before it)
        native = self._native(applied, solver)
        # A new solver's layer joins the module tree only once its first call succeeds: a
        # failed call (a NaN parameter) left 'layers.SCS' in named_modules() and the repr.
        layer = self.layers[solver] if solver in self.layers else self._make(solver, "solver_args['solve_method']")
        self._warn(ignored, auto_only=self._auto_only(solver, applied))
        out = layer(*params, solver_args=native)
        if solver not in self.layers:
            self.layers[solver] = layer
        return out if isinstance(out, tuple) else (out,)


def _one_batch(values: Sequence[Any], parameters: Sequence[cp.Parameter]) -> None:
    """Raise ``ShapeError`` where the parameters' batch shapes broadcast to one that none
    of them has: ``p`` of ``(B, n)`` beside a scalar ``r`` given as ``(B, 1)`` would be a
    ``(B, B)`` grid of problems (cvxpylayers refuses it: one optional leading dimension,
    the same for every batched parameter). Broadcasting a batch into another's shape
    (an unbatched or ``(1,)`` value beside ``(B,)``) is kept; :class:`ConvexLayer` takes
    any broadcast. Values the layer refuses anyway (wrong trailing shape, not tensors)
    are left to its precise errors."""
    shapes = {}
    for i, (value, param) in enumerate(zip(values, parameters)):
        k = len(param.shape)
        if isinstance(value, torch.Tensor) and value.dim() >= k and tuple(value.shape[value.dim() - k:]) == param.shape:
            shapes[parameter_label(i, param)] = tuple(value.shape[: value.dim() - k])
    try:
        full = tuple(torch.broadcast_shapes(*shapes.values()))
    except RuntimeError:
        return  # (the layer names the shapes that do not broadcast)
    if shapes and full not in shapes.values():
        given = ", ".join(f"{label}: {shape}" for label, shape in shapes.items())
        raise ShapeError(
            f"CvxpyLayer: the parameters' batch shapes ({given}) broadcast to {full}, a grid of "
            f"{torch.Size(full).numel()} problems that no single parameter's batch holds; cvxpylayers refuses "
            "this (one optional leading batch dimension, shared by every batched parameter). A batched scalar "
            "parameter given as (B, 1) is the usual cause: pass it as (B,). ConvexLayer broadcasts batch "
            "shapes as torch does, where a grid is meant")

