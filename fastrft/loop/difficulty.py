"""The base model's pass rate on candidate problems (--difficulty): read from the cache, or measured.

Each candidate gets ``difficulty_samples`` responses at temperature 1.0 from the base model; the number
that are correct places it in a difficulty band (fastrft.data.selection). Counts are cached in a JSON
file keyed by everything they depend on (by default the run directory's difficulty.json; a ladder shares
one per study), so a resumed or repeated run does not measure them again.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fastrft.progress import bar as progress_bar

from fastrft.config import TrainConfig
from fastrft.data import Example, selection
from fastrft.loop import seeds
from fastrft.loop.scoring import correct


def pass_counts(cands: list[Example], *, cfg: TrainConfig, gen, model, encode, out_dir: Path, world,
                progress: bool) -> dict[str, int]:
    """Correct-of-k counts of the base model (``model``, generating through ``gen``) on ``cands``."""
    d, ro, a = cfg.data, cfg.rollout, cfg.algo
    key = {"model": str(cfg.model.model), "precision": cfg.model.precision, "dataset": d.dataset,
           "level": d.level, "k": d.difficulty_samples, "max_new_tokens": ro.max_new_tokens,
           "max_prompt_tokens": d.max_prompt_tokens, "fail_truncated": a.fail_truncated, "temperature": 1.0,
           "seed": d.data_seed, **({"reward": d.reward} if d.reward else {})}
    cache = selection.DifficultyCache(d.difficulty_cache or out_dir / "difficulty.json", key)
    missing = cache.missing(cands)
    if not missing:
        return cache.counts
    if world.main:
        print(f"fastrft: estimating the base model's pass rate on {len(missing)} candidate problems "
              f"({d.difficulty_samples} samples each, T = 1.0)", file=sys.stderr)
    model.eval()

    def sample(exs: list[Example]) -> list[list[float]]:
        out = []
        chunk = max(1, ro.max_batch_size // d.difficulty_samples)
        bar = progress_bar(total=len(exs), desc="difficulty", unit="problem", disable=not progress, transient=True)
        for i in range(0, len(exs), chunk):
            part = exs[i:i + chunk]
            groups = gen.generate([encode(x) for x in part], n=d.difficulty_samples, max_new_tokens=ro.max_new_tokens,
                                  temperature=1.0, seed=seeds.generation_seed(d.data_seed, i, seeds.DIFFICULTY))
            out += [[correct(x, c, a.fail_truncated) for c in g] for x, g in zip(part, groups)]
            bar.update(len(part))
        bar.close()
        return out

    out_dir.mkdir(parents=True, exist_ok=True)
    counts = selection.estimate_counts(missing, sample)
    if world.main:
        cache.update(counts)
    else:
        cache.counts.update(counts)
    return cache.counts
