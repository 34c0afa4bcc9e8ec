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


def sample_groups(gen, model, cfg: TrainConfig, r: int, prompt_ids: list[list[int]]) -> list[list[Completion]]:
    """Round ``r``'s G responses to each prompt (``model`` is the one ``gen`` generates with)."""
    model.eval()
    return _generate(gen, cfg, r, prompt_ids, cfg.rollout.group_size, seeds.ROLLOUT)


def sample_extra(gen, cfg: TrainConfig, r: int, prompt_ids: list[list[int]]) -> list[list[Completion]] | None:
    """The extra_samples baseline's M responses to each prompt, scored but never trained on; None for the
    other advantage estimators."""
    if ADVANTAGES[cfg.algo.advantage].baseline != "extra":
        return None
    return _generate(gen, cfg, r, prompt_ids, cfg.algo.extra_samples, seeds.EXTRA_SAMPLES)


def _generate(gen, cfg: TrainConfig, r: int, prompt_ids: list[list[int]], n: int, stream: int):
    ro = cfg.rollout
    return gen.generate(prompt_ids, n=n, max_new_tokens=ro.max_new_tokens, temperature=ro.temperature,
                        top_p=ro.top_p, top_k=ro.top_k, seed=seeds.generation_seed(cfg.run.seed, r, stream))
