"""What ``convexddn bench`` measures: one module per case family.

Each case function builds its inputs, times the operations with :mod:`..harness` and
returns rows (dicts) for :mod:`..report`. Times are per sample (one leading batch
element), beside mean pooling ``x.mean(-1)`` timed in the same run; the cone-program path
(``convexddn.layer(..., backend="cvxpy")``) runs a fixed number of rows and is scaled.
"""
from .common import CVXPY_ROWS, SHAPES
from .pooling import CONVEX_PENALTIES, POOL_PENALTIES, pool_cases
from .projection import PROJECTIONS, projection_cases
from .workers import workers_speedup

__all__ = ["CVXPY_ROWS", "SHAPES", "CONVEX_PENALTIES", "POOL_PENALTIES", "PROJECTIONS",
           "pool_cases", "projection_cases", "workers_speedup"]
