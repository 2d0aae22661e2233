"""The fill of the layers' tensor caches (index arrays and maps copied to a device or
dtype once, kept on the :class:`~.cone_data.ConeData` and :class:`~.symmetric_cones.ConeLayout`).

A cache filled by a first call under ``torch.inference_mode()`` (an evaluation pass, a
server's warm-up) held inference tensors, and every later call with autograd failed
("Inference tensors cannot be saved for backward"): the entries are built with
inference mode off. Threads that miss at once each build one; ``setdefault`` (atomic)
publishes the first, and all of them use that one.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch

__all__ = ["cached"]

T = TypeVar("T")
_MISSING: Any = object()


def cached(cache: dict, key: Hashable, build: Callable[[], T]) -> T:
    """``cache[key]``, on a miss ``build()`` run outside inference mode and without grad;
    inference tensors in what it returns (a ``.to()`` that changed nothing returns its
    input: a layer built under inference mode holds such tensors) are stored as copies."""
    value = cache.get(key, _MISSING)
    if value is _MISSING:
        with torch.inference_mode(False), torch.no_grad():
            value = cache.setdefault(key, _plain(build()))
    return value


def _plain(value: Any) -> Any:
    """``value`` with every inference tensor in it (directly, in a tuple or list, or a
    dataclass field) replaced by a normal copy."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.is_inference() else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(_plain(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _plain(getattr(value, f.name))
                                             for f in dataclasses.fields(value) if f.init})
    return value
