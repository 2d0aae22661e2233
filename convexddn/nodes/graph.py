"""Which tensors an objective really depends on: a walk of its autograd graph.

The implicit backward differentiates ``f(x, y)`` and the constraints with respect to
``y``, the inputs and the node's parameters. Two user mistakes would make that silently
wrong, and both are visible in the graph of ``f`` before anything is solved:

- ``f`` does not depend on ``y`` (``y.detach()``, ``.item()``, numpy): every
  derivative would be zero (a constraint that does not: it would be ignored);
- ``f`` uses a tensor that requires grad but is none of those (a closed-over tensor,
  e.g. ``self.w = w`` set from outside): it would get no gradient, without a word.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Sequence

import torch

from ..errors import InputError, ProblemError

__all__ = ["autograd_leaves", "check_graph", "second_derivatives"]

Tensor = torch.Tensor


def autograd_leaves(outputs: Iterable[Tensor], stop: set[int] | None = None,
                    boundary: Sequence[Tensor] = ()) -> dict[int, Tensor]:
    """The leaf tensors requiring grad that ``outputs`` depend on, by ``id``.

    With ``stop``, the walk ends at the first leaf whose id is not in ``stop`` (enough
    to report it without walking a large foreign graph). Tensors in ``boundary`` that
    are not leaves count as leaves where the walk reaches their ``grad_fn`` (a node's
    parameters swapped in as computed tensors: MAML's fast weights under
    torch.func.functional_call, DataParallel's replicas).
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
) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """Raise if ``objective`` or a constraint ignores ``y``, or a graph uses a foreign
    tensor requiring grad.

    ``constraints`` maps each constraint method's name to its values (``None``: the
    node has none). Returns the leaves of the objective and of the constraints,
    separately (to tell which inputs each uses).

    Raises:
        ProblemError: ``objective`` or a constraint is not connected to ``y`` by autograd.
        InputError: a leaf that requires grad is neither ``y`` nor in ``allowed``.
    """
    prefix = f"{name}." if name else ""
    known = {id(t) for t in allowed} | {id(y)}
    of_objective = autograd_leaves([objective], stop=known, boundary=allowed)
    of_constraints = {}
    for method, c in constraints.items():
        if c is None:
            continue
        leaves_c = autograd_leaves([c], stop=known, boundary=allowed)
        if id(y) not in leaves_c:
            # Its Jacobian in y would be zero: a constraint the gradient cannot see (the
            # unconstrained problem's gradient, silently, or autograd's raw error).
            raise ProblemError(
                f"{prefix}{method} does not depend on y through autograd (does it use "
                "y.detach(), .item() or numpy?): the implicit gradient would ignore the "
                "constraint. Write it in differentiable torch operations on y")
        of_constraints.update(leaves_c)
    leaves = {**of_objective, **of_constraints}
    foreign = [t for i, t in leaves.items() if i not in known]
    if foreign:
        raise InputError(
            f"{prefix}objective or its constraints use {_describe(foreign[0])} that "
            "requires grad but is neither an input nor a parameter of the node, so it "
            "would get no gradient. Pass it as an input (node(x, w) with "
            "objective(self, x, w, y) and solve(self, x, w)), or make it a parameter of "
            "the node (self.w = nn.Parameter(...)); detach it if it needs no gradient"
        )
    if id(y) not in of_objective:
        raise ProblemError(
            f"{prefix}objective does not depend on y through autograd (does it use "
            "y.detach(), .item() or numpy?): every derivative of the solution would be "
            "zero. Write the objective in differentiable torch operations on y"
        )
    return of_objective, of_constraints


@contextlib.contextmanager
def second_derivatives(prefix: str) -> Iterator[None]:
    """Turn torch's "cannot differentiate twice" errors into a ``ProblemError``.

    The implicit backward differentiates ``∇_y L`` again (Hessian-vector products), so
    every operation of the objective and constraints needs a double backward; a few
    torch operations have none (``torch.cdist``'s backward), and autograd's own message
    names neither the method nor the remedy.
    """
    try:
        yield
    except (NotImplementedError, RuntimeError) as err:
        text = str(err)
        # Only second-derivative gaps: a backward's own derivative ("derivative for
        # '_cdist_backward'"), or a once-differentiable Function; a missing first
        # derivative ("derivative for 'igamma: input'") is a different fault.
        if not (re.search(r"derivative for '[^']*_backward", text) or "differentiate twice" in text):
            raise
        raise ProblemError(
            f"{prefix}objective or constraints use an operation that torch cannot differentiate "
            f"twice ({text.strip()}); the implicit backward needs their second derivatives "
            "(Hessian-vector products). Write it with elementary operations (e.g. "
            "((y - p) ** 2).sum(-1).sqrt() for torch.cdist)") from err
