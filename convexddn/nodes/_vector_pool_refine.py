r"""Robust vector pooling's derivatives where the solution's rounding is coarse against
alpha: the sets translated to their solution and polished there.

The backward's terms :math:`\kappa_i, c_i, n_i` at :math:`z_i = \|y - x_i\|` vary on the
scale alpha, so a y known only to its rounding, about ``4 eps ‖y‖∞``
(:func:`convexddn.nodes.pooling.rounding.grid`), moves them by that over alpha. The
solver moves a set far from 0 to its midpoint first (:mod:`._vector_pool_units`), but not
a set with an outlier near 0 (a cluster at 1000 + 0.002 randn in 3-D, one vector at 0,
alpha 0.003 in float32: y off by 1e-2 alpha, dy/dx off by 9e-3 (pseudo-Huber) to 0.7
(Huber's inlier set), without a warning). Where that grid exceeds the gradient's bound
(:func:`~convexddn.nodes.pooling.rounding.coarse_rows`), the set is translated by y
(``x_i - y`` is exact near y, in the working dtype) and polished from the origin, where the
grid is that of the small correction, before its terms are formed. ``y(x + t) = y(x) + t``:
the derivatives are those of the set at the refined point.

The polish aims at :data:`~convexddn.nodes.pooling.rounding._GRADIENT_GRID` alpha. A set it
leaves short of that is judged by what its derivatives depend on: the bound on y's distance
to the minimiser (the gradient's rounding noise, or the gradient, over H's smallest
eigenvalue, plus y's own grid) against that fraction of the smallest scale on which the
set's terms vary (:meth:`~convexddn.nodes.pooling.penalties.Penalty.weight_scale`: alpha
near a data point; pseudo-Huber's and Huber's far terms vary on their distance). In
float32 the target is out of reach once the set spreads over ~2000 alpha (the rounding of
far points' terms), where those terms vary on their own distance: 64 sets of 50
standard-normal points at alpha 1e-4 were all warned about, with gradients within 9e-7 of
float64's. Only a set whose y is coarse against its terms' scale is named.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .._warn import warn
from .degeneracy import shown_indices
from ..errors import GradientWarning
from ._vector_pool_polish import _polish_irls, polish
from ._vector_pool_rare import gradient_noise, lowest
from ._vector_pool_solvers import geometry, kappa, unit
from .pooling.penalties import Penalty, TruncatedQuadratic
from .pooling.rounding import _GRADIENT_GRID, coarse_mask, grid

# The polish stops on a Newton step within _GRADIENT_GRID alpha (and returns that step's
# point, about its square over alpha off): the bound the other sets' y meet. (With the
# solver's tol, 1e-6 (alpha + ‖u‖∞), the origin's tolerance is 1e-6 alpha, at float32's
# noise floor there: Welsch sets were called unresolved with their derivatives at 3e-7.)
_MAX_ITER = 100


def per_set(pen: Penalty, x: torch.Tensor, alpha: torch.Tensor, y: torch.Tensor,
            fn: Callable[..., tuple], far: bool | None, batch: tuple[int, ...]) -> tuple:
    """``fn(x, alpha, y, idx)`` (a tuple of per-set tensors, sets first, or None) for every
    set (``idx`` None), its coarse sets' entries formed again at their refined geometry
    (``idx`` their indices, ``x``, ``alpha`` and ``y`` those sets' translated ones); a
    GradientWarning names the sets whose polish did not resolve.

    ``x (R, N, C)``, ``alpha (R,)`` or 0-d, ``y (R, C)``, in the solver's units; ``far``:
    :func:`~convexddn.nodes.pooling.rounding.coarse_flag`, if the forward read it; ``batch``:
    the caller's batch shape of the R sets, in which the warning names them."""
    out = fn(x, alpha, y, None)
    if far is False:
        return out
    coarse = coarse_mask(y, alpha)
    if not bool(coarse.any()):
        return out
    idx = coarse.nonzero().squeeze(-1)
    xs = x.index_select(0, idx) - y.index_select(0, idx).unsqueeze(-2)
    a_i = alpha.index_select(0, idx) if alpha.dim() else alpha
    a = a_i.unsqueeze(-1) if a_i.dim() else a_i
    u = torch.zeros_like(y.index_select(0, idx))
    tol = _GRADIENT_GRID
    if isinstance(pen, TruncatedQuadratic):  # its Newton step is the IRLS step (as the solver)
        u, unres = _polish_irls(pen, xs, u, a, tol, _MAX_ITER), None
    else:
        u, unres = polish(pen, xs, u, a, tol, _MAX_ITER)
        if bool(unres.any()):
            unres = _coarse_for_terms(pen, xs, u, a, unres)
    n_unres = 0 if unres is None else int(unres.sum())
    if n_unres:
        bad = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device).index_fill(0, idx[unres], True)
        warn(f"robust_vector_pool(penalty={pen.name!r}): y's rounding exceeds {_GRADIENT_GRID:.2g} alpha "
             f"for {idx.numel()} of {y.shape[0]} set(s), and at {shown_indices(bad, batch)} of them the polish "
             f"from y did not resolve their minimiser to {_GRADIENT_GRID:.2g} of the scale on which their terms vary "
             "(alpha near a data point); their derivatives are taken where it stopped", GradientWarning)
    sub = fn(xs, a_i, u.detach(), idx)
    return tuple(o if o is None else o.index_copy(0, idx, s.to(o.dtype)) for o, s in zip(out, sub))


def _coarse_for_terms(pen: Penalty, xs: torch.Tensor, u: torch.Tensor, a: torch.Tensor,
                      rows: torch.Tensor) -> torch.Tensor:
    """Of the ``rows`` (bool, (r,)) the polish left unresolved, those whose y is not within
    _GRADIENT_GRID of the smallest scale on which their terms vary (module docstring):
    y's distance to the minimiser bounded by max(noise, ‖g‖) / λ_min(H) (the polish's noise
    of g, :mod:`._vector_pool_polish`) plus y's own grid. ``xs`` (r, N, C) translated,
    ``u`` (r, C), ``a`` 0-d or (r, 1)."""
    j = rows.nonzero().squeeze(-1)
    with torch.no_grad():
        x_j, u_j = xs.index_select(0, j).detach(), u.index_select(0, j).detach()
        a_j = a.index_select(0, j).detach() if a.dim() else a.detach()
        d, z = geometry(x_j, u_j)
        k1, d2 = kappa(pen, z, a_j), pen.d2phi(z, a_j)
        g = torch.linalg.vector_norm((k1.unsqueeze(-2) @ d).squeeze(-2), dim=-1)
        noise = gradient_noise(k1, d2, z)
        lam = lowest(k1.sum(-1), unit(d, z), d2 - k1)[0]
        eps = torch.finfo(z.dtype).eps
        off = torch.where(lam > 0, torch.maximum(noise, g) / lam, math.inf) + grid(u_j.abs().amax(-1), eps)
        coarse = off > _GRADIENT_GRID * pen.weight_scale(z, a_j).amin(-1)
    return rows.index_put((j,), coarse)
