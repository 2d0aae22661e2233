"""convexddn._checks: the list-option validator and the finiteness screen."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import convexddn as cddn

from convexddn._checks import cast_checked, check_choices, check_finite
from convexddn.errors import InputError, NonFiniteError, OptionError

F64 = torch.float64


def test_check_choices_accepts_distinct_valid_entries():
    check_choices("poolings", ("max", "mean"), ["max", "mean", "welsch"])


@pytest.mark.parametrize("values,match", [
    ((), r"poolings must name at least one of \['max', 'mean'\], got \[\]"),
    (("max", "median"), r"poolings must be one of \['max', 'mean'\], got 'median'"),
    (("max", "max"), r"poolings must not repeat an entry, got \['max', 'max'\]"),
])
def test_check_choices_names_the_option_and_the_fault(values, match):
    with pytest.raises(OptionError, match=match):
        check_choices("poolings", values, ["max", "mean"])


def test_check_stopping_accepts_defaults_and_rejects_bad_values():
    from convexddn._checks import check_stopping

    check_stopping(None, None)
    check_stopping(1e-9, 5)
    with pytest.raises(OptionError, match="tol"):
        check_stopping(0.0, None)
    with pytest.raises(OptionError, match="max_iter"):
        check_stopping(None, 0)


def test_check_finite_counts_and_overflowing_sums():
    # The one-reduction screen: a finite tensor whose sum overflows must pass, and a
    # +Inf/-Inf pair (sum NaN) must be counted exactly.
    check_finite("x", torch.tensor([1e308, 1e308, -5.0], dtype=torch.float64))
    check_finite("x", torch.full((3,), 60000.0, dtype=torch.float16))
    with pytest.raises(NonFiniteError, match=r"x must be finite, got 1 NaN and 2 Inf"):
        check_finite("x", torch.tensor([float("inf"), float("-inf"), float("nan"), 1.0]))
    with pytest.raises(NonFiniteError, match=r"got 0 NaN and 1 Inf"):
        check_finite("x", torch.tensor([1.0, float("inf")]))


# --------------------------------------------------------------------------- audit fixes


def test_float8_tensors_get_a_dtype_error():
    # is_floating_point() holds for float8, which most torch ops do not implement: the
    # nodes raised a raw NotImplementedError from torch (robust_pool returned float8).
    import convexddn.functional as F
    from convexddn.errors import DTypeError

    f8 = torch.randn(3, 5).to(torch.float8_e4m3fn)
    for call in (lambda: F.project_simplex(f8), lambda: F.entmax(f8), lambda: F.robust_pool(f8)):
        with pytest.raises(DTypeError, match="float16, bfloat16, float32 or float64"):
            call()


@pytest.mark.parametrize("values", [None, 3, "max"])
def test_check_choices_wants_a_collection_of_names(values):
    # None and 3 raised a raw TypeError; "max" (one name, not a list) was read as "m".
    with pytest.raises(OptionError, match="poolings must be a list or tuple of names"):
        check_choices("poolings", values, ["max", "mean"])


def test_check_choices_with_unhashable_choices():
    check_choices("c", [[1]], [[1], [2]])  # was a raw TypeError (unhashable list)
    with pytest.raises(OptionError, match="must not repeat"):
        check_choices("c", [[1], [1]], [[1], [2]])


def test_check_positive_huge_int_is_an_option_error():
    from convexddn._checks import check_positive

    with pytest.raises(OptionError, match="radius must be finite and > 0"):
        check_positive("radius", 10**400)  # was a raw OverflowError
    check_positive("radius", 10**300)


def test_numpy_scalars_spell_p_and_arrays_are_refused():
    import numpy as np

    from convexddn._checks import check_choice, normalize_p

    assert normalize_p(np.int64(1)) == 1 and normalize_p(np.float64(2.0)) == 2.0
    assert type(normalize_p(np.int64(2))) is int and normalize_p("inf") == float("inf")
    with pytest.raises(OptionError, match="backend must be one of"):
        check_choice("backend", np.array(["auto", "x"]), ["auto", "native"])  # was a raw ValueError
    with pytest.raises(OptionError, match="p must be one of"):
        check_choice("p", torch.tensor([1.0, 2.0]), [1, 2])  # was a raw RuntimeError


def _entry_points():
    import cvxpy as cp

    from convexddn import ConvexLayer
    from convexddn.nodes.eigen import eigen_decomposition
    from convexddn.nodes.entmax import entmax
    from convexddn.nodes.pooling import robust_pool
    from convexddn.nodes.transport import sinkhorn
    from convexddn.nodes.tridiagonal import tridiagonal_solve

    x = cp.Parameter(4, name="x")
    y = cp.Variable(4)
    layer = ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y >= 0]), [x], [y])
    return [("robust_pool", lambda t: robust_pool(t, "huber", 1.0), (3, 4), r"x must|x is"),
            ("eigen_decomposition", eigen_decomposition, (2, 4, 4), r"X must|X is"),
            ("entmax", lambda t: entmax(t, 1.5), (3, 4), r"x must|x is"),
            ("sinkhorn", lambda t: sinkhorn(t, eps=0.5), (2, 4, 4), r"cost must|cost is"),
            ("tridiagonal_solve", lambda t: tridiagonal_solve(torch.full((4,), 3.0, dtype=torch.float64),
                                                              torch.ones(3, dtype=torch.float64),
                                                              torch.ones(3, dtype=torch.float64), t),
             (4, 2), r"rhs must|rhs is"),
            ("ConvexLayer", layer, (3, 4), r"parameter 0 \(x\)")]


@pytest.mark.parametrize("kind", ["sparse_coo", "sparse_csr", "meta"])
def test_sparse_and_meta_tensors_get_an_input_error(kind):
    """Sparse and meta tensors were passed on to torch, which failed with errors naming
    neither the argument nor the fix ('reshape is not implemented for sparse tensors',
    'Tensor.item() cannot be called on meta tensors')."""
    import warnings

    from convexddn.errors import InputError

    for name, fn, shape, arg in _entry_points():
        dense = torch.randn(*shape, dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sparse CSR support is "beta"
            value = (dense.to_sparse() if kind == "sparse_coo" else
                     dense.to_sparse_csr() if kind == "sparse_csr" else dense.to("meta"))
        want = r"meta device" if kind == "meta" else r"dense \(strided\) tensor, got layout torch\.sparse"
        with pytest.raises(InputError, match=f"({arg}).*{want}"):
            fn(value)


def test_check_number_is_the_one_numeric_option_validator():
    """The registry's options and check_gradients' tolerances go through one validator:
    NumPy scalars pass as floats; bools, strings, non-finite or out-of-range numbers and
    tensors (whose gradient would be dropped) are OptionErrors naming the option."""
    import numpy as np

    from convexddn._checks import check_number
    from convexddn.convex import registry

    assert check_number("eps", np.float32(0.5), above=0) == 0.5
    assert isinstance(check_number("eps", np.int64(3), at_least=0), float)
    for bad, match in ((True, r"eps must be a number > 0, got True"), ("1", r"eps must be a number > 0, got '1'"),
                       (0.0, r"eps must be finite and > 0, got 0.0"), (float("nan"), r"finite and > 0, got nan"),
                       (10 ** 400, r"must be finite and > 0")):
        with pytest.raises(OptionError, match=match):
            check_number("eps", bad, above=0)
    with pytest.raises(OptionError, match=r"ridge must be finite and >= 0, got -1"):
        check_number("ridge", -1, at_least=0)
    with pytest.raises(OptionError, match=r"got a tensor of shape \(\): registry options are constants of "
                                          r"the problem; pass float\(t\)"):
        registry.real_option("radius", torch.tensor(2.0), above=0)


class _CountingReads(torch.Tensor):
    """A tensor that records each read of its values to the host (bool, item, tolist)."""

    reads: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist):
            cls.reads.append(func.__name__)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_check_positive_reads_a_passing_tensor_once():
    """A passing tensor check read the values a second time for a message it did not
    raise (on CUDA two host syncs per call for a tensor radius or alpha)."""
    from convexddn._checks import check_positive, check_scale

    for check in (check_positive, check_scale):
        _CountingReads.reads = []
        check("alpha", torch.tensor([0.5, 2.0]).as_subclass(_CountingReads))
        assert _CountingReads.reads == ["__bool__"]


def test_check_positive_tensor_message_shows_the_values():
    from convexddn._checks import check_positive

    check_positive("alpha", torch.tensor([0.5, 2.0]))
    check_positive("alpha", torch.empty(0))
    with pytest.raises(OptionError, match=r"alpha must be finite and > 0, got \[1\.0, -2\.0\]"):
        check_positive("alpha", torch.tensor([1.0, -2.0]))
    with pytest.raises(OptionError, match=r"alpha must be finite and > 0, got \[1\.0, nan, 3\.0, 4\.0\]"):
        check_positive("alpha", torch.tensor([[1.0, float("nan"), 3.0], [4.0, 5.0, 6.0]], requires_grad=True))
    with pytest.raises(OptionError, match=r"alpha must be finite and > 0, got 0\.0"):
        check_positive("alpha", 0.0)
    with pytest.raises(OptionError, match=r"alpha must be a positive number or a tensor of positive numbers, "
                                          r"got a bool: True$"):
        check_positive("alpha", True)
    check_positive("alpha", 3)


@pytest.mark.parametrize("value, shown", [
    (np.array(0.5), r"got a numpy\.ndarray: array\(0\.5\); torch\.as_tensor\(\.\.\.\) makes a tensor of it$"),
    (np.array([0.5, 1.0]), r"got a numpy\.ndarray: array\(\[0\.5, 1\. \]\); torch\.as_tensor"),
    ([1.0, 2.0], r"got a list: \[1\.0, 2\.0\]; torch\.as_tensor"),
    ("1", r"got a str: '1'$"),
    (None, r"got a NoneType: None$"),
], ids=["0-d array", "array", "list", "str", "None"])
def test_check_positive_wrong_kind_says_a_tensor_is_accepted(value, shown):
    """alpha, radius and z take a positive number or a tensor: a value of another kind was
    told "must be a positive number" (a 0-d array holding 0.5 too), which hid the tensor and
    did not say what came; now both kinds and the value's type are named."""
    from convexddn._checks import check_positive, check_scale

    for check in (check_positive, check_scale):
        with pytest.raises(OptionError, match=r"^r must be a positive number or a tensor of positive numbers, "
                                              + shown):
            check("r", value)


