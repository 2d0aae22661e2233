"""The products of a batched interior-point method with its (equilibrated) data, and
what the sparsity pattern says about its reduced KKT matrix (:class:`KKTStructure`).

:class:`DataOps` multiplies by ``P``, ``A`` and their transposes as batched BLAS calls, or,
where the reduced KKT matrix is diagonal (every cone row touches one variable: boxes,
simplices, orthants), as gathers and scatters of one value per cone row. :mod:`.kkt`
factorises and solves the KKT systems built from them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .symmetric_cones import ConeLayout
from .tensor_cache import cached

__all__ = ["DENSE", "DataOps", "KKTStructure", "bmv"]


@dataclass(frozen=True)
class KKTStructure:
    """What the sparsity pattern says about S (see :mod:`.kkt`'s docstring: S, the ρ term).

    Attributes:
        rho: add :math:`\\rho A_E^T A_E` (some variable has no structural curvature).
        diagonal: :math:`S` is diagonal (implies ``rho`` is False): :math:`P` is
            diagonal and every cone row (every second-order cone) touches one variable.
        cols: for a diagonal structure, the variable each cone row touches (any
            column for an empty row).
    """

    rho: bool = True
    diagonal: bool = False
    cols: tuple[int, ...] = ()


DENSE = KKTStructure()


def bmv(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Batched matrix-vector product ``(B, p, r) @ (B, r) -> (B, p)``."""
    return _mm(M, v.unsqueeze(-1)).squeeze(-1)


def _mm(a: torch.Tensor, b: torch.Tensor, aT: torch.Tensor | None = None) -> torch.Tensor:
    """Batched ``a @ b`` ``(B, p, r) @ (B, r, k)``; products with an inner or outer size
    of 1 (one equality row, one right-hand side) as broadcast arithmetic: batched BLAS
    calls on 1×n operands cost a dispatch per batch element (measured at B = 1024:
    59 µs for the outer product against 4 µs broadcast)."""
    if a.shape[-1] == 1:
        return a * b
    if a.shape[-2] == 1 and b.shape[-1] == 1:
        return (a.mT * b).sum(-2, keepdim=True)
    # As rows, (bᵀ aᵀ)ᵀ: batched BLAS multiplies a few rows on the left ~2× faster than a
    # few columns on the right (CPU, (64, 50, 50) by (64, 50, 1): 20 µs against 42).
    return (b.mT @ (a.mT if aT is None else aT)).mT


class DataOps:
    """Products with the (equilibrated) data: batched matrix products, or for a
    diagonal structure gathers and scatters of one value per cone row.

    Shape:
        vectors ``(B, n, k)`` / ``(B, m, k)``; :meth:`vec` wraps ``(B, n)`` ones.
    """

    def __init__(self, P: torch.Tensor, A: torch.Tensor, layout: ConeLayout, structure: KKTStructure) -> None:
        self.P, self.A, self.layout = P, A, layout
        self.diagonal = structure.diagonal
        z = layout.zero
        self.AE = A[:, :z]
        # Transposed views made once: the products run as rows (see _mm).
        self.PT, self.AT, self.AET = P.mT, A.mT, self.AE.mT
        if self.diagonal:
            self.p = P.diagonal(dim1=1, dim2=2).unsqueeze(-1).contiguous()  # strided: p * x 12× slower
            # Cone row i touches variable i (sparsemax, a box): the gathers are the identity.
            self.identity = structure.cols == tuple(range(P.shape[-1]))
            key = ("cols", structure.cols, str(P.device))  # one host-to-device copy per device
            self.cols = cached(layout._cache, key, lambda: torch.tensor(structure.cols, dtype=torch.long,
                                                                        device=P.device))
            self.a = A[:, z:].gather(2, self.cols.view(1, -1, 1).expand(A.shape[0], -1, 1)).squeeze(-1)

    def rows_mv(self, vals: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(one value per cone row) times x: (B, mc), (B, n, k) -> (B, mc, k)."""
        return vals.unsqueeze(-1) * (x if self.identity else x.index_select(1, self.cols))

    def rows_tmv(self, vals: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Its transpose: (B, mc), (B, mc, k) -> (B, n, k)."""
        if self.identity:
            return vals.unsqueeze(-1) * t
        out = t.new_zeros(t.shape[0], self.P.shape[-1], t.shape[-1])
        return out.index_add_(1, self.cols, vals.unsqueeze(-1) * t)

    def rows_add(self, base: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        """base + (the transpose of rows_mv applied to vals): (B, n), (B, mc) -> (B, n)."""
        return base + vals if self.identity else base.index_add(1, self.cols, vals)

    def e_mv(self, x: torch.Tensor) -> torch.Tensor:
        return _mm(self.AE, x, self.AET)

    def e_tmv(self, zE: torch.Tensor) -> torch.Tensor:
        return _mm(self.AET, zE, self.AE)

    def Pmv(self, x: torch.Tensor) -> torch.Tensor:
        return self.p * x if self.diagonal else _mm(self.P, x, self.PT)

    def Amv(self, x: torch.Tensor) -> torch.Tensor:
        if self.diagonal:
            return torch.cat([self.e_mv(x), self.rows_mv(self.a, x)], 1)
        return _mm(self.A, x, self.AT)

    def ATmv(self, z: torch.Tensor) -> torch.Tensor:
        if self.diagonal:
            zE = z[:, :self.layout.zero]
            return self.e_tmv(zE) + self.rows_tmv(self.a, z[:, self.layout.zero:])
        return _mm(self.AT, z, self.A)

    vec = staticmethod(lambda f, v: f(v.unsqueeze(-1)).squeeze(-1))  # (B, r) through a (B, r, 1) product

    # Vectors (B, n) -> (B, ·), as one row each: three ops instead of vec's five.
    def Pv(self, x: torch.Tensor) -> torch.Tensor:
        return self.p[..., 0] * x if self.diagonal else (x.unsqueeze(1) @ self.PT).squeeze(1)

    def Av(self, x: torch.Tensor) -> torch.Tensor:
        return self.vec(self.Amv, x) if self.diagonal else (x.unsqueeze(1) @ self.AT).squeeze(1)

    def ATv(self, z: torch.Tensor) -> torch.Tensor:
        return self.vec(self.ATmv, z) if self.diagonal else (z.unsqueeze(1) @ self.A).squeeze(1)
