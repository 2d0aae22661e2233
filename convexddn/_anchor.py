r"""Graph anchors: zero-element tensors that carry the autograd graph of a node's inputs, not their data.

A backward that is first order only (:func:`convexddn._first_order.first_order`) ties the
gradients it returns under ``create_graph=True`` to tensors leading to the node's inputs, so
that differentiating them again reaches a node raising
:class:`~convexddn.errors.DoubleBackwardError` (without a path to the input, torch gives
None, zeros or its generic error). Inputs that the backward does not read were kept for this
as plain ``ctx`` attributes: that kept them alive past the forward under
``torch.utils.checkpoint`` (which frees what goes through the saved-tensor hooks) and on the
device under hooks that offload or copy (``torch.autograd.graph.save_on_cpu``), so checkpointing
saved nothing for them. :func:`graph_anchor` gives one tensor of zero elements whose grad_fn
has an edge to each input instead: the graph to the inputs without their storage, and no
version counter of theirs (an input changed in place after the forward still does not fail
the backward, as before). Every node whose backward is decorated by ``first_order`` sets
``ctx.anchors = graph_anchor(<its tensor inputs>)``: the guard does not read the saved tensors
for this (the backward has unpacked them, and a second unpack in one backward raises torch's
CheckpointError under a non-reentrant checkpoint, whose recomputed saved tensors carry no graph).
"""
from __future__ import annotations

import torch
from torch.autograd import forward_ad

from ._autograd import bind_fast, may_carry_tangents

__all__ = ["empty_of", "graph_anchor"]


def empty_of(t: torch.Tensor) -> torch.Tensor:
    """``(0,)``: a zero-element view of ``t``, differentiable and carrying ``t``'s graph or
    tangent, never a copy (``t.reshape(-1)[:0]`` copied a strided or expanded ``t`` first)."""
    return t.unsqueeze(0).narrow(0, 0, 0).reshape(0)


@bind_fast
class _Anchor(torch.autograd.Function):
    """``(0,)`` empty tensor depending on every input; its derivatives are zero (never
    formed: the guard's node before it raises on the way back)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*tensors: torch.Tensor):  # type: ignore[override]
        return tensors[0].new_empty(0)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        ctx.count = len(inputs)

    @staticmethod
    def backward(ctx, _grad):  # type: ignore[override]
        return (None,) * ctx.count

    @staticmethod
    def jvp(ctx, *tangents):  # type: ignore[override]
        # A tangent (of zero elements) where an input has one: the guard reads a tangent on an
        # anchor as forward over reverse (convexddn._first_order.refuse_forward_over_reverse).
        for t in tangents:
            if t is not None:
                return empty_of(t)
        return None


def graph_anchor(*tensors: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """For ``ctx.anchors`` (in a Function's ``setup_context``): ``()`` where none of ``tensors``
    requires grad or may carry a tangent, else one zero-element tensor whose graph leads to each
    of them (and that carries a tangent where one of them does, in a forward-AD dual level or
    under ``torch.func.jvp``: an input with a tangent but no grad makes a gradient of another one
    a mixed second derivative, which the guard refuses). Holds none of their storage: under
    checkpointing or offloading hooks the inputs are freed or moved as torch's own ops' are.
    ~10-25 µs for any number of inputs (CPU, measured on the shared 2-core machine)."""
    # (Nothing under torch.compile: dynamo refuses a Function with a jvp, which would break the
    # fullgraph of the reverse-only nodes, and AOTAutograd's backward refuses a second one itself.)
    if torch.compiler.is_compiling():
        return ()
    tied = [t for t in tensors if isinstance(t, torch.Tensor)]
    if not any(t.requires_grad for t in tied) and not may_carry_tangents(*tied):
        return ()
    # (setup_context runs with grad and forward grad off: on, or the anchor has no graph)
    with torch.enable_grad(), forward_ad._set_fwd_grad_enabled(True):
        return (_Anchor.apply(*tied),)
