"""The qp registry layer's learn= / inputs=: learned blocks are nn.Parameters of the
module, inputs are passed at call time, the rest are constants."""
from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch

import convexddn as cddn
from convexddn.convex import registry
from convexddn.convex.learned import LearnedLayer
from convexddn.errors import GradientWarning, NonFiniteError, OptionError, ProblemError, ShapeError

F64 = torch.float64


def halfspace_projection(q: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """argmin ½‖y‖² + qᵀy s.t. gᵀy ≤ h  =  −q − max(0, (−gᵀq − h)/‖g‖²) g (closed form)."""
    step = torch.clamp((-(q @ g) - h) / (g @ g), min=0)
    return -q - step.unsqueeze(-1) * g


def max_margin(G: np.ndarray, h: np.ndarray, A: np.ndarray | None = None, b: np.ndarray | None = None) -> float:
    """The largest t with G z + t ≤ h (and A z = b) for some z: > 0 iff strictly feasible."""
    z, t = cp.Variable(G.shape[1]), cp.Variable()
    cons = [G @ z + t <= h, t <= 10]
    if A is not None:
        cons.append(A @ z == b)
    return cp.Problem(cp.Maximize(t), cons).solve(solver="CLARABEL")


def test_qp_learn_makes_parameters():
    torch.manual_seed(0)
    layer = cddn.layer("qp", n=10, n_ineq=5, learn="qGh")
    assert isinstance(layer, LearnedLayer)
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {"learned.q": (10,), "learned.G": (5, 10), "learned.h": (5,)}
    assert layer.inputs == []
    assert torch.equal(layer.learned["q"], torch.zeros(10))
    # The documented default: strictly feasible, with margin 1 at the drawn point z0.
    G, h = (layer.learned[k].detach().double().numpy() for k in "Gh")
    assert max_margin(G, h) >= 1 - 1e-6
    y = layer()  # nothing passed at call time; L = I fixed
    assert y.shape == (10,) and y.dtype == torch.float32
    # q = 0 and h > G·0 ⇒ y = 0; the gradient in q is −(sum of ones) there (dy/dq = −I).
    y.sum().backward()
    assert torch.allclose(y, torch.zeros(10), atol=1e-6)
    assert torch.allclose(layer.learned["q"].grad, -torch.ones(10), atol=1e-5)



def test_learned_layer_exposes_the_wrapped_layers_last_solve():
    """layer("qp", learn=...) returns a LearnedLayer, not the ConvexLayer the README's
    ``layer.last_solve`` is read from: it raised AttributeError (the record was only at the
    undocumented ``.layer.last_solve``). Now a read-only view of the wrapped layer's."""
    qp = cddn.layer("qp", n=3, n_ineq=2, learn="qG", inputs="h")
    assert qp.last_solve is None  # before the first call, as a ConvexLayer's
    qp(torch.ones(4, 2))
    assert qp.last_solve is qp.layer.last_solve
    assert qp.last_solve.solved.shape == (4,) and bool(qp.last_solve.solved.all())
    with pytest.raises(AttributeError):
        qp.last_solve = None

def test_qp_learn_closed_form_values_and_gradients():
    """One learned half-space (g, h), q passed at call time, against the closed form."""
    torch.manual_seed(1)
    layer = cddn.layer("qp", n=3, n_ineq=1, learn="Gh", inputs="q",
                       G=[[1.0, -0.5, 2.0]], h=[0.3]).double()
    assert torch.equal(layer.learned["G"], torch.tensor([[1.0, -0.5, 2.0]], dtype=F64))
    q = torch.randn(6, 3, dtype=F64, requires_grad=True)
    y = layer(q)
    g, h = layer.learned["G"][0], layer.learned["h"][0]
    ref = halfspace_projection(q, g, h)
    assert y.dtype == F64 and torch.allclose(y, ref, atol=1e-8)
    w = torch.randn(6, 3, dtype=F64)
    got = torch.autograd.grad(y, [q, layer.learned["G"], layer.learned["h"]], w)
    want = torch.autograd.grad(ref, [q, g, h], w)
    assert torch.allclose(got[0], want[0], atol=1e-6)
    assert torch.allclose(got[1][0], want[1], atol=1e-6)
    assert torch.allclose(got[2][0], want[2], atol=1e-6)


def test_qp_learn_trains_parameters():
    """Gradient descent through the solver on a learned h. Every element keeps the
    constraint gᵀy ≤ h active, where y = −q − (gᵀ(−q) − h) g/‖g‖², so the mean squared
    error to the teacher's (h = 0.2) output is (h − 0.2)²/4 and each step with lr = 1
    halves h − 0.2: exactly 0.8/2⁶ after 6 steps."""
    torch.manual_seed(2)
    g = [[1.0, 1.0]]
    teacher = cddn.layer("qp", n=2, n_ineq=1, inputs="q", G=g, h=[0.2])
    student = cddn.layer("qp", n=2, n_ineq=1, learn="h", inputs="q", G=g, h=[1.0])
    q = -torch.rand(16, 2) - 0.6  # gᵀ(−q) > 1.2 > h: the constraint is active throughout
    with torch.no_grad():
        target = teacher(q)
    opt = torch.optim.SGD(student.parameters(), lr=1.0)
    for _ in range(6):
        opt.zero_grad()
        ((student(q) - target) ** 2).mean().backward()
        opt.step()
    assert abs(student.learned["h"].item() - (0.2 + 0.8 / 2 ** 6)) < 1e-5


def test_qp_inputs_by_position_or_name():
    torch.manual_seed(3)
    layer = cddn.layer("qp", n=3, n_ineq=2, n_eq=1, learn="Gh", inputs="qb", A=[[1.0, 1.0, 1.0]])
    assert layer.inputs == ["q", "b"]
    q, b = torch.randn(4, 3, dtype=F64), torch.randn(4, 1, dtype=F64)
    layer = layer.double()
    by_position = layer(q, b)
    assert torch.equal(layer(q=q, b=b), by_position)
    assert torch.equal(layer(q, b=b), by_position)
    assert torch.allclose(by_position.sum(-1, keepdim=True), b, atol=1e-8)  # A y = b
    with pytest.raises(ShapeError, match=r"'G' is learned .*the inputs are \['q', 'b'\]"):
        layer(q, b, G=torch.zeros(2, 3))
    with pytest.raises(ShapeError, match=r"unknown input name 'x'"):
        layer(q, x=b)
    with pytest.raises(ShapeError, match=r"missing \['b'\]"):
        layer(q)
    with pytest.raises(ShapeError, match=r"expected 2 input tensor\(s\) \['q', 'b'\], got 3"):
        layer(q, b, b)
    with pytest.raises(ShapeError, match="both by position and by name"):
        layer(q, b, q=q)


def test_qp_learned_errors_name_the_inputs_by_their_positions():
    """The wrapped layer numbered the tensors in its full parameter list: the first of
    three inputs was "parameter 1 (q)", the third "parameter 3 (h)"."""
    from convexddn.errors import DTypeError, NonFiniteError

    lay = cddn.layer("qp", n=3, n_ineq=2, learn="L", inputs="qGh")
    assert lay.inputs == ["q", "G", "h"]
    with pytest.raises(ShapeError, match=r"^input 0 \(q\) must have shape"):
        lay(torch.randn(4, 5), torch.randn(2, 3), torch.randn(2))
    with pytest.raises(NonFiniteError, match=r"^input 1 \(G\) must be finite"):
        lay(torch.randn(3), torch.full((2, 3), float("nan")), torch.randn(2))
    with pytest.raises(DTypeError, match=r"^input 2 \(h\)"):
        lay(torch.randn(3), torch.randn(2, 3), torch.ones(2, dtype=torch.int64))


def test_learned_layer_leaves_the_wrapped_layers_labels_alone():
    """Wrapping a ConvexLayer renamed its parameters in its own errors: called directly
    after LearnedLayer(cl, ...), cl's "parameter 3 (h)" read "input 1 (h)"."""
    from convexddn.errors import NonFiniteError

    cl = cddn.layer("qp", n=3, n_ineq=2)
    assert [p.name() for p in cl.parameters_] == ["L", "q", "G", "h"]
    L, q, G = torch.eye(3), torch.randn(3), torch.randn(2, 3)
    h_nan = torch.full((2,), float("nan"))
    direct = r"^parameter 3 \(h\) must be finite"
    with pytest.raises(NonFiniteError, match=direct):
        cl(L, q, G, h_nan)
    wrapped = LearnedLayer(cl, {"L": np.eye(3), "q": np.zeros(3)})
    assert wrapped.inputs == ["G", "h"]
    with pytest.raises(NonFiniteError, match=direct):
        cl(L, q, G, h_nan)
    # Through the wrapper: the inputs by their own positions, the learned ones by name.
    with pytest.raises(NonFiniteError, match=r"^input 1 \(h\) must be finite"):
        wrapped(G, h_nan)
    with pytest.raises(ShapeError, match=r"^input 0 \(G\) must have shape"):
        wrapped(torch.randn(3, 2), torch.randn(2))
    with torch.no_grad():
        wrapped.learned["q"].fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"^learned parameter q must be finite"):
        wrapped(G, torch.ones(2))
    # ... and the layer itself still names its own, also after the wrapper's errors.
    with pytest.raises(NonFiniteError, match=direct):
        cl(L, q, G, h_nan)


