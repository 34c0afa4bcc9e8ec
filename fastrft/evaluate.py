"""Evaluation: Pass@1 on the training example(s) and on the held-out test set, greedy accuracy, pass@k and
maj@k, each with its 95% interval, and one record per problem that every number is computed from.

As in the paper, test Pass@1 is the accuracy of temperature-1.0 samples of each test problem (one by
default; ``--eval-k`` draws max(k)); train Pass@1 averages several samples of each training example (one
sample of one example is too noisy to plot). Greedy accuracy is reported beside them because it separates
"the mode moved" from "the distribution sharpened".

Each evaluation writes one record per problem (:func:`problem_record`; ``problems.jsonl`` in the run
directory) and derives its metrics from those records alone (:func:`summarize`), so an analysis can be
rebuilt from them. The estimators and intervals are fastrft.report.stats'.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastrft import rewards
from fastrft.data import Example
from fastrft.errors import ConfigError
from fastrft.report.records import write_json
from fastrft.report.stats import maj_at_k, pass_at_k, wilson
from fastrft.rewards.answers import answer_key, has_key

#: the fields of an evaluation's record that are not metrics (fastrft.loop.evaluator)
RECORD_KEYS = frozenset({"kind", "round", "time_eval", "shared_from"})

@dataclass(frozen=True)
class EvalSet:
    """Examples with their encoded prompts (the same token ids the trainer trains on)."""

    examples: list[Example]
    prompt_ids: list[list[int]]


def _score(name_or_none: str | None, example: Example, text: str) -> float:
    return rewards.score(name_or_none or example.reward, text, example.answer)


def problem_record(split: str, example: Example, group, extra_rewards: tuple[str, ...] = ()) -> dict[str, Any]:
    """One problem's record from its samples (``group``: the engine's completions): ``n`` samples, ``correct``
    (scored 1), every sample's score (``scores``, and ``scores_<reward>`` per extra reward), the parsed final
    answers' counts and which of them are correct (``answers``, ``correct_answers``: for maj@k, when the
    reward parses answers), the response tokens in all (``tokens``) and per sample (``mean_len``), and how
    many responses hit the token budget (``truncated``)."""
    scores = [_score(None, example, c.text) for c in group]
    rec: dict[str, Any] = {"split": split, "id": example.id, "n": len(group),
                           "correct": sum(s == 1.0 for s in scores), "scores": scores}
    for name in extra_rewards:
        rec[f"scores_{name}"] = [_score(name, example, c.text) for c in group]
    if has_key(example.reward):
        answers: dict[str, int] = {}
        right: set[str] = set()
        for c, s in zip(group, scores):
            key = answer_key(example.reward, c.text)
            if key is not None:
                answers[key] = answers.get(key, 0) + 1
                if s == 1.0:
                    right.add(key)
        rec["answers"], rec["correct_answers"] = answers, sorted(right)
    tokens = sum(len(c.token_ids) for c in group)
    rec.update(tokens=tokens, mean_len=tokens / len(group) if group else 0.0,
               truncated=sum(c.finish_reason == "length" for c in group))
    return rec


def evaluate(engine, train: EvalSet, test: EvalSet, *, train_samples: int, temperature: float,
             max_new_tokens: int, greedy: bool, seed: int, extra_rewards: tuple[str, ...] = (),
             test_samples: int = 1, eval_k: tuple[int, ...] = (1,), hook=None,
             progress=None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Run one evaluation through ``engine`` (a :class:`fastrft.engine.Engine` with a tokenizer); returns
    (metrics, records): the flat dict of :func:`summarize` and one :func:`problem_record` per problem (the
    training examples, then the test problems). ``hook``: (name, function) of the metrics hook
    (fastrft.metrics_hook), given the test samples; its ``eval_<name>`` metrics join the dict.
    ``progress`` is called with the number of sequences finished after every engine step
    (:func:`eval_sequences` in all)."""
    gen = dict(max_new_tokens=max_new_tokens, progress=progress)
    generate = engine.generate
    train_groups = generate(train.prompt_ids, n=train_samples, temperature=temperature, seed=seed, **gen)
    records = [problem_record("train", ex, g, extra_rewards) for ex, g in zip(train.examples, train_groups)]
    if test.examples:
        sampled = generate(test.prompt_ids, n=test_samples, temperature=temperature, seed=seed + 1, **gen)
        greedy_out = [g[0] for g in generate(test.prompt_ids, n=1, temperature=0.0, **gen)] if greedy else None
        for i, (ex, group) in enumerate(zip(test.examples, sampled)):
            rec = problem_record("test", ex, group, extra_rewards)
            if greedy_out is not None:
                rec["greedy"] = _score(None, ex, greedy_out[i].text)
            records.append(rec)
    metrics = summarize(records, eval_k=eval_k)
    if hook is not None and test.examples:
        from fastrft import metrics_hook

        texts = [[c.text for c in group] for group in sampled]
        metrics.update(metrics_hook.call(hook[0], hook[1], test.examples, texts, reserved=set(metrics) | RECORD_KEYS))
    return metrics, records


