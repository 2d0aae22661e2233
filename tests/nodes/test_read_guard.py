"""DeclarativeNode's in-place guard (convexddn/nodes/_read_guard.py): a tensor the backward's
objective reads, changed in place between the forward and the backward, raises instead of
being differentiated at its new value; solve may not change its arguments in place.

The node of most tests is the weighted mean y = argmin_u Σ_i c_i (u − x_i)² = Σ c x / Σ c,
whose derivative is dy/dx_i = c_i / Σ c at the c the forward solved with (closed form). The
change ``d`` of c is orthogonal to the forward's residuals y − x_i, so the forward's y stays
the exact minimiser for c + d: no KKT check can see it, only the guard.
"""
from __future__ import annotations

import copy
import gc
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from convexddn.errors import InputError, ProblemError
from convexddn.nodes.declarative import DeclarativeNode

sys.path.insert(0, str(Path(__file__).parent))
from test_declarative import Sphere  # noqa: E402  (y = x / ‖x‖, dy/dx = (I − y yᵀ) / ‖x‖)

DT = torch.float64
X0 = torch.tensor([[0.0, 1.0, 2.0, 4.0]], dtype=DT)
C0 = torch.tensor([1.0, 2.0, 1.0, 1.0], dtype=DT)


def _expected(c: torch.Tensor = C0) -> torch.Tensor:
    return (c / c.sum()).unsqueeze(0)


def _kkt_preserving_change() -> torch.Tensor:
    """A change of c (max 0.9: c stays positive) orthogonal to the residuals y0 − x."""
    r = (C0 * X0[0]).sum() / C0.sum() - X0[0]
    d = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=DT)
    d = d - (d @ r) / (r @ r) * r
    return d * (0.9 / d.abs().max())


class _TrainWeighted(DeclarativeNode):
    """Weighted mean by the buffer ``c`` in training mode, the plain mean in eval mode."""

    def __init__(self):
        super().__init__()
        self.register_buffer("c", C0.clone())

    def _w(self):
        return self.c if self.training else torch.ones(4, dtype=DT)

    def objective(self, x, y):
        return (self._w() * (y - x) ** 2).sum(-1)

    def solve(self, x):
        w = self._w()
        return (w * x).sum(-1, keepdim=True) / w.sum()


@pytest.mark.parametrize("earlier", ["eval", "eval_reprobe"])
def test_a_buffer_read_only_on_later_calls_is_guarded(earlier):
    """The guard watched the buffers that the latest probe saw read: c, read only in
    training mode, was unwatched after a first call (or a re-probe at the first batch of
    two rows) in eval mode; changed in place before a training call's backward, the
    gradient was [0.30, 0.29, 0.17, 0.24] for the forward's [0.2, 0.4, 0.2, 0.2], silently."""
    node = _TrainWeighted()
    if earlier == "eval_reprobe":
        node(X0.clone().requires_grad_()).sum().backward()  # probed in training mode, 1 row
    node.eval()
    node(torch.cat([X0, X0]).requires_grad_()).sum().backward()  # probed in eval mode
    node.train()
    x = X0.clone().requires_grad_()
    node(x).sum().backward()  # unchanged: the closed form
    torch.testing.assert_close(x.grad, _expected(), rtol=0, atol=1e-12)
    x = X0.clone().requires_grad_()
    y = node(x)
    with torch.no_grad():
        node.c.add_(_kkt_preserving_change())
    with pytest.raises(InputError, match=r"\['c'\].*modified in place between the forward and the backward"):
        y.sum().backward()


class _Cached(DeclarativeNode):
    """Weighted mean by the buffer ``c``; ``solve`` writes the buffer ``cache`` and the plain
    tensor attribute ``last`` (warm starts), which the objective never reads."""

    def __init__(self):
        super().__init__()
        self.register_buffer("c", C0.clone())
        self.register_buffer("cache", torch.zeros(1, 1, dtype=DT))
        self.last = torch.zeros(1, 1, dtype=DT)

    def objective(self, x, y):
        return (self.c * (y - x) ** 2).sum(-1)

    def solve(self, x):
        y = (self.c * x).sum(-1, keepdim=True) / self.c.sum()
        self.cache.copy_(y)
        self.last.copy_(y)
        return y