def test_positive_range_reads_min_and_max_with_the_check():
    from convexddn._checks import positive_range

    assert positive_range("r", torch.tensor([3.0, 0.5, 2.0])) == (0.5, 3.0)
    assert positive_range("r", 2) == (2.0, 2.0)
    assert positive_range("r", torch.empty(0)) is None
    with pytest.raises(OptionError, match=r"r must be finite and > 0, got \[1.0, -1.0\]"):
        positive_range("r", torch.tensor([1.0, -1.0]))
    with pytest.raises(OptionError, match="r must be finite and > 0"):
        positive_range("r", float("inf"))


def test_nested_tensors_get_an_input_error():
    """A nested tensor reports the strided layout and passed the check: torch then failed
    inside ('NestedTensorImpl doesn't support sizes')."""
    from convexddn.errors import InputError
    from convexddn.nodes.total_variation import tv_denoise

    nested = torch.nested.nested_tensor([torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)])
    for name, fn, _, arg in _entry_points()[:-1] + [("tv_denoise", tv_denoise, None, r"x must")]:
        with pytest.raises(InputError, match=f"({arg}).*nested tensor"):
            fn(nested)


@pytest.mark.parametrize("make", [lambda: cddn.RobustPool("huber", dim=(1, 1)),
                                  lambda: cddn.RobustVectorPool("huber", dim=(2, 2))])
