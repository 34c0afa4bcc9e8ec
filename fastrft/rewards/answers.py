r"""Final answers as votes, for maj@k: the canonical key of a response's final answer under a built-in reward.

Each key is what the reward itself compares: gsm8k the first number after the last ``####`` and arithmetic
the last number, both as exact fractions (so "72", "72.00" and "1,000"/"1000" vote together); math the
normalised last ``\boxed{}`` (the reward's string check). Answers that only math-verify finds equal
("0.5" and "\frac{1}{2}") vote apart, which can only lower maj@k. A response with no parsable answer votes
for nothing. A reward without a key (a user's own function) has no maj@k.

>>> answer_key("gsm8k", "so 3 + 4 = 7.\n#### 7.00 apples"), answer_key("math", r"$\boxed{\dfrac12}$.")
('7', '\\frac{1}{2}')
>>> answer_key("gsm8k", "no marker") is None, answer_key("my.module:fn", "#### 7") is None
(True, True)
"""

from __future__ import annotations

from typing import Callable

from fastrft.rewards.arithmetic import _to_fraction, extract_last_number
from fastrft.rewards.gsm8k import _first_number, extract_hash_answer
from fastrft.rewards.hendrycks_math import _normalise, extract_boxed


def _gsm8k(text: str) -> str | None:
    after = extract_hash_answer(text)
    value = _first_number(after) if after is not None else None
    return None if value is None else str(value)


def _arithmetic(text: str) -> str | None:
    last = extract_last_number(text)
    value = _to_fraction(last) if last is not None else None
    return None if value is None else str(value)


def _math(text: str) -> str | None:
    boxed = extract_boxed(text)
    predicted = boxed.strip().rstrip(".").strip() if boxed is not None else ""
    return _normalise(predicted) or None if predicted else None


KEYS: dict[str, Callable[[str], str | None]] = {"gsm8k": _gsm8k, "arithmetic": _arithmetic, "math": _math}


def has_key(reward: str) -> bool:
    """Whether ``reward``'s responses can vote (maj@k)."""
    return reward in KEYS


def answer_key(reward: str, text: str) -> str | None:
    """The canonical final answer of ``text`` under ``reward``, or None (none parsable, or no key)."""
    fn = KEYS.get(reward)
    return fn(text) if fn is not None else None
