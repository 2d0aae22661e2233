"""Where ``solver="auto"`` sends a call: what the layer's last batched attempt showed.

The batched path certifies a solution by an estimate of its error, which a primal
degenerate vertex (more active constraints than variables: an assignment LP's vertices,
2k − 1 independent equalities and k² − k bounds at 0 in R^{k²}) does not have: its
limit KKT system is singular. Such elements end on the per-element path after one
batched attempt (:data:`~.measures.DEGENERATE`, :mod:`.second_opinion`), which on a
15 × 15 assignment LP at batch 8 cost 6–8 times the per-element solve itself: iterations,
polishes and active-set steps whose answer is thrown away.

Degeneracy of that kind is a property of the program's structure more than of its
values, so where a call's batched attempt certified none of its elements, every one
stuck at a degenerate vertex, the next calls in the same thread go straight to the
per-element path (:func:`straight_per_element`), and the batched path is tried again
after :data:`RETRY_EVERY` calls (new values may have left the degenerate vertices), then
after twice as many each time it certifies nothing again, up to :data:`RETRY_MOST`. The
results are the per-element path's either way for such elements (where the batched path
would now certify some, they come from the per-element solvers instead: both are checked
to the same tolerances). Forward mode (batched only), ``solver="batched"`` and programs
the per-element path cannot take never skip the batched path. ``layer.last_solve.backend``
shows where each element went.
"""
from __future__ import annotations

from typing import Any

from .measures import DEGENERATE

__all__ = ["RETRY_EVERY", "RETRY_MOST", "remember", "straight_per_element"]

#: Calls after which a layer skipping the batched path tries it again (doubled each time
#: the retry certifies nothing, up to RETRY_MOST).
RETRY_EVERY, RETRY_MOST = 8, 64


def straight_per_element(local: Any, after: bool) -> bool:
    """Whether this call skips the batched attempt (``local``: the layer's per-thread state,
    counting the calls since the attempt that certified nothing; ``after``: the per-element
    path would take what the attempt leaves, ``solver="auto"``); counts it."""
    skipped = getattr(local, "skipped", None)
    if not after or skipped is None:
        return False
    if skipped + 1 >= getattr(local, "interval", RETRY_EVERY):
        local.skipped = None  # (the batched path again: remember() decides from its answer)
        local.retried = True
        return False
    local.skipped = skipped + 1
    return True


def remember(local: Any, points: list[int], after: bool) -> None:
    """After a batched attempt whose leftovers go per element (``after``, as above): skip the
    next calls' attempts where every element (``points``: their bits from the batched
    checks) was a degenerate vertex the batched path could not certify."""
    if not after:
        return
    stuck = bool(points) and all(bits & DEGENERATE for bits in points)
    retried = getattr(local, "retried", False)
    local.skipped = 0 if stuck else None
    local.interval = min(2 * getattr(local, "interval", RETRY_EVERY), RETRY_MOST) if stuck and retried else RETRY_EVERY
    local.retried = False
