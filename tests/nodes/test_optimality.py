"""Tests of convexddn.nodes.optimality: is the point that ``solve`` returned a KKT point?

The verdict must not depend on where the coordinates' origin is: a common offset in the
inputs (or in a linear objective's prices, or in the data a constraint reads) makes the
residual's scale large without
making ``y`` any less determined. Each node below has a closed-form solution; ``solve``
returns it moved by ``off``, so the expected verdict is known without the code under
test: exact -> silent, 1e-3 relative -> GradientWarning, 0.5 -> SolverError, whatever
the offset.
"""
from __future__ import annotations

import math
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from convexddn.errors import GradientWarning, SolverError
from convexddn.nodes.declarative import DeclarativeNode

sys.path.insert(0, str(Path(__file__).parent))
from test_lagrangian import _NonNeg, _PseudoHuberPool  # noqa: E402

DT = torch.float64


class Shifted(DeclarativeNode):
    """``argmin_u Σᵢ wᵢ (u + r − pᵢ)²`` = ``Σ wᵢ (pᵢ − r) / Σ wᵢ``, returned plus ``off``."""

    def __init__(self, off: float, **kw):
        super().__init__(**kw)
        self.off = off

    @staticmethod
    def _w(p):
        return torch.linspace(0.5, 1.5, p.shape[-1], dtype=p.dtype)

    def objective(self, p, r, y):
        return (self._w(p) * (y + r - p) ** 2).sum(-1)

    def solve(self, p, r):
        w = self._w(p)
        return (w * (p - r)).sum(-1, keepdim=True) / w.sum() + self.off


class Priced(DeclarativeNode):
    """``argmin ½‖y‖² + pᵀy`` s.t. ``Σy = 1``: ``y = −(p − mean p) + 1/n``, returned moved
    by ``off`` along ``e₀ − e₁`` (still feasible)."""

    def __init__(self, off: float, **kw):
        super().__init__(**kw)
        self.off = off

    def objective(self, p, y):
        return 0.5 * (y * y).sum(-1) + (p * y).sum(-1)

    def equality_constraints(self, p, y):
        return y.sum(-1, keepdim=True) - 1

    def solve(self, p):
        y = -(p - p.mean(-1, keepdim=True)) + 1.0 / p.shape[-1]
        y[..., 0] += self.off
        y[..., 1] -= self.off
        return y


class Split(DeclarativeNode):
    """``argmin ½‖y − x‖²`` s.t. ``Σy = p₀ − p₁``: ``y = x + (p₀ − p₁ − Σx)/n``, returned
    moved by ``off/n`` on every entry (still stationary: the violation is ``off``)."""

    def __init__(self, off: float, **kw):
        super().__init__(**kw)
        self.off = off

    def objective(self, x, p, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x, p, y):
        return (y.sum(-1) - (p[:, 0] - p[:, 1])).unsqueeze(-1)

    def solve(self, x, p):
        s = (p[:, 0] - p[:, 1]).unsqueeze(-1)
        return x + (s - x.sum(-1, keepdim=True) + self.off) / x.shape[-1]


def _inputs(kind: str, base: float) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    if kind == "split":
        return torch.randn(4, 6, generator=g, dtype=DT), base + torch.randn(4, 2, generator=g, dtype=DT)
    p = base + torch.randn(4, 8, generator=g, dtype=DT)
    return (p, torch.full((4, 1), base, dtype=DT)) if kind == "shifted" else (p,)


def _verdict(node: DeclarativeNode, xs: tuple[torch.Tensor, ...], mode: str) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if mode == "vjp":
                node(*(x.clone().requires_grad_(True) for x in xs)).sum().backward()
            else:
                with fwAD.dual_level():
                    y = node(*(fwAD.make_dual(x, torch.ones_like(x)) for x in xs))
                    fwAD.unpack_dual(y).tangent
        except SolverError:
            return "error"
    return "warning" if any(issubclass(w.category, GradientWarning) for w in caught) else "silent"