def test_qp_default_inputs_unchanged():
    """Nothing learned: every block without a value is passed at call time (as before)."""
    layer = cddn.layer("qp", n=4, n_ineq=3)
    assert isinstance(layer, cddn.ConvexLayer) and not list(layer.parameters())
    assert [p.name() for p in layer.parameters_] == ["L", "q", "G", "h"]
    spec = registry.build("qp", n=4, n_ineq=3, G=np.eye(4)[:3])
    assert [p.name() for p in spec.parameters] == ["L", "q", "h"] and spec.learned == {}


def test_qp_spec_declares_learned_and_inputs():
    torch.manual_seed(4)
    spec = registry.build("qp", n=4, n_ineq=3, n_eq=2, learn="GhAb", inputs="q")
    assert [p.name() for p in spec.parameters] == ["q", "G", "h", "A", "b"]
    assert [p.name() for p in spec.inputs] == ["q"]
    assert list(spec.learned) == ["G", "h", "A", "b"]  # in parameter order
    assert {k: v.shape for k, v in spec.learned.items()} == {"G": (3, 4), "h": (3,), "A": (2, 4), "b": (2,)}
    ln = spec.learned
    assert max_margin(ln["G"], ln["h"], ln["A"], ln["b"]) >= 1 - 1e-6
    # b a constant: z0 is moved onto {A z = b}, so the learned h is still feasible.
    A, b = np.array([[1.0, 2.0, 0.0, -1.0]]), np.array([5.0])
    spec = registry.build("qp", n=4, n_ineq=3, n_eq=1, learn="Gh", A=A, b=b)
    assert max_margin(spec.learned["G"], spec.learned["h"], A, b) >= 1 - 1e-6
    # The same seed, the same initial values (torch's global generator).
    torch.manual_seed(5)
    first = registry.build("qp", n=4, n_ineq=3, learn="Gh").learned
    torch.manual_seed(5)
    second = registry.build("qp", n=4, n_ineq=3, learn="Gh").learned
    assert all(np.array_equal(first[k], second[k]) for k in "Gh")


