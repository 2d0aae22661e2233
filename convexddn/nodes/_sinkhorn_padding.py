r"""Zero entries in the marginals of :func:`convexddn.nodes.transport.sinkhorn` (padding).

A row with :math:`a_i = 0` carries no mass: its plan row is exactly 0 (its potential
:math:`\alpha_i = -\infty`), and a column with :math:`b_j = 0` likewise. The plan on
the live rows and columns is the plan of the problem with the dead ones removed, so
sets of different sizes padded to one shape are solved in one batch, each element
with its own pattern. The solver of :mod:`convexddn.nodes._sinkhorn` runs on the
padded problem with these masks (:class:`Padding`; all of it skipped when no marginal
has a zero):

- the costs are shifted by their minima over live entries only, and the solver sees 0
  at dead entries, so padding values set neither the shifts nor the spread that picks
  the solver's path;
- dead potentials are :math:`-\infty` (``exp`` gives exact zeros and
  :math:`-\infty` + finite stays :math:`-\infty`), their terms of the dual φ are
  dropped, and the sums that are 0 on a dead row or column get 1 added where they
  divide (the row sums r = P1 and the scaling block's products): nothing computes 0/0;
- the Schur complement's rows and columns of dead columns, and of the heaviest live
  column (the one held fixed, :math:`\mu_k = 0`, as the heaviest column is without
  padding), are those of the identity: Cholesky sees exactly the sliced problem's
  reduced Laplacian.

Backward. :math:`\partial L/\partial C` is 0 on dead rows and columns (the plan is 0
there whatever the costs). The derivative with respect to a dead :math:`a_i` is
one-sided (:math:`a \ge 0`). For :math:`a_i > 0` the row is exact,
:math:`P_i = r_i \pi_i` with :math:`\pi_i = \operatorname{softmax}_j(\beta_j - C_{ij}/\varepsilon)`
(the row's Gibbs distribution, 0 on dead columns), so the implicit formula
:math:`\lambda_i = (u_i - P_i\mu)/r_i`, :math:`u_i = \sum_j V_{ij}P_{ij}`, is

.. math::

    \lambda_i = \sum_j \pi_{ij} (V_{ij} - \mu_j)

for every :math:`a_i > 0`, and its limit as :math:`a_i \to 0^+` is this sum at the
solution with :math:`a_i = 0` (μ and β are continuous there: the live block of the
Schur complement stays definite). Likewise a dead column's
:math:`\mu_j = \sum_i \rho_{ij}(V_{ij} - \lambda_i)` with
:math:`\rho_j = \operatorname{softmax}_i(\alpha_i - C_{ij}/\varepsilon)` over live rows.
:func:`completion` stores :math:`\pi` on dead rows and :math:`\rho` on dead columns
beside the plan's live entries (one tensor G), :func:`fill_dead` applies the sums.
Forward mode solves the live system the same way (dead rows and columns get a zero
tangent); a tangent at a dead marginal entry is refused, as only one side is feasible.

:func:`check_marginal` and :func:`marginal_parts` check a marginal for the public
function: entries ≥ 0, a positive mass, and each positive entry at least
:data:`MIN_SHARE` of the mass.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .._checks import check_device, check_finite, check_tensor
from ..errors import InputError, ShapeError
from ._sinkhorn_schur import held_columns

#: Smallest accepted share of a marginal's total in one nonzero entry. A row's largest
#: plan entry is at least its marginal over N, and plan entries below 6e-308 are 0:
#: below this share a row (N up to 1e17) could sum to 0 and would not be exact, and the
#: Newton steps and the backward divide by the row sums. (Entries that are exactly 0
#: are padding, masked as above.)
MIN_SHARE = 1e-290


class Padding:
    """The masks of zero marginal entries, for ``(B, M)`` ``a`` and ``(B, N)`` ``b``.

    ``rows``, ``cols``: whether any ``a``, any ``b`` entry is 0 (known to the caller from
    its checks, so that the completion's softmax is skipped on a side without any).
    """

    __slots__ = ("rows", "cols", "dead_r", "dead_c", "pad_r", "pad_c", "fixed", "dead", "both")

    def __init__(self, a: torch.Tensor, b: torch.Tensor, rows: bool = True, cols: bool = True) -> None:
        self.rows, self.cols = rows, cols
        self.dead_r, self.dead_c = a == 0, b == 0
        # 1 on dead rows (columns), 0 elsewhere: added to sums that are exactly 0 there.
        self.pad_r, self.pad_c = self.dead_r.to(a.dtype), self.dead_c.to(b.dtype)
        # The columns whose potential is held fixed: the dead ones and the heaviest live
        # one (every marginal has a live entry: an all-zero one is refused), as without
        # padding (:func:`~._sinkhorn_schur.held_columns`).
        self.fixed = held_columns(b, self.dead_c)
        dr, dc = self.dead_r.unsqueeze(-1), self.dead_c.unsqueeze(-2)
        self.dead, self.both = dr | dc, dr & dc

    def select(self, idx: torch.Tensor) -> Padding:
        """The masks of the batch elements ``idx`` (a 1-D index tensor), for a solve of those alone."""
        out = object.__new__(Padding)
        out.rows, out.cols = self.rows, self.cols
        for name in ("dead_r", "dead_c", "pad_r", "pad_c", "fixed", "dead", "both"):
            setattr(out, name, getattr(self, name)[idx])
        return out


def row_shifted(C: torch.Tensor, pad: Padding) -> tuple[torch.Tensor, torch.Tensor]:
    """C less each row's minimum over the live columns, 0 on dead × dead entries; and
    those minima (…, M, 1)."""
    low = C.masked_fill(pad.dead_c.unsqueeze(-2), math.inf).amin(-1, keepdim=True)
    return (C - low).masked_fill_(pad.both, 0.0), low


def offsets_removed(C: torch.Tensor, pad: Padding | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """C less the offset of each row, then each column, whose live entries all lie
    within ``OFFSET_SPREAD`` of their minimum's magnitude (that minimum); others as they are.

    The plan is unchanged by such shifts, and the solver's own shifts (each row's minimum,
    then each column's) then meet no huge offset: a column of -1e20 (a cost row of the
    caller's, in the solver's transposed orientation) sat in every row's minimum, which
    rounded the row's other entries away (the plan 1e-7 off at an offset of 1e10, 0.14
    at 1e20, without a warning), and a column shift applied first rounds a huge row's
    differences away in turn. A line's own minimum removes its offset exactly.
    Also returns the shifts, ``(…, M, 1)`` per row and ``(…, 1, N)`` per column (zeros
    where none), for :func:`completion`.
    """
    shifts = []
    for dim, dead in ((-1, None if pad is None else pad.dead_c.unsqueeze(-2)),
                      (-2, None if pad is None else pad.dead_r.unsqueeze(-1))):
        lo = (C if dead is None else C.masked_fill(dead, math.inf)).amin(dim, keepdim=True)
        hi = (C if dead is None else C.masked_fill(dead, -math.inf)).amax(dim, keepdim=True)
        offset = _offset(lo, hi)
        # (Most costs have no offset line: the subtraction of zeros cost a seventh of
        # the forward at (2, 100, 100). One host sync per direction.)
        shift = torch.where(offset, lo, 0.0) if bool(offset.any()) else None
        if shift is not None:
            # (A dead entry, shifted with its live line, may leave the range: a dead row
            # of 1e308 across a dead column of -1e308 gave -inf and an InputError about
            # the dead row. Dead entries are 0 to the solver: finite ones stay finite.)
            C = C - shift if dead is None else torch.where(dead & torch.isfinite(C), 0.0, C - shift)
        shifts.append(torch.zeros_like(lo) if shift is None else shift)
    return C, shifts[0], shifts[1]


def _offset(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Lines (minima ``lo``, maxima ``hi``) offset from 0 by far more than their range (see
    :data:`OFFSET_SPREAD`)."""
    return hi - lo <= OFFSET_SPREAD * lo.abs()


