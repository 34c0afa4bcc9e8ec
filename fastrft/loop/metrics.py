"""Stage: a round's metrics record (metrics.jsonl, kind "round"), and its line on the progress bar.

The record's fields, in order: what was sampled and how it scored (this module), then the update's
statistics (fastrft.loop.learner) or the skip counters, then the stage timings (fastrft.loop.round).
"""

from __future__ import annotations

import math
from typing import Any

from fastrft.loop.types import Rollouts, RoundBatch, Scores


def rollout_metrics(batch: RoundBatch, rollouts: Rollouts, scores: Scores) -> dict[str, Any]:
    """What the round sampled and how it scored."""
    adv = scores.flat_advantages
    completions = rollouts.completions
    metrics: dict[str, Any] = {
        "kind": "round", "round": batch.round, "examples": [x.id for x in batch.examples],
        "reward_mean": _mean(scores.rewards), "correct_mean": _mean(scores.correct),
        "advantage_mean": _mean(adv), "advantage_std": _std(adv), "advantage_abs_mean": _mean([abs(a) for a in adv]),
        "response_len_mean": _mean([len(c.token_ids) for c in completions]),
        "stop_frac": _mean([c.finish_reason == "stop" for c in completions]),
        "truncated_frac": _mean([c.finish_reason == "length" for c in completions]),
        "zero_signal_frac": _mean([all(a == 0 for a in group) for group in scores.advantages]),
        "rollout_tokens": rollouts.tokens, "extra_rollout_tokens": rollouts.extra_tokens,
    }
    for name, values in scores.by_function.items():  # --reward-funcs: each function's mean where it applied
        given = [v for v in values if v is not None]
        metrics[f"reward_{name}_mean"] = _mean(given) if given else math.nan  # none applied: NaN, as TRL logs
    if scores.baselines:  # window / extra_samples: the rewards the baseline was taken from
        metrics.update(baseline_mean=_mean([_mean(b) for b in scores.baselines]),
                       baseline_std=_mean([_std(b) for b in scores.baselines]))
    return metrics


def prompt_records(batch: RoundBatch, rollouts: Rollouts, scores: Scores) -> list[dict[str, Any]]:
    """One record per training prompt of the round (prompts.jsonl): its samples ``n``, how many scored 1
    (``correct``) and its ``pass_rate`` (the mean score), so a prompt's pass rate can be followed across
    rounds."""
    out, start = [], 0
    for ex, group in zip(batch.examples, rollouts.groups):
        got = scores.correct[start:start + len(group)]
        start += len(group)
        out.append({"round": batch.round, "id": ex.id, "n": len(group), "correct": sum(x == 1.0 for x in got),
                     "pass_rate": _mean(got)})
    return out


def timings(metrics: dict[str, Any], rollout_s: float, reward_s: float, update_s: float) -> dict[str, float]:
    """The round's stage times and throughputs (the wall-clock fields of its record)."""
    out = {"time_rollout": rollout_s, "time_reward": reward_s, "time_update": update_s,
           "rollout_tokens_per_s": (metrics["rollout_tokens"] + metrics["extra_rollout_tokens"]) / max(rollout_s, 1e-9)}
    if "train_tokens" in metrics:
        out["train_tokens_per_s"] = metrics["train_tokens"] / max(update_s, 1e-9)
    return out


def postfix(metrics: dict[str, Any], *, kl: bool) -> dict[str, str]:
    """The progress bar's per-round line: reward, then loss, KL and entropy of the update."""
    out = {"reward": f"{metrics['reward_mean']:.2f}"}
    if metrics.get("skipped"):
        out["loss"] = "skip"
    else:
        out["loss"] = f"{metrics['loss']:.4g}"
        if kl:
            out["kl"] = f"{metrics['kl_mean']:.3g}"
        out["entropy"] = f"{metrics['entropy_mean']:.3g}"
    out["skipped"] = str(metrics["skipped_total"])
    return out


def _mean(xs) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else 0.0


def _std(xs) -> float:
    xs = [float(x) for x in xs]
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5