def test_state_solve_only_writes_may_change():
    """A warm-start cache that solve rewrites (a buffer, a plain attribute) at a second
    forward before the first one's backward is not read by the objective: no error, and the
    closed-form gradient c / Σc."""
    node = _Cached()
    x = X0.clone().requires_grad_()
    y = node(x)
    node(X0 + 1.0)  # rewrites both caches in place
    with torch.no_grad():
        node.cache.add_(1.0)
        node.last.add_(1.0)
    y.sum().backward()
    torch.testing.assert_close(x.grad, _expected(), rtol=0, atol=1e-12)


class _Plain(DeclarativeNode):
    """Weighted mean by ``c``: a plain tensor attribute, a plain view of a registered
    buffer, or a tensor closed over (not the node's)."""

    def __init__(self, how, c):
        super().__init__()
        self.how = how
        if how == "attribute":
            self.c = c
        elif how == "view":
            self.register_buffer("big", torch.cat([c, torch.zeros(2, dtype=DT)]))
            self.c = self.big[:4]
        else:
            self._get = lambda: c  # closed over

    def _c(self):
        return self._get() if self.how == "closure" else self.c

    def objective(self, x, y):
        return (self._c() * (y - x) ** 2).sum(-1)

    def solve(self, x):
        return (self._c() * x).sum(-1, keepdim=True) / self._c().sum()


@pytest.mark.parametrize("how", ["attribute", "view", "closure"])
@pytest.mark.parametrize("change", ["kkt_preserving", "large"])
def test_a_plain_tensor_the_objective_reads_is_guarded(how, change):
    """A tensor the objective reads that is not a registered buffer (self.c = c, a view of a
    buffer self.big[:4], one closed over), changed in place between forward and backward:
    differentiated at its new value (max error 0.109, silently), or, for a larger change, a
    SolverError blaming solve. torch's own ops raise there; so does the node now, naming it."""
    c = C0.clone()
    node = _Plain(how, c)
    for call in range(2):  # (the first call probes; the second does not)
        x = X0.clone().requires_grad_()
        y = node(x)
        with torch.no_grad():
            target = node.big[:4] if how == "view" else c
            if change == "large":
                target.mul_(3.0)
                target[0] += 5.0
            else:
                target.add_(_kkt_preserving_change())
        name = r"'c'" if how != "closure" else r"'a tensor of shape \(4,\) from outside the node'"
        with pytest.raises(InputError, match=rf"\[{name}\].*modified in place"):
            y.sum().backward()
    x = X0.clone().requires_grad_()
    node(x).sum().backward()  # a new forward differentiates at the new value (closed form)
    torch.testing.assert_close(x.grad, _expected(target.clone()), rtol=0, atol=1e-12)


class _MutatingSolve(DeclarativeNode):
    """y = argmin ½‖u − w x‖² = w x, whose solve modifies its input or the parameter w."""

    def __init__(self, what):
        super().__init__()
        self.what = what
        self.w = torch.nn.Parameter(torch.tensor(2.0, dtype=DT))

    def objective(self, x, y):
        return 0.5 * ((y - self.w * x) ** 2).sum(-1)

    def solve(self, x):
        (x if self.what == "input" else self.w).sub_(1.0)  # the user's bug
        return self.w * x


@pytest.mark.parametrize("what", ["input", "parameter"])
def test_solve_modifying_its_argument_in_place_is_refused(what):
    """solve runs under no_grad, where torch lets a leaf that requires grad change in place
    (called directly, torch refuses: "a leaf Variable that requires grad is being used in an
    in-place operation"): the caller's x changed and the backward differentiated at it,
    silently."""
    x = X0.clone().requires_grad_()
    node = _MutatingSolve(what)
    match = r"input 0 in place" if what == "input" else r"parameter 'w' in place"
    with pytest.raises(ProblemError, match=rf"_MutatingSolve\.solve modified {match}"):
        node(x)