def plain_ranges(C: torch.Tensor) -> tuple | None:
    """Without padding: the rows' minima and maxima of C, ``(…, M, 1)`` each, each
    element's spread (its largest row range, ``(…,)``) and the smallest and the largest
    spread as host numbers; None where a row or column of C is offset (then
    :func:`offsets_removed` shifts it and the caller takes the rows' ranges anew).

    The same tests and numbers as :func:`offsets_removed` followed by a pass over C less
    its row minima, from a minimum and a maximum of C per direction and one host read
    (that set-up, with three reads, cost as much as the Sinkhorn iterations on (2, 100, 100)
    costs of spread 10ε): rounding is monotone, so max_j fl(C_ij − lo_i) = fl(hi_i − lo_i).
    NaN and Inf reach the spreads (amin and amax propagate NaN) and the caller's input test.
    """
    stats = [(C.amin(d, keepdim=True), C.amax(d, keepdim=True)) for d in (-1, -2)]
    spread = (stats[0][1] - stats[0][0]).amax((-2, -1))
    flags = [_offset(lo, hi).sum(dtype=C.dtype) for lo, hi in stats]  # (counts)
    offset_r, offset_c, least, top = torch.stack(flags + [spread.amin(), spread.amax()]).tolist()
    return None if offset_r or offset_c else (stats[0], spread, least, top)