def test_a_repeated_pooled_dim_is_refused_at_construction(make):
    """Invalid options raise at construction (the docs' promise); a literally repeated dim
    was only refused at the first call."""
    with pytest.raises(OptionError, match="repeat"):
        make()


# The stopping tolerances are constants (a tensor is refused, whatever its size, rather
# than reaching the solvers' comparisons) and relative ones, in (0, 1): a relative error
# of 1 or more accepts any point.
def _proj_node(**kw):
    class Proj(cddn.DeclarativeNode):
        def objective(self, x, y):
            return 0.5 * ((y - x) ** 2).sum(-1)

        def solve(self, x):
            return x.detach().clone()
    return Proj(**kw)


_X = torch.randn(3, 5, dtype=torch.float64)
_P3 = torch.randn(2, 8, 3, dtype=torch.float64) + torch.tensor([0.0, 0.0, 6.0], dtype=torch.float64)
_TOL_CALLS = {
    "robust_pool": ("tol", lambda t: cddn.functional.robust_pool(_X, "huber", tol=t)),
    "RobustPool": ("tol", lambda t: cddn.RobustPool("huber", tol=t)),
    "robust_vector_pool": ("tol", lambda t: cddn.functional.robust_vector_pool(_X.view(3, 1, 5), "huber", tol=t)),
    "pnp": ("tol", lambda t: cddn.functional.pnp(_P3[..., :2] / _P3[..., 2:], _P3, tol=t)),
    "sinkhorn": ("tol", lambda t: cddn.functional.sinkhorn(_X, tol=t)),
    "active_tol": ("active_tol", lambda t: _proj_node(active_tol=t)),
}


