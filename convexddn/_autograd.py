"""Helpers for the library's ``torch.autograd.Function`` classes: cached signatures, the
tests for forward-mode tangents and torch.func transforms (and the refusals built on
them, naming the public function the user called: :func:`called_as`), autocast off, and
plain copies of inference tensors for saving; the refusals of tracing and ``torch.export``.
The first-order guard is :mod:`convexddn._first_order`; what runs eagerly under
torch.compile, :mod:`convexddn._compile`."""
from __future__ import annotations

import contextlib
import contextvars
from contextlib import AbstractContextManager
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ProblemError
from ._compile import constant_result, eager_with_tangents, outside_compile
from ._context import bound

try:  # torch's unwrapping of tensors left from a finished functorch transform
    from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead
except ImportError:  # pragma: no cover - an older torch: nothing to unwrap
    def _unwrap_dead(args):
        return args

__all__ = ["BatchShape", "any_batched", "batched_directions", "batched_refusal", "batched_values", "bind_fast",
           "called_as", "eager_with_tangents", "without_autocast", "functorch_transforms", "public_name",
           "refuse_export", "refuse_transforms", "refuse_trace", "refuse_vmap", "refusing_export", "wrapper_forward",
           "may_carry_tangents", "outside_compile", "plain", "save_plain"]

# The public function the user called, where it runs another node inside (linear_fit runs
# least_squares): see called_as.
_CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("convexddn_caller", default=None)


@dataclass(frozen=True)
class BatchShape:
    """A caller's batch shape ``dims``, handed to an autograd Function as one opaque
    constant (for the warnings that name batch elements): a plain tuple is a pytree node,
    and the vmap rule torch.func generates cannot flatten an empty one
    (``jacfwd(jacfwd(f))`` of an unbatched signal failed with "flat_bdims must not be None")."""

    dims: tuple[int, ...]


def called_as(name: str | None) -> AbstractContextManager[None]:
    """Inside: the refusals and errors of the nodes called (now, and in the backward of
    what they record: :func:`bind_fast` keeps the name on the Function's ``ctx``) name
    ``name``, the public function the user called, not the node it runs inside
    (linear_fit's refusals under jacfwd, vmap and double backward named least_squares,
    which the user never called). The outermost name wins; ``None``: no change."""
    return bound(_CALLER, _CALLER.get() or name)


def public_name(name: str) -> str:
    """``name``, or the public function that called it (:func:`called_as`)."""
    return _CALLER.get() or name


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


def any_batched(*tensors: torch.Tensor | None) -> bool:
    """Whether a vmap batches any of these cotangents or tangents, torch.func's
    (:func:`batched_values`) or autograd's own (:func:`batched_by_autograd`): no host
    read can be made per direction then."""
    return any(batched_values(t) or batched_by_autograd(t) for t in tensors if t is not None)


def batched_directions(*tensors: torch.Tensor | None) -> bool:
    """:func:`any_batched`, for a Function's backward or jvp: whether its cotangents or
    tangents arrive batched by a vmap (``torch.func.jacrev``, ``jacfwd``;
    ``is_grads_batched=True``, ``jacobian(..., vectorize=True)``), so that it takes them
    without host reads; False while torch.compile traces (nothing dynamo can trace)."""
    return not torch.compiler.is_compiling() and any_batched(*tensors)


# How the directions came batched, by (forward-mode tangents?, by torch.func?): the
# transforms of torch.func, or autograd's own vmap (torch._vmap_internals).
_BATCHED_BY = {
    (True, True): "torch.func.jacfwd",
    (True, False): "torch.autograd.functional.jacobian(..., vectorize=True, strategy='forward-mode'), "
                   "gradcheck(..., check_batched_forward_grad=True)",
    (False, True): "torch.func.jacrev",
    (False, False): "is_grads_batched=True, torch.autograd.functional.jacobian(..., vectorize=True), "
                    "gradcheck(..., check_batched_grad=True)",
}