def test_qp_learned_state_dict_round_trip():
    torch.manual_seed(6)
    trained = cddn.layer("qp", n=3, n_ineq=2, learn="Gh", inputs="q")
    torch.manual_seed(7)
    fresh = cddn.layer("qp", n=3, n_ineq=2, learn="Gh", inputs="q")
    assert set(trained.state_dict()) == {"learned.G", "learned.h"}
    q = torch.randn(5, 3)
    assert not torch.equal(fresh(q), trained(q))
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh(q), trained(q))


def test_qp_learn_invalid():
    with pytest.raises(OptionError, match=r"\['h'\] are both in learn and in inputs"):
        registry.build("qp", n=3, n_ineq=2, learn="Gh", inputs="qh")
    with pytest.raises(OptionError, match=r"\['G'\] are inputs .* and also given a value"):
        registry.build("qp", n=3, n_ineq=2, inputs="Gh", G=np.ones((2, 3)))
    with pytest.raises(OptionError, match=r"G is not learned .* nor an input .*shape \(2, 3\)"):
        registry.build("qp", n=3, n_ineq=2, learn="h", inputs="q")
    with pytest.raises(OptionError, match=r"inputs must name blocks among .*got \['x'\]"):
        registry.build("qp", n=3, inputs="x")
    with pytest.raises(OptionError, match="learn must be a string such as 'Gh'"):
        registry.build("qp", n=3, learn=5)
    with pytest.raises(OptionError, match=r"learn must name each block once, got 'LL' \(twice or more: \['L'\]\)"):
        registry.build("qp", n=3, learn="LL")
    with pytest.raises(OptionError, match=r"inputs must name each block once, got \('q', 'h', 'q'\)"):
        registry.build("qp", n=3, n_ineq=2, inputs=("q", "h", "q"))
    with pytest.raises(OptionError, match=r"option G must have shape \(2, 3\), got \(3, 2\)"):
        cddn.layer("qp", n=3, n_ineq=2, learn="Gh", G=np.ones((3, 2)))


