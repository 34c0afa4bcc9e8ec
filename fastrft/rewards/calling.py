"""How a round calls TRL-style batched reward functions: the keyword arguments TRL's GRPOTrainer
passes, in its formats, and what happens when a function fails.

A batched function ``f(completions, **kwargs)`` is called once per batch with, each a list in the order
of the completions (as TRL does):

- ``completions``: plain strings; for a *conversational* dataset (its prompt column holds lists of
  ``{"role", "content"}`` messages), ``[{"role": "assistant", "content": text}]`` per completion, as
  TRL decides; ``--reward-format text | messages`` forces one format for any dataset;
- ``prompts``: the prompt column as the dataset holds it (a string, or the list of messages, with the
  ``--system-prompt`` turn first when one is given; with ``--reward-format messages``, the messages the
  prompt was rendered from);
- ``completion_ids``: the completion's token ids (``list[int]``);
- the reference answer, under the answer column's name (``--answer-column``; also as ``answer``), and
  every other column of the dataset under its own name;
- ``trainer_state``: a ``transformers.TrainerState`` with ``global_step`` (optimizer steps taken so
  far), ``max_steps`` (``--rounds`` x the steps of a round) and ``epoch`` (rounds done / ``--rounds``);
- ``log_metric(name, value)``: adds a scalar to the round's record (averaged over the round's calls);
- ``log_extra(column, values)``: adds a column to the round's samples in rollouts.jsonl.

A function without ``**kwargs`` receives only the arguments it names; one that names an argument no
run provides is refused before anything loads (:func:`check_arguments`), and one that names a column
the dataset lacks, when the data is loaded. A coroutine function is run to completion.

A function that raises stops the batch with one line (:class:`RewardError`): the function, the
exception and where it was raised, and the completion it was scoring (found by calling it on each of
the first RETRIES completions alone when it was called on a batch), cut short.
"""

from __future__ import annotations

import asyncio
import inspect
import reprlib
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from fastrft.errors import ConfigError, FastRFTError

#: How many completions of a failed batch are tried alone to find the one that fails.
RETRIES = 16

#: What every run passes to a batched reward function, besides the dataset's columns.
PROVIDED = ("completions", "prompts", "completion_ids", "trainer_state", "log_metric", "log_extra", "answer")

#: The columns of the builtin datasets (besides the answer), known before their files are read.
BUILTIN_COLUMNS = {"gsm8k": ("solution",), "math": ("level", "type"), "arithmetic": ("level",)}


class RewardError(FastRFTError):
    """A reward function raised, or returned something that is not a reward."""


@dataclass
class Progress:
    """Where the run is, for ``trainer_state``; and what the functions logged this round."""

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0
    answer_column: str = "answer"
    prompt_column: str = "prompt"
    format: str = "auto"  # --reward-format: auto | text | messages
    messages: Callable[[Any], list] | None = None  # an example's prompt as chat messages (format "messages")
    metrics: dict[str, list[float]] = field(default_factory=dict)  # log_metric
    extra: dict[str, list[Any]] = field(default_factory=dict)  # log_extra

    def trainer_state(self):
        try:
            from transformers import TrainerState
        except ImportError:  # transformers is a dependency; this only keeps the module importable without it
            from types import SimpleNamespace as TrainerState  # type: ignore[assignment]
        return TrainerState(global_step=self.global_step, max_steps=self.max_steps, epoch=self.epoch,
                            num_train_epochs=1)

    def log_metric(self, name: str, value: float) -> None:
        self.metrics.setdefault(str(name), []).append(float(value))

    def log_extra(self, column: str, values: list) -> None:
        self.extra.setdefault(str(column), []).extend(values)


#: Parameter names only TRL's batched form has.
BATCHED_NAMES = ("completions", "completion_ids", "prompts", "trainer_state")


