"""Evaluation: Pass@1 on the training example(s) and on the held-out test set, greedy accuracy, Pass@k.

As in the paper, test Pass@1 is the accuracy of ONE temperature-1.0 sample per test problem; train
Pass@1 averages several samples of each training example (one sample of one example is too noisy to
plot). Greedy accuracy is reported beside them because it separates "the mode moved" from "the
distribution sharpened".
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

from fastrft import rewards
from fastrft.data import Example


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
             max_new_tokens: int, greedy: bool, seed: int, extra_rewards: tuple[str, ...] = ()) -> dict[str, float]:
    """Run one evaluation through ``engine`` (a :class:`fastrft.engine.Engine` with a tokenizer); returns a
    flat dict of metrics (floats), e.g. train_pass1, test_pass1, test_greedy, train_pass@k for k in
    1, 2, 4, ... <= train_samples, and <metric>_<reward> for each extra reward."""
    gen = dict(max_new_tokens=max_new_tokens)
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


def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else 0.0
