"""Every random stream of a run, named in one place.

No stage draws from the global RNG: each generation call is keyed by a seed derived from (run seed,
index, stream), and each shuffle by a string that names its purpose. A new stream takes a new id here,
so two purposes can never share one by accident. The engine turns a call's seed into one seed per
request (fastrft.engine.sampler.request_seed), which makes rollouts independent of batch size, world
size and preemption. The data's own orders (the pool, each round's batch, the difficulty candidates) are
drawn in fastrft.data.selection, from the data seed and the run seed, the same way.
"""

from __future__ import annotations

import random

from fastrft.engine import request_seed

# The third argument of request_seed: which kind of generation a call is.
ROLLOUT = 0  # the round's G samples per example (index: the round)
EVALUATION = 1  # train/test Pass@1 after a round (index: the round)
EXTRA_SAMPLES = 2  # the extra_samples baseline's M samples per example (index: the round)
DIFFICULTY = 3  # the base model's pass-rate estimate (seeded by data_seed; index: the chunk's first candidate)


def generation_seed(seed: int, index: int, stream: int) -> int:
    """The seed of one generation call of ``stream`` (one of the ids above)."""
    return request_seed(seed, index, stream)


def minibatch_order(seed: int, round_: int, epoch: int, n: int) -> list[int]:
    """The order in which a round's ``n`` sequences are cut into mini-batches in PPO epoch ``epoch``."""
    order = list(range(n))
    random.Random(f"fastrft-minibatch/{seed}/{round_}/{epoch}").shuffle(order)
    return order


def test_subset(data_seed: int, n: int, k: int) -> list[int]:
    """Which ``k`` of the ``n`` test problems are evaluated (--test-size), in file order."""
    return sorted(random.Random(data_seed).sample(range(n), k))


def train_eval_subset(data_seed: int, n: int, k: int) -> list[int]:
    """Which ``k`` of the ``n`` pool examples measure train Pass@1 in batch mode (--train-eval-size)."""
    return sorted(random.Random(f"fastrft-train-eval/{data_seed}").sample(range(n), k))
