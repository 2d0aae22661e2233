"""Eigen decomposition of symmetric matrices as a declarative node.

The top-k eigenvectors of a symmetric matrix solve the trace maximisation

.. math::

    U(X) \\in \\operatorname*{argmax}_{U \\in \\mathbb{R}^{N \\times k},\\ U^\\top U = I_k}
    \\operatorname{tr}(U^\\top X U),

whose KKT conditions :math:`X U = U \\Lambda` make each column an eigenvector
:math:`v_i` with eigenvalue :math:`\\lambda_i`. The forward pass is one batched
``torch.linalg.eigh``; the backward pass differentiates the optimality conditions
:math:`(X - \\lambda_i I) v_i = 0,\\ v_i^\\top v_i = 1` implicitly (Gould et al., TPAMI
2021, Prop. 4.5), which gives

.. math::

    \\mathrm{d}v_i = -(X - \\lambda_i I)^{+}\\, \\mathrm{d}X\\, v_i
                = \\sum_{j \\ne i} \\frac{v_j^\\top \\mathrm{d}X\\, v_i}{\\lambda_i - \\lambda_j}\\, v_j,
    \\qquad \\mathrm{d}\\lambda_i = v_i^\\top \\mathrm{d}X\\, v_i .

For all k columns at once the vector–Jacobian product is one pair of batched matrix
products: with :math:`V` all eigenvectors, :math:`G` the incoming gradient of the k
selected ones and :math:`g` that of their eigenvalues,

.. math::

    \\bar X = \\operatorname{sym}\\!\\big(V\\, (F \\circ V^\\top G + E_g)\\, V_k^\\top\\big),
    \\qquad F_{ji} = \\frac{1}{\\lambda_i - \\lambda_j}\\ (j \\ne i),\\ F_{ii} = 0,

where :math:`E_g` puts :math:`g_i` at the position of :math:`v_i` and
:math:`\\operatorname{sym}(A) = (A + A^\\top)/2` (the forward symmetrises its input).

Public names: :func:`eigen_decomposition`, :class:`EigenDecomposition`,
:class:`EigenResult`.

References:
    S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks", IEEE TPAMI 2021.
    J. R. Magnus, "On differentiating eigenvalues and eigenvectors", Econometric
    Theory 1(2), 1985.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .._autograd import may_carry_tangents, refuse_vmap
from .._checks import check_bool, check_int, check_number, check_tensor
from ..errors import OptionError, ShapeError
from ._eigen_function import _eigen_forward, _EigenFunction

__all__ = ["EigenResult", "eigen_decomposition", "EigenDecomposition"]

class EigenResult(NamedTuple):
    """Output of :func:`eigen_decomposition`: ``(eigenvalues, eigenvectors)``."""

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor


def default_gap_tol(n: int, dtype: torch.dtype) -> float:
    """Relative eigenvalue gap below which a pair counts as degenerate: ``10·N·eps``.

    Eigenvectors of a pair closer than the input's own rounding (about ``N·eps·‖X‖``)
    are not determined by the data, so their gradient (∝ 1/gap) means nothing.
    """
    return 10.0 * n * torch.finfo(dtype).eps


def _check_options(k: object, largest: object, gap_tol: object, n: int | None = None) -> float | None:
    """The options, ``gap_tol`` as a float (None stays None): at least float64's resolution
    at N (:func:`default_gap_tol` of float64, ``10·N·eps``; the decomposition runs in
    float64), or where N is not known yet (a Module being built) at N = 1, the least of
    any input. Below it a pair tied in exact arithmetic, whose computed eigenvalues differ
    by their rounding (4e-16 apart at N = 3), was kept as a gap and its eigenvector
    gradient came back as that rounding's reciprocal (max |dL/dX| 2.2e15, silently)."""
    if k is not None:
        check_int("k", k, minimum=1)
    check_bool("largest", largest)
    if gap_tol is None:
        return None
    where = f"at N={n}" if n is not None else "at N=1, the least of any input; each call checks its own N"
    # (NumPy scalars too; 10**400 refused by name, not an OverflowError)
    return check_number("gap_tol", gap_tol, at_least=default_gap_tol(1 if n is None else n, torch.float64),
                        hint=f" (float64's resolution, 10·N·eps, {where}: a closer pair is within rounding "
                             f"of a tie; or None for the default)")