def is_batched(fn: Callable[..., Any]) -> bool:
    """TRL's batched form: a function that names one of its arguments, or takes only ``**kwargs`` besides
    optional ones. fastrft's ``f(response, answer)`` (with or without ``**kwargs``) is not."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    params = list(params)
    if any(p.name in BATCHED_NAMES for p in params):
        return True
    # **kwargs and nothing required besides: TRL's form (f(response, answer, **kw) stays fastrft's own)
    required = [p for p in params if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return any(p.kind is p.VAR_KEYWORD for p in params) and not required


def parameters(fn: Callable[..., Any]) -> tuple[list[str], bool] | None:
    """(the names ``fn`` requires, whether it takes ``**kwargs``); None when it has no signature."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    required = [p.name for p in params if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    positional_only = [p.name for p in params if p.kind is p.POSITIONAL_ONLY]
    if positional_only:
        return positional_only + ["/"], False  # "/" marks them: keyword arguments cannot fill them
    return required, any(p.kind is p.VAR_KEYWORD for p in params)


def check_arguments(spec: str, fn: Callable[..., Any], columns: set[str] | None, answer_column: str,
                    where: str, prompt_column: str = "prompt") -> None:
    """Refuse a batched function that requires an argument no run passes. ``columns``: the dataset's
    columns when known (None: a dataset whose columns are read later; only the fixed names are checked)."""
    got = parameters(fn)
    if got is None:
        return
    required, _ = got
    if "/" in required:
        raise ConfigError(f"reward function {spec!r}: its parameter(s) {', '.join(required[:-1])} are positional-only; "
                          f"a batched reward is called with keyword arguments ({', '.join(PROVIDED)}, and the "
                          "dataset's columns), so drop the '/'")
    known = set(PROVIDED) | {answer_column} | ({prompt_column} - {"prompt"})
    for name in required:
        if name in known or (columns is None and name not in ("completion", "prompt")):
            continue
        if columns is not None and name in columns:
            continue
        have = sorted(known | (columns or set()))
        raise ConfigError(f"reward function {spec!r} requires the argument {name!r}, which {where} does not "
                          f"provide; a batched reward receives {', '.join(have)}: rename the parameter, give it a "
                          "default, or add the column to the dataset")


def conversational(examples) -> bool:
    """Whether the dataset's prompts are conversations (TRL then passes completions as messages)."""
    return any("prompt_messages" in ex.meta for ex in examples)


def batched_kwargs(completions: list[str], examples, completion_ids, progress: Progress) -> dict[str, Any]:
    """The keyword arguments of one batched call (module docstring)."""
    chat = progress.format == "messages" or (progress.format == "auto" and conversational(examples))
    kwargs: dict[str, Any] = {
        "prompts": [_messages(ex, progress) if chat else ex.question for ex in examples],
        "completions": [[{"role": "assistant", "content": c}] for c in completions] if chat else list(completions),
        "completion_ids": [list(ids) for ids in completion_ids] if completion_ids is not None else
        [[] for _ in completions],
    }
    for key in sorted({k for ex in examples for k in ex.meta} - {"prompt_messages"}):
        kwargs.setdefault(key, [ex.meta.get(key) for ex in examples])
    if progress.prompt_column != "prompt":  # TRL passes every column but "prompt" under its own name
        kwargs.setdefault(progress.prompt_column, kwargs["prompts"])
    answers = [ex.answer for ex in examples]
    kwargs.setdefault(progress.answer_column, answers)
    kwargs.setdefault("answer", answers)
    kwargs.update(trainer_state=progress.trainer_state(), log_metric=progress.log_metric,
                  log_extra=progress.log_extra)
    return kwargs


def _messages(example, progress: Progress) -> list[dict[str, str]]:
    if progress.messages is not None:
        return progress.messages(example)
    if "prompt_messages" in example.meta:
        return [dict(m) for m in example.meta["prompt_messages"]]
    return [{"role": "user", "content": example.question}]


