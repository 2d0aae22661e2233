"""Faults leave nothing broken.

A solve that fails in the middle of training (an infeasible batch element, a NaN or
Inf input) must raise its :mod:`convexddn.errors` error and leave the model's
parameters, their ``.grad`` and the optimizer state exactly as they were before the
failing call; training then goes on as if the bad batch had never been seen. A failing
call must not modify the caller's tensors either (not even in place and back: the
autograd version counter is checked as well as the bits).

Everything runs on the CPU in float64, where every node is deterministic, so "as
before" and "as if never seen" are checked bit for bit (``torch.equal``), not to a
tolerance.
"""
from __future__ import annotations

import copy
import warnings

import cvxpy as cp
import pytest
import torch
from torch import nn

import convexddn as cddn
from convexddn.errors import ConvexDDNError, InfeasibleError, NonFiniteError, SolverError

DT = torch.float64
N = 3  # width of the projected feature vector
K = 4  # points pooled per sample
D_IN = 2


def box_projection(n: int = N) -> cddn.ConvexLayer:
    """argmin_u ½‖u − x‖² s.t. lo ≤ u ≤ hi: a clamp when lo ≤ hi, infeasible otherwise."""
    x = cp.Parameter(n, name="x")
    lo = cp.Parameter(n, name="lo")
    hi = cp.Parameter(n, name="hi")
    u = cp.Variable(n, name="u")
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(u - x)), [u >= lo, u <= hi])
    return cddn.ConvexLayer(prob, [x, lo, hi], [u])


class PoolThenBox(nn.Module):
    """feats (B, K, D_IN) → embed → robust pool over the K points → clamp to a box.

    The box is centred at a learned ``centre`` with half widths taken from the batch, so
    a batch element with a negative half width makes its projection infeasible.
    """

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(D_IN, N).to(DT)
        self.pool = cddn.RobustPool("pseudo_huber", alpha=nn.Parameter(torch.tensor(1.0, dtype=DT)), dim=1)
        self.centre = nn.Parameter(torch.tensor([0.1, -0.2, 0.05], dtype=DT))
        self.proj = box_projection()

    def forward(self, feats: torch.Tensor, half_width: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.embed(feats))  # (B, N)
        return self.proj(x, self.centre - half_width, self.centre + half_width)


def make_batch(seed: int, b: int = 4):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, K, D_IN, generator=g, dtype=DT)
    half_width = 0.4 + torch.rand(b, N, generator=g, dtype=DT)
    # A fixed teacher map; the box keeps some coordinates pinned, others free.
    target = (feats.mean(1) @ torch.tensor([[0.8, -0.5, 0.3], [0.2, 0.9, -0.4]], dtype=DT))
    target = target.clamp(-0.6, 0.6)
    return feats, half_width, target


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "grads": {k: None if v.grad is None else v.grad.clone() for k, v in model.named_parameters()},
        "opt": copy.deepcopy(opt.state_dict()),
    }


def assert_same_state(a: dict, b: dict) -> None:
    assert a["params"].keys() == b["params"].keys()
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), f"parameter {k} changed"
        ga, gb = a["grads"][k], b["grads"][k]
        assert (ga is None) == (gb is None), f"grad of {k}: {ga} vs {gb}"
        if ga is not None:
            assert torch.equal(ga, gb), f"grad of {k} changed"
    sa, sb = a["opt"], b["opt"]
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        assert sa["state"][i].keys() == sb["state"][i].keys()
        for name in sa["state"][i]:
            assert torch.equal(sa["state"][i][name], sb["state"][i][name]), (
                f"optimizer state {name} of param {i} changed")


def loss_fn(model, batch):
    feats, half_width, target = batch
    return ((model(feats, half_width) - target) ** 2).mean()


def inject(kind: str, batch, index: int):
    """A copy of ``batch`` with one bad element at ``index``; returns it and the error."""
    feats, half_width, target = (t.clone() for t in batch)
    if kind == "infeasible":
        half_width[index, 1] = -0.25  # lo = centre + 0.25 > hi = centre - 0.25
        return (feats, half_width, target), InfeasibleError
    if kind == "nan_feature":  # reaches RobustPool first
        feats[index, 2, 0] = float("nan")
        return (feats, half_width, target), NonFiniteError
    if kind == "inf_bound":  # reaches ConvexLayer's parameter check
        half_width[index, 0] = float("inf")
        return (feats, half_width, target), NonFiniteError
    raise AssertionError(kind)


