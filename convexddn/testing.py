"""Gradient checks for declarative nodes, tuned for solver tolerances.

:func:`check_gradients` compares a node's backward (implicit or otherwise) with central
finite differences in float64 and reports the worst error, instead of the pass/fail of
:func:`torch.autograd.gradcheck`. Users call it on their own
:class:`~convexddn.DeclarativeNode` subclasses, with any number of inputs; the
parameters of a module are checked too. It works for any callable ``(*xs) -> y``.

References:
    S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks", TPAMI 2021.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable, Sequence

import torch

from ._checks import check_bool, check_finite, check_int, check_number, check_tensor
from ._gradient_report import GradientReport
from .errors import DTypeError, GradientCheckError, InputError, OptionError

__all__ = ["GradientCheckError", "GradientReport", "check_gradients"]

# torch.Generator.manual_seed accepts any integer that fits in 64 bits, signed or not.
_SEED_RANGE = (-(2**63), 2**64 - 1)
#: The most random directions :func:`check_gradients` runs (each costs one backward and
#: two forwards): more than this is a mistake (or an unbounded loop), not a stronger check.
MAX_DIRECTIONS = 100_000
# The relative rounding of a float64 value: each y(z ± step) carries at least this much,
# so a finite difference carries at least 2^-53 (|y(z + step)| + |y(z - step)|) / step.
_ROUNDING = 2.0 ** -53


def _float64_copy(fn: Callable[..., torch.Tensor], with_params: bool):
    """``fn``, or a float64 copy of a module.

    The copy keeps the caller's module untouched: its dtype, its parameters (which the
    finite differences perturb) and its buffers (the many calls update a BatchNorm's
    running statistics). Only a float64 module that cannot be deep-copied is used as it
    is, when its parameters are not checked.
    """
    if not isinstance(fn, torch.nn.Module):
        return fn
    try:
        return copy.deepcopy(fn).to(torch.float64)
    except Exception as err:  # noqa: BLE001 - e.g. a module holding a lock or a file handle
        tensors = list(fn.parameters()) + list(fn.buffers())
        all64 = all(t.dtype == torch.float64 for t in tensors if t.is_floating_point())
        if all64 and not (with_params and any(p.requires_grad for p in fn.parameters())):
            return fn
        raise InputError(
            f"check_gradients compares in float64 on a copy of the module, but {type(fn).__name__} "
            f"cannot be deep-copied ({type(err).__name__}: {err}): pass a float64 module "
            "(module.double()) with params=False, or make it copyable") from err


def _gap(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float,
         slack: torch.Tensor | float = 0.0) -> tuple[float, bool]:
    """The largest ``|got - want|`` (NaN as inf) and whether every entry is within
    ``atol + rtol |want| + slack`` (``slack``: what rounding alone may put between them)."""
    gap = (got - want).abs()
    if not gap.numel():
        return 0.0, True
    within = (gap <= atol + rtol * want.abs() + slack) & torch.isfinite(gap)
    return float(torch.nan_to_num(gap, nan=float("inf")).max()), bool(within.all())


def _alone(evaluate, point, thetas, names, sizes, w, full, atol, rtol) -> tuple[float, str]:
    """The largest gap between the backward of ``w`` with only one input (or parameter)
    requiring grad and the full one ``full``, and where it exceeds ``atol + rtol |full|``
    ("" if nowhere): each such run takes the backward's ``ctx.needs_input_grad`` branches
    that the full check never takes."""
    if len(sizes) < 2:
        return 0.0, ""
    worst, failed = 0.0, ""
    for i, (name, want) in enumerate(zip(names, torch.split(full, sizes))):
        xs = [x.clone().requires_grad_(k == i) for k, x in enumerate(point)]
        try:
            for k, p in enumerate(thetas):
                p.requires_grad_(len(point) + k == i)
            yi = evaluate(xs)
            target = (xs + thetas)[i]
            g = torch.autograd.grad(yi, target, w, allow_unused=True)[0] if yi.requires_grad else None
        finally:
            for p in thetas:
                p.requires_grad_(True)
        gap, within = _gap((torch.zeros_like(target) if g is None else g).flatten(), want, atol, rtol)
        worst = max(worst, gap)
        if not failed and not within:
            failed = f"with only {name} requiring grad differs from the full one"
    return worst, failed


def check_gradients(
    node_or_fn: Callable[..., torch.Tensor],
    *inputs: torch.Tensor,
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    n_directions: int | None = None,
    raise_on_fail: bool = False,
    seed: int = 0,
    params: bool = True,
) -> GradientReport:
    """Compare the backward of ``node_or_fn`` at ``inputs`` with central finite differences.

    With :math:`J` the Jacobian of :math:`y = \\text{node}(x_1, \\dots, x_k)` with
    respect to :math:`z = (x_1, \\dots, x_k, \\theta)` (the inputs and, for a module,
    its parameters :math:`\\theta` that require grad) given by its backward (one
    vector–Jacobian product per output entry) and

    .. math::

        \\tilde J_{:, j} = \\frac{y(z + \\varepsilon e_j) - y(z - \\varepsilon e_j)}
        {2 \\varepsilon},

    the check passes when :math:`|J - \\tilde J| \\le \\text{atol} + \\text{rtol}
    |\\tilde J|` entrywise. With ``n_directions = k`` it compares instead ``k`` random
    projections :math:`w_i^\\top J u_i` against
    :math:`w_i^\\top (y(z + \\varepsilon u_i) - y(z - \\varepsilon u_i)) / 2\\varepsilon`,
    which costs ``k`` backward and ``2k`` forward calls instead of one backward per
    output and two forwards per entry of :math:`z`. The divisor is the step actually taken,
    :math:`(z + \\varepsilon u) - (z - \\varepsilon u)` in float64, not :math:`2\\varepsilon u`:
    where :math:`|z| \\gg \\varepsilon` the shifted point rounds (by up to 1.5 % of the step at
    :math:`|z| = 10^8`, ``eps = 1e-6``), and that error would fail a correct backward.

    What it does not see: ``atol`` is absolute, so a Jacobian whose entries are all far
    below it passes whatever the backward returns (scale ``atol`` with the Jacobian:
    ``3e-6·sin(x)`` with a sign-flipped backward passes at the default). What it checks
    besides: the full-Jacobian mode feeds the backward one-hot incoming gradients, and
    compares their combination with one seeded random ``w`` against the backward of ``w``
    itself, so a backward not linear in its incoming gradient (``g.abs()``) fails there as
    in the directional mode; a backward's branches for inputs that need no gradient
    (``ctx.needs_input_grad``: in training the data need none) are run too: with two or
    more inputs and parameters, each is differentiated alone (one forward and backward
    each) and compared with the full backward of ``w`` (``consistency_error``, ``inconsistent``).

    Everything runs in float64: the inputs are converted, and a module is checked
    through a float64 copy (the finite differences perturb the copy's parameters and
    its calls update the copy's buffers, such as a BatchNorm's running statistics: the
    caller's module is left untouched). For nodes whose forward is an iterative solver
    the finite differences carry the solver's error divided by ``eps``: with a solver
    tolerance near ``1e-8`` (e.g. a :class:`~convexddn.ConvexLayer`) use ``eps=1e-4``
    or so, and keep the inputs away from points where the solution is not
    differentiable (kinks, changes of the active set). They also carry y's own rounding,
    :math:`2^{-53}|y| / \\varepsilon` (``report.fd_rounding``): for large outputs raise ``eps``.

    Args:
        node_or_fn: a :class:`~convexddn.DeclarativeNode`, any ``torch.nn.Module`` or
            callable mapping tensors to a tensor.
        *inputs: the point to check at, one tensor per input of the node; any shapes
            the node accepts.
        eps: finite-difference step. Default ``1e-6``.
        atol: absolute tolerance. Default ``1e-5``.
        rtol: relative tolerance. Default ``1e-3``.
        n_directions: ``None`` (default) for the full Jacobian, else the number of random
            directional checks (an integer from 1 to 100 000; beyond, the
            full Jacobian is the cheaper and stronger check).
        raise_on_fail: raise :class:`GradientCheckError` instead of returning a failed
            report. Default ``False``.
        seed: seed of the random directions, an integer (any 64-bit value). Default
            ``0``; the directions are always seeded, so a check is reproducible.
        params: also check the gradients of a module's parameters that require grad.
            Default ``True``.

    Returns:
        A :class:`GradientReport`; ``report.ok`` tells whether the check passed and
        ``str(report)`` summarises it.

    Shape:
        - inputs: any shapes; the Jacobian is taken over the flattened output and the
          flattened, concatenated inputs and parameters.

    Raises:
        DTypeError: if ``node_or_fn`` is not callable, an input is not a floating-point
            tensor or the node does not return a floating-point tensor (or a tuple of
            them, checked as their concatenation).
        NonFiniteError: if an input contains NaN or Inf.
        OptionError: if ``eps``, ``atol`` or ``rtol`` is not positive, ``eps`` is no step at
            the inputs' and parameters' magnitudes (lost to rounding, or overflowing), ``n_directions``
            is not ``None`` or an integer from 1 to 100 000, ``seed`` is not an integer in
            the 64-bit range, or ``raise_on_fail`` or ``params`` is not a bool.
        InputError: if no input is given, or the node's output is not connected to the
            inputs (or parameters) by autograd.
        GradientCheckError: with ``raise_on_fail=True``, when the check fails.

    References:
        S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks", TPAMI 2021.
    """
    if not callable(node_or_fn):
        raise DTypeError(
            "node_or_fn must be a callable (a module or function mapping tensors to a "
            f"tensor), got {type(node_or_fn).__name__}"
        )
    if not inputs:
        raise InputError("check_gradients needs at least one input tensor after node_or_fn")
    names = ["x"] if len(inputs) == 1 else [f"input {i}" for i in range(len(inputs))]
    for name, x in zip(names, inputs):
        check_tensor(name, x)
        check_finite(name, x)
    eps, atol, rtol = (check_number(k, v, above=0, constant_because="a tolerance is one number")
                       for k, v in (("eps", eps), ("atol", atol), ("rtol", rtol)))
    if n_directions is not None:
        # An integer, not just a positive number: 2.5 would silently run 2 directions and
        # 0.5 none at all (then fail on an empty stack).
        n_directions = check_int("n_directions", n_directions, minimum=1, maximum=MAX_DIRECTIONS)
    # Checked even in Jacobian mode, where it is unused, so a bad seed fails the same way
    # whichever mode is asked for; None is refused (not "unseeded"): the report of a
    # failed check must be reproducible.
    seed = check_int("seed", seed)
    if not _SEED_RANGE[0] <= seed <= _SEED_RANGE[1]:
        raise OptionError(f"seed must be an integer in the 64-bit range, got {seed}")
    check_bool("raise_on_fail", raise_on_fail)
    check_bool("params", params)
    fn = _float64_copy(node_or_fn, params)
    point = [x.detach().to(torch.float64) for x in inputs]
    thetas: list[torch.Tensor] = []
    if params and isinstance(fn, torch.nn.Module):
        for pname, p in fn.named_parameters():
            if p.requires_grad:
                thetas.append(p)
                names.append(f"param {pname}")
    sizes = [t.numel() for t in point] + [p.numel() for p in thetas]

    def evaluate(xs: Sequence[torch.Tensor]) -> torch.Tensor:
        try:
            out = fn(*xs)
        except RuntimeError as err:
            if "dtype" not in str(err):
                raise
            # A function wrapping a float32 module (lambda a: lin(a)), or a module holding a
            # tensor as a plain attribute (its float64 copy casts parameters and buffers only):
            # the inputs are float64 here, those tensors are not.
            fix = ("register its tensors as buffers or parameters (a plain tensor attribute is not cast)"
                   if isinstance(fn, torch.nn.Module) else "if it wraps a module, pass the module itself "
                   "(it is checked on a float64 copy) or call .double() on it")
            raise DTypeError(f"node_or_fn failed on the float64 inputs check_gradients passes ({err}); {fix}") from err
        if (isinstance(out, (tuple, list)) and out
                and all(isinstance(o, torch.Tensor) and o.is_floating_point() for o in out)):
            # Several outputs (EigenDecomposition's values and vectors, LeastSquares'
            # solution and residual, a ConvexLayer of several variables): checked together.
            return torch.cat([o.reshape(-1).to(torch.float64) for o in out])
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            got = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
            raise DTypeError(
                f"node_or_fn must return a floating-point torch.Tensor or a tuple of them, got {got}"
            )
        return out.to(torch.float64)

    def shifted(delta: torch.Tensor) -> torch.Tensor:
        """y at z + delta (delta flat over inputs and parameters).

        Perturbs the (copied) module's parameters in place and restores them: call it
        only once every backward through the graph of ``y`` is done.
        """
        parts = list(torch.split(delta, sizes))
        xs = [x + d.reshape(x.shape) for x, d in zip(point, parts)]
        saved = [p.detach().clone() for p in thetas]
        try:
            with torch.no_grad():
                for p, d in zip(thetas, parts[len(point):]):
                    p.add_(d.reshape(p.shape))
            return evaluate(xs).detach()
        finally:
            with torch.no_grad():
                for p, s in zip(thetas, saved):
                    p.copy_(s)

    total = sum(sizes)
    z = torch.cat([t.detach().flatten() for t in point + thetas])
    realised = functools.partial(_realised, z)
    taken = realised(torch.full_like(z, eps))  # (each coordinate's own step, Jacobian mode)
    _check_step(eps, z, taken)
    with torch.enable_grad():
        xg = [x.clone().requires_grad_(True) for x in point]
        y = evaluate(xg)
        wrt = xg + thetas
        if y.numel() and not y.requires_grad:
            raise InputError(
                "node_or_fn's output does not depend on its inputs through autograd "
                "(no backward to check); was it computed under torch.no_grad()?"
            )

        def vjp(w: torch.Tensor) -> torch.Tensor:
            gs = torch.autograd.grad(y, wrt, w, retain_graph=True, allow_unused=True)
            return torch.cat([
                (torch.zeros_like(t) if g is None else g).flatten() for t, g in zip(wrt, gs)
            ])

        # Before any finite difference (shifted() perturbs parameters a graph may have saved).
        gen = torch.Generator(device="cpu").manual_seed(seed)
        w0 = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.device)
        g0 = vjp(w0) if y.numel() else torch.zeros(total, dtype=torch.float64, device=y.device)
        consistency, inconsistent = _alone(evaluate, point, thetas, names, sizes, w0, g0, atol, rtol)

        # The finite differences run with grad mode on, as in training: some back
        # ends behave differently under no_grad.
        device = point[0].device
        if n_directions is None:
            mode = "jacobian"
            eye_out = torch.eye(y.numel(), dtype=torch.float64, device=y.device)
            # All rows before any column: see the directional branch.
            rows = [vjp(e.reshape(y.shape)) for e in eye_out]
            analytic = torch.stack(rows) if rows else y.new_zeros(0, total)
            # Each of the two sums rounds by up to m 2^-53 |w|^T |J| (Higham, Accuracy and Stability,
            # Thm 3.5): a linear backward summing in another order is not "not linear".
            slack = 2 * y.numel() * _ROUNDING * (w0.flatten().abs() @ analytic.abs())
            linear, within = _gap(w0.flatten() @ analytic, g0, atol, rtol, slack)
            consistency = max(consistency, linear)
            if not within and not inconsistent:
                inconsistent = "of a random incoming gradient w differs from w times its one-hot rows (not linear in w)"
            cols, floors = [], []
            for j in range(total):
                step = torch.zeros(total, dtype=torch.float64, device=device)
                step[j] = eps
                plus, minus = shifted(step), shifted(-step)
                cols.append(((plus - minus) / taken[j]).flatten())
                floors.append((_ROUNDING * (plus.abs() + minus.abs()) / taken[j].abs()).flatten())
            numeric = torch.stack(cols, dim=1) if cols else y.new_zeros(y.numel(), 0)
            floor = torch.stack(floors, dim=1) if floors else y.new_zeros(y.numel(), 0)
        else:
            mode = "directional"
            gen = torch.Generator(device="cpu").manual_seed(seed)
            directions = []
            for _ in range(n_directions):
                u = torch.randn(total, generator=gen, dtype=torch.float64, device="cpu")
                u = (u / u.norm().clamp_min(1e-300)).to(device)
                w = torch.randn(y.shape, generator=gen, dtype=torch.float64, device="cpu").to(y.device)
                directions.append((u, w))
            # Every backward product before any finite difference: shifted() perturbs the
            # parameters in place, and a graph that saved them (e.g. a Linear's weight)
            # refuses to run backward after that, even once they are restored.
            # J applied to the direction actually stepped along (see realised), so the
            # difference is divided by the 2·eps it was taken over.
            for k, (u, _) in enumerate(directions):
                _check_step(eps, z, realised(eps * u), k, u)
            analytic = torch.stack([(vjp(w) * realised(eps * u) / (2 * eps)).sum() for u, w in directions])
            pairs = [(w, shifted(eps * u), shifted(-eps * u)) for u, w in directions]
            numeric = torch.stack([(w * (plus - minus) / (2 * eps)).sum() for w, plus, minus in pairs])
            floor = torch.stack([_ROUNDING * (w.abs() * (plus.abs() + minus.abs())).sum() / (2 * eps)
                                 for w, plus, minus in pairs])

    err = (analytic - numeric).abs()
    if err.numel() == 0:
        report = GradientReport(True, 0.0, 0.0, (), 0, mode, eps, atol, rtol, tuple(names))
    else:
        ok = _gap(analytic, numeric, atol, rtol)[1]  # (NaN or Inf in either Jacobian fails)
        flat = int(torch.nan_to_num(err, nan=float("inf")).flatten().argmax())
        worst = (
            (flat // err.shape[1], flat % err.shape[1]) if err.ndim == 2 else (flat,)
        )
        worst_wrt = ""
        if err.ndim == 2:
            bounds = torch.tensor(sizes, device="cpu").cumsum(0)
            worst_wrt = names[int((bounds <= worst[1]).sum())]
        max_abs = float(err.flatten()[flat])
        scale = float(numeric.abs().max())
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        report = GradientReport(
            ok, max_abs, max_rel, worst, err.numel(), mode, eps, atol, rtol,
            tuple(names), worst_wrt, fd_rounding=float(floor.flatten()[flat]),
        )
    report = dataclasses.replace(report, ok=report.ok and not inconsistent, fd_ok=report.ok,
                                 consistency_error=consistency, inconsistent=inconsistent)
    if raise_on_fail and not report.ok:
        raise GradientCheckError(report)
    return report


def _realised(z: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The step the shifted points z ± delta are apart: (z + delta) - (z - delta).

    z ± delta rounds where |z| >> |delta| (Numerical Recipes §5.7: divide by the step
    the arithmetic took); there the subtraction itself is exact (Sterbenz's lemma).
    """
    return (z + delta) - (z - delta)


def _check_step(eps: float, z: torch.Tensor, taken: torch.Tensor, k: int = 0, u: torch.Tensor | None = None) -> None:
    """``OptionError`` naming ``eps`` where the step ``taken`` (:func:`_realised` at the inputs and
    parameters ``z``) is none: lost to rounding at a coordinate (0: the difference was 0/0, and a
    correct gradient failed as "error nan"), overflowing, or, along direction ``k`` (``u``), less than
    half kept (both sides read the same point: a sign-flipped backward passed with error 0)."""
    lost, over = int((taken == 0).sum()), int((~torch.isfinite(taken)).sum())
    kept = 1.0 if u is None else float(taken.norm() / (2 * eps * u.norm()))
    if (lost or over) if u is None else not kept >= 0.5:
        big = float(z.abs().max())
        spacing = float(torch.finfo(torch.float64).eps) * max(big, torch.finfo(torch.float64).tiny)
        why = (f"along direction {k} only {kept:.0%} of it is kept after rounding" if u is not None else
               f"(z + eps) - (z - eps) rounds to 0 at {lost} of the {z.numel()} entries of z" if lost else
               f"z ± eps overflows at {over} of the {z.numel()} entries of z")
        raise OptionError(
            f"eps={eps:g} is no usable finite-difference step: {why} (z: the inputs and parameters, largest "
            f"magnitude {big:g}, where floats are {spacing:.2g} apart); use an eps well above {spacing:.2g} and "
            "far below the float range (default 1e-6)")