@pytest.mark.parametrize("value", [torch.tensor([1e-6, 1e-6]), torch.tensor(1e-6), torch.tensor(1)],
                         ids=["two-entries", "0-d", "int64"])
@pytest.mark.parametrize("call", sorted(_TOL_CALLS))
def test_tolerances_refuse_tensors_naming_the_option(call, value):
    name, f = _TOL_CALLS[call]
    with pytest.raises(OptionError, match=rf"^{name} must be a number .*got a tensor of shape"):
        f(value)


@pytest.mark.parametrize("value", [1.0, 1e308, 10**400])
@pytest.mark.parametrize("call", sorted(set(_TOL_CALLS) - {"active_tol"}))
def test_relative_stopping_tolerances_refuse_one_or_more(call, value):
    name, f = _TOL_CALLS[call]
    with pytest.raises(OptionError, match=rf"^{name} must be a number in \(0, 1\), got"):
        f(value)


def test_check_int_upper_bound_names_the_option():
    from convexddn._checks import MAX_SIZE, check_int, check_size

    assert check_size("n", MAX_SIZE) == MAX_SIZE
    with pytest.raises(OptionError, match=r"^n must be an integer >= 1 and <= 2147483647, got an integer of 401 dig"):
        check_size("n", 10**400)
    with pytest.raises(OptionError, match=r"^k must be an integer <= 3, got 4$"):
        check_int("k", 4, maximum=3)


# An iteration count beyond int64 raised a raw OverflowError in sinkhorn (its counts are
# compared in int64 tensors) while tv_denoise and robust_pool ran: one bound for every count.
_COUNT_CALLS = {
    "sinkhorn": lambda m: cddn.functional.sinkhorn(torch.rand(2, 3, 3, dtype=torch.float64), max_iter=m),
    "OptimalTransport": lambda m: cddn.OptimalTransport(max_iter=m)(torch.rand(2, 3, 3, dtype=torch.float64)),
    "tv_denoise": lambda m: cddn.functional.tv_denoise(torch.randn(2, 5, dtype=torch.float64), 0.3, max_iter=m),
    "robust_pool": lambda m: cddn.functional.robust_pool(torch.randn(2, 5, dtype=torch.float64), "welsch", max_iter=m),
}


@pytest.mark.parametrize("call", list(_COUNT_CALLS))
def test_iteration_counts_beyond_int64_are_refused_by_name(call):
    from convexddn._checks import MAX_ITERATIONS

    _COUNT_CALLS[call](MAX_ITERATIONS)  # the largest count runs (to convergence)
    with pytest.raises(OptionError, match=r"^max_iter must be an integer >= 1 and <= 9223372036854775807, got 10{20}$"):
        _COUNT_CALLS[call](10**20)


class Quartic(cddn.DeclarativeNode):
    """y = argmin_u ‖u − x‖² + Σ u⁴, elementwise: 2(y − x) + 4y³ = 0, by Newton (also tests/test_autograd.py's)."""

    def objective(self, x, y):
        return ((y - x) ** 2).sum(-1) + (y ** 4).sum(-1)

    def solve(self, x):
        y = x.clone()
        for _ in range(60):
            y = y - (2 * (y - x) + 4 * y ** 3) / (2 + 12 * y ** 2)
        return y


