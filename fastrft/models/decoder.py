"""The native decoder: Llama-3.x / SmolLM2, Qwen2 / Qwen2.5, Qwen3, OLMo-2 in one module.

Parameter names equal the Hugging Face ones (``model.layers.3.self_attn.q_proj.weight``…), so a
checkpoint loads without a rename table and exports the same way.

Two entry points, both returning final hidden states (the caller applies the LM head):
- :meth:`CausalLM.forward_packed` — training over a packed varlen batch, autograd-friendly;
- :meth:`CausalLM.forward_cached` — inference prefill/decode over a :class:`KVCache`.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from fastrft.models import rebuild
from fastrft.models.attention import Attention
from fastrft.models.config import ArchConfig
from fastrft.models.kv_cache import KVCache
from fastrft.models.layers import MLP, Linear, RMSNorm, rope_cos_sin, rope_inv_freq
from fastrft.models.ops import Ops


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.post_norm = cfg.post_norm
        if cfg.post_norm:  # OLMo-2: norm after each sublayer, before the residual add
            self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        else:
            self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, attend) -> torch.Tensor:
        """``attend`` maps the attention input to its output (packed or cached, bound by the caller)."""
        if self.post_norm:
            x = x + self.post_attention_layernorm(attend(x))
            return x + self.post_feedforward_layernorm(self.mlp(x))
        x = x + attend(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """A decoder-only LM. ``eos_token_ids`` is the runtime set of stop ids (config + generation_config)."""

    #: forward_packed can recompute each decoder layer in the backward (``activation_checkpointing``); its
    #: layers are deterministic, so the recomputed activations, hence the gradients, are the kept ones.
    supports_activation_checkpointing = True

    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.eos_token_ids: tuple[int, ...] = cfg.eos_token_ids
        self.register_buffer("inv_freq", rope_inv_freq(cfg.rope, cfg.head_dim), persistent=False)
        self.activation_checkpointing = False  # forward_packed recomputes each layer in the backward when set

    @property
    def ops(self) -> Ops:
        """The backend every layer computes with (:mod:`fastrft.models.ops`; plain until :meth:`set_ops`)."""
        return self.model.norm.ops

    @property
    def exact(self) -> bool:
        """Whether the backend is batch-invariant: decode, prefill and forward_packed give a token the same
        bits whatever shares its batch."""
        return self.ops.exact

    def set_ops(self, ops: Ops) -> None:
        """Compute every layer with ``ops`` (a :class:`fastrft.models.ops.Ops`; see :func:`fastrft.models.ops.get`)."""
        for m in self.modules():
            if isinstance(m, (Linear, RMSNorm, Attention)):
                m.ops = ops

    def linear_shapes(self) -> list[tuple[int, int, bool]]:
        """(in_features, out_features, has a bias) of every linear layer the forward runs."""
        return sorted({(m.in_features, m.out_features, m.bias is not None) for m in self.model.modules()
                       if isinstance(m, nn.Linear)})

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (after building on the meta device)."""
        device = self.model.embed_tokens.weight.device
        self.inv_freq = rope_inv_freq(self.config.rope, self.config.head_dim, device=device)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """(V, H): the output projection (the embedding matrix when tied)."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def forward_packed(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                       position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Training forward over a packed varlen batch.

        input_ids (T,) int64, the sequences concatenated; cu_seqlens (B+1,) int32 with cu_seqlens[0] = 0
        and cu_seqlens[-1] = T; position_ids (T,) int64, default 0..len-1 within each sequence.
        Returns final hidden states (T, hidden) in the model dtype.
        """
        if position_ids is None:
            position_ids = packed_positions(cu_seqlens, input_ids.shape[0])
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, x.dtype)
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        # Checkpointed layers keep only their input; the backward reruns them (deterministic ops, so the
        # gradients are the plain step's). The others rebuild a few cheap activations instead of keeping
        # them (fastrft.models.rebuild; bit for bit too).
        for layer in self.model.layers:
            def run(h, layer=layer):
                return layer(h, lambda y, a=layer.self_attn: a.forward_packed(y, cos, sin, cu_seqlens))
            if recompute:
                x = torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False)
            else:
                with rebuild.scope():
                    x = run(x)
        with rebuild.scope(not recompute):
            return self.model.norm(x)

    def forward_cached(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                       valid: torch.Tensor | None = None) -> torch.Tensor:
        """Inference step: prefill (t > 1) or decode (t == 1) for a batch.

        input_ids, positions (B, t) int64; valid (B, t) bool marks real tokens (default all True).
        Writes the new K/V into ``cache`` and returns hidden states (B, t, hidden).
        """
        if valid is None:
            valid = torch.ones_like(input_ids, dtype=torch.bool)
        mask = cache.begin(valid)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, lambda h, a=layer.self_attn: a.forward_cached(h, cos, sin, cache, mask))
        cache.end()
        return self.model.norm(x)

    def forward_paged(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches, meta) -> torch.Tensor:
        """Inference step over a paged KV cache (the engine's path).

        input_ids, positions (T,) int64: the new tokens of the batch, packed (prefill: each sequence's
        uncached tokens; decode: one token per sequence); kv_caches: per layer a (k_cache, v_cache) pair
        of shape (num_blocks, block_size, Hkv, D); meta: :class:`fastrft.models.PagedMeta`.
        Returns hidden states (T, hidden).
        """
        meta.plan = self.ops.plan_step(meta, input_ids.shape[0], input_ids.device)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for layer, (k_cache, v_cache) in zip(self.model.layers, kv_caches):
            x = layer(x, lambda h, a=layer.self_attn, kc=k_cache, vc=v_cache: a.forward_paged(h, cos, sin, kc, vc,
                                                                                              meta))
        return self.model.norm(x)

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of K and V, all layers, for one token."""
        c = self.config
        size = torch.empty((), dtype=dtype or self.dtype).element_size()
        return 2 * c.num_layers * c.num_kv_heads * c.head_dim * size

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        c = self.config
        return KVCache(c.num_layers, batch, c.num_kv_heads, c.head_dim, capacity, self.dtype, self.device)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 equal-length sequences -> (B, T, V) fp32 logits. For parity checks and scoring."""
        b, t = input_ids.shape
        cu = torch.arange(0, (b + 1) * t, t, dtype=torch.int32, device=input_ids.device)
        hidden = self.forward_packed(input_ids.reshape(-1), cu)
        return (hidden @ self.lm_head_weight.T).float().view(b, t, -1)


def packed_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(T,) int64 positions restarting at 0 at each sequence start of ``cu_seqlens``."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lens, output_size=total)
    return torch.arange(total, device=cu_seqlens.device) - starts
