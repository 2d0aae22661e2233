"""The per-element backend's ``SolverWarning`` for elements that another solver solved.

Where the first solver fails on an element and the fallback (or SCS warm-started from the
first solver's point, or a re-solve at a certificate's reach) solves it, the caller is told
(DESIGN: "make fallbacks visible"). Told once per call and cause, naming all the elements,
as the layer's other warnings do: one warning per element gave a batch of 64 sixty-four
warnings per call, each naming one element. Elements are grouped by a *cause* that leaves
out each element's own numbers (its KKT residual, the size of its point), so that a
failure of the same kind on many elements is one warning; each element's full note is
kept on the warning as ``notes``.
"""
from __future__ import annotations

from typing import Sequence

from .._warn import warn
from ..errors import SolverWarning
from .status import element_list, name_elements

__all__ = ["failure_cause", "warn_rescued"]


def failure_cause(fail: tuple) -> str:
    """What a failed run of :meth:`~.per_element.CheckedDiffcp._try` (``(message, kind,
    claim, run)``) comes to without the element's own numbers: the error the solver raised
    (``run`` is ``None`` only then, and ``message`` is ``"<solver>: <error>"``), else the
    solver's status, which the checks did not accept (its residual or certificate: the
    element's note says which, with its numbers)."""
    run = fail[3]
    return fail[0] if run is None else f"{run.method}: {run.status} (not accepted)"


def warn_rescued(where: tuple[Sequence[int], tuple[int, ...]] | None, notes: Sequence[str | None],
                 causes: Sequence[str | None]) -> None:
    """One ``SolverWarning`` per distinct cause among the elements with a note.

    Args:
        where: the elements' flat positions in the caller's batch and its shape (``None``:
            flat indices of this solve), as :func:`~.status.name_elements` takes it.
        notes: per element of the solve, ``None`` or what happened to it (with its numbers).
        causes: per element, the key it is grouped by (:func:`failure_cause` and how it
            was solved); an element with a note and no cause is grouped by its note.

    Each warning names the count and the first 20 elements, and says their note where they
    share one, else the cause and the first element's note as an example; its
    ``elements`` attribute lists every element (index tuples in the caller's batch shape),
    ``notes`` their notes in the same order.
    """
    groups: dict[str, list[int]] = {}
    for i, note in enumerate(notes):
        if note is not None:
            groups.setdefault(causes[i] or note, []).append(i)
    for cause, idx in groups.items():
        said = [notes[i] for i in idx]
        # One note for all (one element, or no numbers in it): that note; else the cause and an example.
        text = said[0] if len(set(said)) == 1 else f"{cause}; e.g. {name_elements(where, idx[:1])}: {said[0]}"
        warn(f"ConvexLayer: {len(idx)} batch element(s) ({name_elements(where, idx)}) needed a fallback: {text}",
             SolverWarning, elements=element_list(where, idx), notes=said)
