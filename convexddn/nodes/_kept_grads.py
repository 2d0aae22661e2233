"""The ``.grad`` of a module's parameters as it was before a call that may run autograd.

A node's ``solve`` may minimise its objective with autograd (``torch.optim.LBFGS`` with
``f.backward()``, as the DDN reference's pooling nodes do). Every parameter of the node
that requires grad is then a leaf of that inner graph, and the inner ``backward`` added
its gradients to the parameter's ``.grad``; the implicit gradient came on top of them
(``d(sum y)/d alpha`` 23.3 for 0.127 with ``alpha`` an ``nn.Parameter``, silently).
:func:`kept_grads` puts each ``.grad`` back as it was before the call: ``None`` stays
``None``, an existing one keeps its tensor and its values. The values are copied only
where a gradient reaches the parameter (a hook before its accumulation), so a call that
runs no backward copies nothing.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["kept_grads"]


@contextlib.contextmanager
def kept_grads(module: torch.nn.Module) -> Iterator[None]:
    """Within: gradients that reach ``module``'s parameters are undone on exit (module docstring)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params or torch.compiler.is_compiling():  # (a compiled solve runs no backward of its own)
        yield
        return
    before = [p.grad for p in params]
    saved: dict[int, torch.Tensor | None] = {}

    def hook(i: int):
        def keep(grad: torch.Tensor) -> torch.Tensor:
            if i not in saved:  # (before the first accumulation: the values to restore)
                saved[i] = None if before[i] is None else before[i].detach().clone()
            return grad
        return keep

    handles = [p.register_hook(hook(i)) for i, p in enumerate(params)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for i, p in enumerate(params):
                if p.grad is not before[i] or i in saved:
                    if before[i] is not None and i in saved:
                        before[i].copy_(saved[i])
                    p.grad = before[i]
