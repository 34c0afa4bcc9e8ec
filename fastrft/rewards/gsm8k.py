r"""Strict GSM8K reward: the answer must follow the dataset's ``#### <number>`` convention.

GSM8K reference solutions end in ``#### 72``, and few-shot or SFT-primed models copy that format, so
requiring it keeps the reward unambiguous: a number mentioned in passing in the reasoning can never be
mistaken for the final answer. (The arithmetic reward is the lenient alternative for models that do not
follow the format.)
"""

from __future__ import annotations

import re
from fractions import Fraction

from fastrft.rewards.registry import register

_HASH = "####"

# The first number after "####". Currency signs, percent signs and units around it are tolerated
# because models imitate the worked solutions, which write "$1,000" or "50%". A minus sign counts only
# where it cannot be subtraction (see arithmetic.py), and may sit on either side of a "$" ("-$5", "$-5").
# Thousands groups must be exactly three digits so that "1,000" is a thousand but "3,4" is the 3 of a
# list.
_NUMBER_RE = re.compile(
    r"(?P<sign>(?<![\w)\]}.])-)?(?:\$\s*)?(?P<sign2>(?<![\w)\]}.])-)?"
    r"(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
    r"(?P<frac>\.\d+)?"
)


def extract_hash_answer(text: str) -> str | None:
    r"""The stripped text after the LAST ``####`` in ``text``, or None if there is no ``####``.

    The last marker wins because a model that restarts or revises its solution ends with its final
    answer, and GSM8K's own solutions have exactly one marker.

    >>> extract_hash_answer("48 + 24 = 72 clips.\n#### 72")
    '72'
    >>> extract_hash_answer("#### 5\nWait, that is wrong.\n#### 6 apples")
    '6 apples'
    >>> extract_hash_answer("The answer is 72.") is None
    True
    """
    if _HASH not in text:
        return None
    return text.rsplit(_HASH, 1)[1].strip()


def _first_number(text: str) -> Fraction | None:
    m = _NUMBER_RE.search(text)
    if m is None:
        return None
    negative = bool(m["sign"] or m["sign2"])
    # Fraction, not float: exact comparison means "72.00" == "72" but no tolerance to reason about.
    value = Fraction(m["int"].replace(",", "") + (m["frac"] or ""))
    return -value if negative else value


@register("gsm8k")
def gsm8k_reward(response: str, answer: str) -> float:
    r"""1.0 if the first number after the last ``####`` in ``response`` equals ``answer``, else 0.0.

    ``answer`` is the text after ``####`` in the dataset's solution, e.g. ``"72"`` or ``"1,000"``.

    >>> gsm8k_reward("She sold 48 / 2 = 24 clips in May.\n#### 72", "72")
    1.0
    >>> gsm8k_reward("The total is $1,000.\n#### $1,000.00", "1000")
    1.0
    >>> gsm8k_reward("#### 71", "72")
    0.0
    >>> gsm8k_reward("The answer is 72.", "72")
    0.0
    """
    predicted_text = extract_hash_answer(response)
    if predicted_text is None:
        return 0.0
    predicted = _first_number(predicted_text)
    # The reference goes through the same parser so that dataset quirks ("$1,000", "18 dollars") are
    # read the same way as predictions; an unparsable reference scores 0.0 rather than raising because
    # validating references is the dataset loader's job, not the training loop's.
    reference = _first_number(answer)
    if predicted is None or reference is None:
        return 0.0
    return 1.0 if predicted == reference else 0.0
