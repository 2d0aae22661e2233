"""Checks that ConvexLayer runs before it solves: the problem, the solver options, the tensors.

- :func:`validate_problem`: a DCP (or, with ``gp=True``, DGP) and DPP problem, with
  real parameters (not ``complex=True``, ``hermitian=True``, ``diag=True`` or ``sparsity=``)
  that have entries, real variables, no integer variables, and parameter/variable lists
  that match it (a wrong entry named by its index);
- solver options: :mod:`.solver_args` (re-exported here);
- tensors that honour what each ``cp.Parameter`` declares (``nonneg``, ``boolean``,
  ``PSD`` …; :func:`.declarations.check_parameter_attributes`);
- :func:`check_values`: every check of one call's tensors, in order, ending with the
  problem's own domain check where the layer has one (``ConvexLayer(check=...)``).

Every check raises an error of :mod:`convexddn.errors` that names the argument, what
was expected and what came.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import cvxpy as cp
import torch

from .._checks import check_finite, check_tensor
from ..errors import InputError, NotDPPError, OptionError, ProblemError, ShapeError
from .declarations import SYMMETRIC_ATTRIBUTES, check_parameter_attributes, parameter_label
from .solver_args import solver_choice, spelling, validate_solver_args
from .widen import widened

__all__ = ["batch_shape", "bind_names", "bind_parameters", "solver_choice", "validate_problem",
           "validate_solver_args", "check_leaf_list", "check_values", "describe_failure", "flat_values"]

def _offending_expression(problem: cp.Problem, gp: bool, qp: bool = False) -> str:
    """Name the first objective or constraint that breaks DCP/DGP or DPP, where CVXPY can
    (with ``qp``, the objective by the batched solver's rule: quad_form(x, P) of a
    parameter P is DPP there, not in a constraint)."""
    from cvxpy.utilities import scopes

    parts = [("objective", problem.objective)] + [
        (f"constraint {i}", c) for i, c in enumerate(problem.constraints)
    ]
    rule = "DGP" if gp else "DCP"
    for label, part in parts:
        try:
            ok = part.is_dgp() if gp else part.is_dcp()
            if not ok:
                return f"{label} `{part}` is not {rule}"
            if gp:
                ok = part.is_dgp(dpp=True)
            elif qp and label == "objective":
                with scopes.quad_form_dpp_scope():
                    ok = part.is_dcp(dpp=True)
            else:
                ok = part.is_dcp(dpp=True)
            if not ok:
                return f"{label} `{part}` is not DPP" + _parametric_bounds(part)
        except Exception:  # noqa: BLE001 — CVXPY raises various errors here
            continue
    return "CVXPY could not pin down the expression"


def _parametric_bounds(part) -> str:
    """A hint where ``part`` reads a variable whose ``bounds=`` hold parameters: CVXPY then
    counts the variable itself as parameter-dependent, so a parameter times it is not DPP
    (``c @ x`` with ``x = Variable(n, bounds=[0, ub])``), where the same bounds written as
    constraints are."""
    names = []
    for var in part.variables():
        bounds = var.attributes.get("bounds") or ()
        if any(isinstance(b, cp.Expression) and b.parameters() for b in bounds):
            names.append(var.name())
    if not names:
        return ""
    return (f" (it reads variable(s) {', '.join(names)} whose bounds= hold parameters, which CVXPY counts as "
            "parameter-dependent: write those bounds as constraints, e.g. x >= lb, x <= ub)")


def validate_problem(problem: Any, parameters: Sequence, variables: Sequence, gp: bool = False,
                     batched: bool = False, solver: str | None = None) -> bool:
    """Raise ``ProblemError``/``NotDPPError`` unless ConvexLayer can use the problem.

    With ``batched`` (the batched solver may take it), a problem that is DPP only with
    ``quad_form(x, P)`` of a parameter ``P`` in the objective is accepted: the batched
    solver keeps P as the quadratic term, the per-element path (which writes it as a
    second-order cone) cannot. Returns whether the problem is such a one. Without
    ``batched`` such a problem raises ``OptionError`` naming the ``solver`` chosen (the
    problem is fine, the choice is not), under the option's and the advice's spelling
    (:func:`.solver_args.spelled`).
    """
    if not isinstance(problem, cp.Problem):
        raise ProblemError(f"problem must be a cvxpy.Problem, got {type(problem).__name__}")
    dpp = True
    if gp:
        if not problem.is_dgp():
            raise ProblemError(
                f"problem must be log-log convex (DGP) with gp=True: {_offending_expression(problem, gp)}")
        if not problem.is_dgp(dpp=True):
            raise NotDPPError(f"problem must be DGP and DPP with gp=True: {_offending_expression(problem, gp)}")
    else:
        if not problem.is_dcp():
            if problem.is_dgp():
                raise ProblemError("problem is not DCP but is log-log convex (DGP): pass gp=True")
            raise ProblemError(f"problem must be convex (DCP): {_offending_expression(problem, gp)}")
        dpp = problem.is_dpp()
        quad_form = not dpp and problem.is_dpp(quad_form_dpp="qp")
        if quad_form and not batched:
            remedy = spelling("batched_remedy", "use solver='auto' or 'batched'")
            raise OptionError(
                f"{spelling('solver')}={solver!r} cannot solve this problem: quad_form(x, P) with a parameter P "
                "is DPP in the objective only for the batched solver, which keeps P as the quadratic term; a "
                f"per-element solver writes it as a second-order cone, where {_offending_expression(problem, gp)}; "
                f"{remedy}")
        if not dpp and not quad_form:
            raise NotDPPError(
                "problem must be DPP (disciplined parametrized programming: parameters may "
                "enter only affinely, or multiply parameter-free expressions) so that it "
                f"can be canonicalised once: {_offending_expression(problem, gp, qp=batched)}")
    if problem.is_mixed_integer():
        names = [v.name() for v in problem.variables() if v.attributes["boolean"] or v.attributes["integer"]]
        raise ProblemError(
            f"problem has integer or boolean variable(s) {names}: mixed-integer problems are not "
            "differentiable (their solution is piecewise constant in the parameters); relax them "
            "to continuous variables")
    if not problem.parameters():
        raise ProblemError(
            "problem has no cvxpy.Parameter: its solution is a constant, so there is nothing to "
            "pass in or differentiate; declare the data that varies as cp.Parameter")
    check_leaf_list("parameters", parameters, cp.Parameter)
    check_leaf_list("variables", variables, cp.Variable)
    declared = {p.id for p in problem.parameters()}
    given = [p.id for p in parameters]
    if len(set(given)) != len(given) or set(given) != declared:
        names = sorted(p.name() for p in problem.parameters())
        raise ProblemError(
            f"parameters must list each of the problem's parameters exactly once "
            f"({names}), got {[p.name() for p in parameters]}")
    for i, p in enumerate(parameters):
        # CVXPY gives a complex parameter two columns per entry (real and imaginary
        # parts), a Hermitian one its own real and imaginary triangles; the layer gave it
        # one column per entry of a real tensor: every call failed with a raw torch/scipy
        # error, or (hermitian, default solver) returned a wrong answer. imag=True
        # parameters take real tensors (the imaginary part) and do work.
        what = f"parameters[{i}] ({p.name()}, shape {tuple(p.shape)})"
        if p.size == 0:
            # CVXPY leaves a parameter without entries out of the compiled problem, and
            # cvxpylayers then failed with its bare KeyError (the parameter's id).
            raise ProblemError(
                f"{what} has no entries (zero size): CVXPY leaves such a parameter out of the compiled "
                "problem, so no tensor can reach it (and it carries no data); remove it from the problem "
                "(with the terms or constraints it appears in), or give it at least one entry")
        if p.attributes.get("complex"):
            raise ProblemError(
                f"{what} is declared complex=True: ConvexLayer takes real parameters only (real tensors; "
                "imag=True parameters, which take the imaginary part as a real tensor, work too); split it "
                f"into two real parameters, e.g. {p.name()}_re = cp.Parameter({tuple(p.shape)}) and "
                f"{p.name()}_im = cp.Parameter({tuple(p.shape)}), and write {p.name()}_re + 1j * {p.name()}_im "
                "in the problem")
        if p.attributes.get("hermitian"):
            raise ProblemError(
                f"{what} is declared hermitian=True: ConvexLayer takes real parameters only, and CVXPY "
                "stores a Hermitian parameter in other columns than a real tensor's entries; a real tensor "
                "is a real symmetric matrix: declare it symmetric=True, or split a complex Hermitian matrix "
                f"into real parameters, e.g. {p.name()}_re = cp.Parameter({tuple(p.shape)}, symmetric=True) "
                f"and {p.name()}_im = cp.Parameter({tuple(p.shape)}), and write "
                f"{p.name()}_re + 1j * ({p.name()}_im - {p.name()}_im.T) / 2 in the problem")
        # CVXPY stores a diag=True or sparsity= parameter by its stored entries only, which cvxpylayers
        # (both paths canonicalise through it) refused with its own "dimension-reducing attribute"
        # error, naming a library the user never called and no rewrite (and CVXPY warned of sparse .value).
        if p.attributes.get("diag"):
            raise ProblemError(
                f"{what} is declared diag=True, which ConvexLayer does not take (CVXPY stores only its diagonal); "
                f"pass the diagonal as a vector parameter instead, e.g. {p.name()}_d = cp.Parameter({p.shape[0]}), "
                f"and write cp.diag({p.name()}_d) in the problem")
        if getattr(p, "sparse_idx", None) is not None or p.attributes.get("sparsity"):
            raise ProblemError(
                f"{what} is declared with a sparsity pattern (sparsity=...), which ConvexLayer does not take (CVXPY "
                f"stores only the pattern's entries); declare it dense, {p.name()} = cp.Parameter({tuple(p.shape)}), "
                "and pass zeros off the pattern, or pass the k nonzeros as a vector parameter v = cp.Parameter(k) "
                "placed by a constant 0/1 matrix E: cp.reshape(E @ v, shape, order='F')")
    # cvxpylayers refused a complex (or Hermitian) variable anywhere in the problem with its
    # own "Complex variables are not yet supported": named here, with the rewrite.
    for v in problem.variables():
        kind = "complex" if v.attributes.get("complex") else "hermitian" if v.attributes.get("hermitian") else ""
        if kind:
            name, shape = v.name(), tuple(v.shape)
            extra = (f", with constraints {name}_re == {name}_re.T and {name}_im == -{name}_im.T"
                     if kind == "hermitian" else "")
            raise ProblemError(
                f"variable {name} (shape {shape}) is declared {kind}=True: ConvexLayer takes real variables only "
                "(imag=True ones work); split it into its real and imaginary parts, e.g. "
                f"{name}_re = cp.Variable({shape}) and {name}_im = cp.Variable({shape}){extra}, write "
                f"{name}_re + 1j * {name}_im in the problem, and return the two parts")
    # Constraint duals may be returned too (cvxpylayers' "dual variables" pattern).
    known = {v.id for v in problem.variables()}
    known |= {d.id for c in problem.constraints for d in c.dual_variables}
    # The cone program interleaves a constraint's cones (t_0, x_0, t_1, x_1, ...), where
    # cvxpylayers' recovery reads each dual variable as one contiguous slice: the duals
    # of a cp.SOC with a vector t, or of a vector ExpCone, came back scrambled, silently.
    interleaved = {d.id: c for c in problem.constraints if len(c.dual_variables) > 1
                   and getattr(c, "num_cones", lambda: 1)() > 1 for d in c.dual_variables}
    for i, v in enumerate(variables):
        if v.id not in known:
            raise ProblemError(f"variable {v.name()} is neither a variable of the problem nor "
                               "the dual variable of one of its constraints")
        if v.id in interleaved:
            c = interleaved[v.id]
            raise ProblemError(
                f"variables[{i}] is a dual variable of {type(c).__name__} constraint {c.constr_id}, which holds "
                f"{c.num_cones()} cones: the layer cannot return the duals of a constraint of several cones "
                "(its cone program interleaves them); write one constraint per cone, e.g. "
                "[cp.SOC(t[i], X[i]) for i in range(len(t))], and ask for each one's duals")
        if v.size == 0:  # (as a zero-size parameter: cvxpylayers' bare KeyError)
            raise ProblemError(
                f"variables[{i}] ({v.name()}, shape {tuple(v.shape)}) has no entries (zero size): CVXPY "
                "leaves it out of the compiled problem, so the layer cannot return it; drop it from variables")
        # Stored sparsely (diag=True, a sparsity pattern), a variable has fewer entries
        # than its shape: unpacking it into the output failed with a raw torch error.
        if v.attributes.get("diag") or v.attributes.get("sparsity"):
            raise ProblemError(
                f"variable {v.name()} is declared diag=True or with a sparsity pattern, which the layer "
                "cannot return; return a vector variable d used as cp.diag(d) (or a dense matrix) instead")
    return not gp and not dpp


def flat_values(values: Sequence[torch.Tensor], parameters: Sequence[cp.Parameter], batch: tuple[int, ...],
                labels: Sequence[str] | None = None) -> list[torch.Tensor]:
    """One call's checked values as the backends take them: float64 (:func:`.widen.widened`,
    whose gradient goes back checked), batched ones as ``(prod(batch), *param.shape)``,
    unbatched ones shared as ``param.shape`` (both backends broadcast them); with no
    batch at all, each as ``(1, *param.shape)``."""
    n_batch = math.prod(batch)
    flat = []
    for i, (value, param) in enumerate(zip(values, parameters)):
        shape = tuple(param.shape)
        v64 = widened(value, parameter_label(i, param, labels))
        flat.append(v64 if value.dim() == len(shape) else v64.expand(batch + shape).reshape((n_batch,) + shape))
    if not batch:
        flat = [v if v.dim() == len(p.shape) + 1 else v.unsqueeze(0) for v, p in zip(flat, parameters)]
    return flat


def describe_failure(err: BaseException) -> str:
    """``"Type: message"`` for an exception from CVXPY or cvxpylayers; for one without a
    message (CVXPY's unimplemented canonicalisations, e.g. ``real()`` of a real
    expression, raise a bare NotImplementedError), where it was raised and the CVXPY
    expression it was raised for."""
    if str(err):
        return f"{type(err).__name__}: {err}"
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return f"{type(err).__name__} (no message)"
    owner = tb.tb_frame.f_locals.get("self")
    what = f" for {type(owner).__name__} ({owner})" if isinstance(owner, cp.Expression) else ""
    return (f"{type(err).__name__}: (no message) in {tb.tb_frame.f_code.co_name}{what}: CVXPY cannot "
            "canonicalise that expression here")


def _describe(obj: Any) -> str:
    """What came, for an error message: the kind of object, its name and shape."""
    if isinstance(obj, cp.Expression):
        kind = type(obj).__name__
        if isinstance(obj, (cp.Variable, cp.Parameter)):
            return f"a cvxpy {kind} {obj.name()!r} of shape {tuple(obj.shape)}"
        if isinstance(obj, cp.Constant):
            return f"a cvxpy Constant of shape {tuple(obj.shape)}"
        return f"a cvxpy expression ({kind}) `{obj}` of shape {tuple(obj.shape)}"
    if isinstance(obj, torch.Tensor):
        return f"a torch.Tensor of shape {tuple(obj.shape)}"
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):  # a NumPy (or other) array
        return f"a {type(obj).__module__.split('.')[0]}.{type(obj).__name__} of shape {tuple(obj.shape)}"
    if obj is None:
        return "None"
    return f"a {type(obj).__name__} ({obj!r:.60})"


def check_leaf_list(what: str, given: Any, kind: type) -> None:
    """``given`` is a list (or tuple) of ``kind`` (cp.Parameter or cp.Variable), non-empty
    for variables; else a ``ProblemError`` naming the entry that is not, and what it is."""
    name = f"cvxpy.{kind.__name__}"
    if not isinstance(given, (list, tuple)):
        if isinstance(given, kind):
            raise ProblemError(f"{what} must be a list of {name}, got a single {name} {given.name()!r} "
                               f"of shape {tuple(given.shape)} (wrap it: [{given.name()}])")
        raise ProblemError(f"{what} must be a list of {name}, got {_describe(given)}")
    if what == "variables" and not given:
        raise ProblemError(f"variables must be a non-empty list of {name} (the variables to return), "
                           f"got an empty {type(given).__name__}")
    for i, entry in enumerate(given):
        if not isinstance(entry, kind):
            hint = ""
            if isinstance(entry, cp.Variable) and kind is cp.Parameter:
                hint = " (a cvxpy.Variable is solved for: list it in variables)"
            elif isinstance(entry, cp.Parameter) and kind is cp.Variable:
                hint = " (a cvxpy.Parameter is an input: list it in parameters)"
            raise ProblemError(f"{what}[{i}] must be a {name}, got {_describe(entry)}{hint}")


def check_values(values: tuple, named: dict[str, Any], parameters: Sequence[cp.Parameter],
                 check: Callable[[list[torch.Tensor]], None] | None = None,
                 labels: Sequence[str] | None = None) -> tuple[list[torch.Tensor], tuple[int, ...]]:
    """One call's tensors, bound and checked: ``(values in parameter order, batch shape)``.

    In order: binding (positional, then by name), tensor type, one device, trailing
    shapes and broadcastable batch shapes, finiteness, declared attributes, and last
    ``check`` — a problem's own domain check on the tensors in parameter order (e.g. the
    equal masses of optimal transport's marginals, which its CVXPY form cannot state
    without a redundant constraint), which raises an error of :mod:`convexddn.errors`.
    """
    values = bind_parameters(values, named, parameters)
    for i, (value, param) in enumerate(zip(values, parameters)):
        check_tensor(parameter_label(i, param, labels), value)
    devices = {v.device for v in values}
    if len(devices) > 1:
        raise InputError(f"all parameters must be on one device, got {sorted(map(str, devices))}")
    batch = batch_shape(values, parameters, labels)
    for i, (value, param) in enumerate(zip(values, parameters)):
        check_finite(parameter_label(i, param, labels), value)
    check_parameter_attributes(values, parameters, labels)
    if check is not None:
        check(list(values))
    # Symmetric (and PSD, NSD) parameters enter CVXPY's data through one triangle: their
    # gradient would be zero below the diagonal and doubled above it, and one optimiser
    # step would make the matrix asymmetric. Used as (v + vᵀ)/2 (equal to v within the
    # check above), the gradient is the symmetric one.
    values = [_symmetrised(v) if any(p.attributes.get(a) for a in SYMMETRIC_ATTRIBUTES) else v
              for v, p in zip(values, parameters)]
    return values, batch


def _symmetrised(v: torch.Tensor) -> torch.Tensor:
    """(v + vᵀ)/2 in v's dtype, v itself where v is symmetric: halves first (v + vᵀ
    overflows for float16 entries above 32752), in float64 (half of an odd float16
    subnormal rounded: S moved by one unit before the solve)."""
    w = v.to(torch.float64)
    return (0.5 * w + 0.5 * w.transpose(-1, -2)).to(v.dtype)


def element_subset(parameters: Sequence[cp.Parameter], flat: list[torch.Tensor], idx: list[int]) -> list[torch.Tensor]:
    """The flat parameter values of the batch elements ``idx`` (shared ones stay shared)."""
    sub = [v[idx] if v.dim() > len(p.shape) else v for v, p in zip(flat, parameters)]
    if all(v.dim() == len(p.shape) for v, p in zip(flat, parameters)):
        sub = [v.unsqueeze(0) for v in sub]
    return sub


_MISSING = object()


def bind_parameters(values: tuple, named: dict[str, Any], parameters: Sequence[cp.Parameter]) -> list[Any]:
    """A layer call's tensors in parameter order: positional first, then by CVXPY name."""
    return bind_names(values, named, [p.name() for p in parameters])


