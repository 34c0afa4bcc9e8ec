"""Formulas and constants that both the model's PyTorch ops (:mod:`fastrft.models`) and the Triton kernels
(:mod:`fastrft.kernels`) must hold identically. A leaf: it imports nothing from fastrft, so the CPU exact
path can share them without importing a Triton module.
"""

from __future__ import annotations

import torch

#: Keys per attention tile in the exact mode: a query at position t attends over ((t // TILE) + 1) * TILE
#: keys, the ones past t masked (fastrft.models.tiled_attention on CPU, fastrft.kernels.exact_attention).
TILE = 64


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, mark=None) -> torch.Tensor:
    """RMSNorm as the reference implementations compute it: normalise in fp32, cast back to x's dtype,
    then multiply by the weight. Row-wise, so batch-invariant on CPU as it stands. ``mark``:
    fastrft.models.rebuild's, to rebuild the output and a low-precision x's fp32 copy in the backward."""
    h = x.float()
    if mark is not None:
        xd, wd = x.detach(), weight.detach()
        if h is not x:
            mark(h, lambda: xd.float())
    out = weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    if mark is not None:
        mark(out, lambda: rms_norm(xd, wd, eps))
    return out


def linear_backward(ctx, g):
    """The plain backward of y = x W^T + b for an autograd Function whose forward saved (x, weight) and set
    ``ctx.has_bias``: PyTorch's GEMMs, since only the exact mode's forward has to be batch-invariant."""
    x, weight = ctx.saved_tensors
    g2 = g.reshape(-1, g.shape[-1])
    gx = (g2 @ weight.to(g2.dtype)).view(x.shape).to(x.dtype) if ctx.needs_input_grad[0] else None
    gw = (g2.T @ x.reshape(-1, x.shape[-1]).to(g2.dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
    gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return gx, gw, gb
