"""convexddn: deep declarative networks in PyTorch.

Layers defined by *what* they compute — the solution of an optimization problem,
``y(x) ∈ argmin_{u ∈ C(x)} f(x, u)`` — and differentiated implicitly (Gould, Hartley
& Campbell, "Deep Declarative Networks", TPAMI 2021):

- :class:`ConvexLayer`: a convex problem in CVXPY syntax as a torch module;
- :mod:`convexddn.registry` and :func:`layer`: problems built by name;
- :class:`RobustPool`, :class:`LpProjection`, :class:`SimplexProjection`: native,
  batched nodes with closed-form backward passes (:mod:`convexddn.functional`);
- :class:`DeclarativeNode`: write ``objective`` and ``solve``, get the backward.
"""
from . import errors, functional, registry
from .implicit import DeclarativeNode
from .layer import ConvexLayer
from .pooling import RobustPool
from .projection import LpProjection, SimplexProjection
from .registry import ProblemSpec

# `convexddn.layer(name, **options)` builds a registry problem as a ConvexLayer. It
# shadows the submodule of the same name as an attribute; import ConvexLayer from
# the package (or `from convexddn.layer import ConvexLayer`).
layer = registry.build_layer

__version__ = "0.1.0"

__all__ = [
    "ConvexLayer",
    "DeclarativeNode",
    "LpProjection",
    "ProblemSpec",
    "RobustPool",
    "SimplexProjection",
    "errors",
    "functional",
    "layer",
    "registry",
    "__version__",
]