# Every native node's tensor inputs and tensor options as nn.Parameters made under
# torch.inference_mode() (a model built in an inference-mode context, then trained):
# (name, node, float64 arguments). Torch drops requires_grad on views of such tensors
# taken outside inference mode and refuses out= ops on them.
def _inference_cases():
    from convexddn import functional as F

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, dtype=F64, generator=g)
    X = torch.randn(2, 4, 4, dtype=F64, generator=g)
    p3 = torch.randn(2, 10, 3, dtype=F64, generator=g) + torch.tensor([0, 0, 6.0], dtype=F64)
    w7, w10 = torch.rand(2, 7, dtype=F64, generator=g) + 0.5, torch.rand(2, 10, dtype=F64, generator=g) + 0.5

    s = torch.tensor(0.5, dtype=F64)
    return [
        ("robust_pool", lambda t, a: F.robust_pool(t, "welsch", a), [x, s]),
        ("RobustPool", lambda t, a: cddn.RobustPool("huber", a)(t), [x, s]),
        ("robust_vector_pool", lambda t, a: F.robust_vector_pool(t, "huber", a), [x, s]),
        ("project_lp L1", lambda t, r: F.project_lp(t, 1, "ball", r), [x, s]),
        ("project_lp L2", lambda t, r: F.project_lp(t, 2, "sphere", r), [x, s]),
        ("project_lp Linf", lambda t, r: F.project_lp(t, "inf", "ball", r), [x, s]),
        ("project_simplex", lambda t, z: F.project_simplex(t, -1, z), [x, s]),
        ("tv_denoise", lambda t, lam: F.tv_denoise(t, lam), [x, s]),
        ("least_squares", F.least_squares, [x.mT, x[:, 0], w7, s]),
        ("linear_fit", lambda t, y, w, r: F.linear_fit(t, y, w, r).coef, [x, torch.arange(7.0, dtype=F64), w7, s]),
        ("entmax", F.entmax, [x]),
        ("eigen_decomposition", lambda t: F.eigen_decomposition(t).eigenvalues, [X + X.mT]),
        ("sinkhorn", lambda c, a, b: F.sinkhorn(c, a, b, eps=0.5), [X.exp(), w7[:, :4], w10[:, :4]]),
        ("pnp", lambda q, p, w, a: F.pnp(q, p, w, penalty="huber", alpha=a), [p3[..., :2] / p3[..., 2:], p3, w10, s]),
        ("DeclarativeNode", lambda t: Quartic()(t), [x.reshape(6, 7)]),
    ]


INFERENCE_CASES = _inference_cases()


@pytest.mark.parametrize("name,node,args", INFERENCE_CASES, ids=[c[0] for c in INFERENCE_CASES])
def test_parameters_made_in_inference_mode_get_their_gradients(name, node, args):
    """check_tensor hands such a tensor on as a clone, which autograd tracks back to it:
    alpha, ridge and the least-squares targets got no gradient, silently, and radius,
    z, lam and pnp's alpha raised torch's "abs(): functions with out=... arguments don't
    support automatic differentiation". Each gradient equals that of the same call with
    ordinary Parameters (the float64 reference is below for the Welsch pool's alpha)."""
    ref = [torch.nn.Parameter(a.clone()) for a in args]
    with torch.inference_mode():
        made = [torch.nn.Parameter(a.clone()) for a in args]
    out = node(*ref)
    weight = torch.linspace(-1, 1, out.numel(), dtype=F64).reshape(out.shape)
    (out * weight).sum().backward()
    (node(*made) * weight).sum().backward()
    for i, (p, r) in enumerate(zip(made, ref)):
        assert p.grad is not None, f"argument {i} got no gradient"
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-12, atol=1e-12)


def test_a_welsch_alpha_made_in_inference_mode_gets_the_finite_difference_gradient():
    """The tester's case: RobustPool("welsch", Parameter(0.7)) built in inference mode,
    d/dα Σ y² = -6.18389 by float64 central differences (alpha.grad was None)."""
    from convexddn.functional import robust_pool

    torch.manual_seed(0)
    x = torch.randn(3, 4, 7)
    with torch.inference_mode():
        pool = cddn.RobustPool("welsch", torch.nn.Parameter(torch.tensor(0.7)))
    pool(x).pow(2).sum().backward()
    xd, h = x.double(), 1e-6
    f = lambda a: robust_pool(xd, "welsch", a).pow(2).sum().item()  # noqa: E731
    want = (f(0.7 + h) - f(0.7 - h)) / (2 * h)
    assert abs(want - -6.18389) < 1e-4
    assert pool.alpha.grad is not None and abs(pool.alpha.grad.item() - want) < 2e-4 * abs(want)


