"""How an update cuts a round's sequences: mini-batches (optimizer steps) and micro-batches (forwards).

A PPO epoch cuts the round's sequences, in a seeded order (fastrft.loop.seeds.minibatch_order), into
``mini_batches`` contiguous parts, one optimizer step each. Each step is cut into micro-batches of at
most --max-tokens-per-step packed tokens (fastrft.microbatch), gradients accumulating between them. At
world size > 1 each rank takes a contiguous share of the step's sequences and cuts its own share.
"""

from __future__ import annotations

import torch

from fastrft.algo.loss import PGLossSpec
from fastrft.distributed import World, split
from fastrft.loop.types import TrainBatch
from fastrft.microbatch import MicroBatch, micro_batches, step_weights


def split_parts(order: list[int], parts: int) -> list[list[int]]:
    """``order`` cut into ``parts`` contiguous nearly equal pieces (empty ones dropped)."""
    n = len(order)
    bounds = [n * i // parts for i in range(parts + 1)]
    return [order[bounds[i]:bounds[i + 1]] for i in range(parts) if bounds[i + 1] > bounds[i]]


def step_plan(step: TrainBatch, budget: int | None, spec: PGLossSpec, world: World) -> list[tuple[MicroBatch, bool]]:
    """This rank's (micro-batch, real) pairs of one optimizer step over ``step``'s sequences.

    With more than one micro-batch in the step, each carries its tokens' aggregation weights within the
    whole step over all ranks (global normalisation). A rank with fewer micro-batches than another pads
    with zero-weight stand-ins (real = False), because every FSDP forward and backward is a collective."""
    lengths = step.packed_lengths()
    response_lengths = [len(c.token_ids) for c in step.completions]
    if not world.distributed:
        groups = micro_batches(lengths, budget)
        if len(groups) == 1:
            return [(MicroBatch(groups[0], None), True)]
        weights = step_weights(response_lengths, spec)
        return [(MicroBatch(g, torch.cat([weights[j] for j in g])), True) for g in groups]
    weights = step_weights(response_lengths, spec)
    per_rank = []
    for rank in range(world.size):  # every rank knows every rank's plan: no communication needed
        idx = split(list(range(len(step))), world, rank)
        per_rank.append([[idx[j] for j in g] for g in micro_batches([lengths[i] for i in idx], budget)])
    mine = per_rank[world.rank]
    plan = [(MicroBatch(g, torch.cat([weights[j] for j in g])), True) for g in mine]
    pad = (MicroBatch([0], torch.zeros(response_lengths[0])), False)
    return plan + [pad] * (max(len(p) for p in per_rank) - len(mine))