@pytest.mark.parametrize("mode", ["vjp", "jvp"])
@pytest.mark.parametrize("kind, base", [("shifted", 0.0), ("shifted", 5e6), ("priced", 0.0), ("priced", 1e6),
                                        ("split", 0.0), ("split", 5e6)])
def test_verdict_does_not_depend_on_an_offset(kind, base, mode):
    # Before the offset checks, at base 5e6 (1e6) a solve off by 0.5 scored 1e-7 and
    # passed silently in both modes: ‖B‖‖x‖ (‖∇f‖, ‖D_x c‖‖x‖) grew with the offset.
    node = {"shifted": Shifted, "priced": Priced, "split": Split}[kind]
    xs = _inputs(kind, base)
    assert _verdict(node(0.0), xs, mode) == "silent"
    assert _verdict(node(1e-3), xs, mode) == "warning"
    assert _verdict(node(0.5), xs, mode) == "error"


def test_offset_gradient_is_exact_when_the_solution_is():
    # The closed form: ∂y/∂pᵢ = wᵢ / Σw, ∂y/∂r = −1, also at coordinates ~5e6.
    p, r = (x.requires_grad_(True) for x in _inputs("shifted", 5e6))
    Shifted(0.0)(p, r).sum().backward()
    w = torch.linspace(0.5, 1.5, 8, dtype=DT)
    torch.testing.assert_close(p.grad, (w / w.sum()).expand(4, 8), rtol=1e-9, atol=0)
    torch.testing.assert_close(r.grad, torch.full((4, 1), -1.0, dtype=DT), rtol=1e-9, atol=0)


def test_solution_at_zero_with_rounding_level_residual_passes():
    # y ~ 0 with a residual at the rounding level of its inputs (~1e6): the Newton step
    # is measured against the step a rounding-level residual makes, not against ‖y‖ = 0.
    p = torch.tensor([[1e6 + 0.5, 1e6 - 0.5]], dtype=DT)
    r = torch.full((1, 1), 1e6, dtype=DT)
    # w = (0.5, 1.5): u = (0.25 - 0.75) / 2 = -0.25; this r moves it to 0 exactly.
    r = r - 0.25
    assert _verdict(Shifted(0.0), (p[:, :2], r), "vjp") == "silent"


@pytest.mark.parametrize("scale", [1e-8, 1e8])
@pytest.mark.parametrize("kind", ["shifted", "split"])
def test_offset_checks_do_not_depend_on_units(kind, scale):
    # The same inputs in other units (offset 5e6 units included), the error with them:
    # the verdicts of the origin's unit scale, silent / warning / error.
    node = Shifted if kind == "shifted" else Split
    xs = tuple(scale * t for t in _inputs(kind, 5e6 if kind == "shifted" else 0.0))
    assert [_verdict(node(off * scale), xs, "vjp") for off in (0.0, 1e-3, 0.5)] == ["silent", "warning", "error"]


class ShiftedBound(DeclarativeNode):
    """``argmin ½‖y − (x − x₀)‖²`` s.t. ``y ≥ 0``: ``y = max(x − x₀, 0)``, a problem of
    ``x − x₀`` only; bound j's multiplier is ``max(x₀ − x, 0)_j``."""

    def objective(self, x, x0, y):
        return 0.5 * ((y - (x - x0)) ** 2).sum(-1)

    def inequality_constraints(self, x, x0, y):
        return -y

    def solve(self, x, x0):
        return torch.clamp(x - x0, min=0)


def _gradient_warnings(node: DeclarativeNode, *xs: torch.Tensor) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        node(*xs).sum().backward()
    return [str(w.message) for w in caught if issubclass(w.category, GradientWarning)]


