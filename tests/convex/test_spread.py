"""The per-element path's doubt warnings (:mod:`convexddn.convex.spread`) list the elements
they name, as the layer's other warnings do: ``w.message.elements``, index tuples in the
caller's batch shape."""
import pytest

from convexddn.convex.cone import ILL_CONDITIONED, POLISH_ABOVE
from convexddn.convex.spread import warn_unchecked_spread, warn_unconfirmed
from convexddn.errors import SolverWarning

# Flat positions 0..3 of the solve sit at flat positions 5, 2, 7, 0 of a caller's (2, 4) batch.
WHERE = ([5, 2, 7, 0], (2, 4))


def test_unconfirmed_warnings_list_their_elements():
    """Element 1 polished to rounding along an ill-conditioned direction, elements 0 and 3
    left above rounding: two warnings, each listing its own elements."""
    residuals = [10 * POLISH_ABOVE, 0.0, 0.0, 100 * POLISH_ABOVE]
    conditions = [1.0, 10 * ILL_CONDITIONED, 1.0, 1.0]
    with pytest.warns(SolverWarning) as got:
        warn_unconfirmed(WHERE, [0, 1, 3], residuals, True, conditions)
    by_text = {("is polished to rounding" in str(w.message)): w.message.elements for w in got}
    assert by_text == {True: [(0, 2)], False: [(1, 1), (0, 0)]}
    # (its advice fits a program without constraints of its own too: a group-lasso proximal map
    # at data ~1e6, whose cone program's constraints are CVXPY's norm epigraphs, was told to
    # "rescale or reformulate the constraints"; rescaled by 1e-6 it is exact)
    ill = next(str(w.message) for w in got if "is polished to rounding" in str(w.message))
    assert "data far from unit size" in ill and "rescale the data nearer unit size" in ill, ill


def test_spread_warning_lists_its_elements():
    with pytest.warns(SolverWarning, match="data spans") as got:
        warn_unchecked_spread(WHERE, [2, 3], [1.0, 1.0, 1e13, 1e12])
    assert [w.message.elements for w in got] == [[(1, 3), (0, 0)]]
