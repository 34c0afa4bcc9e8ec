"""One round of reinforcement fine-tuning, as a list of stage calls (docs/architecture.md, "The round").

examples for the round -> rollouts -> scores and advantages -> sample records -> update -> round metrics.

Each stage is a module of this package and hands the next a dataclass (fastrft.loop.types). What a
round changes in the run state is explicit here: the window baseline's reward history (scoring), the
optimizer step count (update) and the count of rounds skipped for want of a gradient signal. A round
whose advantages are all zero, with KL and entropy off, carries no gradient and skips the update.
Evaluation, checkpoints and stop requests happen between rounds (fastrft.loop.run).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from fastrft.config import TrainConfig
from fastrft.loop.data import TrainingData
from fastrft.loop.learner import Learner
from fastrft.loop.metrics import prompt_records, rollout_metrics, timings
from fastrft.loop.scoring import score
from fastrft.loop.types import Rollouts, RunState, Scores, TrainBatch
from fastrft.rewards.calling import Progress
from fastrft.rewards.funcs import RewardFunc


@dataclass(frozen=True)
class Stages:
    """What a round calls into (fastrft.trainer.Trainer builds it once)."""

    cfg: TrainConfig
    data: TrainingData
    sample: Callable[[int, list[list[int]]], Rollouts]  # (round, prompt ids) -> rollouts (loop.rollout.Sampler)
    learner: Learner
    reward_funcs: list[RewardFunc] = field(default_factory=list)  # --reward-funcs (fastrft.rewards.funcs)


def train_round(s: Stages, state: RunState, r: int, recorder) -> dict[str, Any]:
    """Run round ``r``; return its metrics record (the caller writes it). ``recorder``: where the round's
    sample records go (fastrft.loop.recorder.Recorder, or NullRecorder)."""
    t0 = time.monotonic()
    batch = s.data.for_round(r)
    rollouts = s.sample(r, batch.prompt_ids)
    t1 = time.monotonic()
    progress = position(s.cfg, state, r)
    scores = score(batch, rollouts, s.cfg.algo, state.history, s.reward_funcs, progress)
    t2 = time.monotonic()
    recorder.rollouts(batch, rollouts, scores, progress.extra)
    recorder.prompts(prompt_records(batch, rollouts, scores))
    metrics = rollout_metrics(batch, rollouts, scores)
    if _carries_gradient(s.cfg, scores):
        update = s.learner.update(r, TrainBatch.of(batch, rollouts, scores), first_update=state.updates)
        state.updates += update.optimizer_steps
        metrics.update(update.record, skipped=0, skipped_total=state.skipped)
    else:
        state.skipped += 1
        metrics.update(skipped=1, skipped_total=state.skipped, time_fwd_bwd=0.0, time_optim=0.0)
    metrics.update(timings(metrics, t1 - t0, t2 - t1, time.monotonic() - t2))
    metrics.update(logged_metrics(progress, metrics))  # last: a name the record has is prefixed, not lost
    return metrics


def position(cfg: TrainConfig, state: RunState, r: int) -> Progress:
    """Round ``r``'s place in the run, as reward functions see it (their ``trainer_state``)."""
    return Progress(global_step=state.updates, max_steps=max_steps(cfg), epoch=(r - 1) / max(cfg.run.rounds, 1),
                    **reward_view(cfg))


def max_steps(cfg: TrainConfig) -> int:
    """The optimizer steps of a run without skipped rounds (TRL's ``max_steps``)."""
    return cfg.run.rounds * cfg.algo.ppo_epochs * cfg.algo.mini_batches


def reward_view(cfg: TrainConfig) -> dict[str, Any]:
    """How the reward functions see the data (the fields of Progress that the config sets)."""
    from fastrft.data.prompts import prompt_messages

    d = cfg.data
    return dict(answer_column=d.answer_column, prompt_column=d.prompt_column, format=d.reward_format,
                messages=lambda ex: prompt_messages(ex, d.dataset, template=d.prompt_template, system=d.system_prompt))


def logged_metrics(progress: Progress, metrics: dict[str, Any]) -> dict[str, float]:
    """What the reward functions logged with ``log_metric``, averaged over the round's finite values (a
    name with none is left out); a name that a record field already has is prefixed ``reward_``."""
    out = {}
    for k, values in progress.metrics.items():
        finite = [v for v in values if math.isfinite(v)]
        if finite:
            out[k if k not in metrics else f"reward_{k}"] = sum(finite) / len(finite)
    return out


def _carries_gradient(cfg: TrainConfig, scores: Scores) -> bool:
    spec = cfg.loss_spec
    return scores.has_signal or not cfg.algo.skip_zero_signal or spec.needs_ref or spec.needs_entropy
