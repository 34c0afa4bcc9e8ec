"""The response tokens' log-probs that an update needs besides the policy's own: the old policy's
(before the round's first step; PPO's ratio) and the frozen reference's (the KL term).

Both come from the model's final hidden states at the positions that predict response tokens, through
the fused LM-head kernel (fastrft.kernels.linear_logprob), never from full [N, V] logits.
"""

from __future__ import annotations

import torch

from fastrft.algo import PackedBatch, pack
from fastrft.distributed import World, split
from fastrft.kernels import linear_logprob
from fastrft.loop.types import TrainBatch
from fastrft.microbatch import micro_batches


def response_hidden(model, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (N, H) of the positions predicting the response tokens, LM-head weight (V, H))."""
    hidden = model.forward_packed(batch.input_ids, batch.cu_seqlens)
    return hidden.index_select(0, batch.target_pos), model.lm_head_weight


def packed(train: TrainBatch, device: torch.device) -> PackedBatch:
    """``train``'s sequences as one varlen batch on ``device`` (with their sampling log-probs)."""
    return pack(train.prompts, [c.token_ids for c in train.completions], train.advantages,
                [c.logprobs for c in train.completions]).to(device)


@torch.no_grad()
def reference_logprobs(ref, batch: PackedBatch, *, temperature: float, backend: str, logits_mm=None) -> torch.Tensor:
    """The frozen reference policy's log-probs of ``batch``'s response tokens, (N,) fp32."""
    logp, _ = linear_logprob(*response_hidden(ref, batch), batch.targets, temperature=temperature, backend=backend,
                             logits_mm=logits_mm)
    return logp


@torch.no_grad()
def old_logprobs(model, train: TrainBatch, *, budget: int | None, world: World, device: torch.device,
                 temperature: float, backend: str, logits_mm=None) -> list[torch.Tensor]:
    """Per sequence, ``model``'s (the pre-update policy's) log-probs of its response tokens (CPU, fp32),
    computed in micro-batches of the step's token budget (``logits_mm``: the exact mode's head GEMM)."""
    # The rollout model holds the same compute weights as the training forward (the masters rounded to
    # the compute dtype, as FSDP's all-gather casts them), so the first step's ratio is exactly 1. Across
    # ranks each computes a contiguous share and all gather it.
    mine = train.select(split(list(range(len(train))), world))
    out: list[torch.Tensor] = []
    for group in micro_batches(mine.packed_lengths(), budget):
        part = mine.select(group)
        batch = pack(part.prompts, [c.token_ids for c in part.completions], [0.0] * len(group),
                     [c.logprobs for c in part.completions]).to(device)
        logp, _ = linear_logprob(*response_hidden(model, batch), batch.targets, temperature=temperature,
                                 backend=backend, logits_mm=logits_mm)
        out.extend(logp.float().cpu().split([len(c.token_ids) for c in part.completions]))
    if world.distributed:
        out = [t for part in world.gather(out) for t in part]
    return out
