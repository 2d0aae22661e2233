"""The dense batched data of a canonicalised DPP problem, filled per call in torch.

The cone program of :mod:`.canonical` has data :math:`P, q, A, b` linear in the
parameter vector :math:`p = (\\theta, 1)`. :class:`ConeData` keeps each datum's sparse
map as index arrays, so that filling the dense ``(B, ·, ·)`` tensors is one
``index_add`` per block, on the parameters' device and differentiable by autograd. It
also applies the presolve that :mod:`.canonical` decided (its docstring has the
formulas), recovers the full solution and the eliminated rows' multipliers, and maps
them to the requested variables.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .._generic import generic_vector
from .consistent_rows import expand_duals, inconsistency
from .kkt import DENSE, KKTStructure, bmv
from .symmetric_cones import ConeLayout
from .tensor_cache import cached

__all__ = ["ConeData"]


@dataclass
class _Map:
    """target[b, pos[k]] += coef[k] * p[b, col[k]] for a flat target of ``size``."""

    pos: torch.Tensor
    col: torch.Tensor
    coef: torch.Tensor
    size: int


@dataclass
class _Var:
    source: str  # "primal" or "dual"
    start: int
    stop: int
    shape: tuple[int, ...]


class ConeData:
    """The parameter -> (P, q, A, b) maps of one canonicalised problem, presolved.

    Attributes:
        n, layout: variables and cone of the *reduced* program the solver sees.
        n_full, m_full: sizes before presolve. eliminated: variables removed.
    """

    # Dependent equality rows removed (.consistent_rows.reduce_maps): the parameter columns
    # b_E reads, b_E's and (I - Π)'s maps from them, T (multipliers of every row), p and r
    # (class defaults: none removed, also in a pickle from before).
    rows_cols: torch.Tensor | None = None
    rows_bE = rows_null = rows_T = None
    rows_zr = rows_r = 0

    def __init__(self, maps: dict[str, _Map], layout: ConeLayout, n_keep: int, n_elim: int,
                 keep: np.ndarray, elim: np.ndarray, rows_keep: np.ndarray, rows_elim: np.ndarray,
                 elim_coef: np.ndarray, puu_diag: bool, pku_zero: bool, n_full: int, m_full: int,
                 param_cols: list[tuple[int, int]], triu: list, variables: list[_Var]) -> None:
        self.maps, self.layout = maps, layout
        self.n, self.eliminated = n_keep, n_elim
        # On the CPU whatever the default device (a host-side copy, moved by on_device).
        host = torch.device("cpu")
        self.keep, self.elim = torch.as_tensor(keep, device=host), torch.as_tensor(elim, device=host)
        self.rows_keep = torch.as_tensor(rows_keep, device=host)
        self.rows_elim = torch.as_tensor(rows_elim, device=host)
        self.elim_coef = torch.as_tensor(elim_coef, dtype=torch.float64, device=host)
        self.puu_diag, self.pku_zero = puu_diag, pku_zero
        self.n_full, self.m_full = n_full, m_full
        self.param_cols, self.triu, self.variables = param_cols, triu, variables
        self.n_cols = sum(size for _, size, _ in param_cols) + 1
        self.structure: KKTStructure = DENSE
        self.separable = False  # nearly separable (see canonical._structure)
        self.error_cols: torch.Tensor | None = None
        self.error_duals: torch.Tensor | None = None
        self._cache: dict = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = {}  # device copies of the index arrays
        return state

    def on_device(self, name: str, like: torch.Tensor) -> torch.Tensor | None:
        """The attribute ``name`` (a tensor, or None) on ``like``'s device, floating ones
        in its dtype; cached: a host-to-device copy per call waits for the host on CUDA."""
        t = getattr(self, name)
        return cached(self._cache, (name, str(like.device), like.dtype), lambda: t if t is None else t.to(
            like.device, like.dtype if t.is_floating_point() else t.dtype))

    def _gather_maps(self, p: torch.Tensor) -> tuple:
        """The non-empty maps' names, sizes, positions (``None`` for a map with exactly one
        term per position: its terms in position order, the gathered values are the block),
        columns and coefficients, on p's device."""
        names = [k for k, m in self.maps.items() if m.pos.numel()]
        pos, cols, coefs = [], [], []
        for k in names:
            m = self.maps[k]
            order = torch.argsort(m.pos)
            direct = m.pos.numel() == m.size and bool((m.pos[order] == torch.arange(m.size, device=m.pos.device)).all())
            pos.append(None if direct else m.pos.to(p.device))
            cols.append(m.col[order] if direct else m.col)
            coefs.append(m.coef[order] if direct else m.coef)
        return (names, [self.maps[k].pos.numel() for k in names], pos, torch.cat(cols).to(p.device),
                torch.cat(coefs).to(p.device, p.dtype))

    def blocks(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every map's dense block ``(B, size)`` from ``p`` ``(B, n_cols)``, by name.

        One gather of ``p`` serves all maps, split per map (not sliced): the backward
        then forms one ``(B, n_cols)`` gradient of ``p`` (a concatenation, one
        ``index_add``) instead of one zero-filled ``(B, n_cols)`` tensor per map, summed
        (8 for a QP: most of its backward outside the solver). Each block is its own
        contiguous tensor (a batched matmul on a strided batch copies per element in its
        backward). Empty maps are constant zeros. A map with one term per position
        (a parameter's entries, transposed or not) is its gathered values in position
        order, copied: no scatter (a QP's A and its elimination M: 0.3 and 0.2 ms of
        ``scatter_add`` each at batch 64).
        """
        names, counts, pos, col, coef = cached(self._cache, ("blocks", p.device, p.dtype), lambda: self._gather_maps(p))
        B = p.shape[0]
        out = _Blocks(lambda k: p.new_zeros(B, self.maps[k].size))
        if names:
            # gather / scatter_add with the index broadcast over the batch, not
            # index_select / index_add along dim 1 (nor advanced indexing, whose backward
            # is a serial accumulate-put): each one's backward is the other, and a gather
            # along dim 1 is 4× faster than index_select there (measured on CPU, (64, 2500)
            # f64: 92 against 378 µs; 2.7 against 10.4 ms at batch 1024).
            vals = (torch.gather(p, 1, col.expand(B, -1)) * coef).split(counts, 1)
            for k, where, v in zip(names, pos, vals):
                out[k] = (v.contiguous() if where is None
                          else p.new_zeros(B, self.maps[k].size).scatter_add(1, where.expand(B, -1), v))
        return out

    def tangent_direction(self, like: torch.Tensor) -> torch.Tensor:
        """``(1, n_cols)`` a fixed, generic direction of the parameters (golden-angle sines
        over the parameter columns; the constant column fixed), in ``like``'s dtype and
        device; cached."""
        def build():
            dp = generic_vector(self.n_cols, like.dtype, like.device)
            dp[-1] = 0.0
            return dp.unsqueeze(0)
        return cached(self._cache, ("direction", str(like.device), like.dtype), build)

    def columns_of(self, which: Sequence[bool], like: torch.Tensor) -> torch.Tensor:
        """``(1, n_cols)`` 1 on the columns of the parameters flagged in ``which`` (in the
        order they are passed), 0 elsewhere; cached."""
        def build():
            sizes = [0] * len(self.param_cols)
            for order, size, _ in self.param_cols:
                sizes[order] = size
            mask = torch.zeros(1, self.n_cols, dtype=like.dtype, device=like.device)
            for flag, (order, size, _) in zip(which, self.param_cols):
                if flag:
                    start = sum(sizes[:order])
                    mask[0, start:start + size] = 1.0
            return mask
        return cached(self._cache, ("columns", tuple(map(bool, which)), str(like.device), like.dtype), build)

    def parameter_tangent(self, like: torch.Tensor, requires: Sequence[bool] | None = None
                          ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """``(dP (1, n, n), dq (1, n), dA (1, m, n), db (1, m))``: how the data move along
        :meth:`tangent_direction` (restricted to the parameters flagged in ``requires``, as
        :meth:`columns_of`, if given); cached. ``A`` and ``b`` are linear in ``p``, and so are
        ``P`` and ``q`` unless variables were eliminated (then ``dP``, ``dq`` are None:
        the caller takes their secant): :meth:`blocks` of the direction is their exact
        directional derivative.
        """
        def build():
            step = self.tangent_direction(like)
            blocks = self.blocks(step if requires is None else step * self.columns_of(requires, like))
            dA, db = blocks["A"].view(1, self.layout.m, self.n), blocks["b"]
            if self.eliminated:
                return None, None, dA, db
            return blocks["PKK"].view(1, self.n, self.n), blocks["qK"], dA, db
        key = None if requires is None else tuple(map(bool, requires))
        return cached(self._cache, ("tangent", key, str(like.device), like.dtype), build)

    def parameter_vector(self, values: Sequence[torch.Tensor], batch: int) -> torch.Tensor:
        """p = (θ, 1) of each element, (B, n_cols), in CVXPY's column order."""
        cols: list[torch.Tensor] = [values[0]] * len(values)
        for i, v in enumerate(values):
            order, _, shape = self.param_cols[i]
            if self.triu[i] is not None:
                r, c = cached(self._cache, ("triu", i, str(v.device)),
                              lambda i=i, v=v: tuple(t.to(v.device) for t in self.triu[i]))
                flat = v[..., r, c]
            else:
                flat = _fortran_flatten(v, len(shape))
            cols[order] = flat.expand(batch, -1) if v.dim() == len(shape) else flat
        return torch.cat(cols + [values[0].new_ones(batch, 1)], 1)

    def fill(self, p: torch.Tensor):
        """Dense reduced data ``(P, q, A, b)`` and what :meth:`recover` needs.

        Products with a datum that is identically zero (an empty map: no cost on the
        eliminated variables, no offset u₀, as for ``sum_squares(L @ x)``) are skipped, in
        the forward and so in the backward (two batched products fewer on the n = 50 QP).
        """
        B = p.shape[0]
        nK, nU, mr = self.n, self.eliminated, self.layout.m
        get = self.blocks(p).__getitem__
        zero = self._zero_maps()
        P = None if nU and "PKK" in zero else get("PKK").view(B, nK, nK)
        q = get("qK")
        A = get("A").view(B, mr, nK)
        b = get("b")
        extra = None
        if nU:
            M = get("M").view(B, nU, nK)
            u0 = None if "u0" in zero else get("u0")
            qU = None if "qU" in zero else get("qU")
            if self.puu_diag:
                puu = get("PUU")  # (B, nU) diagonal
                PM, Pu0 = puu[:, :, None] * M, None if u0 is None else puu * u0
            else:
                PUU = get("PUU").view(B, nU, nU)
                PM, Pu0 = PUU @ M, None if u0 is None else bmv(PUU, u0)
            MPM = M.mT @ PM
            P = MPM if P is None else P + MPM
            shift = qU if Pu0 is None else (Pu0 if qU is None else qU + Pu0)  # q_U + P_UU u₀
            if shift is not None:
                q = q - bmv(M.mT, shift)
            PKU = None
            if not self.pku_zero:
                PKU = get("PKU").view(B, nK, nU)
                cross = PKU @ M
                P = P - cross - cross.mT
                if u0 is not None:
                    q = q + bmv(PKU, u0)
            extra = (M, u0, shift, PM, PKU)
        return P, q, A, b, extra

    def _zero_maps(self) -> frozenset[str]:
        """Names of the data that are identically zero (maps without terms)."""
        return cached(self._cache, "zero maps",
                      lambda: frozenset(k for k, m in self.maps.items() if not m.pos.numel()))

    def _recovered(self) -> tuple[bool, bool]:
        """Whether some requested output reads an eliminated variable, and whether one
        reads a removed row's multiplier: :meth:`recover` forms only those."""
        def build():
            def reads(source: str, idx: torch.Tensor) -> bool:
                return any(v.source == source and bool(((idx >= v.start) & (idx < v.stop)).any())
                           for v in self.variables)
            return reads("primal", self.elim), reads("dual", self.rows_elim)
        return cached(self._cache, "recovered", build)

    def recover(self, x: torch.Tensor, z: torch.Tensor, extra) -> tuple[torch.Tensor, torch.Tensor]:
        """Full (x, z) of the canonical program from the reduced solution, for :meth:`outputs`:
        the eliminated variables and the removed rows' multipliers only where a requested
        output reads them (0 elsewhere; each costs a batched product, and its backward
        another, even where its gradient is zero). Dependent equality rows removed: theirs
        are the minimum-norm ones (:func:`~.consistent_rows.expand_duals`)."""
        if self.rows_T is not None:
            z = expand_duals(z, self.on_device("rows_T", z))
        if extra is None:
            return x, z
        M, u0, shift, PM, PKU = extra
        B = x.shape[0]
        primal, dual = self._recovered()
        xf = x.new_zeros(B, self.n_full).index_copy(1, self.on_device("keep", x), x)
        if primal:
            xU = -bmv(M, x) if u0 is None else u0 - bmv(M, x)
            xf = xf.index_copy(1, self.on_device("elim", x), xU)
        zf = z.new_zeros(B, self.m_full).index_copy(1, self.on_device("rows_keep", z), z)
        if dual:
            # Stationarity in u: P_UK x_K + P_UU x_U + q_U + a z_R = 0 (u appears in row R only).
            PUx = -bmv(PM, x) if shift is None else shift - bmv(PM, x)
            if PKU is not None:
                PUx = PUx + bmv(PKU.mT, x)
            zR = -PUx / self.on_device("elim_coef", x)
            zf = zf.index_copy(1, self.on_device("rows_elim", z), zR)
        return xf, zf

    def equality_parameters(self) -> list[int] | None:
        """The parameters (indices in the order passed) whose columns ``b_E`` of the removed
        dependent equality rows reads (:mod:`.consistent_rows`), or None where none were removed:
        the inputs whose rounding those rows' disagreement may come from."""
        if self.rows_cols is None:
            return None

        def build():  # (each parameter's columns as columns_of lays them out: one source)
            read = torch.zeros(self.n_cols, dtype=torch.float64)
            read[self.rows_cols.cpu()] = 1.0
            k = len(self.param_cols)
            return [i for i in range(k) if bool((self.columns_of([j == i for j in range(k)], read)[0] * read).any())]
        return cached(self._cache, "equality_parameters", build)  # (per call otherwise: a loop over columns)

    def inconsistency(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(‖(I - Π) b_E‖, ‖b_E‖)`` ``(B,)`` of each element where dependent equality rows
        were removed (:mod:`.consistent_rows`), else None."""
        if self.rows_T is None:
            return None
        return inconsistency(p, self.on_device("rows_cols", p), self.on_device("rows_bE", p),
                             self.on_device("rows_null", p))

    def outputs(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The requested variables, (B, *shape) each, from the full (x, z)."""
        outs = []
        for v in self.variables:
            src = x if v.source == "primal" else z
            outs.append(_fortran_unflatten(src[:, v.start:v.stop], v.shape))
        return tuple(outs)


def _fortran_flatten(v: torch.Tensor, k: int) -> torch.Tensor:
    """(*lead, *shape) -> (*lead, prod(shape)) in column-major order of the last k dims."""
    lead = v.dim() - k
    perm = list(range(lead)) + list(reversed(range(lead, v.dim())))
    return v.permute(perm).reshape(tuple(v.shape[:lead]) + (-1,))


def _fortran_unflatten(v: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    out = v.reshape((v.shape[0],) + tuple(reversed(shape)))
    return out.permute([0] + list(reversed(range(1, len(shape) + 1))))


class _Blocks(dict):
    """:meth:`ConeData.blocks`' answer: the maps with terms, and a map without terms as
    zeros made on first reading (most are never read: a QP's ``PKK`` and ``PKU`` when its
    quadratic term is ``sum_squares(L @ x)``, two (64, 2500) zero fills per call)."""

    def __init__(self, zeros) -> None:
        super().__init__()
        self._zeros = zeros

    def __missing__(self, key: str) -> torch.Tensor:
        self[key] = value = self._zeros(key)
        return value