# A line (row or column) of costs is offset when its range is below this fraction of its
# minimum's magnitude: removing the offset first rounds its entries by at most about
# that fraction of their spread (in units of the last place), where a shift by another
# line's huge entry would round them away.
OFFSET_SPREAD = 1e-3


def col_shift_(full: torch.Tensor, pad: Padding) -> tuple[torch.Tensor, torch.Tensor]:
    """``full`` less each column's minimum over the live rows, in place; and those minima."""
    low = full.masked_fill(pad.dead_r.unsqueeze(-1), math.inf).amin(-2, keepdim=True)
    full.sub_(low)
    return full.masked_fill_(pad.both, 0.0), low


def completion(
    P: torch.Tensor, f: torch.Tensor, g: torch.Tensor, C: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
    eps: float, pad: Padding
) -> torch.Tensor:
    r"""G: the plan on live entries, :math:`\pi_i` on dead rows, :math:`\rho_j` on dead columns.

    ``f``, ``g``: potentials with :math:`P_{ij} = e^{f_i + g_j - D_{ij}/\varepsilon}` on
    live entries for the shifted costs :math:`D_{ij} = C_{ij} - s_i - t_j` (``C`` the
    caller's, ``s`` ``(…, M, 1)`` and ``t`` ``(…, 1, N)`` the solver's row and column
    shifts), :math:`-\infty` on dead rows and columns, so that :math:`\pi` and
    :math:`\rho` are 0 on dead × dead entries. A dead column's
    :math:`\rho_j = \operatorname{softmax}_i(f_i + s_i/\varepsilon - C_{ij}/\varepsilon)`
    is formed from C less its minimum over the live rows and s less its largest (and a
    dead row's π alike): the constants drop out of the softmax, and the padding values
    are never shifted by the live lines' shifts, which rounded them (a padded column of
    1e16 lost a single-entry row's shift, and the one-sided gradient there moved with the
    padding value).
    """
    G = P
    if pad.rows:
        G = torch.where(pad.dead_r.unsqueeze(-1), _gibbs(C, g.unsqueeze(-2), t, pad.dead_c.unsqueeze(-2), -1, eps), G)
    if pad.cols:
        # (Relative to the live rows' minimum first: a padded column of costs 1e300 at
        # ε = 1e-10, or 1.7e308 at ε = 0.3, was +inf throughout after the division, its
        # softmax NaN, and the backward spread that to every entry of b and a.)
        G = torch.where(pad.dead_c.unsqueeze(-2), _gibbs(C, f.unsqueeze(-1), s, pad.dead_r.unsqueeze(-1), -2, eps), G)
    return G


def _gibbs(C: torch.Tensor, pot: torch.Tensor, shift: torch.Tensor, dead: torch.Tensor, dim: int,
           eps: float) -> torch.Tensor:
    """softmax along ``dim`` of pot + (shift − C)/ε, with C less its minimum and shift less
    its largest over the live entries (``dead``: the other side's dead lines; 0 there)."""
    W = C - C.masked_fill(dead, math.inf).amin(dim, keepdim=True)
    sh = shift - shift.masked_fill(dead, -math.inf).amax(dim, keepdim=True)
    return torch.softmax((pot + (sh - W) / eps).masked_fill(dead, -math.inf), dim)


