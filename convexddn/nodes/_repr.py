"""How node Modules show their options in ``extra_repr``: one formatter for options
that may be tensors (a scale ``alpha``, a ``radius``, a ``ridge``, ...)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["format_option"]


def _scalar(t: torch.Tensor) -> str:
    v = t.detach().item()
    # Six significant digits, shown as a Python float: float32's 0.1 is "0.1", not
    # "0.10000000149011612", and 2 is "2.0".
    return repr(float(f"{v:.6g}")) if isinstance(v, float) else repr(v)


def format_option(value: Any) -> str:
    """``value`` as a node's ``extra_repr`` shows it.

    A 0-d tensor shows its value (``2.0``), a one-element tensor its value in brackets
    (``tensor([2.0])``, the DDN reference's ``torch.tensor([alpha])``), a larger one its
    shape (``tensor of shape (3, 1)``); an ``nn.Parameter`` shows ``Parameter`` in place
    of ``tensor`` (``Parameter(2.0)`` for a 0-d one: learned, its value is the current
    one). Anything else is shown as ``str`` shows it.
    """
    if not isinstance(value, torch.Tensor):
        return f"{value}"
    kind = "Parameter" if isinstance(value, nn.Parameter) else "tensor"
    readable = value.device.type != "meta" and value.numel() == 1
    if readable and value.dim() == 0:
        return f"Parameter({_scalar(value)})" if kind == "Parameter" else _scalar(value)
    if readable:
        return f"{kind}({'[' * value.dim()}{_scalar(value)}{']' * value.dim()})"
    return f"{kind} of shape {tuple(value.shape)}"
