"""Building blocks of the decoder: RMSNorm, rotary embeddings, the SwiGLU MLP.

Numerics follow the reference implementations bit for bit where it matters for parity: RMSNorm
normalises in fp32 and casts back before the weight multiply (fastrft.numerics.rms_norm); RoPE angles are
computed in fp32 from integer positions. The linear layers and norms compute through the model's backend
(fastrft.models.ops).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastrft.models import rebuild
from fastrft.models.config import ArchConfig, RopeConfig
from fastrft.models.ops import PLAIN


class RMSNorm(nn.Module):
    ops = PLAIN  # the model's backend (fastrft.models.ops; CausalLM.set_ops)

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


def rope_inv_freq(rope: RopeConfig, head_dim: int, device=None) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) fp32 for the plain, linear and Llama-3.x scaled RoPE."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.type == "linear":
        return inv_freq / rope.factor
    if rope.type == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between the two
        # thresholds is interpolated smoothly.
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape positions.shape + (head_dim,), cast to ``dtype``."""
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1).double()
    # cos and sin of the fp32 angles in float64, rounded once: PyTorch's fp32 CPU cos is not a pure function
    # (the same input gave a different last bit in about 1 process in 20, measured on torch 2.13), which made
    # seeded runs irreproducible and decode disagree with the training forward; float64's is.
    return aligned(torch.cos, emb).float().to(dtype), aligned(torch.sin, emb).float().to(dtype)


VECTOR = 64  # elements: a multiple of every CPU vector width times PyTorch's 2x loop unroll


def aligned(fn, x: torch.Tensor) -> torch.Tensor:
    """fn(x) for an elementwise ``fn``, computed with x's last dim padded to a multiple of VECTOR.

    PyTorch's CPU loops take whole vectors through the vectorised (SLEEF) code and the last few elements
    of a thread's share through the scalar (libm) one, which can differ in the last bit; so where a row
    is not a whole number of vectors, an element's result would depend on how many rows share the call.
    Padded, every element takes the vector path (fastrft.models.exact). Free for aligned widths."""
    width = x.shape[-1]
    if width % VECTOR == 0 or x.device.type != "cpu":
        return fn(x)
    return fn(F.pad(x, (0, VECTOR - width % VECTOR)))[..., :width]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., T, heads, head_dim) rotated by cos/sin (..., T, head_dim) (rotate-half convention)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Linear(nn.Linear):
    """nn.Linear (same parameters, same names) whose forward is the model's backend's
    (:meth:`fastrft.models.ops.Ops.linear`; :meth:`fastrft.models.CausalLM.set_ops`). It may carry a LoRA
    adapter (:mod:`fastrft.models.lora`): ``lora_A`` (r, in) and ``lora_B`` (out, r), PEFT's names."""

    ops = PLAIN

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lora_A: nn.Linear | None = None
        self.lora_B: nn.Linear | None = None
        self.lora_scaling, self.lora_dropout = 0.0, 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x, self.weight, self.bias, layer=self)


class MLP(nn.Module):
    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj.ops.linears([self.gate_proj, self.up_proj], x)
        act = aligned(F.silu, gate)
        g, u = gate.detach(), up.detach()
        act_again = rebuild.mark(act, lambda: aligned(F.silu, g))  # the backward rebuilds both (fastrft.models.rebuild)
        y = act * up
        rebuild.mark(y, lambda: act_again() * u)
        return self.down_proj(y)
