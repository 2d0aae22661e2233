"""The per-element path's sparse solves (:mod:`convexddn.convex.bordered`): the sparse
derivative against diffcp's dense one, the bordered LU's solutions against numpy's
minimum-norm least squares, its refusal of a lower rank (a structurally singular matrix
before SuperLU sees it), and a layer using it against a closed form."""
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
from scipy.sparse.csgraph import structural_rank

import convexddn as cddn
from convexddn.convex import bordered as bordered_module
from convexddn.convex.bordered import (
    bordered,
    probes,
    sparse_derivative,
    sparse_pays,
    structurally_singular,
)
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


def _refusing_splu(monkeypatch) -> list[bool]:
    """Replace SuperLU by a spy that records, per call, whether the matrix handed to it is
    structurally singular (scipy's maximum matching on its nonzeros), and refuses those as
    SuperLU does when it survives them (RuntimeError: exactly singular) without calling it:
    on such a matrix it wrote through row indices it never set, a segmentation fault."""
    seen = []
    real = bordered_module.sla.splu

    def spy(A, *args, **kwargs):
        pattern = sp.csc_matrix(A, copy=True)
        pattern.eliminate_zeros()
        seen.append(bool(structural_rank(pattern) < A.shape[0]))
        if seen[-1]:
            raise RuntimeError("Factor is exactly singular")
        return real(A, *args, **kwargs)

    monkeypatch.setattr(bordered_module.sla, "splu", spy)
    return seen


def test_structural_singularity_is_read_off_the_nonzeros():
    # A permuted diagonal: a perfect matching; two rows on one column: none (explicit zeros are zeros).
    perm = sp.csc_matrix((np.arange(1.0, 6.0), ([3, 0, 4, 1, 2], [0, 1, 2, 3, 4])), shape=(5, 5))
    assert not structurally_singular(perm)
    stored_zero = perm.copy()
    stored_zero.data[0] = 0.0  # column 0's one entry, kept in the pattern
    assert stored_zero.nnz == 5 and structurally_singular(stored_zero)
    clash = sp.csc_matrix((np.ones(5), ([0, 1, 2, 3, 4], [0, 0, 2, 3, 4])), shape=(5, 5))
    assert structurally_singular(clash)


def test_a_structurally_singular_bordered_matrix_never_reaches_superlu(monkeypatch):
    """Four rows of M supported on two columns: with the border's one extra column, four
    rows share three, so every matrix of that pattern is singular."""
    seen = _refusing_splu(monkeypatch)
    M, z = _singular(40, 1)
    M = sp.lil_matrix(M)
    M[:4, :] = 0.0
    M[:4, :2] = np.arange(1.0, 9.0).reshape(4, 2)
    M = sp.csc_matrix(M)
    assert bordered(M, z, 1e-9) is None
    assert seen == []
    assert bordered(*_singular(40, 1), 1e-9) is not None and seen == [False]  # (the spy passes the others on)


def test_entmax_polish_hands_superlu_no_structurally_singular_matrix(monkeypatch):
    """1.5-entmax of 100 N(0, 1) scores through CVXPY (the per-element path's sparse mode):
    9 of its 10 bordered matrices had structural rank 972 to 995 of 1003 (the inactive
    coordinates) and one killed the process inside SuperLU. The native entmax is the
    reference (bisection on its threshold)."""
    seen = _refusing_splu(monkeypatch)
    x = torch.randn(100, dtype=F64, generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cddn.errors.SolverWarning)  # (a polish left above rounding)
        got = cddn.layer("entmax", n=100, alpha=1.5, backend="cvxpy")(x)
    assert True not in seen
    torch.testing.assert_close(got, cddn.layer("entmax", n=100, alpha=1.5)(x), atol=1e-8, rtol=0)


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


def test_badly_scaled_rank_is_decided_in_equilibrated_units():
    """M of rank N − 1 with rows and columns scaled by 1e-3 to 1e3 (as a QP whose data were scaled
    so: its bordered matrix read as singular in its own units, and LSMR's inexact Newton steps
    left the polish 2.7e-4 off): the LU of the equilibrated bordered matrix solves it, to the
    minimum-norm solutions computed from its null vectors in closed form, and reports the
    equilibrated condition."""
    N = 60
    M0, z0 = _singular(N, 1)  # M0 = K P, K nonsingular, P = I − ẑ0 ẑ0ᵀ
    K = sp.random(N, N, density=0.05, random_state=0, format="csc") + sp.identity(N) * 3.0
    np.testing.assert_allclose(M0.toarray(), K.toarray() @ (np.eye(N) - np.outer(z0, z0) / (z0 @ z0)), atol=1e-12)
    rng = np.random.default_rng(3)
    d_row, d_col = 10.0 ** rng.uniform(-3, 3, N), 10.0 ** rng.uniform(-3, 3, N)
    M = sp.csc_matrix(sp.diags(d_row) @ M0 @ sp.diags(d_col))
    z = z0 / d_col  # M z = D_r M0 z0 = 0
    y = np.linalg.solve(K.toarray().T, z0) / d_row  # Mᵀ y = D_c P Kᵀ D_r y = D_c P z0 = 0
    dense = M.toarray()
    zhat = z / np.linalg.norm(z)
    assert np.linalg.cond(np.block([[dense, zhat[:, None]], [zhat[None, :], np.zeros((1, 1))]])) > 1e10
    lu = bordered(M, z, 1e-9)
    assert lu is not None and lu.condition < 1e6
    t = np.cos(np.arange(N) * 0.7)
    for transpose, null in ((False, z), (True, y)):
        rhs = (dense.T if transpose else dense) @ t
        want = t - (null @ t) / (null @ null) * null  # the solution orthogonal to the null space
        got, residual = lu.solve(rhs, transpose)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * np.abs(want).max())
        assert residual < 1e-12
