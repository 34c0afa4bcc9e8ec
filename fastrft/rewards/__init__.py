r"""Verifiable rewards: score a model response against a dataset's reference final answer.

A reward is a pure function ``(response, answer) -> float`` returning 1.0 when the response's final
answer is correct and 0.0 otherwise. Rewards are binary on purpose: the bandit view of RL fine-tuning
that this project studies treats each sampled response as an arm with a Bernoulli payoff, and partial
credit (for formatting, for "close" numbers) would change the problem being measured.

Rewards register themselves by name with :func:`register`; the trainer looks them up with :func:`get`
(or scores directly with :func:`score`) so that a config file only has to carry a string. That string
may also name a user's own function, ``"module.path:function"`` (see :mod:`fastrft.rewards.custom`).

>>> from fastrft.rewards import names, score
>>> names()
['arithmetic', 'gsm8k', 'math']
>>> score("gsm8k", "3 + 4 = 7 apples.\n#### 7", "7")
1.0
>>> score("math", "So the answer is $\\boxed{\\frac{1}{2}}$.", "0.5")
1.0
"""

from __future__ import annotations

import math
import numbers
import reprlib

from fastrft.errors import ConfigError, FastRFTError
from fastrft.rewards import custom
# Importing the reward modules is what fills the registry (each registers its function by name).
from fastrft.rewards.arithmetic import arithmetic_reward, extract_last_number
from fastrft.rewards.custom import RewardFn
from fastrft.rewards.gsm8k import extract_hash_answer, gsm8k_reward
from fastrft.rewards.hendrycks_math import extract_boxed, math_reward
from fastrft.rewards.registry import names, register, registered


def get(name: str) -> RewardFn:
    """The reward function registered as ``name``, or the function ``"module.path:function"`` names
    (imported and checked once, then cached).

    Raises :class:`~fastrft.errors.ConfigError` for an unknown name, listing the valid ones, or for a
    ``module:function`` that cannot be used, saying why, because the name normally comes straight from
    a CLI flag or config file that the user has to fix.
    """
    fn = registered(name) if isinstance(name, str) else None
    if fn is not None:
        return fn
    if custom.is_custom(name):
        return custom.load(name)
    raise ConfigError(f"unknown reward {name!r}; choose one of: {', '.join(names())}, or write "
                      f"'module.path:function' for your own {custom.SIGNATURE}")


def score(name: str, response: str, answer: str) -> float:
    """Score ``response`` against the reference final ``answer`` with reward ``name`` (a registered name
    or ``"module.path:function"``): a float in [0, 1], 1.0 for correct.

    A reward that raises, or returns anything else (not a number, NaN, outside [0, 1]), raises
    :class:`~fastrft.errors.FastRFTError` naming it, in one line: the trainer maps scores linearly onto
    (--reward-fail, --reward-success) and counts them for Pass@k, so a stray value would corrupt both.
    """
    fn = get(name)
    try:
        value = fn(response, answer)
    except Exception as e:  # noqa: BLE001 - the user's code: any exception becomes one line
        from fastrft.rewards.calling import RewardError, describe_failure

        raise RewardError(describe_failure(name, e, None, response, 1).replace("reward function", "reward", 1)) \
            from None
    if isinstance(value, numbers.Real) and not math.isnan(value) and 0 <= value <= 1:
        return float(value)
    raise FastRFTError(f"reward {name!r} returned {reprlib.repr(value)} ({type(value).__name__}) for the response "
                       f"{reprlib.repr(response)} and answer {answer!r}; a reward must return a float in [0, 1] "
                       "(1.0 = correct)")


__all__ = [
    "RewardFn",
    "arithmetic_reward",
    "custom",
    "extract_boxed",
    "extract_hash_answer",
    "extract_last_number",
    "get",
    "gsm8k_reward",
    "math_reward",
    "names",
    "register",
    "score",
]
