"""Every package folder of the library is listed in pyproject.toml (else a wheel drops it)."""
from __future__ import annotations

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "convexddn").rglob("__init__.py")}
    assert found - listed == set(), f"packages missing from pyproject.toml: {sorted(found - listed)}"
    assert "convexddn.problems" in listed and config["package-dir"]["convexddn.problems"] == "problems"
    assert (ROOT / "convexddn" / "py.typed").exists() and "py.typed" in config["package-data"]["convexddn"]


def test_every_source_file_compiles_without_warnings():
    """A non-raw docstring with TeX in it (``\\hat``) warns at every import on Python 3.12+
    (SyntaxWarning, shown by default) and turns ``\\v`` into a vertical tab; the rendered
    math is garbled either way."""
    import warnings

    files = [p for folder in ("convexddn", "problems") for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 100
    noisy = []
    for path in files:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compile(path.read_text(), str(path), "exec")
        noisy += [f"{path.relative_to(ROOT)}:{w.lineno}: {w.message}" for w in caught]
    assert noisy == [], "\n".join(noisy)
