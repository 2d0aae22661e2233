"""First-order-only derivatives: the guard that makes second derivatives of the
library's nodes fail loudly (:class:`~convexddn.errors.DoubleBackwardError`) instead of
giving zeros or torch's generic errors, the decorators for a Function's ``backward`` and
``jvp`` that apply it, and the identities that guard a solver's inputs and outputs."""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any
from types import SimpleNamespace

import torch
from torch.autograd import forward_ad

from ._anchor import empty_of, graph_anchor
from ._autograd import bind_fast, called_as, functorch_transforms, plain, public_name
from .errors import DoubleBackwardError

__all__ = ["FORWARD_AD_ONLY", "FORWARD_MODE", "first_order", "first_order_jvp", "first_order_region", "graph_anchor",
           "guard_gradients", "outside_inference_mode", "refuse_forward_over_reverse", "single_backward",
           "with_forward_mode"]


def outside_inference_mode(fn: Callable) -> Callable:
    """Run ``fn`` (a Function's ``backward`` or ``jvp``, ``fn(ctx, *directions)``) with
    inference mode off where it is on, grad mode as it was (off there), and its incoming
    inference tensors replaced by :func:`~convexddn._autograd.plain` copies.

    ``loss.backward()`` called inside ``torch.inference_mode()`` (an evaluation wrapper
    around the step) on a graph built outside it runs each backward in inference mode,
    where torch's own ops still give their gradients; the library's backwards re-evaluate
    the problem with autograd (the Lagrangian's derivatives, pnp's objective), which
    inference mode forbids: DeclarativeNode blamed a correct constraint ("does not depend
    on y through autograd"), pnp failed with torch's raw "element 0 of tensors does not
    require grad". The incoming gradients the engine made there are inference tensors,
    which autograd cannot save (they multiply the re-evaluated graph), hence the copies.
    """
    @functools.wraps(fn)
    def wrapper(ctx, *directions):
        # (dynamo traces neither test, and a compiled graph's tensors are its own)
        if torch.compiler.is_compiling() or not torch.is_inference_mode_enabled():
            return fn(ctx, *directions)
        with torch.inference_mode(False), torch.set_grad_enabled(False):
            return fn(ctx, *(plain(t) if isinstance(t, torch.Tensor) else t for t in directions))
    return wrapper


def first_order_jvp(what: str) -> Callable[[Callable], Callable]:
    """:func:`first_order` for a Function's ``jvp``: its tangent is computed without a
    graph, so differentiating it again must raise. Through ``torch.autograd`` the guard
    does it; under torch.func (whose tensors do not show ``requires_grad``) a Grad level
    or a second Jvp level around the jvp is refused here (both gave wrong second
    derivatives silently: zeros, or entmax's 6 % off)."""
    def decorate(jvp: Callable) -> Callable:
        guarded = first_order(what, reverse=False)(jvp)

        @functools.wraps(jvp)
        def wrapper(ctx, *tangents):
            levels = functorch_transforms()
            if "Grad" in levels or levels.count("Jvp") > 1:
                raise DoubleBackwardError(
                    f"{public_name(what)} does not support differentiating its forward-mode tangent "
                    "(torch.func.grad, jvp or jacfwd over torch.func.jvp or jacfwd): the tangent "
                    "is the exact first-order Jacobian product, computed without a graph")
            return guarded(ctx, *tangents)
        return wrapper
    return decorate


