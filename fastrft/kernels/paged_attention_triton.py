"""The paged KV cache's Triton kernels, their launchers and their compile cases (the algorithm, the layout and
the CUDA-graph rules: :mod:`fastrft.kernels.paged_attention`; the tile table:
:mod:`fastrft.kernels.paged_attention_tiles`).
"""

from __future__ import annotations

import functools

import torch

from fastrft.kernels.paged_attention_tiles import (_STORE_TILES, DTYPE_NAMES, GROUP_CLASSES, HEAD_DIM_CLASSES,
                                                   MAX_SPLITS, SPLIT_CLASSES, TILES, _class_of, _cuda_tile_or_raise)

from fastrft.kernels.triton_support import HAVE_TRITON, check_launch

if HAVE_TRITON:
    import triton
    import triton.language as tl

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------- kernels
if HAVE_TRITON:

    @triton.jit
    def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, H, D, stride_kt, stride_kh, stride_kd, stride_vt,
                         stride_vh, stride_vd, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        h = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
        d = tl.arange(0, BLOCK_D).to(tl.int64)
        mask = (h[:, None] < H) & (d[None, :] < D) & (slot >= 0)
        # A slot times the row size exceeds 2^31 elements in a large cache: all offsets are int64.
        dst = slot * H * D + h[:, None] * D + d[None, :]
        k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :] * stride_kd, mask=mask)
        tl.store(kc_ptr + dst, k, mask=mask)
        v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :] * stride_vd, mask=mask)
        tl.store(vc_ptr + dst, v, mask=mask)

    @triton.jit
    def _paged_attention_decode_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, ctx_ptr, out_ptr, m_ptr, l_ptr, acc_ptr,
                                       qk_scale, D, HQ, stride_row, stride_qb, stride_qh, stride_qd, stride_btb,
                                       tokens_per_split, GROUP: tl.constexpr, PAGE: tl.constexpr,
                                       BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                       DIRECT: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1)
        s = tl.program_id(2)
        splits = tl.num_programs(2)
        ctx = tl.load(ctx_ptr + b).to(tl.int32)
        lo = s * tokens_per_split
        hi = tl.minimum(lo + tokens_per_split, ctx)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        g_ok = g < GROUP
        d_ok = d < D
        qh = (kvh * GROUP + g).to(tl.int64)
        q = tl.load(q_ptr + b * stride_qb + qh[:, None] * stride_qh + d[None, :] * stride_qd,
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        q = q * qk_scale  # scale * log2(e) folded in: scores come out in log2 units for exp2
        m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
        l = tl.zeros((BLOCK_G,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
        head_off = kvh.to(tl.int64) * D + d[None, :]
        for t0 in range(lo, hi, BLOCK_N):
            tok = t0 + tl.arange(0, BLOCK_N)
            t_ok = tok < hi
            phys = tl.load(bt_ptr + b * stride_btb + tok // PAGE, mask=t_ok, other=0).to(tl.int64)
            off = (phys * PAGE + tok % PAGE)[:, None] * stride_row + head_off
            kv_ok = t_ok[:, None] & d_ok[None, :]
            k = tl.load(kc_ptr + off, mask=kv_ok, other=0.0).to(tl.float32)
            sc = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # (BLOCK_G, BLOCK_N)
            sc = tl.where(t_ok[None, :], sc, float("-inf"))
            # The tile holds at least one valid token (t0 < hi), so m_new is finite.
            m_new = tl.maximum(m, tl.max(sc, axis=1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(sc - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            v = tl.load(vc_ptr + off, mask=kv_ok, other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m = m_new
        if DIRECT:
            out = acc / l[:, None]
            tl.store(out_ptr + (b * HQ + qh[:, None]) * D + d[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=g_ok[:, None] & d_ok[None, :])
        else:
            row = (b * HQ + qh) * splits + s
            tl.store(m_ptr + row, m, mask=g_ok)
            tl.store(l_ptr + row, l, mask=g_ok)
            tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _paged_attention_combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, D, S, BLOCK_S: tl.constexpr,
                                        BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # b * HQ + q_head
        s = tl.arange(0, BLOCK_S)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # columns [pid1 * BLOCK_D, +BLOCK_D) of the row
        s_ok = s < S
        d_ok = d < D
        m = tl.load(m_ptr + row * S + s, mask=s_ok, other=float("-inf"))
        l = tl.load(l_ptr + row * S + s, mask=s_ok, other=0.0)
        acc = tl.load(acc_ptr + (row * S + s)[:, None] * D + d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                      other=0.0)
        w = tl.exp2(m - tl.max(m, axis=0))  # empty splits: 2^-inf = 0
        out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l, axis=0)
        tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


# ----------------------------------------------------------------------------------------- launchers
def _launch_check(device: torch.device) -> None:
    check_launch(device, fallback="; use backend='reference' or CPU tensors")


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    # A host-side property query: no stream work, safe inside CUDA-graph capture.
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_num_splits(batch: int, num_kv_heads: int, max_blocks: int, block_size: int,
                       device: torch.device) -> int:
    """Splits per sequence from shapes only: enough programs to fill the GPU when B * Hkv is small, at
    most one split per 512 tokens of block-table capacity, at most 16. 1 off-GPU (the interpreter
    runs programs one at a time, so splitting only adds work there)."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    fill = -(-2 * sms // max(batch * num_kv_heads, 1))
    by_len = -(-max_blocks * block_size // 512)
    return max(1, min(16, fill, by_len))


def _store_triton(k, v, k_cache, v_cache, slot_mapping, cuda_tiles: bool | None = None) -> None:
    """cuda_tiles: take the tile from TILES (None: on CUDA tensors; tests pass True to run the CUDA
    tiles through the interpreter)."""
    _launch_check(k.device)
    t, h, d = k.shape
    if t == 0:
        return
    block_d = triton.next_power_of_2(d)
    use_table = k.device.type == "cuda" if cuda_tiles is None else cuda_tiles
    if use_table:
        tile = _cuda_tile_or_raise("store_kv", k.dtype, d)
        block_h, num_warps, num_stages = min(triton.next_power_of_2(h), tile["BLOCK_H"]), tile["num_warps"], \
            tile["num_stages"]
    else:
        block_h, num_warps, num_stages = triton.next_power_of_2(h), 4, 1  # the interpreter: all heads at once
    _store_kv_kernel[(t, triton.cdiv(h, block_h))](k, v, k_cache, v_cache, slot_mapping, h, d, *k.stride(), *v.stride(),
                                                   BLOCK_H=block_h, BLOCK_D=block_d, num_warps=num_warps,
                                                   num_stages=num_stages)


def _decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale: float, num_splits: int | None,
                   cuda_tiles: bool | None = None):
    """cuda_tiles: as for :func:`_store_triton`."""
    _launch_check(q.device)
    batch, hq, d = q.shape
    _, page, hkv, _ = k_cache.shape
    max_blocks = block_tables.shape[1]
    out = torch.empty((batch, hq, d), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    block_tables = block_tables.contiguous()  # no-ops for the engine's tensors; copies are graph-safe
    context_lens = context_lens.contiguous()
    if num_splits is None:
        num_splits = default_num_splits(batch, hkv, max_blocks, page, q.device)
    blocks_per_split = -(-max_blocks // max(1, min(num_splits, MAX_SPLITS)))
    num_splits = -(-max_blocks // blocks_per_split)  # no split lies wholly past the block table
    group = hq // hkv
    block_g, block_d = triton.next_power_of_2(group), triton.next_power_of_2(d)
    direct = num_splits == 1
    use_table = q.device.type == "cuda" if cuda_tiles is None else cuda_tiles
    if use_table:
        tile = _cuda_tile_or_raise("decode", q.dtype, d, group)  # the compile-gated table above
        block_n, num_warps, num_stages = tile["BLOCK_N"], tile["num_warps"], tile["num_stages"]
        if not direct:
            combine = _cuda_tile_or_raise("combine", q.dtype, d, num_splits)
            combine_d, combine_warps, combine_stages = min(block_d, combine["BLOCK_D"]), combine["num_warps"], \
                combine["num_stages"]
    else:
        block_n, num_warps, num_stages = 256, 1, 1  # the interpreter: few, large tiles
        combine_d, combine_warps, combine_stages = block_d, 1, 1
    if direct:
        m = l = acc = out  # placeholders, never touched behind DIRECT
    else:
        m = torch.empty((batch, hq, num_splits), dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        acc = torch.empty((batch, hq, num_splits, d), dtype=torch.float32, device=q.device)
    _paged_attention_decode_kernel[(batch, hkv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, m, l, acc, scale * LOG2E, d, hq, hkv * d,
        *q.stride(), block_tables.stride(0), blocks_per_split * page, GROUP=group, PAGE=page, BLOCK_G=block_g,
        BLOCK_N=block_n, BLOCK_D=block_d, DIRECT=direct, num_warps=num_warps, num_stages=num_stages)
    if not direct:
        _paged_attention_combine_kernel[(batch * hq, triton.cdiv(d, combine_d))](
            m, l, acc, out, d, num_splits, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=combine_d,
            num_warps=combine_warps, num_stages=combine_stages)
    return out


# ----------------------------------------------------------------------------------------- compile gate
# Representative launches for compile_cases: the engine's default block size and a CUDA-graph block
# table for max_model_len 4096 (256 columns of 16 tokens), q/k/v (T, heads, head_dim) contiguous as
# the model's attention produces them.
MODEL_SHAPES = {"qwen2.5-0.5b": (14, 2, 64), "qwen2.5-1.5b": (12, 2, 128), "llama-3.2-1b": (32, 8, 64)}
ENGINE_PAGE = 16
_TABLE_WIDTH = 256


def _decode_case(dtype: str, hq: int, hkv: int, d: int, page: int, direct: bool, name: str, full_only: bool):
    from fastrft.kernels.aot import CompileCase, int_args

    group = hq // hkv
    tile = TILES[("decode", dtype, _class_of(triton.next_power_of_2(d), HEAD_DIM_CLASSES),
                  _class_of(triton.next_power_of_2(group), GROUP_CLASSES))]
    ptr = "*" + dtype
    stats = ptr if direct else "*fp32"  # DIRECT passes the output as placeholders for m, l and acc
    blocks_per_split = _TABLE_WIDTH if direct else 16
    ints, consts = int_args(D=d, HQ=hq, stride_row=hkv * d, stride_qb=hq * d, stride_qh=d, stride_qd=1,
                            stride_btb=_TABLE_WIDTH, tokens_per_split=blocks_per_split * page)
    sig = dict(q_ptr=ptr, kc_ptr=ptr, vc_ptr=ptr, bt_ptr="*i32", ctx_ptr="*i32", out_ptr=ptr, m_ptr=stats,
               l_ptr=stats, acc_ptr=stats, qk_scale="fp32", **ints)
    consts.update(GROUP=group, PAGE=page, BLOCK_G=triton.next_power_of_2(group), BLOCK_N=tile["BLOCK_N"],
                  BLOCK_D=triton.next_power_of_2(d), DIRECT=direct)
    return CompileCase(name, _paged_attention_decode_kernel, sig, consts, tile["num_warps"], tile["num_stages"],
                       full_only=full_only)


def _combine_case(dtype: str, d: int, splits: int, name: str, full_only: bool):
    from fastrft.kernels.aot import CompileCase, int_args

    tile = TILES[("combine", dtype, _class_of(triton.next_power_of_2(d), HEAD_DIM_CLASSES),
                  _class_of(triton.next_power_of_2(splits), SPLIT_CLASSES))]
    ints, consts = int_args(D=d, S=splits)
    sig = dict(m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32", out_ptr="*" + dtype, **ints)
    consts.update(BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=min(triton.next_power_of_2(d), tile["BLOCK_D"]))
    return CompileCase(name, _paged_attention_combine_kernel, sig, consts, tile["num_warps"], tile["num_stages"],
                       full_only=full_only)


def _store_case(dtype: str, hkv: int, d: int, name: str, full_only: bool):
    from fastrft.kernels.aot import CompileCase, int_args

    tile = TILES[("store_kv", dtype, _class_of(triton.next_power_of_2(d), HEAD_DIM_CLASSES))]
    ptr = "*" + dtype
    ints, consts = int_args(H=hkv, D=d, stride_kt=hkv * d, stride_kh=d, stride_kd=1, stride_vt=hkv * d,
                            stride_vh=d, stride_vd=1)
    sig = dict(k_ptr=ptr, v_ptr=ptr, kc_ptr=ptr, vc_ptr=ptr, slot_ptr="*i64", **ints)
    consts.update(BLOCK_H=min(triton.next_power_of_2(hkv), tile["BLOCK_H"]), BLOCK_D=triton.next_power_of_2(d))
    return CompileCase(name, _store_kv_kernel, sig, consts, tile["num_warps"], tile["num_stages"],
                       full_only=full_only)


def compile_cases(full: bool) -> list:
    """The CUDA launches of this module as :class:`fastrft.kernels.aot.CompileCase`s (the compile
    gate's protocol). Always: the model shapes of MODEL_SHAPES at the engine's block size in every
    dtype, decode on both paths (split-K and DIRECT), combine and store_kv. ``full`` adds every entry of
    TILES at its class's largest shape, and other block sizes. Without full, the ``full_only`` cases
    are still listed (the caller drops them)."""
    if not HAVE_TRITON:
        raise RuntimeError("compile_cases needs the triton package")
    cases = []
    for dt in DTYPE_NAMES.values():
        for model, (hq, hkv, d) in MODEL_SHAPES.items():
            for direct in (False, True):
                path = "direct" if direct else "split"
                cases.append(_decode_case(dt, hq, hkv, d, ENGINE_PAGE, direct, f"pa-decode-{path}-{dt}-{model}", False))
            cases.append(_store_case(dt, hkv, d, f"pa-store_kv-{dt}-{model}", False))
        for d in sorted({shape[2] for shape in MODEL_SHAPES.values()}):
            cases.append(_combine_case(dt, d, 12, f"pa-combine-{dt}-d{d}-s12", False))
    # Full: every table entry at its class's largest shape, then other block sizes.
    for key in TILES:
        kernel, dt, d = key[:3]
        if kernel == "decode":
            g = key[3]
            for direct in (False, True):
                path = "direct" if direct else "split"
                cases.append(_decode_case(dt, 2 * g, 2, d, ENGINE_PAGE, direct, f"pa-decode-{path}-{dt}-d{d}-g{g}",
                                          True))
        elif kernel == "combine":
            cases.append(_combine_case(dt, d, key[3], f"pa-combine-{dt}-d{d}-s{key[3]}", True))
        else:
            hkv = _STORE_TILES[d][0]  # a full BLOCK_H of heads
            cases.append(_store_case(dt, hkv, d, f"pa-store_kv-{dt}-d{d}-h{hkv}", True))
    for page in (1, 8, 32, 256):
        for model, (hq, hkv, d) in MODEL_SHAPES.items():
            cases.append(_decode_case("bf16", hq, hkv, d, page, False, f"pa-decode-split-bf16-{model}-page{page}",
                                      True))
    return cases
