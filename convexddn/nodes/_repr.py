"""How node Modules show their options in ``extra_repr``: one formatter for options
that may be tensors (a scale ``alpha``, a ``radius``, a ``ridge``, ...), and the registry
problem a ``convexddn.layer`` module was built from."""
from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["format_option", "registry_origin"]


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


def registry_origin(name: str, options: dict[str, Any]) -> str:
    """The registry problem and its options as its cone program's ``repr`` shows them
    (:attr:`ConvexLayer.origin`): ``name='entmax', n=4, alpha=1.2``; options left at ``None`` are
    omitted, a number is shown as a Python number, names as given, an array or tensor by its shape."""
    def shown(v: Any) -> str:
        if isinstance(v, numbers.Real) and not isinstance(v, bool):  # (np.float32(1.2) as 1.2, not 1.2000000476837158)
            return repr(int(v) if isinstance(v, numbers.Integral) else float(str(v) if isinstance(v, np.floating)
                                                                              else v))
        if isinstance(v, torch.Tensor):
            return format_option(v)
        names = isinstance(v, (list, tuple)) and all(isinstance(e, str) for e in v)  # qp's learn=('G', 'h')
        return f"array of shape {np.shape(v)}" if isinstance(v, (list, tuple, np.ndarray)) and not names else repr(v)
    return ", ".join([f"name={name!r}"] + [f"{k}={shown(v)}" for k, v in options.items() if v is not None])
