"""Gradient checks for declarative nodes, tuned for solver tolerances.

:func:`check_gradients` compares a node's backward (implicit or otherwise) with central
finite differences in float64 and reports the worst error, instead of the pass/fail of
:func:`torch.autograd.gradcheck`. Users call it on their own
:class:`~convexddn.DeclarativeNode` subclasses; it works for any callable ``x -> y``.

References:
    S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks", TPAMI 2021.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch

from ._checks import check_finite, check_positive, check_tensor
from .errors import DTypeError, GradientCheckError, InputError

__all__ = ["GradientReport", "GradientCheckError", "check_gradients"]


@dataclass(frozen=True)
class GradientReport:
    """Outcome of :func:`check_gradients`.

    Attributes:
        ok: every compared value satisfies ``|analytic - fd| <= atol + rtol * |fd|``.
        max_abs_error: the largest ``|analytic - fd|``.
        max_rel_error: ``max_abs_error`` divided by the largest ``|fd|`` (normwise, so
            entries that are zero do not blow it up).
        worst: where the largest absolute error is: ``(output index, input index)``
            into the flattened output and input for a full Jacobian, or
            ``(direction,)`` for a directional check.
        n_compared: how many Jacobian entries or directional derivatives were compared.
        mode: ``"jacobian"`` (every entry) or ``"directional"`` (random projections).
        eps, atol, rtol: the settings used.
    """

    ok: bool
    max_abs_error: float
    max_rel_error: float
    worst: tuple[int, ...]
    n_compared: int
    mode: str
    eps: float
    atol: float
    rtol: float

    def __str__(self) -> str:
        verdict = "passed" if self.ok else "FAILED"
        where = (
            f"output {self.worst[0]}, input {self.worst[1]}"
            if self.mode == "jacobian" and len(self.worst) == 2
            else f"direction {self.worst[0]}" if self.worst else "n/a"
        )
        return (
            f"gradient check {verdict}: max abs error {self.max_abs_error:.3e}, "
            f"max rel error {self.max_rel_error:.3e} (worst at {where}) over "
            f"{self.n_compared} {self.mode} comparison(s); "
            f"eps={self.eps:g}, atol={self.atol:g}, rtol={self.rtol:g}"
        )


def _as_float64(fn: Callable[[torch.Tensor], torch.Tensor]):
    """A float64 copy of a module whose floating tensors are not float64; else ``fn``."""
    if not isinstance(fn, torch.nn.Module):
        return fn
    tensors = list(fn.parameters()) + list(fn.buffers())
    if all(t.dtype == torch.float64 for t in tensors if t.is_floating_point()):
        return fn
    # Copy so that the caller's module keeps its dtype.
    return copy.deepcopy(fn).to(torch.float64)


def check_gradients(
    node_or_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    n_directions: int | None = None,
    raise_on_fail: bool = False,
    seed: int = 0,
) -> GradientReport:
    """Compare the backward of ``node_or_fn`` at ``x`` with central finite differences.

    With :math:`J` the Jacobian of :math:`y = \\text{node}(x)` given by its backward
    (one vector–Jacobian product per output entry) and

    .. math::

        \\tilde J_{:, j} = \\frac{y(x + \\varepsilon e_j) - y(x - \\varepsilon e_j)}
        {2 \\varepsilon},

    the check passes when :math:`|J - \\tilde J| \\le \\text{atol} + \\text{rtol}
    |\\tilde J|` entrywise. With ``n_directions = k`` it compares instead ``k`` random
    projections :math:`w_i^\\top J u_i` against
    :math:`w_i^\\top (y(x + \\varepsilon u_i) - y(x - \\varepsilon u_i)) / 2\\varepsilon`,
    which costs ``k`` backward and ``2k`` forward calls instead of one backward per
    output and two forwards per input.

    Everything runs in float64: ``x`` is converted, and a module with lower-precision
    parameters or buffers is checked through a float64 copy (the caller's module is left
    untouched). For nodes whose forward is an iterative solver the finite differences
    carry the solver's error divided by ``eps``: with a solver tolerance near ``1e-8``
    (e.g. a :class:`~convexddn.ConvexLayer`) use ``eps=1e-4`` or so, and keep ``x``
    away from points where the solution is not differentiable (kinks, changes of the
    active set).

    Args:
        node_or_fn: a :class:`~convexddn.DeclarativeNode`, any ``torch.nn.Module`` or
            callable mapping a tensor to a tensor.
        x: the point to check at; any shape the node accepts.
        eps: finite-difference step. Default ``1e-6``.
        atol: absolute tolerance. Default ``1e-5``.
        rtol: relative tolerance. Default ``1e-3``.
        n_directions: ``None`` (default) for the full Jacobian, else the number of random
            directional checks.
        raise_on_fail: raise :class:`GradientCheckError` instead of returning a failed
            report. Default ``False``.
        seed: seed of the random directions. Default ``0``.

    Returns:
        A :class:`GradientReport`; ``report.ok`` tells whether the check passed and
        ``str(report)`` summarises it.

    Shape:
        - x: any shape; the Jacobian is taken over the flattened input and output.

    Raises:
        DTypeError: if ``x`` is not a floating-point tensor or the node does not return
            a floating-point tensor.
        NonFiniteError: if ``x`` contains NaN or Inf.
        OptionError: if ``eps``, ``atol``, ``rtol`` or ``n_directions`` is not positive.
        InputError: if the node's output is not connected to ``x`` by autograd.
        GradientCheckError: with ``raise_on_fail=True``, when the check fails.

    References:
        S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks", TPAMI 2021.
    """
    x = check_tensor("x", x)
    check_finite("x", x)
    check_positive("eps", eps)
    check_positive("atol", atol)
    check_positive("rtol", rtol)
    if n_directions is not None:
        check_positive("n_directions", n_directions)
    fn = _as_float64(node_or_fn)
    x64 = x.detach().to(torch.float64)

    def evaluate(z: torch.Tensor) -> torch.Tensor:
        out = fn(z)
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            got = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
            raise DTypeError(
                f"node_or_fn must return a floating-point torch.Tensor, got {got}"
            )
        return out.to(torch.float64)

    with torch.enable_grad():
        xg = x64.clone().requires_grad_(True)
        y = evaluate(xg)
        if y.numel() and not y.requires_grad:
            raise InputError(
                "node_or_fn's output does not depend on x through autograd "
                "(no backward to check); was it computed under torch.no_grad()?"
            )

        def vjp(w: torch.Tensor) -> torch.Tensor:
            (g,) = torch.autograd.grad(y, xg, w, retain_graph=True, allow_unused=True)
            return torch.zeros_like(xg) if g is None else g

        # The finite differences run with grad mode on, as in training: some back
        # ends behave differently under no_grad.
        if n_directions is None:
            mode = "jacobian"
            eye_out = torch.eye(y.numel(), dtype=torch.float64, device=y.device)
            rows = [vjp(e.reshape(y.shape)).flatten() for e in eye_out]
            analytic = torch.stack(rows) if rows else y.new_zeros(0, x64.numel())
            cols = []
            for j in range(x64.numel()):
                step = torch.zeros(x64.numel(), dtype=torch.float64, device=x64.device)
                step[j] = eps
                step = step.reshape(x64.shape)
                diff = (evaluate(x64 + step) - evaluate(x64 - step)) / (2 * eps)
                cols.append(diff.detach().flatten())
            numeric = torch.stack(cols, dim=1) if cols else y.new_zeros(y.numel(), 0)
        else:
            mode = "directional"
            gen = torch.Generator(device="cpu").manual_seed(seed)
            a_vals, n_vals = [], []
            for _ in range(int(n_directions)):
                u = torch.randn(x64.shape, generator=gen, dtype=torch.float64)
                u = (u / u.norm().clamp_min(1e-300)).to(x64.device)
                w = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.device)
                a_vals.append((vjp(w) * u).sum())
                diff = (evaluate(x64 + eps * u) - evaluate(x64 - eps * u)) / (2 * eps)
                n_vals.append((w * diff.detach()).sum())
            analytic = torch.stack(a_vals)
            numeric = torch.stack(n_vals)

    err = (analytic - numeric).abs()
    if err.numel() == 0:
        report = GradientReport(True, 0.0, 0.0, (), 0, mode, eps, atol, rtol)
    else:
        # NaN in either Jacobian must fail, so compare with a negated "within tolerance".
        within = err <= atol + rtol * numeric.abs()
        ok = bool(within.all())
        flat = int(torch.nan_to_num(err, nan=float("inf")).flatten().argmax())
        worst = (
            (flat // err.shape[1], flat % err.shape[1]) if err.ndim == 2 else (flat,)
        )
        max_abs = float(err.flatten()[flat])
        scale = float(numeric.abs().max())
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        report = GradientReport(
            ok, max_abs, max_rel, worst, err.numel(), mode, eps, atol, rtol
        )
    if raise_on_fail and not report.ok:
        raise GradientCheckError(report)
    return report
