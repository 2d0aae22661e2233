"""The autograd Function of :func:`convexddn.nodes.transport.sinkhorn`: the solve, the
implicit backward through the marginal constraints and its forward-mode twin (the
formulas are in :mod:`convexddn.nodes.transport`'s docstring; padding in
:mod:`convexddn.nodes._sinkhorn_padding`)."""
from __future__ import annotations

import math

import torch

from .._autograd import bind_fast, refuse_batched
from .._anchor import graph_anchor
from .._first_order import first_order, first_order_jvp
from .._warn import warn
from ..errors import GradientWarning, InputError
from ._overflow import warn_gradient_overflow
from .degeneracy import shown_indices, unravel
from ._sinkhorn import solve
from ._sinkhorn_schur import (back_substitute, held_columns, lambda_min_lower, lambda_min_upper, polish, refine,
                             relative_error, row_sums, schur_rhs, schur_solve)
from ._sinkhorn_padding import Padding, fill_dead

__all__ = ["ACCURACY", "SinkhornFn", "Box", "Polish", "dual_solve"]

# The relative accuracy the docs promise for the gradients, by the caller's dtype (float64:
# central differences to 1e-8; narrower: the dtype's rounding, float32's 6e-8 up to 1e-7).
ACCURACY = {torch.float64: 1e-8, torch.float32: 1e-7, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# The marginals' derivatives are off by up to about the plan's relative marginal error η
# times ‖S⁻¹D‖∞ = 1/lo (:func:`~._sinkhorn_schur.lambda_min_lower`; measured on 4 × 4
# balanced two-cluster plans, where it is a quarter of the L1 error over the unscaled
# λ_min: 0.18 of that gave 1 %, 4.4 gave 13 %): where η/lo is above the accuracy the plan
# is polished, and where it stays above that, dual_solve warns (the ratio itself is the
# test, with no factor).


class Box:
    """What the forward hands to setup_context besides its outputs (an object: torch.func
    passes it through as it is, where a list would be rebuilt). Set by the caller:
    ``gibbs``, whether a marginal needs a gradient (only those read the completion G);
    ``check``, whether the cost gradient and the plan tangent may overflow float64
    (:func:`~convexddn.nodes._overflow.may_overflow` of the gain, see ``backward``);
    ``accuracy``, the relative accuracy promised for the marginals' derivatives
    (``ACCURACY`` of the caller's narrowest dtype); ``batch``, the caller's batch shape of
    the rows, in which the warnings name the elements."""

    __slots__ = ("pad", "G", "gibbs", "check", "accuracy", "batch")

    def __init__(self, gibbs: bool, check: bool, accuracy: float, batch: tuple[int, ...]) -> None:
        self.pad, self.G, self.gibbs, self.check, self.accuracy = None, None, gibbs, check, accuracy
        self.batch = batch


@bind_fast  # (setup_context, as torch.func needs, without apply's binding cost)
class SinkhornFn(torch.autograd.Function):
    """Sinkhorn (kernel or log domain) + Newton forward; implicit backward through P1 = a, Pᵀ1 = b."""

    @staticmethod
    def forward(C, a, b, eps, max_iter, tol, cols_exact, holes, box):  # type: ignore[override]
        # holes: None, or whether a, b have zeros; box (a _Box) takes the padding masks
        # and the plan's completion G for setup_context (neither is an output).
        pad = None if holes is None else Padding(a, b, *holes)
        P, err, box.G = solve(C, a, b, eps, max_iter, tol, cols_exact, pad, gibbs=box.gibbs)
        box.pad = pad
        return P, err

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        _, err = output
        pad, G = inputs[-1].pad, inputs[-1].G
        ctx.mark_non_differentiable(err)
        ctx.set_materialize_grads(False)  # no zeros for err's (absent) gradient
        ctx.save_for_backward(output[0], G, inputs[1], inputs[2])  # (err: not needed, not kept)
        ctx.save_for_forward(output[0], inputs[1], inputs[2])
        ctx.anchors = graph_anchor(*inputs[:3])  # (their graph, not them: see first_order)
        ctx.eps, ctx.pad, ctx.flip = inputs[3], pad, inputs[6]  # (flip: a and b are the caller's b and a)
        ctx.check, ctx.accuracy, ctx.batch = inputs[-1].check, inputs[-1].accuracy, inputs[-1].batch

    @staticmethod
    @first_order_jvp("sinkhorn")
    def jvp(ctx, C_t, a_t, b_t, *_):  # type: ignore[override]
        """Forward mode: dP = P ∘ (dα1ᵀ + 1dβᵀ − dC/ε) with K (dα, dβ) = (da + Q1, db +
        Qᵀ1), Q = P ∘ dC/ε, dβ = 0 on the heaviest column: the backward's system (K is symmetric), solved by
        the same Schur complement. (1ᵀda = 1ᵀdb = 0 for the unit-mass marginals the
        solver sees, so the dropped equation holds.)"""
        refuse_batched("sinkhorn", C_t, a_t, b_t, tangents=True)
        P, a, b = ctx.saved_tensors
        pad = ctx.pad
        if pad is not None:
            # Along a zero marginal entry only a ≥ 0 is feasible: the derivative there is
            # one-sided (reverse mode gives its limit), not a linear map of the tangent.
            names = ("b", "a") if ctx.flip else ("a", "b")
            for name, t, dead in ((names[0], a_t, pad.dead_r), (names[1], b_t, pad.dead_c)):
                if t is not None and bool((t.to(P.dtype) * dead).ne(0).any()):
                    raise InputError(
                        f"sinkhorn: the tangent of {name} is nonzero at zero entries of {name} (padding); "
                        f"the derivative there is one-sided ({name} >= 0), so forward mode is not "
                        "defined along it; reverse mode gives the one-sided gradient")
        Q = None if C_t is None else P * C_t.to(P.dtype) / ctx.eps
        u = P.new_zeros(P.shape[:-1]) if Q is None else Q.sum(-1)
        w = P.new_zeros(P.shape[:-2] + P.shape[-1:]) if Q is None else Q.sum(-2)
        if a_t is not None:
            u = u + a_t.to(P.dtype)
        if b_t is not None:
            w = w + b_t.to(P.dtype)
        # (Padding: dead rows get r = 1 and u = 0, so dα = 0 there; dead columns are held
        # fixed with the heaviest live one, as in the backward. P and Q are 0 on both.)
        r = row_sums(P, None if pad is None else pad.pad_r)

        def rhs(Pk, k):  # (u, w) at polished plans of elements k
            Qk = None if C_t is None else Pk * C_t.to(P.dtype).expand(P.shape)[k] / ctx.eps
            uk = Pk.new_zeros(Pk.shape[:-1]) if Qk is None else Qk.sum(-1)
            wk = Pk.new_zeros(Pk.shape[:-2] + Pk.shape[-1:]) if Qk is None else Qk.sum(-2)
            for t, s in ((a_t, uk), (b_t, wk)):
                if t is not None:
                    s.add_(t.to(P.dtype).expand(P.shape[:1] + s.shape[1:])[k])
            return uk, wk

        marginals = a_t is not None or b_t is not None
        P0 = P
        dalpha, dbeta, P = dual_solve(P, r, u, w, held_columns(b) if pad is None else pad.fixed,
                                      "the tangent with respect to the marginals",
                                      _fix(ctx, a, b, rhs) if marginals else None, ctx.batch)
        dP = (dalpha.unsqueeze(-1) + dbeta.unsqueeze(-2)).mul_(P)
        if Q is None:  # (without a cost tangent nothing is divided by eps)
            return dP, None
        dP.sub_(Q if P is P0 else P * C_t.to(P.dtype) / ctx.eps)  # (polished plans: their own Q)
        if ctx.check:  # (a NaN or Inf tangent of a or b reaches every entry: not ours)
            given = C_t if a_t is None else C_t + a_t.unsqueeze(-1) * 0
            given = given if b_t is None else given + b_t.unsqueeze(-2) * 0
            warn_gradient_overflow("sinkhorn (forward mode)", *_in_batch(ctx, given, "the plan", dP), (-2, -1),
                                   tangent=True)
        return dP, None

    @staticmethod
    @first_order("sinkhorn")
    def backward(ctx, V, _grad_err):  # type: ignore[override]
        P, G, a, b = ctx.saved_tensors
        pad = ctx.pad
        if V is None:
            return (None,) * 9
        refuse_batched("sinkhorn", V)  # (torch.func.jacrev: its solve reads on the host)
        Q = V * P
        u, w = Q.sum(-1), Q.sum(-2)
        # (Padding: r = 1 on dead rows, whose P, Q rows are 0; μ = 0 on dead columns and
        # the heaviest live one, which is held as the heaviest is without padding.)
        r = row_sums(P, None if pad is None else pad.pad_r)
        marginals = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        P0 = P
        lam, mu, P = dual_solve(P, r, u, w, held_columns(b) if pad is None else pad.fixed,
                                "the gradients with respect to the marginals",
                                _fix(ctx, a, b, lambda Pk, k: _sums(V.expand(P.shape)[k] * Pk)) if marginals else None,
                                ctx.batch)
        Q = Q if P is P0 else V * P  # (polished plans: their own Q)
        if pad is not None and G is not None:  # the one-sided limits on dead rows and columns
            lam, mu = fill_dead(G, V, lam, mu, pad)
        grad_C = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            # P ∘ (λ1ᵀ + 1μᵀ − V) / ε = (P ∘ (λ1ᵀ + 1μᵀ) − Q) / ε, in one buffer. λ1ᵀ + 1μᵀ
            # is V's projection in the P-weighted inner product (K's equations are its
            # normal equations), so Σ P (λ + μ − V)² ≤ Σ P V² and each entry is at most
            # √P_ij ‖V‖∞ / ε: a gain of 1/ε on the unit-mass plan (Σa/ε for the caller's
            # V), beyond float64 only where eps is tiny (2e-307: Inf, silently), checked.
            grad_C = (lam.unsqueeze(-1) + mu.unsqueeze(-2)).mul_(P).sub_(Q).div_(ctx.eps)
            if ctx.check:
                warn_gradient_overflow("sinkhorn", *_in_batch(ctx, V, "cost", grad_C), (-2, -1))
        if ctx.needs_input_grad[1]:
            grad_a = lam
        if ctx.needs_input_grad[2]:
            grad_b = mu
        return grad_C, grad_a, grad_b, None, None, None, None, None, None


def _in_batch(ctx, given: torch.Tensor, name: str, out: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The overflow check's incoming derivative and its (name, derivative), viewed in the
    caller's batch shape: its message then names the elements as it indexes them."""
    shape = (*ctx.batch, *out.shape[-2:])
    return given.expand(out.shape).reshape(shape), [(name, out.reshape(shape))]


def _sums(Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return Q.sum(-1), Q.sum(-2)


def _fix(ctx, a: torch.Tensor, b: torch.Tensor, rhs) -> "Polish":
    """The backward's or jvp's :class:`Polish` (a, b: the solver's marginals, maybe expanded)."""
    pad = ctx.pad
    return Polish(a, b, None if pad is None else pad.pad_r, ctx.accuracy, rhs)


class Polish:
    """What :func:`dual_solve` needs to polish a loose element's plan (:func:`~._sinkhorn_schur.polish`):
    the solver's unit-mass marginals ``a``, ``b`` (B, M), (B, N), the padding's ``pad_r``
    (or None), the promised relative ``accuracy`` of the gradients, and ``rhs(P, idx)``,
    the system's right-hand side (u, w) for the plans P of batch elements idx."""

    __slots__ = ("a", "b", "pad_r", "accuracy", "rhs")

    def __init__(self, a, b, pad_r, accuracy, rhs) -> None:
        self.a, self.b, self.pad_r, self.accuracy, self.rhs = a, b, pad_r, accuracy, rhs


def dual_solve(P: torch.Tensor, r: torch.Tensor, u: torch.Tensor, w: torch.Tensor,
               fixed: torch.Tensor, what: str, fix: Polish | None,
               batch: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(λ, μ, P) with K (λ, μ) = (u, w), K = [[diag(r), P], [Pᵀ, diag(Pᵀ1)]], μ = 0 on the
    ``fixed`` columns (:func:`~._sinkhorn_schur.held_columns`: each element's heaviest of b):
    μ from the Schur complement, then λ row by row. The backward's system and the jvp's
    (K is symmetric), with their warnings: non-finite results (an incoming gradient or
    tangent that is not finite, or overflowed float64) and a support split into
    disconnected blocks, where ``what`` is not unique (least norm returned).

    ``fix`` where the marginals' derivatives are asked for: a nearly disconnected support
    (two clusters far apart against ε) makes them as sensitive to the plan's relative
    marginal errors η (:func:`~._sinkhorn_schur.relative_error`) as ‖S⁻¹D‖∞ = 1/lo
    (:func:`~._sinkhorn_schur.lambda_min_lower`, D = diag(Pᵀ1): in these units a light
    column is no small eigenvalue, only a weak link between blocks is); the derivatives
    were off by up to that ratio (13 % off at a cross-cluster mass of 1e-13). Where η/lo
    exceeds ``fix.accuracy`` (1e-8 in float64), those elements' plans are
    polished by Newton steps on the marginal equations (:func:`~._sinkhorn_schur.polish`:
    the same cost, exact marginals to rounding) and their system solved again at the
    polished plan (:func:`~._sinkhorn_schur.refine`), which is returned in place of P there
    (else P itself): the derivatives are the exact solution map's at the given cost. Where
    the ratio is still above that (λ_min below about 1e-8 in float64, where the polished
    η is ~1e-16 × √M) it warns. One host sync tells whether any rare case needs a look.
    ``batch``: the caller's batch shape of the rows, in which the warnings name them."""
    rhs = schur_rhs(P, r, u, w)
    keep: list | None = None if fix is None else []
    c = None if fix is None else P.sum(-2)  # (the probe's and the relative error's)
    mu, bad, y = schur_solve(P, r, rhs, fixed, probe=c, keep=keep)
    # (a split support matters only to the marginals' derivatives: without them, no rare-case look for it)
    ok = torch.isfinite(mu.sum()) if fix is None else torch.isfinite(mu.sum()) & ~bad.any()
    low = loose = None
    if fix is not None:
        low, eta = lambda_min_lower(y), relative_error(P, fix.a, fix.b, c)
        loose = ~(eta <= fix.accuracy * low) & ~bad
    if not bool(ok if loose is None else ok & ~loose.any()):
        if loose is not None and bool(loose.any()):
            k = loose.nonzero().squeeze(-1)
            sub = fixed[k]
            pad = None if fix.pad_r is None else fix.pad_r[k]
            Pk, ek = polish(P[k], fix.a[k], fix.b[k], pad, sub, keep[0][k])
            uk, wk = fix.rhs(Pk, k)
            rk = row_sums(Pk, pad)
            rhs_k = schur_rhs(Pk, rk, uk, wk)
            mu_k = refine(Pk, rk, rhs_k, sub, keep[0][k])
            far = eta[k] > 1e-4 * low[k]  # (refinement's contraction, ~2 η/lo, too slow there:
            if bool(far.any()):           # the polished plan's own factorisation)
                j = far.nonzero().squeeze(-1)
                mu_k[j] = schur_solve(Pk[j], rk[j], rhs_k[j], sub[j])[0]
            P, u, r, mu = P.clone(), u.clone(), r.clone(), mu.clone()
            P[k], u[k], r[k], mu[k] = Pk, uk, rk, mu_k
            # Still above the accuracy (lo moves by about the ratio before polishing, a
            # factor of 2 at most)
            still = ek > fix.accuracy * low[k] * (1 - (eta[k] / low[k]).clamp(max=0.5))
            if bool(still.any()):
                _warn_loose(what, k[still], ek[still], low[k][still], y[k][still], Pk[still].sum(-2),
                            fix.accuracy, batch)
        lost = ~torch.isfinite(mu).all(-1)
        if bool(lost.any()):
            warn(
                f"sinkhorn: the gradient is not finite at {shown_indices(lost, batch)}: the incoming gradient is "
                "not finite there, or it overflowed float64 when scaled by the mass "
                "of a (over about 1e308 in all)",
                GradientWarning,
            )
        # (Only where the marginals' derivatives are asked for: the cost's is unaffected, and a loss
        # of the plan alone warned on 44 of 200 steps of a sort-learning loop at eps = 0.01.)
        if fix is not None and bool(bad.any()):
            warn(
                "sinkhorn: the transport plan's support splits into disconnected blocks, or blocks "
                "joined by mass below float64's rounding of the total (the Schur complement is "
                "singular to working precision; entries below 1e-154 count as zero), at "
                f"{shown_indices(bad, batch)}; {what} are not determined there and the "
                "least-norm ones are returned (the derivative with respect to the cost is "
                "unaffected)",
                GradientWarning,
            )
    return back_substitute(P, r, u, mu), mu, P


def _warn_loose(what: str, at: torch.Tensor, err: torch.Tensor, low: torch.Tensor, y: torch.Tensor,
                c: torch.Tensor, accuracy: float, batch: tuple[int, ...]) -> None:
    """The ill-conditioning warning for the elements ``at`` (their relative marginal errors
    after polishing, λ_min's lower bounds, probes and column sums), the worst one named
    with λ_min's bracket; as index tuples into ``batch``."""
    j = int((err / low).argmax())
    rows = torch.zeros(math.prod(batch), dtype=torch.bool, device=at.device).index_fill(0, at, True)
    where, worst = shown_indices(rows, batch), unravel(int(at[j]), batch)
    warn(
        f"sinkhorn: {what} are ill-conditioned (sensitive to rounding) at {where}: the plan's support is "
        "nearly disconnected (the smallest eigenvalue of the Schur complement scaled by the column masses is "
        f"{float(low[j]):.2e} to "
        f"{float(lambda_min_upper(y[j], c[j])):.2e} at element {worst}), and the marginals' relative "
        f"error ({float(err[j]):.1e}, after Newton steps on them) can move them by up to their ratio, "
        f"{float(err[j] / low[j]):.1e}, above the accuracy promised for the gradients ({accuracy:.0e}); "
        "raise eps (the clusters' distance over eps decides the link between them)",
        GradientWarning,
    )