def train(fault: str | None, steps: int = 6, fault_step: int = 2):
    """Adam on micro-batches (accumulated gradients); the second micro-batch of
    ``fault_step`` is bad when ``fault`` is given. Returns the model, the losses on a
    fixed evaluation batch before and after, and the state checks of the failed step."""
    torch.manual_seed(0)
    model = PoolThenBox()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    eval_batch = make_batch(1000, b=6)
    with torch.no_grad():
        loss0 = float(loss_fn(model, eval_batch))
    checked = []
    for step in range(steps):
        opt.zero_grad()
        loss_fn(model, make_batch(2 * step)).backward()
        second = make_batch(2 * step + 1)
        if fault is not None and step == fault_step:
            bad, err_cls = inject(fault, second, index=2)
            before = snapshot(model, opt)
            bad_copy = tuple(t.clone() for t in bad)
            with pytest.raises(err_cls) as info:
                loss_fn(model, bad)
            # The caller's tensors are untouched (NaN-aware bitwise comparison).
            for got, want in zip(bad, bad_copy):
                assert torch.equal(got.view(torch.int64), want.view(torch.int64))
            assert_same_state(before, snapshot(model, opt))
            checked.append(info.value)
            continue  # skip the step, as a training loop that catches the error would
        loss_fn(model, second).backward()
        opt.step()
    with torch.no_grad():
        loss1 = float(loss_fn(model, eval_batch))
    return model, loss0, loss1, checked


def train_without_bad_batch(steps: int = 6, fault_step: int = 2):
    """The clean twin of ``train(fault)``: the step with the bad batch is skipped
    without ever calling the model on it."""
    torch.manual_seed(0)
    model = PoolThenBox()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for step in range(steps):
        opt.zero_grad()
        loss_fn(model, make_batch(2 * step)).backward()
        if step == fault_step:
            continue
        loss_fn(model, make_batch(2 * step + 1)).backward()
        opt.step()
    return model


@pytest.fixture(scope="module")
def clean_model():
    return train_without_bad_batch()


@pytest.mark.parametrize("fault", ["infeasible", "nan_feature", "inf_bound"])
def test_fault_leaves_state_untouched_and_training_continues(fault, clean_model):
    with warnings.catch_warnings():
        # A fallback solver may be tried on the infeasible element; it fails as well.
        warnings.simplefilter("ignore", cddn.errors.SolverWarning)
        model, loss0, loss1, errors = train(fault)
    (err,) = errors
    assert isinstance(err, ConvexDDNError)
    if fault == "infeasible":
        assert err.indices == [(2,)], err.indices
        assert "infeasible" in str(err)
    else:
        assert "must be finite" in str(err)
    # Training went on and learned.
    assert loss1 < 0.6 * loss0, (loss0, loss1)
    # ... exactly as if the bad batch had never been seen: the failed call left no
    # trace anywhere (parameters, Adam's moments and step count, cached solver state).
    for (name, p), (_, q) in zip(model.named_parameters(), clean_model.named_parameters()):
        assert torch.equal(p, q), f"{name} differs from the run without the bad batch"


def test_fault_state_checks_can_fail():
    """The comparison used above does notice a changed Adam moment and a changed grad."""
    torch.manual_seed(0)
    model = PoolThenBox()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    loss_fn(model, make_batch(0)).backward()
    opt.step()
    before = snapshot(model, opt)
    with torch.no_grad():
        opt.state[model.centre]["exp_avg"][0] += 1e-12
    with pytest.raises(AssertionError, match="exp_avg"):
        assert_same_state(before, snapshot(model, opt))
    with torch.no_grad():
        opt.state[model.centre]["exp_avg"][0] -= 1e-12
    model.centre.grad[1] += 1.0
    with pytest.raises(AssertionError, match="grad of centre"):
        assert_same_state(before, snapshot(model, opt))


# ----------------------------------------------------------------- caller's tensors


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(torch.int64 if t.dtype == torch.float64 else torch.int32).clone()


