"""The eigen decomposition node's computation: the forward (one batched ``eigh`` in
float64) and its autograd Function with the implicit VJP and JVP (the maths is in
:mod:`convexddn.nodes.eigen`'s docstring, the degenerate pairs in :mod:`._eigen_degenerate`).
"""
from __future__ import annotations

import math

import torch

from .._anchor import graph_anchor
from .._autograd import any_batched, bind_fast, without_autocast
from .._first_order import first_order, first_order_jvp
from .._checks import check_finite
from .._pow2 import pow2_floor
from ..errors import SolverError
from ._overflow import may_overflow, warn_gradient_overflow
from .degeneracy import failed_indices
from ._eigen_degenerate import (
    sign_ties,
    warn_degenerate_pairs,
    warn_degenerate_tangent,
    warn_degenerate_values,
    warn_sign_ties,
    warn_unchecked,
)

# The decomposition is computed in float64 and cast back: a float32 eigen solve has
# eigenvalue errors of ~1e-7·‖X‖, which the 1/(λ_i − λ_j) of the backward turns into
# gradient errors of 1e-7·‖X‖/gap — 10% at a relative gap of 1e-6. In float64 the same
# input gives float32-exact outputs and gradients.
_WORK = torch.float64



def _gap_unit(top: torch.Tensor, lo: float, hi: float, dtype: torch.dtype) -> torch.Tensor | None:
    """The unit c the eigenvalue gaps are formed in, μ/c: None where every max|μ| (``top``,
    between ``lo`` and ``hi``) lies in [2^-60, 2^60], else a power of two near each (at
    least the smallest normal number of ``dtype``, that of the products): exact, and
    2(μ_i − μ_j) no longer overflows from |λ| ~ 9e307 (inf − inf: NaN), nor a float32 gap
    of subnormal eigenvalues to an infinite reciprocal."""
    return None if 2.0**-60 <= lo and hi <= 2.0**60 else pow2_floor(top.clamp_min(torch.finfo(dtype).tiny))


def _selected_gaps(mu: torch.Tensor, k: int) -> torch.Tensor:
    r"""``(…, min(k, N − 1))`` the consecutive gaps :math:`\mu_{m+1} - \mu_m`, m < k, of the sorted
    ``mu`` ``(…, N)``: those that touch a returned eigenvalue. A pair (j, i), i < k, within a
    limit has one of them within it (the one beside i towards j), and a tie among the
    unreturned eigenvalues enters no formula (its eigenspace's projector is defined), so
    the degeneracy checks of both modes test these only (all N − 1 gaps warned under
    jacrev for S = Q diag(5, 4, 1, 1, 1) Qᵀ, k = 2, whose Jacobian is exact)."""
    return mu[..., : k + 1].diff(dim=-1)


def _gain(gap_tol: float, lo: float) -> float:
    """The largest factor 1/|λ_i − λ_j| of a kept pair (the derivative's gain, against the
    dtype's range): at most 1/(gap_tol · min max|μ|)."""
    return math.inf if not gap_tol * lo > 0 else 1.0 / (gap_tol * lo)