def summarize(records: list[dict[str, Any]], eval_k: tuple[int, ...] = (1,)) -> dict[str, float]:
    """An evaluation's metrics from its problem records alone: ``train_pass1`` and ``test_pass1`` (the mean
    score of all samples), ``test_greedy``, ``train_pass@k`` for k = 2, 4, ... up to the train samples,
    ``test_pass@k`` and ``test_maj@k`` (where answers were parsed) for each k > 1 of ``eval_k``,
    ``<metric>_<reward>`` per extra reward, the mean response length and the truncation rate of each split,
    and a 95% interval (``<metric>_lo``, ``<metric>_hi``; fastrft.report.stats) beside each Pass@1, greedy,
    test pass@k and maj@k metric."""
    out: dict[str, float] = {}
    problems: dict[str, int] = {}  # metric -> the number of problems its interval is over
    for split in ("train", "test"):
        recs = [r for r in records if r["split"] == split]
        if not recs:
            continue
        extra = sorted(k[len("scores_"):] for k in recs[0] if k.startswith("scores_"))
        for name in (None, *extra):
            field, suffix = (f"scores_{name}", f"_{name}") if name else ("scores", "")
            out[f"{split}_pass1{suffix}"] = _mean(x for r in recs for x in r[field])
        problems[f"{split}_pass1"] = len(recs)
        if split == "train":
            k, n = 2, min(r["n"] for r in recs)
            while k <= n:
                out[f"train_pass@{k}"] = _mean(pass_at_k(r["n"], int(sum(r["scores"])), k) for r in recs)
                k *= 2
        else:
            for k in eval_k:
                if k > 1:
                    out[f"test_pass@{k}"] = _mean(pass_at_k(r["n"], r["correct"], k) for r in recs)
                    problems[f"test_pass@{k}"] = len(recs)
                if k > 1 and all("answers" in r for r in recs):  # maj@1 is Pass@1: one vote
                    out[f"test_maj@{k}"] = _mean(maj_at_k(r["answers"], set(r["correct_answers"]), r["n"], k)
                                                 for r in recs)
                    problems[f"test_maj@{k}"] = len(recs)
            if all("greedy" in r for r in recs):
                out["test_greedy"] = _mean(r["greedy"] for r in recs)
                problems["test_greedy"] = len(recs)
        samples = sum(r["n"] for r in recs)
        out[f"{split}_response_len"] = sum(r["tokens"] for r in recs) / samples
        out[f"{split}_truncated"] = sum(r["truncated"] for r in recs) / samples
    for key, count in problems.items():
        out[f"{key}_lo"], out[f"{key}_hi"] = wilson(out[key], count)
    return out


def eval_sequences(train: EvalSet, test: EvalSet, *, train_samples: int, greedy: bool, test_samples: int = 1) -> int:
    """How many sequences one :func:`evaluate` call generates (the total of its progress bar)."""
    return len(train.examples) * train_samples + len(test.examples) * (test_samples + (1 if greedy else 0))


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
        """The entry for ``key`` (``result``, ``run``, ``problems``), or None. An entry written before the
        per-problem records existed has none to share, so it is measured again."""
        entry = self._read().get(key)
        if entry is not None and not (isinstance(entry, dict) and isinstance(entry.get("result"), dict)
                                      and isinstance(entry.get("run"), str)):
            raise ConfigError(f"{self.path}: entry {key[:12]}... is not a {{'result': {{...}}, 'run': '...'}} record; "
                              "delete the file to measure the round-0 evaluations again")
        if entry is not None and not isinstance(entry.get("problems"), list):
            return None
        return entry

    def put(self, key: str, result: dict[str, float], run: str, problems: list[dict[str, Any]]) -> None:
        """Add ``run``'s measurement of ``key`` with its problem records. The file is re-read under a lock
        (``fastrft ladder --jobs`` runs write it from several processes), so no other run's entry is lost.
        When another run stored the same key meanwhile, its entry is kept: runs may already have recorded it
        as ``shared_from``."""
        from fastrft.report.records import locked

        with locked(self.path):
            data = self._read()
            if not isinstance(data.get(key, {}).get("problems"), list):
                data[key] = {"result": result, "run": run, "problems": problems}
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
