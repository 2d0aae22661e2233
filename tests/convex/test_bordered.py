"""The per-element path's sparse solves (:mod:`convexddn.convex.bordered`): the sparse
derivative against diffcp's dense one, the bordered LU's solutions against numpy's
minimum-norm least squares, its refusal of a lower rank, and a layer using it against
a closed form."""
from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from cvxpy.reductions.solvers.conic_solvers.scs_conif import dims_to_solver_dict
from diffcp import _diffcp
from diffcp import cones as cone_lib

import convexddn as cddn
from convexddn.convex import bordered as bordered_module
from convexddn.convex.bordered import bordered, probes, sparse_derivative, sparse_pays
from convexddn.convex.cone import auto_mode

F64 = torch.float64


def _mixed_program():
    """A program with every cone diffcp knows but the power cone: (A, b, c, cones)."""
    x = cp.Variable(4)
    X = cp.Variable((3, 3), symmetric=True)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x) - cp.sum(cp.log(x[:2] + 2)) + cp.trace(X) + cp.norm(x, 2)),
                      [cp.sum(x) == 1, x >= -1, X >> 0, X[0, 1] == 0.3, cp.abs(x[2]) <= 2])
    data, _, _ = prob.get_problem_data(cp.SCS)
    cones = cone_lib.parse_cone_dict(dims_to_solver_dict(data["dims"]))
    return data["A"], data["b"], data["c"], cones


@pytest.mark.parametrize("w", [0.7, -0.4])
def test_sparse_derivative_is_diffcps_dense_one(w):
    A, b, c, cones = _mixed_program()
    assert {kind for kind, _ in cones} >= {cone_lib.ZERO, cone_lib.POS, cone_lib.SOC, cone_lib.PSD, cone_lib.EXP}
    m, n = A.shape
    Q = sp.csc_matrix(sp.bmat([[None, A.T, c[:, None]], [-A, None, b[:, None]], [-c[None, :], -b[None, :], None]]))
    z = np.sin(np.arange(1, n + m + 2) * 1.7)  # generic: every cone's derivative in its general case
    z[-1] = w
    cpp = cone_lib.parse_cone_dict_cpp(cones)
    got = sparse_derivative(Q, _diffcp.dprojection(z[n:n + m], cpp, True), probes(cones), z, n).toarray()
    want = _diffcp.M_dense(Q.toarray(), cpp, z[:n], z[n:n + m], float(z[-1]))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-14)


def _singular(N: int, null: int, seed: int = 0):
    """A sparse N×N matrix with exactly ``null`` null directions, the first along z."""
    rng = np.random.default_rng(seed)
    M0 = sp.random(N, N, density=0.05, random_state=seed, format="csc") + sp.identity(N) * 3.0
    z = rng.standard_normal(N)
    basis, _ = np.linalg.qr(np.column_stack([z] + [rng.standard_normal(N) for _ in range(null - 1)]))
    M = sp.csc_matrix(M0 @ (np.eye(N) - basis @ basis.T))
    return M, z


@pytest.mark.parametrize("transpose", [False, True])
def test_bordered_solves_are_the_minimum_norm_ones(transpose):
    M, z = _singular(60, 1)
    dense = M.toarray()
    op = dense.T if transpose else dense
    rhs = op @ np.cos(np.arange(60.0))  # consistent: in the range
    lu = bordered(M, z, 1e-9)
    assert lu is not None
    got, residual = lu.solve(rhs, transpose)
    want = np.linalg.pinv(op) @ rhs
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())
    assert residual < 1e-13


def test_a_lower_rank_is_left_to_the_least_squares_solvers():
    # Two null directions: the bordered matrix is singular (or nearly, in rounding).
    M, z = _singular(60, 2)
    assert bordered(M, z, 1e-9) is None


def test_the_fill_rule():
    # One long second-order cone (a squared objective) makes M dense: LSMR; many small
    # exponential cones keep it sparse; small programs stay dense.
    long_soc = [(cone_lib.ZERO, 10), (cone_lib.POS, 500), (cone_lib.SOC, [514])]
    small = [(cone_lib.ZERO, 1), (cone_lib.EXP, 300)]
    assert not sparse_pays(long_soc, 3000, 2000) and auto_mode(long_soc, 3000, 2000) == "lsmr"
    assert sparse_pays(small, 1500, 1500) and auto_mode(small, 1500, 1500) == "sparse"
    assert auto_mode(small, 1500, 400) == "dense"


def test_layer_with_sparse_adjoint_is_softmax(monkeypatch):
    """The entropy-regularised simplex projection, argmin −H(y) − θᵀy over Σy = 1, is
    softmax(θ); its Jacobian diag(p) − ppᵀ. Exponential cones: the per-element path, with
    the bordered LU doing the polish and the adjoint (spied: not a fallback)."""
    n = 40
    th, y = cp.Parameter(n), cp.Variable(n)
    prob = cp.Problem(cp.Minimize(-cp.sum(cp.entr(y)) - th @ y), [cp.sum(y) == 1])
    solves = []
    real = bordered_module.Bordered.solve
    monkeypatch.setattr(bordered_module.Bordered, "solve", lambda self, *a: solves.append(a[-1]) or real(self, *a))
    layer = cddn.ConvexLayer(prob, [th], [y], solver="Clarabel", adjoint="sparse")
    theta = torch.randn(2, n, dtype=F64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    g = torch.randn(2, n, dtype=F64, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = layer(theta)
        (grad,) = torch.autograd.grad(out, theta, g)
    p = torch.softmax(theta.detach(), -1)
    # (Clarabel's exponential-cone points polish to ~1e-8 here, in every adjoint mode.)
    torch.testing.assert_close(out.detach(), p, atol=1e-7, rtol=0)
    torch.testing.assert_close(grad, p * g - p * (p * g).sum(-1, keepdim=True), atol=1e-7, rtol=0)
    assert False in solves and True in solves  # Newton steps and adjoints, both through the LU


def test_a_backend_pickled_before_the_sparse_mode_still_solves():
    """State saved without ``_colours`` (before this mode existed): restored as None, the
    residual map reads the probes itself."""
    n = 6
    th, y = cp.Parameter(n), cp.Variable(n)
    prob = cp.Problem(cp.Minimize(-cp.sum(cp.entr(y)) - th @ y), [cp.sum(y) == 1])
    layer = cddn.ConvexLayer(prob, [th], [y], solver="Clarabel", adjoint="sparse")
    theta = torch.randn(2, n, dtype=F64, generator=torch.Generator().manual_seed(0))
    layer(theta)
    state = layer._backend.__getstate__()
    del state["_colours"]
    layer._backend.__setstate__(state)
    assert layer._backend._colours is None
    torch.testing.assert_close(layer(theta), torch.softmax(theta, -1), atol=1e-13, rtol=0)
