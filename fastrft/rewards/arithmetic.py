r"""Lenient reward for the synthetic arithmetic task: the last number in the response counts.

The arithmetic task exists to exercise the trainer with a tiny model, and such models rarely follow an
output format like ``#### 11``. Grading only the last number still gives a meaningful signal (the
final number a small model writes is almost always its answer) without first having to teach the
format, which would conflate "learned the format" with "learned to add".
"""

from __future__ import annotations

import re
from fractions import Fraction

from fastrft.rewards.registry import register

# A minus sign belongs to the number only when it cannot be a binary operator: after a digit, a closing
# bracket or a letter ("5-3", "(2)-3", "x-3") it is subtraction, so the number there is positive.
# Thousands groups must be exactly three digits and must not run on into more digits, so "1,000" is one
# number while a list like "1,2,3" is three.
_NUMBER_RE = re.compile(
    r"(?P<sign>(?<![\w)\]}.])-)?"
    r"(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
    r"(?P<frac>\.\d+)?"
)


def _match_to_str(m: re.Match[str]) -> str:
    return (m["sign"] or "") + m["int"].replace(",", "") + (m["frac"] or "")


def extract_last_number(text: str) -> str | None:
    """The last number in ``text`` with thousands separators removed, or None if there is none.

    >>> extract_last_number("8 - 11 = -3")
    '-3'
    >>> extract_last_number("5-3")
    '3'
    >>> extract_last_number("That costs $1,250.50 in total.")
    '1250.50'
    >>> extract_last_number("no digits here") is None
    True
    """
    last = None
    for last in _NUMBER_RE.finditer(text):
        pass
    return None if last is None else _match_to_str(last)


def _to_fraction(text: str) -> Fraction | None:
    # Fractions rather than floats so that equality is exact: "11.0" equals "11" but "11.0000001" does
    # not, whatever the magnitude.
    try:
        return Fraction(text.strip().replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


@register("arithmetic")
def arithmetic_reward(response: str, answer: str) -> float:
    """1.0 if the last number in ``response`` equals the integer ``answer``, else 0.0.

    >>> arithmetic_reward("8 + 3 equals 11.", "11")
    1.0
    >>> arithmetic_reward("The answer is 11.0", "11")
    1.0
    >>> arithmetic_reward("11 is wrong, it is 12", "11")
    0.0
    >>> arithmetic_reward("8 - 11 = -3", "-3")
    1.0
    """
    predicted = extract_last_number(response)
    if predicted is None:
        return 0.0
    reference = _to_fraction(answer)
    # An unparsable reference scores 0.0 rather than raising: a reward is called inside the training
    # loop, and the dataset loader is the place that validates reference answers.
    if reference is None:
        return 0.0
    return 1.0 if _to_fraction(predicted) == reference else 0.0
