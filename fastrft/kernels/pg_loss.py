"""Fused LM-head policy-gradient loss: hidden states in, scalar loss out, no [N, V] logits.

The gradient is formed in the forward (:class:`FusedPGLossFunction`). Every loss of the family is
sum_i w_i * t_i(logp_i, entropy_i) with per-token terms t_i that depend on row i alone and aggregation
weights w_i fixed by the batch layout (:func:`fastrft.algo.loss.token_terms`,
:func:`fastrft.algo.loss.aggregation_weights`). So as soon as a chunk's rows have their log-sum-exp, the
per-row coefficients dL/dlogp_i and dL/dentropy_i are known: they come from autograd on the chunk's
(C,) vectors through the spec itself (never a second implementation of it), and the chunk loop of
:func:`fastrft.kernels.linear_logprob.lm_head_chunks` turns them into dH and dW with the logits it has
just formed. Three GEMMs in all (logits, dH, dW); the backward only scales the stored gradients by the
upstream scalar. The loss value and the stats are :func:`fastrft.algo.pg_loss` on the (N,) vectors.

Without autograd (no_grad, or neither hidden nor weight requiring grad) it runs the forward pass alone.
"""

from __future__ import annotations

import torch

from fastrft.algo.loss import PGLossSpec, aggregation_weights, pg_loss, token_terms
from fastrft.kernels.linear_logprob import lm_head_chunks, linear_logprob, linear_logprob_reference, prepare


