"""A context variable set within a block: the one form of the library's per-thread (and per
asyncio task) modes, such as warnings suppressed, a node Module being built, the name of the
node or the public function that errors name."""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import TypeVar

__all__ = ["bound"]

T = TypeVar("T")


@contextlib.contextmanager
def bound(var: contextvars.ContextVar[T], value: T) -> Iterator[None]:
    """Within: ``var`` holds ``value``; after, whatever it held before (also on an error)."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)
