"""Model backends: one object per way of computing the decoder's ops.

A backend provides the linear layer, the RMSNorm, packed (training) and paged (engine) attention, the
per-step plan that paged attention reads, and what the engine's sampling head needs (the LM head's logits
GEMM, or a fused LM-head sampler). A model gets its backend once (:meth:`fastrft.models.CausalLM.set_ops`);
its layers call it without branching, and the engine and the learner ask it rather than a flag.

Three are registered (:data:`BACKENDS`):

- ``plain`` (:class:`Ops`, this module): PyTorch's ops, and the Triton decode kernels on CUDA. Fast; a
  token's values may depend on what shares its batch.
- ``exact-torch`` (:class:`fastrft.models.exact.ExactTorchOps`): the exact mode on CPU, batch-invariant
  PyTorch ops under the row rules of :mod:`fastrft.models.row_rules`.
- ``exact-triton`` (:class:`fastrft.models.ops_triton.ExactTritonOps`): the exact mode's Triton kernels,
  on CUDA or in Triton's interpreter (how the tests run the CUDA path on CPU).

Adding a backend: subclass :class:`Ops` in its own module, override what differs, and add one line to
:data:`BACKENDS`. A LoRA adapter is a backend concern too: :meth:`Ops.linear` is the one place every
projection's forward goes through, and it computes the adapter's matmuls with the backend's own GEMM.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from fastrft import numerics
from fastrft.models import lora, lora_group, rebuild

try:  # optional: only used on CUDA with fp16/bf16
    from flash_attn import flash_attn_varlen_func as _flash_varlen
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_varlen = None


class Ops:
    """The plain backend; the base every backend derives from."""

    name = "plain"
    #: whether the ops are batch-invariant, so that the sampler's log-probs are the trainer's bit for bit
    exact = False
    #: the LM head's logits GEMM ``gemm(hidden, weight_t, out=None)`` that the engine's head and the trainer's
    #: PyTorch LM-head loss both use; None: torch.mm
    head_gemm = None
    #: a fused LM head + sampler ``(hidden, weight, seeds, positions, inv_temperature) -> (2, B) draws``
    #: that the engine samples through instead of fp32 logits (fastrft.engine.heads); None: logits
    sample_head = None

    def __init__(self, kernels: str = "auto"):
        #: the engine's decode kernels (KV store, paged attention, sampler): "auto" runs Triton on CUDA and
        #: PyTorch on CPU; "triton" runs the CUDA path's Triton kernels on any device (on CPU in Triton's
        #: interpreter: how the tests run the CUDA decode step's code)
        self.kernels = kernels

    def __repr__(self) -> str:
        return f"<fastrft backend {self.name}>"

    def __deepcopy__(self, memo):  # stateless: a copied model shares its backend
        return self

    def __reduce__(self):
        return get, (self.name,)

    def check(self, models, dtype: torch.dtype, device: torch.device) -> None:
        """Raise (a :class:`fastrft.errors.ConfigError`) if this process cannot run ``models`` with this
        backend in ``dtype`` on ``device``; called once, before the models get it."""

    # ------------------------------------------------------------------------------------------ layers
    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer=None) -> torch.Tensor:
        """x W^T + b, plus the LoRA term of ``layer`` (the fastrft.models.layers.Linear computing it) where it
        carries an adapter (:meth:`adapted`)."""
        if layer is not None and layer.lora_A is not None:
            return self.adapted(layer, x, weight, bias)
        return self.dense(x, weight, bias)

    def linears(self, layers: list, x: torch.Tensor) -> list[torch.Tensor]:
        """The projections ``layers`` of one input (q, k, v; gate, up). Where each carries an adapter, the plain
        backend computes their A matrices with one GEMM (fastrft.models.lora_group); a batch-invariant one, and
        projections without adapters, compute each alone (:meth:`linear`)."""
        if not self.exact and all(layer.lora_A is not None for layer in layers):
            return lora_group.fused(layers, x)
        return [self.linear(x, layer.weight, layer.bias, layer=layer) for layer in layers]

    def adapted(self, layer, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x W^T + b plus ``layer``'s LoRA term of ``x`` (fastrft.models.lora): here the base GEMM and the
        adapter's fused (:func:`fastrft.models.lora.fused_linear`); a batch-invariant backend computes the
        adapter with its own GEMM (:func:`fastrft.models.lora.add_delta`)."""
        return lora.fused_linear(layer, x, weight, bias)

    def dense(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """One GEMM x W^T + b: what a backend overrides for its linear layers."""
        return F.linear(x, weight, bias)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return numerics.rms_norm(x, weight, eps, rebuild.mark)  # rebuilt in the backward: fastrft.models.rebuild

    def packed_attention(self, q, k, v, cu_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
        """Causal attention within each packed sequence: q (T, Hq, D), k/v (T, Hkv, D); (T, Hq, D)."""
        return varlen_attention(q, k, v, cu_seqlens, scale)

    # ------------------------------------------------------------------------------------------ paged steps
    def plan_step(self, meta, rows: int, device: torch.device):
        """What this backend derives once per paged step for every layer to read (``meta.plan``), or None."""
        return None

    def _direct(self, meta, device: torch.device) -> bool:
        """The engine's own CPU steps go straight to the PyTorch path: its inputs need no checks, and at
        batch 1 the checks cost a tenth of attention itself."""
        return meta.trusted and device.type == "cpu" and self.kernels == "auto"

    def store_kv(self, k, v, k_cache, v_cache, meta) -> None:
        """Write a step's new keys and values into their slots (``meta.slot_mapping``; -1: padding)."""
        from fastrft.kernels import paged_attention as pa

        if self._direct(meta, k.device):
            pa.store_kv_reference(k, v, k_cache, v_cache, meta.slot_mapping)
        else:
            pa.store_kv(k, v, k_cache, v_cache, meta.slot_mapping, backend=self.kernels,
                        validate=False if meta.trusted else None)

    def paged_attention(self, q, k, v, k_cache, v_cache, meta, scale: float) -> torch.Tensor:
        """Attention of a step's new tokens (q (T, Hq, D); k, v their keys and values, already stored in the
        pages) over each sequence's context in the paged cache."""
        from fastrft.kernels import paged_attention as pa

        if not meta.is_prefill and self._direct(meta, q.device):
            return pa.paged_attention_decode_torch(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale,
                                                   finite_pages=True)
        if not meta.is_prefill:
            return pa.paged_attention_decode(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale,
                                             num_splits=meta.decode_splits, backend=self.kernels,
                                             validate=False if meta.trusted else None, finite_pages=meta.trusted)
        if not meta.has_prefix:
            return varlen_attention(q, k, v, meta.cu_seqlens_q, scale)
        return prefix_prefill_attention(q, k_cache, v_cache, meta, scale)


def varlen_attention(q, k, v, cu_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention within each packed sequence.

    q (T, Hq, D), k/v (T, Hkv, D) with Hq a multiple of Hkv; cu_seqlens (B+1,) int32 on q's device.
    Returns (T, Hq, D) in q's dtype. With flash-attn importable and half-precision CUDA tensors the whole
    batch is one ``flash_attn_varlen_func`` call; otherwise PyTorch SDPA runs once per distinct sequence
    length (sequences of equal length are stacked into one batched call, which covers the common
    G-samples-of-one-prompt case well).
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


# ---------------------------------------------------------------------------------------------- registry
#: name -> "module:class". The classes are imported on first use, so a CPU run never imports Triton.
BACKENDS = {
    "plain": "fastrft.models.ops:Ops",
    "exact-torch": "fastrft.models.exact:ExactTorchOps",
    "exact-triton": "fastrft.models.ops_triton:ExactTritonOps",
}
_MADE: dict[str, Ops] = {}


def get(name: str) -> Ops:
    """The backend registered as ``name`` (one shared instance per name)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown model backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    if name not in _MADE:
        module, cls = BACKENDS[name].split(":")
        _MADE[name] = getattr(importlib.import_module(module), cls)()
    return _MADE[name]


PLAIN = Ops()
_MADE["plain"] = PLAIN
