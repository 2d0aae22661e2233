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


@pytest.mark.parametrize("args,names", [
    ((torch.rand(2, 6),), r"x \(4,\), target \(2,\) do not broadcast \(shapes passed: x \(4, 3, 6\) = \(\*, C, T\), "
                          r"target \(2, 6\) = \(\*, T\)\)$"),
    ((torch.arange(6.0), torch.rand(3, 6)),
     r"x \(4,\), target \(\), weights \(3,\) do not broadcast \(shapes passed: "
     r"x \(4, 3, 6\) = \(\*, C, T\), target \(6,\) = \(\*, T\), weights \(3, 6\)"),
    ((torch.arange(6.0), None, torch.rand(3)),
     r"x \(4,\), target \(\), ridge \(3,\) do not broadcast .*ridge \(3,\) = \(\*\)"),
], ids=["target", "weights", "ridge"])
def test_linear_fit_batch_shape_errors_name_its_own_arguments(args, names):
    """They named least_squares' A and b with internally reshaped shapes ("the batch
    shapes of A (4,), b (1,), ridge () do not broadcast" for a shared target (6,))."""
    from convexddn.errors import ShapeError

    x = torch.randn(4, 3, 6)
    with pytest.raises(ShapeError, match=r"^the batch shapes \(\*\) of " + names) as err:
        linear_fit(x, *args)
    assert " A " not in str(err.value) and " b " not in str(err.value)


def test_linear_fit_broadcasts_batch_shapes_as_before():
    """Batch shapes that broadcast still do: a shared target (T,) and a ridge (B, 1)
    against x (B, C', C, T) give the per-element fits (closed form: the normal equations)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 9, dtype=torch.float64, generator=g)
    t = torch.arange(9.0, dtype=torch.float64)
    ridge = torch.tensor([[0.5], [2.0]], dtype=torch.float64)
    fit = linear_fit(x, t, None, ridge, bias=False)
    for i in range(2):
        for j in range(3):
            A = x[i, j].T
            want = torch.linalg.solve(A.T @ A + ridge[i, 0] * torch.eye(4, dtype=torch.float64), A.T @ t)
            torch.testing.assert_close(fit.coef[i, j], want)


@pytest.mark.parametrize("x_dtype,target,top,over", [
    (torch.float32, torch.tensor([1e40, 2e40, 3e40, 4e40], dtype=torch.float64), r"3\.40282e\+38", 4),
    (torch.float16, torch.tensor([7e4, 1.0, 2.0, 3.0]), "65504", 1),
], ids=["float64-into-float32", "float32-into-float16"])
@pytest.mark.parametrize("call", ["linear_fit", "LeastSquares", "WeightedLeastSquares"])
def test_linear_fit_target_beyond_x_dtype_names_target(x_dtype, target, top, over, call):
    """A finite target that overflows in the documented cast to x's dtype became Inf and was
    reported as least_squares' b ("b must be finite, got 0 NaN and 4 Inf ... (shape (1, 4))"):
    an argument and a shape the caller never passed. (Ranges: IEEE binary32 and binary16.)"""
    from convexddn.errors import InputError, NonFiniteError

    x = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0)).to(x_dtype)
    fit = {"linear_fit": lambda: linear_fit(x, target),
           "LeastSquares": lambda: LeastSquares()(x, target),
           "WeightedLeastSquares": lambda: WeightedLeastSquares()(x, target, torch.ones(4, dtype=x_dtype))}[call]
    with pytest.raises(InputError, match=rf"^target must fit x's dtype {x_dtype} .*±{top}; got "
                                         rf"{over} of 4 .*shape \(4,\)") as err:
        fit()
    assert not isinstance(err.value, NonFiniteError) and "b " not in str(err.value)


@pytest.mark.parametrize("ridge", [1e-40, 1e-33, 1e-300])
def test_linear_fit_tiny_ridge_on_a_constant_feature_is_not_blamed_on_the_weights(ridge):
    """A constant feature is collinear with the intercept's column of ones: with a ridge
    too small to register the design is singular to float64 precision, and every weight
    is 1. It was reported as "the weights are all zero ... no ridge helps" (ridge 1e-40,
    1e-33); least_squares' rank-deficiency advice (a larger ridge) is the right one: with
    ridge 1e-3 the fit is the closed form coef 0, intercept mean(t) = 4."""
    x = torch.ones(1, 1, 9, dtype=torch.float64)
    t = torch.arange(9.0, dtype=torch.float64)
    w = torch.ones(1, 9, dtype=torch.float64)
    with pytest.raises(SolverError, match=r"rank deficient.*pass ridge > 0 \(or a larger one\)") as err:
        linear_fit(x, t, w, ridge=ridge)
    assert "all zero" not in str(err.value)
    fit = linear_fit(x, t, w, ridge=1e-3)
    torch.testing.assert_close(fit.intercept, torch.tensor([4.0], dtype=torch.float64))


def test_linear_fit_all_zero_weights_with_a_tiny_ridge_say_so():
    """Weights all zero for one element of two leave its intercept undetermined whatever
    the ridge: a ridge of 1e-300 was cast to float32 (0) and got least_squares' advice
    "pass ridge > 0" instead (it is > 0)."""
    x = torch.randn(2, 2, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w = torch.ones(2, 9, dtype=torch.float64)
    w[1] = 0
    with pytest.raises(SolverError, match=r"the weights are all zero for 1 batch element\(s\) \(indices into the batch of x, weights and ridge \[\(1,\)\]\)"):
        linear_fit(x, torch.arange(9.0, dtype=torch.float64), w, ridge=1e-300)