class _SecondOrderUnsupported(torch.autograd.Function):
    """Passes first-order gradients through; differentiating them raises a clear error.

    (Forward and ``setup_context`` apart, as torch.func needs: its ``grad`` runs a
    node's backward with grad mode on, which reaches this Function; the combined form
    raised torch's "must override the setup_context staticmethod" there.)"""

    generate_vmap_rule = True

    @staticmethod
    def forward(what: str, forward_mode: str, n_anchor: int, *tensors: torch.Tensor):  # type: ignore[override]
        return tuple(t.clone() for t in tensors[n_anchor:])

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        ctx.what, ctx.forward_mode = inputs[0], inputs[1]

    @staticmethod
    def jvp(ctx, *tangents):  # type: ignore[override]
        # Forward over reverse (torch.func.hessian, jvp(grad(f))) differentiates the
        # gradient too: the same refusal, not torch's "must implement the jvp function".
        _SecondOrderUnsupported.backward(ctx)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        raise DoubleBackwardError(
            f"{ctx.what} does not support double backward (second derivatives of the "
            "solution, e.g. create_graph=True then a second backward, gradgradcheck or "
            "Hessian-vector products through it): its backward is the implicit "
            "first-order derivative only. (torch.autograd.functional.jvp differentiates the backward too, "
            "even for a first-order Jacobian-vector product: use "
            f"{getattr(ctx, 'forward_mode', FORWARD_MODE)} for that product)"  # (torch.func's ctx lacks it)
        )


# torch.autograd.functional.jvp differentiates the backward with respect to its incoming
# gradient (the double-vjp trick): a first-order product asked the second-order way, refused
# with the rest (the guard's backward cannot tell which of its inputs the caller wants, nor
# run the node's jvp); the messages say what gives that product, which depends on the node:
# these two for those that run under torch.func, the second alone for those that refuse its
# transforms (DeclarativeNode: the advice was torch.func.jvp, which then raised).
FORWARD_MODE = "torch.func.jvp or torch.autograd.forward_ad"
FORWARD_AD_ONLY = "torch.autograd.forward_ad (not torch.func.jvp: this node does not run under torch.func transforms)"


def refuse_forward_over_reverse(what: str, tensors: Sequence[Any], forward_mode: str = FORWARD_MODE) -> None:
    """Raise :class:`~convexddn.errors.DoubleBackwardError` where a backward runs inside
    a ``torch.autograd.forward_ad`` dual level and one of ``tensors`` (its incoming
    gradients and anchors: :func:`~convexddn._anchor.graph_anchor` of its inputs) carries a
    tangent there: the gradient itself is
    then differentiated in forward mode (forward over reverse: a Hessian-vector product
    where the input carries the tangent, a mixed second derivative where a parameter
    does, J(x)ᵀ dv where the incoming gradient does). The backward is first order,
    computed without tangents: the gradient's tangent came back None, zeros (ConvexLayer)
    or, where plain ops around a node carry part of it, wrong (sinkhorn, 87 % off), with no
    warning. A backward in a level whose tensors carry no tangent on this node's path is
    the plain one. ``forward_mode``: what the message recommends for first-order products
    (:data:`FORWARD_MODE`, or :data:`FORWARD_AD_ONLY` for a node refusing torch.func)."""
    if forward_ad._current_level < 0:
        return
    unpack = forward_ad.unpack_dual
    if any(isinstance(t, torch.Tensor) and unpack(t).tangent is not None for t in tensors):
        raise DoubleBackwardError(
            f"{public_name(what)} does not support double backward in forward mode: a backward inside a "
            "torch.autograd.forward_ad dual level where its input, solution or incoming gradient carries a "
            "tangent differentiates the gradient (a Hessian-vector product, or a mixed second derivative "
            "where a parameter carries it), and its backward is the implicit first-order derivative only, "
            "computed without tangents (they would be dropped). Take the gradient outside the dual level, "
            f"or forward mode alone ({forward_mode}) for first-order products")


def guard_gradients(what: str, grads: Sequence[torch.Tensor | None], anchors: Sequence[torch.Tensor | None],
                    check_tangents: bool = True, forward_mode: str = FORWARD_MODE) -> list[torch.Tensor | None]:
    """In a backward run with ``create_graph=True``: ``grads`` tied to the ``anchors``
    that require grad, so that differentiating them raises
    :class:`~convexddn.errors.DoubleBackwardError` instead of giving zeros (a gradient
    computed without a graph) or torch's generic error. Otherwise ``grads`` unchanged.
    Inside a forward-AD dual level where ``anchors`` carry tangents, the same error
    (:func:`refuse_forward_over_reverse`; ``check_tangents=False``: checked already, or
    the caller is a jvp, whose inputs carry them): the gradient's tangent, a second
    derivative, would be dropped. ``forward_mode``: the errors' advice for first-order
    products (:func:`refuse_forward_over_reverse`)."""
    if check_tangents:
        refuse_forward_over_reverse(what, anchors, forward_mode)
    if not torch.is_grad_enabled():
        return list(grads)
    tied = [t for t in anchors if isinstance(t, torch.Tensor) and t.requires_grad]
    present = [g for g in grads if g is not None]
    if not tied or not present:
        return list(grads)
    wrapped = iter(_SecondOrderUnsupported.apply(public_name(what), forward_mode, len(tied), *tied, *present))
    return [None if g is None else next(wrapped) for g in grads]


