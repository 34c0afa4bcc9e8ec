"""Several reward functions with weights, the way TRL's GRPOTrainer takes them (``reward_funcs``,
``reward_weights``): the training reward of a response is the weighted sum of the functions' values.

A function is given as a registered name, as ``"module.path:function"``, or (from Python) as the
function itself, and has one of two signatures:

- ``f(response: str, answer: str) -> float``: fastrft's own, called once per response;
- ``f(completions, **kwargs) -> list[float | None]``: TRL's batched one, called once per batch with the
  arguments TRL passes (fastrft.rewards.calling): ``completions`` (strings, or one assistant message each
  for a conversational dataset), ``prompts``, ``completion_ids``, every column of the examples,
  ``trainer_state``, ``log_metric`` and ``log_extra``. ``None`` means "does not apply" and adds nothing.

Any finite number is allowed (not only [0, 1]; True/False count 1/0; a batched function may return a
numpy array or a tensor, as TRL accepts); a value that is not one, or an exception, stops the
round with one line naming the function and the completion. Each function's mean over the values it
gave is logged per round as ``reward_<name>_mean`` (NaN when it gave none, with a warning, as TRL).
"""

from __future__ import annotations

import math
import numbers
import reprlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from fastrft.errors import ConfigError
from fastrft.rewards import calling, custom
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
    """``module:qualname`` when that imports back to ``fn``, else ``python:<qualname>`` (a callable object:
    ``python:<its __name__>``, else its class name)."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if module and qualname and "<" not in qualname:
        try:
            if custom.load_any(f"{module}:{qualname}") is fn:
                return f"{module}:{qualname}"
        except ConfigError:
            pass
    # A callable object (TRL's factories return some) is named by its __name__, as TRL names it in logs.
    name = getattr(fn, "__name__", None) if qualname is None else qualname
    return PYTHON + (name if isinstance(name, str) and name else type(fn).__name__)


def _is_batched(fn: Callable[..., Any]) -> bool:
    return calling.is_batched(fn)


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


def check(spec: str, fn: Callable[..., Any], data, columns: set[str] | None = None) -> None:
    """Refuse a batched function that requires an argument the run cannot pass (``data``: the DataConfig;
    ``columns``: the loaded dataset's columns, when known; else the builtin datasets' known ones)."""
    if not _is_batched(fn):
        return
    where = f"dataset {data.dataset!r}"
    if columns is None and data.dataset in calling.BUILTIN_COLUMNS:
        columns = set(calling.BUILTIN_COLUMNS[data.dataset])
    calling.check_arguments(spec, fn, columns, data.answer_column, where, data.prompt_column)


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


def score(funcs: list[RewardFunc], completions: list[str], examples: list, completion_ids=None,
          progress: calling.Progress | None = None) -> tuple[list[float], dict[str, list]]:
    """(weighted totals per completion, each function's values by name); ``examples[i]`` is completion i's,
    ``completion_ids[i]`` its token ids. ``progress``: the run's position, and what the functions log
    (fastrft.rewards.calling). A value None adds nothing to the total (nansum, as TRL; a completion that
    no function scored is then left out of its group by fastrft.loop.scoring, as TRL leaves it out)."""
    progress = progress or calling.Progress()
    n = len(completions)
    totals = [0.0] * n
    values: dict[str, list] = {}
    kwargs = None
    for f in funcs:
        if f.batched:
            kwargs = kwargs or calling.batched_kwargs(completions, examples, completion_ids, progress)
            got = calling.call_batched(f.spec, f.fn, dict(kwargs), n)
            if hasattr(got, "tolist") and not isinstance(got, (list, tuple)):  # a numpy array or a tensor, as TRL takes
                got = got.tolist()
            if not isinstance(got, (list, tuple)) or len(got) != n:
                raise calling.RewardError(f"reward function {f.spec!r} returned {reprlib.repr(got)}; a batched reward "
                                          f"must return a list of {n} floats (or None), one per completion")
        else:
            got = [calling.call_single(f.spec, f.fn, c, ex.answer, i, n)
                   for i, (c, ex) in enumerate(zip(completions, examples))]
        got = [_scalar(f, v, i, completions) for i, v in enumerate(got)]  # 0-d tensors and the like
        for i, v in enumerate(got):
            if v is None:
                continue
            if not isinstance(v, numbers.Real) or not math.isfinite(v):  # True/False count 1/0, as in TRL
                raise calling.RewardError(f"reward function {f.spec!r} returned {reprlib.repr(v)} for completion "
                                          f"{i + 1} of {n} ({reprlib.repr(completions[i])}); a reward must be a "
                                          "finite float (or None)")
            totals[i] += f.weight * float(v)
        values[f.name] = [None if v is None else float(v) for v in got]
        if n and all(v is None for v in got):
            calling.warn_once(f"none:{f.spec}", f"reward function {f.spec!r} returned None for every completion it "
                              f"was given; its reward_{f.name}_mean is logged as NaN (null in metrics.jsonl), as "
                              "TRL does, and it adds nothing to the reward")
    if funcs and any(all(values[f.name][i] is None for f in funcs) for i in range(n)):
        calling.warn_once("none:all", "every reward function returned None for some completion; it is rewarded 0. "
                          "Make at least one function return a value for every completion")
    return totals, values


def _scalar(f: RewardFunc, v: Any, i: int, completions: list[str]) -> Any:
    """``v``, or the number a one-element array or tensor holds; anything else is refused in one line."""
    if v is None or isinstance(v, numbers.Real) or not hasattr(v, "item"):
        return v
    try:
        return v.item()
    except (ValueError, RuntimeError):
        raise calling.RewardError(f"reward function {f.spec!r} returned {reprlib.repr(v)} for completion {i + 1} of "
                                  f"{len(completions)} ({reprlib.repr(completions[i])}); a reward must be one number "
                                  "(or None)") from None
