"""Evaluation: Pass@1 on the training example(s) and on the held-out test set, greedy accuracy, Pass@k.

As in the paper, test Pass@1 is the accuracy of ONE temperature-1.0 sample per test problem; train
Pass@1 averages several samples of each training example (one sample of one example is too noisy to
plot). Greedy accuracy is reported beside them because it separates "the mode moved" from "the
distribution sharpened".
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from math import comb
from pathlib import Path
from typing import Any

from fastrft import rewards
from fastrft.data import Example
from fastrft.errors import ConfigError
from fastrft.report.records import write_json


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k from n samples of which c are correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k).

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 4), pass_at_k(4, 0, 2)
    (0.25, 1.0, 0.0)
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


@dataclass(frozen=True)
class EvalSet:
    """Examples with their encoded prompts (the same token ids the trainer trains on)."""

    examples: list[Example]
    prompt_ids: list[list[int]]


def _score(name_or_none: str | None, example: Example, text: str) -> float:
    return rewards.score(name_or_none or example.reward, text, example.answer)


def evaluate(engine, train: EvalSet, test: EvalSet, *, train_samples: int, temperature: float,
             max_new_tokens: int, greedy: bool, seed: int, extra_rewards: tuple[str, ...] = (),
             progress=None) -> dict[str, float]:
    """Run one evaluation through ``engine`` (a :class:`fastrft.engine.Engine` with a tokenizer); returns a
    flat dict of metrics (floats), e.g. train_pass1, test_pass1, test_greedy, train_pass@k for k in
    1, 2, 4, ... <= train_samples, and <metric>_<reward> for each extra reward. ``progress`` is called
    with the number of sequences finished after every engine step (:func:`eval_sequences` in all)."""
    gen = dict(max_new_tokens=max_new_tokens, progress=progress)
    generate = engine.generate
    out: dict[str, float] = {}
    names: tuple[str | None, ...] = (None, *extra_rewards)

    train_groups = generate(train.prompt_ids, n=train_samples, temperature=temperature, seed=seed, **gen)
    for name in names:
        suffix = f"_{name}" if name else ""
        correct = [[_score(name, ex, c.text) for c in group] for ex, group in zip(train.examples, train_groups)]
        out[f"train_pass1{suffix}"] = _mean([x for row in correct for x in row])
        if name is None:
            k = 2
            while k <= train_samples:
                out[f"train_pass@{k}"] = _mean([pass_at_k(len(r), int(sum(r)), k) for r in correct])
                k *= 2
    out["train_response_len"] = _mean([len(c.token_ids) for g in train_groups for c in g])

    if test.examples:
        sampled = [g[0] for g in generate(test.prompt_ids, n=1, temperature=temperature, seed=seed + 1, **gen)]
        for name in names:
            suffix = f"_{name}" if name else ""
            out[f"test_pass1{suffix}"] = _mean([_score(name, ex, c.text) for ex, c in zip(test.examples, sampled)])
        out["test_response_len"] = _mean([len(c.token_ids) for c in sampled])
        if greedy:
            greedy_out = [g[0] for g in generate(test.prompt_ids, n=1, temperature=0.0, **gen)]
            out["test_greedy"] = _mean([_score(None, ex, c.text) for ex, c in zip(test.examples, greedy_out)])
    return out


def eval_sequences(train: EvalSet, test: EvalSet, *, train_samples: int, greedy: bool) -> int:
    """How many sequences one :func:`evaluate` call generates (the total of its progress bar)."""
    return len(train.examples) * train_samples + len(test.examples) * (2 if greedy else 1)


class BaseEvalCache:
    """Round-0 evaluations shared between the runs of a study, in one JSON file.

    Before its first update a run's policy is the base model, so its round-0 evaluation depends only on
    what :func:`base_eval_key` hashes: the model, the engine, the evaluation settings, the evaluation seed
    and the exact prompts. Presets that differ in a training choice (advantage, reward, G) share it; a
    ladder of five presets evaluates each seed's base model once instead of up to five times. Entries are
    ``{key hash: {"result": metrics, "run": the run that measured it}}``; the file is rewritten atomically,
    and writers from several processes add to it under a lock (:func:`fastrft.report.records.locked`).
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise TypeError(f"expected an object, found {type(data).__name__}")
            return data
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{self.path}: not a base-evaluation cache written by fastrft ({e}); delete it to "
                             "measure the round-0 evaluations again") from None

    def get(self, key: str) -> dict[str, Any] | None:
        entry = self._read().get(key)
        if entry is not None and not (isinstance(entry, dict) and isinstance(entry.get("result"), dict)
                                      and isinstance(entry.get("run"), str)):
            raise ConfigError(f"{self.path}: entry {key[:12]}... is not a {{'result': {{...}}, 'run': '...'}} record; "
                              "delete the file to measure the round-0 evaluations again")
        return entry

    def put(self, key: str, result: dict[str, float], run: str) -> None:
        """Add ``run``'s measurement of ``key``. The file is re-read under a lock (``fastrft ladder --jobs``
        runs write it from several processes), so no other run's entry is lost. When another run stored
        the same key meanwhile, its entry is kept: runs may already have recorded it as ``shared_from``."""
        from fastrft.report.records import locked

        with locked(self.path):
            data = self._read()
            data.setdefault(key, {"result": result, "run": run})
            write_json(self.path, data)


def base_eval_key(settings: dict[str, Any], train: EvalSet, test: EvalSet) -> str:
    """A hash of everything a base model's evaluation depends on: ``settings`` (model, engine, evaluation
    and seed fields, versions) and the evaluated problems with their exact prompt token ids."""
    sets = {name: [[ex.id, ex.answer, ex.reward, ids] for ex, ids in zip(s.examples, s.prompt_ids)]
            for name, s in (("train", train), ("test", test))}
    blob = json.dumps({"settings": settings, "sets": sets}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else 0.0
