"""Which tensors an objective really depends on: a walk of its autograd graph.

The implicit backward differentiates ``f(x, y)`` and the constraints with respect to
``y``, the inputs and the node's parameters. Two user mistakes would make that silently
wrong, and both are visible in the graph of ``f`` before anything is solved:

- ``f`` does not depend on ``y`` (``y.detach()``, ``.item()``, numpy): every
  derivative would be zero, unless the constraints define ``y`` (``min 0`` s.t. an
  implicit function ``h(x, y) = 0``: :func:`_defined_by_constraints`); a constraint that
  does not: it would be ignored;
- ``f`` uses a tensor that requires grad but is none of those (a closed-over tensor,
  e.g. ``self.w = w`` set from outside): it would get no gradient, without a word.

And the graph of ``∇_y L`` must carry every term's second derivatives
(:func:`second_derivatives`, :func:`lagrangian_gradient`; where a custom
``autograd.Function`` is in it, :func:`check_second_order` and :func:`check_curvature`),
which must resolve the solution at the dtype's precision (:func:`ill_determined`).
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from ..errors import DoubleBackwardError, InputError, ProblemError
from .lagrangian import ROUNDING_MARGIN, _grads, end_rounding
from .optimality import _format_indices

__all__ = ["autograd_leaves", "check_curvature", "check_graph", "check_second_order", "ill_determined",
           "lagrangian_gradient", "second_derivatives", "twice_refused"]

Tensor = torch.Tensor


def autograd_leaves(outputs: Iterable[Tensor], stop: set[int] | None = None,
                    boundary: Sequence[Tensor] = (), custom: list | None = None) -> dict[int, Tensor]:
    """The leaf tensors requiring grad that ``outputs`` depend on, by ``id``.

    With ``stop``, the walk ends at the first leaf whose id is not in ``stop`` (enough
    to report it without walking a large foreign graph). Tensors in ``boundary`` that
    are not leaves count as leaves where the walk reaches their ``grad_fn`` (a node's
    parameters swapped in as computed tensors: MAML's fast weights under
    torch.func.functional_call, DataParallel's replicas). ``custom``: a list that gets
    the graph's custom ``torch.autograd.Function`` nodes (the only ones whose backward
    may lack its own graph: torch's operations have a double backward, or raise).
    """
    ends = {id(t.grad_fn): t for t in boundary if t.grad_fn is not None}
    leaves: dict[int, Tensor] = {}
    # Holds the visited nodes, not only their ids: a grad_fn's Python wrapper can be
    # freed once popped, and a new wrapper may reuse its id (a branch then counts as
    # seen and is skipped).
    seen: dict[int, object] = {}
    stack = []
    for t in outputs:
        if t is None or not t.requires_grad:
            continue
        if t.grad_fn is None:
            leaves[id(t)] = t
        else:
            stack.append(t.grad_fn)
    while stack:
        fn = stack.pop()
        if id(fn) in seen:
            continue
        seen[id(fn)] = fn
        if id(fn) in ends:
            leaves[id(ends[id(fn)])] = ends[id(fn)]
            continue
        if custom is not None and isinstance(fn, torch.autograd.function.BackwardCFunction):
            custom.append(fn)
        var = getattr(fn, "variable", None)
        if var is not None:  # AccumulateGrad: a leaf
            leaves[id(var)] = var
            if stop is not None and id(var) not in stop:
                return leaves
            continue
        stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
    return leaves


def _describe(t: Tensor) -> str:
    return f"a tensor of shape {tuple(t.shape)} and dtype {t.dtype}"


def check_graph(
    name: str,
    objective: Tensor,
    constraints: dict[str, Tensor | None],
    y: Tensor,
    allowed: Sequence[Tensor],
    custom: list | None = None,
) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """Raise if ``objective`` or a constraint ignores ``y``, or a graph uses a foreign
    tensor requiring grad.

    ``constraints`` maps each constraint method's name to its values (``None``: the
    node has none). Returns the leaves of the objective and of the constraints,
    separately (to tell which inputs each uses); ``custom`` gets their custom
    ``autograd.Function`` nodes (:func:`autograd_leaves`).

    Raises:
        ProblemError: ``objective`` or a constraint is not connected to ``y`` by autograd.
        InputError: a leaf that requires grad is neither ``y`` nor in ``allowed`` (checked
            first, naming the method: the walk stops at such a leaf, maybe before ``y``).
    """
    prefix = f"{name}." if name else ""
    known = {id(t) for t in allowed} | {id(y)}
    graphs = {"objective": objective, **{m: c for m, c in constraints.items() if c is not None}}
    of: dict[str, dict[int, Tensor]] = {}
    for method, out in graphs.items():
        of[method] = autograd_leaves([out], stop=known, boundary=allowed, custom=custom)
        # First: the walk stops at a foreign leaf, so its leaves may lack y (a constraint that
        # read self.r = w.exp() was refused as "does not depend on y").
        foreign = [t for i, t in of[method].items() if i not in known]
        if foreign:
            raise InputError(
                f"{prefix}{method} reads {_describe(foreign[0])} that requires grad but is neither an "
                "input nor a parameter of the node (directly, or through the autograd graph of a tensor it "
                "reads, e.g. an attribute self.r = w.exp() computed outside the node), so it would get no "
                "gradient. Pass it as an input (node(x, w) with objective(self, x, w, y) and solve(self, x, "
                "w)), or make it a parameter of the node (self.w = nn.Parameter(...)) and compute what "
                "depends on it in the objective or constraints; detach it if it needs no gradient")
    for method in (*list(graphs)[1:], "objective"):  # (the constraints first)
        if id(y) not in of[method]:
            if method == "objective" and _defined_by_constraints(constraints, of, y):
                continue
            # Its Jacobian in y would be zero: a constraint the gradient cannot see (the
            # unconstrained problem's gradient, silently, or autograd's raw error).
            lost = ("every derivative of the solution would be zero or undefined. Write the objective"
                    if method == "objective" else "the implicit gradient would ignore the constraint. Write it")
            also = (" (a problem defined by its constraints alone, min 0 s.t. h(x, y) = 0, is differentiated "
                    "where its constraints have at least as many rows as y has entries and read the inputs "
                    "or parameters)") if method == "objective" and len(graphs) > 1 else ""
            raise ProblemError(f"{prefix}{method} does not depend on y through autograd (does it use y.detach(), "
                               f".item() or numpy?): {lost} in differentiable torch operations on y{also}")
    of_objective = of.pop("objective")
    of_constraints = {i: t for leaves in of.values() for i, t in leaves.items()}
    return of_objective, of_constraints


def _defined_by_constraints(constraints: dict[str, Tensor | None], of: dict[str, dict[int, Tensor]],
                            y: Tensor) -> bool:
    r"""Whether an objective without ``y`` in its graph still leaves a derivative: the
    constraints read ``y`` (checked before) and data, and have at least as many rows as
    ``y`` has entries per element.

    With ``f`` constant in ``y`` the Lagrangian's Hessian is that of ``λᵀc`` alone, and at a
    typical solution (λ = 0 where ``∇_y f = 0``) the KKT matrix is
    :math:`\begin{bmatrix} 0 & A^\top \\ A & 0 \end{bmatrix}`, of rank at most ``2r``:
    nonsingular only where ``A`` is square and invertible (``r >= m`` rows, an implicit function
    :math:`h(x, y) = 0`, whose derivative is :math:`-A^{-1} D_x h`: ``y³ + y = x`` gives
    ``1/(3y² + 1)``). Fewer rows leave it singular (the derivative is undefined: a ``y.detach()``
    objective beside one constraint is still refused), and constraints that read no input nor
    parameter make every derivative zero (``y`` is a constant): both refused as before.
    """
    m = y[0].numel() if y.shape[0] else 0
    rows = sum(c[0].numel() for c in constraints.values() if c is not None and c.shape[0])
    reads_data = any(i != id(y) for method, leaves in of.items() if method != "objective" for i in leaves)
    return m > 0 and rows >= m and reads_data


def twice_refused(err: BaseException) -> bool:
    """Whether ``err`` is torch's refusal to differentiate an operation a second time: a
    backward's own derivative missing ("derivative for '_cdist_backward'"), a
    once-differentiable Function, or a torch.compile'd one ("aot_autograd does not
    currently support double backward"); a missing first derivative ("derivative for
    'igamma: input'") is a different fault."""
    text = str(err)
    return isinstance(err, DoubleBackwardError) or isinstance(err, (NotImplementedError, RuntimeError)) and bool(
        re.search(r"derivative for '[^']*_backward", text) or "differentiate twice" in text
        or "double backward" in text)