def test_qp_describe_shows_options_as_typed():
    line = registry.describe("qp")
    assert "learn=''" in line and "inputs=None" in line and "('L'" not in line


def test_spec_learned_contract_is_checked(monkeypatch):
    """A catalog builder declaring a learned value of the wrong shape is a ProblemError."""
    def bad(n: int = 2):
        x = cp.Parameter(n, name="x")
        y = cp.Variable(n, name="y")
        return cp.Problem(cp.Minimize(cp.sum_squares(y - x))), [x], [y], {"x": np.zeros(n + 1)}

    registry.names()  # load the catalog first, so the fixture restores exactly it
    monkeypatch.setitem(registry._REGISTRY, "bad_learned", registry._Entry(bad, "test only"))
    with pytest.raises(ProblemError, match=r"declared learned parameter 'x' with shape \(3,\)"):
        registry.build("bad_learned")


def test_learned_layer_names_its_inputs_in_the_backward_warning_too():
    """The float16 gradient-overflow warning of the backward is formed at the call:
    through a LearnedLayer it names q as the wrapper's input 0 (relabelling only the
    forward's errors left it 'parameter 1 (q)'); the wrapped layer called directly
    meanwhile keeps its own numbering."""
    lay = cddn.layer("qp", n=3, n_ineq=2, learn="L", inputs="qGh")
    q = torch.randn(3, dtype=torch.float16, requires_grad=True)
    G, h = torch.randn(2, 3), torch.ones(2)
    y = lay(q, G, h)
    with pytest.warns(GradientWarning, match=r"input 0 \(q\)"):
        y.backward(torch.full_like(y, 1e6))
    inner = lay.layer
    L = lay.learned["L"].detach()
    with pytest.raises(NonFiniteError, match=r"parameter 3 \(h\)"):
        inner(L, q.detach(), G, torch.tensor([1.0, float("nan")]))


