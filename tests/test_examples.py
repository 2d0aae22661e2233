"""Each script in examples/ runs and does what its docstring says."""
from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_convex_layer_training():
    losses = load("convex_layer_training").main(steps=30)
    assert losses[-1] < 0.5 * losses[0]


def test_example_robust_pooling():
    table = load("robust_pooling").main()
    at30 = table[0.3]
    # The true location is 1; the outliers sit near 7.
    assert at30["max"] > 5 and at30["quadratic"] > 1.5
    assert at30["huber"] < at30["quadratic"] and at30["pseudo_huber"] < at30["quadratic"]
    assert at30["welsch"] < 0.1 and at30["trunc_quad"] < 0.1


def test_example_custom_node():
    report = load("custom_node").main()
    assert report.ok and report.max_abs_error < 1e-7


def test_example_optnet_qp():
    losses = load("optnet_qp").main(steps=40)
    assert losses[-1] < 0.6 * losses[0]


@pytest.mark.parametrize("name", ["convex_layer_training", "robust_pooling", "custom_node", "optnet_qp"])
def test_example_has_docstring_and_main(name):
    module = load(name)
    assert module.__doc__ and "Run:" in module.__doc__
    assert callable(module.main)


def test_fuzz_script_finds_no_defect_and_reports_a_planted_one(capsys):
    spec = importlib.util.spec_from_file_location(
        "fuzz_convex", EXAMPLES.parent / "scripts" / "fuzz_convex.py")
    fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz)
    default = torch.get_default_dtype()
    assert fuzz.main(["3", "2", "qp,huber"]) == 0
    assert torch.get_default_dtype() == default  # no global state left behind
    assert "2 cases, 0 defect(s)" in capsys.readouterr().out
    # A layer that returns a shifted point is caught.
    real = fuzz.ConvexLayer

    class Shifted(real):
        def forward(self, *args):
            return super().forward(*args) + 1.0

    fuzz.ConvexLayer = Shifted
    try:
        assert fuzz.main(["3", "1", "qp"]) == 1
    finally:
        fuzz.ConvexLayer = real
    with pytest.raises(SystemExit, match="unknown kind"):
        fuzz.main(["0", "1", "lasso"])
    # The gradient mode: seed 4's first case (a max penalty at degenerate vertices) had
    # eight elements with gradients off by 4e-3 to 1e-1 and no warning before the
    # degenerate-vertex probe.
    assert fuzz.main(["--gradients", "4", "1"]) == 0
    # Case 45's element 7 (a QP whose solution is ~3e7 at data ~2e3) was reported 0.3
    # off: its central difference at a step of 1e-6 is, the gradient is exact (1e-7 and
    # 1e-8 agree with it to 1e-9).
    assert fuzz.run_gradient_case(4, 45, fuzz.KINDS) == 0
