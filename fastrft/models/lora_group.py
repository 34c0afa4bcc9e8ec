"""Adapted projections that share their input (q, k, v; gate, up), computed together: the plain backend's.

Each projection i is ``y_i = x W_i^T + b_i + (x A_i^T) B_i^T * s_i`` (fastrft.models.lora). The A matrices
of projections that read the same x are stacked, so ``x A^T`` for all of them is one GEMM over x instead of
one each. The backward likewise computes dA for all of them with one GEMM over x, and accumulates every
projection's dx into one tensor with ``addmm_``: no per-projection dx tensors for autograd to add up. Each
output is within fp32 (or bf16) rounding of :func:`fastrft.models.lora.fused_linear`'s (the GEMM over the
stacked A rounds as its own shape does). The batch-invariant backends never use this: they compute each
projection alone (fastrft.models.exact).
"""

from __future__ import annotations

import torch
from torch import nn

from fastrft.models import lora


def fused(layers: list, x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of ``layers`` (each an adapted fastrft.models.layers.Linear) on the same ``x``."""
    if any(lora._dropped(layer, x) is not x for layer in layers):  # dropout draws per projection
        return [lora.fused_linear(layer, x, layer.weight, layer.bias) for layer in layers]
    a = torch.cat([layer.lora_A.weight for layer in layers])
    ranks = tuple(layer.lora_A.weight.shape[0] for layer in layers)
    scalings = tuple(layer.lora_scaling for layer in layers)
    if x.dim() == 2 and torch.is_grad_enabled():
        flat = [t for layer in layers for t in (layer.weight, layer.bias, layer.lora_B.weight)]
        return list(_AdaptedGroup.apply(x, a, ranks, scalings, *flat))
    h = nn.functional.linear(x, a).reshape(-1, a.shape[0])
    outs, start = [], 0
    for layer, r, s in zip(layers, ranks, scalings):
        y = nn.functional.linear(x, layer.weight, layer.bias)
        y.view(-1, y.shape[-1]).addmm_(h[:, start:start + r], layer.lora_B.weight.T, alpha=s)
        outs.append(y)
        start += r
    return outs


class _AdaptedGroup(torch.autograd.Function):
    """The projections of one 2-d x; inputs (x, stacked A, ranks, scalings, then W, b, B per projection)."""

    @staticmethod
    def forward(ctx, x, a, ranks, scalings, *flat):
        h = nn.functional.linear(x, a)
        outs, start = [], 0
        for i, (r, s) in enumerate(zip(ranks, scalings)):
            w, bias, b = flat[3 * i:3 * i + 3]
            y = nn.functional.linear(x, w, bias)
            y.addmm_(h[:, start:start + r], b.T, alpha=s)
            outs.append(y)
            start += r
        ctx.save_for_backward(x, a, h, *flat[0::3], *flat[2::3])
        ctx.ranks, ctx.scalings, ctx.has_bias = ranks, scalings, [flat[3 * i + 1] is not None for i in range(len(ranks))]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x, a, h, *rest = ctx.saved_tensors
        n = len(ctx.ranks)
        weights, bs = rest[:n], rest[n:]
        need = ctx.needs_input_grad
        need_x, need_a = need[0], need[1]
        dh = torch.zeros_like(h) if need_x or need_a else None
        dx = None
        flat_grads = []
        start = 0
        for i, (g, r, s) in enumerate(zip(grads, ctx.ranks, ctx.scalings)):
            need_w, need_bias, need_b = need[4 + 3 * i:7 + 3 * i]
            if g is None:  # an output not used: no contribution
                flat_grads += [None, None, None]
                start += r
                continue
            if dh is not None:
                dh[:, start:start + r] = torch.mm(g, bs[i]).mul_(s)
            if need_x:
                dx = torch.mm(g, weights[i]) if dx is None else dx.addmm_(g, weights[i])
            flat_grads += [torch.mm(g.T, x) if need_w else None,
                           g.sum(0) if need_bias and ctx.has_bias[i] else None,
                           torch.mm(g.T, h[:, start:start + r]).mul_(s) if need_b else None]
            start += r
        if need_x and dx is not None:
            dx.addmm_(dh, a)
        da = torch.mm(dh.T, x) if need_a else None
        return (dx, da, None, None, *flat_grads)
