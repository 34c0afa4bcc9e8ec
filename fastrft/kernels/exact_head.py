"""The exact mode's sampling head (:mod:`fastrft.kernels.exact_triton` has the mode's design): the trainer's
fused LM-head kernel over a decode step's rows, then the Triton sampler over its logits. No kernel of its
own: it launches :mod:`fastrft.kernels.lm_head_triton`'s and :mod:`fastrft.kernels.sampling_triton`'s,
whose compile cases cover it."""

from __future__ import annotations

import torch

def sample_head(hidden: torch.Tensor, weight: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor,
                inv_temperature: torch.Tensor | float) -> torch.Tensor:
    """Draw one token per row of ``hidden`` (B, H) from softmax(hidden W^T / T); returns the sampler's
    (2, B) int32 draws (row 0 tokens, -1 for a bad row; row 1 the fp32 log-prob bits).

    The logits z and the log-partition lse come from the trainer's own kernel
    (:func:`fastrft.kernels.lm_head_triton.logits_stats`); the token from the Triton sampler over those z
    (their Gumbel race at T = 1: z is already divided by T); logp = z_token - lse, the trainer's
    subtraction. inv_temperature: 1/T (0: greedy, logits and log-prob at T = 1), a float or a one-element
    fp32 device tensor (what a decode CUDA graph reads)."""
    from fastrft.kernels import lm_head_triton as head
    from fastrft.kernels.sampling import sample_tokens

    b, v = hidden.shape[0], weight.shape[0]
    if not isinstance(inv_temperature, torch.Tensor):
        inv_temperature = torch.full((1,), float(inv_temperature), dtype=torch.float32, device=hidden.device)
    greedy = inv_temperature == 0
    inv_t = torch.where(greedy, torch.ones_like(inv_temperature), inv_temperature)
    z = torch.empty((b, v), dtype=torch.float32, device=hidden.device)
    dummy = torch.zeros(b, dtype=torch.long, device=hidden.device)
    _, lse, _, _ = head.logits_stats(hidden, weight, dummy, 1.0, False, z_out=z, inv_temperature=inv_t)
    # The Triton sampler on CUDA; its PyTorch twin (the same token, bit for bit: tests/kernels/test_sampling.py) in
    # the interpreter, where the Triton one is far slower.
    draws = sample_tokens(z, seeds, positions, (~greedy).float())
    tokens = draws[0]
    z_tok = z.gather(1, tokens.clamp(0, v - 1).long()[:, None]).squeeze(1)
    logp = z_tok - lse
    return torch.stack([tokens, logp.view(torch.int32)])
