"""The :class:`Example` record every dataset is turned into, and test/train de-duplication."""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Mapping

#: The reward-function names an :class:`Example` may point at (one per dataset family).
REWARDS = ("gsm8k", "math", "arithmetic")


@dataclass(frozen=True)
class Example:
    """One problem with its reference final answer.

    Attributes:
        id: Stable identifier such as ``"gsm8k/train/17"``, ``"math/test/4"`` or
            ``"arithmetic/add1/65"``; it is what logs and per-question statistics are keyed by.
        question: The raw problem text, without any prompt suffix.
        answer: The reference *final* answer (GSM8K: the text after the last ``####``, stripped;
            MATH: the ``answer`` field; arithmetic: the integer as a string).
        reward: Name of the reward function that scores completions for it
            (``"gsm8k"``, ``"math"`` or ``"arithmetic"``, or a user's ``"module.path:function"``
            when ``load_dataset(..., reward=...)``, i.e. ``--reward``, replaced the dataset's own).
        meta: Extra read-only information (``{"level": ..., "type": ...}`` for MATH,
            ``{"solution": ...}`` for GSM8K, ``{"level": ...}`` for arithmetic).

    ``meta`` is stored as a :class:`types.MappingProxyType` over a private copy, so neither the caller
    who passed the dict nor anyone holding the example can change it after construction. A mapping
    proxy is not hashable, so ``meta`` takes part in ``==`` but not in ``hash()``: examples can still be
    set members and dict keys, and equal examples always hash equally.
    """

    id: str
    question: str
    answer: str
    reward: str
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        # Copy before wrapping: a proxy over the caller's own dict would let them mutate it behind us.
        object.__setattr__(self, "meta", types.MappingProxyType(dict(self.meta)))

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Mapping proxies cannot be pickled, and examples do cross process boundaries (data-loader
        # workers, multiprocessing reward pools), so rebuild from a plain dict instead.
        return (Example, (self.id, self.question, self.answer, self.reward, dict(self.meta)))


def normalise_question(text: str) -> str:
    """Collapse all runs of whitespace to one space and strip the ends.

    Args:
        text (str): A question.

    Returns:
        str: The normalised text used to decide whether two questions are the same.
    """
    return " ".join(text.split())


def dedupe_against(test: list[Example], train: list[Example]) -> list[Example]:
    """Drop the test examples whose question also occurs in the training set.

    Questions are compared after :func:`normalise_question`, so reflowed line breaks or doubled
    spaces do not let a training problem leak into the evaluation.

    Args:
        test (list[Example]): Candidate evaluation examples.
        train (list[Example]): The training examples.

    Returns:
        list[Example]: The test examples, in their original order, minus those seen in training.
    """
    seen = {normalise_question(ex.question) for ex in train}
    return [ex for ex in test if normalise_question(ex.question) not in seen]
