"""The in-place guard of a :class:`~.declarative.DeclarativeNode`: what its problem reads,
and what its ``solve`` may not change.

The backward differentiates the objective and constraints at the values the forward solved
with. torch's own operations save what their backward needs and raise ("modified by an
inplace operation") where it changed in place since; the node's backward evaluates the
user's methods again instead, so it checks for itself, per call, with autograd's version
counters (ints, cheap):

- :class:`ForwardVersions`, at each forward: the version of every tensor the problem may
  read that autograd does not save: the node's buffers and frozen parameters, tensors held
  as plain attributes of the node or of its submodules (``self.c = c``; a view of a buffer,
  ``self.c = self.big[:4]``, shares its base's counter), and tensors from elsewhere (closed
  over, in a list) that an earlier evaluation of the problem was seen to read;
- :meth:`ForwardVersions.checked`, in the backward: each user method runs under
  :class:`Reads`, which records every tensor a torch function receives, and those of the
  forward's record that changed raise an ``InputError`` naming them, before the backward
  uses what they gave.

Only what this backward's own evaluation reads counts: a buffer the objective reads only in
training mode, or only on some calls, is checked where it is read (a record of the first
call's reads missed it: gradient 0.30 for 0.20, silently), and one only ``solve`` writes to
(a warm-start cache) may change. A tensor from outside the node first read in a backward is
watched from the next forward on (its version at this one is unknown).
"""
from __future__ import annotations

import sys
import threading
import weakref
from typing import Any, Callable

import torch
from torch.autograd import forward_ad
from torch.overrides import TorchFunctionMode

from .._workspace import is_scratch
from ..errors import InputError, ProblemError
from ._swap_guard import mid_swap_error, named_state

__all__ = ["ForwardVersions", "Reads", "check_outside_tangents", "check_solve_kept", "refuse_outside_tangents",
           "versions_of", "watch"]

Tensor = torch.Tensor

# Per node, held weakly: tensors from outside the node (closed over, in containers) that an
# evaluation of its problem read, by id (each held weakly too: a dead one's id may come back).
_WATCHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def watch(node: torch.nn.Module, tensors, records=()) -> None:
    """Record ``tensors`` as read by ``node``'s problem: each later forward notes their
    versions, and so do the :class:`ForwardVersions` ``records`` now (of the forward under way)."""
    with _LOCK:
        held = _WATCHED.setdefault(node, weakref.WeakValueDictionary())
        for t in tensors:
            held[id(t)] = t
    for record in records:
        for t in tensors:
            record.note(t, _outside(t))


def _outside(t: Tensor) -> str:
    return f"a tensor of shape {tuple(t.shape)} from outside the node"


def _watched(node: torch.nn.Module) -> list[Tensor]:
    with _LOCK:
        held = _WATCHED.get(node)
        return [] if held is None else list(held.values())


def _swapped(a: Any, consts: dict) -> Any:
    """``a`` (a tensor, or a list or tuple of them) with the tensors of ``consts`` (id -> copy) replaced."""
    if isinstance(a, Tensor):
        return consts.get(id(a), a)
    if isinstance(a, (list, tuple)):
        return type(a)(consts.get(id(t), t) if isinstance(t, Tensor) else t for t in a)
    return a


_DEEPCOPY = Tensor.__deepcopy__  # (what a TorchFunctionMode sees for copy.deepcopy of a plain tensor)
# nn.Parameter's own __deepcopy__ (plain Python, no torch function) is seen only as its read of .data:
_DATA = Tensor.data.__get__
_PARAMETER_DEEPCOPY = torch.nn.Parameter.__deepcopy__.__code__


