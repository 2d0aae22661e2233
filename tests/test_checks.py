"""convexddn._checks: the list-option validator and the finiteness screen."""
from __future__ import annotations

import pytest
import torch

from convexddn._checks import check_choices, check_finite
from convexddn.errors import NonFiniteError, OptionError


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