@contextlib.contextmanager
def second_derivatives(prefix: str, forward: bool = False) -> Iterator[None]:
    """Turn torch's "cannot differentiate twice" errors into a ``ProblemError``; ``forward``:
    in forward mode, whose ``B ẋ`` is formed by a second reverse product in the inputs or,
    where that is refused, by forward mode over one reverse product (an operation on the
    inputs alone then needs its forward derivative: both failed).

    The implicit backward differentiates ``∇_y L`` again (Hessian-vector products), so
    every operation of the objective and constraints needs a double backward; a few
    torch operations have none (``torch.cdist``'s backward), and autograd's own message
    names neither the method nor the remedy.
    """
    try:
        yield
    except (NotImplementedError, RuntimeError) as err:
        # (whether it fails in lagrangian_gradient or only in a later product depends on
        # what was compiled before)
        if not twice_refused(err):
            raise
        text = str(err)
        raise ProblemError(
            f"{prefix}objective or constraints use an operation that torch cannot differentiate "
            f"twice ({text.strip()}); the implicit backward needs their second derivatives "
            "(Hessian-vector products). Write it with elementary operations (e.g. "
            "((y - p) ** 2).sum(-1).sqrt() for torch.cdist)"
            + (". In forward mode an operation on the inputs alone needs either its double backward or its "
               "forward derivative (the mixed derivative B·ẋ is formed by one of the two; a parameter's tangent "
               "needs the double backward); computing such a term outside the node and passing it as an input "
               "works in both modes"
               if forward else "")) from err


