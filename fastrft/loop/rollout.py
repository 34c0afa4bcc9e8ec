"""Stage: sample the round's responses from the current policy.

Generation goes through the engine wrapper (fastrft.distributed.SplitEngine), which splits a call's
requests across the ranks and gives every rank the whole result. The engine holds the rollout model
itself, so the responses always come from the current weights. Each call is keyed by its own seed
stream (fastrft.loop.seeds), so the rollouts of a round depend on the run seed and the round alone.
"""

from __future__ import annotations

from fastrft.algo import ADVANTAGES
from fastrft.config import TrainConfig
from fastrft.engine import Completion
from fastrft.loop import seeds
from fastrft.loop.types import Rollouts


class Sampler:
    """Draws a round's responses: G per prompt to train on, and the extra ones the estimator's baseline asks
    for (:meth:`fastrft.algo.baselines.Baseline.extra_samples`). Every rollout of a run goes through one
    (``Trainer(..., sampler=...)``): a test or a benchmark that replays recorded rollouts replaces it."""

    def __init__(self, gen, model, cfg: TrainConfig):
        self.gen, self.model, self.cfg = gen, model, cfg  # ``model``: the one ``gen`` generates with

    def __call__(self, r: int, prompt_ids: list[list[int]]) -> Rollouts:
        return Rollouts(self.groups(r, prompt_ids), extra=self.extra(r, prompt_ids))

    def groups(self, r: int, prompt_ids: list[list[int]]) -> list[list[Completion]]:
        """Round ``r``'s G responses to each prompt."""
        self.model.eval()
        return _generate(self.gen, self.cfg, r, prompt_ids, self.cfg.rollout.group_size, seeds.ROLLOUT)

    def extra(self, r: int, prompt_ids: list[list[int]]) -> list[list[Completion]] | None:
        """The baseline's M responses to each prompt, scored but never trained on; None when it draws none."""
        n = ADVANTAGES[self.cfg.algo.advantage].baseline.extra_samples(self.cfg.algo)
        return _generate(self.gen, self.cfg, r, prompt_ids, n, seeds.EXTRA_SAMPLES) if n else None


def _generate(gen, cfg: TrainConfig, r: int, prompt_ids: list[list[int]], n: int, stream: int):
    ro = cfg.rollout
    return gen.generate(prompt_ids, n=n, max_new_tokens=ro.max_new_tokens, temperature=ro.temperature,
                        top_p=ro.top_p, top_k=ro.top_k, seed=seeds.generation_seed(cfg.run.seed, r, stream))
