"""The autograd Function behind :class:`~convexddn.DeclarativeNode`, and how it calls the user.

Forward: the node's ``solve`` (never differentiated). Backward: the node's implicit
vector–Jacobian product (:func:`.implicit.declarative_vjp`); forward mode: its
Jacobian–vector product (:func:`.implicit_jvp.declarative_jvp`). With ``create_graph=True``
the first-order gradients are returned through :func:`~convexddn._first_order.guard_gradients`, so
that a second differentiation raises a clear error instead of silently giving zero.
:func:`y_by_keyword` and :func:`arity_error` read the signatures of the user's methods
(``objective(self, x, y)`` and ``objective(self, *xs, y)`` both work).
"""
from __future__ import annotations

import inspect
import threading
import weakref
from typing import Any, Callable

import torch
from torch.autograd import forward_ad

from .._autograd import (eager_with_tangents, may_carry_tangents, plain, refuse_batched, refuse_transforms, save_plain,
                         without_autocast)
from .._first_order import FORWARD_AD_ONLY, first_order_jvp, guard_gradients, outside_inference_mode
from ..errors import InputError, ProblemError
from ._held_estimates import held_per_call
from ._read_guard import ForwardVersions, check_solve_kept, versions_of
from .degeneracy import naming_batch
from .inputs import input_names

__all__ = ["DeclarativeFunction", "arity_error", "check_structure", "differentiated_parameters", "parameter_leaves",
           "refuse_batched", "refuse_functorch", "solve_input_names", "y_by_keyword"]

Tensor = torch.Tensor