@pytest.mark.parametrize("offset", [0.0, 1e6, 1e7])
def test_a_strongly_active_bound_is_not_weak_under_an_offset(offset):
    # Multiplier 0.3 on y₁ ≥ 0 (0.3 of ‖∇f‖ = 0.3): the weak-activity test measured it
    # against tol·‖B‖‖x‖, ~2.8 at an offset of 1e6 the problem does not see, and warned
    # of a zero multiplier. Reference: max's Jacobian diag(x − x₀ > 0).
    x0 = torch.full((1, 2), offset, dtype=DT)
    x = (x0 + torch.tensor([[0.5, -0.3]], dtype=DT)).requires_grad_(True)
    assert _gradient_warnings(ShiftedBound(), x, x0) == []
    torch.testing.assert_close(x.grad, torch.tensor([[1.0, 0.0]], dtype=DT), rtol=0, atol=1e-9)


def test_a_bound_exactly_at_its_kink_is_weak_under_an_offset():
    # x − x₀ = 0 exactly on entry 1: max(·, 0) has a kink there (multiplier 0, strict
    # complementarity fails), and the warning must still say so at an offset of 1e6.
    x0 = torch.full((1, 2), 1e6, dtype=DT)
    x = (x0 + torch.tensor([[0.5, 0.0]], dtype=DT)).requires_grad_(True)
    msgs = _gradient_warnings(ShiftedBound(), x, x0)
    assert len(msgs) == 1 and "zero multiplier" in msgs[0]


class HalfMax(DeclarativeNode):
    """``argmin ½‖y − x‖²`` s.t. ``y ≤ max|x| / 2``: ``y = min(x, max|x| / 2)``."""

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        return y - 0.5 * x.abs().amax(-1, keepdim=True)

    def solve(self, x):
        return torch.minimum(x, 0.5 * x.abs().amax(-1, keepdim=True))


@pytest.mark.parametrize("other", [None, 1e20, 1e30])
def test_weak_activity_does_not_depend_on_the_batch(other):
    # Element 0 (multiplier 1 on y₀ ≤ 1) was called weakly active beside an element 1e30
    # times larger: its scale was floored at eps times the batch's largest. Reference:
    # y = (|x₀|/2, x₁, x₂) at x = (2, −1, 0.3), so the gradient of Σy is (1/2, 1, 1).
    x1 = torch.tensor([[2.0, -1.0, 0.3]], dtype=DT)
    x = (x1 if other is None else torch.cat([x1, other * x1])).requires_grad_(True)
    assert _gradient_warnings(HalfMax(), x) == []
    torch.testing.assert_close(x.grad[0], torch.tensor([0.5, 1.0, 1.0], dtype=DT), rtol=0, atol=1e-12)


def test_the_newton_steps_solve_leaves_its_warnings_to_the_gradients():
    # H = [[1, 1], [1, 1 + 1e-11]] (condition 4e11) at an offset of 1e8, solved 1e-5 off:
    # the check's Newton step solves the ill-conditioned system first, quietly; the
    # gradient's solve says so once.
    from convexddn.nodes import implicit_system

    H = torch.tensor([[1.0, 1.0], [1.0, 1.0 + 1e-11]], dtype=DT)

    class Ill(DeclarativeNode):
        def objective(self, x, y):
            u = y + 1e8 - x
            return 0.5 * ((u @ H) * u).sum(-1)

        def solve(self, x):
            return x - 1e8 + 1e-5

    steps = []
    quiet_step = implicit_system.ImplicitSystem.quiet_step

    def noted(self, r):
        steps.append(r)
        return quiet_step(self, r)

    x = 1e8 + torch.randn(2, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught, pytest.MonkeyPatch.context() as patch:
        warnings.simplefilter("always")
        patch.setattr(implicit_system.ImplicitSystem, "quiet_step", noted)
        Ill()(x.requires_grad_(True)).sum().backward()
    assert len(steps) == 1
    assert sum("ill-conditioned" in str(w.message) for w in caught) == 1


class _Simplex(DeclarativeNode):
    """Projection onto {Σy = 1, y ≥ 0} (sort-based closed form): the bounds' multipliers
    are τ − xᵢ, the equality's takes any common offset of x."""

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x, y):
        return y.sum(-1, keepdim=True) - 1

    def inequality_constraints(self, x, y):
        return -y

    def solve(self, x):
        u = torch.sort(x.double(), descending=True, dim=-1).values
        css = u.cumsum(-1) - 1
        k = torch.arange(1, x.shape[-1] + 1, dtype=torch.float64)
        rho = (u - css / k > 0).sum(-1, keepdim=True) - 1
        tau = css.gather(-1, rho) / (rho + 1).double()
        return (x.double() - tau).clamp_min(0.0).to(x.dtype)


