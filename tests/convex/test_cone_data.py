"""The parameter -> (P, q, A, b) maps of a canonicalised problem (convexddn.convex.cone_data)."""
import cvxpy as cp
import numpy as np
import torch

from convexddn.convex.canonical import canonicalise

F64 = torch.float64


def _reference_blocks(data, p: np.ndarray) -> dict[str, np.ndarray]:
    """target[b, pos[k]] += coef[k] * p[b, col[k]], term by term (the maps' definition)."""
    out = {}
    for name, m in data.maps.items():
        block = np.zeros((p.shape[0], m.size))
        for pos, col, coef in zip(m.pos.tolist(), m.col.tolist(), m.coef.tolist()):
            block[:, pos] += coef * p[:, col]
        out[name] = block
    return out


def _problems():
    n, m = 4, 3
    # A QP with a matrix parameter used transposed-and-scaled and a shared vector
    # parameter: maps with one term per position (A from G, M from L) and maps with
    # several terms on one position (b = h + 2 h) or positions left empty.
    L, G, h, q = (cp.Parameter((n, n)), cp.Parameter((m, n)), cp.Parameter(m), cp.Parameter(n))
    x = cp.Variable(n)
    yield cp.Problem(cp.Minimize(0.5 * cp.sum_squares(L @ x) + q @ x), [G @ x <= h + 2 * h]), [L, G, h, q], [x]
    # The same parameter in two constraints (each A entry one term; b two maps' worth)
    # and a second-order cone.
    c, r = cp.Parameter(n), cp.Parameter(nonneg=True)
    y = cp.Variable(n)
    yield (cp.Problem(cp.Minimize(c @ y), [cp.norm(y) <= r, y <= r, -y <= r, cp.sum(y) == r]), [c, r], [y])


def test_blocks_equal_the_maps_term_by_term():
    """Both ways blocks() forms a map (the gathered values in position order where a map
    has one term per position; a scatter of its terms otherwise) against the maps'
    definition evaluated term by term in numpy, batched and unbatched parameters."""
    kinds = set()
    gen = torch.Generator().manual_seed(3)
    for problem, params, variables in _problems():
        data = canonicalise(problem, params, variables)
        for B in (1, 5):
            values = [torch.randn(B, *prm.shape, dtype=F64, generator=gen).abs() for prm in params]
            p = data.parameter_vector(values, B)
            got = data.blocks(p)
            want = _reference_blocks(data, p.numpy())
            # Maps without terms are made on first reading (zeros), the others up front.
            assert set(got) == {k for k, m in data.maps.items() if m.pos.numel()}
            for name in want:
                block = got[name]
                assert block.shape == (B, data.maps[name].size) and block.is_contiguous()
                np.testing.assert_allclose(block.numpy(), want[name], rtol=1e-15, atol=1e-15)
        for m in data.maps.values():
            pos = m.pos.numpy()
            if pos.size:
                kinds.add(pos.size == m.size and np.array_equal(np.sort(pos), np.arange(m.size)))
    assert kinds == {True, False}  # both ways were exercised


def test_blocks_gradient_matches_the_maps():
    """The backward of blocks() is the maps' transpose: <dL/dp, v> = sum of <g_k, block_k(v)>."""
    problem, params, variables = next(_problems())
    data = canonicalise(problem, params, variables)
    gen = torch.Generator().manual_seed(4)
    values = [torch.randn(3, *prm.shape, dtype=F64, generator=gen) for prm in params]
    p = data.parameter_vector(values, 3).requires_grad_()
    blocks = data.blocks(p)
    cot = {k: torch.randn(v.shape, dtype=F64, generator=gen) for k, v in blocks.items()}
    (grad,) = torch.autograd.grad(sum((blocks[k] * cot[k]).sum() for k in blocks), p)
    direction = torch.randn(p.shape, dtype=F64, generator=gen)
    lin = _reference_blocks(data, direction.numpy())
    expected = sum(float((cot[k].numpy() * lin[k]).sum()) for k in blocks)
    assert abs(float((grad * direction).sum()) - expected) <= 1e-12 * max(1.0, abs(expected))


def test_recover_forms_only_the_outputs_read_and_they_match_cvxpy():
    """A variable fixed by one equality row (t = L x + c) is eliminated before solving:
    recover() forms it, and the removed row's multiplier, only where an output reads
    them. Each output, and its gradient, against cvxpy and central differences."""
    import cvxpy as cp

    from convexddn import ConvexLayer

    n = k = 4  # L square: the objective is strictly convex in x
    L, c, G, h = cp.Parameter((k, n)), cp.Parameter(k), cp.Parameter((2, n)), cp.Parameter(2)
    x, t = cp.Variable(n), cp.Variable(k)
    eq = t == L @ x + c
    prob = cp.Problem(cp.Minimize(cp.sum_squares(t) + cp.sum(x)), [eq, G @ x <= h])
    gen = torch.Generator().manual_seed(5)
    vals = [torch.randn(3, k, n, dtype=F64, generator=gen), torch.randn(3, k, dtype=F64, generator=gen),
            torch.randn(3, 2, n, dtype=F64, generator=gen), torch.rand(3, 2, dtype=F64, generator=gen) + 0.5]
    for out, flags, cvx in (([x], (False, False), lambda: x.value), ([t], (True, False), lambda: t.value),
                            ([eq.dual_variables[0]], (False, True), lambda: eq.dual_value)):
        layer = ConvexLayer(prob, [L, c, G, h], out)
        data = canonicalise(prob, [L, c, G, h], out)
        assert data.eliminated == k and data._recovered() == flags
        got = layer(*vals)  # one output: a tensor
        for i in range(3):
            for prm, v in zip((L, c, G, h), vals):
                prm.value = v[i].numpy()
            prob.solve(solver=cp.CLARABEL)
            np.testing.assert_allclose(got[i].numpy(), cvx(), atol=1e-7)
        # d<w, out>/dc by central differences (the recovered part depends on every datum).
        w = torch.randn(got.shape, dtype=F64, generator=gen)
        cv = vals[1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad((layer(vals[0], cv, *vals[2:]) * w).sum(), cv)
        step = 1e-6
        for j in range(k):
            e = torch.zeros_like(cv)
            e[:, j] = step
            fd = ((layer(vals[0], vals[1] + e, *vals[2:]) - layer(vals[0], vals[1] - e, *vals[2:]))
                  * w).flatten(1).sum(1) / (2 * step)
            np.testing.assert_allclose(g[:, j].numpy(), fd.numpy(), atol=1e-6)