def test_a_plain_tensor_attribute_rebound_before_backward_is_refused():
    """A plain attribute bound to another tensor between forward and backward (node.c = c + d,
    out of place) was read by the backward: gradient 0.109 off, silently. (A registered buffer
    rebound so is swapped back to the forward's tensor for the backward.)"""
    node = _Plain("attribute", C0.clone())
    x = X0.clone().requires_grad_()
    y = node(x)
    node.c = node.c + _kkt_preserving_change()
    with pytest.raises(InputError, match=r"attribute\(s\) \['c'\].*bound to other tensors"):
        y.sum().backward()


class _Rebuilt(torch.nn.Module):
    """Rebinds its plain attribute ``w`` at every call, as ``weight_norm``'s pre-hook does;
    the tensor it held is freed there, and CPython gives its id to a tensor made later."""

    def __init__(self):
        super().__init__()
        self.register_buffer("c", C0.clone())
        self.w = self.c * 1.0

    def forward(self, r):
        self.w = self.c * 1.0
        # Tensors made after the old w is freed, all alive and then read: one takes its id (the
        # allocator reuses the freed slot once the blocks before it are taken).
        many = [r[:1] for _ in range(2000)]
        return self.w * r + 0 * torch.cat(many).sum()


class _RebuildsWeights(DeclarativeNode):
    def __init__(self):
        super().__init__()
        self.weigh = _Rebuilt()

    def objective(self, x, y):
        return (self.weigh((y - x) ** 2)).sum(-1)

    def solve(self, x):  # (calls weigh too: its w at the backward is not the forward's)
        c = self.weigh(torch.ones(4, dtype=DT))
        return (c * x).sum(-1, keepdim=True) / c.sum()