@eager_with_tangents  # (torch.compile would trace its forward alone in forward mode: no tangent)
class DeclarativeFunction(torch.autograd.Function):
    """Runs ``node.solve`` forward and :func:`declarative_vjp` backward."""

    @staticmethod
    def forward(node: Any, n_inputs: int, context: tuple[tuple[int, ...], dict, tuple[str, ...], list],
                *tensors: Tensor) -> Tensor:  # type: ignore[override]
        if torch.compiler.is_compiling():  # (dynamo cannot trace is_inference())
            return node._checked_solve(tensors[:n_inputs])
        # solve runs under no_grad, where torch lets a leaf that requires grad change in place:
        # x.sub_(1) there changed the caller's x and the backward's, silently.
        before = versions_of(tensors)
        with naming_batch(context[0]):  # (messages name the rows in the caller's batch shape)
            y = node._checked_solve(tensors[:n_inputs])
        check_solve_kept(type(node).__name__, tensors, before, n_inputs, context[2])
        return y

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        """``context``: the batch shape, the node's parameters and buffers by name as the
        forward saw them (the backward solves with those), the names of the parameters
        passed after the inputs, and a list that receives the call's :class:`ForwardVersions`
        (for the probe of the same call to add to)."""
        node, n, (batch_shape, state, names, record) = inputs[:3]
        # A buffer or frozen parameter made under torch.inference_mode() has no version
        # counter to watch (torch's raw "Inference tensors do not track version counter"
        # here): the backward gets a plain copy of the value the forward solved with.
        if not torch.compiler.is_compiling():  # (dynamo cannot trace is_inference())
            state = {k: plain(t) if isinstance(t, torch.Tensor) else t for k, t in state.items()}
        # A spectral norm's estimate u, v as this forward left it, held for its backward: a second
        # forward before it (the GAN pattern) steps them in place (an InputError in this backward before).
        state = held_per_call(node, state)
        ctx.node, ctx.n_inputs, ctx.batch_shape, ctx.state, ctx.names = node, n, batch_shape, state, names
        ctx.held = held(state)  # (the values: a .half() before the backward converts the parameters in place)
        # The parameters that require grad are saved (not just referenced): one changed
        # in place before the backward raises autograd's error, as nn.Linear's would,
        # instead of being differentiated at its new value. Inputs made under
        # torch.inference_mode() are saved as plain copies (autograd refuses to save them).
        save_plain(ctx, *inputs[3:], output)
        ctx.save_for_forward(*inputs[3:], output)
        # Buffers, frozen parameters and other tensors the problem may read are only
        # referenced: their version counters tell the backward whether one it reads was
        # changed in place since (it would differentiate the problem at the new value,
        # silently, or call the solution wrong).
        ctx.versions = ForwardVersions(node, state, inputs[3:])
        record.append(ctx.versions)

    # The backward and the jvp (the probe too) evaluate the user's problem with the caller's autocast off: it
    # lowered the objective's Hessian products to bfloat16 (a float32 gradient 3e-3 off, with KKT warnings that
    # blamed solve) or float16 (1e-4 off, silently). solve itself runs as called: the user's algorithm.
    @staticmethod
    @first_order_jvp("DeclarativeNode")
    @without_autocast
    def jvp(ctx, *tangents: Tensor | None) -> Tensor:  # type: ignore[override]
        """Forward mode: :func:`.implicit_jvp.declarative_jvp` along the tangents of the
        inputs and of the parameters that require grad."""
        *tensors, y = ctx.saved_tensors
        n = ctx.n_inputs
        ts = tangents[3:]
        if all(t is None for t in ts):
            return torch.zeros_like(y)
        refuse_batched(type(ctx.node).__name__, *ts, tangents=True)
        with torch.no_grad():
            return ctx.node._jvp(tensors[:n], y, ts[:n], tensors[n:], ts[n:], ctx.batch_shape, ctx.state, ctx.names,
                                 ctx.versions)

    @staticmethod
    @outside_inference_mode  # (backward() inside torch.inference_mode(): the problem is differentiated by autograd)
    @without_autocast
    def backward(ctx, grad_y: Tensor):  # type: ignore[override]
        refuse_batched(type(ctx.node).__name__, grad_y)
        *tensors, y = ctx.saved_tensors
        xs, params = tensors[:ctx.n_inputs], tensors[ctx.n_inputs:]
        needs = ctx.needs_input_grad[3:]
        if not any(needs):
            return (None,) * (3 + len(needs))
        node = ctx.node
        # Only the parameters that need a gradient (one that only carries a forward-mode
        # tangent need not require grad, and autograd refuses to differentiate it), and
        # still require grad: one frozen since the forward (requires_grad_(False) between
        # the loss and backward(), as a GAN's or a fine-tuning loop's toggle) gets none,
        # as torch's layers give it none, and is read as a constant (autograd's raw "One of
        # the differentiated Tensors does not require grad" failed the inputs' gradient too).
        want = [i for i, need in enumerate(needs[ctx.n_inputs:]) if need and params[i].requires_grad]
        # At the values the forward solved with (ctx.state), whatever .half() or .to(dtype) made of them since.
        targets, state, owners = backward_targets([params[i] for i in want], ctx.state, ctx.held,
                                                  [ctx.names[i] for i in want])
        with torch.no_grad():
            grad_xs, grad_targets = node._vjp(xs, y, grad_y, targets, ctx.batch_shape, state, ctx.versions,
                                              needs[:ctx.n_inputs])
        grad_params: list[Tensor | None] = [None] * len(params)
        for i, own in zip(want, owners):
            grad_params[i] = grad_targets[own[0]]
            for j in own[1:]:
                grad_params[i] = grad_params[i] + grad_targets[j]  # (same dtype: kept only where it is)
        grads = [g if need else None for g, need in zip((*grad_xs, *grad_params), needs)]
        # create_graph=True: make a second differentiation fail loudly, not give 0.
        # (its advice for first-order products: forward_ad alone, the node refusing torch.func)
        grads = guard_gradients(type(node).__name__, grads, (grad_y, *xs, *params), forward_mode=FORWARD_AD_ONLY)
        return (None, None, None, *grads)


