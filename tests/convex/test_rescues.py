"""The per-element backend's warning for elements another solver solved (:mod:`convexddn.convex.rescues`)."""
from __future__ import annotations

import warnings

from convexddn.convex.rescues import warn_rescued
from convexddn.errors import SolverWarning


def _caught(*args) -> list:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_rescued(*args)
    return [w.message for w in caught if issubclass(w.category, SolverWarning)]


def test_warn_rescued_groups_elements_by_cause():
    """Five elements of a (2, 4) batch (flat positions 1, 2, 4, 6, 7 there), two causes, notes that
    differ by the element's residual: one warning per cause, each naming its elements in the
    caller's batch shape (unravel of the flat positions: 2 -> (0, 2), 4 -> (1, 0), ...), with the
    first element's note as the example; an element without a note is not named."""
    where = ([1, 2, 4, 6, 7], (2, 4))
    kkt = "Clarabel: Solved (not accepted); solved by the fallback SCS"
    ecos = "ECOS: Solver ecos errored.; solved by the fallback SCS"
    notes = ["Clarabel: Solved (KKT residual 2.0e-04 > tol 1e-06); solved by the fallback SCS", ecos, None,
             "Clarabel: Solved (KKT residual 3.0e-03 > tol 1e-06); solved by the fallback SCS", ecos]
    said = _caught(where, notes, [kkt, ecos, None, kkt, ecos])
    assert len(said) == 2, [str(w) for w in said]
    first, second = said
    assert first.elements == [(0, 1), (1, 2)] and first.notes == [notes[0], notes[3]]
    assert str(first) == (f"ConvexLayer: 2 batch element(s) (batch indices [(0, 1), (1, 2)]) needed a fallback: "
                          f"{kkt}; e.g. batch indices [(0, 1)]: {notes[0]}")
    assert second.elements == [(0, 2), (1, 3)]
    assert str(second) == f"ConvexLayer: 2 batch element(s) (batch indices [(0, 2), (1, 3)]) needed a fallback: {ecos}"


def test_warn_rescued_names_the_first_20_and_lists_all():
    """25 elements of one cause, no caller's batch known: one warning, the count, the first 20
    flat indices and "...", every one in ``elements``; no notes, no warning."""
    note = "Clarabel: Failure; solved by SCS from its point"
    (said,) = _caught(None, [note] * 25, [note] * 25)
    assert str(said).startswith(f"ConvexLayer: 25 batch element(s) (flat indices {list(range(20))}, ...)")
    assert said.elements == list(range(25)) and "e.g." not in str(said)
    assert _caught(None, [None] * 3, [None] * 3) == []