class _FirstOrderInput(torch.autograd.Function):
    """Identity on its inputs, plus an empty token (the last output) that a
    :class:`_FirstOrderOutput` at the region's end feeds back; the inputs' gradients come
    back through :func:`guard_gradients`, tied to the token (whose graph reaches the
    inputs) and to the token's gradient (whose graph reaches the region's incoming
    gradients)."""

    @staticmethod
    def forward(what: str, *tensors: torch.Tensor):  # type: ignore[override]
        # Copies, not views: views returned by a Function of several outputs cannot be
        # rebuilt once their base changes, and torch asks for a saved tensor's grad_fn
        # before it compares versions. An input changed in place between the forward and
        # the backward, saved as a view downstream (log of a DGP parameter, gp=True),
        # raised "Output 0 of View ... returns multiple views" in place of the version error;
        # a copy is what the solver reads, so the backward is that of the forward's point.
        return (*(t.clone() for t in tensors), tensors[0].new_zeros(0))

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        # The token, an output, is the anchor, not the inputs: its grad_fn is this node, so a
        # second differentiation reaches the inputs through it, and it is a saved tensor
        # (empty): checkpoint and saved_tensors_hooks free or move what they should (the
        # inputs kept as ctx attributes outlived a checkpointed forward), and an input
        # changed in place after the forward does not fail the backward (no version check).
        ctx.what = inputs[0]
        ctx.save_for_backward(output[-1])

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        *grads, g_token = grads
        if not torch.is_grad_enabled() and forward_ad._current_level < 0:
            return (None, *grads)  # (nothing to tie: the saved token is not unpacked)
        return (None, *guard_gradients(ctx.what, grads, (*ctx.saved_tensors, g_token)))

    @staticmethod
    def jvp(ctx, _what, *tangents):  # type: ignore[override]
        # (The identity: the solver's own Function decides whether it has a forward mode.) The
        # token carries a (zero) tangent where an input does: a backward in that dual level
        # then differentiates the gradient, refused by refuse_forward_over_reverse.
        token = None
        if any(t is not None for t in tangents):
            token = next(t for t in tangents if t is not None).new_zeros(0)
        return (*(None if t is None else t.view_as(t) for t in tangents), token)


class _FirstOrderOutput(torch.autograd.Function):
    """Identity on the outputs of a first-order region (after the token of its
    :class:`_FirstOrderInput`); its backward passes their gradients on unchanged and
    gives the token a gradient that is an empty slice of those requiring grad (or
    carrying a tangent): the edge from the incoming gradients to the guard, which the
    region's own backward (numpy, ``once_differentiable``) cuts."""

    @staticmethod
    def forward(token: torch.Tensor, *tensors: torch.Tensor):  # type: ignore[override]
        return tuple(t.clone() for t in tensors)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        ctx.token = (inputs[0].dtype, inputs[0].device)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        live = [g for g in grads if g is not None and (g.requires_grad or (
            forward_ad._current_level >= 0 and forward_ad.unpack_dual(g).tangent is not None))]
        if not live or not (torch.is_grad_enabled() or forward_ad._current_level >= 0):
            return (None, *grads)
        dtype, device = ctx.token
        return (torch.cat([empty_of(g).to(dtype=dtype, device=device) for g in live]), *grads)

    @staticmethod
    def jvp(ctx, _token, *tangents):  # type: ignore[override]
        return tuple(None if t is None else t.view_as(t) for t in tangents)


