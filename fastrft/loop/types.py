"""What the stages of a round hand each other, and what a run carries from round to round.

A round (fastrft.loop.round) passes these from stage to stage, each with named fields: the round's
examples (:class:`RoundBatch`), the sampled responses (:class:`Rollouts`), their scores
(:class:`Scores`) and the flat sequences an update trains on (:class:`TrainBatch`).
:class:`RunState` is what a checkpoint saves and a resume restores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastrft.data import Example
from fastrft.engine import Completion


@dataclass(frozen=True)
class RoundBatch:
    """The examples round ``round`` trains on, with their encoded prompts (same order)."""

    round: int
    examples: list[Example]
    prompt_ids: list[list[int]]


@dataclass(frozen=True)
class Rollouts:
    """The responses of one round, grouped by example (same order as the batch's examples)."""

    groups: list[list[Completion]]  # G per example: scored and trained on
    extra: list[list[Completion]] | None = None  # the extra_samples baseline's M per example: scored only

    @property
    def completions(self) -> list[Completion]:
        return [c for g in self.groups for c in g]

    @property
    def tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.completions)

    @property
    def extra_tokens(self) -> int:
        return sum(len(c.token_ids) for g in self.extra or [] for c in g)


@dataclass(frozen=True)
class Scores:
    """A round's scores, flat in rollout order except ``advantages``, which is grouped like the rollouts."""

    correct: list[float]  # what the reward function returned (0/1 for the builtin ones)
    rewards: list[float]  # correct mapped onto (reward_fail, reward_success)
    advantages: list[list[float]]  # per example, per response
    # window / extra_samples: per example, the rewards its baseline was taken from; empty otherwise.
    baselines: list[list[float]] = field(default_factory=list)
    # --reward-funcs: each function's values (None: did not apply), flat in rollout order.
    by_function: dict[str, list] = field(default_factory=dict)

    @property
    def flat_advantages(self) -> list[float]:
        return [a for g in self.advantages for a in g]

    @property
    def has_signal(self) -> bool:
        return any(a != 0 for a in self.flat_advantages)


@dataclass(frozen=True)
class TrainBatch:
    """One round's training sequences, flat: sequence i is ``prompts[i]`` followed by ``completions[i]``."""

    prompts: list[list[int]]
    completions: list[Completion]
    advantages: list[float]

    @classmethod
    def of(cls, batch: RoundBatch, rollouts: Rollouts, scores: Scores) -> "TrainBatch":
        return cls(prompts=[batch.prompt_ids[i] for i, g in enumerate(rollouts.groups) for _ in g],
                   completions=rollouts.completions, advantages=scores.flat_advantages)

    def __len__(self) -> int:
        return len(self.completions)

    def select(self, idx: list[int]) -> "TrainBatch":
        return TrainBatch([self.prompts[i] for i in idx], [self.completions[i] for i in idx],
                          [self.advantages[i] for i in idx])

    def packed_lengths(self) -> list[int]:
        """Packed tokens of each (prompt, response) pair, as :func:`fastrft.algo.pack` lays them out."""
        return [len(p) + len(c.token_ids) - 1 for p, c in zip(self.prompts, self.completions)]


@dataclass(frozen=True)
class MicroResult:
    """One micro-batch of an optimizer step: its stats (means over its response tokens, the loss among
    them), its packed tokens and its response tokens (the weights its stats merge with)."""

    stats: dict[str, float]
    tokens: int
    targets: int


@dataclass(frozen=True)
class UpdateResult:
    """A round's update (fastrft.loop.learner.Learner.update): each optimizer step's stats, and the fields
    it adds to the round's record. ``optimizer_steps`` is the control value the run state counts."""

    steps: list[dict[str, float]]
    record: dict[str, float]

    @property
    def optimizer_steps(self) -> int:
        return len(self.steps)


@dataclass
class RunState:
    """What the loop carries from round to round: saved in every checkpoint, restored on resume."""

    round: int = 0  # the last completed round
    updates: int = 0  # optimizer steps taken
    skipped: int = 0  # rounds without gradient signal
    history: dict[str, list[float]] = field(default_factory=dict)  # window baseline: example id -> rewards
    wall: float = 0.0  # seconds spent in run() up to the last checkpoint, over all sessions of the run
    # The evaluation of this round was abandoned by a stop request: the resumed run measures it first.
    pending_eval: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "updates": self.updates, "skipped": self.skipped, "history": self.history,
                "wall": self.wall, "pending_eval": self.pending_eval}

    @classmethod
    def from_dict(cls, s: dict[str, Any]) -> "RunState":
        return cls(round=s["round"], updates=s["updates"], skipped=s["skipped"],
                   history={k: list(v) for k, v in s["history"].items()}, wall=s.get("wall", 0.0),
                   pending_eval=s.get("pending_eval"))
