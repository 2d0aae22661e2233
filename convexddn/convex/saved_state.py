"""The state a batched solve keeps for its derivative, passed through saved-tensor hooks.

A :class:`~.cone_solve.ConeSolve` keeps its solution's state (the equilibrated data, the
KKT system factorised at the solution: 3-5 times the size of the layer's inputs on dense
QPs) for the backward. Kept as a Python attribute of the autograd context, it escaped
``torch.utils.checkpoint`` and ``torch.autograd.graph.save_on_cpu``: a checkpointed layer
held it until the backward, so checkpointing saved no memory for it. Where saved-tensor
hooks are active, the state's tensors are saved as torch's own ops' are instead: the
state is split into a skeleton (its objects, each tensor replaced by its position) and
the list of its tensors, which go to ``ctx.save_for_backward``; the backward joins them
again. Without hooks the state stays as it is (no walk, no copies).

The walk copies the solver's per-call objects (classes of :mod:`convexddn.convex` with a
``__dict__``), tuples, lists and dicts; the program's structure (:class:`~.cone_data.ConeData`,
:class:`~.symmetric_cones.ConeLayout`, :class:`~.data_ops.KKTStructure`: shared by every call,
their caches outlive it) and anything else are kept by reference. A tensor reached twice is
saved once; views are saved apart from their base, as torch's own ops save them (a copying
hook, ``save_on_cpu`` on a GPU, then holds them apart too: 1.6 times the state's distinct
storage on a dense QP, against the whole state held on the device before).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .cone_data import ConeData
from .data_ops import KKTStructure
from .symmetric_cones import ConeLayout

__all__ = ["hooks_active", "join", "split"]

_SHARED = (ConeData, ConeLayout, KKTStructure)


def hooks_active() -> bool:
    """Whether saved-tensor hooks (a checkpoint, ``save_on_cpu``, the user's own) would
    see what a Function saves now. (A private torch query; where it is missing the state
    stays an attribute, as before.)"""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


class _Slot:
    """A tensor's position in the saved list."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


def _per_call(o: object) -> bool:
    """An object of the solver's own made for this call (copied by the walk)."""
    return (type(o).__module__.startswith("convexddn.convex") and hasattr(o, "__dict__")
            and not isinstance(o, _SHARED))


def _walk(o: Any, leaf: Callable[[Any], Any], memo: dict[int, Any]) -> Any:
    """``o`` rebuilt with ``leaf`` applied to its tensors and slots (shared parts shared)."""
    key = id(o)
    if key in memo:
        return memo[key]
    if isinstance(o, (torch.Tensor, _Slot)):
        out = leaf(o)
    elif isinstance(o, tuple):
        items = [_walk(v, leaf, memo) for v in o]
        out = type(o)._make(items) if hasattr(type(o), "_fields") else tuple(items)
    elif isinstance(o, list):
        out = [_walk(v, leaf, memo) for v in o]
    elif isinstance(o, dict):
        out = {k: _walk(v, leaf, memo) for k, v in o.items()}
    elif _per_call(o):
        out = memo[key] = object.__new__(type(o))  # (before its members: an object that reaches itself)
        out.__dict__.update({k: _walk(v, leaf, memo) for k, v in vars(o).items()})
        return out
    else:
        out = o
    memo[key] = out
    return out


def split(state: Any) -> tuple[Any, list[torch.Tensor]]:
    """``(skeleton, tensors)``: ``state`` with each distinct tensor replaced by its
    position in ``tensors``."""
    tensors: list[torch.Tensor] = []

    def leaf(t: torch.Tensor) -> _Slot:  # (once per tensor: _walk's memo gives a tensor seen before its slot)
        tensors.append(t)
        return _Slot(len(tensors) - 1)

    return _walk(state, leaf, {}), tensors


def join(skeleton: Any, tensors: tuple[torch.Tensor, ...]) -> Any:
    """The state :func:`split` took apart, with ``tensors`` (as unpacked by the hooks)
    in its slots; new objects on every call (the skeleton is not changed)."""
    return _walk(skeleton, lambda s: tensors[s.index], {})