class FusedPGLossFunction(torch.autograd.Function):
    """(loss, logp, entropy) from (hidden, weight); dH and dW computed in the forward, scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, advantages, seq_ids, old_logp, ref_logp, spec, temperature, use_triton,
                chunk, given_weights, logits_mm=None):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        weights = aggregation_weights(seq_ids, spec, torch.float32) if given_weights is None else given_weights
        adv = advantages.float()

        def coefficients(rows, logp_c, entropy_c):
            with torch.enable_grad():
                lp = logp_c.detach().float().requires_grad_()
                ent = entropy_c.detach().float().requires_grad_()
                per_token, _, _ = token_terms(lp, adv[rows], old_logp=None if old_logp is None else old_logp[rows],
                                              ref_logp=None if ref_logp is None else ref_logp[rows], entropy=ent,
                                              spec=spec)
                g_lp, g_ent = torch.autograd.grad((weights[rows] * per_token).sum(), (lp, ent), allow_unused=True)
            return g_lp, (g_ent if spec.entropy_coef else None)

        logp, entropy, dh, dw = lm_head_chunks(hidden, weight, targets, temperature, coefficients, need_dh=need_dh,
                                               need_dw=need_dw, use_triton=use_triton, chunk=chunk,
                                               logits_mm=logits_mm)
        logp, entropy = logp.float(), entropy.float()
        loss, stats = pg_loss(logp, adv, seq_ids, old_logp=old_logp, ref_logp=ref_logp, entropy=entropy, spec=spec,
                              weights=given_weights)
        ctx.grads = [dh, dw]
        ctx.stats = stats
        ctx.mark_non_differentiable(logp, entropy)
        return loss, logp, entropy

    @staticmethod
    def backward(ctx, g_loss, _g_logp, _g_entropy):
        if ctx.grads is None:
            raise RuntimeError("fused_linear_pg_loss keeps its gradients for one backward only: call backward "
                               "once per loss (retain_graph=True cannot replay it)")
        dh, dw = ctx.grads
        ctx.grads = None  # scaled in place below and handed to autograd: release them here
        if g_loss is not None:
            g = g_loss.to(torch.float32)
            dh = None if dh is None else dh.mul_(g.to(dh.dtype))
            dw = None if dw is None else dw.mul_(g.to(dw.dtype))
        return (dh, dw) + (None,) * 11


def fused_linear_pg_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor,
                         seq_ids: torch.Tensor, *, old_logp: torch.Tensor | None = None,
                         ref_logp: torch.Tensor | None = None, spec: PGLossSpec, temperature: float = 1.0,
                         rollout_logp: torch.Tensor | None = None, backend: str = "auto", chunk: int | None = None,
                         weights: torch.Tensor | None = None, logits_mm=None):
    """Policy-gradient loss of the response tokens, from final hidden states.

    hidden (N, H) and weight (V, H) in fp32/fp16/bf16; targets (N,) int64 the taken tokens; advantages
    (N,) fp32 per token; seq_ids (N,) int the sequence of each token; old_logp / ref_logp (N,) fp32 or
    None (None old_logp = on-policy: ratio 1 with the gradient of logp); spec: PGLossSpec; temperature:
    the sampling temperature the log-probs are taken at. rollout_logp (N,), optional: the sampler's
    log-probs, reported as logp_gap_mean / logp_gap_max in the stats. chunk: rows per chunk (default
    :func:`fastrft.kernels.linear_logprob.default_chunk`). weights (N,), optional: the aggregation weights
    of a whole optimizer step that these tokens are a micro-batch of (see :func:`fastrft.algo.pg_loss`).
    logits_mm: the PyTorch path's logits GEMM (:func:`fastrft.kernels.linear_logprob.lm_head_chunks`).

    Returns (loss, stats): a differentiable scalar and a dict of floats (logp_mean, entropy_mean,
    kl_mean, clip_frac_low, clip_frac_high, ratio_min, ratio_max[, logp_gap_mean, logp_gap_max]).
    """
    targets, use_triton = prepare(hidden, weight, targets, temperature, chunk, backend)
    n = hidden.shape[0]
    for name, t in (("advantages", advantages), ("seq_ids", seq_ids), ("old_logp", old_logp), ("ref_logp", ref_logp),
                    ("weights", weights)):
        if t is not None and t.shape != (n,):
            raise ValueError(f"pg_loss: {name} has shape {tuple(t.shape)}, expected ({n},) like logp")
    if spec.needs_ref and ref_logp is None:
        raise ValueError("pg_loss: spec.kl_coef > 0 needs ref_logp")
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        cast = (lambda t: None if t is None else t.to(hidden.device, torch.float32).contiguous())  # noqa: E731
        loss, logp, _ = FusedPGLossFunction.apply(hidden, weight, targets, advantages, seq_ids, cast(old_logp),
                                                  cast(ref_logp), spec, float(temperature), use_triton, chunk,
                                                  cast(weights), logits_mm)
        stats = dict(loss.grad_fn.stats) if loss.grad_fn is not None else {}
    else:
        logp, entropy = linear_logprob(hidden, weight, targets, temperature=temperature, with_entropy=True,
                                       backend=backend, logits_mm=logits_mm)
        loss, stats = pg_loss(logp, advantages.float(), seq_ids, old_logp=old_logp, ref_logp=ref_logp,
                              entropy=entropy, spec=spec, weights=weights)
    if rollout_logp is not None and logp.numel():
        gap = (logp.detach() - rollout_logp.to(logp.device, torch.float32)).abs()
        stats.update(logp_gap_mean=float(gap.mean()), logp_gap_max=float(gap.max()))
    return loss, stats


def fused_linear_pg_loss_reference(hidden, weight, targets, advantages, seq_ids, *, old_logp=None, ref_logp=None,
                                   spec: PGLossSpec, temperature: float = 1.0,
                                   compute_dtype: torch.dtype = torch.float64, weights=None):
    """The same loss with materialised logits in ``compute_dtype`` (float64 for tests)."""
    logp, entropy = linear_logprob_reference(hidden, weight, targets, temperature=temperature, with_entropy=True,
                                             compute_dtype=compute_dtype, chunk=None)
    cast = (lambda t: None if t is None else t.to(compute_dtype))
    return pg_loss(logp, advantages.to(compute_dtype), seq_ids, old_logp=cast(old_logp), ref_logp=cast(ref_logp),
                   entropy=entropy, spec=spec, weights=cast(weights))
