"""The documentation site: its generated parts, its code, its build in strict mode.

The full build needs the [docs] extra (MkDocs Material, mkdocstrings) and is skipped
without it; CI runs it anyway as ``make docs`` after ``make test`` (see ``.ci/run``).
The other tests need only the library.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# Guide pages whose ```python blocks must run as printed (each page in one namespace).
RUNNABLE_PAGES = ("index.md", "getting-started.md", "which-path.md", "registry.md", "declarative-node.md",
                  "nodes-pooling.md", "nodes-projection.md", "nodes-attention-transport-tv.md",
                  "nodes-eigen-lstsq-vector-pool.md", "migrating-from-ddn.md",
                  "migrating-from-qpth.md")


def _load_hook(name: str):
    spec = importlib.util.spec_from_file_location(f"_docs_hook_{name}", DOCS / "hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _has(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


# --- generated content (no docs tools needed) -------------------------------------------

def test_docs_registry_catalog_lists_every_problem():
    import convexddn
    from convexddn.factory import NATIVE

    table = _load_hook("generated").registry_catalog()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == convexddn.registry.names()
    for row in rows:
        name = row.split("`")[1]
        assert convexddn.registry.describe(name).replace("|", r"\|") in row
        assert ("native node" in row) == (name in NATIVE)


def test_docs_ddn_hooks_table_is_the_warned_methods():
    """The migration guide had no row for the DDN reference's linear_constraint_parameters,
    gradient or jacobian, which a ported DeclarativeNode silently ignored; DeclarativeNode now
    warns of them, and the guide prints the very table the warning reads."""
    from convexddn.nodes._reference_hooks import REFERENCE_HOOKS

    table = _load_hook("generated").ddn_hooks()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(REFERENCE_HOOKS)
    assert {"linear_constraint_parameters", "gradient", "jacobian"} <= set(REFERENCE_HOOKS)
    assert "A y − d" in rows[0] and "torch.autograd.functional.jacobian(node, x)" in table
    assert "<!-- generated: ddn-hooks -->" in (DOCS / "migrating-from-ddn.md").read_text()


def test_docs_prose_ratios_match_bench_json():
    """which-path.md said "a thousand times slower or more" and nodes-projection.md "one
    thousandth of the speed or less" while bench.json gave 52× to 32,131× (projections 67×
    to 316×; 88× to 503× in the run of 2026-12-02): the prose states the ranges, which this
    keeps true after a bench run."""
    rows = json.loads((DOCS / "bench.json").read_text())["rows"]
    ratio = {}
    for n in rows:
        for c in rows:
            if (n["path"], c["path"]) == ("native", "cvxpy") and c["fwd_ms_per_sample"] is not None and \
                    (c["family"], c["node"], c["shape"]) == (n["family"], n["node"], n["shape"]):
                t = lambda r: r["fwd_ms_per_sample"] + (r["bwd_ms_per_sample"] or 0.0)  # noqa: E731
                ratio[(n["family"], n["node"])] = t(c) / t(n)
    assert "tens to tens of thousands" in (DOCS / "which-path.md").read_text()
    assert 10 <= min(ratio.values()) < 100 and 10_000 <= max(ratio.values()) < 100_000, ratio
    projection = [v for (family, _), v in ratio.items() if family == "projection"]
    # The prose's fractions ("a ninetieth to a five-hundredth of the speed") bracket the
    # run's ratios to within a third: read from the page, not fitted to a run here.
    words = {"fiftieth": 50, "sixtieth": 60, "seventieth": 70, "eightieth": 80, "ninetieth": 90,
             "hundredth": 100, "two-hundredth": 200, "three-hundredth": 300, "four-hundredth": 400,
             "five-hundredth": 500, "six-hundredth": 600, "thousandth": 1000}
    said = re.search(r"at an? ([\w-]+) to an? ([\w-]+) of the speed", (DOCS / "nodes-projection.md").read_text())
    assert said and said[1] in words and said[2] in words, said
    low, high = words[said[1]], words[said[2]]
    assert low * 0.75 <= min(projection) <= low * 1.33 and high * 0.75 <= max(projection) <= high * 1.33, (
        said.groups(), projection)


def test_docs_path_costs_table_from_bench_json():
    table = _load_hook("generated").path_costs(DOCS / "bench.json")
    rows = [line for line in table.splitlines() if line.startswith("| pooling") or line.startswith("| projection")]
    result = json.loads((DOCS / "bench.json").read_text())
    measured = {(r["family"], r["node"], tuple(r["shape"])) for r in result["rows"]
                if r["path"] == "cvxpy" and r["fwd_ms_per_sample"] is not None}
    assert len(rows) == len(measured) > 0
    for row in rows:
        ratio = float(row.split("|")[5].strip().rstrip("×").replace(",", ""))
        assert ratio > 1  # the cone program is the slower path on every measured problem


def test_docs_path_costs_agreement_sentence_follows_the_json(tmp_path):
    """The sentence under the table was hand-written and went stale (3.8e-9 against the
    run's 2.4e-10): it is now built from the same rows, worst row named."""
    def row(family, node, path, dx=None, dg=None):
        return {"family": family, "node": node, "path": path, "shape": [2, 3], "fwd_ms_per_sample": 1.0,
                "bwd_ms_per_sample": 1.0, "max_solution_diff": dx, "max_grad_diff": dg}

    result = {"machine": {"cpu_count": 2, "processor": "p", "torch": "t", "torch_threads": 2, "device": "cpu"},
              "rows": [row("pooling", "huber", "native"), row("pooling", "huber", "cvxpy", 3e-12, 4e-6),
                       row("projection", "simplex", "native"), row("projection", "simplex", "cvxpy", 5e-9, 6e-11)]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(result))
    table = _load_hook("generated").path_costs(path)
    assert ("agree in float64 to 5.0e-9 or better in the solutions and 4.0e-6 or better in the gradients "
            "(pooling: huber; 6.0e-11 or better elsewhere;") in table


def test_docs_api_pages_document_every_export_once():
    hook = _load_hook("generated")
    documented: dict[str, int] = {}
    for page in hook.API_PAGES:
        text = hook.api_page(page)
        for path in re.findall(r"^::: ([\w.]+)$", text, re.M):
            documented[path] = documented.get(path, 0) + 1
        module = hook._module(page)
        for name in module.__all__:
            obj = getattr(module, name)
            if hook._documented(obj):
                # documented here, or linked to where it is
                assert f"::: {page}.{name}\n" in text or f"`{name}`: documented as" in text, (page, name)
    assert all(count == 1 for count in documented.values())
    assert set(hook._api_owners().values()) <= set(documented)


@pytest.mark.skipif(not _has("griffe"), reason="needs the [docs] extra (griffe)")
def test_docs_rst_docstrings_become_markdown():
    convert = _load_hook("rst_docstrings")._rewrite_blocks
    text = ("Summary.\n\n.. math::\n\n    y = \\min_u f(u)\n\nArgs:\n    tol, max_iter: solver options.\n"
            "        More.\n\nExamples::\n\n    >>> 1 + 1\n    2\n\n.. note::\n    Careful.\n")
    out = convert(text)
    assert "$$\ny = \\min_u f(u)\n$$" in out
    assert "    tol: solver options.\n        More.\n    max_iter: solver options.\n        More." in out
    assert "Examples:\n" in out and "Examples::" not in out
    assert "!!! note\n\n    Careful." in out


# --- the pages' code and wording ---------------------------------------------------------

def test_docs_code_blocks_run():
    # In a fresh interpreter: the registry page registers a problem of its own.
    pages = {name: re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(), re.S)
             for name in RUNNABLE_PAGES}
    assert all(pages.values()), [name for name, blocks in pages.items() if not blocks]
    script = "\n".join([
        "import contextlib, io, json, sys",
        f"pages = json.loads({json.dumps(json.dumps(pages))})",
        "for name, blocks in pages.items():",
        "    namespace = {}",
        "    for i, block in enumerate(blocks):",
        "        with contextlib.redirect_stdout(io.StringIO()):",
        "            exec(compile(block, f'docs/{name} block {i + 1}', 'exec'), namespace)",
        "print('ok')",
    ])
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]



