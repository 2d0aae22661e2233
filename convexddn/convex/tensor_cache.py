"""The fill of the layers' tensor caches (index arrays and maps copied to a device or
dtype once, kept on the :class:`~.cone_data.ConeData` and :class:`~.symmetric_cones.ConeLayout`).

A cache filled by a first call under ``torch.inference_mode()`` (an evaluation pass, a
server's warm-up) held inference tensors, and every later call with autograd failed
("Inference tensors cannot be saved for backward"): the entries are built with
inference mode off. Threads that miss at once each build one; ``setdefault`` (atomic)
publishes the first, and all of them use that one.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch

__all__ = ["cached"]

T = TypeVar("T")
_MISSING: Any = object()


def cached(cache: dict, key: Hashable, build: Callable[[], T]) -> T:
    """``cache[key]``, on a miss ``build()`` run outside inference mode and without grad."""
    value = cache.get(key, _MISSING)
    if value is _MISSING:
        with torch.inference_mode(False), torch.no_grad():
            value = cache.setdefault(key, build())
    return value
