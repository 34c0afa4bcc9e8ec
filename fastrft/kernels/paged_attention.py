"""Paged KV cache: write new tokens' K/V into their slots, and single-query (decode) attention over pages.

Layout (per layer, allocated by the engine): ``k_cache`` and ``v_cache`` are separate contiguous tensors
(num_blocks, block_size, Hkv, D) of one dtype; token t of a sequence lives at slot
``block_tables[b, t // block_size] * block_size + t % block_size``, i.e. row ``slot`` of the
(num_blocks * block_size, Hkv, D) view.

``_store_kv_kernel``: program (t, h) copies kv heads [h * BLOCK_H, (h + 1) * BLOCK_H) of new token t, K and
V, to row ``slot``; slot -1 (padding) writes nothing.

``_paged_attention_decode_kernel`` (flash-decoding): program (b, kv_head, split) owns the query heads of
one GQA group and a contiguous range of ``tokens_per_split`` context positions (a multiple of
block_size). It walks the range in BLOCK_N-token tiles, looking up each token's physical block in the
block table, and keeps an online softmax per query head in fp32 (running max m in log2 units, sum
l = sum 2^(s - m), unnormalised acc = sum 2^(s - m) v). Scores are a broadcast multiply + tl.sum, not
tl.dot: a decode query is one row per head, and this keeps the interpreter (whose bf16 tl.dot is wrong)
on the same code path as the GPU. A split past a short sequence's end runs no iteration and leaves
m = -inf, l = 0, acc = 0. ``_paged_attention_combine_kernel`` (program (row, column block)) merges the
splits exactly: M = max_s m_s, out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s (empty splits weigh 2^-inf = 0;
split 0 is never empty because context_lens >= 1). With one split the decode kernel normalises and
writes the output itself.

CUDA graphs: the decode step is captured, so everything the launch decides (grid, num_splits, buffer
shapes) depends on tensor shapes and device properties only, never on tensor values: no .item(),
.tolist() or host copies. Value checks (context_lens range, block table entries, slots) need the values
on the host, so they run only on CPU tensors or when ``validate=True`` is passed; on CUDA they are off
by default. Out-of-range values on an unvalidated CUDA call are undefined behaviour, as in vLLM.

Files: this module holds the checks, the PyTorch reference and the functionals; the kernels and their
launchers are in :mod:`fastrft.kernels.paged_attention_triton`, the tile table in
:mod:`fastrft.kernels.paged_attention_tiles`.

Tiles: CUDA launches take their tile sizes and num_warps from :data:`TILES`, one table keyed by
(kernel, dtype, shape class); :func:`compile_cases` lists every entry for the compile gate
(``fastrft.kernels.aot``, ``tests/kernels/test_compile_gate.py``), which compiles them for sm_90a and refuses
register spills. The interpreter keeps its own few-large-tiles choice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastrft.kernels.linear_logprob import BACKENDS, DTYPES, resolve_backend
from fastrft.kernels.paged_attention_tiles import MAX_SPLITS, TILES, cuda_tile
from fastrft.kernels.paged_attention_triton import (HAVE_TRITON, _decode_triton, _store_triton, compile_cases,
                                                    default_num_splits)

__all__ = ["BACKENDS", "HAVE_TRITON", "MAX_SPLITS", "TILES", "check_decode_inputs", "check_store_inputs",
           "compile_cases", "cuda_tile", "default_num_splits", "paged_attention_decode",
           "paged_attention_decode_reference", "store_kv", "store_kv_reference"]


# ----------------------------------------------------------------------------------------- reference
def store_kv_reference(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """In place: row ``slot_mapping[t]`` of the flattened caches gets k[t], v[t]; slot -1 is skipped."""
    slots = slot_mapping.long()
    if slots.numel() and int(slots.min()) < 0:  # padding rows (the CPU engine sends none)
        keep = slots >= 0
        slots, k, v = slots[keep], k[keep], v[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)


def paged_attention_decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                     block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float, *,
                                     compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per sequence: gather its pages in block-table order into contiguous K, V of context_len tokens,
    then softmax(q K^T * scale) V in ``compute_dtype`` (kv head h // (Hq // Hkv) serves query head h).
    Returns (B, Hq, D) in q's dtype. Reads context_lens on the host: a CPU path and a test oracle."""
    batch, hq, d = q.shape
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    for b, n in enumerate(context_lens.tolist()):
        ids = block_tables[b, :-(-n // page)].long()
        k = k_cache[ids].reshape(-1, hkv, d)[:n].to(compute_dtype).repeat_interleave(hq // hkv, dim=1)
        v = v_cache[ids].reshape(-1, hkv, d)[:n].to(compute_dtype).repeat_interleave(hq // hkv, dim=1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[b].to(compute_dtype), k) * scale, dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", p, v).to(q.dtype)
    return out


def paged_attention_decode_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                                 finite_pages: bool = False) -> torch.Tensor:
    """The CPU path: the same result as the reference, batched. Every sequence's pages are gathered at
    once (one index_select per cache: 5x faster than advanced indexing on CPU) into a (B, max_blocks *
    block_size) context padded past its length, then one masked SDPA call with native GQA over the
    strided views. Per-sequence Python loops cost more than the attention itself on CPU.

    finite_pages: the caller guarantees every page slot holds finite values (the engine's caches start
    zeroed). Otherwise slots past a context may be uninitialised NaN or inf, and a masked weight of 0
    times NaN is still NaN, so the invisible rows are zeroed first (two more passes over K and V)."""
    batch, hq, d = q.shape
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    if batch == 1 and q.device.type == "cpu":
        return _decode_one(q, k_cache, v_cache, block_tables, int(context_lens[0]), scale)
    ids = block_tables.long().clamp_min(0).flatten()
    length = block_tables.shape[1] * page
    keys = k_cache.index_select(0, ids).view(batch, length, hkv, d).transpose(1, 2)
    values = v_cache.index_select(0, ids).view(batch, length, hkv, d).transpose(1, 2)
    visible = torch.arange(length, device=q.device)[None, :] < context_lens.to(q.device)[:, None]
    if not finite_pages:
        hidden = ~visible[:, None, :, None]
        keys, values = keys.masked_fill(hidden, 0), values.masked_fill(hidden, 0)
    out = F.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=visible[:, None, None, :],
                                         scale=scale, enable_gqa=hq != hkv)
    return out[:, :, 0]


def _decode_one(q, k_cache, v_cache, block_tables, n: int, scale: float) -> torch.Tensor:
    """One sequence on CPU: exactly its n tokens, so no mask; its pages as a view when they are
    consecutive blocks (as a fresh engine hands them out), else gathered. Batch-1 decode is bound by the
    weight read, and this keeps attention a small part of it."""
    page, hkv, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    ids = block_tables[0, : -(-n // page)].tolist()  # a few ints: cheaper on the host than as tensor ops
    if ids == list(range(ids[0], ids[0] + len(ids))):
        keys, values = k_cache[ids[0]:ids[0] + len(ids)], v_cache[ids[0]:ids[0] + len(ids)]
    else:
        blocks = torch.tensor(ids, device=q.device)
        keys, values = k_cache.index_select(0, blocks), v_cache.index_select(0, blocks)
    keys = keys.view(-1, hkv, d)[:n].transpose(0, 1)[None]
    values = values.view(-1, hkv, d)[:n].transpose(0, 1)[None]
    out = F.scaled_dot_product_attention(q[:, :, None, :], keys, values, scale=scale, enable_gqa=q.shape[1] != hkv)
    return out[:, :, 0]


# ----------------------------------------------------------------------------------------- checks
def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be (num_blocks, block_size, num_kv_heads, head_dim); got "
                         f"{tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}; got {tuple(v_cache.shape)}")
    if k_cache.dtype not in DTYPES or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"k_cache and v_cache must share one dtype of float32/float16/bfloat16; got "
                         f"{k_cache.dtype} and {v_cache.dtype}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous (the kernels address row slot of the "
                         "flattened (num_blocks * block_size, Hkv, D) view)")
    if not _is_pow2(k_cache.shape[1]):
        raise ValueError(f"k_cache's block_size (dim 1) must be a power of two; got {k_cache.shape[1]}")


def _want_values(validate: bool | None, device: torch.device) -> bool:
    return device.type == "cpu" if validate is None else validate


def check_store_inputs(k, v, k_cache, v_cache, slot_mapping, *, validate: bool | None = None) -> None:
    """Refuse bad inputs to :func:`store_kv` with a ValueError naming the argument. Value checks
    (slots in [-1, num_blocks * block_size), no slot written twice) read slot_mapping on the host: they
    run when ``validate`` is True, or when it is None (the default) and the tensors are on CPU."""
    _check_cache(k_cache, v_cache)
    nb, page, hkv, d = k_cache.shape
    if k.dim() != 3 or k.shape[1:] != (hkv, d):
        raise ValueError(f"k must be (T, num_kv_heads={hkv}, head_dim={d}) like the caches; got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}; got {tuple(v.shape)}")
    if k.dtype != k_cache.dtype or v.dtype != k_cache.dtype:
        raise ValueError(f"k and v must have the caches' dtype {k_cache.dtype}; got {k.dtype} and {v.dtype}")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"slot_mapping must be ({k.shape[0]},), one slot per token of k; got "
                         f"{tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"slot_mapping must be int64 (or int32); got {slot_mapping.dtype}")
    if not (k.device == v.device == k_cache.device == v_cache.device == slot_mapping.device):
        raise ValueError(f"k, v, k_cache, v_cache and slot_mapping must be on one device; got {k.device}, "
                         f"{v.device}, {k_cache.device}, {v_cache.device}, {slot_mapping.device}")
    if _want_values(validate, k.device) and slot_mapping.numel():
        bad = (slot_mapping < -1) | (slot_mapping >= nb * page)
        if bool(bad.any()):
            raise ValueError(f"slot_mapping must lie in [-1, num_blocks * block_size = {nb * page}); found "
                             f"{int(slot_mapping[bad][0])}")
        used = slot_mapping[slot_mapping >= 0]
        if used.unique().numel() != used.numel():
            raise ValueError("slot_mapping writes one slot twice (the result would depend on the order)")


def check_decode_inputs(q, k_cache, v_cache, block_tables, context_lens, scale, *,
                        validate: bool | None = None) -> None:
    """Refuse bad inputs to :func:`paged_attention_decode` with a ValueError naming the argument.
    Shape/dtype/device checks always run. Value checks (1 <= context_lens <= max_blocks * block_size,
    the block-table entries a sequence uses lie in [0, num_blocks)) read tensors on the host, which
    would synchronise a GPU (and break CUDA-graph capture): they run when ``validate`` is True, or when
    it is None (the default) and the tensors are on CPU."""
    _check_cache(k_cache, v_cache)
    nb, page, hkv, d = k_cache.shape
    if q.dim() != 3:
        raise ValueError(f"q must be (B, num_heads, head_dim); got {tuple(q.shape)}")
    if q.shape[2] != d:
        raise ValueError(f"q has head_dim={q.shape[2]} but the caches have head_dim={d}")
    if q.shape[1] % hkv:
        raise ValueError(f"q's num_heads={q.shape[1]} must be a multiple of the caches' num_kv_heads={hkv}")
    if q.dtype != k_cache.dtype:
        raise ValueError(f"q must have the caches' dtype {k_cache.dtype}; got {q.dtype}")
    batch = q.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be (B={batch}, max_blocks); got {tuple(block_tables.shape)}")
    if block_tables.shape[1] == 0:
        raise ValueError("block_tables must have at least one column (max_blocks >= 1)")
    if block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be int32; got {block_tables.dtype}")
    if context_lens.dim() != 1 or context_lens.shape[0] != batch:
        raise ValueError(f"context_lens must be (B={batch},); got {tuple(context_lens.shape)}")
    if context_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"context_lens must be int32 (or int64); got {context_lens.dtype}")
    if not (q.device == k_cache.device == v_cache.device == block_tables.device == context_lens.device):
        raise ValueError(f"q, k_cache, v_cache, block_tables and context_lens must be on one device; got "
                         f"{q.device}, {k_cache.device}, {v_cache.device}, {block_tables.device}, "
                         f"{context_lens.device}")
    if not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
        raise ValueError(f"scale must be a finite Python number > 0 (usually head_dim ** -0.5); got {scale!r}")
    if _want_values(validate, q.device) and batch:
        cap = block_tables.shape[1] * page
        lo, hi = int(context_lens.min()), int(context_lens.max())
        if lo < 1 or hi > cap:
            raise ValueError(f"context_lens must lie in [1, max_blocks * block_size = {cap}]; found "
                             f"{lo if lo < 1 else hi}")
        used = torch.arange(block_tables.shape[1], device=q.device) < (-(-context_lens // page))[:, None]
        bad = used & ((block_tables < 0) | (block_tables >= nb))
        if bool(bad.any()):
            b, j = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"block_tables[{b}, {j}] = {int(block_tables[b, j])} is used by the context but "
                             f"not a block id in [0, num_blocks = {nb})")


# ----------------------------------------------------------------------------------------- functionals
def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, *, backend: str = "auto", validate: bool | None = None) -> None:
    """Write k[t], v[t] ((T, Hkv, D), the caches' dtype, any strides) into row slot_mapping[t] of the
    flattened caches (num_blocks, block_size, Hkv, D), in place. slot_mapping (T,) int64 or int32;
    -1 skips the token (padding). ``validate``: see :func:`check_store_inputs`."""
    check_store_inputs(k, v, k_cache, v_cache, slot_mapping, validate=validate)
    chosen = resolve_backend(backend, k.device)
    if backend == "auto" and chosen == "triton" and cuda_tile("store_kv", k.dtype, k.shape[2]) is None:
        chosen = "reference"  # a head_dim past the compile-gated tile table: the PyTorch path
    if chosen == "reference":
        store_kv_reference(k, v, k_cache, v_cache, slot_mapping)
    else:
        _store_triton(k, v, k_cache, v_cache, slot_mapping.contiguous())


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, *, num_splits: int | None = None,
                           backend: str = "auto", validate: bool | None = None,
                           finite_pages: bool = False) -> torch.Tensor:
    """One decode step of attention over a paged KV cache.

    q (B, Hq, D), any strides; k_cache, v_cache (num_blocks, block_size, Hkv, D) contiguous, q's dtype
    (fp32/fp16/bf16), Hq a multiple of Hkv (query head h reads kv head h // (Hq // Hkv)); block_tables
    (B, max_blocks) int32, -1 past a sequence's blocks; context_lens (B,) int32/int64 in
    [1, max_blocks * block_size]: the cached tokens each query attends to, its own included. Returns
    softmax(q K^T * scale) V as (B, Hq, D) in q's dtype; statistics and accumulation in fp32.
    num_splits: context splits per sequence (split-K); None picks it from the shapes
    (:func:`default_num_splits`); it is clamped to [1, max_blocks]. ``validate``: see
    :func:`check_decode_inputs`. backend "auto" on CUDA runs the Triton kernels when :data:`TILES` has a
    configuration for the shape (head_dim <= 256, GQA group <= 16), the PyTorch path otherwise.
    finite_pages: every page slot holds finite values (the PyTorch path then skips zeroing the slots past
    each context; :func:`paged_attention_decode_torch`).
    """
    check_decode_inputs(q, k_cache, v_cache, block_tables, context_lens, scale, validate=validate)
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be None or an int >= 1; got {num_splits!r}")
    chosen = resolve_backend(backend, q.device)
    if backend == "auto" and chosen == "triton" and (
            cuda_tile("decode", q.dtype, q.shape[2], q.shape[1] // k_cache.shape[2]) is None):
        chosen = "reference"  # a shape past the compile-gated tile table: the PyTorch path
    if chosen == "reference":
        return paged_attention_decode_torch(q, k_cache, v_cache, block_tables, context_lens, scale, finite_pages)
    return _decode_triton(q, k_cache, v_cache, block_tables, context_lens, float(scale), num_splits)