def differentiated_parameters(module: torch.nn.Module) -> list[tuple[str, Tensor]]:
    """The module's parameters the Function takes as inputs: those that require grad and,
    under forward-mode AD, those that carry a tangent (a dual tensor swapped in by
    ``torch.func.functional_call`` need not require grad). A buffer that carries a
    tangent is refused (``InputError``): its tangent would be dropped, as reverse mode
    refuses a buffer that requires grad."""
    if not may_carry_tangents():  # (no dual level open)
        return [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    carried = [n for n, b in module.named_buffers() if forward_ad.unpack_dual(b).tangent is not None]
    if carried:
        raise InputError(
            f"{type(module).__name__}: buffer(s) {carried} carry forward-mode tangents; the node "
            "differentiates with respect to its inputs and parameters only (make them parameters, "
            "or pass them as inputs)")
    return [(n, p) for n, p in module.named_parameters()
            if p.requires_grad or forward_ad.unpack_dual(p).tangent is not None]


def held(state: dict) -> dict:
    """``state`` (a module's parameters and buffers by name, as a forward saw them) with each tensor
    replaced by a detached alias of it, one per tensor (a tied one's names share it): the storage the
    forward solved with and the same version counter, for its backward.

    ``nn.Module._apply`` (``.half()``, ``.bfloat16()``, ``.double()``, ``.to(dtype)``) points each
    parameter at a converted copy (``param.data = ...``): the same object, with no version bump, and
    the old storage left to what still refers to it. Holding the parameter itself, the backward read the
    converted values (after ``.half()``, every row's dL/dx 6e-5 off, silently), where torch's own layers
    keep the forward's (their saved views). An in-place change still moves the alias's counter."""
    aliases: dict[int, Tensor] = {}
    for t in state.values():
        if isinstance(t, Tensor) and id(t) not in aliases:
            aliases[id(t)] = t.detach()
    return {name: aliases.get(id(t), t) for name, t in state.items()}


def backward_targets(params: list[Tensor], state: dict, held_state: dict,
                     names: list[str]) -> tuple[list[Tensor], dict, list[tuple[int, ...]]]:
    """What the backward differentiates for the parameters ``params`` (named ``names``; the forward's
    ``state`` and its :func:`held` aliases ``held_state``): the tensors, the state the problem reads, and per
    parameter the indices of its tensors, whose gradients sum to its.

    Each tensor that still holds the storage its forward solved with is read itself and a parameter's
    saved tensor differentiated, as ever (a graph built from it outside the problem, an attribute
    ``self.r = self.w.exp()`` set in ``solve``, reaches it there; so does a saved tensor unpacked by
    hooks, a non-reentrant checkpoint's, which shares its gradient accumulator). One given a new storage
    since (``.half()``, ``.to(memory_format=...)``: a converted copy under the same object) is read at the
    value held, a parameter's as a leaf of its own (by identity: a tied parameter's every name); the
    parameter is differentiated too where graphs built at the forward still reach it: torch keeps its
    gradient accumulator across ``.data = ...`` unless the dtype or device changes. Where it does not, such
    a graph holds the parameter as a tensor the backward does not differentiate: the problem's check raises
    ``InputError`` (differentiating the parameter gave that part of the gradient as 0, silently)."""
    now = {name: t if _unmoved(t, held_state[name]) else held_state[name] for name, t in state.items()}
    targets: list[Tensor] = []
    owners: list[tuple[int, ...]] = []
    by_id: dict[int, Tensor] = {}
    for p, name in zip(params, names):
        value = now[name]
        if value is state[name]:
            owners.append((len(targets),))
            targets.append(p)
        else:
            by_id[id(value)] = leaf = value.detach().requires_grad_(True)
            kept = p.dtype == value.dtype and p.device == value.device  # (its accumulator, as torch's set_data)
            owners.append((len(targets), len(targets) + 1) if kept else (len(targets),))
            targets += [leaf, p] if kept else [leaf]
    return targets, {name: by_id.get(id(t), t) for name, t in now.items()}, owners


def _unmoved(t, alias) -> bool:
    """Whether ``t`` still holds the storage of its alias ``alias`` taken at the forward (a sparse tensor,
    which ``_apply`` replaces as an object where it converts it, counts as unmoved)."""
    return not isinstance(t, Tensor) or t.layout != torch.strided or t.is_set_to(alias)


def parameter_leaves(params, state: dict, names) -> tuple[tuple[Tensor, ...], dict]:
    """Leaves of their own for the parameters ``params`` (named ``names``) and ``state``
    with them swapped in, for the jvp: the forward's may be dual tensors that do not
    require grad. Swapped by identity, so that a tied parameter's every name reads its
    leaf (by its first name only, the tangent lost what the objective read through the
    alias)."""
    leaves = tuple(p.detach().requires_grad_(True) for p in params)
    by_id = {id(state[name]): leaf for name, leaf in zip(names, leaves)}
    return leaves, {name: by_id.get(id(t), t) for name, t in state.items()}


def refuse_functorch(name: str) -> None:
    """Raise where a torch.func transform is active: the node checks ``solve``'s result on
    the host and differentiates the objective with torch.autograd, neither of which those
    transforms allow (they failed deep inside with torch's own messages)."""
    refuse_transforms(name, "it checks solve's result on the host and differentiates the objective with "
                      "torch.autograd", "torch.autograd: backward(), torch.autograd.grad, or torch.autograd.forward_ad "
                      "for forward mode (torch.func.functional_call is supported)")


def _signature(fn: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


# Per class, held weakly: a class defined per call (in a function, a loop) was kept for
# good by functools.cache, and still ~340 of them -- with all their methods close over,
# 1.3 GB of captured tensors in one run -- by a bounded lru_cache.
_BY_CLASS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_BY_CLASS_LOCK = threading.Lock()


def _per_class(cls: type, key: Any, compute: Callable[[], Any]) -> Any:
    """``compute()``, cached for ``(cls, key)`` while ``cls`` lives."""
    with _BY_CLASS_LOCK:
        entry = _BY_CLASS.get(cls)
        if entry is not None and key in entry:
            return entry[key]
    value = compute()
    with _BY_CLASS_LOCK:
        _BY_CLASS.setdefault(cls, {})[key] = value
    return value


def y_by_keyword(cls: type, method: str) -> bool:
    """Whether ``cls.method`` takes ``y`` as a keyword-only argument (``*xs, y``)."""
    return _per_class(cls, ("y", method), lambda: _y_by_keyword(cls, method))


def _y_by_keyword(cls: type, method: str) -> bool:
    sig = _signature(getattr(cls, method))
    p = None if sig is None else sig.parameters.get("y")
    return p is not None and p.kind == inspect.Parameter.KEYWORD_ONLY


def solve_input_names(cls: type, n: int) -> list[str]:
    """How messages name ``cls``'s ``n`` inputs: by ``solve``'s positional parameters
    (``solve(self, x, z)``: ``x``, ``z``), the rest (``*xs``) as :func:`.inputs.input_names`
    does (``input 2``); cached."""
    return _per_class(cls, ("names", n), lambda: _solve_input_names(cls, n))


def _solve_input_names(cls: type, n: int) -> list[str]:
    sig = _signature(cls.solve)
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    given = [] if sig is None else [p.name for p in sig.parameters.values() if p.kind in positional]
    if not isinstance(inspect.getattr_static(cls, "solve", None), (staticmethod, classmethod)):
        given = given[1:]  # (self)
    return given[:n] + input_names(n)[len(given):]


def check_structure(node: Any, n: int, base: type) -> None:
    """The user's subclass of ``base`` (:class:`~convexddn.DeclarativeNode`) as a call with ``n`` inputs
    needs it: ``super().__init__()`` called, ``objective`` and ``solve`` defined, ``solve`` taking ``n``."""
    name = type(node).__name__
    if not node.__dict__.get("_ddn_initialised", False):
        raise ProblemError(f"{name}.__init__ must call super().__init__()")
    missing = [m for m in ("objective", "solve") if getattr(type(node), m) is getattr(base, m)]
    if missing:
        raise ProblemError(
            f"{name} must define {' and '.join(missing)}: objective(self, *xs, y) "
            "returning (B,), and solve(self, *xs) returning y of shape (B, ...)"
        )
    error = arity_error(type(node), n)
    if error:
        raise InputError(error)


def arity_error(cls: type, n: int) -> str | None:
    """Why ``cls``'s methods cannot take ``n`` inputs (``None`` if they can); cached."""
    return _per_class(cls, ("arity", n), lambda: _arity_error(cls, n))


def _arity_error(cls: type, n: int) -> str | None:
    name = cls.__name__
    for method, with_y in (("solve", False), ("objective", True),
                           ("equality_constraints", True), ("inequality_constraints", True)):
        sig = _signature(getattr(cls, method))
        if sig is None:
            continue
        # self first where the method takes it: a plain function looked up on the class;
        # a staticmethod takes none and a classmethod's cls is bound already (both were
        # refused as unable to take the inputs they take).
        static = isinstance(inspect.getattr_static(cls, method, None), (staticmethod, classmethod))
        args = [None] * (n + (0 if static else 1))
        try:
            if not with_y:
                sig.bind(*args)
            elif y_by_keyword(cls, method):
                sig.bind(*args, y=None)
            else:
                sig.bind(*args, None)
        except TypeError as err:
            return (f"{name} was called with {n} input(s), which {name}.{method}{sig} "
                    f"cannot take ({err})")
    return None
