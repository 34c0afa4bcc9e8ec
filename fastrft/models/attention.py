"""Self-attention for the two entry points: packed varlen training and KV-cached inference.

Packed layout: the tokens of several sequences are concatenated into (T, heads, head_dim) with
``cu_seqlens`` (B + 1,) int32 cumulative lengths; each sequence attends causally to itself only. With
flash-attn importable and half-precision CUDA tensors the whole batch is one ``flash_attn_varlen_func``
call; otherwise PyTorch SDPA runs once per distinct sequence length (sequences of equal length are
stacked into one batched call, which covers the common G-samples-of-one-prompt case well).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastrft.models.config import ArchConfig
from fastrft.models import exact
from fastrft.models.layers import Linear, RMSNorm, apply_rope

try:  # optional: only used on CUDA with fp16/bf16
    from flash_attn import flash_attn_varlen_func as _flash_varlen
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_varlen = None


def varlen_attention(q, k, v, cu_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention within each packed sequence.

    q (T, Hq, D), k/v (T, Hkv, D) with Hq a multiple of Hkv; cu_seqlens (B+1,) int32 on q's device.
    Returns (T, Hq, D) in q's dtype.
    """
    if _flash_varlen is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        lens = cu_seqlens[1:] - cu_seqlens[:-1]
        max_len = int(lens.max()) if lens.numel() else 0
        return _flash_varlen(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, softmax_scale=scale, causal=True)
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    groups: dict[int, list[int]] = {}
    for i in range(len(bounds) - 1):
        groups.setdefault(bounds[i + 1] - bounds[i], []).append(bounds[i])
    for length, starts in groups.items():
        if length == 0:
            continue
        idx = (torch.tensor(starts, device=q.device)[:, None] + torch.arange(length, device=q.device)).reshape(-1)
        # (n, L, H, D) -> (n, H, L, D) for SDPA; GQA is expanded by SDPA itself.
        qs, ks, vs = (x.index_select(0, idx).view(len(starts), length, x.shape[1], x.shape[2]).transpose(1, 2)
                      for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                           enable_gqa=qs.shape[1] != ks.shape[1])
        out.index_copy_(0, idx, o.transpose(1, 2).reshape(-1, q.shape[1], q.shape[2]))
    return out


def prefix_prefill_attention(q, k_cache, v_cache, meta, scale: float) -> torch.Tensor:
    """Prefill whose sequences start with prefix-cached tokens: each sequence's queries (its new tokens)
    attend to its whole context gathered from the pages, with the causal diagonal shifted by the number
    of cached tokens. q (T, Hq, D) packed by meta.cu_seqlens_q; returns (T, Hq, D).

    Prefix hits are rare (a repeated prompt between two optimizer steps), so this gathers into a
    contiguous K/V per sequence rather than running a paged prefill kernel."""
    out = torch.empty_like(q)
    bs = k_cache.shape[1]
    cu = meta.cu_seqlens_q.tolist()
    ctx = meta.context_lens.tolist()
    for i, (start, end) in enumerate(zip(cu[:-1], cu[1:])):
        n_ctx, n_new = ctx[i], end - start
        blocks = meta.block_tables[i, : -(-n_ctx // bs)].long()
        keys = k_cache.index_select(0, blocks).flatten(0, 1)[:n_ctx]
        values = v_cache.index_select(0, blocks).flatten(0, 1)[:n_ctx]
        offset = n_ctx - n_new
        allowed = torch.ones(n_new, n_ctx, dtype=torch.bool, device=q.device).tril(offset)
        o = F.scaled_dot_product_attention(q[start:end].transpose(0, 1), keys.transpose(0, 1),
                                           values.transpose(0, 1), attn_mask=allowed, scale=scale,
                                           enable_gqa=q.shape[1] != keys.shape[1])
        out[start:end] = o.transpose(0, 1)
    return out


class Attention(nn.Module):
    #: batch-invariant attention on every path (CausalLM.set_exact): "torch" fastrft.models.tiled_attention,
    #: "triton" fastrft.kernels.exact_triton
    exact = False

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
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
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
        if self.exact == "triton":
            o = exact.triton_kernels().packed_attention(q, k, v, cu_seqlens, self.scale)
        elif self.exact:
            o = exact.packed_attention(q, k, v, cu_seqlens, self.scale)
        else:
            o = varlen_attention(q, k, v, cu_seqlens, self.scale)
        return self.o_proj(o.flatten(-2))

    def forward_paged(self, x, cos, sin, k_cache, v_cache, meta):
        """x (T, hidden): the batch's new tokens, packed; k_cache/v_cache (num_blocks, block_size, Hkv, D)
        for this layer; meta: a :class:`PagedMeta`. Writes the new K/V into their slots, then attends:
        prefill over each sequence's cached prefix + new tokens, decode over its pages."""
        from fastrft.kernels import paged_attention as pa

        q, k, v = self._qkv(x, cos, sin)
        # The engine's own CPU steps go straight to the PyTorch path: its inputs need no checks, and at
        # batch 1 the checks cost a tenth of attention itself.
        direct = meta.trusted and q.device.type == "cpu"
        if direct:
            pa.store_kv_reference(k, v, k_cache, v_cache, meta.slot_mapping)
        else:
            pa.store_kv(k, v, k_cache, v_cache, meta.slot_mapping, validate=False if meta.trusted else None)
        if self.exact == "triton":
            o = exact.triton_kernels().paged_attention(q, k_cache, v_cache, meta, self.scale)
        elif self.exact:
            o = exact.paged_attention(q, k_cache, v_cache, meta, self.scale)
        elif not meta.is_prefill and direct:
            o = pa.paged_attention_decode_torch(q, k_cache, v_cache, meta.block_tables, meta.context_lens, self.scale,
                                                finite_pages=True)
        elif not meta.is_prefill:
            o = pa.paged_attention_decode(q, k_cache, v_cache, meta.block_tables, meta.context_lens, self.scale,
                                          validate=False if meta.trusted else None, finite_pages=meta.trusted)
        elif not meta.has_prefix:
            o = varlen_attention(q, k, v, meta.cu_seqlens_q, self.scale)
        else:
            o = prefix_prefill_attention(q, k_cache, v_cache, meta, self.scale)
        return self.o_proj(o.flatten(-2))

    def forward_cached(self, x, cos, sin, cache, mask):
        """x (B, t, hidden) new tokens; cache: a KVCache positioned at these tokens; mask (B, 1, t, S)
        bool or None (None: every cached key is visible and t == 1). Returns (B, t, hidden)."""
        q, k, v = self._qkv(x, cos, sin)
        keys, values = cache.update(self.layer_idx, k.transpose(1, 2), v.transpose(1, 2))
        o = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, scale=self.scale,
                                           enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(o.transpose(1, 2).flatten(-2))