def _product_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the backward's matrix products: the input's, at least float32.

    The eigenvalue gaps are always float64 (the precision that matters, see ``_WORK``);
    the products ``Vᵀ G`` and ``V C V_kᵀ`` with an orthogonal ``V`` are normwise stable,
    so in float32 they add a few ε₃₂ to the gradient (measured on 256 random 32 × 32
    matrices, relative gaps down to 5e-4: median 1.9e-7, max 5.9e-7 against the float64
    products) at a quarter of the float64 products' cost.
    """
    return torch.promote_types(dtype, torch.float32)


def _eigen_forward(
    X: torch.Tensor, k: int, largest: bool, keep: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Return (λ_k, V_k) in X's dtype and, with ``keep``, (μ, V) for the backward.

    ``eigh`` runs on :math:`S = s\\,\\mathrm{sym}(X)` with :math:`s = -1` for the largest
    eigenvalues: its ascending order is then X's descending one, so the returned
    columns are always the first k (no reordering copies) and :math:`\\lambda = s\\mu`.
    μ is float64 and V in :func:`_product_dtype`; V_k is a copy of its first k columns
    for k < N, and V itself for k = N when V has X's dtype (float32 or float64).
    """
    Xw = X.to(_WORK)
    h = -0.5 if largest else 0.5
    S = torch.add(Xw * h, Xw.mT, alpha=h)  # halves first: X + Xᵀ overflows near the float range's end
    # Finiteness is checked on the (…, N) eigenvalues, not on the (…, N, N) input: a
    # NaN or Inf in X makes eigh fail or return non-finite eigenvalues, and only then
    # is X scanned for the precise error (the scan cost 15 % of the 32 × 32 overhead).
    try:
        mu, V = torch.linalg.eigh(S)
    except torch.linalg.LinAlgError:
        check_finite("X", X)
        raise SolverError("eigen_decomposition: eigh failed on a finite X (entries of extreme "
                          "magnitude overflow it)") from None
    Vk = V[..., :k]
    # Sign convention: the largest-|component| entry of each returned eigenvector is
    # positive, i.e. max_i v_i + min_i v_i > 0; cheaper than an argmax, which only an
    # exact tie (max = -min) needs: there the first of the tied entries decides. Fixed
    # in V itself, so the saved V carries the same signs. (amax + amin: torch's aminmax
    # is 3× slower than the two on these shapes.)
    s = Vk.amax(-2, keepdim=True).add_(Vk.amin(-2, keepdim=True))
    lam_k = mu[..., :k].neg() if largest else mu[..., :k]
    # Its own storage, not a view of μ (which the Function returns too: forward mode
    # refuses an output that views another with a tangent laid out otherwise).
    lam_out = lam_k.to(X.dtype, copy=keep and not largest)
    # One host sync: eigenvalues finite (in float64, and in X's dtype), any exact tie?
    finite, fits, tie = torch.stack([torch.isfinite(mu).all(), torch.isfinite(lam_out).all(),
                                     (s == 0).any()]).tolist()
    if not finite:
        check_finite("X", X)
    if not (finite and fits):
        bad = ~(torch.isfinite(mu).all(-1) & torch.isfinite(lam_out).all(-1))  # (X's batch shape)
        indices = failed_indices(bad, bad.shape)
        raise SolverError(f"eigen_decomposition: the eigenvalues of a finite X overflow {X.dtype} for "
                          f"{len(indices)} of {bad.numel()} matrices (batch indices {indices[:8]}; entries of "
                          "extreme magnitude); scale X down", indices=indices, statuses=["overflow"] * len(indices))
    if tie:
        first = Vk.abs().argmax(-2, keepdim=True)  # the first of the largest |entries|
        s = torch.where(s == 0, Vk.gather(-2, first), s)
    Vk.mul_(s.lt_(0).mul_(-2.0).add_(1.0))
    # The returned eigenvectors own their storage when k < N (a view of V would pin all
    # N² entries, and a custom Function's view output refuses in-place edits); all N of
    # them in the product dtype are V itself, which the backward saves (an in-place edit
    # then fails at backward, as for torch.linalg.eigh).
    n = V.shape[-1]
    if not keep:
        return lam_out, Vk.to(X.dtype, copy=k < n), None, None
    V = V.to(_product_dtype(X.dtype))
    return lam_out, (V if k == n and V.dtype == X.dtype else V[..., :k].to(X.dtype, copy=True)), mu, V


