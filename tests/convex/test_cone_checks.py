"""Certificates of the per-element path (:func:`convexddn.convex.cone_checks.verify_certificate`)."""
from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch

import convexddn as cddn
from convexddn.errors import InfeasibleError


def test_a_valid_ray_whose_small_entries_balance_other_rows_verifies():
    """g·y <= -1 and -g·y <= -1 (infeasible) beside equality rows, data of order 1:
    Clarabel's ray has entries of ~1e-7 on rows it uses; dropped as noise, its columns were
    3e-6 off and the certificate was called unverified ("the data may be badly scaled")."""
    rng = np.random.default_rng(3)
    n, p, mi = 4, 2, 3
    L, q = cp.Parameter((n, n)), cp.Parameter(n)
    E, f, G, h = cp.Parameter((p, n)), cp.Parameter(p), cp.Parameter((mi, n)), cp.Parameter(mi)
    y = cp.Variable(n)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(L @ y) + q @ y), [E @ y == f, G @ y <= h])
    Lt, qt = torch.tensor(rng.standard_normal((2, 3, n, n))), torch.tensor(rng.standard_normal((2, 3, n)))
    Et, ft = torch.tensor(rng.standard_normal((2, 3, p, n))), torch.tensor(rng.standard_normal((2, 3, p)))
    Gt, ht = torch.tensor(rng.standard_normal((2, 3, mi, n))), torch.tensor(rng.random((2, 3, mi)))
    Gt[1, 0, 1] = -Gt[1, 0, 0]
    ht[1, 0, :2] = -1.0
    values = [t[1, 0] for t in (Lt, qt, Et, ft, Gt, ht)]
    layer = cddn.ConvexLayer(prob, parameters=[L, q, E, f, G, h], variables=[y], solver="Clarabel", fallback=None)
    with pytest.raises(InfeasibleError, match="Clarabel: Infeasible.*certificate verified") as err:
        layer(*values)
    assert "does not verify" not in str(err.value)
