"""kdsearch.infra.text: how numbers read in tables and logs."""

from __future__ import annotations

import math

import pytest

from kdsearch.infra.text import ACCURACY, number


@pytest.mark.parametrize(
    ("value", "spec", "shown"),
    [
        (92.456, ACCURACY, "92.46"),
        (92.454, ACCURACY, "92.45"),
        (7, ACCURACY, "7.00"),
        (0.5, "+.1f", "+0.5"),
        (1234567.0, ",.0f", "1,234,567"),
        (None, ACCURACY, "n/a"),
        (math.nan, ".3g", "n/a"),
        (math.inf, ACCURACY, "inf"),  # only a missing value is n/a
    ],
)
def test_number(value, spec, shown):
    assert number(value, spec) == shown


def test_accuracies_have_two_decimals_by_default():
    assert ACCURACY == ".2f" and number(91.5) == "91.50"
