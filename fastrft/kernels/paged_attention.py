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

Tiles: CUDA launches take their tile sizes and num_warps from :data:`TILES`, one table keyed by
(kernel, dtype, shape class); :func:`compile_cases` lists every entry for the compile gate
(``fastrft.kernels.aot``, ``tests/test_compile_gate.py``), which compiles them for sm_90a and refuses
register spills. The interpreter keeps its own few-large-tiles choice.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from fastrft.kernels.linear_logprob import BACKENDS, DTYPES, resolve_backend

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs run the reference
    HAVE_TRITON = False

__all__ = ["BACKENDS", "check_decode_inputs", "check_store_inputs", "paged_attention_decode",
           "paged_attention_decode_reference", "store_kv", "store_kv_reference"]

LOG2E = 1.4426950408889634
MAX_SPLITS = 256


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
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _launch_check(device: torch.device) -> None:
    if not HAVE_TRITON:
        raise RuntimeError("the Triton backend needs the triton package (pip install triton); "
                           "use backend='reference' or CPU tensors")
    if device.type != "cuda" and not _interpreting():
        raise RuntimeError("the Triton backend needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                           "fastrft.kernels is imported (CPU interpreter, for tests)")


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


# ----------------------------------------------------------------------------------------- CUDA tiles
# The tile configurations of the CUDA launches, in ONE table: (kernel, dtype, shape class) -> config.
# The launchers read it; compile_cases() enumerates every entry, and tests/test_compile_gate.py compiles
# them for Hopper (sm_90a) and fails on any register spill or shared memory past 227 KiB. To tune a
# tile, edit its entry here and rerun the gate (python -m fastrft.kernels.aot --full).
#
# Shape classes: head_dim class = the smallest of HEAD_DIM_CLASSES >= BLOCK_D (next_power_of_2(head_dim));
# an entry's tile is checked at the class's largest shape, so smaller shapes of the class use fewer
# registers. decode: (head_dim class, BLOCK_G = next_power_of_2(Hq // Hkv)); combine: (head_dim class,
# split class >= BLOCK_S = next_power_of_2(num_splits)), BLOCK_D caps the columns one program merges (the
# grid covers the rest; every column is the same reduction over the splits); store_kv: (head_dim class,),
# BLOCK_H caps the kv heads one program copies (the grid covers the rest).
#
# decode's register footprint is the (BLOCK_G, BLOCK_N, BLOCK_D) fp32 score/value product plus the
# (BLOCK_N, BLOCK_D) int64 addresses of the K/V tile. Measured with ptxas (triton 3.7.1, sm_90a): at most
# 64 product elements and 32 addresses per thread stays spill-free with headroom (<= ~200 registers);
# 128 product elements per thread (the old BLOCK_G=8, BLOCK_N=16, BLOCK_D=128 at 4 warps) spilled at
# 255 registers. Past 8 warps a thread may hold only 65536 / threads registers (128 at 16 warps), hence
# 8 warps at most here.
HEAD_DIM_CLASSES = (64, 128, 256)
GROUP_CLASSES = (1, 2, 4, 8, 16)
SPLIT_CLASSES = (16, 64, 256)  # MAX_SPLITS = 256 bounds BLOCK_S
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

_DECODE_TILES = {  # (head_dim class, BLOCK_G) -> (BLOCK_N, num_warps); num_stages 3 (Triton's default)
    (64, 1): (32, 4), (64, 2): (32, 4), (64, 4): (16, 4), (64, 8): (16, 4), (64, 16): (16, 8),
    (128, 1): (32, 4), (128, 2): (32, 4), (128, 4): (16, 4), (128, 8): (16, 8), (128, 16): (8, 8),
    (256, 1): (16, 4), (256, 2): (8, 4), (256, 4): (8, 4), (256, 8): (8, 8), (256, 16): (4, 8),
}
_COMBINE_TILES = {  # (head_dim class, split class) -> (BLOCK_D columns per program, num_warps)
    (64, 16): (64, 4), (64, 64): (64, 4), (64, 256): (64, 8),
    (128, 16): (128, 4), (128, 64): (128, 4), (128, 256): (64, 8),
    (256, 16): (256, 4), (256, 64): (128, 4), (256, 256): (64, 8),
}
_STORE_TILES = {64: (32, 4), 128: (16, 4), 256: (8, 4)}  # head_dim class -> (BLOCK_H, num_warps)

# The same tiles for every dtype today; an entry may be overridden per dtype when tuned on a GPU.
TILES: dict[tuple, dict] = {}
for _dt in DTYPE_NAMES.values():
    for (_d, _g), (_n, _w) in _DECODE_TILES.items():
        TILES[("decode", _dt, _d, _g)] = dict(BLOCK_N=_n, num_warps=_w, num_stages=3)
    for (_d, _s), (_c, _w) in _COMBINE_TILES.items():
        TILES[("combine", _dt, _d, _s)] = dict(BLOCK_D=_c, num_warps=_w, num_stages=3)
    for _d, (_h, _w) in _STORE_TILES.items():
        TILES[("store_kv", _dt, _d)] = dict(BLOCK_H=_h, num_warps=_w, num_stages=3)


def _class_of(n: int, classes: tuple) -> int | None:
    return next((c for c in classes if n <= c), None)


def cuda_tile(kernel: str, dtype: torch.dtype, head_dim: int, other: int | None = None) -> dict | None:
    """The table's configuration for a CUDA launch, or None when the shape lies outside every class
    (head_dim > 256, a GQA group > 16). ``other``: the group size for "decode", num_splits for
    "combine". Shapes only: safe inside CUDA-graph capture."""
    block_d = triton.next_power_of_2(head_dim)
    key = (kernel, DTYPE_NAMES.get(dtype), _class_of(block_d, HEAD_DIM_CLASSES))
    if kernel == "decode":
        key += (_class_of(triton.next_power_of_2(other), GROUP_CLASSES),)
    elif kernel == "combine":
        key += (_class_of(triton.next_power_of_2(other), SPLIT_CLASSES),)
    return TILES.get(key)


def _cuda_tile_or_raise(kernel: str, dtype: torch.dtype, head_dim: int, other: int | None = None) -> dict:
    tile = cuda_tile(kernel, dtype, head_dim, other)
    if tile is None:
        what = f"head_dim={head_dim}" + (f", GQA group={other}" if kernel == "decode" else "")
        raise ValueError(f"the Triton {kernel} kernel has no CUDA tile configuration for {what} (head_dim <= "
                         f"{HEAD_DIM_CLASSES[-1]}, group <= {GROUP_CLASSES[-1]}); use backend='auto' or "
                         f"'reference', or add an entry to fastrft.kernels.paged_attention.TILES and run the "
                         f"compile gate (tests/test_compile_gate.py)")
    return tile


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
