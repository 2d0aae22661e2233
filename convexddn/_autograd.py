"""Helpers for the library's ``torch.autograd.Function`` classes: cached signatures, the
guard that makes second derivatives of first-order-only nodes fail loudly, the test
for forward-mode tangents, and plain copies of inference tensors for saving."""
from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch.autograd import forward_ad

from .errors import DoubleBackwardError, ProblemError

try:  # torch's unwrapping of tensors left from a finished functorch transform
    from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead
except ImportError:  # pragma: no cover - an older torch: nothing to unwrap
    def _unwrap_dead(args):
        return args

__all__ = ["batched_values", "bind_fast", "without_autocast", "first_order", "first_order_jvp", "first_order_only",
           "functorch_transforms", "refuse_transforms", "refuse_vmap", "single_backward",
           "guard_gradients",
           "may_carry_tangents", "plain", "save_plain"]


def plain(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t``, or a plain copy of it where ``t`` is an inference tensor (made under
    ``torch.inference_mode()``, e.g. by a frozen feature extractor) used outside inference
    mode: autograd cannot save one for backward (torch's "Inference tensors cannot be
    saved for backward"), so a graph that needs it, for another argument that requires
    grad, must hold a copy. ``None`` passes through."""
    if t is None or not t.is_inference() or torch.is_inference_mode_enabled():
        return t
    return t.clone()


def save_plain(ctx, *tensors: torch.Tensor | None) -> None:
    """``ctx.save_for_backward(*tensors)``, inference tensors replaced by :func:`plain`
    copies where the call is recorded (some input needs grad): the copy is made only then."""
    # (not while torch.compile traces: dynamo cannot trace is_inference(), and a compiled
    # graph's tensors are its own)
    if any(ctx.needs_input_grad) and not torch.compiler.is_compiling():
        tensors = tuple(plain(t) for t in tensors)
    ctx.save_for_backward(*tensors)


def may_carry_tangents(*tensors) -> bool:
    """Whether forward-mode AD may be tracking these tensors: a dual level is open
    (``torch.autograd.forward_ad``) or one is wrapped by a ``torch.func`` transform.

    Nodes that skip their ``autograd.Function`` when nothing requires grad (a cheaper
    call) must not skip it then: forward mode would differentiate the solver itself
    (entmax's bisection on bit patterns gave NaN tangents, sparsemax's clamp ties wrong
    ones) instead of the Function's ``jvp``.
    """
    if torch.autograd.forward_ad._current_level >= 0:
        return True
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(isinstance(t, torch.Tensor) and wrapped(t) for t in tensors)


try:  # the torch.func transforms around a call (a torch without it: nothing to check)
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters as _functorch_stack
except ImportError:  # pragma: no cover
    _functorch_stack = None


def batched_by_autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether a cotangent or tangent arrives batched by autograd's own vmap
    (``torch.autograd.grad(..., is_grads_batched=True)``, ``jacobian(..., vectorize=True)``):
    inside a Function's backward or jvp that shows only in the dispatch keys (the
    torch.func stack is empty there), and any ``detach`` of it fails in torch."""
    for t in tensors:
        if isinstance(t, torch.Tensor):
            keys = str(torch._C._dispatch_keys(t))
            if any(k.strip() in ("Batched", "FuncTorchBatched") for k in keys[keys.find("(") + 1:-1].split(",")):
                return True
    return False


def refuse_batched(name: str, *cotangents: torch.Tensor | None, jacfwd: bool = False) -> None:
    """Raise a ProblemError where autograd batches the cotangents or tangents
    (``is_grads_batched=True``, ``torch.autograd.functional.jacobian(..., vectorize=True)``):
    the implicit derivatives check and solve on the host, which autograd's vmap refuses
    (it failed inside torch with "Batching rule not implemented"); also torch.func.jacrev's
    (``jacfwd``: the node supports torch.func.jacfwd, which the message then names)."""
    if torch.compiler.is_compiling():  # (a compiled backward: no transform to see, nothing dynamo can trace)
        return
    if any(batched_values(t) for t in cotangents):  # (torch.func.jacrev: a vmap over the vjp)
        raise ProblemError(
            f"{name} does not support torch.func.jacrev (a vmap over its vjp: batched cotangents): use "
            f"{'torch.func.jacfwd, ' if jacfwd else ''}torch.autograd.functional.jacobian without vectorize, "
            "or one cotangent at a time")
    if batched_by_autograd(*cotangents):
        raise ProblemError(
            f"{name} does not support batched cotangents or tangents (is_grads_batched=True, "
            "torch.autograd.functional.jacobian(..., vectorize=True)): pass one at a time "
            "(vectorize=False, the default), or stack the directions along the node's batch "
            "dimension")


def functorch_transforms() -> list[str]:
    """The torch.func transforms (``"Vmap"``, ``"Grad"``, ``"Jvp"``, ...) around this call."""
    return [] if _functorch_stack is None else [str(i.key()).rsplit(".", 1)[-1] for i in _functorch_stack()]


def refuse_transforms(name: str, why: str, use: str = "torch.autograd (backward(), torch.autograd.grad)",
                      allowed: tuple[str, ...] = ()) -> None:
    """Raise a ProblemError naming ``name`` where a torch.func transform other than
    ``allowed`` (keys of :func:`functorch_transforms`) is active: ``why`` says what of the
    call those transforms cannot run (host reads, numpy, torch.autograd inside), ``use``
    what to use instead (they failed deep inside with torch's own messages)."""
    transforms = functorch_transforms()
    if set(transforms) - set(allowed):
        other = f" other than {', '.join(a.lower() for a in allowed)}" if allowed else ""
        raise ProblemError(f"{name} does not run under torch.func transforms{other} (here: {transforms}): {why}. "
                           f"Use {use}")


def batched_values(t: Any) -> bool:
    """Whether a torch.func.vmap batches ``t``'s values: a BatchedTensor somewhere in its
    chain of functorch wrappers (torch.func.jacfwd batches only the tangents, which the
    chain does not hold)."""
    functorch = torch._C._functorch
    while isinstance(t, torch.Tensor):
        if functorch.is_batchedtensor(t):
            return True
        if not functorch.is_functorch_wrapped_tensor(t):
            return False
        t = functorch.get_unwrapped(t)
    return False


def refuse_vmap(name: str, *values: Any, tangents: bool = True, jacrev: bool = True,
                constants: bool = True) -> None:
    """Raise a ProblemError where torch.func.vmap batches a node's inputs (its solver
    decides on the host from their values: torch failed inside with "data-dependent
    control flow" or "Cannot access data pointer"), or, with ``tangents=False`` (a node
    whose Function has no vmap rule), under torch.func.jacfwd, which batches the tangents
    ("does not have vmap support"; a plain vmap over a call on constants works); with
    ``constants=False`` under any vmap (a Function that has no vmap rule even on
    constants). ``jacrev``: whether to point to torch.func.jacrev instead (the node's
    backward takes batched cotangents)."""
    # (Inside torch.compile there is no transform to see, and dynamo cannot trace the lookup.)
    if torch.compiler.is_compiling():
        return
    transforms = functorch_transforms()
    if "Vmap" not in transforms:
        return
    if any(batched_values(v) for v in values):
        raise ProblemError(
            f"{name} does not run under torch.func.vmap over its inputs (its solver decides on the host "
            "from their values): it takes any leading batch shape, so stack the inputs along a leading "
            "dimension and call it once")
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    forward_mode = "Jvp" in transforms or any(isinstance(v, torch.Tensor) and wrapped(v) for v in values)
    if not constants and not forward_mode:
        raise ProblemError(f"{name} does not run under torch.func.vmap (its solver has no batching rule): it takes "
                           "any leading batch shape, so stack the inputs along a leading dimension and call it once")
    if forward_mode and not (tangents and constants):
        raise ProblemError(
            f"{name} does not run under torch.func.jacfwd (a vmap over its forward mode): use "
            f"{'torch.func.jacrev, ' if jacrev else ''}torch.autograd.functional.jacobian without vectorize, "
            "or one direction at a time (torch.func.jvp, torch.autograd.forward_ad)")


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
                    f"{what} does not support differentiating its forward-mode tangent "
                    "(torch.func.grad, jvp or jacfwd over torch.func.jvp or jacfwd): the tangent "
                    "is the exact first-order Jacobian product, computed without a graph")
            return guarded(ctx, *tangents)
        return wrapper
    return decorate


def bind_fast(cls: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """Class decorator: skip ``Function.apply``'s argument binding where there is nothing
    to bind.

    With ``setup_context``, ``apply`` binds its arguments through ``inspect.signature``
    on every call, to fill in defaults: ~20 µs (a quarter of a (64, 40, 12) least-squares
    forward), pure overhead when every argument is given positionally, as the library's
    own calls do. Those go straight to the C++ ``apply`` (outside functorch transforms,
    after the dead-wrapper unwrapping torch does there); any other call takes torch's
    path, with ``forward``'s signature precomputed.
    """
    signature = inspect.signature(cls.forward)
    cls.forward.__signature__ = signature  # type: ignore[attr-defined]
    count = len(signature.parameters)
    torch_apply = cls.__dict__.get("apply", torch.autograd.Function.__dict__["apply"]).__func__
    base_apply = torch._C._FunctionBase.__dict__["apply"]

    def apply(klass, *args, **kwargs):
        if (klass is not cls or kwargs or len(args) != count
                or torch._C._are_functorch_transforms_active()):
            return torch_apply(klass, *args, **kwargs)
        return base_apply.__get__(klass, klass)(*_unwrap_dead(args))

    cls.apply = classmethod(apply)  # type: ignore[method-assign]
    return cls


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


class _SecondOrderUnsupported(torch.autograd.Function):
    """Passes first-order gradients through; differentiating them raises a clear error.

    (Forward and ``setup_context`` apart, as torch.func needs: its ``grad`` runs a
    node's backward with grad mode on, which reaches this Function; the combined form
    raised torch's "must override the setup_context staticmethod" there.)"""

    generate_vmap_rule = True

    @staticmethod
    def forward(what: str, n_anchor: int, *tensors: torch.Tensor):  # type: ignore[override]
        return tuple(t.clone() for t in tensors[n_anchor:])

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        ctx.what = inputs[0]

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
            "first-order derivative only"
        )


def guard_gradients(what: str, grads: Sequence[torch.Tensor | None],
                    anchors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """In a backward run with ``create_graph=True``: ``grads`` tied to the ``anchors``
    that require grad, so that differentiating them raises
    :class:`~convexddn.errors.DoubleBackwardError` instead of giving zeros (a gradient
    computed without a graph) or torch's generic error. Otherwise ``grads`` unchanged."""
    if not torch.is_grad_enabled():
        return list(grads)
    tied = [t for t in anchors if isinstance(t, torch.Tensor) and t.requires_grad]
    present = [g for g in grads if g is not None]
    if not tied or not present:
        return list(grads)
    wrapped = iter(_SecondOrderUnsupported.apply(what, len(tied), *tied, *present))
    return [None if g is None else next(wrapped) for g in grads]


class _FirstOrderInput(torch.autograd.Function):
    """Identity on its inputs; their gradients come back through :func:`guard_gradients`."""

    @staticmethod
    def forward(what: str, *tensors: torch.Tensor):  # type: ignore[override]
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        # Kept as attributes, not saved tensors: they only anchor the error's graph, so
        # changing them in place after the forward must not fail the backward.
        ctx.what, ctx.anchors = inputs[0], inputs[1:]

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        return (None, *guard_gradients(ctx.what, grads, ctx.anchors))

    @staticmethod
    def jvp(ctx, _what, *tangents):  # type: ignore[override]
        # (The identity: the solver's own Function decides whether it has a forward mode.)
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

def first_order_only(what: str, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The inputs of a solver whose backward is first-order only (it may run outside
    autograd, e.g. on the CPU in numpy, or without a graph): passed through unchanged,
    but a second differentiation of their gradients raises
    :class:`~convexddn.errors.DoubleBackwardError` (without this guard it silently gave
    zeros, or None). No-op where nothing requires grad."""
    tensors = tuple(tensors)
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
        return tensors
    return _FirstOrderInput.apply(what, *tensors)


def first_order(what: str, reverse: bool = True) -> Callable[[Callable], Callable]:
    """``torch.autograd.function.once_differentiable`` with the library's error, for the
    backward of the node ``what`` (its public name, for the message): the backward runs
    without a graph, and with ``create_graph=True`` its gradients are tied
    (:func:`guard_gradients`) to the incoming gradients, the saved tensors and
    ``ctx.anchors`` (inputs kept for this) that require grad, so that a second
    differentiation raises :class:`~convexddn.errors.DoubleBackwardError` (torch's
    decorator raised a generic RuntimeError, and nothing at all where the incoming
    gradient was a constant)."""
    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            dual = False
            if reverse and not torch.compiler.is_compiling():  # (dynamo traces neither test)
                if "Jvp" in functorch_transforms():
                    # Forward over reverse (torch.func.jvp or jacfwd over grad, vjp or
                    # jacrev: hessian): the tangent of this gradient, a second derivative.
                    # (Refused here, before the backward's kernels, whose out= ops forward
                    # mode rejects with torch's NotImplementedError.)
                    _SecondOrderUnsupported.backward(SimpleNamespace(what=what))
                dual = forward_ad._current_level >= 0
            # Forward-mode tangents of the saved tensors (a torch.autograd.forward_ad dual
            # level around the forward) are not followed: the gradient is first order, its
            # value the primal one (robust_pool's out= kernels refused dual inputs).
            with torch.no_grad(), (forward_ad._set_fwd_grad_enabled(False) if dual else contextlib.nullcontext()):
                out = backward(ctx, *grads)
            if not torch.is_grad_enabled():
                return out
            single = not isinstance(out, tuple)
            outs = (out,) if single else out
            guarded = guard_gradients(what, [o if isinstance(o, torch.Tensor) else None for o in outs],
                                      (*grads, *ctx.saved_tensors, *getattr(ctx, "anchors", ())))
            merged = tuple(g if isinstance(o, torch.Tensor) else o for g, o in zip(guarded, outs))
            return merged[0] if single else merged
        return wrapper
    return decorate


def without_autocast(fn: Callable) -> Callable:
    """Run ``fn`` (a Function's forward or backward) with autocast off for the device of its
    first tensor argument, where autocast is on: a solver's matmuls and factorisations keep
    its working dtype (under ``torch.autocast`` with bfloat16 they were lowered to it: the
    vector pool's LU raised NotImplementedError, its truncated quadratic and the eigen
    backward's products erred by ~1e-3)."""
    @functools.wraps(fn)
    def wrapper(*args):
        first = next((t for t in args if isinstance(t, torch.Tensor)), None)
        kind = None if first is None else first.device.type
        try:
            on = kind is not None and torch.is_autocast_enabled(kind)
        except RuntimeError:  # a device type autocast does not know (meta): never on
            on = False
        with torch.autocast(kind, enabled=False) if on else contextlib.nullcontext():
            return fn(*args)
    return wrapper
