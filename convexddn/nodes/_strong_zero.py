"""Inactive constraints kept out of the derivatives of a declarative node's active ones.

The user's constraints come back as one tensor; autograd differentiates a row with the
others' incoming gradients set to zero, and multiplies that zero by each operation's local
derivative. Where an inactive constraint is not differentiable at the solution (``‖y‖ − 1``
written as ``(y*y).sum().sqrt()`` at ``y = 0``: ``0 / (2·0)``), the product is NaN, and it
reaches the derivatives of every row through ``y``: the bounds ``−y ≤ 0``, Jacobian ``−I``,
were reported non-finite and the backward raised for the whole batch; written as
``y.norm()``, the Lagrangian's second derivatives were NaN and the element's gradient was
zeroed under a warning. Inactive rows have multiplier 0 and do not enter the derivatives.

:func:`strong_zero` gives the constraints' graph that meaning: the operations that feed
only inactive rows pass zeros back where all their incoming gradients are zero, whatever
their local derivative (the "strong zero" 0 · ∞ = 0 of a vector-Jacobian product, linear
in them). It is exact for the rows that enter; an inactive row's own Jacobian row (a
non-zero incoming gradient) is NaN as before, and zeroed as inactive; an active row's
infinite derivative is still reported, naming that row. The Jacobian's rows, first order,
need only :func:`zero_passing`; the Lagrangian's second derivatives need the rows told
apart per element, :func:`strong_zero_fn`: the constraints evaluated once per group of
elements with the same inactive rows. Its limit: operations are told apart at the tensors
the user's code builds (an inactive row computed in one tensor with active rows, through
one singular operation, is not separated: that element is reported as before). It costs
evaluations, backward passes and a host read per operation, so
:func:`~.implicit_system.implicit_system` turns it on only where non-finite derivatives
meet inactive rows.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

__all__ = ["detached_outside", "strong_zero", "strong_zero_fn", "zero_passing"]

Tensor = torch.Tensor


def _pass_zero(grad_inputs: tuple, grad_outputs: tuple) -> tuple | None:
    # (A host read, and Python control flow: a masked where would keep the NaN branch in a
    # graph built with create_graph, whose second backward multiplies it by 0 again. Under
    # vmap, is_grads_batched, it raises: _batched_vjp then takes one direction at a time.)
    if any(g is not None and bool(g.ne(0).any()) for g in grad_outputs):
        return None
    return tuple(None if g is None else torch.zeros_like(g) for g in grad_inputs)


def _graph(out: Tensor, inputs: tuple[Tensor, ...]) -> list:
    """The nodes of ``out``'s graph with a path to one of ``inputs`` (the evaluation's own
    operations; the inputs' nodes excluded). A tensor with a graph built before the
    evaluation (in the node's forward, held as an attribute) has no path to inputs made
    for it: its operations are the caller's, and are left alone."""
    ids = {id(t) for t in inputs}
    roots = {t.grad_fn for t in inputs if t.grad_fn is not None}
    reach: dict = {}
    stack = [(out.grad_fn, False)]
    while stack:  # (depth first, each node's verdict after its inputs')
        node, done = stack.pop()
        if node is None or (not done and node in reach):
            continue
        if node in roots or not node.next_functions:  # (an input's node, a leaf's AccumulateGrad)
            reach[node] = node in roots or id(getattr(node, "variable", None)) in ids
        elif done:
            reach[node] = any(reach.get(n, False) for n, _ in node.next_functions if n is not None)
        else:
            reach[node] = False  # (visited; its verdict when its inputs are in)
            stack.append((node, True))
            stack.extend((n, False) for n, _ in node.next_functions if n is not None and n not in reach)
    return [n for n, r in reach.items() if r and n not in roots and n.next_functions]


def strong_zero(out: Tensor | None, dead_rows: Tensor | None, inputs: tuple[Tensor, ...]) -> Tensor | None:
    """``out`` (B, ...), the operations of whose graph that feed only the rows ``dead_rows``
    (flat, ``(p,)`` bool: inactive in every element) now pass zeros back where all their
    incoming gradients are zero (module docstring).

    Which operations: a backward pass with create_graph and a constant incoming gradient, 1
    on the other rows and 0 on these, marks those whose incoming gradients are all zero and
    constant (no graph): a zero that a local derivative makes (``2 (y − y₀)`` at ``y = y₀``,
    whose second derivative is not 0) depends on ``y``, and is left alone. (A zero by value
    alone cut the objective's curvature where ``∇_y L = 0``.) Nothing is marked where that
    pass fails (an operation that cannot build a graph: the backward reports it later).
    ``inputs``: the tensors ``out`` was computed from; only the operations between them and
    ``out`` are marked (:func:`_graph`)."""
    if out is None or out.grad_fn is None or dead_rows is None or not bool(dead_rows.any()):
        return out
    inputs = tuple(t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad)
    nodes = _graph(out, inputs)
    dead = {}

    def record(node):
        def pre(grad_outputs):
            dead[node] = all(g is None or (not g.requires_grad and not bool(g.ne(0).any())) for g in grad_outputs)
        return pre
    handles = [node.register_prehook(record(node)) for node in nodes]
    live = (~dead_rows).to(out.dtype).reshape(out.shape[1:]).expand(out.shape)
    try:
        torch.autograd.grad(out, inputs, live, retain_graph=True, create_graph=True, allow_unused=True)
    except RuntimeError:
        dead.clear()
    finally:
        for h in handles:
            h.remove()
    for node, is_dead in dead.items():
        if is_dead:
            node.register_hook(_pass_zero)
    return out


@contextlib.contextmanager
def zero_passing(out: Tensor, inputs: tuple[Tensor, ...]) -> Iterator[None]:
    """Within: every operation between ``inputs`` and ``out`` (:func:`_graph`) passes zeros
    back where all its incoming gradients are zero, by value. For first-order passes only (a
    Jacobian's rows): there a zero incoming gradient is a constant, and the product is 0
    by linearity; with create_graph a zero may be a function of ``y`` (:func:`strong_zero`)."""
    nodes = _graph(out, tuple(t for t in inputs if t.requires_grad))
    handles = [node.register_hook(_pass_zero) for node in nodes]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def detached_outside(t: Tensor, keep: Tensor) -> Tensor:
    """``t`` (B, ...) with the elements outside ``keep`` (B,) detached."""
    return torch.where(keep.view((-1,) + (1,) * (t.dim() - 1)), t, t.detach())


def strong_zero_fn(fn: Callable[..., Tensor | None] | None,
                   groups: list[tuple[Tensor, Tensor]]) -> Callable[..., Tensor | None] | None:
    """``fn(*xs, y)`` evaluated once per group ``(elements (B,), dead_rows (p,))`` of the
    batch, the other elements' inputs detached, its graph passing zeros for the group's
    ``dead_rows`` (:func:`strong_zero`: rows inactive in each of its elements), the
    groups' rows put together. Called on another number of elements (the linear solvers'
    products of a few rows, which must reproduce the batch's to be used), ``fn`` itself."""
    if fn is None or not groups:
        return fn

    def isolated(*args):
        *xs, y = args
        if y.shape[0] != groups[0][0].shape[0]:
            return fn(*args)
        out = None
        for keep, dead in groups:
            inputs = (*(detached_outside(t, keep) if isinstance(t, torch.Tensor) else t for t in xs),
                      detached_outside(y, keep))
            part = fn(*inputs)
            if part is None or not isinstance(part, torch.Tensor):
                return part  # (the caller reports it)
            part = strong_zero(part, dead, inputs)
            out = part if out is None else torch.where(keep.view((-1,) + (1,) * (part.dim() - 1)), part, out)
        return out
    return isolated
