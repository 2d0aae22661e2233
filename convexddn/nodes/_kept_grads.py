"""What a node's ``solve`` sees of the module: its parameters' values detached from the caller's
graph, and their ``.grad`` as it was before the call.

A node's ``solve`` may minimise its objective with autograd (``torch.optim.LBFGS`` with
``f.backward()``, as the DDN reference's pooling nodes do). Every parameter of the node
that requires grad is then a leaf of that inner graph, and the inner ``backward`` added
its gradients to the parameter's ``.grad``; the implicit gradient came on top of them
(``d(sum y)/d alpha`` 23.3 for 0.127 with ``alpha`` an ``nn.Parameter``, silently).
:func:`kept_grads` puts each ``.grad`` back as it was before the call: ``None`` stays
``None``, an existing one keeps its tensor and its values. The values are copied only
where a gradient reaches the parameter (a hook before its accumulation), so a call that
runs no backward copies nothing. Only the solving thread's backward passes are undone: the
hooks see every thread's, and restoring ``.grad`` wholesale erased a gradient another thread's
backward added while a forward solved there (a shared node in threaded training: parameter
gradients 9e-2 to 8e-1 off, silently); where both reached a parameter, this thread's sum is
taken out of it (to rounding).

Under ``torch.func.functional_call`` a parameter's value may be no leaf (fast weights
``{"k": 2 * theta}``, as in MAML): the inner ``backward`` ran on through the caller's graph,
into ``theta.grad`` (6.03 for -0.27, silently), and freed that graph (torch's raw "Trying to
backward through the graph a second time"). :func:`solve_view` swaps such a value for its
detached self while ``solve`` runs (sharing its version counter: an in-place change is still
seen), and keeps the ``.grad`` of the leaves; only a leaf has a ``.grad`` to keep (reading a
non-leaf's warned, torch's "The .grad attribute of a Tensor that is not a leaf Tensor").
"""
from __future__ import annotations

import contextlib
import pathlib
import sys
import threading
from collections.abc import Iterator

import torch
from torch.nn.utils.stateless import _reparametrize_module

from ._parametrize_cache import fresh_parametrizations
from ._swap_guard import guarded, named_state

__all__ = ["kept_grads", "solve_view"]


@contextlib.contextmanager
def kept_grads(module: torch.nn.Module) -> Iterator[None]:
    """Within: gradients that reach ``module``'s parameters (those that are leaves) from this
    thread's backward passes are undone on exit (module docstring); another thread's, which
    the same hooks see, stay (:func:`_ours`)."""
    params = [p for p in module.parameters() if p.requires_grad and p.is_leaf]
    if not params or torch.compiler.is_compiling():  # (a compiled solve runs no backward of its own)
        yield
        return
    owner = threading.get_ident()
    saved: dict[int, torch.Tensor | None] = {}  # before this thread's first accumulation
    ours: dict[int, torch.Tensor] = {}  # what this thread's backward passes added
    theirs: set[int] = set()  # parameters another thread's backward reached meanwhile

    def hook(i: int):
        def keep(grad: torch.Tensor) -> torch.Tensor:
            if not _ours(owner):
                theirs.add(i)
                return grad
            if i not in saved:
                saved[i] = None if params[i].grad is None else params[i].grad.detach().clone()
            ours[i] = grad.detach().clone() if i not in ours else ours[i] + grad.detach()
            return grad
        return keep

    handles = [p.register_hook(hook(i)) for i, p in enumerate(params)]
    before = [p.grad for p in params]  # (after the hooks: an accumulation in between is seen by them)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for i, p in enumerate(params):
                if i in theirs:
                    # Another thread's gradient is in .grad too: take out only ours (to rounding).
                    if i in ours and p.grad is not None:
                        p.grad -= ours[i]
                elif p.grad is not before[i] or i in saved:  # (this thread's doing: put back exactly)
                    if before[i] is not None and i in saved:
                        before[i].copy_(saved[i])
                    p.grad = before[i]


def _ours(owner: int) -> bool:
    """Whether the backward pass running this hook is the ``owner`` thread's: a CPU pass runs
    its hooks in the thread that started it; a CUDA one in autograd's device thread (no Python
    thread of its own), taken as the owner's while the owner waits in a backward call."""
    here = threading.get_ident()
    if here == owner:
        return True
    if not isinstance(threading.current_thread(), threading._DummyThread):
        return False  # (another Python thread's backward)
    frame = sys._current_frames().get(owner)
    while frame is not None:
        if frame.f_code.co_name == "_engine_run_backward" and frame.f_code.co_filename.endswith(_GRAPH):
            return True
        frame = frame.f_back
    return False


_GRAPH = str(pathlib.PurePath("torch", "autograd", "graph.py"))


@contextlib.contextmanager
def _detached_values(module: torch.nn.Module) -> Iterator[None]:
    """Within: ``module``'s parameters and buffers that require grad and are no leaves (put there by
    ``functional_call``) swapped for their detached selves (one per tensor: a tied one stays tied)."""
    if torch.compiler.is_compiling():
        yield
        return
    by_id: dict[int, torch.Tensor] = {}
    swaps = {name: by_id.setdefault(id(t), t.detach()) for name, t in named_state(module)
             if t.requires_grad and not t.is_leaf}
    if not swaps:
        yield
        return
    # (a swap, held as the backward's: a forward another thread starts meanwhile waits for it; one already
    # running there may read the detached values, as it may functional_call's own, unguarded, values)
    with guarded(module, swap=True), _reparametrize_module(module, swaps):
        yield


@contextlib.contextmanager
def solve_view(module: torch.nn.Module) -> Iterator[None]:
    """Within (``solve``): ``module``'s parameter values detached from the caller's graph, the ``.grad``
    of its leaves kept (module docstring), and its parametrizations computed apart from an enclosing
    ``parametrize.cached()`` (:mod:`._parametrize_cache`: a value ``solve`` computed without a graph
    stayed in the caller's cache)."""
    with _detached_values(module), kept_grads(module), fresh_parametrizations(module):
        yield
