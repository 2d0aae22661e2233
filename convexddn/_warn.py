"""Warnings attributed to the caller's line, wherever in the library they are raised.

A fixed ``stacklevel`` counts frames, and the frames between a user's call and the
library's ``warnings.warn`` vary: ``torch.compiler.disable`` around ``ConvexLayer.forward``
added one (every ConvexLayer warning pointed at torch's ``eval_frame.py``), ``nn.Module``'s
call machinery, the autograd engine in a backward, cvxpylayers around the per-element
solve. :func:`warn` walks out of those instead, so module-specific warning filters and
the printed location name the user's own line.

:func:`suppressed` drops them in one thread for a while (a solve whose warnings a later
solve gives again): a ``warnings`` filter cannot, as the filter list is process-wide.
"""
from __future__ import annotations

import contextvars
from contextlib import AbstractContextManager
import functools
import importlib.util
import os
import sys
import warnings
from ._context import bound

__all__ = ["suppressed", "warn"]

# Packages whose frames are never the user's: this library (with the registry's problem
# builders, which an editable install keeps beside it), torch, and the solver stack.
_PACKAGES = ("convexddn", "convexddn.problems", "torch", "cvxpylayers", "cvxpy", "diffcp")


# Per thread (and asyncio task): ``warnings.catch_warnings()`` + ``simplefilter("ignore")``
# save and restore the process-wide filter list, so two threads inside at once left
# "ignore every warning" installed for good, and meanwhile dropped every other thread's.
_SUPPRESSED: contextvars.ContextVar[bool] = contextvars.ContextVar("convexddn_warnings_suppressed", default=False)


def suppressed() -> AbstractContextManager[None]:
    """Within: :func:`warn` does nothing in the calling thread; other threads, and
    warnings not raised through :func:`warn` (a user's own code, torch), are untouched."""
    return bound(_SUPPRESSED, True)


@functools.lru_cache(maxsize=1)
def _internal_prefixes() -> tuple[str, ...]:
    prefixes = []
    for name in _PACKAGES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        for path in (spec.submodule_search_locations or []) if spec is not None else []:
            prefixes.append(os.path.join(os.path.realpath(path), ""))
    return tuple(prefixes)


def warn(message: str, category: type[Warning], **attributes) -> None:
    """``warnings.warn(message, category)`` attributed to the first frame on the stack
    that is outside :data:`_PACKAGES` (the top frame if all are, e.g. in a worker thread);
    ``attributes`` are set on the warning instance (e.g. ``elements``, for callers that
    catch it); nothing inside :func:`suppressed`."""
    if _SUPPRESSED.get():
        return
    internal = _internal_prefixes()
    frame, level = sys._getframe(1), 2  # stacklevel 2: warn's caller
    while frame.f_back is not None and os.path.realpath(frame.f_code.co_filename).startswith(internal):
        frame, level = frame.f_back, level + 1
    if attributes:
        instance = category(message)
        for name, value in attributes.items():
            setattr(instance, name, value)
        warnings.warn(instance, stacklevel=level)
    else:
        warnings.warn(message, category, stacklevel=level)
