"""Advantage estimators: per-sequence rewards of one example's group -> per-sequence advantages.

A group is the G responses sampled for one training example in one round. Each estimator is a pure
function of the group's rewards (and, for the baselines that need it, of extra reference rewards), listed
in one table, ADVANTAGES, with whether it needs G > 1 to carry any signal.

- none:     A = R (the reward is the learning signal: the paper's minimalist layer);
- grpo:     A = (R - mean) / (std + eps), std the unbiased sample std of the group (as in GRPO);
- dr_grpo:  A = R - mean (Dr. GRPO drops the std normalisation);
- rloo:     A = R - mean of the other G-1 rewards (leave-one-out);
- window:   A = (R - mean) / (std + eps) over the example's last W rewards, this round's included: a
            baseline that works with G = 1 (the trainer keeps the history);
- extra_samples: A = (R - mean) / (std + eps) over M extra samples of the example drawn only for the
            baseline and never trained on (the trainer draws them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from fastrft.algo.baselines import EXTRA, GROUP, WINDOW, Baseline
from fastrft.algo.choices import ADVANTAGE_NAMES
from fastrft.errors import ConfigError


def _none(r: torch.Tensor, eps: float) -> torch.Tensor:
    return r.clone()


def _grpo(r: torch.Tensor, eps: float) -> torch.Tensor:
    std = r.std(unbiased=True) if r.numel() > 1 else r.new_zeros(())
    return (r - r.mean()) / (std + eps)


def _dr_grpo(r: torch.Tensor, eps: float) -> torch.Tensor:
    return r - r.mean()


def _rloo(r: torch.Tensor, eps: float) -> torch.Tensor:
    g = r.numel()
    if g < 2:
        return torch.zeros_like(r)
    return (r - (r.sum() - r) / (g - 1))


def _external(r: torch.Tensor, eps: float, baseline: torch.Tensor) -> torch.Tensor:
    b = baseline.to(r.dtype)
    std = b.std(unbiased=True) if b.numel() > 1 else b.new_zeros(())
    return (r - b.mean()) / (std + eps)


@dataclass(frozen=True)
class Estimator:
    fn: Callable[..., torch.Tensor]
    needs_group: bool  # with G = 1 and no other baseline source it is identically zero
    description: str
    baseline: Baseline = GROUP  # where the reference rewards come from (fastrft.algo.baselines)


ADVANTAGES: dict[str, Estimator] = {
    "none": Estimator(_none, False, "the reward itself (minimalist layer)"),
    "grpo": Estimator(_grpo, True, "group mean/std normalised (GRPO)"),
    "dr_grpo": Estimator(_dr_grpo, True, "group mean subtracted, no std (Dr. GRPO)"),
    "rloo": Estimator(_rloo, True, "leave-one-out mean subtracted (RLOO)"),
    "window": Estimator(_external, False, "mean/std of the example's last W rewards (works with G = 1)", WINDOW),
    "extra_samples": Estimator(_external, False, "mean/std of M extra samples not trained on (works with G = 1)",
                               EXTRA),
}
assert tuple(ADVANTAGES) == ADVANTAGE_NAMES, "fastrft.algo.choices lists the estimators the config accepts"


def check_advantage(name: str) -> Estimator:
    if name not in ADVANTAGES:
        choices = "; ".join(f"{k}: {v.description}" for k, v in ADVANTAGES.items())
        raise ConfigError(f"advantage {name!r} is unknown; choose one of: {choices}")
    return ADVANTAGES[name]


def group_advantages(name: str, rewards: torch.Tensor, eps: float = 1e-6,
                     baseline: torch.Tensor | None = None) -> torch.Tensor:
    """rewards (G,) float of one group -> advantages (G,) float (same dtype). ``baseline`` (K,) holds the
    rewards the window and extra_samples estimators take their mean/std from.

    >>> [round(a, 4) for a in group_advantages("grpo", torch.tensor([1.0, 0.0, 0.0, 1.0])).tolist()]
    [0.866, -0.866, -0.866, 0.866]
    >>> [round(a, 4) for a in group_advantages("window", torch.tensor([1.0]),
    ...                                        baseline=torch.tensor([0.0, 0.0, 1.0])).tolist()]
    [1.1547]
    """
    r = rewards if rewards.is_floating_point() else rewards.float()
    est = check_advantage(name)
    if est.baseline is GROUP:
        return est.fn(r, eps)
    if baseline is None or baseline.numel() == 0:
        raise ValueError(f"advantage {name!r} needs baseline rewards")
    return est.fn(r, eps, baseline)


def map_reward(correct: float, fail_success: tuple[float, float]) -> float:
    """Map a verifier score in [0, 1] to the configured (fail, success) reward pair, linearly.

    >>> map_reward(1.0, (-1.0, 1.0)), map_reward(0.0, (-1.0, 1.0))
    (1.0, -1.0)
    """
    fail, success = fail_success
    return fail + (success - fail) * float(correct)
