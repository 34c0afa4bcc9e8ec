"""The exact mode's attention kernel (:mod:`fastrft.kernels.exact_triton` describes the mode's kernels):
one kernel for decode, paged prefill (chunked, prefix-cached, recomputed after preemption) and the packed
training forward, one program per (sequence, block of (token, query head) rows of one GQA group, kv
head), keys walked in 64-key tiles from 0 with an online softmax in fp32. The training backward
recomputes the attention through PyTorch's SDPA, per sequence.
"""

from __future__ import annotations

import torch

from fastrft.kernels.exact_common import (HAVE_TRITON, KEY_TILE, LOG2E, TILES, _differentiable, _flags, _Recomputed,
                                          _tile, check_launch)

if HAVE_TRITON:
    import triton
    import triton.language as tl

# ----------------------------------------------------------------------------------------- kernel
if HAVE_TRITON:

    @triton.jit(do_not_specialize=["stride_btb"])
    def _attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, cu_ptr, ctx_ptr, bt_ptr, qk_scale, D, stride_qt, stride_qh,
                          stride_kt, stride_kh, stride_ot, stride_oh, stride_btb, GROUP: tl.constexpr,
                          PAGED: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, ROWWISE: tl.constexpr):
        # Program (b, chunk, kv head): the GROUP query heads of that kv head for new tokens
        # [chunk * TOKENS, +TOKENS) of sequence b, one (token, head) pair per row. Sequence b's new tokens
        # are rows cu[b]..cu[b+1] of q and the last ones of its ctx[b] keys. Packed (not PAGED): key j of
        # the sequence is row cu[b] + j of k and v; paged: slot bt[b, j // PAGE] * PAGE + j % PAGE.
        TOKENS: tl.constexpr = BLOCK_M // GROUP
        b = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        kvh = tl.program_id(2)
        q_start = tl.load(cu_ptr + b).to(tl.int64)
        n_new = (tl.load(cu_ptr + b + 1) - tl.load(cu_ptr + b)).to(tl.int32)
        if chunk * TOKENS < n_new:
            ctx = tl.load(ctx_ptr + b).to(tl.int32)
            first = ctx - n_new
            r = tl.arange(0, BLOCK_M)
            i = chunk * TOKENS + r // GROUP
            qh = (kvh * GROUP + r % GROUP).to(tl.int64)
            row_ok = (r < TOKENS * GROUP) & (i < n_new)
            pos = first + i
            d = tl.arange(0, BLOCK_D)
            d_ok = d < D
            q_rows = q_start + i.to(tl.int64)
            q = tl.load(q_ptr + q_rows[:, None] * stride_qt + qh[:, None] * stride_qh + d[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            kv_head = kvh.to(tl.int64) * stride_kh
            hi = tl.minimum(first + (chunk + 1) * TOKENS, ctx)  # keys past the block's last query: unused
            m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
            l = tl.zeros((BLOCK_M,), dtype=tl.float32)
            acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            for t0 in range(0, hi, BLOCK_N):
                keys = t0 + tl.arange(0, BLOCK_N)
                key_ok = keys < hi
                if PAGED:
                    phys = tl.load(bt_ptr + b * stride_btb + keys // PAGE, mask=key_ok, other=0).to(tl.int64)
                    krow = phys * PAGE + (keys % PAGE).to(tl.int64)
                else:
                    krow = q_start + keys.to(tl.int64)
                kt = tl.load(k_ptr + krow[None, :] * stride_kt + kv_head + d[:, None],
                             mask=key_ok[None, :] & d_ok[:, None], other=0.0)  # K^T (BLOCK_D, BLOCK_N)
                if UPCAST:
                    kt = kt.to(tl.float32)
                if ROWWISE:
                    s = tl.sum(q.to(tl.float32)[:, :, None] * kt.to(tl.float32)[None, :, :], axis=1) * qk_scale
                elif IEEE:
                    s = tl.dot(q, kt, input_precision="ieee") * qk_scale
                else:
                    s = tl.dot(q, kt) * qk_scale
                # Causal visibility alone decides (keys <= pos < hi): the same mask on every path.
                s = tl.where(keys[None, :] <= pos[:, None], s, float("-inf"))
                # Key 0 is visible to every row, so m is finite from the first tile on; a tile a row cannot
                # see leaves m, l and acc bit-identical (rescale exactly 1, weights exactly 0).
                m_new = tl.maximum(m, tl.max(s, axis=1))
                alpha = tl.where(m_new == m, 1.0, tl.exp2(m - m_new))
                p = tl.exp2(s - m_new[:, None])
                l = l * alpha + tl.sum(p, axis=1)
                v = tl.load(v_ptr + krow[:, None] * stride_kt + kv_head + d[None, :],
                            mask=key_ok[:, None] & d_ok[None, :], other=0.0)
                acc = acc * alpha[:, None]
                if ROWWISE:
                    acc = acc + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
                elif IEEE:
                    acc = tl.dot(p, v, acc, input_precision="ieee")
                elif UPCAST:
                    acc = tl.dot(p, v.to(tl.float32), acc)
                else:
                    acc = tl.dot(p.to(v.dtype), v, acc)
                m = m_new
            out = acc / l[:, None]
            tl.store(o_ptr + q_rows[:, None] * stride_ot + qh[:, None] * stride_oh + d[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------- attention
def _attention(q, k, v, cu, ctx, tables, scale: float, max_new: int, page: int | None) -> torch.Tensor:
    """Launch ``_attention_kernel``: q (T, Hq, D) the new tokens, packed by ``cu`` (B + 1,); ctx (B,) the
    keys each sequence attends to after this step; k/v packed (T, Hkv, D) like q when ``page`` is None,
    else caches (num_blocks, page, Hkv, D) addressed through ``tables`` (B, max_blocks)."""
    check_launch(q.device)
    t, hq, d = q.shape
    hkv = k.shape[-2]
    out = torch.empty_like(q)
    batch = cu.shape[0] - 1
    if t == 0 or batch == 0:
        return out
    cfg = _tile("attention", q.dtype, q.device, d)
    warps, stages, block_m = cfg["num_warps"], cfg["num_stages"], cfg["BLOCK_M"]
    paged = page is not None
    if paged:
        rows_k = k.view(-1, hkv, d)
        stride_kt, stride_kh = rows_k.stride(0), rows_k.stride(1)
    else:  # packed k and v: both contiguous (_packed_forward), so they share strides
        stride_kt, stride_kh = k.stride(0), k.stride(1)
    group = hq // hkv
    block_m = max(block_m, triton.next_power_of_2(group))  # a block holds at least one token's query heads
    grid = (batch, triton.cdiv(max_new, block_m // group), hkv)
    _attention_kernel[grid](q, k, v, out, cu, ctx, tables if paged else cu, scale * LOG2E, d, q.stride(0), q.stride(1),
                            stride_kt, stride_kh, out.stride(0), out.stride(1), tables.stride(0) if paged else 0,
                            GROUP=hq // hkv, PAGED=paged, PAGE=page if paged else 1, BLOCK_M=block_m, BLOCK_N=KEY_TILE,
                            BLOCK_D=triton.next_power_of_2(d), num_warps=warps, num_stages=stages, **_flags(q.dtype))
    return out


def _packed_forward(q, k, v, cu_seqlens, scale: float):
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    max_len = int(lens.max()) if lens.numel() else 0
    k, v = k.contiguous(), v.contiguous()
    return _attention(q, k, v, cu_seqlens, lens, None, scale, max_len, None)


def _packed_reference(q, k, v, cu_seqlens, scale: float):
    """Causal attention per packed sequence through PyTorch SDPA (what the backward differentiates)."""
    outs = []
    for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        o = torch.nn.functional.scaled_dot_product_attention(
            q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), is_causal=True, scale=scale,
            enable_gqa=q.shape[1] != k.shape[1])
        outs.append(o.transpose(0, 1))
    return torch.cat(outs) if outs else torch.empty_like(q)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Causal attention within each packed sequence (the training forward), batch-invariant; its backward
    is PyTorch attention's, recomputed. q (T, Hq, D), k/v (T, Hkv, D), cu_seqlens (B + 1,) int32."""
    if _differentiable(q, k, v):
        return _Recomputed.apply(_packed_forward, _packed_reference, 2, q, k, v, cu_seqlens, float(scale))
    return _packed_forward(q, k, v, cu_seqlens, scale)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, context_lens: torch.Tensor,
                    block_tables: torch.Tensor, cu: torch.Tensor, max_new: int, scale: float) -> torch.Tensor:
    """Attention of a step's new tokens over the paged cache (decode or prefill, the new K/V already
    stored), batch-invariant and equal bit for bit to :func:`packed_attention` for the same token. cu (B + 1,)
    int32 bounds each sequence's new tokens in q, max_new the longest such run (decode: arange(B + 1) and 1,
    so its launches depend on shapes only, as CUDA graphs need)."""
    return _attention(q, k_cache, v_cache, cu, context_lens, block_tables, scale, max_new, k_cache.shape[1])


# ----------------------------------------------------------------------------------------- compile gate
_ATTENTION_SHAPES = {64: (9, 3), 128: (12, 2), 256: (8, 4)}  # head dim -> (Hq, Hkv): SmolLM2, Qwen2.5-1.5B, ...


def compile_cases(full: bool = False) -> list:
    """The attention kernel's CUDA launches per dtype and head-dim class, packed and paged."""
    from fastrft.kernels.aot import CompileCase, int_args

    cases = []
    for dt in ("bf16", "fp16", "fp32"):
        fl = dict(UPCAST=False, IEEE=dt == "fp32", ROWWISE=False)
        for d, (hq, hkv) in _ATTENTION_SHAPES.items():
            cfg = TILES[("attention", dt, d)]
            for paged in (False, True):
                row_k = hkv * d
                ints = int_args(D=d, stride_qt=hq * d, stride_qh=d, stride_kt=row_k, stride_kh=d, stride_ot=hq * d,
                                stride_oh=d)
                sig = dict(q_ptr=f"*{dt}", k_ptr=f"*{dt}", v_ptr=f"*{dt}", o_ptr=f"*{dt}", cu_ptr="*i32",
                           ctx_ptr="*i32", bt_ptr="*i32", qk_scale="fp32", stride_btb="i32", **ints[0])
                # fp32's exact IEEE dots run on FMA units with operands in registers: they spill a few hundred
                # bytes at every tile tried (16-32 rows, 4-8 warps); fp32 runs on CUDA are rare (bf16-mixed
                # is the default), so these compile with spills allowed, the 16-bit ones must have none.
                cases.append(CompileCase(f"exact.attention[{dt},d={d},paged={paged}]", _attention_kernel, sig,
                                         dict(GROUP=hq // hkv, PAGED=paged, PAGE=16, BLOCK_M=cfg["BLOCK_M"],
                                              BLOCK_N=KEY_TILE, BLOCK_D=d, **fl, **ints[1]),
                                         cfg["num_warps"], cfg["num_stages"], spill_free=dt != "fp32",
                                         full_only=d != 64 or dt != "bf16"))
    return cases
