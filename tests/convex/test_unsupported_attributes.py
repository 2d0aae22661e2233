"""Parameters stored sparsely (diag=True, sparsity=) and complex variables: refused at construction by
ConvexLayer's own message, with a rewrite, and the rewrites solve."""
from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

import convexddn as cddn
from convexddn.errors import ProblemError

torch.set_num_threads(1)
M = 3
SOLVERS = ("auto", "Clarabel")
F64 = dict(dtype=torch.float64)


def _refused(prob, params, variables, match):
    """Construction raises ProblemError matching ``match`` on both paths, before any canonicalisation:
    not cvxpylayers' message, and no CVXPY RuntimeWarning (sparse ``.value``) from inside the layer."""
    for solver in SOLVERS:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            with pytest.raises(ProblemError, match=match) as err:
                cddn.ConvexLayer(prob, params, variables, solver=solver)
        assert "cvxpylayers" not in str(err.value)


def test_diag_parameter_refused_with_vector_rewrite_that_solves():
    """cvxpylayers refused it: "Parameter 'D' has a dimension-reducing attribute (diag, sparsity, or
    similar) that cvxpylayers does not yet handle", wrapped as "cvxpylayers cannot use this problem"."""
    D, q, x = cp.Parameter((M, M), diag=True, name="D"), cp.Parameter(M, name="q"), cp.Variable(M, name="x")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(D @ x - q)))
    _refused(prob, [D, q], [x], r"parameters\[0\] \(D, shape \(3, 3\)\) is declared diag=True.*"
                                r"vector parameter.*D_d = cp.Parameter\(3\).*cp.diag\(D_d\)")
    d = cp.Parameter(M, name="D_d")  # the rewrite the message gives
    dv, qv = torch.tensor([1.0, 2.0, 4.0], **F64), torch.tensor([1.0, 1.0, 2.0], **F64)
    for solver in SOLVERS:
        layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(cp.diag(d) @ x - q))), [d, q], [x],
                                 solver=solver)
        torch.testing.assert_close(layer(dv, qv), qv / dv, atol=1e-6, rtol=0)


def test_sparsity_parameter_refused_with_dense_or_vector_rewrite_that_solves():
    S, q, x = cp.Parameter((M, M), sparsity=([0, 1, 2], [0, 1, 2]), name="S"), cp.Parameter(M, name="q"), \
        cp.Variable(M, name="x")
    with warnings.catch_warnings():  # (CVXPY's own warning at problem construction, user code: not ours)
        warnings.simplefilter("ignore", RuntimeWarning)
        prob = cp.Problem(cp.Minimize(cp.sum_squares(S @ x - q)))
    _refused(prob, [S, q], [x], r"parameters\[0\] \(S, shape \(3, 3\)\) is declared with a sparsity pattern "
                                r"\(sparsity=\.\.\.\).*declare it dense, S = cp.Parameter\(\(3, 3\)\).*"
                                r"vector parameter.*cp.reshape\(E @ v")
    qv = torch.tensor([1.0, 1.0, 2.0], **F64)
    nz = torch.tensor([1.0, 2.0, 4.0], **F64)
    dense = cp.Parameter((M, M), name="S")
    v = cp.Parameter(M, name="v")
    E = np.zeros((M * M, M))
    for k, (r, c) in enumerate(zip([0, 1, 2], [0, 1, 2])):
        E[r + M * c, k] = 1.0  # (column-major position of entry (r, c))
    mapped = cp.reshape(E @ v, (M, M), order="F")
    for solver in SOLVERS:
        layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(dense @ x - q))), [dense, q], [x],
                                 solver=solver)
        torch.testing.assert_close(layer(torch.diag(nz), qv), qv / nz, atol=1e-6, rtol=0)
        layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(mapped @ x - q))), [v, q], [x],
                                 solver=solver)
        torch.testing.assert_close(layer(nz, qv), qv / nz, atol=1e-6, rtol=0)


def test_complex_variable_refused_with_split_rewrite_that_solves():
    """cvxpylayers: "Complex variables are not yet supported." (a returned one or not)."""
    q, z, x = cp.Parameter(M, name="q"), cp.Variable(M, complex=True, name="z"), cp.Variable(M, name="x")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(cp.real(z) - q) + cp.sum_squares(cp.imag(z))), [cp.abs(z) <= 1])
    match = (r"variable z \(shape \(3,\)\) is declared complex=True: ConvexLayer takes real variables only.*"
             r"z_re = cp.Variable\(\(3,\)\) and z_im = cp.Variable\(\(3,\)\).*z_re \+ 1j \* z_im")
    _refused(prob, [q], [z], match)
    hidden = cp.Problem(cp.Minimize(cp.sum_squares(x - q) + cp.sum_squares(cp.imag(z))),
                        [cp.abs(z) <= 1, cp.real(z) == x])
    _refused(hidden, [q], [x], match)  # not returned, still refused (by name)
    H, Q = cp.Variable((2, 2), hermitian=True, name="H"), cp.Parameter((2, 2), name="Q")
    _refused(cp.Problem(cp.Minimize(cp.sum_squares(cp.real(H) - Q)), [cp.abs(H) <= 1]), [Q], [H],
             r"variable H \(shape \(2, 2\)\) is declared hermitian=True.*H_re == H_re.T and H_im == -H_im.T")
    z_re, z_im = cp.Variable(M, name="z_re"), cp.Variable(M, name="z_im")  # the rewrite
    zz = z_re + 1j * z_im
    split = cp.Problem(cp.Minimize(cp.sum_squares(cp.real(zz) - q) + cp.sum_squares(cp.imag(zz))), [cp.abs(zz) <= 1])
    qv = torch.tensor([0.5, -0.25, 2.0], **F64)
    for solver in SOLVERS:
        re, im = cddn.ConvexLayer(split, [q], [z_re, z_im], solver=solver)(qv)
        torch.testing.assert_close(re, qv.clamp(-1, 1), atol=1e-6, rtol=0)
        torch.testing.assert_close(im, torch.zeros(M, **F64), atol=1e-6, rtol=0)
