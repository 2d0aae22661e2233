"""Tests of convexddn.nodes.linear_fit's modules that the least-squares tests
(tests/nodes/test_least_squares.py) leave out: how they show their options."""
from __future__ import annotations

import pytest
import torch

from convexddn.errors import SolverError
from convexddn.nodes.linear_fit import LeastSquares, WeightedLeastSquares, linear_fit


def test_least_squares_module_repr_tensor_ridge():
    """A tensor ridge shows its value (0-d), Parameter(value) (learnable) or its shape."""
    assert repr(LeastSquares(ridge=torch.tensor(0.5))) == "LeastSquares(ridge=0.5, bias=True)"
    learned = WeightedLeastSquares(ridge=torch.nn.Parameter(torch.tensor(0.05, dtype=torch.float64)), bias=False)
    assert repr(learned) == "WeightedLeastSquares(ridge=Parameter(0.05), bias=False)"
    assert repr(LeastSquares(ridge=torch.full((2, 1), 0.1))) == "LeastSquares(ridge=tensor of shape (2, 1), bias=True)"
    assert repr(LeastSquares(ridge=1e-3)) == "LeastSquares(ridge=0.001, bias=True)"


def test_linear_fit_without_vectors_says_so():
    # T = 0 and no weights: the message blamed "weights that are all zero" (none passed).
    x = torch.zeros(2, 3, 0, dtype=torch.float64)
    with pytest.raises(SolverError, match="there are no vectors"):
        linear_fit(x, torch.zeros(2, 0, dtype=torch.float64))