@pytest.mark.parametrize("dtype, c", [(torch.float32, 100.0), (torch.float32, 1e4), (torch.float64, 1e5)])
def test_an_offset_the_equalities_absorb_keeps_the_bounds_strict(dtype, c):
    """The zero-multiplier level scaled with ‖∇_y f‖ = ‖y − x‖, which grows with a common
    offset c that the equality's multiplier takes: bounds with multipliers ≥ 0.23 were
    called zero from c = 100 in float32 (1e5 in float64)."""
    z = torch.randn(1, 50, dtype=DT, generator=torch.Generator().manual_seed(0))
    x = (z + c).to(dtype).requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = _Simplex()(x)
        (g,) = torch.autograd.grad(y[0, 0], x)
    s = (y.detach() > 0).to(DT)[0]  # dy₀/dx = s₀ (e₀ − s / |S|)
    torch.testing.assert_close(g[0].double(), s[0] * (torch.eye(50, dtype=DT)[0] - s / s.sum()),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("c", [0.0, 1e5])
def test_a_zero_multiplier_beside_an_equality_still_warns(c):
    """x = (½, ½, 0) + c: τ = c, y = (½, ½, 0) and the bound on y₃ has multiplier τ − x₃ = 0."""
    x = torch.tensor([[0.5, 0.5, 0.0]], dtype=DT) + c
    with pytest.warns(GradientWarning, match="zero multiplier"):
        _Simplex()(x.requires_grad_(True)).sum().backward()


def _weak_message(x: torch.Tensor) -> str:
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        _NonNeg()(x.requires_grad_(True)).sum().backward()
    texts = [str(w.message) for w in ws if "multiplier that is zero within solution_tol" in str(w.message)]
    assert len(texts) == 1, [str(w.message) for w in ws]
    return texts[0]


def test_a_small_nonzero_multiplier_is_not_called_a_kink():
    """float32, x = (3, 4, 10, −0.003): the bound's multiplier 0.003 is nonzero, under
    solution_tol = sqrt(eps) = 3.5e-4 of the element's scale ‖y‖ + ‖∇_y f‖ (‖H u‖ = 1); the
    warning said "the solution is at a kink of its own, only one-sided derivatives exist",
    which is false (the gradient is diag(x > 0), exact). It now gives the multiplier's
    size, 0.003 / (√125 + 0.003) = 2.68e-4 (closed form), and the kink only as a case."""
    x = torch.tensor([[3.0, 4.0, 10.0, -0.003]], dtype=torch.float32)
    text = _weak_message(x)
    ratio = float(text.split("‖∇g_j‖ is ")[1].split(" ")[0])
    assert ratio == pytest.approx(0.003 / (125 ** 0.5 + 0.003), rel=0.02)
    assert "If it is truly zero (a zero multiplier: strict complementarity fails), the solution is at a kink" in text
    assert "small but nonzero, the gradient is exact" in text
    torch.testing.assert_close(x.grad, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))  # diag(x > 0)


def test_a_zero_multiplier_is_called_a_kink():
    """x_1 = 0 exactly: y_1 = 0 on its bound with λ_1 = 0, where only one-sided derivatives
    exist; the warning says so without a condition."""
    text = _weak_message(torch.tensor([[3.0, 0.0, -1.0]], dtype=DT))
    assert ": it is zero (a zero multiplier: strict complementarity fails), the solution is at a kink" in text
    assert "If it is truly zero" not in text


