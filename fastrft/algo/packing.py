"""Pack prompt + response pairs into one flat varlen batch (no padding) for the training forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedBatch:
    """T packed tokens of B sequences, N of them response tokens (the ones trained on).

    input_ids (T,) int64; cu_seqlens (B+1,) int32; targets (N,) int64 the response tokens;
    target_pos (N,) int64 the row of the forward's hidden states that predicts each target (the position
    just before it); seq_ids (N,) int64; advantages (N,) fp32; rollout_logp (N,) fp32 the sampler's log-probs.
    """

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    targets: torch.Tensor
    target_pos: torch.Tensor
    seq_ids: torch.Tensor
    advantages: torch.Tensor
    rollout_logp: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> "PackedBatch":
        return PackedBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def pack(prompts: list[list[int]], responses: list[list[int]], advantages: list[float],
         rollout_logprobs: list[list[float]]) -> PackedBatch:
    """One sequence per (prompt, response) pair; each sequence's advantage is broadcast to its tokens.

    The last response token is never an input (nothing is predicted from it), so it is left out.
    """
    ids, cu, targets, pos, seq, adv, old = [], [0], [], [], [], [], []
    for i, (p, r, a, lp) in enumerate(zip(prompts, responses, advantages, rollout_logprobs, strict=True)):
        if not r:
            raise ValueError(f"pack: response {i} is empty")
        if not p:
            # The first response token is predicted from the last prompt position; without one there is
            # nothing to predict it from.
            raise ValueError(f"pack: prompt {i} is empty")
        if len(lp) != len(r):
            raise ValueError(f"pack: sequence {i} has {len(r)} response tokens but {len(lp)} rollout log-probs")
        start = cu[-1]
        ids.extend(p)
        ids.extend(r[:-1])
        cu.append(start + len(p) + len(r) - 1)
        pos.extend(range(start + len(p) - 1, start + len(p) - 1 + len(r)))
        targets.extend(r)
        seq.extend([i] * len(r))
        adv.extend([float(a)] * len(r))
        old.extend(lp)
    return PackedBatch(
        input_ids=torch.tensor(ids, dtype=torch.long),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        targets=torch.tensor(targets, dtype=torch.long),
        target_pos=torch.tensor(pos, dtype=torch.long),
        seq_ids=torch.tensor(seq, dtype=torch.long),
        advantages=torch.tensor(adv, dtype=torch.float32),
        rollout_logp=torch.tensor(old, dtype=torch.float32),
    )