def lagrangian_gradient(prefix: str, lagrangian: Tensor, yg: Tensor) -> tuple[Tensor, Tensor]:
    """``(∇_y L, ω)``: the gradient (B, m) of the per-element Lagrangian ``lagrangian``
    (B,), with its graph, taken with an incoming gradient ``ω = 1`` (B,) that requires grad.

    Every term of ``∇_y L`` is then a function of ``ω`` as well as of ``y``: an operation
    whose backward is first-order only (``@once_differentiable``, a compiled function)
    raises torch's own error on the second pass (or here), where with a constant ``ω``
    its curvature silently dropped out of the Hessian (a custom softplus: gradients 20 %
    off); a backward that runs under ``no_grad`` is caught by :func:`check_second_order`.
    """
    seed = torch.ones_like(lagrangian.detach()).requires_grad_(True)
    try:
        return _grads(lagrangian, yg, create_graph=True, seed=seed)[0], seed
    except RuntimeError as err:
        try:  # (fails also with a constant ω: not a second-derivative fault)
            _grads(lagrangian, yg, create_graph=True)
        except RuntimeError:
            raise err from None
        raise ProblemError(
            f"{prefix}objective or constraints use an operation whose backward fails when its incoming "
            f"gradient requires grad ({str(err).strip()[:200]}): it cannot be differentiated twice (e.g. a "
            "torch.compile'd function), and the implicit backward needs their second derivatives "
            "(Hessian-vector products). Write it with differentiable torch operations") from err


# ∂⟨∇_y L, u⟩/∂ω may depart from ⟨∇_y L, u⟩ by this many eps of the terms' scale.
_SECOND_ORDER_NOISE = 1e3


