"""The README's code runs as printed."""
from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "make test" in text and "make bench" in text


def test_every_readme_python_block_runs():
    """Every ```python block of the README, in order, in one namespace (a page read top to
    bottom): the cvxpylayers migration block used names it never defined (NameError)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"README python block {i}", "exec"), namespace)
    # the tour
    assert namespace["Y"].shape == (8, 5, 3)
    assert namespace["node"](namespace["p"], namespace["q"]).shape == (4, 1)
    assert namespace["node"].log_w.grad is not None
    assert namespace["feat"].shape == (4, 64)
    assert namespace["ball"].abs().sum(-1).max() <= 2.0 + 1e-5
    # the cvxpylayers migration block
    assert namespace["x_star"].shape == (4, 2) and namespace["A_t"].grad is not None
