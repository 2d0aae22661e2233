"""convexddn._autograd's batched directions: every native node whose Function has a jvp
takes batched forward-mode tangents (torch.func.jacfwd; autograd's own vmap:
``jacobian(..., vectorize=True, strategy="forward-mode")``, gradcheck's batched forward
check) and, with a vjp, batched cotangents (torch.func.jacrev, ``vectorize=True``);
a node that cannot raises one shared error (:func:`convexddn._autograd.batched_refusal`)
naming what it refuses.

Before, eigen_decomposition and least_squares (and linear_fit, which runs it) refused the
forward-mode vectorized jacobian as "batched cotangents or tangents (is_grads_batched=True,
...)", which named the reverse mode they support; entmax, project_simplex and
least_squares refused torch.func.jacfwd; robust_pool refused jacfwd, jacrev and both
vectorized strategies, robust_vector_pool jacrev and both strategies."""
from __future__ import annotations

import warnings

import pytest
import torch

from convexddn._autograd import batched_refusal
from convexddn.errors import ConvexDDNWarning, ProblemError
from convexddn.functional import (
    eigen_decomposition,
    entmax,
    least_squares,
    linear_fit,
    project_simplex,
    robust_pool,
    robust_vector_pool,
    sinkhorn,
    tridiagonal_solve,
    tv_denoise,
)

F64 = torch.float64


def _draw(seed: int, *shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return scale * torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed)) + shift


def _sym(seed: int, n: int) -> torch.Tensor:
    a = _draw(seed, 2, n, n)
    return a + a.mT


_B = _draw(1, 2, 6)
_TRI = (4 + torch.rand(2, 6, dtype=F64, generator=torch.Generator().manual_seed(2)), torch.ones(2, 5, dtype=F64),
        -torch.ones(2, 5, dtype=F64))
# Rows (of W^{1/2} A) over 1024× apart: least_squares sorts them and differentiates through
# Q (its full slice of Q's rows, M = N, was an alias, which autograd's vmap refused).
_SPREAD = torch.tensor([1e4, 1.0, 2.0, 1e-3, 1.0, 3.0], dtype=F64).expand(2, 6)

# (name, function of the inputs, the inputs): each differentiated in every input at once.
CASES = [
    ("eigen_decomposition vectors", lambda s: eigen_decomposition(s).eigenvectors, (_sym(3, 4),)),
    ("eigen_decomposition top 2", lambda s: eigen_decomposition(s, 2), (_sym(4, 4),)),
    ("least_squares", lambda a: least_squares(a, _B), (_draw(5, 2, 6, 3),)),
    ("least_squares weights ridge", lambda a, b, w, r: least_squares(a, b, w, r),
     (_draw(6, 2, 6, 3), _draw(7, 2, 6, 2), _draw(8, 2, 6).abs() + 0.5, _draw(9, 2, 3).abs())),
    ("least_squares sorted rows", lambda a, b: least_squares(a, b, _SPREAD), (_draw(10, 2, 6, 3), _draw(11, 2, 6))),
    ("least_squares sorted square", lambda a, b: least_squares(a, b, torch.tensor([1e8, 1.0, 2.0], dtype=F64)),
     (_draw(24, 2, 3, 3, shift=0.0) + 3 * torch.eye(3, dtype=F64), _draw(25, 2, 3))),
    ("linear_fit", lambda z: linear_fit(z, torch.arange(7.0, dtype=F64)).coef, (_draw(12, 2, 3, 7),)),
    ("entmax 1.5", lambda x: entmax(x, 1.5), (_draw(13, 2, 6),)),
    ("entmax sparsemax", lambda x: entmax(x, 2.0), (_draw(14, 2, 6),)),
    ("entmax 3", lambda x: entmax(x, 3.0), (_draw(15, 2, 6),)),
    ("project_simplex", lambda x, z: project_simplex(x, z=z), (_draw(16, 2, 5), torch.tensor([1.0, 2.0], dtype=F64))),
    ("robust_pool huber", lambda x: robust_pool(x, "huber", 1.0), (_draw(17, 2, 8),)),
    ("robust_pool welsch", lambda x, a: robust_pool(x, "welsch", a),
     (_draw(18, 3, 8), torch.tensor([1.0, 0.5, 2.0], dtype=F64))),
    ("robust_pool pseudo_huber", lambda x, a: robust_pool(x, "pseudo_huber", a), (_draw(19, 2, 8),
                                                                                  torch.tensor(0.7, dtype=F64))),
    ("robust_pool quadratic", lambda x: robust_pool(x, "quadratic", 1.0), (_draw(20, 2, 8),)),
    ("tridiagonal_solve", tridiagonal_solve, (*_TRI, _draw(21, 2, 6))),
    ("tv_denoise", lambda x, lam: tv_denoise(x, lam), (_draw(22, 2, 9), torch.tensor(0.5, dtype=F64))),
    ("robust_vector_pool", lambda x: robust_vector_pool(x, "welsch", 1.0), (_draw(23, 2, 3, 6),)),
]
_IDS = [c[0] for c in CASES]


def _pick(*names: str) -> dict:
    """pytest.mark.parametrize's arguments for the CASES named."""
    return {"argnames": "name,f,xs", "argvalues": [c for c in CASES if c[0] in names], "ids": list(names)}


def _vectorized(strategy):
    return lambda f, xs: torch.autograd.functional.jacobian(f, xs, vectorize=True, strategy=strategy)