def batched_refusal(name: str, tangents: bool, functorch: bool, works: str = "") -> ProblemError:
    """The one error of a node that cannot take batched directions: it names the node
    (:func:`public_name` of ``name``), what it refuses (batched forward-mode tangents,
    ``tangents``, or batched cotangents), the calls that batch them (torch.func's,
    ``functorch``, or autograd's own vmap) and what works instead: ``works`` (the node's
    transforms that do, e.g. ``"torch.func.jacrev"``), the unvectorized jacobian, one
    direction at a time. (Each node had its own wording: eigen_decomposition and
    least_squares refused the forward-mode vectorized jacobian as "batched cotangents or
    tangents (is_grads_batched=True, ...)", which named the reverse mode they support.)"""
    what = "batched forward-mode tangents" if tangents else "batched cotangents"
    # (torch.autograd's, which every node takes one at a time: DeclarativeNode refuses torch.func)
    one = ("one tangent at a time (torch.autograd.forward_ad)" if tangents
           else "one cotangent at a time (backward(), torch.autograd.grad)")
    return ProblemError(f"{public_name(name)} does not support {what} ({_BATCHED_BY[tangents, functorch]}): use "
                        f"{works + ', ' if works else ''}torch.autograd.functional.jacobian without vectorize, "
                        f"or {one}")


def refuse_batched(name: str, *directions: torch.Tensor | None, tangents: bool = False,
                   functorch: bool = True) -> None:
    """Raise :func:`batched_refusal` where a vmap batches ``directions``, the cotangents
    of a Function's backward or, with ``tangents=True``, the tangents of its jvp (or the
    tangents of dual inputs): autograd's own (``is_grads_batched=True``,
    ``jacobian(..., vectorize=True)`` in either strategy, gradcheck's batched checks;
    inside torch it failed with "Batching rule not implemented") and, unless
    ``functorch=False`` (torch.func's batching is the node's to handle), torch.func's
    (jacrev, jacfwd)."""
    if torch.compiler.is_compiling():  # (a compiled backward: no transform to see, nothing dynamo can trace)
        return
    if functorch and any(batched_values(t) for t in directions):
        raise batched_refusal(name, tangents, True)
    if batched_by_autograd(*directions):
        raise batched_refusal(name, tangents, False)


def functorch_transforms() -> list[str]:
    """The torch.func transforms (``"Vmap"``, ``"Grad"``, ``"Jvp"``, ...) around this call."""
    return [] if _functorch_stack is None else [str(i.key()).rsplit(".", 1)[-1] for i in _functorch_stack()]


def refuse_transforms(name: str, why: str, use: str = "torch.autograd (backward(), torch.autograd.grad)",
                      allowed: tuple[str, ...] = (), inputs: tuple = ()) -> None:
    """Raise a ProblemError naming ``name`` where a torch.func transform other than
    ``allowed`` (keys of :func:`functorch_transforms`) is active: ``why`` says what of the
    call those transforms cannot run (host reads, numpy, torch.autograd inside), ``use``
    what to use instead (they failed deep inside with torch's own messages); likewise
    under tracing (:func:`refuse_trace`) and where the forward-mode tangents of
    ``inputs`` are batched by autograd (:func:`refuse_batched`: pnp's solver failed on
    them with "autograd.grad ... called inside torch.vmap")."""
    refuse_trace(name)
    if inputs and torch.autograd.forward_ad._current_level >= 0:
        unpack = torch.autograd.forward_ad.unpack_dual
        refuse_batched(name, *(unpack(t).tangent for t in inputs if isinstance(t, torch.Tensor)), tangents=True)
    name = public_name(name)
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


def refuse_trace(name: str, exportable: bool = False) -> None:
    """Raise a ProblemError under ``torch.jit.trace`` and under make_fx's tracing
    (``torch.func.linearize``, ``make_fx``): a node's solver decides on the host from the
    values (paths, iteration counts), which a trace records as constants, so the traced
    module can be silently wrong on new inputs (a traced ConvexLayer also lost its
    gradient; a fresh one failed inside with 'unordered_map::at'; linearize gave the
    eigenvectors ±inf tangents, and the other nodes torch's raw '_local_scalar_dense'
    error). torch.compile traces no node code that way (its graph breaks run eagerly).
    Under ``torch.export`` too, unless ``exportable`` (:func:`refuse_export`)."""
    if torch.compiler.is_compiling():  # (torch.compile, torch.export: no trace of the other kinds)
        if not exportable:
            refuse_export(name)
        return
    if torch.jit.is_tracing() or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None:
        raise ProblemError(f"{public_name(name)} does not run under torch.jit.trace, make_fx or torch.func.linearize: "
                           "its solver decides on the host from the values, which a trace would record as "
                           "constants (silently wrong on new inputs); use torch.compile, or torch.func.jvp "
                           "for tangents")