class _SingleBackward(torch.autograd.Function):
    """Identity whose backward reads a saved tensor (an extra, empty output), so that a
    second backward through it without ``retain_graph`` raises torch's own error."""

    @staticmethod
    def forward(*tensors: torch.Tensor):  # type: ignore[override]
        # Copies, not views: a view made in a custom Function cannot be changed in place
        # (y /= 2 after the layer raised), which plain outputs allow.
        return (*(t.clone() for t in tensors), tensors[0].new_empty(0))

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        ctx.mark_non_differentiable(output[-1])
        ctx.save_for_backward(output[-1])

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        ctx.saved_tensors  # (freed by a backward without retain_graph: torch raises here)
        return grads[:-1]


def single_backward(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Outputs of a solver whose own backward saves no tensor (the per-element path's, in
    numpy): a second backward without ``retain_graph`` ran it again and doubled the
    gradient silently; through this it raises torch's "backward through the graph a
    second time", as every other op. No-op where none requires grad."""
    tensors = list(tensors)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return tensors
    return list(_SingleBackward.apply(*tensors)[:-1])

def first_order_region(what: str, tensors: Sequence[torch.Tensor]
                       ) -> tuple[tuple[torch.Tensor, ...], Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]]:
    """The inputs of a region whose backward is first-order only (it may run outside
    autograd, e.g. on the CPU in numpy, or without a graph): returns the guarded
    ``tensors`` and ``close``, to be called on the region's outputs (it returns them, to
    be used in their place). The tensors pass through unchanged, but a second
    differentiation of their gradients with respect to the inputs raises
    :class:`~convexddn.errors.DoubleBackwardError` (without this guard it silently gave
    zeros, or None); only those that require grad pass through the guard, the others stay
    as they are (a solver reads which do: the convex path's backward checks what the
    parameters requiring grad move). So does one taken with respect to the outputs'
    incoming gradients (``create_graph=True`` with grad_outputs
    requiring grad: the double-vjp trick of ``torch.autograd.functional.jvp``), as
    :func:`first_order` does for one Function: a region whose backward cuts the graph
    (numpy, ``once_differentiable``) gave None there, and torch.autograd.functional.jvp
    zeros. ``close`` is a no-op where nothing was guarded."""
    tensors = tuple(tensors)
    idx = [i for i, t in enumerate(tensors) if t.requires_grad]
    if not torch.is_grad_enabled() or not idx:
        return tensors, list
    out = list(tensors)
    *guarded, token = _FirstOrderInput.apply(what, *(tensors[i] for i in idx))
    for i, t in zip(idx, guarded):
        out[i] = t

    def close(outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        outputs = list(outputs)
        live = [i for i, t in enumerate(outputs) if t.requires_grad]  # (the others stay constants)
        if live:
            for i, t in zip(live, _FirstOrderOutput.apply(token, *(outputs[i] for i in live))):
                outputs[i] = t
        return outputs
    return tuple(out), close


def first_order(what: str, reverse: bool = True) -> Callable[[Callable], Callable]:
    """``torch.autograd.function.once_differentiable`` with the library's error, for the
    backward of the node ``what`` (its public name, for the message): the backward runs
    without a graph, and with ``create_graph=True`` its gradients are tied
    (:func:`guard_gradients`) to the incoming gradients and ``ctx.anchors`` that require
    grad, so that a second differentiation raises
    :class:`~convexddn.errors.DoubleBackwardError` (torch's decorator raised a generic
    RuntimeError, and nothing at all where the incoming gradient was a constant). The
    node's ``setup_context`` sets ``ctx.anchors = graph_anchor(<its tensor inputs>)``
    (:func:`~convexddn._anchor.graph_anchor`: the inputs' graph without their storage);
    a node without it gets no error for a second differentiation with respect to its
    inputs. The saved tensors are not read for this: the backward unpacks them once, as
    ``torch.utils.checkpoint`` requires (a second unpack raised its CheckpointError at
    the first ``create_graph=True`` gradient). Inside a ``torch.autograd.forward_ad``
    dual level where those carry tangents the same error, before the backward runs
    (:func:`refuse_forward_over_reverse`). Its refusals name the public function that
    ran the node (``ctx.caller``, kept by :func:`~convexddn._autograd.bind_fast`)."""
    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        @outside_inference_mode  # (its kernels may differentiate with autograd: pnp's objective)
        def wrapper(ctx, *grads):
            caller = getattr(ctx, "caller", None)
            if caller is None:
                return run(ctx, grads)
            with called_as(caller):
                return run(ctx, grads)

        def run(ctx, grads):
            # A backward's anchors: the incoming gradients and ctx.anchors, never ctx.saved_tensors:
            # the backward unpacks those itself, and a second unpack in one backward raised torch's
            # CheckpointError under a non-reentrant checkpoint (at the first create_graph=True
            # gradient), whose recomputed saved tensors are detached besides (no graph left to
            # the inputs: the second differentiation would not reach this guard). A jvp's saved
            # tensors are save_for_forward's, the forward's own tensors read without hooks.
            def anchors():  # (read only where needed: unpacking a jvp's saved tensors costs)
                return (*grads, *(() if reverse else ctx.saved_tensors), *getattr(ctx, "anchors", ()))

            dual = False
            if reverse and not torch.compiler.is_compiling():  # (dynamo traces neither test)
                if "Jvp" in functorch_transforms():
                    # Forward over reverse (torch.func.jvp or jacfwd over grad, vjp or
                    # jacrev: hessian): the tangent of this gradient, a second derivative.
                    # (Refused here, before the backward's kernels, whose out= ops forward
                    # mode rejects with torch's NotImplementedError.)
                    _SecondOrderUnsupported.backward(SimpleNamespace(what=public_name(what)))
                dual = forward_ad._current_level >= 0
                if dual:  # (the same, by torch.autograd.forward_ad)
                    refuse_forward_over_reverse(what, anchors())
            # A dual level open, no tangent on this node's path (checked above): its kernels
            # run with forward AD off all the same (out= ops refuse dual tensors outright).
            with torch.no_grad(), (forward_ad._set_fwd_grad_enabled(False) if dual else contextlib.nullcontext()):
                out = backward(ctx, *grads)
            if not torch.is_grad_enabled():
                return out
            single = not isinstance(out, tuple)
            outs = (out,) if single else out
            guarded = guard_gradients(what, [o if isinstance(o, torch.Tensor) else None for o in outs], anchors(),
                                      check_tangents=False)  # (checked above)
            merged = tuple(g if isinstance(o, torch.Tensor) else o for g, o in zip(guarded, outs))
            return merged[0] if single else merged
        return wrapper
    return decorate


def with_forward_mode(base: type, what: str, saved: Callable[[tuple, Any], tuple], jvp: Callable) -> type:
    """``base``, a reverse-only Function, with forward mode
    (torch.autograd.forward_ad, torch.func.jvp): ``jvp(ctx, x_t, r_t, d_t, sphere_t)``
    reads ``ctx.saved_tensors = saved(inputs, output)``. A subclass, not ``base`` itself:
    torch.compile refuses a Function with a jvp, and the reverse-only one compiles whole.
    Inputs without a tangent reach the jvp as None, not zeros (nothing is computed, or
    warned, for them); torch.func.jacfwd vmaps the jvp by the rule torch generates (plain
    torch ops)."""
    def setup_context(ctx, inputs, output):
        base.setup_context(ctx, inputs, output)
        ctx.save_for_forward(*saved(inputs, output))
        ctx.set_materialize_grads(False)

    name = base.__name__.replace("Reverse", "Projection")
    return bind_fast(type(name, (base,), {
        "__doc__": f":class:`{base.__name__}` with forward mode (torch.autograd.forward_ad, torch.func.jvp).",
        "__module__": base.__module__, "generate_vmap_rule": True,
        "setup_context": staticmethod(setup_context),
        # its tangent differentiated again: DoubleBackwardError
        "jvp": staticmethod(first_order_jvp(what)(jvp))}))