def bind_names(values: tuple, named: dict[str, Any], names: Sequence[str]) -> list[Any]:
    """:func:`bind_parameters` by the parameters' names (a native registry node has no
    ``cp.Parameter`` but takes its input as the same name, with the same errors)."""
    names = list(names)
    if len(values) > len(names):
        raise ShapeError(f"expected {len(names)} tensor(s), one per parameter {names}, got {len(values)}")
    # A private marker for "not given": None is a value (a wrong one, which the tensor
    # check then names) and must not read as a missing parameter.
    bound: list[Any] = list(values) + [_MISSING] * (len(names) - len(values))
    for key, value in named.items():
        if key not in names:
            raise ShapeError(f"unknown parameter name {key!r}; the parameters are {names}")
        if names.count(key) > 1:
            at = [j for j, n in enumerate(names) if n == key]
            raise ShapeError(f"parameter name {key!r} is ambiguous: parameters {at} share it; pass "
                             "them by position (or give the cp.Parameters distinct names)")
        i = names.index(key)
        if i < len(values):
            raise ShapeError(f"parameter {key!r} was given both by position ({i}) and by name")
        bound[i] = value
    missing = [n for n, v in zip(names, bound) if v is _MISSING]
    if missing:
        raise ShapeError(
            f"expected {len(names)} tensor(s), one per parameter {names}, got "
            f"{len(values) + len(named)}; missing {missing}")
    return bound


def batch_shape(values: Sequence[torch.Tensor], parameters: Sequence[cp.Parameter],
                labels: Sequence[str] | None = None) -> tuple[int, ...]:
    """The broadcast leading (batch) shape of the values of ``parameters``."""
    batch_shapes = []
    for i, (value, param) in enumerate(zip(values, parameters)):
        k = len(param.shape)
        if value.dim() < k or tuple(value.shape[value.dim() - k:]) != tuple(param.shape):
            raise ShapeError(
                f"{parameter_label(i, param, labels)} must have shape (*batch, "
                f"{', '.join(map(str, param.shape))}) i.e. trailing shape "
                f"{tuple(param.shape)}, got {tuple(value.shape)}")
        batch_shapes.append(tuple(value.shape[: value.dim() - k]))
    try:
        return tuple(torch.broadcast_shapes(*batch_shapes))
    except RuntimeError:
        named = (f"{parameter_label(i, p, labels)}: {s}" for i, (p, s) in enumerate(zip(parameters, batch_shapes)))
        raise ShapeError(f"batch shapes of the parameters do not broadcast: {', '.join(named)}") from None
