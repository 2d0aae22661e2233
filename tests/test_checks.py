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