def check_second_order(prefix: str, gL: Tensor, u: Tensor, d_seed: Tensor | None, scale: Tensor,
                       batch_shape, rounding: Callable[[], Tensor] | None = None) -> None:
    r"""Raise where a term of ``∇_y L`` carries no graph: its curvature is missing from H.

    ``∇_y L`` is linear in the incoming gradient ``ω`` of :func:`lagrangian_gradient`, so
    :math:`\partial \langle \nabla_y L, u\rangle / \partial\omega = \langle \nabla_y L, u\rangle`
    at ``ω = 1`` when every term is differentiable; a custom ``autograd.Function`` whose
    backward runs under ``torch.no_grad`` (or detaches, or goes through numpy) adds its
    value without its graph, and the difference is that term's ``⟨∇t, u⟩``, O(1) of the
    scale ``scale`` (B,) of :func:`~.optimality.kkt_residuals` where rounding leaves eps of it.
    ``d_seed`` (B,): the derivative from :func:`lagrangian_probes`; ``u`` its direction.
    ``rounding``: ``() -> (B, m)``, the measured rounding of ``∇_y L``
    (:func:`~.lagrangian.seed_rounding`), called only where the gap exceeds the floor:
    where the terms saturate and cancel (pseudo-Huber pooling of points ±100 from y) it
    is eps·Σ|t_i| ~ 1e-15, the scale's floor ~1e-16, and 20 of 50 elements were refused;
    a gap is a missing graph only beyond ``ROUNDING_MARGIN`` times it (a term without a
    graph is linear in ``ω`` as well: its rounding stays at eps, its gap at its size).
    """
    if d_seed is None:
        return
    value = (gL.detach() * u).sum(-1)
    eps = torch.finfo(gL.dtype).eps
    gap = (d_seed - value).abs()
    bad = gap > _SECOND_ORDER_NOISE * eps * (scale + value.abs() + d_seed.abs())
    if not bool(bad.any()):
        return
    if rounding is not None:
        bad = bad & (gap > ROUNDING_MARGIN * (rounding() * u.abs()).sum(-1))
        if not bool(bad.any()):
            return
    indices = _format_indices(bad, batch_shape)
    raise ProblemError(
        f"{prefix}objective or constraints use an operation whose backward is not itself differentiable "
        f"(at batch indices {indices[:8]}, {len(indices)} of {bad.numel()} element(s)): a term of their gradient "
        "in y carries no autograd graph (e.g. a custom torch.autograd.Function whose backward runs under "
        "torch.no_grad, detaches, or uses numpy), so its second derivatives would be missing from the implicit "
        "system and the gradient would be wrong. Give the Function a differentiable backward (torch operations "
        "on the saved tensors, outside no_grad) or write the term with differentiable torch operations")


# The curvature probe's step, in eps^(1/3) of y's length: a central difference's rounding
# (eps / step) and truncation (step²) balanced, ~1e-10 of the curvature each in float64.
_CURVATURE_STEP = 1.0 / 3.0
# A central difference of ∇_y L departing from autograd's H u by more than this fraction of
# their size, alike at the steps h and 2h (truncation grows 4-fold, rounding halves), is a
# missing second derivative.
_CURVATURE_RATIO = 0.05
_CURVATURE_AGREE = 0.25


def check_curvature(prefix: str, grad_at: Callable[..., Tensor], y: Tensor, u: Tensor, hu: Tensor | None,
                    length: Tensor, custom: Sequence, batch_shape) -> None:
    r"""Raise where autograd's ``H u`` misses curvature that ``∇_y L`` has: a term whose backward
    computes its value without a graph in ``y`` (a custom ``autograd.Function`` whose backward runs
    under ``torch.no_grad``, detaches or uses numpy), whatever its first derivative at ``y``.

    :func:`check_second_order` sees such a term by its value, and misses it where it vanishes at
    the solution (``(y − c)²`` at ``y = c``: its curvature 2 silently dropped out of H, a gradient of
    1 for 1/3); its curvature shows in the central difference
    :math:`D_h = (\nabla_y L(y + hu) - \nabla_y L(y - hu)) / 2h` along ``u`` (B, m), which
    ``hu`` (:math:`Hu` (B, m) from :func:`~.lagrangian.lagrangian_probes`; ``None``: no graph at all)
    must match up to :math:`O(h^2)`, with :math:`h = \epsilon^{1/3} \ell` (``length`` (B, 1),
    :func:`~.lagrangian._kink_length`). Flagged: an element whose :math:`\|D_h - Hu\|_\infty`
    exceeds ``_CURVATURE_RATIO`` of :math:`\|D_h\|_\infty + \|Hu\|_\infty`, agrees with
    :math:`D_{2h} - Hu` (a missing term's curvature does not depend on the step), where
    :math:`D_h` itself has that size (terms that saturate leave ∇_y L flat: :math:`D_h = 0`, not a
    missing term) and beyond ``ROUNDING_MARGIN`` times the rounding measured at the ends
    (:func:`~.lagrangian.seed_rounding`). Run only where the graph holds ``custom`` nodes (of
    :func:`check_graph`): torch's own operations cannot drop a graph.
    """
    eps = torch.finfo(y.dtype).eps
    h = eps ** _CURVATURE_STEP * length
    hu = torch.zeros_like(y) if hu is None else hu.detach()
    with torch.enable_grad():
        ends = [grad_at(y + k * h * u) for k in (1.0, -1.0, 2.0, -2.0)]
    d1, d2 = (ends[0] - ends[1]) / (2.0 * h), (ends[2] - ends[3]) / (4.0 * h)
    miss, seen = (d1 - hu).abs().amax(-1), d1.abs().amax(-1)
    bad = ((miss > _CURVATURE_RATIO * (seen + hu.abs().amax(-1))) & (seen > 0.5 * miss)
           & ((d2 - d1).abs().amax(-1) <= _CURVATURE_AGREE * miss))
    if not bool(bad.any()):
        return
    noise = end_rounding(grad_at, y, h, u, ends)
    bad = bad & (miss * 2.0 * h[:, 0] > ROUNDING_MARGIN * noise.amax(-1))
    if not bool(bad.any()):
        return
    names = sorted({type(fn).__name__.removesuffix("Backward") for fn in custom})
    indices = _format_indices(bad, batch_shape)
    raise ProblemError(
        f"{prefix}objective or constraints use an operation whose backward is not itself differentiable in y "
        f"(at batch indices {indices[:8]}, {len(indices)} of {bad.numel()} element(s)): the Hessian-vector "
        f"product misses curvature that a finite difference of their gradient shows (up to {float(miss.amax()):.2e}), "
        f"so the implicit system would lack second derivatives and the gradient would be wrong. Custom "
        f"torch.autograd.Function(s) in the graph: {', '.join(names)}; give each a differentiable backward (torch "
        "operations on the saved tensors, outside no_grad and numpy) or write the term with torch operations")