def eigen_decomposition(
    X: torch.Tensor,
    k: int | None = None,
    *,
    largest: bool = True,
    gap_tol: float | None = None,
) -> EigenResult:
    r"""Top-k (or all) eigenpairs of symmetric matrices, differentiated implicitly.

    .. math::

        V_k(X) \in \operatorname*{argmax}_{U^\top U = I_k} \operatorname{tr}(U^\top X U),
        \qquad X V_k = V_k \operatorname{diag}(\lambda_1, \dots, \lambda_k)

    ``X`` is symmetrised first, :math:`(X + X^\top)/2`, so its gradient is symmetric and
    gradcheck holds for any square input. With ``largest=True`` the columns are the
    eigenvectors of the k largest eigenvalues in descending order; with
    ``largest=False`` those of the k smallest in ascending order. Sign convention: the
    largest-magnitude component of each eigenvector is positive (the first among exact
    ties), which makes the output a function of ``X`` wherever the eigenvalues are
    simple; it jumps (v to −v) where the largest and smallest components of an
    eigenvector are equal in magnitude (X = [[2, 1], [1, 2]]'s second eigenvector, a
    symmetric graph's Laplacian), and a gradient or tangent that reaches such an
    eigenvector is one side's, with a :class:`~convexddn.errors.GradientWarning`.

    Backward (vector–Jacobian product, no Jacobian formed):
    :math:`\bar X = \operatorname{sym}(V (F \circ V^\top G + E_g) V_k^\top)` with
    :math:`F_{ji} = 1/(\lambda_i - \lambda_j)`, i.e.
    :math:`\mathrm{d}v_i = -(X - \lambda_i I)^+ \mathrm{d}X\, v_i` and
    :math:`\mathrm{d}\lambda_i = v_i^\top \mathrm{d}X\, v_i`. It needs all N
    eigenvectors, which ``eigh`` computes anyway (O(N³) per matrix).

    Degenerate pairs: where :math:`|\lambda_i - \lambda_j| \le`
    ``gap_tol`` :math:`\cdot \max_l |\lambda_l|` for a returned :math:`v_i`, the
    eigenvectors (or the top-k subspace, when the pair straddles the k-th eigenvalue)
    are not unique and the exact gradient does not exist; that pair's term is set to
    zero — never Inf or NaN — and, when the term would have been nonzero, a
    :class:`~convexddn.errors.GradientWarning` names the batch elements. Losses that
    depend only on a subspace spanned by whole groups of equal eigenvalues (e.g. the
    projector :math:`V_k V_k^\top`) get their exact gradient without a warning; a loss
    that reads the eigenvalues too (:math:`V f(\Lambda) V^\top`) warns wherever such a
    group's vectors carry gradient (its gradient at the tie needs the dropped term's limit).

    Precision: the decomposition and the eigenvalue gaps of the backward are computed in
    float64 whatever the input dtype; the backward's matrix products run in the input
    dtype (at least float32). Float32 inputs get float64's eigenpairs rounded once
    (correctly rounded but for an eigenvalue far below ‖X‖, which keeps float64's
    absolute error: −1.3e-15 for a singular matrix's 0), and gradients within a few
    float32 ulps (normwise) where the kept relative gaps are above ~5e-4; closer pairs
    carry the float32 products' rounding times 1/gap (44 to 350 ulps at relative gaps of
    2e-5, 1.8e-3 relative at 1e-9 with a smaller ``gap_tol``). The default ``gap_tol``
    (``10·N·eps`` of the input dtype) drops pairs closer than the input's own precision
    can determine (with a warning); a smaller one may go down to float64's resolution,
    ``10·N·eps`` of float64, and no further. (For float16 and bfloat16 that default is large —
    2.5 for bfloat16 at N = 32, i.e. every pair — so pass ``gap_tol`` there.)

    Args:
        X: square matrices, floating point.
        k: number of eigenpairs returned, ``1 <= k <= N``; ``None`` for all N.
            Default: ``None``.
        largest: return the largest (``True``) or smallest (``False``) eigenvalues.
            Default: ``True``.
        gap_tol: relative eigengap below which a pair counts as degenerate; ``None``
            for ``10 · N · eps(X.dtype)``. At least ``10 · N · eps`` of float64, the
            decomposition's resolution (so the default for float64 inputs): a closer
            computed pair may be a tie, whose gradient would be 1/rounding. Default: ``None``.

    Shape:
        - Input: ``(*, N, N)``; ``*`` any batch shape (may be empty).
        - Output: ``eigenvalues (*, k)``, ``eigenvectors (*, N, k)``; same dtype and
          device as ``X``.

    Returns:
        :class:`EigenResult` ``(eigenvalues, eigenvectors)``.

    Raises:
        DTypeError: ``X`` is not a floating-point tensor.
        ShapeError: ``X`` has fewer than 2 dimensions, is not square, or ``N = 0``.
        NonFiniteError: ``X`` holds NaN or Inf.
        SolverError: the eigenvalues of a finite ``X`` overflow its dtype (entries of
            extreme magnitude; e.g. float16 matrices with eigenvalues beyond 65504).
        OptionError: ``k`` is not an integer in ``[1, N]``, ``largest`` is not a bool,
            or ``gap_tol`` is not a number or is below float64's resolution at N,
            ``10·N·eps`` with float64's eps (2.2e-16): see ``gap_tol``.

    References:
        S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks", IEEE TPAMI
        2021 (Prop. 4.5; the eigen decomposition node).

    Examples::

        >>> X = torch.randn(8, 5, 5); X = X + X.mT
        >>> lam, V = eigen_decomposition(X, k=2)
        >>> torch.allclose(X @ V, V * lam.unsqueeze(-2), atol=1e-4)
        True
    """
    X = check_tensor("X", X)
    refuse_vmap("eigen_decomposition", X)
    if X.ndim < 2 or X.shape[-1] != X.shape[-2]:
        raise ShapeError(f"X must be square matrices of shape (*, N, N), got shape {tuple(X.shape)}")
    n = X.shape[-1]
    if n == 0:
        raise ShapeError(f"X must have N >= 1, got shape {tuple(X.shape)}")
    given = _check_options(k, largest, gap_tol, n)  # (after N is known: gap_tol's floor depends on it)
    k = n if k is None else int(k)
    if k > n:
        raise OptionError(f"k must be at most N={n}, got k={k}")
    tol = default_gap_tol(n, X.dtype) if given is None else given
    if (torch.is_grad_enabled() and X.requires_grad) or may_carry_tangents(X):
        # (forward mode too: the Function's jvp, not eigh's own, which divides by the gaps)
        lam_k, Vk, _, _ = _EigenFunction.apply(X, k, largest, tol)
    else:
        lam_k, Vk, _, _ = _eigen_forward(X, k, largest)
    return EigenResult(lam_k, Vk)


