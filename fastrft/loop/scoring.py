"""Stage: score a round's responses and turn the rewards into advantages.

The reward function of each example says whether a response is correct; that score is mapped onto
(reward_fail, reward_success), and the advantage estimator (fastrft.algo.ADVANTAGES) turns each group's
rewards into per-response advantages, against a baseline when the estimator has one:

- ``window``: the example's last ``window`` rewards over all rounds so far (this round's included). That
  history is run state (:class:`~fastrft.loop.types.RunState.history`): the caller passes it in and a
  checkpoint saves it;
- ``extra``: the rewards of the round's extra samples of the example (never trained on).

Each is an object of :mod:`fastrft.algo.baselines`, which computes its reference rewards.

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
    sizes = [len(g) for g in rollouts.groups]
    if funcs:
        totals, by_function = _weighted(funcs, batch.examples, rollouts.groups, progress)
        rewards_ = _split(totals, sizes)
        scorable = _split(_scorable(funcs, by_function, len(totals)), sizes)
    else:
        rewards_ = [[map_reward(s, pair) for s in g] for g in scores]
        scorable = [[True] * n for n in sizes]
    source = ADVANTAGES[algo.advantage].baseline
    extra = None if rollouts.extra is None else _extra_rewards(batch, rollouts, algo, funcs, progress)
    advantages, baselines = [], []
    for i, (ex, g) in enumerate(zip(batch.examples, rewards_)):
        # A response for which every reward function returned None is unscorable (TRL's rule): left out of
        # its group's statistics and of the baselines, with advantage 0.
        mine = [x for x, ok in zip(g, scorable[i]) if ok]
        baseline = source.reference(ex.id, mine, None if extra is None else extra[i], history, algo)
        if baseline is not None:
            baselines.append(baseline.tolist())
        usable = mine and (baseline is None or baseline.numel() > 0)  # no scorable extra sample: no baseline
        adv = iter(group_advantages(algo.advantage, torch.tensor(mine), algo.adv_eps, baseline).tolist()
                   if usable else [0.0] * len(mine))
        advantages.append([next(adv) if ok else 0.0 for ok in scorable[i]])
    return Scores(correct=[s for g in scores for s in g], rewards=[x for g in rewards_ for x in g],
                  advantages=advantages, baselines=baselines, by_function=by_function)


def _extra_rewards(batch: RoundBatch, rollouts: Rollouts, algo: AlgoConfig, funcs, progress: Progress):
    """Per example, the scorable rewards of its extra samples (drawn for the baseline alone)."""
    out = []
    for ex, group in zip(batch.examples, rollouts.extra):
        if funcs:
            totals, values = _weighted(funcs, [ex], [group], Progress(**_position(progress)))
            out.append([x for x, ok in zip(totals, _scorable(funcs, values, len(totals))) if ok])
        else:
            pair = (algo.reward_fail, algo.reward_success)
            out.append([map_reward(correct(ex, c, algo.fail_truncated), pair) for c in group])
    return out


def _weighted(funcs: list[RewardFunc], examples, groups, progress: Progress) -> tuple[list[float], dict[str, list]]:
    """The reward functions over the groups' responses, flat in rollout order."""
    flat = [(ex, c) for ex, g in zip(examples, groups) for c in g]
    return reward_funcs.score(funcs, [c.text for _, c in flat], [ex for ex, _ in flat],
                              [list(c.token_ids) for _, c in flat], progress)


def _split(flat: list, sizes: list[int]) -> list[list]:
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [flat[a:a + n] for a, n in zip(starts, sizes)]


def _scorable(funcs: list[RewardFunc], values: dict[str, list], n: int) -> list[bool]:
    """Whether at least one function gave response i a value."""
    return [any(values[f.name][i] is not None for f in funcs) for i in range(n)]


def _position(p: Progress) -> dict:
    """``p``'s run position without its logs (the extra samples' scoring logs nothing)."""
    return dict(global_step=p.global_step, max_steps=p.max_steps, epoch=p.epoch, answer_column=p.answer_column,
                prompt_column=p.prompt_column, format=p.format, messages=p.messages)
