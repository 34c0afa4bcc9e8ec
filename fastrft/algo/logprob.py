"""Per-token log-probs (and entropy) of targets under softmax(hidden @ weight.T / temperature).

This is the plain-PyTorch path: it materialises logits, but only ``chunk`` rows at a time, and under
autograd each chunk is recomputed in backward (activation checkpointing), so peak memory holds one
chunk's [chunk, V] logits rather than [N, V]. The fused Triton kernel replaces it on GPU.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _chunk_logprob(hidden, weight, targets, temperature: float, with_entropy: bool):
    logits = (hidden @ weight.T).float() / temperature
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - logz
    if not with_entropy:
        return logp, None
    probs = torch.softmax(logits, dim=-1)
    entropy = logz - (probs * logits).sum(-1)
    return logp, entropy


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                   temperature: float = 1.0, with_entropy: bool = False, chunk: int = 1024):
    """hidden (N, H), weight (V, H), targets (N,) int64 in [0, V) -> (logp (N,) fp32, entropy (N,) fp32 or None).

    Differentiable in hidden and weight through both outputs.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    n = hidden.shape[0]
    if n <= chunk or not (hidden.requires_grad or weight.requires_grad):
        parts = [_chunk_logprob(hidden[i:i + chunk], weight, targets[i:i + chunk], temperature, with_entropy)
                 for i in range(0, max(n, 1), chunk)]
    else:
        parts = [checkpoint(_chunk_logprob, hidden[i:i + chunk], weight, targets[i:i + chunk], temperature,
                            with_entropy, use_reentrant=False) for i in range(0, n, chunk)]
    logp = torch.cat([p[0] for p in parts])
    entropy = torch.cat([p[1] for p in parts]) if with_entropy else None
    return logp, entropy