@constant_result  # (dynamo calls it: its error reaches the caller as it is, not wrapped by strict export)
def refuse_export(name: str) -> None:
    """Raise a ProblemError under ``torch.export`` (strict or not): an exported program is
    one graph, which cannot hold a solver's host-side decisions (torch failed inside with
    its raw GuardOnDataDependentSymNode, or dynamo's Unsupported). torch.export sets
    ``torch.compiler.is_compiling()`` too, which let the other refusals pass (torch.compile
    breaks the graph there instead). The closed-form L2 and L∞ projections export."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)  # (torch < 2.3: none to refuse)
    if is_exporting is not None and is_exporting():
        raise ProblemError(f"{public_name(name)} does not run under torch.export: its solver decides on the host "
                           "from the values (convergence tests, active sets), which an exported graph cannot "
                           "hold; use torch.compile (it runs those steps eagerly, between graphs), or keep the "
                           "node outside the exported module")


def refusing_export(name: str) -> Callable[[Callable], Callable]:
    """Decorator: :func:`refuse_export` with ``name``, then the function, which may be one
    torch.compile cannot enter (``torch.compiler.disable``: strict torch.export stopped
    there with dynamo's "Skip inlining" error, before any refusal inside could run)."""
    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn, updated=())  # (not fn's __dict__: it holds torch.compiler.disable's mark)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            refuse_export(name)
            return fn(*args, **kwargs)
        return wrapper
    return decorate


def refuse_vmap(name: str, *values: Any, tangents: bool = True, jacrev: bool = True,
                constants: bool = True, exportable: bool = False) -> None:
    """Raise a ProblemError under torch.jit.trace (:func:`refuse_trace`), and where
    torch.func.vmap batches a node's inputs (its solver decides on the host from their
    values: torch failed inside with "data-dependent control flow" or "Cannot access
    data pointer"), or, with ``tangents=False`` (a node
    whose Function has no vmap rule), under torch.func.jacfwd, which batches the tangents
    ("does not have vmap support"; a plain vmap over a call on constants works:
    :func:`batched_refusal`'s error); with
    ``constants=False`` under any vmap (a Function that has no vmap rule even on
    constants). ``jacrev``: whether to point to torch.func.jacrev instead (the node's
    backward takes batched cotangents); ``exportable``: whether to let ``torch.export``
    through (else :func:`refuse_export`)."""
    refuse_trace(name, exportable)  # (torch.compile and torch.export: that function's test, refuse_export)
    # (Inside torch.compile there is no transform to see, and dynamo cannot trace the lookup.)
    if torch.compiler.is_compiling():
        return
    transforms = functorch_transforms()
    if "Vmap" not in transforms:
        return
    name = public_name(name)
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
        raise batched_refusal(name, True, True, "torch.func.jacrev" if jacrev else "")


def wrapper_forward(label: Callable[[Any], str], **refusal: bool) -> Callable[[Callable], Callable]:
    """Decorator of the forward of a module that runs another node inside (``convexddn.layer``'s
    registry wrappers): with ``refusal``, :func:`refuse_vmap` with those flags first, before the
    wrapper's own checks read the inputs' values (under vmap they failed with torch's
    "data-dependent control flow"); then the forward :func:`called_as` ``label(self)``, so that
    what the inner node refuses names the layer the caller built."""
    def decorate(forward: Callable) -> Callable:
        @functools.wraps(forward)
        def run(self: Any, *values: Any, **named: Any) -> Any:
            name = label(self)
            if refusal:
                refuse_vmap(name, *values, *named.values(), **refusal)
            with called_as(name):
                return forward(self, *values, **named)
        return run
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

    Its ``setup_context`` also keeps the public caller (:func:`called_as`) as
    ``ctx.caller``, for the refusals of the backward, which runs after the call.

    A Function with a ``jvp`` is made to run eagerly under torch.compile where forward
    mode is on (:func:`eager_with_tangents`).
    """
    setup = cls.__dict__.get("setup_context")
    if isinstance(setup, staticmethod) and not hasattr(setup.__func__, "keeps_caller"):
        cls.setup_context = staticmethod(_keeping_caller(setup.__func__))  # type: ignore[method-assign]
    if cls.jvp is not torch.autograd.Function.jvp:
        eager_with_tangents(cls)
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


def _keeping_caller(setup: Callable) -> Callable:
    """``setup`` (a Function's ``setup_context``), then the public caller, if any, kept as ``ctx.caller``."""
    @functools.wraps(setup)
    def setup_context(ctx, inputs, output):
        setup(ctx, inputs, output)
        caller = None if torch.compiler.is_compiling() else _CALLER.get()  # (dynamo: nothing to name)
        if caller is not None:
            ctx.caller = caller
    setup_context.keeps_caller = True  # type: ignore[attr-defined]
    return setup_context


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