def test_docs_qpth_migration_table_holds():
    """docs/migrating-from-qpth.md's layer and its table of differences, on the page's own
    values: the layer is qpth's QP (one element against CVXPY + Clarabel at tight
    tolerances), unbatched inputs give (n,), float32 inputs a float32 answer, qpth's empty
    A and b a ShapeError, a Q that is not symmetric an InputError, and the gradient in a
    PSD Q is symmetric."""
    import cvxpy as cp
    import numpy as np

    from convexddn.errors import InputError, ShapeError

    namespace = {}
    torch.manual_seed(0)  # (the page draws its values with torch.randn)
    for block in re.findall(r"```python\n(.*?)```", (DOCS / "migrating-from-qpth.md").read_text(), re.S):
        exec(compile(block, "docs/migrating-from-qpth.md", "exec"), namespace)
    qp = namespace["qp"]
    Q, p, G, h, A, b = (namespace[k].detach() for k in ("Q_t", "p_t", "G_t", "h_t", "A_t", "b_t"))
    z_star = namespace["z_star"].detach()
    z = cp.Variable(Q.shape[0])
    cp.Problem(cp.Minimize(0.5 * cp.quad_form(z, Q.numpy()) + p[3].numpy() @ z),
               [G.numpy() @ z <= h.numpy(), A.numpy() @ z == b.numpy()]).solve(
        solver="CLARABEL", tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    assert np.abs(z_star[3].numpy() - z.value).max() < 1e-7
    assert qp(Q, p[3], G, h, A, b).shape == (Q.shape[0],)
    assert torch.allclose(qp(Q, p[3], G, h, A, b), z_star[3], atol=1e-10)
    single = qp(*(v.float() for v in (Q, p[3], G, h, A, b)))
    assert single.dtype == torch.float32 and torch.allclose(single.double(), z_star[3], atol=1e-5)
    empty = torch.empty(0, dtype=torch.float64)
    with pytest.raises(ShapeError, match="trailing shape"):
        qp(Q, p[3], G, h, empty, empty)
    skew = Q.clone()
    skew[0, 1] += 1e-3
    with pytest.raises(InputError, match="not symmetric"):
        qp(skew, p[3], G, h, A, b)
    Q_var = Q.clone().requires_grad_()
    (grad,) = torch.autograd.grad(qp(Q_var, p, G, h, A, b).square().sum(), [Q_var])
    assert torch.equal(grad, grad.mT)

def test_docs_have_no_tracker_wording():
    # Readers do not have the project's tracker: say "goal" and where it comes from.
    pages = [ROOT / "README.md", *sorted(DOCS.glob("**/*.md"))]
    offenders = [f"{page.relative_to(ROOT)}:{i}: {line.strip()}"
                 for page in pages for i, line in enumerate(page.read_text().splitlines(), 1)
                 if re.search(r"\bissues?\s*#?\d|target \(issue", line, re.I)]
    assert not offenders, "\n".join(offenders)


def test_docs_every_page_is_in_the_nav():
    # A page missing from mkdocs.yml's nav builds, but no reader finds it. The pages of
    # not_in_nav (bench.md, gpu-tables.md: raw tables included by benchmarks.md and
    # gpu.md) are the only exceptions.
    config = (ROOT / "mkdocs.yml").read_text()
    nav = set(re.findall(r"^\s*- [^:]+: ([\w/.-]+\.md)\s*$", config, re.M))
    block = re.search(r"^not_in_nav: \|\n((?:  \S.*\n)+)", config, re.M)
    included = {line.strip() for line in block.group(1).splitlines()} if block else set()
    assert "bench.md" in included
    pages = {str(p.relative_to(DOCS)) for p in DOCS.glob("**/*.md")} - included
    assert pages <= nav, f"add to the nav in mkdocs.yml: {sorted(pages - nav)}"
    assert nav <= pages, f"the nav names missing pages: {sorted(nav - pages)}"


def test_py_typed_marker_is_packaged():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    assert (ROOT / "convexddn" / "py.typed").is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["convexddn"]


# --- the site ----------------------------------------------------------------------------

@pytest.mark.skipif(not _has("mkdocs", "mkdocstrings", "material", "mkdocstrings_handlers.python"),
                    reason="needs the [docs] extra; CI builds the site with `make docs`")
def test_docs_build_strict(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-5000:]
    import convexddn

    catalog = (site / "registry.html").read_text()
    assert all(f"<code>{name}</code>" in catalog for name in convexddn.registry.names())
    api = (site / "api" / "functional.html").read_text()
    assert "arithmatex" in api  # the docstrings' maths reached MathJax
    assert ":math:" not in api and ".. math::" not in api
    errors = (site / "api" / "errors.html").read_text()
    assert all(name in errors for name in convexddn.errors.__all__)
    # Browsable from file:// (the README says to open build/site/index.html): links name
    # pages, not folders, which a browser shows as a listing there.
    index = (site / "index.html").read_text()
    assert 'href="getting-started.html"' in index and 'href="getting-started/"' not in index
