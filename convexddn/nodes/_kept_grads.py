"""What a node's ``solve`` sees of the module: its parameters' values detached from the caller's
graph, and their ``.grad`` as it was before the call.

A node's ``solve`` may minimise its objective with autograd (``torch.optim.LBFGS`` with
``f.backward()``, as the DDN reference's pooling nodes do). Every parameter of the node
that requires grad is then a leaf of that inner graph, and the inner ``backward`` added
its gradients to the parameter's ``.grad``; the implicit gradient came on top of them
(``d(sum y)/d alpha`` 23.3 for 0.127 with ``alpha`` an ``nn.Parameter``, silently).
:func:`kept_grads` drops what the solving thread's own backward passes would accumulate into
the parameters' ``.grad``, as it arrives: ``None`` stays ``None``, an existing one keeps its
tensor and its values. Dropped at the source, not undone on exit: the hooks see every
thread's passes, and restoring ``.grad`` as it was (or taking this thread's sum back out)
erased or corrupted the gradients another thread's backward added while a forward solved
there (a shared node in threaded training: 9e-2 to 8e-1 off; after a ``zero_grad()`` there,
-2.3 for 4), silently. The module's ``zero_grad()`` does nothing while it solves in that thread
(:class:`SolveZeroGrad`): ``solve``'s own passes add nothing to clear. (Not stand-ins for the
parameters while ``solve`` runs: a ``solve`` may build attributes whose graph reaches the
parameters themselves, ``self.r = self.s.exp().sum()``, for the constraints to read.) Limits:
the passes still run through the parameters' AccumulateGrad, so hooks a user put on them fire
(their gradients zeros) and ``create_graph`` passes replace a ``.grad`` tensor by an equal one;
and a node whose ``solve`` runs such passes should not be run in one thread while another
thread clears or accumulates its parameters' gradients (torch's ``.grad`` updates are not
thread-safe: a ``zero_grad()`` racing the zeros' accumulation crashed the process).

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

__all__ = ["SolveZeroGrad", "kept_grads", "solve_view"]


@contextlib.contextmanager
def kept_grads(module: torch.nn.Module) -> Iterator[None]:
    """Within: this thread's backward passes leave ``module``'s parameters' (leaves') ``.grad``
    as it was: what they would accumulate there is dropped as it arrives (a hook hands autograd
    zeros; a ``.grad`` that was None is set back to None right after), so another thread's
    gradients, landing meanwhile, are neither erased nor mixed (module docstring). A
    ``torch.autograd.grad`` in ``solve`` still gets the parameters' gradients (it accumulates
    nothing). ``module.zero_grad()`` does nothing meanwhile in this thread (:class:`SolveZeroGrad`);
    a ``.grad`` that ``solve`` assigns otherwise stays as assigned (another thread's
    ``zero_grad()``, which no hook sees, could not be told apart from it)."""
    params = [p for p in module.parameters() if p.requires_grad and p.is_leaf]
    if not params or torch.compiler.is_compiling():  # (a compiled solve runs no backward of its own)
        yield
        return
    owner = threading.get_ident()
    nodes = [torch.autograd.graph.get_gradient_edge(p).node for p in params]  # their AccumulateGrad
    was_none: set[int] = set()  # this thread's pass found .grad None: set back right after
    was_sparse: set[int] = set()  # ... found it sparse: made sparse again right after

    def drop(i: int):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if not _ours(owner) or not _accumulates(nodes[i]):
                return grad
            held = params[i].grad
            if held is None:
                was_none.add(i)
            elif held.is_sparse:  # (dense zeros made it dense, and SparseAdam refused it: sparse again after)
                was_sparse.add(i)
            return torch.zeros_like(grad)
        return hook

    def restore(i: int):  # (right after this thread's accumulation of zeros: .grad as it was)
        def hook(p: torch.Tensor) -> None:
            if (i in was_none or i in was_sparse) and _ours(owner):
                if i in was_none:
                    p.grad = None
                elif not p.grad.is_sparse:
                    p.grad = p.grad.to_sparse()
                was_none.discard(i)
                was_sparse.discard(i)
        return hook

    handles = [h for i, p in enumerate(params)
               for h in (p.register_hook(drop(i)), p.register_post_accumulate_grad_hook(restore(i)))]
    solving = _solving()
    solving.append(module)
    try:
        yield
    finally:
        solving.pop()
        for h in handles:
            h.remove()


class SolveZeroGrad(torch.nn.Module):
    """``zero_grad()`` that leaves the parameters' gradients alone while this thread solves with
    the module (:func:`kept_grads`): they are the caller's, and ``solve``'s own backward passes
    add nothing to them (a ``solve`` calling ``self.zero_grad()`` before its passes erased the
    caller's gradient, or zeroed it in place with ``set_to_none=False``); elsewhere torch's."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        if any(m is self for m in _solving()):
            return
        super().zero_grad(set_to_none)


def _solving() -> list:
    """The modules this thread is solving with (innermost last)."""
    if not hasattr(_LOCAL, "solving"):
        _LOCAL.solving = []
    return _LOCAL.solving


_LOCAL = threading.local()


def _accumulates(node: torch.autograd.graph.Node) -> bool:
    """Whether the running backward pass accumulates into the leaf whose AccumulateGrad is
    ``node`` (``backward()``), rather than returning its gradient (``torch.autograd.grad``,
    where torch cannot tell and says so)."""
    try:
        return torch._C._will_engine_execute_node(node)
    except RuntimeError:  # ("... currently running autograd.grad(). This is currently not supported.")
        return False


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