def fill_dead(
    G: torch.Tensor, V: torch.Tensor, lam: torch.Tensor, mu: torch.Tensor, pad: Padding
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""λ on dead rows and μ on dead columns: their one-sided limits (module docstring).

    :math:`\lambda_i = \sum_j \pi_{ij}(V_{ij} - \mu_j)` reads only live columns and
    :math:`\mu_j = \sum_i \rho_{ij}(V_{ij} - \lambda_i)` only live rows (G is 0 on
    dead × dead entries), so neither depends on the other's dead values.
    """
    GV = G * V
    if pad.rows:
        row = GV.sum(-1) - (G @ mu.unsqueeze(-1)).squeeze(-1)
        lam = torch.where(pad.dead_r, row, lam)
    if pad.cols:
        col = GV.sum(-2) - (lam.unsqueeze(-2) @ G).squeeze(-2)
        mu = torch.where(pad.dead_c, col, mu)
    return lam, mu


def check_marginal(name: str, v: Any, cost: torch.Tensor, size: int, side: str) -> torch.Tensor:
    """``v`` checked as a marginal of ``cost``'s ``side`` (a finite floating-point tensor
    of last dim ``size`` on cost's device), as :func:`check_tensor` returns it; its values
    are checked by :func:`marginal_parts`."""
    v = check_tensor(name, v)
    check_device(name, v, cost, "cost")
    if v.ndim < 1 or v.shape[-1] != size:
        raise ShapeError(
            f"{name} must have shape (*batch, {size}) to match cost's {side} ({size}), "
            f"got shape {tuple(v.shape)}"
        )
    check_finite(name, v)
    return v


def marginal_parts(name: str, v: torch.Tensor, v64: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool, tuple[float, float, float]]:
    """The checked marginal ``v`` (``v64``: its float64 copy) as (v/Σv, Σv/max v, max v)
    in float64, whether it has zeros, and host numbers: the largest and the smallest
    mass Σv and the smallest positive share v/Σv (the backward's gain, see
    :mod:`convexddn.nodes._overflow`, and the range of the plan's row and column sums).

    Σv itself may overflow (entries near float64's largest); Σv = (Σv/max v)·max v
    never multiplies out here: the plan is scaled by the two factors in turn.
    """
    peak = v64.amax(-1, keepdim=True)
    ratio = v64 / peak
    s = ratio.sum(-1, keepdim=True)
    unit = ratio / s
    # One host sync for the usual case (every entry positive, none too small); only
    # zeros or errors take a second one, for the breakdown. (An all-zero marginal has
    # peak 0 and a NaN unit.) The counts are exact in float64.
    share = unit.detach()
    low, high = torch.aminmax((s * peak).detach())
    flags = ((v <= 0).sum(dtype=torch.float64), (unit < MIN_SHARE).sum(dtype=torch.float64), high, low, share.amin())
    nonpos, small, *sizes = torch.stack(flags).tolist()
    if not (nonpos or small):
        return unit, s, peak, False, tuple(sizes)
    pos = v > 0
    counts = ((v < 0).sum(), (peak == 0).sum(), ((unit < MIN_SHARE) & pos).sum())
    # (with the smallest positive share, exact in float64 as the counts are)
    least = share.masked_fill(~pos, math.inf).amin()
    neg, empty, small, sizes[2] = torch.stack([t.to(torch.float64) for t in counts] + [least]).tolist()
    neg, empty, small = int(neg), int(empty), int(small)
    # The messages read values on the host from detached tensors: float() of a v that
    # requires grad adds torch's "requires_grad=True to a scalar" warning to the error.
    if neg:
        raise InputError(
            f"{name} must be >= 0 everywhere (a marginal of the plan; 0 marks padding), got "
            f"{neg} entr{'y' if neg == 1 else 'ies'} < 0 (min {float(v.detach().min()):.3g})"
        )
    if empty:
        raise InputError(
            f"{name} must have positive mass (at least one entry > 0 in each marginal), got "
            f"{empty} marginal{'' if empty == 1 else 's'} whose entries are all 0"
        )
    if small:
        raise InputError(
            f"{name}'s entries must each be at least {MIN_SHARE:.0e} of its sum (the plan "
            f"cannot represent less in float64) or exactly 0 (padding), got {small} "
            f"entr{'y' if small == 1 else 'ies'} below (smallest share {sizes[2]:.3g})"
        )
    return unit, s, peak, True, tuple(sizes)