def test_a_module_built_in_inference_mode_learns_its_option():
    """TotalVariation1d(0.3, learnable=True) built in inference mode raised torch's out=
    error at its first training call; the gradient of Σ wᵢ yᵢ in λ is checked against a
    float64 central difference."""
    from convexddn.functional import tv_denoise

    with torch.inference_mode():
        tv = cddn.TotalVariation1d(0.3, learnable=True)
    x = torch.tensor([0.0, 0.1, 2.0, 2.1, 0.5], dtype=F64)
    w = torch.linspace(-1, 1, 5, dtype=F64)
    (tv(x) * w).sum().backward()
    h = 1e-6
    want = ((tv_denoise(x, 0.3 + h) * w).sum() - (tv_denoise(x, 0.3 - h) * w).sum()) / (2 * h)
    torch.testing.assert_close(tv.lam.grad, want.to(tv.lam.dtype), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("build", [lambda r: cddn.LpProjection(p=2, radius=r),
                                   lambda r: cddn.LpProjection(p=1, radius=r),
                                   lambda r: cddn.SimplexProjection(z=r)], ids=["l2", "l1", "simplex"])
def test_projection_modules_built_with_an_inference_mode_radius_learn_it(build):
    """LpProjection(radius=P) and SimplexProjection(z=P), P made in inference mode, raised
    torch's out= error in the constructor's positivity check (it ran on P, not on the
    tracked copy check_tensor returned): the gradient must be that of an ordinary P."""
    x = 2 * torch.randn(3, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    w = torch.linspace(-1, 1, 15, dtype=F64).view(3, 5)
    grads = []
    for inference in (True, False):
        with torch.inference_mode(inference):
            r = torch.nn.Parameter(torch.tensor(0.7, dtype=F64))
        (build(r)(x) * w).sum().backward()
        grads.append(r.grad)
    assert grads[1] is not None and torch.equal(grads[0], grads[1])


def test_tracked_copies_only_what_autograd_would_lose():
    from convexddn._checks import check_tensor

    plain = torch.ones(2, requires_grad=True)
    assert check_tensor("x", plain) is plain
    with torch.inference_mode():
        made = torch.nn.Parameter(torch.ones(2))
        assert check_tensor("x", made) is made  # (no graph inside inference mode)
    with torch.no_grad():
        assert check_tensor("x", made) is made
    copy = check_tensor("x", made)
    assert copy is not made and copy.requires_grad and not copy.is_inference()


def test_cast_checked_refuses_finite_entries_the_cast_overflows():
    """A narrowing cast turned finite entries into ±Inf, later blamed on another tensor;
    cast_checked names the argument, the dtype's range (IEEE binary32: 3.40282e38;
    bfloat16: 3.38953e38) and how many entries. Widening casts and fitting entries pass,
    differentiably; a NaN that came in is a NonFiniteError naming the argument."""
    t = torch.tensor([1.0, -1e39, 3e38], dtype=torch.float64, requires_grad=True)
    with pytest.raises(InputError, match=r"^t must fit x's dtype torch.float32 .*±3\.40282e\+38; got 1 of 3 "
                                         r"entries beyond it \(largest magnitude 1e\+39\) in t of shape \(3,\)"):
        cast_checked("t", t, torch.float32)
    with pytest.raises(InputError, match=r"^w must fit implicit_dtype torch.bfloat16 .*±3\.38953e\+38; got 1 of 1 .*"
                                         r"pass implicit_dtype=torch.float64 or rescale w$"):
        cast_checked("w", torch.tensor([3.4e38]), torch.bfloat16, "implicit_dtype", "pass implicit_dtype=torch.float64")
    with pytest.raises(NonFiniteError, match="^t must be finite, got 1 NaN"):
        cast_checked("t", torch.tensor([float("nan"), 1e39], dtype=torch.float64), torch.float32)
    ok = cast_checked("t", t[:1] * 2.0, torch.float32)
    assert ok.dtype == torch.float32 and ok.tolist() == [2.0]
    ok.sum().backward()
    assert t.grad.tolist() == [2.0, 0.0, 0.0]
    wide = cast_checked("t", torch.tensor([3e38]), torch.float64)  # widening: nothing to check
    assert wide.dtype == torch.float64


def _tensor_option_modules():
    """Each node Module with a tensor option: (make(option), option name, inputs, the
    output at the option value 0.7 by a closed form)."""
    x = torch.tensor([[0.3, -1.2, 0.4, 2.0], [0.2, 0.1, -0.5, 0.0]], dtype=F64)
    t = torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.5, 0.5, 1.0, -1.0]], dtype=F64)
    norms = x.norm(dim=-1, keepdim=True)
    s = torch.tensor([[0.3, -1.2, 0.4, 0.6]], dtype=F64)
    xs3 = torch.stack([x, x.flip(-1)], dim=-2)  # (2 sets, 2 features, 4 items)

    def ridge_fit(rho):  # without intercept: β = (XᵀX + ρI)⁻¹ Xᵀt per set (normal equations)
        X = xs3.mT  # (2, 4, 2)
        return torch.linalg.solve(X.mT @ X + rho * torch.eye(2, dtype=F64), (X.mT @ t.unsqueeze(-1))).squeeze(-1)

    return {
        "RobustPool": (lambda a: cddn.RobustPool("quadratic", alpha=a), "alpha", (x,), x.mean(-1)),
        "RobustVectorPool": (lambda a: cddn.RobustVectorPool("quadratic", alpha=a, dim=-1, vector_dim=-2),
                             "alpha", (xs3,), xs3.mean(-1)),
        "LpProjection": (lambda a: cddn.LpProjection(p=2, radius=a), "radius", (x,),
                         x * (0.7 / norms).clamp(max=1.0)),
        # [0.3, −1.2, 0.4, 0.6] onto {Σ y = 0.7, y ≥ 0}: support {0, 2, 3}, τ = (1.3 − 0.7)/3.
        "SimplexProjection": (lambda a: cddn.SimplexProjection(z=a), "z", (s,),
                              torch.tensor([[0.1, 0.0, 0.2, 0.4]], dtype=F64)),
        "LeastSquares": (lambda a: cddn.LeastSquares(ridge=a, bias=False), "ridge", (xs3, t), ridge_fit(0.7)),
        # λ = 0.7 above every |Σ_{i≤k} (x_i − x̄)| of each row: the solution is the row's mean.
        "TotalVariation1d": (lambda a: cddn.TotalVariation1d(lam=a), "lam", (x * 0.2,), None),
        "PnP": (lambda a: cddn.PnP("huber", alpha=a), "alpha", None, None),
    }