def _odd_rows():
    """Rows of points (s − 100 + z_i, s + 100 − z_i): odd about s, so the pseudo-Huber pool
    (_PseudoHuberPool) has y = s exactly."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20, 4, dtype=DT, generator=g)
    s = 1e-5 * torch.randn(20, 1, dtype=DT, generator=g)
    return torch.cat([z - 100, 100 - z], 1) + s, s


def test_a_residual_at_the_saturated_terms_rounding_is_a_kkt_point(monkeypatch):
    """Terms ±1 that cancel round ∇_y L at ~4e-16 (Σ|t_i| eps), the scale's floor at ~1e-18;
    with y ~ 1e-5 and curvature Σh ~ 8e-6, the Newton step of that rounding is 5e-11, 5e-6 of
    y: "satisfies the KKT conditions only approximately" for 15 of 20 exact solutions. The
    other checks are set aside to test this one alone. Reference: y = s, h_i / Σh."""
    from convexddn.nodes import implicit_system

    monkeypatch.setattr(implicit_system, "check_second_order", lambda *args, **kwargs: None)
    monkeypatch.setattr(implicit_system, "kinked", lambda *args, **kwargs: None)
    x, s = _odd_rows()
    x.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        y = _PseudoHuberPool()(x)
        (g,) = torch.autograd.grad(y.sum(), x)
    h = (1 + (s - x.detach()) ** 2) ** -1.5
    torch.testing.assert_close(y.detach(), s, rtol=1e-4, atol=0)
    torch.testing.assert_close(g, h / h.sum(-1, keepdim=True), rtol=1e-7, atol=0)


def test_a_solve_above_the_saturated_terms_rounding_is_still_reported():
    """The same rows solved 1e-3 off (1e-8, 200 times the Newton step of the rounding):
    every element is reported."""
    x, _ = _odd_rows()
    x.requires_grad_(True)
    with pytest.warns(GradientWarning, match=r"only approximately for 20 of 20"):
        torch.autograd.grad(_PseudoHuberPool(1e-3)(x).sum(), x)


def _cubic_root(s: float) -> float:
    """The real root of ``t + t³ = s`` (Cardano): the reference, apart from the nodes' Newton solves."""
    q = (s * s / 4 + 1 / 27) ** 0.5
    return math.copysign(abs(s / 2 + q) ** (1 / 3), s / 2 + q) + math.copysign(abs(s / 2 - q) ** (1 / 3), s / 2 - q)


def _newton_cubic(s: torch.Tensor) -> torch.Tensor:
    t = s.clone()
    for _ in range(60):
        t = t - (t + t**3 - s) / (1 + 3 * t * t)
    return t


class Stiff(DeclarativeNode):
    """``argmin ½k(u₀ − x₀)² + ½(u₁ − x₁)² + u₁⁴/4`` = ``(x₀, t)``, ``t + t³ = x₁``, returned with
    ``off`` added to ``u₁`` (the weakly curved coordinate: curvature 1 + 3t², beside ``k``)."""

    def __init__(self, k: float, off: float, **kw):
        super().__init__(**kw)
        self.k, self.off = k, off

    def objective(self, x, y):
        return 0.5 * self.k * (y[:, 0] - x[:, 0]) ** 2 + 0.5 * (y[:, 1] - x[:, 1]) ** 2 + 0.25 * y[:, 1] ** 4

    def solve(self, x):
        return torch.stack([x[:, 0], _newton_cubic(x[:, 1]) + self.off], -1)


class Pinned(Stiff):
    """``Stiff`` with its stiff term pulled to 10 and ``u₀ = x₀`` pinned by an equality (multiplier ~k·10)."""

    def objective(self, x, y):
        return 0.5 * self.k * (y[:, 0] - 10) ** 2 + 0.5 * (y[:, 1] - x[:, 1]) ** 2 + 0.25 * y[:, 1] ** 4

    def equality_constraints(self, x, y):
        return (y[:, 0] - x[:, 0]).unsqueeze(-1)