def test_an_attribute_a_submodule_rebuilds_at_each_call_is_no_false_alarm():
    """torch.nn.utils.weight_norm rebinds ``weight`` at each call: the guard kept only the ids
    of the attribute's tensor and of those read, and a freed one's id came back for a tensor
    made later (false "bound to other tensors" InputError in 4-11 of 200 backward calls)."""
    for _ in range(5):  # (a node's first backward: its w then is not the forward's)
        node, x = _RebuildsWeights(), X0.clone().requires_grad_()
        node(x).sum().backward()
        torch.testing.assert_close(x.grad, _expected(), rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")
def test_weight_norm_in_the_objective_is_no_false_alarm():
    """The reported case: a frozen weight_norm'd Linear, y = W x, dy/dx summed = column sums of W."""

    class WN(DeclarativeNode):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.utils.weight_norm(torch.nn.Linear(4, 4, bias=False).double())
            self.lin.requires_grad_(False)

        def objective(self, x, y):
            return ((y - self.lin(x)) ** 2).sum(-1)

        def solve(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    for _ in range(15):
        node, x = WN(), torch.randn(3, 4, dtype=DT, requires_grad=True)
        node(x).sum().backward()
        torch.testing.assert_close(x.grad, node.lin.weight.detach().sum(0).expand(3, 4), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_closed_over_inference_tensor_is_a_constant_at_its_forward_value(dtype):
    """A tensor made under torch.inference_mode() and closed over, y = argmin ½‖u − w x‖² = w x:
    the objective's w * x raised torch's raw "Inference tensors cannot be saved for backward" (plain
    autograd refuses it too, where it would be saved). It is now read as a plain copy, a constant: the
    value the forward solved with, even where it changed (under inference_mode) before the backward.
    Closed form dy/dx = w (forward's w), in reverse mode on the first call and later, and forward mode."""
    from torch.autograd import forward_ad

    with torch.inference_mode():
        w = torch.tensor([2.0], dtype=dtype)

    class Scaled(DeclarativeNode):
        def objective(self, x, y):
            return 0.5 * ((y - w * x) ** 2).sum(-1)

        def solve(self, x):
            return w * x

    node = Scaled()
    for _ in range(2):  # (the first call probes; the second does not)
        before = float(w)
        x = torch.ones(2, 1, dtype=DT, requires_grad=True)
        y = node(x)
        with torch.inference_mode():
            w.mul_(1.5)
        y.sum().backward()
        torch.testing.assert_close(x.grad, torch.full((2, 1), before, dtype=DT), rtol=0, atol=1e-12)
    for m in (Scaled(), node):
        with forward_ad.dual_level():
            y = m(forward_ad.make_dual(torch.ones(2, 1, dtype=DT), torch.ones(2, 1, dtype=DT)))
            tangent = forward_ad.unpack_dual(y).tangent
        torch.testing.assert_close(tangent, torch.full((2, 1), float(w), dtype=DT), rtol=0, atol=1e-12)


class _Scale(torch.nn.Module):
    """x ↦ w x with w = 2 held as a parameter (trainable or frozen) or as a buffer."""

    def __init__(self, kind: str, dtype: torch.dtype):
        super().__init__()
        w = torch.tensor([2.0], dtype=dtype)
        if kind == "buffer":
            self.register_buffer("w", w)
        else:
            self.w = torch.nn.Parameter(w, requires_grad=kind == "parameter")

    def forward(self, x):
        return self.w.to(x.dtype) * x


class _CopiesSub(DeclarativeNode):
    """½ (y − w x)²: y = w x, dy/dx = w = 2 (closed form), through the submodule ``sub``, which the
    method ``where`` deep-copies before it applies it (the objective: the user's question)."""

    def __init__(self, kind: str, where: str, dtype: torch.dtype):
        super().__init__()
        self.sub = _Scale(kind, dtype)
        self.where = where

    def _sub(self, method: str):
        return copy.deepcopy(self.sub) if method == self.where else self.sub

    def objective(self, x, y):
        return 0.5 * ((y - self._sub("objective")(x)) ** 2).sum(-1)

    def solve(self, x):
        return self._sub("solve")(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_deep_copy_of_a_submodule_in_the_objective(dtype):
    """copy.deepcopy(self.sub) in the objective copied the stand-ins swapped in for the evaluation:
    torch's raw "Only Tensors created explicitly by the user (graph leaves) support the deepcopy
    protocol" for a float32 parameter's float64 cast, an InputError blaming the copy (float64). Where
    the parameter requires grad, no copy can be right (the gradient would not reach it): a ProblemError
    names it. A frozen parameter or a buffer copies as its value (dy/dx = 2); so does any copy in solve."""
    x = torch.tensor([[1.0], [3.0]], dtype=DT, requires_grad=True)
    with pytest.raises(ProblemError, match=r"_CopiesSub's 'sub\.w', which requires grad, was deep-copied while "
                                           r"_CopiesSub's objective or constraints were evaluated"):
        _CopiesSub("parameter", "objective", dtype)(x)
    for kind, where in (("frozen", "objective"), ("buffer", "objective"), ("parameter", "solve")):
        node = _CopiesSub(kind, where, dtype)
        x.grad = None
        node(x).sum().backward()
        torch.testing.assert_close(x.grad, torch.full_like(x, 2.0), rtol=1e-12, atol=0)
        if kind == "parameter":  # dL/dw = Σ x = 4
            torch.testing.assert_close(node.sub.w.grad, torch.tensor([4.0], dtype=dtype), rtol=1e-6, atol=0)
        assert type(node.sub.w) is (torch.Tensor if kind == "buffer" else torch.nn.Parameter)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_deep_copy_of_a_submodule_in_the_objective_after_the_first_call(dtype):
    """After the first (probed) call the float64 backward evaluates the objective on the parameter
    itself (no stand-in, no cast), and nn.Parameter's own __deepcopy__ (``self.data.clone()``, no
    torch function) copied it as a new parameter that requires grad: an InputError telling the user
    to make 'a tensor of shape (1,)' a parameter of the node (it is one, sub.w). The same ProblemError
    as on the first call, in the backward and in forward mode; a frozen parameter copies as its value
    (dy/dx = w = 2, closed form)."""
    from torch.autograd import forward_ad

    match = r"_CopiesSub's 'sub\.w', which requires grad, was deep-copied while _CopiesSub's objective"
    x = torch.tensor([[1.0], [3.0]], dtype=DT, requires_grad=True)
    for kind in ("parameter", "frozen"):
        node = _CopiesSub(kind, "solve", dtype)
        node(x).sum().backward()  # the first call (probed), no copy in the objective
        node.where = "objective"
        x.grad = None
        if kind == "frozen":
            node(x).sum().backward()
            torch.testing.assert_close(x.grad, torch.full_like(x, 2.0), rtol=1e-12, atol=0)
            continue
        with pytest.raises(ProblemError, match=match):
            node(x).sum().backward()
        with forward_ad.dual_level(), pytest.raises(ProblemError, match=match):
            node(forward_ad.make_dual(x.detach(), torch.ones_like(x)))


def _sphere_vjp(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    n = x.norm(dim=-1, keepdim=True)
    y = x / n
    return (g - y * (y * g).sum(-1, keepdim=True)) / n


@pytest.mark.parametrize("first", [True, False])
def test_the_record_does_not_keep_the_inputs_alive_under_checkpoint(first):
    # ForwardVersions held the inputs (by id, to skip those autograd saves): a non-reentrant
    # checkpoint's block kept its activation x alive after the forward, as did a saved-tensor hook
    # that moves saved tensors away. torch's own ops free it; the gradients are as without checkpoint.
    node = Sphere()
    if not first:
        node(torch.randn(2, 4, dtype=DT, requires_grad=True))
    leaf = torch.randn(3, 4, dtype=DT, generator=torch.Generator().manual_seed(0), requires_grad=True)
    seen = []

    def block(t):
        x = 2 * t
        seen.append(weakref.ref(x))
        return node(x)

    y = checkpoint(block, leaf, use_reentrant=False)
    gc.collect()
    assert seen[0]() is None
    g = torch.randn(3, 4, dtype=DT, generator=torch.Generator().manual_seed(1))
    (y * g).sum().backward()
    torch.testing.assert_close(leaf.grad, 2 * _sphere_vjp(2 * leaf.detach(), g), rtol=1e-10, atol=1e-12)


def test_the_record_does_not_keep_inputs_past_moving_saved_tensor_hooks():
    # A hook that moves saved tensors away (here a copy, as save_on_cpu's) frees the activation.
    node = Sphere()
    node(torch.randn(2, 4, dtype=DT, requires_grad=True))
    x = torch.randn(3, 4, dtype=DT, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        mid = x * 1.0
        seen = weakref.ref(mid)
        y = node(mid)
        del mid
    gc.collect()
    assert seen() is None
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, _sphere_vjp(x.detach(), torch.ones(3, 4, dtype=DT)), rtol=1e-10, atol=1e-12)


def test_a_native_nodes_scratch_buffers_are_not_read_as_state_of_the_problem():
    """robust_pool on a CPU works in buffers kept between calls (convexddn._workspace), which
    its next call rewrites. Called in an objective, the guard's record took them for tensors
    the problem reads from outside (the kept buffer popped, viewed and handed back under its
    torch-function mode), and a forward-mode call of a node whose constraint pools its input
    raised a false 'a tensor of shape (128,) from outside the node … modified in place'
    (after other tests had left buffers of that size)."""
    import convexddn.functional as F
    from convexddn import _workspace
    from convexddn.nodes._read_guard import Reads

    x = torch.randn(64, 40, dtype=DT, generator=torch.Generator().manual_seed(0))
    F.robust_pool(x, "pseudo-huber")  # leaves buffers in the workspace
    reads = Reads((x,))
    with reads:
        F.robust_pool(x, "pseudo-huber")
    kept = {b.untyped_storage().data_ptr() for b in _workspace._FREE}
    assert kept, "robust_pool on a CPU keeps its buffers"
    assert not [t for t in reads.outside.values() if t.untyped_storage().data_ptr() in kept]


def test_a_tensor_subclass_read_from_outside_is_not_asked_for_its_storage():
    """A wrapper subclass (torch's TwoTensor, as a quantised or distributed tensor would be) read
    by the objective: the scratch test asked it for its storage's address, and torch raised
    'Attempted to access the data pointer on an invalid python storage'. The gradient of
    ½‖y − x‖² (+ 0·c) is that of the identity."""
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")
    c = two_tensor.TwoTensor(torch.ones(4, dtype=DT), torch.ones(4, dtype=DT))

    class Node(DeclarativeNode):
        def objective(self, x, y):
            return 0.5 * ((y - x) ** 2).sum(-1) + 0 * (c * 1.0).sum().a

        def solve(self, x):
            return x.clone()

    x = torch.randn(3, 4, dtype=DT, requires_grad=True)
    Node()(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))
