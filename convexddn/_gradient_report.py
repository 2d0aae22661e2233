"""The report of :func:`convexddn.testing.check_gradients` (public there, as
``convexddn.testing.GradientReport``; kept apart so that the check itself fits one module)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GradientReport:
    """Outcome of :func:`check_gradients`.

    Attributes:
        ok: every compared value satisfies ``|analytic - fd| <= atol + rtol * |fd|``, and
            the backward agrees with itself (``inconsistent`` empty).
        max_abs_error: the largest ``|analytic - fd|``.
        max_rel_error: ``max_abs_error`` divided by the largest ``|fd|`` (normwise, so
            entries that are zero do not blow it up).
        worst: where the largest absolute error is: ``(output index, input index)``
            into the flattened output and the flattened, concatenated inputs and
            parameters (in the order of ``wrt``) for a full Jacobian, or
            ``(direction,)`` for a directional check.
        n_compared: how many Jacobian entries or directional derivatives were compared.
        mode: ``"jacobian"`` (every entry) or ``"directional"`` (random projections).
        eps, atol, rtol: the settings used.
        wrt: the names of what was differentiated: ``"x"`` (one input) or ``"input i"``,
            then ``"param <name>"`` for each parameter of a module that requires grad.
        worst_wrt: the entry of ``wrt`` where the largest error is (Jacobian mode).
        consistency_error, inconsistent: the largest gap between the backward ``g`` of one
            seeded random incoming gradient ``w`` and what it must equal: the backward with
            only one entry of ``wrt`` requiring grad (with two or more), and in Jacobian mode
            ``w`` times the one-hot rows (a vector-Jacobian product is linear in ``w``).
            ``inconsistent`` says which failed ``atol + rtol·|g|`` (``ok`` is then false), else "".
        fd_rounding: at the worst entry, the error the finite difference carries from rounding
            its two values of ``y`` alone, :math:`2^{-53}(|y(z+h)| + |y(z-h)|)/|2h|`: an error
            near it says ``eps`` is too small for the size of ``y``, not that the backward is wrong.
        fd_ok: the comparison with the finite differences alone passed (``ok`` also needs
            ``inconsistent`` empty).
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
    wrt: tuple[str, ...] = ()
    worst_wrt: str = ""
    consistency_error: float = 0.0
    inconsistent: str = ""
    fd_rounding: float = 0.0
    fd_ok: bool = True

    def __bool__(self) -> bool:
        """``ok``: ``assert check_gradients(node, x)`` fails on a wrong gradient (a dataclass
        instance is otherwise always true, and such an assert passed on a failed check)."""
        return self.ok

    def __str__(self) -> str:
        verdict = "passed" if self.ok else "FAILED"
        where = (
            f"output {self.worst[0]}, input {self.worst[1]}"
            if self.mode == "jacobian" and len(self.worst) == 2
            else f"direction {self.worst[0]}" if self.worst else "n/a"
        )
        if self.worst_wrt:
            where += f" ({self.worst_wrt})"
        checked = f" w.r.t. {', '.join(self.wrt)}" if self.wrt else ""
        if not self.fd_ok and self.max_abs_error <= 10 * self.fd_rounding:
            checked += (f"; the finite differences' rounding alone is {self.fd_rounding:.1e} there (|y| 2^-53 / "
                        "step): try a larger eps before suspecting the backward")
        if self.inconsistent:
            checked += f"; the backward {self.inconsistent} by {self.consistency_error:.3e}"
        return (
            f"gradient check {verdict}: max abs error {self.max_abs_error:.3e}, "
            f"max rel error {self.max_rel_error:.3e} (worst at {where}) over "
            f"{self.n_compared} {self.mode} comparison(s){checked}; "
            f"eps={self.eps:g}, atol={self.atol:g}, rtol={self.rtol:g}"
        )


# Public as convexddn.testing.GradientReport: the name documentation and pickles use.
GradientReport.__module__ = "convexddn.testing"
