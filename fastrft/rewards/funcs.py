"""Several reward functions with weights, the way TRL's GRPOTrainer takes them (``reward_funcs``,
``reward_weights``): the training reward of a response is the weighted sum of the functions' values.

A function is given as a registered name, as ``"module.path:function"``, or (from Python) as the
function itself, and has one of two signatures:

- ``f(response: str, answer: str) -> float``: fastrft's own, called once per response;
- ``f(completions: list[str], **kwargs) -> list[float | None]``: TRL's batched one, called once per
  round with ``completions`` (the responses), ``prompts`` (each example's question), ``answer`` (the
  reference answers) and every other column of the examples (``Example.meta``), each a list in the
  order of the completions. ``None`` means "does not apply" and adds nothing.

Any finite float is allowed (not only [0, 1]); a value that is not one stops the round with an error
naming the function. Each function's mean is logged per round as ``reward_<name>_mean``.
"""

from __future__ import annotations

import inspect
import math
import numbers
import reprlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from fastrft.errors import ConfigError, FastRFTError
from fastrft.rewards import custom
from fastrft.rewards.registry import names, registered

#: How a function given from Python is recorded in config.json when it cannot be imported by name.
PYTHON = "python:"


@dataclass(frozen=True)
class RewardFunc:
    name: str  # the metrics key: reward_<name>_mean
    spec: str  # as config.json records it
    fn: Callable[..., Any]
    weight: float
    batched: bool


def spec_of(fn: Callable[..., Any]) -> str:
    """``module:qualname`` when that imports back to ``fn``, else ``python:<qualname>``."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if module and qualname and "<" not in qualname:
        try:
            if custom.load_any(f"{module}:{qualname}") is fn:
                return f"{module}:{qualname}"
        except ConfigError:
            pass
    return PYTHON + (qualname or type(fn).__name__)


def _is_batched(fn: Callable[..., Any]) -> bool:
    try:
        return "completions" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def load(spec: str) -> Callable[..., Any]:
    """The function a spec names (see the module docstring); ConfigError saying what to change."""
    if spec.startswith(PYTHON):
        raise ConfigError(f"reward function {spec!r} was passed from Python and cannot be imported by name: pass it "
                          "again as Trainer(config, reward_funcs=[...]), or name it 'module.path:function'")
    fn = registered(spec)
    if fn is not None:
        return fn
    if custom.is_custom(spec):
        return custom.load_any(spec)
    raise ConfigError(f"unknown reward function {spec!r}; choose one of: {', '.join(names())}, or write "
                      f"'module.path:function'")


def resolve(specs: Sequence[str], weights: Sequence[float],
            given: Sequence[Callable[..., Any]] | None = None) -> list[RewardFunc]:
    """The configured functions (``given``: the callables passed from Python, in the order of ``specs``)."""
    weights = list(weights) or [1.0] * len(specs)
    fns = list(given) if given is not None else [load(s) for s in specs]
    out, seen = [], set()
    for spec, fn, w in zip(specs, fns, weights):
        name = spec.split(":")[-1].split(".")[-1]
        while name in seen:
            name += "_"
        seen.add(name)
        out.append(RewardFunc(name, spec, fn, float(w), _is_batched(fn)))
    return out


def score(funcs: list[RewardFunc], completions: list[str], examples: list) -> tuple[list[float], dict[str, list]]:
    """(weighted totals per completion, each function's values by name); ``examples[i]`` is completion i's."""
    columns: dict[str, list[Any]] = {"prompts": [ex.question for ex in examples],
                                     "answer": [ex.answer for ex in examples]}
    for key in sorted({k for ex in examples for k in ex.meta}):
        columns.setdefault(key, [ex.meta.get(key) for ex in examples])
    totals = [0.0] * len(completions)
    values: dict[str, list] = {}
    for f in funcs:
        if f.batched:
            got = f.fn(completions=list(completions), **columns)
            if not isinstance(got, (list, tuple)) or len(got) != len(completions):
                raise FastRFTError(f"reward function {f.spec!r} returned {reprlib.repr(got)}; a batched reward must "
                                   f"return a list of {len(completions)} floats (or None), one per completion")
        else:
            got = [f.fn(c, ex.answer) for c, ex in zip(completions, examples)]
        for i, v in enumerate(got):
            if v is None:
                continue
            if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v):
                raise FastRFTError(f"reward function {f.spec!r} returned {reprlib.repr(v)} for completion {i} "
                                   f"({reprlib.repr(completions[i])}); a reward must be a finite float (or None)")
            totals[i] += f.weight * float(v)
        values[f.name] = [None if v is None else float(v) for v in got]
    return totals, values
