"""convexddn._checks: the one validator of list-valued options."""
from __future__ import annotations

import pytest

from convexddn._checks import check_choices
from convexddn.errors import OptionError


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
