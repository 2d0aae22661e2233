"""Serialisation and determinism of every node.

Each node (ConvexLayer, RobustPool with every penalty, LpProjection, SimplexProjection,
a DeclarativeNode subclass) survives ``copy.deepcopy``, ``pickle``, ``torch.save`` /
``torch.load``, a ``state_dict`` round trip into a freshly built module, and use inside
DataLoader worker processes (fork and spawn); a ConvexLayer rebuilt from the registry
by name gives identical outputs. "Identical" means ``torch.equal`` for outputs and
gradients: the copies run the same deterministic CPU code on the same float64 data.

Determinism: the same input gives bit-identical outputs and gradients on the CPU across
calls, also with other calls in between.
"""
from __future__ import annotations

import copy
import io
import pickle
import warnings

import cvxpy as cp
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import convexddn as cddn

DT = torch.float64
N = 4


class WeightedCentroid(cddn.DeclarativeNode):
    """argmin_y Σᵢ wᵢ (y − xᵢ)² with learned weights wᵢ = exp(logwᵢ)."""

    def __init__(self, n: int = N) -> None:
        super().__init__()
        self.logw = nn.Parameter(torch.linspace(-0.5, 0.5, n, dtype=DT))

    def objective(self, x, y):
        return (self.logw.exp() * (y - x) ** 2).sum(-1)

    def solve(self, x):
        w = self.logw.exp()
        return (w * x).sum(-1, keepdim=True) / w.sum()


def box_layer(n: int = N) -> cddn.ConvexLayer:
    x = cp.Parameter(n, name="x")
    u = cp.Variable(n, name="u")
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(u - x)), [u >= -0.5, u <= 0.5])
    return cddn.ConvexLayer(prob, [x], [u])


def make_nodes() -> dict[str, nn.Module]:
    """name -> freshly built module. Learnable options are parameters, so the
    state_dict round trip has something to carry."""
    nodes: dict[str, nn.Module] = {
        "convex_box": box_layer(),
        "convex_registry_l1": cddn.layer("lp_ball", n=N, p=1, radius=0.7, backend="cvxpy"),
        "lp_l1_ball": cddn.LpProjection(p=1, mode="ball", radius=0.7),
        "lp_l2_sphere_param": cddn.LpProjection(p=2, mode="sphere",
                                                radius=nn.Parameter(torch.tensor(1.3, dtype=DT))),
        "lp_inf_buffer": cddn.LpProjection(p="inf", radius=torch.tensor(0.6, dtype=DT)),
        "simplex": cddn.SimplexProjection(),
        "declarative": WeightedCentroid(),
    }
    for pen in ("quadratic", "pseudo_huber", "huber", "welsch", "trunc_quad"):
        nodes[f"pool_{pen}"] = cddn.RobustPool(pen, alpha=nn.Parameter(torch.tensor(0.8, dtype=DT)))
    return nodes


NODES = list(make_nodes())