def call_batched(spec: str, fn: Callable[..., Any], kwargs: dict[str, Any], n: int) -> Any:
    """``fn`` on one batch of ``n`` completions; a failure raises RewardError naming the completion."""
    got = parameters(fn)
    if got is not None and not got[1]:  # no **kwargs: only what it names
        names = set(inspect.signature(fn).parameters)
        kwargs = {k: v for k, v in kwargs.items() if k in names}
    try:
        return _run(fn, kwargs)
    except Exception as e:  # noqa: BLE001 - the user's code: any exception becomes one line
        failed = e
    index = None
    # Which completion: the first that fails alone, among the first RETRIES (a judge that timed out would
    # otherwise time out once per completion before the error is shown); not for coroutines.
    if n > 1 and not inspect.iscoroutinefunction(fn):
        for i in range(min(n, RETRIES)):
            one = {k: v[i:i + 1] if isinstance(v, list) and len(v) == n else v for k, v in kwargs.items()}
            try:
                _run(fn, one)
            except Exception as e:  # noqa: BLE001
                index, failed = i, e
                break
    texts = kwargs.get("completions") or []
    where = index if n > 1 else 0
    message = describe_failure(spec, failed, where, _text(texts, where), n,
                               tried=min(n, RETRIES) if n > 1 and not inspect.iscoroutinefunction(fn) else 0)
    if isinstance(failed, TypeError) and texts and isinstance(texts[0], str) and "indices must be" in str(failed):
        message += ("; completions are strings here (the dataset's prompts are not conversations): for a function "
                    "that reads completion[0]['content'], pass --reward-format messages")
    raise RewardError(message)


def call_single(spec: str, fn: Callable[..., Any], text: str, answer: str, index: int, n: int) -> Any:
    try:
        return fn(text, answer)
    except Exception as e:  # noqa: BLE001
        raise RewardError(describe_failure(spec, e, index, text, n)) from None


def describe_failure(spec: str, e: BaseException, index: int | None, text: str | None, n: int,
                     tried: int = 0) -> str:
    """One line: the function, the exception and where it was raised, and the completion it scored
    (``tried``: how many completions were tried alone to find it)."""
    here = Path(__file__).resolve().parent.parent  # the fastrft package: the call site is not the place
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not Path(f.filename).resolve().is_relative_to(here)]
    at = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    message = (str(e).splitlines() or [""])[0]
    message = message if len(message) <= 160 else message[:157] + "..."
    if text is None:
        alone = ("; each alone scores fine" if tried == n else f"; the first {tried} alone score fine" if tried
                 else "")
        what = f"a batch of {n} completions{alone}"
    elif index is None:
        what = f"the response {_short(text)}"
    else:
        what = f"completion {index + 1} of {n} ({_short(text)})"
    return (f"reward function {spec!r} raised {type(e).__name__}: {message}{at}, scoring {what}; fix the function "
            "and rerun the same command (the run continues from what it recorded)")


def _run(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    out = fn(**kwargs)
    if not inspect.isawaitable(out):
        return out
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no loop here (the command line): run it on a fresh one
        return asyncio.run(_await(out))
    # Called from inside a running loop (a notebook): that loop cannot be blocked on, so the coroutine
    # runs to completion on a loop of its own in a worker thread, as TRL runs its async rewards.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, _await(out)).result()


async def _await(awaitable):
    return await awaitable


def _text(completions: list, index: int | None) -> str | None:
    if index is None or index >= len(completions):
        return None
    c = completions[index]
    return c[0]["content"] if isinstance(c, list) and c and isinstance(c[0], dict) else str(c)


def _short(text: str) -> str:
    r = reprlib.Repr()
    r.maxstring = 80
    return r.repr(text)


_WARNED: set[str] = set()
_QUIET = [0]


def warn_once(key: str, message: str) -> None:
    """Print ``message`` on stderr the first time ``key`` is seen in this process (not inside quiet())."""
    if key not in _WARNED and not _QUIET[0]:
        _WARNED.add(key)
        print(f"fastrft: warning: {message}", file=sys.stderr)


@contextmanager
def quiet() -> Iterator[None]:
    """No warnings meanwhile: the probe call before a run says nothing about the run's rewards."""
    _QUIET[0] += 1
    try:
        yield
    finally:
        _QUIET[0] -= 1
