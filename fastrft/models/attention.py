"""Self-attention for the three entry points: packed varlen training, the engine's paged steps, and
KV-cached inference.

Packed layout: the tokens of several sequences are concatenated into (T, heads, head_dim) with
``cu_seqlens`` (B + 1,) int32 cumulative lengths; each sequence attends causally to itself only. The
attention itself is the model's backend's (fastrft.models.ops: SDPA or flash-attn in the plain one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastrft.models.config import ArchConfig
from fastrft.models.layers import Linear, RMSNorm, apply_rope
from fastrft.models.ops import PLAIN


class Attention(nn.Module):
    ops = PLAIN  # the model's backend (fastrft.models.ops; CausalLM.set_ops)

    def __init__(self, cfg: ArchConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, q_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(q_dim, cfg.hidden_size, bias=cfg.o_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "head":
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(q_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(kv_dim, cfg.rms_norm_eps)

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (..., T, hidden) -> q (..., T, Hq, D), k and v (..., T, Hkv, D), RoPE applied."""
        q, k, v = self.q_proj.ops.linears([self.q_proj, self.k_proj, self.v_proj], x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.unflatten(-1, (self.num_heads, self.head_dim))
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward_packed(self, x, cos, sin, cu_seqlens):
        """x (T, hidden) packed; cos/sin (T, D); returns (T, hidden)."""
        q, k, v = self._qkv(x, cos, sin)
        return self.o_proj(self.ops.packed_attention(q, k, v, cu_seqlens, self.scale).flatten(-2))

    def forward_paged(self, x, cos, sin, k_cache, v_cache, meta):
        """x (T, hidden): the batch's new tokens, packed; k_cache/v_cache (num_blocks, block_size, Hkv, D)
        for this layer; meta: a :class:`PagedMeta`. Writes the new K/V into their slots, then attends:
        prefill over each sequence's cached prefix + new tokens, decode over its pages."""
        q, k, v = self._qkv(x, cos, sin)
        self.ops.store_kv(k, v, k_cache, v_cache, meta)
        return self.o_proj(self.ops.paged_attention(q, k, v, k_cache, v_cache, meta, self.scale).flatten(-2))

    def forward_cached(self, x, cos, sin, cache, mask):
        """x (B, t, hidden) new tokens; cache: a KVCache positioned at these tokens; mask (B, 1, t, S)
        bool or None (None: every cached key is visible and t == 1). Returns (B, t, hidden)."""
        q, k, v = self._qkv(x, cos, sin)
        keys, values = cache.update(self.layer_idx, k.transpose(1, 2), v.transpose(1, 2))
        o = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, scale=self.scale,
                                           enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(o.transpose(1, 2).flatten(-2))
