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

__all__ = ["graph_mark", "strong_zero", "strong_zero_fn", "zero_passing"]

Tensor = torch.Tensor


def _pass_zero(grad_inputs: tuple, grad_outputs: tuple) -> tuple | None:
    # (A host read, and Python control flow: a masked where would keep the NaN branch in a
    # graph built with create_graph, whose second backward multiplies it by 0 again. Under
    # vmap, is_grads_batched, it raises: _batched_vjp then takes one direction at a time.)
    if any(g is not None and bool(g.ne(0).any()) for g in grad_outputs):
        return None
    return tuple(None if g is None else torch.zeros_like(g) for g in grad_inputs)


def graph_mark() -> int:
    """A mark of autograd's node counter (this thread's): the nodes built after it have larger
    numbers. (The graph :func:`strong_zero` hooks stops at older ones: a tensor with a graph
    held by the node, built in its forward, is the caller's, not the evaluation's.)"""
    with torch.enable_grad():
        return torch.zeros((), requires_grad=True).mul(1).grad_fn._sequence_nr()


def _graph(out: Tensor, since: int) -> list:
    """The nodes of ``out``'s graph built after the mark ``since`` (:func:`graph_mark`),
    leaves' excluded."""
    nodes, seen, stack = [], set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if not node.next_functions or node._sequence_nr() < since:  # (a leaf's AccumulateGrad, the caller's)
            continue
        nodes.append(node)
        stack.extend(n for n, _ in node.next_functions)
    return nodes


def strong_zero(out: Tensor | None, dead_rows: Tensor | None, since: int, inputs: tuple[Tensor, ...]) -> Tensor | None:
    """``out`` (B, ...), the operations of whose graph that feed only the rows ``dead_rows``
    (flat, ``(p,)`` bool: inactive in every element) now pass zeros back where all their
    incoming gradients are zero (module docstring).

    Which operations: a backward pass with create_graph and a constant incoming gradient, 1
    on the other rows and 0 on these, marks those whose incoming gradients are all zero and
    constant (no graph): a zero that a local derivative makes (``2 (y − y₀)`` at ``y = y₀``,
    whose second derivative is not 0) depends on ``y``, and is left alone. (A zero by value
    alone cut the objective's curvature where ``∇_y L = 0``.) Nothing is marked where that
    pass fails (an operation that cannot build a graph: the backward reports it later). Only
    the nodes built after ``since`` (:func:`graph_mark`) are hooked; ``inputs``: the tensors
    ``out`` was computed from (the pass runs down to them)."""
    if out is None or out.grad_fn is None or dead_rows is None or not bool(dead_rows.any()):
        return out
    nodes = _graph(out, since)
    inputs = tuple(t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad)
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
def zero_passing(out: Tensor, since: int) -> Iterator[None]:
    """Within: every operation of ``out``'s graph built after ``since`` passes zeros back
    where all its incoming gradients are zero, by value. For first-order passes only (a
    Jacobian's rows): there a zero incoming gradient is a constant, and the product is 0
    by linearity; with create_graph a zero may be a function of ``y`` (:func:`strong_zero`)."""
    nodes = _graph(out, since)
    handles = [node.register_hook(_pass_zero) for node in nodes]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _cut(t: Tensor, keep: Tensor) -> Tensor:
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
            inputs = (*(_cut(t, keep) if isinstance(t, torch.Tensor) else t for t in xs), _cut(y, keep))
            since = graph_mark()
            part = fn(*inputs)
            if part is None or not isinstance(part, torch.Tensor):
                return part  # (the caller reports it)
            part = strong_zero(part, dead, since, inputs)
            out = part if out is None else torch.where(keep.view((-1,) + (1,) * (part.dim() - 1)), part, out)
        return out
    return isolated