_STIFF_X = torch.tensor([[1.0, 1.0], [-0.5, 2.0], [0.0, -0.7]], dtype=DT)


@pytest.mark.parametrize("mode", ["vjp", "jvp"])
@pytest.mark.parametrize("node", [Stiff, Pinned])
@pytest.mark.parametrize("k", [1.0, 1e6])
def test_a_stiff_term_does_not_hide_an_error_along_a_weak_coordinate(node, k, mode):
    # At k = 1e6 (and with the equality, multipliers ~1e7) ‖H u‖‖y‖ set the scale: a solve 0.1 off
    # in u₁ scored 2e-7 and passed silently, its gradient 15 % off. Each coordinate's residual is
    # now held against its own curvature: the verdicts are those at k = 1.
    assert _verdict(node(k, 0.0), (_STIFF_X,), mode) == "silent"
    assert _verdict(node(k, 1e-3), (_STIFF_X,), mode) == "warning"
    assert _verdict(node(k, 0.5), (_STIFF_X,), mode) == "error"


@pytest.mark.parametrize("k", [1.0, 1e6])
def test_a_stiff_well_solved_node_is_exact_without_a_newton_solve(k, monkeypatch):
    # Closed form: ∂y₀/∂x₀ = 1, ∂y₁/∂x₁ = 1 / (1 + 3t²) at the Cardano root t; a solution at
    # rounding level needs no Newton step (no second solve of the KKT system).
    from convexddn.nodes import implicit_system

    steps = []
    quiet_step = implicit_system.ImplicitSystem.quiet_step
    noted = lambda self, *a: steps.append(1) or quiet_step(self, *a)  # noqa: E731
    monkeypatch.setattr(implicit_system.ImplicitSystem, "quiet_step", noted)
    x = _STIFF_X.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Stiff(k, 0.0)(x).sum().backward()
    want = torch.tensor([[1.0, 1 / (1 + 3 * _cubic_root(float(s)) ** 2)] for s in _STIFF_X[:, 1]], dtype=DT)
    torch.testing.assert_close(x.grad, want, rtol=1e-12, atol=1e-14)
    assert steps == []


class StiffNonNeg(DeclarativeNode):
    """``argmin ½‖u_{:2} − x_{:2}‖² + ½k(u₂ − x₂)²`` s.t. ``u ≥ 0`` = ``max(x, 0)``; ``clamp_first`` returns
    ``u₀ = 0`` whatever ``x₀`` (a wrong active set where ``x₀ > 0``: the bound's multiplier would be −x₀)."""

    def __init__(self, k: float, clamp_first: bool):
        super().__init__()
        self.k, self.clamp_first = k, clamp_first

    def objective(self, x, y):
        return 0.5 * ((y[:, :2] - x[:, :2]) ** 2).sum(-1) + 0.5 * self.k * (y[:, 2] - x[:, 2]) ** 2

    def inequality_constraints(self, x, y):
        return -y

    def solve(self, x):
        y = x.clamp(min=0)
        if self.clamp_first:
            y[:, 0] = 0
        return y


@pytest.mark.parametrize("k", [1.0, 1e6])
def test_a_stiff_term_does_not_hide_a_wrong_active_set(k):
    # At k = 1e6 y₀ = 0 for x₀ = 0.5 (true y₀ = 0.5) came back with ∂y₀/∂x₀ = 0 (true 1) under a
    # warning that called the bound's multiplier zero (its least-squares value is −0.5): the
    # Newton step kept the bound active and was 0. The bound without a multiplier is left out of it.
    x = torch.tensor([[0.5, 1.0, 1.0], [0.3, -1.0, 2.0]], dtype=DT)
    assert _verdict(StiffNonNeg(k, True), (x,), "vjp") == "error"


