"""Fused LM-head policy-gradient loss: hidden states in, scalar loss out, no [N, V] logits.

``fused_linear_pg_loss`` runs ONE fused pass over the vocabulary forward (per-token log-prob and entropy,
:mod:`fastrft.kernels.linear_logprob`) and ONE backward (dH and dW from the recomputed logits tiles).
Between the two passes the loss family itself (ratio, clip / dual clip, KL k1/k2/k3, entropy bonus,
aggregation) is evaluated on (N,) vectors by the foundation's spec, :func:`fastrft.algo.pg_loss`, whose
autograd supplies the per-token upstream gradients (dL/dlogp, dL/dentropy) that the backward kernel
consumes. The loss is therefore the spec by construction, not a second implementation of it, and the
vector part costs O(N) against the O(N*V*H) of the vocabulary passes.
"""

from __future__ import annotations

import torch

from fastrft.algo.loss import PGLossSpec, pg_loss
from fastrft.kernels.linear_logprob import linear_logprob, linear_logprob_reference


def fused_linear_pg_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor,
                         seq_ids: torch.Tensor, *, old_logp: torch.Tensor | None = None,
                         ref_logp: torch.Tensor | None = None, spec: PGLossSpec, temperature: float = 1.0,
                         rollout_logp: torch.Tensor | None = None, backend: str = "auto"):
    """Policy-gradient loss of the response tokens, from final hidden states.

    hidden (N, H) and weight (V, H) in fp32/fp16/bf16; targets (N,) int64 the taken tokens; advantages
    (N,) fp32 per token; seq_ids (N,) int the sequence of each token; old_logp / ref_logp (N,) fp32 or
    None (None old_logp = on-policy: ratio 1 with the gradient of logp); spec: PGLossSpec; temperature:
    the sampling temperature the log-probs are taken at. rollout_logp (N,), optional: the sampler's
    log-probs, reported as logp_gap_mean / logp_gap_max in the stats.

    Returns (loss, stats): a differentiable scalar and a dict of floats (logp_mean, entropy_mean,
    kl_mean, clip_frac_low, clip_frac_high, ratio_min, ratio_max[, logp_gap_mean, logp_gap_max]).
    """
    logp, entropy = linear_logprob(hidden, weight, targets, temperature=temperature, with_entropy=True,
                                   backend=backend)
    loss, stats = pg_loss(logp, advantages.float(), seq_ids, old_logp=old_logp, ref_logp=ref_logp, entropy=entropy,
                          spec=spec)
    if rollout_logp is not None and logp.numel():
        gap = (logp.detach() - rollout_logp.to(logp.device, torch.float32)).abs()
        stats.update(logp_gap_mean=float(gap.mean()), logp_gap_max=float(gap.max()))
    return loss, stats


def fused_linear_pg_loss_reference(hidden, weight, targets, advantages, seq_ids, *, old_logp=None, ref_logp=None,
                                   spec: PGLossSpec, temperature: float = 1.0,
                                   compute_dtype: torch.dtype = torch.float64):
    """The same loss with materialised logits in ``compute_dtype`` (float64 for tests)."""
    logp, entropy = linear_logprob_reference(hidden, weight, targets, temperature=temperature, with_entropy=True,
                                             compute_dtype=compute_dtype, chunk=None)
    cast = (lambda t: None if t is None else t.to(compute_dtype))
    return pg_loss(logp, advantages.to(compute_dtype), seq_ids, old_logp=cast(old_logp), ref_logp=cast(ref_logp),
                   entropy=entropy, spec=spec)
