"""The evaluation metrics hook: a function of yours, called at every evaluation, whose numbers are logged.

``Trainer(config, compute_metrics=fn)`` or ``--eval-metrics module:function`` (the config records either
by name). At every evaluation ``fn`` is called once with keyword arguments, one entry per test sample (a
problem with n samples appears n times, in problem order):

- ``completions``: the sampled responses (text), at the evaluation temperature;
- ``answers``: each problem's reference answer; ``ids``: its id; ``prompts``: its question;
- every other column the dataset carries, by its name.

It returns a dict of metric name -> float, logged as ``eval_<name>`` in the evaluation's record (and on
TensorBoard). A function that returns anything else (not a dict, a value that is not a finite number, a
name that is a built-in metric's or not a plain name) stops the run with one line that names it; what was
recorded before stays. A round-0 evaluation shared between runs (``fastrft ladder``) is shared only
between runs with the same hook.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, Callable

from fastrft.errors import ConfigError, FastRFTError

SIGNATURE = "def f(completions, answers, **columns) -> dict[str, float]"
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_@.\-]*$")


class MetricsHookError(FastRFTError):
    """The metrics hook failed or returned something fastrft cannot log."""


def resolve(spec: str | None, fn: Callable | None) -> tuple[str | None, Callable | None]:
    """(the spec the config records, the callable) from ``--eval-metrics`` and/or ``compute_metrics``."""
    from fastrft.rewards import custom
    from fastrft.rewards.funcs import spec_of

    if fn is not None:
        if not callable(fn):
            raise ConfigError(f"compute_metrics (Trainer argument) must be a function {SIGNATURE}, not a "
                              f"{type(fn).__name__}")
        return spec_of(fn), fn
    if spec is None:
        return None, None
    if spec.startswith("python:"):
        raise ConfigError(f"eval_metrics (--eval-metrics) {spec!r} was a function passed from Python "
                          "(Trainer(compute_metrics=...)); pass it again the same way, or name an importable "
                          "'module:function'")
    try:
        target = custom._resolve(spec)
    except ConfigError as e:
        raise ConfigError(f"eval_metrics (--eval-metrics) {e}") from None
    if not callable(target):
        raise ConfigError(f"eval_metrics (--eval-metrics) {spec!r} is not callable (an object of type "
                          f"{type(target).__name__}); name {SIGNATURE}")
    return spec, target


def call(name: str, fn: Callable, examples: list, completions: list[list[str]], reserved) -> dict[str, float]:
    """``fn``'s metrics for ``examples`` and their ``completions`` (one list per example), prefixed
    ``eval_``; raises :class:`MetricsHookError` (one line naming ``name``) on a bad return."""
    rows = [(ex, text) for ex, texts in zip(examples, completions) for text in texts]
    kwargs: dict[str, Any] = {"completions": [t for _, t in rows], "answers": [ex.answer for ex, _ in rows],
                              "ids": [ex.id for ex, _ in rows], "prompts": [ex.question for ex, _ in rows]}
    for key in sorted({k for ex in examples for k in ex.meta} - set(kwargs)):
        kwargs[key] = [ex.meta.get(key) for ex, _ in rows]
    try:
        out = fn(**kwargs)
    except Exception as e:  # noqa: BLE001 - the user's code: any exception becomes one line
        raise MetricsHookError(f"metrics hook {name} raised {type(e).__name__}: {e}") from None
    if not isinstance(out, dict):
        raise MetricsHookError(f"metrics hook {name} returned a {type(out).__name__}; it must return a dict of "
                               "metric name -> float")
    logged = {}
    for key, value in out.items():
        if not isinstance(key, str) or not _NAME.match(key):
            raise MetricsHookError(f"metrics hook {name} returned the name {key!r}; names are plain strings "
                                   "(letters, digits, _ @ . -) starting with a letter")
        if key in reserved or f"eval_{key}" in reserved:
            raise MetricsHookError(f"metrics hook {name} returned {key!r}, a name fastrft's own evaluation "
                                   "logs; rename it")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise MetricsHookError(f"metrics hook {name} returned {key}={value!r}; every value must be a finite "
                                   "number")
        logged[f"eval_{key}"] = float(value)
    return logged