@pytest.mark.parametrize("k", [1.0, 1e6])
def test_a_stiff_term_does_not_make_a_pushing_bound_weak(k):
    # The bound y₁ ≥ 0 at x₁ = −1 pushes with a multiplier of 1 against a curvature of 1; beside
    # k = 1e6 its force was 5.5e-7 of ‖H u‖‖y‖ + ‖∇f‖ and it was called zero (a "kink" warning).
    # Closed form: y = max(x, 0), ∂Σy/∂x = 1 where x > 0, 0 where x < 0.
    x = torch.tensor([[0.5, 1.0, 1.0], [0.3, -1.0, 2.0]], dtype=DT)
    assert _verdict(StiffNonNeg(k, False), (x,), "vjp") == "silent"
    xg = x.clone().requires_grad_(True)
    StiffNonNeg(k, False)(xg).sum().backward()
    torch.testing.assert_close(xg.grad, torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]], dtype=DT), rtol=0, atol=1e-12)


class _InteriorSimplex(_Simplex):
    """The simplex projection as an interior point solver returns it: the zero entries at ``off``
    (the sum kept at 1)."""

    def __init__(self, off: float, **kw):
        super().__init__(**kw)
        self.off = off

    def solve(self, x):
        y = super().solve(x)
        zero = y == 0
        return torch.where(zero, self.off, y - self.off * zero.sum(-1, keepdim=True) / (~zero).sum(-1, keepdim=True))


def test_bounds_approached_not_reached_name_active_tol():
    # y = (.5, .5, 0, 0) returned with 1e-6 for its zeros: the bounds counted inactive and the error
    # named causes without active_tol, advising check_solution=False, whose gradient was
    # (.75, −.25, −.25, −.25) for ∂y₀/∂x. Now the error names the slack and the active_tol that
    # counts the bounds active, and that option gives the closed form: ∂y₀/∂x = e₀ − 1_S/|S| on the
    # support S = {0, 1}.
    x = torch.tensor([[1.0, 1.0, -1.0, -2.0]], dtype=DT)
    with pytest.raises(SolverError, match=r"slack by only 1\.4e-06 .*pass active_tol=1e-05 or larger") as info:
        _InteriorSimplex(1e-6)(x.clone().requires_grad_(True)).sum().backward()
    assert "check_solution=False would keep them free: a wrong gradient" in str(info.value)
    tol = float(re.search(r"pass active_tol=(\S+) or larger", str(info.value)).group(1))
    xg = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _InteriorSimplex(1e-6, active_tol=tol)(xg)[:, 0].sum().backward()
    torch.testing.assert_close(xg.grad, torch.tensor([[0.5, -0.5, 0.0, 0.0]], dtype=DT), rtol=0, atol=1e-12)


def test_a_rejected_point_is_not_sent_to_check_solution_false():
    # The error advised "Pass check_solution=False to differentiate anyway", whose gradient is that
    # of a point that is not a KKT point.
    with pytest.raises(SolverError, match="not a KKT point") as info:
        StiffNonNeg(1.0, True)(torch.tensor([[0.5, 1.0, 1.0]], dtype=DT, requires_grad=True)).sum().backward()
    assert "differentiate anyway" not in str(info.value)
    assert "check_solution=False skips this check, but the gradient is then that of a point that is not" in str(
        info.value)


def test_a_residual_that_could_not_be_measured_is_no_pass():
    """verify_kkt counted an element failed where its residual exceeded the tolerance: a NaN
    residual (a measurement that overflowed, inf / inf) passed, and its gradient came back."""
    from convexddn.nodes.optimality import KKTResiduals, verify_kkt

    res = KKTResiduals(stationarity=torch.tensor([0.0, math.nan], dtype=DT), feasibility=torch.zeros(2, dtype=DT),
                       weakly_active=torch.zeros(2, dtype=torch.bool))
    with pytest.raises(SolverError, match=r"for 1 of 2 batch element\(s\), at batch indices \[\(1,\)\]"):
        verify_kkt("Node.", res, 1e-6, (2,))