class Reads(TorchFunctionMode):
    """Records the tensors that torch functions receive within: ``seen``, and ``outside``,
    those neither made within nor among ``given`` (the call's own arguments); each by id.

    An inference tensor from outside (made under ``torch.inference_mode()``, closed over: a
    constant of the problem) is passed on as a plain copy: autograd refuses to save one (torch's
    raw "Inference tensors cannot be saved for backward" at ``w * x``), and it has no version
    counter for the guard to watch. The copy is ``consts``' (id -> the value the forward solved
    with, :meth:`ForwardVersions.note`), else one made at its first read here.

    An id stands for its tensor only while that lives: a tensor freed within (a submodule's
    attribute rebuilt at each call, ``weight_norm``'s ``weight``) gave its id to a later one,
    which then matched it (a false in-place error in 4-11 of 200 backward calls). ``seen`` and
    ``made`` hold their tensors weakly (an entry leaves with its tensor: the evaluation's
    intermediates are freed as without the guard); what they are compared with (the
    forward's record, the node's own and rebound tensors) is held alive by its holder.

    ``swapped``: id -> (name, whether it stands for a tensor that requires grad) of the tensors of the
    node ``node`` (its class's name) as the evaluation sees them (stand-ins, ``implicit_dtype`` casts).
    A deep copy of a submodule in the objective (``copy.deepcopy(self.sub)``: a plain module has none
    of the node's copy hooks, :class:`~._guarded_state.GuardedState`) copies them: torch's raw "Only
    Tensors created explicitly by the user (graph leaves) support the deepcopy protocol" for a cast,
    else a copy that requires grad, cut off from the node's parameters (an InputError blaming it).
    Where the tensor stands for one that requires grad, the copy could not be right (no gradient
    would reach the node's parameter): a ``ProblemError`` says so; else (a buffer, a frozen
    parameter) the copy is its value, detached, as a copy of the node's own tensor would be.
    Where the evaluation reads the parameter itself (no cast: ``implicit_dtype`` its dtype, float64
    by default), ``nn.Parameter.__deepcopy__`` copies it, ``self.data.clone()``, which no torch function
    sees: its read of ``.data`` of a parameter that requires grad is the same ``ProblemError``
    (a copy that required grad, the InputError, on every float64 call after the first)."""

    def __init__(self, given=(), consts=None, swapped=None, node: str = "") -> None:
        super().__init__()
        self.swapped: dict[int, tuple[str, bool]] = swapped or {}
        self.node = node
        self.consts: dict[int, Tensor] = dict(consts or {})
        self.seen: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()
        self.made: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary(
            (id(t), t) for t in given)
        self.outside: dict[int, Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # (Tensors at the top level or in a list or tuple, as torch functions take them; not
        # torch's pytree: it cost as much as the rest of the backward's evaluations.)
        seen, made, outside, consts = self.seen, self.made, self.outside, self.consts
        if args and id(args[0]) in self.swapped:
            if func is _DEEPCOPY:
                return self._deepcopy(*args, **(kwargs or {}))
            if func == _DATA and sys._getframe(1).f_code is _PARAMETER_DEEPCOPY:  # (its caller's frame)
                self._deepcopy(args[0], None, parameter=True)
        swap = False
        for a in (*args, *kwargs.values()) if kwargs else args:
            for t in (a,) if isinstance(a, Tensor) else a if isinstance(a, (list, tuple)) else ():
                if isinstance(t, Tensor):
                    i = id(t)
                    seen[i] = t
                    if i not in made and i not in outside and not is_scratch(t):
                        # (a native node's scratch buffer, rewritten by its next call, is not state:
                        # it was taken for a tensor modified in place before the backward)
                        outside[i] = t
                        if i not in consts and t.is_inference() and not torch.is_inference_mode_enabled():
                            consts[i] = t.clone()  # (outside inference mode: a plain copy)
                    swap = swap or i in consts
        if swap:
            args = tuple(_swapped(a, consts) for a in args)
            kwargs = {k: _swapped(v, consts) for k, v in kwargs.items()} if kwargs else kwargs
        out = func(*args, **(kwargs or {}))
        for o in (out,) if isinstance(out, Tensor) else out if isinstance(out, (list, tuple)) else ():
            if isinstance(o, Tensor):
                made[id(o)] = o
        return out

    def _deepcopy(self, t: Tensor, memo: dict | None = None, parameter: bool = False) -> Tensor | None:
        """``copy.deepcopy`` of the node's tensor ``t`` (see the class docstring); ``parameter``:
        only the check, where ``nn.Parameter.__deepcopy__`` copies it (a frozen one: as itself)."""
        name, needs_grad = self.swapped[id(t)]
        if needs_grad:
            raise mid_swap_error(f"{self.node}'s {name!r}, which requires grad,", self.node, "deep-copied")
        return None if parameter else t.detach().clone()  # (copy.deepcopy enters it in memo)


class ForwardVersions:
    """The version counters, at one forward of ``node``, of the tensors its problem may read
    that autograd does not save (not those of ``saved``: autograd checks them itself).

    ``state``: the parameters and buffers by name as the forward saw them (under
    ``functional_call``, the tensors passed there)."""

    def __init__(self, node: torch.nn.Module, state: dict, saved) -> None:
        self.node = type(node).__name__
        # (Each id-keyed record here holds its tensor, as in Reads: an id compared is never reused.) Those
        # autograd saves are held weakly (an entry leaves with its tensor, its id with it): held here, an input
        # outlived a non-reentrant torch.utils.checkpoint's forward, or a saved-tensor hook that moved it away.
        self.saved: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary(
            (id(t), t) for t in saved)
        self.entries: dict[int, tuple[str, Tensor, int]] = {}  # id: (what, the tensor, its version)
        self.consts: dict[int, Tensor] = {}  # id of an inference tensor: a plain copy of its value now
        self._held: list[Tensor] = []  # (those inference tensors, held: their ids stay theirs)
        self.by_name = {name: id(t) for name, t in state.items() if self.note(t, name)}
        self.attributes: list[tuple[torch.nn.Module, str, Tensor, str]] = []  # (module, key, tensor, what)
        if torch.compiler.is_compiling():  # (dynamo cannot trace is_inference())
            return
        for prefix, module in node.named_modules():
            for key, t in vars(module).items():
                if isinstance(t, Tensor):
                    what = f"{prefix}.{key}" if prefix else key
                    self.attributes.append((module, key, t, what))
                    self.note(t, what)
        for t in _watched(node):
            self.note(t, _outside(t))

    def note(self, t: Any, what: str) -> bool:
        """Note ``t``'s version now (not one autograd saves; of an inference tensor, which has no
        counter, a plain copy of its value, which the backward reads instead); whether it is noted."""
        if not isinstance(t, Tensor) or id(t) in self.saved:
            return False
        if t.is_inference():
            if id(t) not in self.consts and not torch.is_inference_mode_enabled():
                self.consts[id(t)] = t.clone()
                self._held.append(t)
            return False
        self.entries.setdefault(id(t), (what, t, t._version))
        return True

    def checked(self, node: torch.nn.Module, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` (one of ``node``'s methods, ``fn(*xs, y)``), raising ``InputError`` where it
        read a tensor of this record changed in place since the forward. To be made within
        the backward's swaps: what the node's names hold then (the forward's tensors, their
        ``implicit_dtype`` casts) stands for the forward's tensor of that name."""
        # (Tensors held beside their ids, as in Reads: a submodule may rebind an attribute within
        # the call, ``weight_norm``'s ``weight``, freeing the one noted here, whose id came back.)
        mine = named_state(node)
        own = {id(t): (t, self.by_name.get(name)) for name, t in mine}
        swapped = {id(t): (name, t.requires_grad) for name, t in mine}  # (a cast requires grad as its source)
        alias = {i: j for i, (_, j) in own.items() if j is not None}
        # A plain attribute bound to another tensor since: the backward would read that one.
        rebound = {id(now): (what, now) for module, key, t, what in self.attributes
                   if (now := vars(module).get(key)) is not t and isinstance(now, Tensor)}

        def call(*args: Any) -> Any:
            reads = Reads((a for a in args if isinstance(a, Tensor)), self.consts, swapped, self.node)
            with reads:
                out = fn(*args)
            changed = sorted({what for what, t, version in (self.entries[alias.get(i, i)] for i in reads.seen
                                                             if alias.get(i, i) in self.entries)
                              if t._version != version})
            if changed:
                raise InputError(
                    f"{self.node}: {changed} (buffers, parameters that do not require grad or other tensors the "
                    "objective or constraints read) were modified in place between the forward and the backward; "
                    "the backward needs the values the forward solved with (modify them after backward, or out "
                    "of place)")
            replaced = sorted({rebound[i][0] for i in reads.seen if i in rebound})
            if replaced:
                raise InputError(
                    f"{self.node}: tensor attribute(s) {replaced} that the objective or constraints read were bound "
                    "to other tensors between the forward and the backward, which would read the new ones; the "
                    "backward needs the values the forward solved with (register them as buffers, whose forward "
                    "values the backward swaps back in, or rebind them after backward)")
            new = [t for i, t in reads.outside.items()
                   if i not in own and i not in self.entries and i not in self.saved and i not in self.consts]
            if new:
                watch(node, new)
            return out

        return call


def refuse_outside_tangents(node: str, tensors) -> None:
    """An ``InputError`` where one of ``tensors``, read by the problem from outside the node (closed
    over, in a dict, a plain attribute), carries a forward-mode tangent (``torch.autograd.forward_ad``):
    the node differentiates its inputs and parameters only, and the tangent was dropped, silently
    (``y = (x + c) / 2`` with ``c`` dual gave ``ẋ/2`` for ``(ẋ + ċ)/2``). Reverse mode refuses such a
    tensor that requires grad in the same way. Nothing is read outside a dual level."""
    if forward_ad._current_level < 0:
        return
    for t in tensors:
        if forward_ad.unpack_dual(t).tangent is not None:
            raise InputError(
                f"{node}: the objective or constraints read a tensor of shape {tuple(t.shape)} from outside the "
                "node (closed over, in a container, or a plain attribute) that carries a forward-mode tangent, "
                "which the node would drop: only its inputs and parameters are differentiated. Pass it as an "
                "input (node(x, c) with objective(self, x, c, y) and solve(self, x, c)), or make it a parameter "
                "of the node and give its tangent through torch.func.functional_call")


def check_outside_tangents(node: torch.nn.Module, calls: Callable[[], list], xs, y: Tensor) -> None:
    """Where a dual level is open: the problem evaluated once (``calls()``: the user's methods as
    ``fn(*xs, y)``, made only there) and what it read from outside the node (not its parameters and buffers)
    refused where it carries a tangent (:func:`refuse_outside_tangents`). At the forward: within
    the node's ``jvp`` torch shows no tensor's tangent, and where the inputs carry none no ``jvp``
    runs (``c`` alone dual gave a tangent of None)."""
    if forward_ad._current_level < 0:
        return
    own = {id(t) for _, t in named_state(node)}
    reads = Reads((*xs, y))
    # (no tangents propagated: only what is read matters, and an operation without a forward
    # derivative, a custom Function with no jvp applied to the inputs, raised here, where the
    # node's forward mode differentiates it by reverse products)
    with reads, torch.no_grad(), forward_ad._set_fwd_grad_enabled(False):
        for call in calls():
            call(*xs, y)
    refuse_outside_tangents(type(node).__name__, (t for i, t in reads.outside.items() if i not in own))


def versions_of(tensors) -> list[int | None]:
    """The version counters of ``tensors`` (``None`` for an inference tensor: it has none)."""
    return [None if t.is_inference() else t._version for t in tensors]


def check_solve_kept(node: str, tensors, before: list[int | None], n_inputs: int, names) -> None:
    """Raise ``ProblemError`` where ``solve`` modified an input (the first ``n_inputs`` of
    ``tensors``) or a parameter that requires grad (named ``names``) in place. It runs under
    ``torch.no_grad()``, where torch lets a leaf that requires grad change in place: the
    caller's tensor changed, silently, and the backward differentiated at the changed value."""
    changed = [i for i, (t, v) in enumerate(zip(tensors, before)) if v is not None and t._version != v]
    if changed:
        what = [f"input {i}" if i < n_inputs else f"parameter {names[i - n_inputs]!r}" for i in changed]
        raise ProblemError(
            f"{node}.solve modified {', '.join(what)} in place (the caller's tensor changed, and the backward would "
            "differentiate at the changed value); solve must not change its arguments: work on a copy "
            "(x = x.clone()) or out of place")
