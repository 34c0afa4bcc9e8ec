"""The registry of reward functions by name (``--reward``, a dataset's default reward).

The reward modules register their function with :func:`register` when they are imported; importing
fastrft.rewards imports them all.
"""

from __future__ import annotations

from typing import Callable

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


def registered(name: str) -> RewardFn | None:
    """The function registered as ``name``, or None."""
    return _REGISTRY.get(name)
