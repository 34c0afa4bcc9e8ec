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
from typing import Callable

from fastrft.errors import ConfigError, FastRFTError
from fastrft.rewards import custom
from fastrft.rewards.custom import RewardFn

_REGISTRY: dict[str, RewardFn] = {}


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator that makes a reward function available under ``name``.

    Registering a *different* function under a taken name is a programming error and raises, because
    silently replacing a reward would change what a run optimises. Re-registering a function with the
    same qualified name is allowed: that happens when a module is executed twice (``importlib.reload``,
    or ``python -m doctest fastrft/rewards/gsm8k.py``, which imports the file as a top-level module as
    well as through this package).
    """

    def decorator(fn: RewardFn) -> RewardFn:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != fn.__qualname__:
            raise ValueError(
                f"reward {name!r} is already registered to {existing.__module__}.{existing.__qualname__}"
            )
        _REGISTRY[name] = fn
        return fn

    return decorator


def names() -> list[str]:
    """Sorted names of all registered rewards."""
    return sorted(_REGISTRY)


def get(name: str) -> RewardFn:
    """The reward function registered as ``name``, or the function ``"module.path:function"`` names
    (imported and checked once, then cached).

    Raises :class:`~fastrft.errors.ConfigError` for an unknown name, listing the valid ones, or for a
    ``module:function`` that cannot be used, saying why, because the name normally comes straight from
    a CLI flag or config file that the user has to fix.
    """
    if isinstance(name, str) and name in _REGISTRY:
        return _REGISTRY[name]
    if custom.is_custom(name):
        return custom.load(name)
    raise ConfigError(f"unknown reward {name!r}; choose one of: {', '.join(names())}, or write "
                      f"'module.path:function' for your own {custom.SIGNATURE}")


def score(name: str, response: str, answer: str) -> float:
    """Score ``response`` against the reference final ``answer`` with reward ``name`` (a registered name
    or ``"module.path:function"``): a float in [0, 1], 1.0 for correct.

    A reward that returns anything else (not a number, NaN, outside [0, 1]) raises
    :class:`~fastrft.errors.FastRFTError` naming it: the trainer maps scores linearly onto
    (--reward-fail, --reward-success) and counts them for Pass@k, so a stray value would corrupt both.
    """
    value = get(name)(response, answer)
    if isinstance(value, numbers.Real) and not math.isnan(value) and 0 <= value <= 1:
        return float(value)
    raise FastRFTError(f"reward {name!r} returned {reprlib.repr(value)} ({type(value).__name__}) for the response "
                       f"{reprlib.repr(response)} and answer {answer!r}; a reward must return a float in [0, 1] "
                       "(1.0 = correct)")


# The reward modules import ``register`` from this package, so they must be imported after it is
# defined; importing them here is what populates the registry.
from fastrft.rewards.arithmetic import arithmetic_reward, extract_last_number  # noqa: E402
from fastrft.rewards.gsm8k import extract_hash_answer, gsm8k_reward  # noqa: E402
from fastrft.rewards.hendrycks_math import extract_boxed, math_reward  # noqa: E402

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
