"""Validation of user input shared by every layer and node.

Each check raises an error from :mod:`convexddn.errors` naming the argument, what was
expected and what came. The checks run on any device: the finiteness test reduces on
the tensor's own device and only the final boolean crosses to the host.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from .errors import DTypeError, NonFiniteError, OptionError, ShapeError


def check_tensor(name: str, value: Any) -> torch.Tensor:
    """Return ``value`` if it is a floating-point tensor, else raise ``DTypeError``."""
    if not isinstance(value, torch.Tensor):
        raise DTypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise DTypeError(
            f"{name} must have a floating-point dtype (float32 or float64), got {value.dtype}"
        )
    return value


def check_finite(name: str, value: torch.Tensor) -> None:
    """Raise ``NonFiniteError`` naming how many entries of ``value`` are NaN or Inf."""
    if value.numel() == 0:
        return
    bad = ~torch.isfinite(value)
    if bool(bad.any()):
        n_nan = int(torch.isnan(value).sum())
        n_inf = int(bad.sum()) - n_nan
        raise NonFiniteError(
            f"{name} must be finite, got {n_nan} NaN and {n_inf} Inf value(s) "
            f"among {value.numel()} (shape {tuple(value.shape)})"
        )


def check_positive(name: str, value: Any) -> None:
    """Raise ``OptionError`` unless ``value`` (a number or tensor) is finite and > 0."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 0:
            return
        ok = bool((torch.isfinite(value) & (value > 0)).all())
        shown = value.detach().flatten()[:4].tolist()
    else:
        try:
            ok = math.isfinite(float(value)) and float(value) > 0
        except (TypeError, ValueError):
            raise OptionError(f"{name} must be a positive number, got {value!r}") from None
        shown = value
    if not ok:
        raise OptionError(f"{name} must be finite and > 0, got {shown!r}")


def check_choice(name: str, value: Any, valid: Iterable[Any]) -> None:
    """Raise ``OptionError`` listing the valid choices when ``value`` is not one of them."""
    valid = list(valid)
    if value not in valid:
        raise OptionError(f"{name} must be one of {valid}, got {value!r}")


def normalize_dims(name: str, dim: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """Turn ``dim`` (an int or tuple, negative allowed) into sorted non-negative dims."""
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    if len(dims) == 0:
        raise OptionError(f"{name} must name at least one dimension, got {dim!r}")
    out = []
    for d in dims:
        if not isinstance(d, int) or not -ndim <= d < ndim:
            raise ShapeError(
                f"{name}={dim!r} is out of range for a tensor with {ndim} dimension(s)"
            )
        out.append(d % ndim)
    if len(set(out)) != len(out):
        raise OptionError(f"{name} must not repeat a dimension, got {dim!r}")
    return tuple(sorted(out))