def test_qp_constraint_values_need_their_row_count():
    """n_ineq / n_eq left at 0 with G, h (A, b) given: the constraint was dropped without
    a word (y = −q violated G y ≤ h). Now an OptionError names the count to pass."""
    G, h = [[1.0, 1.0, 1.0]], [0.0]
    with pytest.raises(OptionError, match=r"option G must have shape \(0, 3\), got \(1, 3\) "
                                          r"\(G has 1 row\(s\) but n_ineq=0: pass n_ineq=1\)"):
        cddn.layer("qp", n=3, G=G, h=h, inputs="q")
    with pytest.raises(OptionError, match=r"h has 1 row\(s\) but n_ineq=0: pass n_ineq=1"):
        cddn.layer("qp", n=3, h=h, inputs="q")
    with pytest.raises(OptionError, match=r"A has 1 row\(s\) but n_eq=0: pass n_eq=1"):
        cddn.layer("qp", n=3, A=G, b=h, inputs="q")
    with pytest.raises(OptionError, match=r"G has 3 row\(s\) but n_ineq=2: pass n_ineq=3"):
        cddn.layer("qp", n=3, n_ineq=2, G=np.ones((3, 3)), h=np.ones(2), inputs="q")
    with pytest.raises(OptionError, match=r"learn names block\(s\) \['G'\] of a constraint with no rows "
                                          r"\(n_ineq=0\); pass n_ineq=m"):
        cddn.layer("qp", n=3, learn="G")
    with pytest.raises(OptionError, match=r"inputs names block\(s\) \['G'\] .*\(n_ineq=0\).*drop \['G'\] from inputs"):
        cddn.layer("qp", n=3, inputs="Gq")
    with pytest.raises(OptionError, match=r"learn names block\(s\) \['A', 'b'\] .*\(n_eq=0\); pass n_eq=m"):
        cddn.layer("qp", n=3, learn="Ab", inputs="q")
    # An empty constraint block (0 rows) is what n_ineq=0 means: still dropped.
    assert [p.name() for p in registry.build("qp", n=3, G=np.zeros((0, 3)), h=[], inputs="q").parameters] == ["q"]
    # With the count, the constraint holds: the closed-form half-space projection.
    q = torch.tensor([-1.0, -2.0, -3.0], dtype=F64)
    y = cddn.layer("qp", n=3, n_ineq=1, G=G, h=h, inputs="q")(q)
    assert torch.allclose(y, halfspace_projection(q, torch.tensor(G[0], dtype=F64), torch.tensor(0.0, dtype=F64)),
                          atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_qp_learned_b_starts_strictly_feasible_for_constant_inequalities(seed):
    """Learned b, constant A = 1ᵀ, G = I, h = −1: b = A z0 for a z0 that ignored z ≤ −1,
    and the first call was infeasible. {z < −1, 1ᵀz = b} is non-empty iff b < −3; with q
    = 0 and L = I the solution is then y = (b/3) 1 (the symmetric point, inside)."""
    torch.manual_seed(seed)
    layer = cddn.layer("qp", n=3, n_ineq=3, n_eq=1, learn="b", inputs="q",
                       A=np.ones((1, 3)), G=np.eye(3), h=-np.ones(3)).double()
    b = layer.learned["b"].item()
    assert b < -3 - 1e-6
    y = layer(torch.zeros(3, dtype=F64))
    assert torch.allclose(y, torch.full((3,), b / 3, dtype=F64), atol=1e-7)
    # Learned A with constant b, G, h: the start is strictly feasible too.
    spec = registry.build("qp", n=3, n_ineq=3, n_eq=1, learn="A", inputs="q", b=[-6.0], G=np.eye(3), h=-np.ones(3))
    assert max_margin(np.eye(3), -np.ones(3), spec.learned["A"], np.array([-6.0])) > 1e-3


def test_qp_learned_start_refuses_constants_without_a_strictly_feasible_point():
    # y ≤ −1 and −y ≤ −1 (y ≥ 1): no learned b can make the first call feasible.
    with pytest.raises(OptionError, match=r"the constraints G y <= h have no strictly feasible point .* "
                                          r"learned block\(s\) \['b'\] cannot start strictly feasible; check .* h"):
        registry.build("qp", n=1, n_ineq=2, n_eq=1, learn="b", inputs="q", A=[[1.0]], G=[[1.0], [-1.0]],
                       h=[-1.0, -1.0])


def test_qp_learned_start_accepts_loose_constant_bounds():
    """h = 1e8 with G = I: y = 0 is feasible with a margin of 1e8, but the margin was
    capped at 1 and compared with 1e-7 (1 + max|h|) = 10: 'no strictly feasible point'."""
    spec = registry.build("qp", n=2, n_ineq=2, n_eq=1, learn="b", inputs="q", A=[[1.0, 1.0]], G=np.eye(2),
                          h=[1e8, 1e8])
    b = np.asarray(spec.learned["b"], dtype=np.float64)
    assert b.shape == (1,) and np.isfinite(b).all()


@pytest.mark.parametrize("learn, extra", [("h", {"G": np.eye(2)}), ("G", {"h": np.ones(2)}), ("Gh", {})])
def test_qp_learned_start_refuses_inconsistent_constant_equalities(learn, extra):
    """A = [[1, 1], [1, 1]], b = (0, 1): y1 + y2 cannot be both 0 and 1. Learned h (or G, h)
    were started at G z0 + 1 for the least-squares z0, built without error, and the first
    call raised InfeasibleError; learned G blamed 'h and b'. The same rank-deficient A with
    a consistent b = (1, 1) builds, and its first call solves, with y1 + y2 = 1."""
    A = np.array([[1.0, 1.0], [1.0, 1.0]])
    with pytest.raises(OptionError, match=r"the equalities A y = b have no solution \(least-squares residual "
                                          r"max\|A y - b\| = 0\.5\).*check the constant b and the constant A$"):
        cddn.layer("qp", n=2, n_ineq=2, n_eq=2, A=A, b=[0.0, 1.0], learn=learn, inputs="q", **extra)
    torch.manual_seed(0)
    layer = cddn.layer("qp", n=2, n_ineq=2, n_eq=2, A=A, b=[1.0, 1.0], learn=learn, inputs="q", **extra).double()
    y = layer(torch.zeros(2, dtype=F64))
    torch.testing.assert_close(y.sum(), torch.tensor(1.0, dtype=F64), atol=1e-7, rtol=0)


@pytest.mark.parametrize("options", [{"inputs": ""}, {"L": np.eye(2), "q": np.zeros(2)},
                                     {"n_ineq": 1, "G": np.ones((1, 2)), "h": np.ones(1), "inputs": ""}])
def test_qp_without_any_parameter_is_an_option_error(options):
    # Every block a constant: the ConvexLayer's ProblemError asked to declare a cp.Parameter.
    with pytest.raises(OptionError, match=r"qp has no learned or input block.*inputs=.*learn="):
        cddn.layer("qp", n=2, **options)


def qp_reference(q: np.ndarray, G: np.ndarray, h: np.ndarray, A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin ½‖y‖² + qᵀy s.t. G y ≤ h, A y = b by cvxpy + Clarabel (L = I)."""
    y = cp.Variable(q.shape[0])
    cons = ([G @ y <= h] if G.size else []) + ([A @ y == b] if A.size else [])
    cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y) + q @ y), cons).solve(solver="CLARABEL")
    return y.value


@pytest.mark.parametrize("options, blamed", [
    ({"learn": "G", "h": [-1.0, -1.0], "inputs": "qAb"}, r"constant h has an entry -1 <= 0"),
    ({"learn": "b", "h": [-1.0, 2.0], "A": [[1.0, 0.0]], "inputs": "qG"}, r"constant h has an entry -1 <= 0"),
    ({"learn": "h", "b": [1.0], "G": np.eye(2), "inputs": "qA"}, r"constant b is not 0 \(max\|b\| = 1\)")])
def test_qp_learned_start_with_input_A_or_G_refuses_constants_excluding_zero(options, blamed):
    """An input A or G forces the start z0 = 0 (A 0 = 0, G 0 = 0 whatever their values), and
    constant h = −1 (or b = 1) excludes it: learn='G', h = −1, inputs='qAb' built, and 6 first
    calls in 10 were InfeasibleError (no learned G helps: G 0 = 0 > −1). Now an OptionError
    names the constant and the inputs; h > 0 builds, and its first call matches Clarabel."""
    with pytest.raises(OptionError, match=r"with \['[AG]'\] among inputs, the learned block\(s\) .* start at "
                                          r"z0 = 0 .*" + blamed):
        registry.build("qp", n=2, n_ineq=2, n_eq=1, **options)
    A, b, q = np.array([[1.0, 1.0]]), np.array([0.0]), np.array([0.3, -0.2])
    for seed in range(3):
        torch.manual_seed(seed)
        layer = cddn.layer("qp", n=2, n_ineq=2, n_eq=1, learn="G", h=[0.5, 1.0], inputs="qAb").double()
        y = layer(*(torch.tensor(v, dtype=F64) for v in (q, A, b)))
        G = layer.learned["G"].detach().numpy()
        np.testing.assert_allclose(y.detach().numpy(), qp_reference(q, G, np.array([0.5, 1.0]), A, b), atol=1e-6)


@pytest.mark.parametrize("options, match", [
    ({"n_eq": 3, "learn": "Ab"}, r"n_eq=3 equality rows in n=2 unknowns with learned block\(s\) \['A', 'b'\].*"
                                 r"pass n_eq <= n"),
    ({"n_eq": 3, "learn": "A", "b": [1.0, 2.0, 3.0]}, r"n_eq=3 equality rows in n=2 .*pass n_eq <= n"),
    ({"n_eq": 2, "learn": "b", "A": [[1.0, 1.0], [3.0, 3.0]]}, r"the constant A has rank 1 < n_eq=2 .*"
                                                                r"drop the dependent rows of A")])
def test_qp_learned_A_or_b_needs_independent_rows(options, match):
    """learn='Ab' with n_eq = 3 > n = 2: b = A z0 is consistent in float64, but A, b stored
    in float32 left A's range (lstsq residual 3e-9 to 1.4e-8) and every first call was a
    SolverError; a constant A = [[1, 1], [3, 3]] with learned b failed for 2 seeds in 3.
    Now an OptionError at build time; with n_eq <= n the first call matches Clarabel."""
    with pytest.raises(OptionError, match=match):
        registry.build("qp", n=2, inputs="q", **options)
    q = np.array([0.3, -0.2, 0.1])
    for seed in range(3):
        torch.manual_seed(seed)
        layer = cddn.layer("qp", n=3, n_eq=2, learn="Ab", inputs="q")  # float32 parameters
        y = layer(torch.tensor(q, dtype=torch.float32))
        A, b = (layer.learned[k].detach().double().numpy() for k in "Ab")
        np.testing.assert_allclose(y.detach().double().numpy(), qp_reference(q, np.zeros((0, 3)), np.zeros(0), A, b),
                                   atol=1e-4)


@pytest.mark.parametrize("how", ["context", "default"])
def test_qp_learn_builds_under_a_meta_default_device(how, default_device):
    """layer("qp", learn="Gh") under torch.device("meta") (or torch.set_default_device,
    as a CUDA default device is set): its learned blocks are parameters on that device,
    as nn.Linear's are, and to_empty + load_state_dict(assign=True) gives it values. The
    initial draw and the canonicalisation's index maps followed the default device and
    .numpy() refused them (torch's TypeError)."""
    def make():
        return cddn.layer("qp", n=3, n_ineq=1, learn="Gh", inputs="q")
    with default_device("meta", how):
        layer = make()
    assert all(p.is_meta for p in layer.parameters())
    g, h = torch.tensor([1.0, -0.5, 2.0], dtype=F64), torch.tensor(0.3, dtype=F64)
    layer = layer.to_empty(device="cpu")
    layer.load_state_dict({"learned.G": g.reshape(1, 3), "learned.h": h.reshape(1)}, assign=True)
    q = torch.tensor([[0.4, -1.0, -0.8], [-1.0, 0.2, 0.1]], dtype=F64)
    assert torch.allclose(layer(q), halfspace_projection(q, g, h), atol=1e-7)


def test_learned_layer_names_its_tensors_in_the_broadcast_error():
    """The batch-broadcast ShapeError named bare CVXPY names ("q: (2,), G: (), h: (), b: (4,)")
    where the layer's other errors name each tensor as passed (a tester's finding)."""
    lay = cddn.layer("qp", n=3, n_ineq=2, n_eq=1, learn="Gh", inputs="qb", A=np.ones((1, 3))).double()
    with pytest.raises(ShapeError, match=r"do not broadcast: input 0 \(q\): \(2,\), learned parameter G: \(\), "
                                         r"learned parameter h: \(\), input 1 \(b\): \(4,\)"):
        lay(torch.randn(2, 3, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64))
