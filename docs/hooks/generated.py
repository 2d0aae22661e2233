"""MkDocs hook: the parts of pages that are generated from the library at build time.

A page asks for generated content with a marker on a line of its own:

- ``<!-- generated: registry-catalog -->``: the problem registry, from
  :func:`convexddn.registry.names` and :func:`convexddn.registry.describe`, with the
  path :func:`convexddn.layer` takes for each problem (:data:`convexddn.factory.NATIVE`);
- ``<!-- generated: path-costs -->``: the cost of both paths on the same problems, from
  the benchmark's ``docs/bench.json``;
- ``<!-- generated: ddn-hooks -->``: the DDN reference's methods that a ``DeclarativeNode``
  warns of and what to write instead, from the table the warning reads
  (:data:`convexddn.nodes._reference_hooks.REFERENCE_HOOKS`);
- ``<!-- generated: api MODULE -->``: the API reference of a public module — its
  docstring, then every name of its ``__all__`` that no earlier API page documents
  (:data:`API_PAGES` fixes the order), then links to those that one does.

Generating from the code keeps the catalog and the reference complete as the library
grows: a new registry problem or a new export appears without editing a page.
"""
from __future__ import annotations

import importlib
import inspect
import json
import re
from pathlib import Path
from typing import Any

_MARKER = re.compile(r"^<!-- generated: (?P<what>[a-z-]+)(?: (?P<arg>[\w.]+))? -->$", re.MULTILINE)

#: The public modules, in the order their API pages claim objects: a class or function
#: is documented on the first page whose module exports it and linked from the others.
API_PAGES = {
    "convexddn": "convexddn.md",
    "convexddn.functional": "functional.md",
    "convexddn.convex": "convex.md",
    "convexddn.nodes": "nodes.md",
    "convexddn.registry": "registry.md",
    "convexddn.errors": "errors.md",
    "convexddn.testing": "testing.md",
}

_owners: dict[int, str] | None = None


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    def expand(match: re.Match) -> str:
        what, arg = match["what"], match["arg"]
        if what == "registry-catalog":
            return registry_catalog()
        if what == "path-costs":
            return path_costs(Path(config["docs_dir"]) / "bench.json")
        if what == "ddn-hooks":
            return ddn_hooks()
        if what == "api" and arg:
            return api_page(arg)
        raise ValueError(f"{page.file.src_uri}: unknown generated content {match.group(0)!r}")

    return _MARKER.sub(expand, markdown)


# --- the registry catalog ------------------------------------------------------------------

def registry_catalog() -> str:
    import convexddn
    from convexddn.factory import NATIVE

    rows = ["| problem | what it computes [options] | `convexddn.layer` returns |",
            "|---|---|---|"]
    for name in convexddn.registry.names():
        path = ("the native node" if name in NATIVE else "a `ConvexLayer` (cone program)")
        text = convexddn.registry.describe(name).replace("|", r"\|")
        rows.append(f"| `{name}` | {text} | {path} |")
    return "\n".join(rows)


# --- the DDN reference's methods a DeclarativeNode warns of -------------------------------

def ddn_hooks() -> str:
    from convexddn.nodes._reference_hooks import REFERENCE_HOOKS

    rows = ["| reference method | in the reference | in a convexddn `DeclarativeNode` |", "|---|---|---|"]
    for name, (reference, instead) in REFERENCE_HOOKS.items():
        cells = (f"`{name}`", reference, instead)
        rows.append("| " + " | ".join(cell.replace("|", r"\|") for cell in cells) + " |")
    return "\n".join(rows)


# --- cost of the two paths -----------------------------------------------------------------

