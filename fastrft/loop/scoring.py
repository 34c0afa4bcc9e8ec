"""Stage: score a round's responses and turn the rewards into advantages.

The reward function of each example says whether a response is correct; that score is mapped onto
(reward_fail, reward_success), and the advantage estimator (fastrft.algo.ADVANTAGES) turns each group's
rewards into per-response advantages, against a baseline when the estimator has one:

- ``window``: the example's last ``window`` rewards over all rounds so far (this round's included). That
  history is run state (:class:`~fastrft.loop.types.RunState.history`): the caller passes it in and a
  checkpoint saves it;
- ``extra``: the rewards of the round's extra samples of the example (never trained on).

With --reward-funcs (fastrft.rewards.funcs) the reward is the weighted sum of those functions; the
correctness score is still measured, for the logs and Pass@1.
"""

from __future__ import annotations

import torch

from fastrft import rewards
from fastrft.algo import ADVANTAGES, group_advantages, map_reward
from fastrft.config import AlgoConfig
from fastrft.loop.types import Rollouts, RoundBatch, Scores
from fastrft.rewards import funcs as reward_funcs
from fastrft.rewards.calling import Progress
from fastrft.rewards.funcs import RewardFunc


def correct(example, completion, fail_truncated: bool) -> float:
    """The example's reward function on one response; a response cut off at max_new_tokens scores 0 when
    ``fail_truncated``."""
    if fail_truncated and completion.finish_reason == "length":
        return 0.0
    return rewards.score(example.reward, completion.text, example.answer)


def score(batch: RoundBatch, rollouts: Rollouts, algo: AlgoConfig, history: dict[str, list[float]],
          funcs: list[RewardFunc] | None = None, progress: Progress | None = None) -> Scores:
    """Scores, rewards and advantages of ``rollouts``; appends this round's rewards to ``history`` (the
    window baseline's per-example record, updated in place) when the estimator uses it. With ``funcs``
    (--reward-funcs) the reward is their weighted sum instead of the mapped correctness score;
    ``progress``: the run's position for their ``trainer_state``, and what they log."""
    progress = progress or Progress()
    pair = (algo.reward_fail, algo.reward_success)
    scores = [[correct(ex, c, algo.fail_truncated) for c in g] for ex, g in zip(batch.examples, rollouts.groups)]
    by_function: dict[str, list] = {}
    if funcs:
        totals, by_function = _weighted(funcs, batch.examples, rollouts.groups, progress)
        sizes = [len(g) for g in rollouts.groups]
        rewards_ = [totals[sum(sizes[:i]):sum(sizes[:i + 1])] for i in range(len(sizes))]
    else:
        rewards_ = [[map_reward(s, pair) for s in g] for g in scores]
    kind = ADVANTAGES[algo.advantage].baseline
    advantages, baselines = [], []
    for i, (ex, g) in enumerate(zip(batch.examples, rewards_)):
        baseline = None
        if kind == "window":
            hist = history.setdefault(ex.id, [])
            hist.extend(g)
            del hist[:-algo.window]
            baseline = torch.tensor(hist)
        elif kind == "extra" and funcs:
            baseline = torch.tensor(_weighted(funcs, [ex], [rollouts.extra[i]], Progress(**_position(progress)))[0])
        elif kind == "extra":
            baseline = torch.tensor([map_reward(correct(ex, c, algo.fail_truncated), pair)
                                     for c in rollouts.extra[i]])
        if baseline is not None:
            baselines.append(baseline.tolist())
        advantages.append(group_advantages(algo.advantage, torch.tensor(g), algo.adv_eps, baseline).tolist())
    return Scores(correct=[s for g in scores for s in g], rewards=[x for g in rewards_ for x in g],
                  advantages=advantages, baselines=baselines, by_function=by_function)


def _weighted(funcs: list[RewardFunc], examples, groups, progress: Progress) -> tuple[list[float], dict[str, list]]:
    """The reward functions over the groups' responses, flat in rollout order."""
    flat = [(ex, c) for ex, g in zip(examples, groups) for c in g]
    return reward_funcs.score(funcs, [c.text for _, c in flat], [ex for ex, _ in flat],
                              [list(c.token_ids) for _, c in flat], progress)


def _position(p: Progress) -> dict:
    """``p``'s run position without its logs (the extra samples' scoring logs nothing)."""
    return dict(global_step=p.global_step, max_steps=p.max_steps, epoch=p.epoch, answer_column=p.answer_column,
                prompt_column=p.prompt_column, format=p.format, messages=p.messages)
