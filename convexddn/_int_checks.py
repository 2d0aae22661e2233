"""Integer options (sizes, iteration counts): one validator, re-exported by :mod:`._checks`.

Each raises :class:`~convexddn.errors.OptionError` naming the option, the accepted range and
what came (a huge integer by its number of digits).
"""
from __future__ import annotations

import numbers
from typing import Any

from .errors import OptionError

__all__ = ["MAX_ITERATIONS", "MAX_SIZE", "check_count", "check_int", "check_size"]


#: The largest size option (dimension, count, rank) accepted: what a 32-bit index holds.
#: Larger values only fail later, inside NumPy, cvxpy or torch, with errors naming neither
#: the option nor the fix.
MAX_SIZE = 2**31 - 1


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return ``value`` if it is an integer (not a bool) in ``[minimum, maximum]`` (each
    bound optional), else raise ``OptionError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise OptionError(f"{name} must be an integer, got {value!r}")
    too_small = minimum is not None and value < minimum
    if too_small or maximum is not None and value > maximum:
        lo = "" if minimum is None else f" >= {minimum}"
        hi = "" if maximum is None else f"{' and' if lo else ''} <= {maximum}"
        shown = repr(value) if abs(value) < 10**30 else f"an integer of {len(str(abs(int(value))))} digits"
        raise OptionError(f"{name} must be an integer{lo}{hi}, got {shown}")
    return int(value)


#: The largest iteration count (``max_iter``, a budget) accepted: what an int64 holds. The
#: solvers compare their counts in int64 tensors, and a larger Python int there raised a
#: raw ``OverflowError`` (``sinkhorn(C, max_iter=10**20)``) where other solvers ran.
MAX_ITERATIONS = 2**63 - 1


def check_count(name: str, value: Any, minimum: int = 1) -> int:
    """An iteration count or budget: an integer in ``[minimum, MAX_ITERATIONS]``."""
    return check_int(name, value, minimum=minimum, maximum=MAX_ITERATIONS)


def check_size(name: str, value: Any, minimum: int = 1) -> int:
    """A size option (dimension, count, rank): an integer in ``[minimum, MAX_SIZE]``."""
    return check_int(name, value, minimum=minimum, maximum=MAX_SIZE)