def _func(transform):
    return lambda f, xs: getattr(torch.func, transform)(f, argnums=tuple(range(len(xs))))(*xs)


TRANSFORMS = {"vectorize forward": _vectorized("forward-mode"), "vectorize reverse": _vectorized("reverse-mode"),
              "jacfwd": _func("jacfwd"), "jacrev": _func("jacrev")}


def _flat(jac) -> list[torch.Tensor]:
    """The Jacobian's blocks, outputs by inputs, in one order (torch.func and
    torch.autograd.functional nest them alike: outputs outside, inputs inside)."""
    if isinstance(jac, torch.Tensor):
        return [jac]
    return [t for block in jac for t in _flat(block)]


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("name,f,xs", CASES, ids=_IDS)
def test_batched_directions_give_the_row_by_row_jacobian(name, f, xs, transform):
    """Each transform's Jacobian is the unvectorized one (one direction at a time,
    torch.autograd.functional.jacobian's loop over the backward) to 1e-10 in float64."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvexDDNWarning)  # (none of these points warns: no tie, gap or overflow)
        want = _flat(torch.autograd.functional.jacobian(f, tuple(t.clone() for t in xs)))
        got = _flat(TRANSFORMS[transform](f, tuple(t.clone() for t in xs)))
    assert len(got) == len(want) and len(want) >= len(xs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(**_pick("eigen_decomposition top 2", "least_squares", "least_squares weights ridge",
                                 "entmax 1.5", "project_simplex", "robust_pool huber", "robust_pool welsch"))
def test_gradcheck_with_batched_gradients_in_both_modes(name, f, xs):
    """gradcheck's batched checks (autograd's own vmap over the tangents and over the
    cotangents) against its finite differences: eigen_decomposition and least_squares
    raised the refusal that named cotangents for check_batched_forward_grad, robust_pool
    for both."""
    inputs = tuple(t.clone().requires_grad_() for t in xs)
    assert torch.autograd.gradcheck(f, inputs, check_forward_ad=True, check_batched_grad=True,
                                    check_batched_forward_grad=True)


_SINKHORN = (lambda c: sinkhorn(c, eps=0.5), torch.rand(1, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(0)))
_ONE_TANGENT = "one tangent at a time (torch.autograd.forward_ad)"
_ONE_COTANGENT = "one cotangent at a time (backward(), torch.autograd.grad)"
REFUSALS = {
    "vectorize forward": ("sinkhorn does not support batched forward-mode tangents (torch.autograd.functional.jacobian("
                          "..., vectorize=True, strategy='forward-mode'), gradcheck(..., check_batched_forward_grad="
                          "True)): use torch.autograd.functional.jacobian without vectorize, or " + _ONE_TANGENT),
    "vectorize reverse": ("sinkhorn does not support batched cotangents (is_grads_batched=True, torch.autograd."
                          "functional.jacobian(..., vectorize=True), gradcheck(..., check_batched_grad=True)): use "
                          "torch.autograd.functional.jacobian without vectorize, or " + _ONE_COTANGENT),
    "jacfwd": ("sinkhorn does not support batched forward-mode tangents (torch.func.jacfwd): use "
               "torch.autograd.functional.jacobian without vectorize, or " + _ONE_TANGENT),
    "jacrev": ("sinkhorn does not support batched cotangents (torch.func.jacrev): use "
               "torch.autograd.functional.jacobian without vectorize, or " + _ONE_COTANGENT),
}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_a_node_that_cannot_raises_the_shared_refusal(transform):
    """sinkhorn's solve reads on the host: batched directions are refused, the error
    naming the node, what is refused (forward-mode tangents or cotangents), how they came
    batched and what works instead; the same text for every node (one helper)."""
    f, c = _SINKHORN
    with pytest.raises(ProblemError) as info:
        TRANSFORMS[transform](f, (c.clone(),))
    assert str(info.value) == REFUSALS[transform]
    tangents, functorch = transform in ("vectorize forward", "jacfwd"), transform.startswith("jac")
    assert str(batched_refusal("sinkhorn", tangents, functorch)) == REFUSALS[transform]
    torch.autograd.functional.jacobian(f, c.clone())  # what the message points to works


def test_the_refusal_names_what_works_and_the_function_called():
    """``works`` comes first among the alternatives; inside linear_fit (called_as) the
    name is the public function's."""
    from convexddn._autograd import called_as

    message = str(batched_refusal("pnp", True, True, works="torch.func.jacrev"))
    assert message.startswith("pnp does not support batched forward-mode tangents (torch.func.jacfwd): use "
                              "torch.func.jacrev, torch.autograd.functional.jacobian without vectorize")
    with called_as("linear_fit"):
        assert str(batched_refusal("least_squares", False, False)).startswith(
            "linear_fit does not support batched cotangents (is_grads_batched=True")


@pytest.mark.parametrize(**_pick("least_squares sorted rows", "entmax 1.5", "project_simplex", "robust_pool huber"))
def test_a_jacfwd_over_a_call_on_constants(name, f, xs):
    """A node called on constants inside torch.func.jacfwd (no tangent reaches it): its
    plain value, as under a plain vmap (least_squares and robust_pool raised)."""
    scale = torch.tensor([1.0, 2.0], dtype=F64)
    got = torch.func.jacfwd(lambda t: t * f(*xs).sum())(scale)
    torch.testing.assert_close(got, torch.diag(f(*xs).sum().expand(2)))
