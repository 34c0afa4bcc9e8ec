"""User reward functions, named ``"module.path:function"`` (``--reward mypkg.rewards:exact_match``).

A custom reward has the built-in rewards' signature, ``(response: str, answer: str) -> float``, and
returns a score in [0, 1]. It is imported and checked when the config is built, so that a typo fails
before a model loads rather than at the first round's scoring; each failure says what to write instead.
Only the name travels (config files, :class:`~fastrft.data.Example` records, worker processes), and each
process imports the function once.
"""

from __future__ import annotations

import importlib
import inspect
import os
from typing import Callable

from fastrft.errors import ConfigError

RewardFn = Callable[[str, str], float]

#: What a custom reward looks like, quoted in every error message.
SIGNATURE = "def f(response: str, answer: str) -> float (a score in [0, 1])"

_LOADED: dict[str, RewardFn] = {}


def is_custom(name: object) -> bool:
    """Whether ``name`` has the ``module.path:function`` form (a registered name never has a colon)."""
    return isinstance(name, str) and ":" in name


def load(spec: str) -> RewardFn:
    """Import ``"module.path:function"`` (the function may be a dotted attribute path) and check that it
    can be called as ``f(response, answer)``; cached per spec.

    Raises :class:`~fastrft.errors.ConfigError` when the module cannot be imported, the attribute is
    missing or not callable, or its signature does not accept two positional arguments.
    """
    fn = _LOADED.get(spec)
    if fn is None:
        fn = _LOADED[spec] = _check(spec, _resolve(spec))
    return fn


def load_any(spec: str) -> Callable:
    """Like :func:`load`, but also accepts TRL's batched signature ``f(completions, **kwargs)``
    (fastrft.rewards.calling.is_batched)."""
    from fastrft.rewards.calling import is_batched

    fn = _resolve(spec)
    if not callable(fn):
        raise ConfigError(f"{spec!r} is not callable (an object of type {type(fn).__name__})")
    return fn if is_batched(fn) else load(spec)


def _resolve(spec: str) -> object:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or ":" in attr or any(not p.isidentifier() for p in attr.split(".")):
        raise ConfigError(f"{spec!r} is not 'module.path:function'; write e.g. mypkg.rewards:exact_match, "
                          f"naming {SIGNATURE}")
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        raise ConfigError(f"{spec!r} names a file; write the module instead, e.g. "
                          f"{os.path.splitext(os.path.basename(module_name))[0]}:{attr}, with the file's "
                          "directory on PYTHONPATH")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        top = module_name.split(".")[0]
        # The `fastrft` console script does not put the working directory on sys.path (python -m does),
        # so a module sitting right there is the common case of this error.
        here = isinstance(e, ModuleNotFoundError) and e.name == top and (
            os.path.exists(top + ".py") or os.path.isdir(top))
        fix = ("it is in the current directory, which the fastrft command does not search: run with "
               "PYTHONPATH=." if here else "put the directory that holds it on PYTHONPATH")
        raise ConfigError(f"{spec!r}: module {module_name!r} cannot be imported ({type(e).__name__}: {e}); "
                          f"{fix}") from None
    obj: object = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            defined = sorted(k for k, v in vars(module).items() if inspect.isfunction(v) and not k.startswith("_")
                             and v.__module__ == module.__name__)
            found = f"; its functions: {', '.join(defined[:10])}" if defined else ""
            raise ConfigError(f"{spec!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
                              f"attribute {attr!r}{found}; write {module_name}:<function name>")
        obj = getattr(obj, part)
    return obj


def _check(spec: str, fn: object) -> RewardFn:
    if not callable(fn):
        raise ConfigError(f"{spec!r} is not callable (an object of type {type(fn).__name__}); name {SIGNATURE}")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn  # some builtins carry no signature; the first call will tell
    try:
        sig.bind("response", "answer")
    except TypeError as e:
        raise ConfigError(f"{spec!r} has the signature {sig}, which cannot be called as f(response, answer) "
                          f"({e}); a reward is {SIGNATURE}") from None
    return fn
