"""``import convexddn.registry`` and ``from convexddn.registry import build``: the module
:mod:`convexddn.convex.registry` itself under the name its documentation uses (this
file puts that module in its own place in ``sys.modules``, so both names are one
module: one table of problems)."""
import sys

from .convex import registry as _registry

sys.modules[__name__] = _registry
