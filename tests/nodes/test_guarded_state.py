"""state_dict, pickle, torch.save, copy, deepcopy, load_state_dict and .double() of a
DeclarativeNode while another thread's backward has its tensors swapped for float64 casts
(convexddn.nodes._guarded_state).

The interleaving is forced: the backward pauses inside its swap (in the objective) until
the other thread's call has been attempted, or 0.5 s where that call rightly waits for the
swap to end. Before, the copies read the casts (``state_dict()['w']`` float64, the
unpickled ``w`` a plain float64 Tensor, deepcopy torch's raw RuntimeError), and the load
and the conversion wrote into the casts: the node kept its old float32 values.
"""
from __future__ import annotations

import copy
import io
import pickle
import threading

import pytest
import torch

from convexddn.errors import ProblemError
from convexddn.nodes.declarative import DeclarativeNode

WAIT = 5.0  # seconds; reached only where the code under test is broken
_HOOKS: dict = {}  # id(node) -> called in its objective (off the node: a closure does not pickle)


class _Weighted(DeclarativeNode):
    """½ Σ w (y − x)² + 0·(c + b·1): y = x. Float32 ``w``, a submodule's float32 ``c`` and
    buffer ``b``; the float64 backward swaps in casts of all three."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
        self.inner = torch.nn.Module()
        self.inner.c = torch.nn.Parameter(torch.tensor([0.5]))
        self.inner.register_buffer("b", torch.tensor([4.0]))

    def objective(self, x, y):
        hook = _HOOKS.get(id(self))
        if hook is not None:
            hook()
        return 0.5 * (self.w * (y - x) ** 2).sum(-1) + 0.0 * (self.inner.c + self.inner.b).sum()

    def solve(self, x):
        return x.clone()


def _roundtrip_pickle(m):
    return pickle.loads(pickle.dumps(m))


def _roundtrip_torch_save(m):
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


_COPIES = {
    "state_dict": lambda m: m.state_dict(),
    "pickle": _roundtrip_pickle,
    "torch.save": _roundtrip_torch_save,
    "deepcopy": copy.deepcopy,
    "copy": copy.copy,
}
_EXPECTED = {"w": [1.0, 2.0, 3.0], "inner.c": [0.5], "inner.b": [4.0]}  # as built


def _check(name: str, got, in_model: bool) -> None:
    """``got``: the copy (or state_dict) of the node, or of a model holding it as ``node``."""
    prefix = "node." if in_model else ""
    if name == "state_dict":
        assert sorted(got) == sorted(prefix + k for k in _EXPECTED)
        tensors, params = got, {}
    else:
        node = got.node if in_model else got
        tensors = {**dict(got.named_parameters()), **dict(got.named_buffers())}
        params = dict(got.named_parameters())
        assert sorted(tensors) == sorted(prefix + k for k in _EXPECTED)
        assert isinstance(node._parameters["w"], torch.nn.Parameter)
        assert isinstance(node.inner._parameters["c"], torch.nn.Parameter)
    for key, value in _EXPECTED.items():
        t = tensors[prefix + key]
        assert t.dtype == torch.float32, (key, t.dtype)
        assert t.is_leaf and (key == "inner.b" or name == "state_dict" or t.requires_grad)
        torch.testing.assert_close(t.detach(), torch.tensor(value), rtol=0, atol=0)
    assert all(isinstance(p, torch.nn.Parameter) for p in params.values())


def _during_backward(node: _Weighted, call):
    """``call()`` run in another thread while ``node``'s backward (y = x) is inside its swap;
    what it returned or raised. The node's input's gradient is checked: dL/dx = 1."""
    x = torch.randn(2, 3) + 0.5
    y = node(x.requires_grad_())
    inside, attempted = threading.Event(), threading.Event()
    main = threading.current_thread()

    def hook():  # inside the backward's swap, on the main thread: the call runs now
        if threading.current_thread() is main and torch.is_grad_enabled() and not inside.is_set():
            inside.set()
            attempted.wait(0.5)  # (the fixed call waits for this swap to end: times out)

    results = []

    def other():
        inside.wait(WAIT)
        try:
            results.append(call())
        except Exception as err:  # noqa: BLE001 - reported below
            results.append(err)
        finally:
            attempted.set()

    _HOOKS[id(node)] = hook
    t = threading.Thread(target=other)
    t.start()
    try:
        y.sum().backward()
    finally:
        t.join()
        del _HOOKS[id(node)]
    assert inside.is_set()
    torch.testing.assert_close(x.grad, torch.ones(2, 3))
    assert not isinstance(results[0], Exception), results[0]
    return results[0]


@pytest.mark.parametrize("in_model", [False, True], ids=["node", "model"])
@pytest.mark.parametrize("name", list(_COPIES))
def test_copies_taken_during_another_threads_backward_hold_the_own_parameters(name, in_model):
    node = _Weighted()
    model = torch.nn.Sequential()
    model.add_module("node", node)
    got = _during_backward(node, lambda: _COPIES[name](model if in_model else node))
    _check(name, got, in_model)
    if name != "state_dict":  # the copy is a node that works: y = x, dL/dx = 1, dL/dw = 0
        copied = got.node if in_model else got
        x2 = torch.randn(2, 3, requires_grad=True)
        y2 = copied(x2)
        y2.sum().backward()
        torch.testing.assert_close(y2, x2)
        torch.testing.assert_close(x2.grad, torch.ones(2, 3))
    # The original is whole: its own float32 Parameters, its gradient the closed form (y = x).
    assert isinstance(node._parameters["w"], torch.nn.Parameter) and node.w.dtype == torch.float32
    torch.testing.assert_close(node.w.grad, torch.zeros(3))


@pytest.mark.parametrize("how", ["load_state_dict", "double-node", "double-model"])
def test_loads_and_conversions_during_another_threads_backward_reach_the_own_parameters(how):
    node = _Weighted()
    model = torch.nn.Sequential()
    model.add_module("node", node)
    own = {"w": node.w, "inner.c": node.inner.c}
    new = {"w": [7.0, 8.0, 9.0], "inner.c": [1.5], "inner.b": [2.5]}
    if how == "load_state_dict":
        _during_backward(node, lambda: node.load_state_dict({k: torch.tensor(v) for k, v in new.items()}))
        expected, dtype = new, torch.float32
    else:
        _during_backward(node, (model if how == "double-model" else node).double)
        expected, dtype = _EXPECTED, torch.float64
    tensors = {**dict(node.named_parameters()), **dict(node.named_buffers())}
    assert sorted(tensors) == sorted(expected)
    for key, value in expected.items():
        assert tensors[key].dtype == dtype, (key, tensors[key].dtype)
        torch.testing.assert_close(tensors[key].detach(), torch.tensor(value, dtype=dtype), rtol=0, atol=0)
    for key, p in own.items():  # (loaded and converted in place: the optimizer's Parameters)
        assert tensors[key] is p and isinstance(p, torch.nn.Parameter)


def test_a_pickled_node_keeps_a_submodule_it_shares_within_itself_shared():
    node = _Weighted()
    node.again = node.inner  # one submodule under two names
    got = _roundtrip_pickle(node)
    assert got.again is got.inner and got.inner.c is got.again.c
    assert copy.deepcopy(node).again.c.dtype == torch.float32


class _CopiesItself(DeclarativeNode):
    """½ (y − w x)²: y = w x, dy/dx = w; its objective copies (or pickles) the node itself where
    ``how`` says so (the user's bug), else in ``solve`` (fine: nothing is swapped there)."""

    def __init__(self, how, dtype) -> None:
        super().__init__()
        self.how = how
        self.w = torch.nn.Parameter(torch.tensor(2.0, dtype=dtype))

    def _twin(self):
        return {"deepcopy": copy.deepcopy, "copy": copy.copy,
                "pickle": lambda m: pickle.loads(pickle.dumps(m))}[self.how.split("_")[0]](self)

    def objective(self, x, y):
        w = self._twin().w if self.how.endswith("_objective") else self.w
        return 0.5 * ((y - w * x) ** 2).sum(-1)

    def solve(self, x):
        w = self._twin().w if self.how.endswith("_solve") else self.w
        return w.to(x.dtype) * x


@pytest.mark.parametrize("how", ["deepcopy", "copy", "pickle"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_copying_the_node_in_its_own_objective_is_a_problem_error(how, dtype):
    """copy.deepcopy(self) in the objective copied the swapped-in tensors: torch's raw "Only Tensors
    created explicitly by the user (graph leaves) support the deepcopy protocol" for a float32
    parameter's float64 cast, or (float64) an InputError blaming a tensor that requires grad. Now a
    ProblemError names the copy; a shallow copy there (it shares the node's dicts: it reads the same
    tensors), a copy in solve, and one after the call, work (dy/dx = w = 2)."""
    x = torch.ones(2, 1, dtype=torch.float64, requires_grad=True)
    nodes = [_CopiesItself(f"{how}_solve", dtype)]
    if how == "copy":
        nodes.append(_CopiesItself(f"{how}_objective", dtype))
    else:
        with pytest.raises(ProblemError, match=r"_CopiesItself was (deep-copied|pickled) while _CopiesItself's obj"):
            _CopiesItself(f"{how}_objective", dtype)(x)
    for node in nodes:
        x.grad = None
        node(x).sum().backward()
        torch.testing.assert_close(x.grad, torch.full((2, 1), 2.0, dtype=torch.float64), rtol=0, atol=1e-12)
    twin = copy.deepcopy(node)
    assert type(twin.w) is torch.nn.Parameter and twin.w.dtype == dtype