@bind_fast  # (setup_context, as torch.func needs, without apply's binding cost)
class _EigenFunction(torch.autograd.Function):
    """(λ_k, V_k) = top-k (or bottom-k) eigenpairs of sym(X) with the implicit VJP and JVP.

    Outputs ``(λ_k, V_k, μ, V)``: μ and all N eigenvectors V are what the derivatives
    need (outputs, not hidden state, so that torch.func can trace them), marked not
    differentiable; ``V`` is None where V_k is V itself (all N asked for in V's dtype).
    """

    # torch.func.jacfwd vmaps the jvp over tangents (it worked through eigh's own
    # derivative before forward mode came here); the rule torch generates does.
    generate_vmap_rule = True

    @staticmethod
    def forward(X, k, largest, gap_tol):  # type: ignore[override]
        lam_k, Vk, mu, V = _eigen_forward(X, k, largest, keep=True)
        return lam_k, Vk, mu, (None if V is Vk else V)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        X, k, largest, gap_tol = inputs
        _, Vk, mu, V = output
        ctx.mark_non_differentiable(*(t for t in (mu, V) if t is not None))
        # (μ, V) are saved; the eigenvectors returned are V itself when all N are asked
        # for in V's dtype (an in-place edit of them then fails at backward, as for
        # torch.linalg.eigh), else a copy; the eigenvalues are a new tensor.
        V = Vk if V is None else V
        ctx.save_for_backward(mu, V)
        ctx.save_for_forward(mu, V)
        # X's graph, not X (which the derivatives do not read): a second differentiation's error
        # (see first_order) without holding X past a checkpointed forward (convexddn._anchor)
        ctx.anchors = graph_anchor(X)
        ctx.k, ctx.sign, ctx.gap_tol, ctx.dtype = k, -1.0 if largest else 1.0, gap_tol, X.dtype
        # Unused outputs arrive as None: an eigenvalue-only loss skips the eigenvector
        # term (and its degeneracy warning) entirely.
        ctx.set_materialize_grads(False)

    @staticmethod
    @first_order_jvp("eigen_decomposition")
    @without_autocast
    def jvp(ctx, X_t, *_):  # type: ignore[override]
        r"""Forward mode: with :math:`M = V^\top \mathrm{sym}(\dot X) V_k`,
        :math:`\dot\lambda_i = M_{ii}` and :math:`\dot v_i = \sum_{j \ne i} v_j
        M_{ji} / (\lambda_i - \lambda_j)` (Magnus 1985), the degenerate pairs' terms
        dropped as in the backward, with a warning where the tangent has a part there."""
        mu, V = ctx.saved_tensors
        k, sign = ctx.k, ctx.sign
        sel = slice(0, k)
        if X_t is None:
            return None, None, None, None
        D = X_t.to(V.dtype)
        D = (D + D.mT).mul_(0.5)
        M = V.mT @ (D @ V[..., sel])  # M_ji = v_jᵀ sym(Ẋ) v_i
        # (M's own diagonal, its first k rows': M[..., :k, :] is an alias at k = N, which
        # autograd's vmap of the tangents, jacobian(vectorize=True), cannot batch)
        dlam = torch.diagonal(M, dim1=-2, dim2=-1).to(ctx.dtype, copy=True)  # (M is divided in place)
        if M.numel() == 0:  # an empty batch: no pairs, and top.amin() below has no identity
            return dlam, (V @ M).to(ctx.dtype), None, None  # (from M: batched as it is under jacfwd)
        top = mu.abs().amax(-1, keepdim=True)
        limit = ctx.gap_tol * top
        ties = sign_ties(V[..., sel])  # (V, not M: under jacfwd's vmap M is batched)
        near = _selected_gaps(mu, k) <= limit  # (a tie among unreturned eigenvalues: no term)
        any_near, any_tie, lo, hi = torch.stack([near.any(), ties.any(), top.amin(), top.amax()]).tolist()
        # λ_i − λ_j = s(μ_i − μ_j): the difference in float64, rounded once into M's dtype,
        # in the backward's unit (a float32 X of 1e-40 gave subnormal gaps, infinite
        # reciprocals and NaN tangents, silently).
        c = _gap_unit(top, lo, hi, M.dtype)
        mu_s = (mu if c is None else mu.div(c)).mul(sign)
        gap = (mu_s[..., None, sel] - mu_s[..., :, None]).to(M.dtype)
        torch.diagonal(gap[..., sel, :], dim1=-2, dim2=-1).fill_(math.inf)
        # Tangents batched by jacfwd: no per-direction host read (M is batched).
        batched = any_batched(X_t)
        if batched and (any_near or any_tie):
            warn_unchecked(near, ties, ctx.gap_tol, "tangent")
        elif any_tie:
            # (M's diagonal only moves the eigenvalues: a tangent commuting with X, whose
            # eigenvector tangent is 0, was warned about)
            off = M.clone()
            torch.diagonal(off[..., sel, :], dim1=-2, dim2=-1).zero_()
            warn_sign_ties(ties, off, "tangent")
        if any_near:
            degenerate = gap.abs() <= (limit if c is None else limit.div(c)).unsqueeze(-1)
            if not batched:
                all_diag = (V * (D @ V)).sum(-2)  # M_jj for every j: the tangent splits a tie?
                warn_degenerate_tangent(M, all_diag, degenerate, sel, ctx.gap_tol)
            gap.masked_fill_(degenerate, math.inf)
        M.div_(gap)
        dV = (V @ (M if c is None else M.div_(c.to(M.dtype).unsqueeze(-1)))).to(ctx.dtype)
        # A tangent beyond the dtype's range warns, as the backward's gradient does (a
        # float16 gap of 2^-10 against a tangent of 100: ±inf, silently).
        if may_overflow(_gain(ctx.gap_tol, lo), ctx.dtype) and not batched:
            # (X keeps the caller's batch dims: named in them)
            warn_gradient_overflow("eigen_decomposition (forward mode)", X_t, [("eigenvectors", dV)], (-2, -1))
        return dlam, dV, None, None

    @staticmethod
    @first_order("eigen_decomposition")
    @without_autocast  # the products stay in their dtype (bfloat16 autocast: 1e-3 off)
    def backward(ctx, g_lam, g_vec, _g_mu, _g_V):  # type: ignore[override]
        if not ctx.needs_input_grad[0] or (g_lam is None and g_vec is None):
            return None, None, None, None
        # Differentiated as the bottom-k eigenpairs of S = s·sym(X): dL/dμ_k = s·g_λ and
        # dL/dX = s·dL/dS.
        mu, V = ctx.saved_tensors
        if V.numel() == 0:  # an empty batch (the reductions below have no identity)
            return torch.zeros_like(V, dtype=ctx.dtype), None, None, None
        k, sign = ctx.k, ctx.sign
        sel = slice(0, k)
        Vk = V[..., sel]
        # C (…, N, k): coefficients of Σ_j Σ_i C_ji v_j v_iᵀ, rows over all eigenvectors
        # j, columns over the selected ones i, scaled by s/2 (the sign and the 1/2 of
        # sym) so that the symmetrisation below is one add.
        top = mu.abs().amax(-1, keepdim=True)
        limit = ctx.gap_tol * top
        # mu is sorted: a degenerate pair (j, i), i < k, exists iff a gap beside a returned
        # eigenvalue is small, a (k,) test per matrix that spares the common case the (N, k) masks.
        gaps = _selected_gaps(mu, k)
        near = gaps <= limit
        # Ties of the sign convention (on V, not on g_vec: under jacrev's vmap it is batched).
        ties = None if g_vec is None else sign_ties(Vk)
        checks = [near.any(), top.amin(), top.amax()] + ([] if ties is None else [ties.any()])
        any_near, lo, hi, *any_tie = torch.stack(checks).tolist()  # one sync
        gain = 0.0 if g_vec is None else _gain(ctx.gap_tol, lo)
        # Cotangents batched by jacrev or is_grads_batched: no per-direction host read.
        # (Asked only where a check needs one: the dispatch-key test costs ~15 µs.)
        overflow = may_overflow(gain, ctx.dtype)
        rare = any_near or any(any_tie) or overflow
        batched = rare and any_batched(g_lam, g_vec)
        if batched:
            if any_near or any(any_tie):
                warn_unchecked(near, ties, ctx.gap_tol, "gradient")
        else:
            if any(any_tie):
                warn_sign_ties(ties, g_vec, "gradient")
            if g_lam is not None and any_near:
                warn_degenerate_values(near, gaps / top.clamp_min(torch.finfo(top.dtype).tiny), g_lam, k,
                                       ctx.gap_tol)
        if g_vec is not None:
            W = V.mT @ g_vec.to(V.dtype)  # W_ji = v_jᵀ g_i
            # 2s(μ_i − μ_j), the difference in float64 rounded once into W's dtype, on μ/c
            # (:func:`_gap_unit`) and C divided by c at the end.
            c = _gap_unit(top, lo, hi, W.dtype)
            mu2 = (mu if c is None else mu.div(c)).mul(2.0 * sign)
            gap = (mu2[..., None, sel] - mu2[..., :, None]).to(W.dtype)
            # 1/gap with the diagonal j = i (and degenerate pairs) sent to 1/inf = 0.
            torch.diagonal(gap[..., sel, :], dim1=-2, dim2=-1).fill_(math.inf)
            if any_near:
                degenerate = gap.abs() <= (limit if c is None else limit.div(c)).mul(2.0).unsqueeze(-1)
                if not batched:
                    warn_degenerate_pairs(W, degenerate, sel, ctx.gap_tol, uses_values=g_lam is not None)
                gap.masked_fill_(degenerate, math.inf)
            C = W.mul_(gap.reciprocal_())
            if c is not None:
                C.div_(c.to(W.dtype).unsqueeze(-1))
        else:
            C = V.new_zeros(mu.shape + (k,))
        if g_lam is not None:
            # s·g_λ on the diagonal, times the s/2 of C: g_λ/2. (Not in place: under
            # torch.func.jacrev g_λ is batched and C need not be.)
            lam = torch.diag_embed(g_lam.to(V.dtype) * 0.5)
            C = C + (lam if k == mu.shape[-1] else torch.nn.functional.pad(lam, (0, 0, 0, mu.shape[-1] - k)))
        grad = (V @ C) @ Vk.mT
        grad = (grad + grad.mT).to(ctx.dtype)
        if overflow and not batched:
            warn_gradient_overflow("eigen_decomposition", g_vec, [("X", grad)], (-2, -1))
        return grad, None, None, None