def ill_determined(grad_at: Callable[..., Tensor], y: Tensor, u: Tensor, hu: Tensor, diff: Tensor, delta: Tensor,
                   scale: Tensor, tol: float, free: Tensor | None = None) -> Tensor | None:
    r"""``(B,)`` elements whose ``∇_y L`` does not resolve its own curvature across ``tol`` of the
    problem's length :math:`\ell = s / \|Hu\|_\infty` (``scale`` :math:`s` (B,), the size of the
    terms of ∇_y L as its derivatives show them, :func:`~.implicit_system._term_scale`: ``‖y‖``, and
    the inputs' ``‖x‖`` as far as the problem sees them, a solution ~1e-17 beside data ~1 is not
    undetermined for being small): the solution is determined only to more than that; ``None`` if none.

    Where the terms of ∇_y L saturate and cancel (log-cosh pooling with every point 10 to 60
    widths from ``y``: terms ±a, curvature 5.7e-15), its rounding, eps of the terms, exceeds what
    the curvature moves it by, and neither derivative shows how large the terms are: the measured
    rounding (:func:`~.lagrangian.seed_rounding`) was 0, as the terms cancel exactly at every
    seed, and the second-order check took it for a missing graph; the gradient was 3 % (to 50 %)
    off the mpmath one. The test, a ladder of central differences along ``u``: ``diff`` (B, m),
    the kink probe's :math:`\nabla_y L(y + \delta u) - \nabla_y L(y - \delta u)`
    (:func:`~.lagrangian.kinked`, its step ``delta`` (B, 1)), within half of :math:`2\delta Hu`
    (``hu`` (B, m)) of it: resolved, nothing more is spent; else the same at the step
    :math:`\text{tol}\,\ell`, and where that departs too, its size against ``ROUNDING_MARGIN``
    times the rounding measured at its ends (a curvature that varies within that step, pooling
    at an offset of 1e7 with unit width, moves it far above its rounding). ``free`` (B,): the
    elements without an active constraint (others are judged by the KKT system's conditioning).
    """
    def departs(d: Tensor, step: Tensor) -> Tensor:
        predicted = 2.0 * step * hu
        return (d - predicted).abs().amax(-1) > 0.5 * predicted.abs().amax(-1)

    hu = hu.detach()
    curvature = hu.abs().amax(-1)
    # (no curvature along u: a singular Hessian, which the KKT system's test reports)
    bad = departs(diff, delta) & (curvature > 0) & (True if free is None else free)
    if not bool(bad.any()):
        return None
    s = tol * (scale / torch.where(curvature > 0, curvature, 1.0)).unsqueeze(-1)
    with torch.enable_grad():
        ends = [grad_at(y + k * s * u) for k in (1.0, -1.0)]
    change = ends[0] - ends[1]
    bad = bad & departs(change, s)
    if not bool(bad.any()):
        return None
    noise = end_rounding(grad_at, y, s, u, ends)
    bad = bad & ~(change.abs().amax(-1) > ROUNDING_MARGIN * noise.amax(-1))
    return bad if bool(bad.any()) else None