class EigenDecomposition(nn.Module):
    r"""Module form of :func:`eigen_decomposition`: top-k eigenpairs of symmetric matrices.

    .. math::

        V_k(X) \in \operatorname*{argmax}_{U^\top U = I_k} \operatorname{tr}(U^\top X U)

    Args:
        k: number of eigenpairs, or ``None`` for all. Default: ``None``.
        largest: largest (``True``) or smallest (``False``) eigenvalues. Default: ``True``.
        gap_tol: relative eigengap treated as degenerate in the backward; ``None`` for
            ``10 · N · eps``; at least ``10 · N · eps`` of float64, as
            :func:`eigen_decomposition`. Default: ``None``.

    Shape:
        - Input: ``(*, N, N)``.
        - Output: :class:`EigenResult` with ``eigenvalues (*, k)`` and
          ``eigenvectors (*, N, k)``.

    Raises:
        OptionError: invalid options at construction (a ``gap_tol`` below float64's
            resolution at any N, ``10 · eps``; N is known at the call, which refuses one
            below ``10 · N · eps``); the call raises as :func:`eigen_decomposition`.

    Examples::

        >>> pca = EigenDecomposition(k=3)
        >>> cov = torch.randn(4, 10, 10); cov = cov @ cov.mT
        >>> pca(cov).eigenvectors.shape
        torch.Size([4, 10, 3])
    """

    def __init__(self, k: int | None = None, largest: bool = True, gap_tol: float | None = None) -> None:
        # Checked before Module.__init__, which would reset a Module initialised again
        # (m.__init__(gap_tol=bad)) before the error: nothing is set unless all pass.
        _check_options(k, largest, gap_tol)
        super().__init__()
        self.k, self.largest, self.gap_tol = k, largest, gap_tol

    def forward(self, X: torch.Tensor) -> EigenResult:
        return eigen_decomposition(X, self.k, largest=self.largest, gap_tol=self.gap_tol)

    def extra_repr(self) -> str:
        return f"k={self.k}, largest={self.largest}, gap_tol={self.gap_tol}"