def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def path_costs(bench_json: Path) -> str:
    result = json.loads(bench_json.read_text())
    rows = result["rows"]
    both = [(n, c) for n in rows if n["path"] == "native"
            for c in rows if c["path"] == "cvxpy" and (c["family"], c["node"], c["shape"])
            == (n["family"], n["node"], n["shape"]) and c["fwd_ms_per_sample"] is not None]
    lines = ["| node | input shape | native fwd + bwd, ms/sample | cone program fwd + bwd, ms/sample "
             "| cone / native | max Δ solution | max Δ gradient |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for native, cone in both:
        t_native = native["fwd_ms_per_sample"] + (native["bwd_ms_per_sample"] or 0.0)
        t_cone = cone["fwd_ms_per_sample"] + (cone["bwd_ms_per_sample"] or 0.0)
        diff_x = cone["max_solution_diff"]
        diff_g = cone["max_grad_diff"]
        lines.append(
            f"| {native['family']}: {native['node']} | {tuple(native['shape'])} | {_ms(t_native)} "
            f"| {_ms(t_cone)} | {t_cone / t_native:,.0f}× "
            f"| {'—' if diff_x is None else f'{diff_x:.1e}'} | {'—' if diff_g is None else f'{diff_g:.1e}'} |")
    lines += ["", _agreement(both)]
    m = result["machine"]
    lines += ["", f"Measured by `convexddn bench` on {m['cpu_count']} CPU cores ({m['processor']}), "
                  f"torch {m['torch']} with {m['torch_threads']} threads, device {m['device']}; "
                  "float32 timings, float64 agreement; each cone-program row's timing is described "
                  "by its note in docs/bench.md (runs before 2026-12-01's fix timed 8 rows once and "
                  "scaled them to a sample, which misstates problems solved as one batch). "
                  "A sample is one element of the leading batch dimension."]
    return "\n".join(lines)


def _agreement(both: list[tuple[dict, dict]]) -> str:
    """The sentence under the path-costs table: how closely the two paths agree, from
    the same rows (a hand-written one went stale when the bench was run again)."""
    def worst(key: str, rows: list[tuple[dict, dict]]) -> tuple[float, str] | None:
        found = [(cone[key], f"{cone['family']}: {cone['node']}") for _, cone in rows if cone[key] is not None]
        return max(found) if found else None

    def sci(v: float) -> str:
        return f"{v:.1e}".replace("e-0", "e-").replace("e+00", "")

    x, g = worst("max_solution_diff", both), worst("max_grad_diff", both)
    if x is None or g is None:
        return "The cone-program rows of this run carry no agreement figures."
    rest = worst("max_grad_diff", [(n, c) for n, c in both if f"{c['family']}: {c['node']}" != g[1]])
    elsewhere = f"; {sci(rest[0])} or better elsewhere" if rest else ""
    return (f"The two paths agree in float64 to {sci(x[0])} or better in the solutions and "
            f"{sci(g[0])} or better in the gradients ({g[1]}{elsewhere}; last two columns): "
            "the cone program is not an approximation, only a slower way to the same answer.")


# --- API pages -----------------------------------------------------------------------------

def _module(path: str) -> Any:
    # convexddn.registry is an attribute of the package (convexddn.convex.registry).
    head, _, tail = path.rpartition(".")
    if head:
        parent = _module(head)
        if hasattr(parent, tail) and inspect.ismodule(getattr(parent, tail)):
            return getattr(parent, tail)
    return importlib.import_module(path)


def _documented(obj: Any) -> bool:
    return inspect.isclass(obj) or inspect.isfunction(obj)


def _api_owners() -> dict[int, str]:
    """id of each exported class or function -> the public path it is documented at."""
    global _owners
    if _owners is None:
        _owners = {}
        for page in API_PAGES:
            module = _module(page)
            for name in module.__all__:
                obj = getattr(module, name)
                if _documented(obj):
                    _owners.setdefault(id(obj), f"{page}.{name}")
    return _owners


def api_page(path: str) -> str:
    if path not in API_PAGES:
        raise ValueError(f"{path} is not one of the API pages {list(API_PAGES)}")
    module = _module(path)
    owners = _api_owners()
    parts = [f"::: {path}\n    options:\n      members: false\n      show_root_heading: false\n"]
    elsewhere, submodules = [], []
    for name in module.__all__:
        obj = getattr(module, name)
        if name.startswith("__"):
            continue
        if inspect.ismodule(obj):
            submodules.append((name, obj))
        elif _documented(obj) and owners[id(obj)] != f"{path}.{name}":
            elsewhere.append((name, owners[id(obj)]))
        else:
            parts.append(f"::: {path}.{name}\n")
    if submodules:
        pages = {id(_module(p)): (p, page) for p, page in API_PAGES.items()}
        parts.append("## Modules\n\n" + "\n".join(
            f"- [`{pages[id(sub)][0]}`]({pages[id(sub)][1]})" if id(sub) in pages else f"- `{path}.{name}`"
            for name, sub in submodules) + "\n")
    if elsewhere:
        parts.append("## Also exported here\n\n" + "\n".join(
            f"- `{name}`: documented as [`{owner}`][{owner}]" for name, owner in elsewhere) + "\n")
    return "\n".join(parts)
