"""What the per-element path keeps of each batch element: its solve's result
(:class:`Solved`), what a call did (:class:`ElementInfo`) and, for the backward, the saved
states (:class:`SavedStates`)."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

__all__ = ["ElementInfo", "SavedStates", "Solved"]


@dataclasses.dataclass
class Solved:
    """One element's solve (:meth:`~.per_element.CheckedDiffcp.solve_one`); ``x``, ``y``, ``s``
    None where it failed."""

    program: Any
    x: np.ndarray | None
    y: np.ndarray | None
    s: np.ndarray | None
    solver: str
    status: str
    residual: float
    note: str | None
    kind: str = "solved"  # or "infeasible"/"unbounded" (certificate verified), "disputed" or "other"
    spread: float = 1.0  # data_spread of a solved element's cone program
    cause: str | None = None  # the note without the element's own numbers (see .rescues)
    condition: float = 0.0  # the polish's last dense solve's (see .cone.ILL_CONDITIONED)
    unit: tuple[float, float] | None = None  # (β, γ) where it was solved in its own unit (.own_unit)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["program"] = None  # holds C++ cones; workers return numbers only
        return state


class SavedStates(list):
    """Per-element saved states, and ``where`` (the elements' flat positions in the
    caller's batch and its shape, set by :class:`~.layer.ConvexLayer`) for messages."""

    where: tuple[Sequence[int], tuple[int, ...]] | None = None


@dataclasses.dataclass
class ElementInfo:
    """What one call of the backend did, per flat batch element (this thread's last call)."""

    solvers: list[str]
    statuses: list[str]
    residuals: list[float]
    solved: list[bool]
    kinds: list[str]
    spreads: list[float]  # each element's data spread, see data_spread
    conditions: list[float]  # each solved element's polish condition (ResidualMap.condition; 0: none)
