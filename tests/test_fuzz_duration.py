"""Property-based fuzzing of ``--time``'s parser: any text gives seconds within the bounds or a
:class:`ConfigError` naming the accepted form, and the config's check agrees with it.

The number of examples comes from the profile in conftest.py (``VISIONTUNE_FUZZ``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from visiontune.core.errors import ConfigError
from visiontune.training.budget import parse_duration
from visiontune.training.config import MAX_DURATION_S, MIN_DURATION_S, TrainConfig

pytestmark = pytest.mark.fuzz

# text near the accepted form: digits, dots, units, spaces, signs and exponents
NEAR = st.text("0123456789.hms in-+eE_\t\u00a0\u0663", max_size=30)


def seconds_or_refusal(text: str) -> float | None:
    """``parse_duration(text)`` checked against the bounds, or None for a refusal naming the form."""
    try:
        seconds = parse_duration(text)
    except ConfigError as exc:
        assert "20m" in str(exc) and len(str(exc)) < 400, str(exc)
        return None
    assert math.isfinite(seconds) and MIN_DURATION_S <= seconds <= MAX_DURATION_S, (text, seconds)
    return seconds


@given(text=st.text() | NEAR)
def test_any_text_gives_seconds_in_bounds_or_a_config_error(text):
    seconds = seconds_or_refusal(text)
    try:  # the config's check of time is the same rule: it refuses exactly what the parser refuses
        TrainConfig.from_dict({"data": "photos", "time": text})
    except ConfigError as exc:
        assert seconds is None, (text, str(exc))
    else:
        assert seconds is not None, text


def number(digits: st.SearchStrategy[str] = st.text("0123456789", min_size=1, max_size=12)) -> st.SearchStrategy:
    """A number as ``--time`` writes it: digits, maybe a fraction; sometimes hundreds of digits."""
    long = st.integers(1, 600).map(lambda n: "9" * n)
    whole = digits | long
    return st.tuples(whole, st.none() | digits).map(lambda t: t[0] if t[1] is None else f"{t[0]}.{t[1]}")


@st.composite
def durations(draw: Callable) -> tuple[str, float | None]:
    """``XhYmZs`` with any of the parts, spaces between them, ``m`` or ``min``: the text and its
    seconds as floats add them up (None when no part is given)."""
    parts, total = [], None
    for unit, factor in (("h", 3600), ("m", 60), ("s", 1)):
        if draw(st.booleans()):
            value = draw(number())
            unit = draw(st.sampled_from(["m", "min"])) if unit == "m" else unit
            parts.append(value + unit)
            total = (total or 0.0) + float(value) * factor
    spaces = st.text(" \t", max_size=3)  # before, between and after the parts
    text = "".join(draw(spaces) + part for part in parts) + draw(spaces)
    return text, total


@given(case=durations())
def test_generated_durations_are_accepted_exactly_within_the_bounds(case):
    text, total = case
    seconds = seconds_or_refusal(text)
    if total is not None and math.isfinite(total) and MIN_DURATION_S <= total <= MAX_DURATION_S:
        assert seconds == pytest.approx(total, rel=1e-12), text
    else:
        assert seconds is None, (text, total)