class Centroid(cddn.DeclarativeNode):
    """argmin_y Σᵢ (y − xᵢ)²: the mean."""

    def objective(self, x, y):
        return ((y - x) ** 2).sum(-1)

    def solve(self, x):
        return x.mean(-1, keepdim=True)


def failing_calls():
    """(name, call, inputs, error) for a failing call of every node."""
    nan = float("nan")
    x = torch.tensor([[0.5, -1.0, nan, 2.0], [1.0, 2.0, 3.0, 4.0]], dtype=DT, requires_grad=True)
    x32 = torch.tensor([[0.5, float("inf"), 1.0], [0.0, 1.0, 2.0]], requires_grad=True)
    calls = [(f"robust_pool[{p}]", lambda t, p=p: cddn.functional.robust_pool(t, p, alpha=0.5), (x,),
              NonFiniteError) for p in ("quadratic", "pseudo_huber", "huber", "welsch", "trunc_quad")]
    calls += [(f"project_lp[p={p},{m}]", lambda t, p=p, m=m: cddn.functional.project_lp(t, p, m, 0.5),
               (x,), NonFiniteError) for p in (1, 2, "inf") for m in ("ball", "sphere")]
    calls += [("project_lp[f32]", lambda t: cddn.functional.project_lp(t, 1, "ball", 0.5), (x32,), NonFiniteError)]
    calls += [("project_simplex", cddn.functional.project_simplex, (x,), NonFiniteError)]
    calls += [("declarative_node", Centroid(), (x,), NonFiniteError)]
    lo = torch.tensor([[0.0, 0.0, 0.0], [0.0, 2.0, 0.0]], dtype=DT, requires_grad=True)
    hi = torch.ones(2, 3, dtype=DT, requires_grad=True)
    xb = torch.randn(2, 3, dtype=DT, requires_grad=True)
    calls += [("convex_layer[infeasible]", box_projection(), (xb, lo, hi), InfeasibleError)]
    xn = x.detach()[:, :3].clone().requires_grad_(True)
    calls += [("convex_layer[nan]", box_projection(), (xn, lo, hi), NonFiniteError)]
    return {c[0]: c[1:] for c in calls}


FAILING = failing_calls()


@pytest.mark.parametrize("name", list(FAILING))
def test_failing_call_leaves_inputs_untouched(name):
    call, inputs, error = FAILING[name]
    saved = [(bits(t), t._version, t.requires_grad, t.grad) for t in inputs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cddn.errors.SolverWarning)
        with pytest.raises(error):
            call(*inputs)
    for t, (b, version, rg, grad) in zip(inputs, saved):
        assert torch.equal(bits(t), b), f"{name} changed the values of its input"
        assert t._version == version, f"{name} modified its input in place"
        assert t.requires_grad == rg and t.grad is grad


def test_failing_call_leaves_module_parameters_untouched():
    alpha = nn.Parameter(torch.tensor([0.5, 1.5], dtype=DT))
    radius = nn.Parameter(torch.tensor([1.0, 2.0], dtype=DT))
    pool = cddn.RobustPool("pseudo_huber", alpha=alpha)
    proj = cddn.LpProjection(p=2, radius=radius)
    x = torch.randn(2, 5, dtype=DT)
    (pool(x).sum() + proj(x).sum()).backward()
    saved = [(p.detach().clone(), p.grad.clone(), p._version) for p in (alpha, radius)]
    bad = x.clone()
    bad[1, 3] = float("nan")
    for module in (pool, proj):
        with pytest.raises(NonFiniteError):
            module(bad).sum().backward()
    for p, (value, grad, version) in zip((alpha, radius), saved):
        assert torch.equal(p, value) and torch.equal(p.grad, grad) and p._version == version


def test_solver_error_is_catchable_as_runtime_error_and_layer_recovers():
    """After an infeasible call the same layer solves the next (good) batch correctly."""
    layer = box_projection()
    x = torch.tensor([[2.0, -3.0, 0.5]], dtype=DT)
    lo, hi = -torch.ones(1, 3, dtype=DT), torch.ones(1, 3, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cddn.errors.SolverWarning)
        with pytest.raises(RuntimeError) as info:
            layer(x, hi, lo)
    assert isinstance(info.value, SolverError)
    assert torch.allclose(layer(x, lo, hi), x.clamp(-1, 1), atol=1e-8, rtol=0)
