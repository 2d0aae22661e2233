"""The convex path: a CVXPY problem -> its cone program -> a checked solve -> the adjoint.

- :mod:`.layer`: :class:`ConvexLayer`, the batching adapter (a torch module);
- :mod:`.registry`: parametrized CVXPY problems built by name;
- :mod:`.cone`: cone-program maths shared by the backends (KKT residual, residual map);
- :mod:`.per_element`: the per-element backend (Clarabel/SCS/ECOS + Newton polish).

Names are imported on first access: listing the registry needs neither torch nor cvxpy.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["ConvexLayer", "ProblemSpec", "registry"]

_LAZY = {"ConvexLayer": ".layer", "ProblemSpec": ".registry"}


def __getattr__(name: str) -> Any:
    if name == "registry":
        value = importlib.import_module(".registry", __name__)
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from . import registry
    from .layer import ConvexLayer
    from .registry import ProblemSpec
