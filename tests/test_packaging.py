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
