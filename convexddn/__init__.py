"""convexddn: deep declarative networks in PyTorch.

Layers defined by *what* they compute — the solution of an optimization problem,
``y(x) ∈ argmin_{u ∈ C(x)} f(x, u)`` — and differentiated implicitly (Gould, Hartley
& Campbell, "Deep Declarative Networks", TPAMI 2021):

- :class:`ConvexLayer` (:mod:`convexddn.convex`): a convex problem in CVXPY syntax as
  a torch module;
- :mod:`convexddn.registry` and :func:`layer`: problems built by name, as the fastest
  exact layer (a native node where one exists);
- :class:`RobustPool`, :class:`LpProjection`, :class:`SimplexProjection`: native,
  batched nodes with closed-form backward passes (:mod:`convexddn.nodes`,
  :mod:`convexddn.functional`);
- :class:`DeclarativeNode`: write ``objective`` and ``solve``, get the backward.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# Public name -> the module that defines it. Imported on first access, so that
# `import convexddn` (and `convexddn --help`) does not pay for torch, cvxpy and the
# solvers until a layer is used.
_LAZY = {
    "ConvexLayer": ".convex",
    "ProblemSpec": ".convex",
    "registry": ".convex",
    "CvxpyLayer": ".convex.compat",
    "layer": ".factory",
    "DeclarativeNode": ".nodes",
    "LpProjection": ".nodes",
    "RobustPool": ".nodes",
    "SimplexProjection": ".nodes",
    "EigenDecomposition": ".nodes",
    "LeastSquares": ".nodes",
    "WeightedLeastSquares": ".nodes",
    "RobustVectorPool": ".nodes",
    "PnP": ".nodes",
    "OptimalTransport": ".nodes",
    "Entmax": ".nodes",
    "TotalVariation1d": ".nodes",
    "TridiagonalSolve": ".nodes",
}
_SUBMODULES = ("errors", "functional", "testing", "convex", "nodes", "bench", "experiments")

__all__ = [
    "ConvexLayer",
    "CvxpyLayer",
    "DeclarativeNode",
    "EigenDecomposition",
    "Entmax",
    "LeastSquares",
    "LpProjection",
    "OptimalTransport",
    "PnP",
    "ProblemSpec",
    "RobustPool",
    "RobustVectorPool",
    "SimplexProjection",
    "TotalVariation1d",
    "TridiagonalSolve",
    "WeightedLeastSquares",
    "errors",
    "functional",
    "layer",
    "registry",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'convexddn' has no attribute {name!r}")
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))


if TYPE_CHECKING:  # for type checkers and documentation tools: the eager imports
    from . import errors, functional
    from .convex import ConvexLayer, ProblemSpec, registry
    from .convex.compat import CvxpyLayer
    from .factory import layer
    from .nodes import (
        DeclarativeNode,
        EigenDecomposition,
        Entmax,
        LeastSquares,
        LpProjection,
        OptimalTransport,
        PnP,
        RobustPool,
        RobustVectorPool,
        SimplexProjection,
        TotalVariation1d,
        TridiagonalSolve,
        WeightedLeastSquares,
    )
