"""How the node Modules keep a tensor-or-number option (a scale ``alpha``, a ``radius``,
a ``ridge``, ...): one rule for all of them."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._warn import warn
from ..errors import ConvexDDNWarning

__all__ = ["store_option"]


def store_option(module: nn.Module, name: str, value: Any, as_float: bool = False) -> None:
    """Keep ``value`` as ``module.<name>``: an ``nn.Parameter`` as it is (learned), another
    tensor as a buffer holding a copy (``state_dict`` keeps it, ``.to()`` moves it; the
    caller's tensor may be a graph node or change later), anything else as it is
    (``float(value)`` with ``as_float``).

    A plain tensor that requires grad is stored too, but said: it is detached and never
    learned, where the caller plainly meant it to be (wrap it in ``nn.Parameter``).
    """
    if isinstance(value, nn.Parameter):
        setattr(module, name, value)
    elif isinstance(value, torch.Tensor):
        if value.requires_grad:
            warn(f"{type(module).__name__}: {name} requires grad but is a plain tensor, stored as a buffer "
                 f"and not learned; pass nn.Parameter({name}) to learn it", ConvexDDNWarning)
        module.register_buffer(name, value.detach().clone())
    else:
        setattr(module, name, float(value) if as_float else value)