def sample_input(seed: int = 0, batch: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = 1.5 * torch.randn(batch, N, generator=g, dtype=DT)
    x[0, 1] = 3.0  # an outlier for the robust penalties
    return x


def run(node: nn.Module, x: torch.Tensor):
    """Output and the gradients of a fixed linear functional w.r.t. x and the parameters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cddn.errors.ConvexDDNWarning)
        xr = x.clone().requires_grad_(True)
        y = node(xr)
        v = torch.linspace(-1.0, 1.0, y.numel(), dtype=y.dtype).reshape(y.shape)
        params = [p for p in node.parameters() if p.requires_grad]
        grads = torch.autograd.grad(y, [xr, *params], v)
    return y.detach(), grads


def assert_identical(a, b, what: str) -> None:
    (ya, ga), (yb, gb) = a, b
    assert torch.equal(ya, yb), f"{what}: outputs differ"
    assert len(ga) == len(gb), f"{what}: different number of gradients"
    for i, (p, q) in enumerate(zip(ga, gb)):
        assert torch.equal(p, q), f"{what}: gradient {i} differs"


def perturb_parameters(node: nn.Module) -> None:
    """Move every trainable parameter and floating buffer, as training would."""
    with torch.no_grad():
        for p in node.parameters():
            p.mul_(1.1).add_(0.05)
        for name, b in node.named_buffers():
            if b.is_floating_point() and b.layout == torch.strided:
                b.mul_(1.2)


CONVEX_NODES = [n for n in NODES if n.startswith("convex_")]


@pytest.mark.parametrize("name", NODES)
def test_deepcopy(name):
    node = make_nodes()[name]
    perturb_parameters(node)
    x = sample_input()
    ref = run(node, x)
    clone = copy.deepcopy(node)
    assert_identical(run(clone, x), ref, "deepcopy")
    # The copy is independent: changing it leaves the original alone.
    perturb_parameters(clone)
    assert_identical(run(node, x), ref, "original after changing the copy")


@pytest.mark.parametrize("name", NODES)
def test_pickle_and_torch_save(name):
    node = make_nodes()[name]
    perturb_parameters(node)
    x = sample_input()
    ref = run(node, x)
    assert_identical(run(pickle.loads(pickle.dumps(node)), x), ref, "pickle")
    buf = io.BytesIO()
    torch.save(node, buf)
    buf.seek(0)
    assert_identical(run(torch.load(buf, weights_only=False), x), ref, "torch.save/load")


@pytest.mark.parametrize("name", NODES)
def test_state_dict_round_trip(name):
    trained = make_nodes()[name]
    perturb_parameters(trained)
    x = sample_input(1)
    ref = run(trained, x)
    buf = io.BytesIO()
    torch.save(trained.state_dict(), buf)
    buf.seek(0)
    fresh = make_nodes()[name]
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert_identical(run(fresh, x), ref, "state_dict")
    if any(True for _ in trained.parameters()) and name != "pool_quadratic":  # alpha unused
        # The round trip carried something: the fresh module differed before loading.
        y_before, _ = run(make_nodes()[name], x)
        assert not torch.equal(y_before, ref[0])


def test_state_dict_keys_name_the_learnable_options():
    nodes = make_nodes()
    assert set(nodes["pool_welsch"].state_dict()) == {"alpha"}
    assert set(nodes["lp_l2_sphere_param"].state_dict()) == {"radius"}
    assert set(nodes["lp_inf_buffer"].state_dict()) == {"radius"}
    assert set(nodes["declarative"].state_dict()) == {"logw"}


def test_robust_pool_tensor_alpha_is_a_buffer():
    pool = cddn.RobustPool("huber", alpha=torch.tensor([0.5, 1.0, 2.0], dtype=DT))
    assert "alpha" in pool.state_dict()
    pool.to(torch.float32)
    assert pool.alpha.dtype == torch.float32


def _solved_box_layer(cls, solver, when):
    """A box projection layer whose problem the user solved with CVXPY ``when`` ("before"
    or "after") wrapping it: the solve caches Clarabel's model (which does not pickle) on
    the problem."""
    x = cp.Parameter(N, name="x")
    u = cp.Variable(N, name="u")
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(u - x)), [u >= -0.5, u <= 0.5])
    x.value = [1.0, -2.0, 0.25, 3.0]
    if when == "before":
        prob.solve(solver=cp.CLARABEL)
    layer = cls(prob, [x], [u], solver=solver) if solver is not None else cls(prob, [x], [u])
    layer(sample_input())  # builds what the first call builds
    if when == "after":
        prob.solve(solver=cp.CLARABEL)
    assert prob._solver_cache
    return layer, prob


class _First(nn.Module):
    """The layer with a single-tensor output (CvxpyLayer returns a tuple)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        y = self.layer(x)
        return y[0] if isinstance(y, tuple) else y


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("cls,solver", [(cddn.CvxpyLayer, None), (cddn.CvxpyLayer, "CLARABEL"),
                                        (cddn.ConvexLayer, "auto"), (cddn.ConvexLayer, "Clarabel")],
                         ids=["CvxpyLayer", "CvxpyLayer-CLARABEL", "ConvexLayer", "ConvexLayer-Clarabel"])
def test_pickle_deepcopy_torch_save_after_prob_solve(cls, solver, when):
    # CvxpyLayer kept the user's problem (with its cached Clarabel model) and failed with
    # "cannot pickle 'builtins.DefaultSolver' object"; so did ConvexLayer's per-element
    # layer (cvxpylayers keeps the problem) when the problem was solved after wrapping.
    layer, prob = _solved_box_layer(cls, solver, when)
    x = sample_input()
    ref = run(_First(layer), x)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    copies = {"pickle": pickle.loads(pickle.dumps(layer)), "deepcopy": copy.deepcopy(layer),
              "torch.save/load": torch.load(buf, weights_only=False)}
    for what, clone in copies.items():
        assert_identical(run(_First(clone), x), ref, what)
    assert prob._solver_cache  # the user's problem keeps its cache
    assert_identical(run(_First(layer), x), ref, "original after the copies")


# ----------------------------------------------------------------- registry rebuild


@pytest.mark.parametrize("name,options", [
    ("lp_ball", {"n": N, "p": 1, "radius": 0.7}),
    ("lp_ball", {"n": N, "p": 2, "radius": 1.5}),
    ("simplex", {"n": N}),
    ("robust_pool", {"n": N, "penalty": "pseudo_huber", "alpha": 0.5}),
    ("qp", {"n": N, "n_ineq": 2, "inputs": "qh", "ridge": 0.1,
            "G": [[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, -1.0]]}),
])
def test_registry_rebuild_by_name_gives_identical_outputs(name, options):
    spec = cddn.registry.build(name, **options)
    layer = cddn.layer(name, **options)
    # What a checkpoint would store: the name and the options; rebuild from those.
    stored = pickle.loads(pickle.dumps((spec.name, dict(spec.options))))
    rebuilt = cddn.layer(stored[0], **stored[1])
    g = torch.Generator().manual_seed(3)
    inputs = [torch.randn((2,) + tuple(p.shape), generator=g, dtype=DT) for p in spec.parameters]
    if name == "qp":
        inputs[1] = inputs[1].abs() + 0.5  # h > 0 keeps Gu <= h feasible (u = 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cddn.errors.SolverWarning)
        outs = []
        for lay in (layer, rebuilt):
            xs = [t.clone().requires_grad_(True) for t in inputs]
            y = lay(*xs)
            v = torch.linspace(-1, 1, y.numel(), dtype=DT).reshape(y.shape)
            outs.append((y.detach(), torch.autograd.grad(y, xs, v)))
    assert_identical(outs[1], outs[0], f"registry {name} rebuilt by name")


# ----------------------------------------------------------------- DataLoader workers


class NodeDataset(Dataset):
    """Item i: every node applied to sample_input(i) (no gradients in the workers)."""

    def __init__(self) -> None:
        self.nodes = make_nodes()
        for node in self.nodes.values():
            perturb_parameters(node)

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        x = sample_input(10 + i, batch=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", cddn.errors.ConvexDDNWarning)
            with torch.no_grad():
                return {name: node(x) for name, node in self.nodes.items()}


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_nodes_in_dataloader_workers(context):
    dataset = NodeDataset()
    expected = [dataset[i] for i in range(len(dataset))]
    loader = DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context=context)
    got = list(loader)
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"item {i}, node {name}"


# ----------------------------------------------------------------- determinism


@pytest.mark.parametrize("name", NODES)
def test_deterministic_across_calls(name):
    node = make_nodes()[name]
    x = sample_input(5, batch=6)
    first = run(node, x)
    run(node, sample_input(6, batch=2))  # another call in between
    for _ in range(2):
        assert_identical(run(node, x), first, "repeated call")
    # Batch composition does not matter either: each row alone gives the same output.
    # (Only the output: the parameter gradients are sums over the batch.)
    # atol: the native nodes reduce rows of the same length the same way (bit-equal in
    # practice); the ConvexLayer's solves are independent per element.
    for i in range(x.shape[0]):
        y_i, _ = run(node, x[i:i + 1])
        torch.testing.assert_close(y_i, first[0][i:i + 1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("make", [
    lambda t: cddn.LpProjection(radius=t),
    lambda t: cddn.SimplexProjection(z=t),
    lambda t: cddn.TotalVariation1d(lam=t),
])
def test_tensor_options_are_stored_as_copies(make):
    # These three stored the caller's tensor itself: a graph node (p * 2) broke deepcopy
    # and a second backward, and changing the caller's tensor changed the module.
    # (Such a tensor is detached, not learned: that is said, ConvexDDNWarning.)
    p = nn.Parameter(torch.tensor(0.8, dtype=torch.float64))
    with pytest.warns(cddn.errors.ConvexDDNWarning, match="requires grad but is a plain tensor"):
        module = make(p * 2)
    clone = copy.deepcopy(module)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    module(x).sum().backward()
    module(x).sum().backward()
    assert torch.equal(clone(x), module(x))
    t = torch.tensor(0.8, dtype=torch.float64)
    module = make(t)
    before = module(x)
    t.fill_(5.0)
    assert torch.equal(module(x), before)


def test_compiled_declarative_node_pickles_and_deepcopies():
    # nn.Module's __getstate__ drops the compiled call (a local function, not picklable);
    # the node's own __getstate__ (which leaves out its thread guard) must go through it.
    node = WeightedCentroid()
    x = torch.randn(3, N, dtype=DT)
    node(x)
    node.compile()
    copy_ = pickle.loads(pickle.dumps(node))
    assert copy_.__dict__.get("_compiled_call_impl") is None
    assert copy.deepcopy(node).__dict__.get("_compiled_call_impl") is None
    buf = io.BytesIO()
    torch.save(node, buf)
    torch.testing.assert_close(copy_(x), node._call_impl(x))


class _Clamp(nn.Module):
    def forward(self, t):
        return t.clamp(-0.25, 0.25)


def test_parametrized_declarative_node_deepcopies_after_a_call():
    # torch's parametrize deep-copies a module's __dict__ itself, past the node's
    # __getstate__: the thread guard made by the first call ("cannot pickle '_thread.lock'")
    # must copy too, as a new, free guard; AveragedModel deep-copies so.
    from torch.nn.utils import parametrize
    from torch.optim.swa_utils import AveragedModel

    from convexddn.nodes._swap_guard import SwapGuard

    node = WeightedCentroid()
    parametrize.register_parametrization(node, "logw", _Clamp())
    x = torch.randn(3, N, dtype=DT)
    node(x).sum().backward()
    w = torch.linspace(-0.5, 0.5, N, dtype=DT).clamp(-0.25, 0.25).exp()
    expected = (w * x).sum(-1, keepdim=True) / w.sum()  # the weighted mean, closed form
    guard = node.__dict__["_swap_guard"]
    with guard.reading():  # a read under way in the original is none of the copy's
        clone = copy.deepcopy(node)
        averaged = AveragedModel(node)
    for m in (clone, averaged.module):
        fresh = m.__dict__["_swap_guard"]
        assert isinstance(fresh, SwapGuard) and fresh is not guard and not fresh._readers
        y = m(x)
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=0)
        y.sum().backward()
        assert torch.isfinite(m.parametrizations.logw.original.grad).all()
    for other in (copy.copy(guard), pickle.loads(pickle.dumps(guard))):
        assert isinstance(other, SwapGuard) and other is not guard and not other._readers


@pytest.mark.parametrize("make, name", [
    (lambda t: cddn.RobustPool("huber", alpha=t), "alpha"),
    (lambda t: cddn.RobustVectorPool("huber", alpha=t), "alpha"),
    (lambda t: cddn.LpProjection(radius=t), "radius"),
    (lambda t: cddn.SimplexProjection(z=t), "z"),
    (lambda t: cddn.TotalVariation1d(lam=t), "lam"),
    (lambda t: cddn.LeastSquares(ridge=t), "ridge"),
])
def test_a_tensor_option_that_requires_grad_but_is_no_parameter_is_said_to_be_a_buffer(make, name):
    # RobustPool(alpha=torch.tensor(1.0, requires_grad=True)) was detached into a buffer
    # without a word, and alpha never learned. A Parameter is learned; a plain tensor
    # without grad is a buffer, silently, as before.
    with pytest.warns(cddn.errors.ConvexDDNWarning, match=f"{name} requires grad but is a plain tensor"):
        module = make(torch.tensor(1.5, dtype=torch.float64, requires_grad=True))
    assert name in dict(module.named_buffers())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert name in dict(make(nn.Parameter(torch.tensor(1.5, dtype=torch.float64))).named_parameters())
        assert name in dict(make(torch.tensor(1.5, dtype=torch.float64)).named_buffers())
