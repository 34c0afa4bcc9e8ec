"""Which training examples a round uses: fixed ones, a per-round batch from a pool, or a pick by difficulty.

Every choice here is a pure function of the config's seeds and the round number, never of hidden state,
so a resumed run selects exactly what an uninterrupted one would.

- **pool**: the train split, or a seeded subset of ``train_pool`` examples of it;
- **fixed**: the same example(s) every round (``--example-index``, or the ones ``--difficulty`` picks);
- **batch**: ``B`` examples per round, read off an endless sequence of seeded shuffles of the pool, one
  shuffle per pass (``B`` = pool size gives full-dataset GRPO: every example once per round);
- **difficulty**: the base model's pass rate on candidate problems, ``k`` samples each at T = 1.0, and a
  band ``lo:hi`` (or ``hard`` = 0 of k) that keeps the candidates inside it. The estimates are cached in
  a JSON file keyed by what they depend on, so seeds of one study share one estimate.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from fastrft.config import parse_difficulty
from fastrft.data.example import Example
from fastrft.errors import ConfigError
from fastrft.report.records import locked, write_json


def pool_indices(split_size: int, pool: int | None, seed: int) -> list[int]:
    """Indices of the train split that make up the training pool, in split order."""
    if pool is None or pool >= split_size:
        return list(range(split_size))
    return sorted(random.Random(f"fastrft-pool/{seed}").sample(range(split_size), pool))


def batch_for_round(pool_size: int, per_round: int, r: int, seed: int) -> list[int]:
    """Positions into the pool of the ``per_round`` examples of round ``r`` (1-based).

    >>> sorted(batch_for_round(4, 4, 1, 0)) == [0, 1, 2, 3]  # B = pool: every example, every round
    True
    >>> a, b = batch_for_round(6, 3, 1, 0), batch_for_round(6, 3, 2, 0)
    >>> sorted(a + b) == list(range(6))  # two rounds make one pass over the pool
    True
    """
    out, start = [], (r - 1) * per_round
    for pos in range(start, start + per_round):
        epoch, i = divmod(pos, pool_size)
        order = list(range(pool_size))
        random.Random(f"fastrft-batch/{seed}/{epoch}").shuffle(order)
        out.append(order[i])
    return out


def candidate_order(pool_size: int, count: int, seed: int) -> list[int]:
    """The first ``count`` positions of a seeded shuffle of the pool: the difficulty candidates."""
    order = list(range(pool_size))
    random.Random(f"fastrft-difficulty/{seed}").shuffle(order)
    return order[:count]


def in_band(correct: int, k: int, band: tuple[float, float]) -> bool:
    lo, hi = band
    rate = correct / k
    return lo - 1e-9 <= rate <= hi + 1e-9


class DifficultyCache:
    """Pass-rate estimates ``{example id: correct out of k}`` in a JSON file, under a key of what they
    depend on (model, k, response budget, reward mapping). A file written for another key is refused.

    Several processes may share the file (``fastrft ladder --jobs``): :meth:`update` re-reads it under a
    lock and adds to what is there, so estimates written meanwhile by another run are kept, not dropped."""

    def __init__(self, path: str | os.PathLike[str], key: dict[str, Any]):
        self.path, self.key = Path(path), key
        self.counts: dict[str, int] = self._stored()

    def _stored(self) -> dict[str, int]:
        """The counts in the file now ({} when there is none); a file of another key is refused."""
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            stored_key, counts = data["key"], data["correct"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{self.path}: not a difficulty cache written by fastrft ({e}); delete it or "
                              "point --difficulty-cache elsewhere") from None
        if stored_key != self.key:
            diff = ", ".join(f"{k}: {stored_key.get(k)!r} != {self.key.get(k)!r}"
                             for k in sorted(set(self.key) | set(stored_key)) if stored_key.get(k) != self.key.get(k))
            raise ConfigError(f"{self.path}: cached pass rates were estimated under other settings ({diff}); "
                              "use another --difficulty-cache file")
        return {str(k): int(v) for k, v in counts.items()}

    def missing(self, examples: list[Example]) -> list[Example]:
        return [e for e in examples if e.id not in self.counts]

    def update(self, counts: dict[str, int]) -> None:
        with locked(self.path):
            self.counts = {**self._stored(), **self.counts, **counts}
            write_json(self.path, {"key": self.key, "correct": self.counts})


def select_by_difficulty(candidates: list[Example], counts: dict[str, int], k: int, band_text: str,
                         count: int | None) -> list[Example]:
    """The candidates whose pass rate lies in the band, in candidate order; the first ``count`` of them
    (all when ``count`` is None). None in the band: a ConfigError with the observed distribution."""
    band = parse_difficulty(band_text)
    chosen = [e for e in candidates if in_band(counts[e.id], k, band)]
    if not chosen:
        hist = Counter(counts[e.id] for e in candidates)
        shown = ", ".join(f"{c}/{k}: {hist[c]}" for c in sorted(hist))
        raise ConfigError(f"difficulty (--difficulty) {band_text}: none of the {len(candidates)} candidates has a "
                          f"pass rate in the band. Observed (correct of {k}: how many problems): {shown}. Widen the "
                          "band, or raise --difficulty-candidates")
    if count is not None and len(chosen) < count:
        raise ConfigError(f"difficulty (--difficulty) {band_text}: only {len(chosen)} candidate(s) in the band, "
                          f"--difficulty-count asks for {count}")
    return chosen if count is None else chosen[:count]


def estimate_counts(examples: list[Example], sample: Callable[[list[Example]], list[list[float]]]) -> dict[str, int]:
    """``sample(examples)`` -> per example a list of k scores in {0, 1}; returns {id: number correct}."""
    scores = sample(examples)
    return {e.id: int(sum(s >= 0.5 for s in row)) for e, row in zip(examples, scores, strict=True)}
