"""The one rounding rule every printed score follows (moebench/digits.py), against exact
rational arithmetic on the float's binary value."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest

from moebench.digits import fixed, pct, pct_text


def _half_away_from_zero(x: float, places: int) -> str:
    """Independent: the exact value of `x`, scaled, rounded half away from zero, then written."""
    scaled = abs(Fraction(x)) * 10**places
    n = math.floor(scaled + Fraction(1, 2))
    digits = str(n).rjust(places + 1, "0")
    text = digits[:-places] + "." + digits[-places:] if places else digits
    return ("-" if x < 0 else "") + text


def _values() -> list[float]:
    rng = random.Random(0)
    ties = [k / 8 for k in range(-800, 801)]  # 48.125, 0.375, ...: exact binary halves
    near = [round(rng.uniform(-100, 100), 3) for _ in range(2000)]  # 1.005-like, just below
    wide = [rng.uniform(-1e4, 1e4) for _ in range(2000)]
    return ties + near + wide


@pytest.mark.parametrize("places", [0, 1, 2, 3])
def test_fixed_rounds_the_exact_value_half_away_from_zero(places: int) -> None:
    for x in _values():
        assert fixed(x, places) == _half_away_from_zero(x, places), x


def test_ties_go_away_from_zero_where_python_formatting_goes_to_even() -> None:
    assert (fixed(48.125), f"{48.125:.2f}") == ("48.13", "48.12")
    assert fixed(-0.125) == "-0.13" and fixed(0.125, sign=True) == "+0.13"
    assert fixed(1.005) == "1.00"  # 1.005 is stored just below: not a tie
    assert fixed(float("nan")) == "nan"
    assert fixed(-0.0) == "0.00" and fixed(-0.0, sign=True) == "+0.00"  # as the grid writes it
    assert fixed(-0.001) == "-0.00"  # a small negative keeps its sign, as in sprintf-js
    assert fixed(1e30) == "1000000000000000019884624838656.00"  # the exact binary value
    assert pct(-1e-9) == 0.0 and str(pct(-1e-9)) == "0.0"


def test_pct_text_starts_from_the_percentage_the_page_is_given() -> None:
    assert pct(0.48125) == 48.125 and pct_text(0.48125) == "48.13"
    assert pct(None) is None
    assert pct_text(-0.0028, sign=True) == "-0.28"