@pytest.mark.parametrize("module", list(_tensor_option_modules()))
def test_modules_with_tensor_options_build_on_the_meta_device(module):
    """Built under torch.device("meta") (a model given data later by to_empty and
    load_state_dict(assign=True), as nn.PReLU is), a Module's tensor option has no values
    to check: RobustPool, LpProjection, LeastSquares, ... raised InputError ("alpha is on the
    meta device") where TotalVariation1d(learnable=True) built. Their dtype is still checked
    at construction, their values at the call, which refuses a meta option as ever."""
    from torch import nn

    from convexddn.errors import DTypeError

    make, name, inputs, want = _tensor_option_modules()[module]
    with torch.device("meta"):
        node = make(nn.Parameter(torch.tensor(0.7, dtype=F64)))
        with pytest.raises(DTypeError, match=rf"^{name} must have a floating-point dtype"):
            make(torch.tensor(1))
    assert getattr(node, name).is_meta and "of shape ()" in repr(node)
    if inputs is None:
        return
    with pytest.raises(InputError, match=rf"^{name} is on the meta device"):
        node(*inputs)
    node = node.to_empty(device="cpu")
    node.load_state_dict({name: torch.tensor(-1.0, dtype=F64)}, assign=True)
    with pytest.raises((OptionError, InputError), match=rf"^{name} must be"):  # the value check, at the call
        node(*inputs)
    node.load_state_dict({name: torch.tensor(0.7, dtype=F64)}, assign=True)
    out = node(*inputs)
    out = out.coef if module == "LeastSquares" else out
    want = inputs[0].mean(-1, keepdim=True).expand_as(inputs[0]) if want is None else want
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-7)
