"""Fixtures shared by the node tests."""
from __future__ import annotations

import pytest


@pytest.fixture
def start_distances(monkeypatch):
    """The sizes in bytes of the (r, S, n) distances robust_vector_pool's start search forms
    (a spy on ``_vector_pool_starts.kappa``), appended as the test runs."""
    from convexddn.nodes import _vector_pool_starts as starts

    seen = []
    real = starts.kappa

    def recording(pen, z, a):
        if z.dim() == 3:  # the start search's (r, S, n) distances
            seen.append(z.numel() * z.element_size())
        return real(pen, z, a)

    monkeypatch.setattr(starts, "kappa", recording)
    return seen


@pytest.fixture
def tv_steps(monkeypatch):
    """The working set's row count at each active-set step of ``tv_denoise`` (a spy on
    ``_tv_solver._segment_ids``, called once per step), appended as the test runs."""
    import convexddn.nodes._tv_solver as tv  # where the active-set loop lives

    rows = []
    segments = tv._segment_ids
    monkeypatch.setattr(tv, "_segment_ids", lambda sigma, *a: rows.append(sigma.shape[0]) or segments(sigma, *a))
    return rows
