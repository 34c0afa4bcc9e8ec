"""Triton kernels of the LM-head log-prob / loss: the forward, the tile table, the flags and the launchers.

One chunk of C rows at a time (the driver is :func:`fastrft.kernels.linear_logprob.lm_head_chunks`):

1. ``_logits_stats_kernel``: a program owns BLOCK_N rows and one contiguous split of the vocabulary; it
   forms each logits tile as a GEMM over H with fp32 accumulation, keeps per row an online max m, a
   rescaled sum s = sum exp(z - m), the target's logit and e = sum exp(z - m) * z, and (STORE_Z) writes
   the fp32 tile z = h.W^T / T into the chunk's workspace. A tiny combine over splits gives lse, logp,
   mu = E_p[z] and the entropy lse - mu.
2. ``_dz_kernel``: elementwise over the workspace, with per-row coefficients g_logp, g_ent:
   dz = (g_logp * (onehot(target) - p) - g_ent * p * (z - mu)) / T, p = exp(z - lse), written in the
   dtype the gradient GEMMs read (bf16 for bf16 inputs, as cuBLAS's own backward does; fp32 for fp32 and
   fp16 inputs: fp16's 5-bit exponent would flush the vocabulary tail p_j * g ~ 1e-9 to zero).
3. ``_dh_kernel``: dH[rows] = dz @ W, one program per (BLOCK_M x BLOCK_N) output tile, fp32 accumulation
   over the whole vocabulary, cast once when stored.
4. ``_dw_kernel``: dW += dz^T @ h, one program per (BLOCK_M x BLOCK_N) tile of the fp32 dW buffer, which
   it reads once, accumulates over the chunk's rows, and writes once.

Kernels 2-4 and their launchers are in :mod:`fastrft.kernels.lm_head_grad_triton`. Every output tile has
exactly one owner: no atomics anywhere. Tiles come from :data:`TILES`, one entry per (kernel, dtype, shape
class); the two modules' ``compile_cases`` hand the same entries to the Hopper compile
gate (:mod:`fastrft.kernels.aot`). Under TRITON_INTERPRET=1 (tests on CPU) the interpreter computes bf16
``tl.dot`` wrongly, so bf16 tiles are upcast to fp32 there (constexpr UPCAST) and larger tiles keep it fast.
The interpreter's ``tl.dot`` is numpy's matmul, whose OpenBLAS AVX2 kernels (AMD EPYC, or any CPU with
OPENBLAS_CORETYPE=Haswell) round a row by its place in the tile, where a GPU's MMA does not: so the forward's
dot is an ordered sum over H there (constexpr ROWWISE), and a row's logits do not depend on its tile-mates.
"""

from __future__ import annotations


import torch

from fastrft.kernels.triton_support import DTYPE_NAMES as _DTYPE_NAMES
from fastrft.kernels.triton_support import HAVE_TRITON, interpreting
from fastrft.kernels.triton_support import check_launch as _check_launch

if HAVE_TRITON:
    import triton
    import triton.language as tl

# ----------------------------------------------------------------------------------------- tile table
# (kernel, dtype, shape class) -> tile. Shape classes split on the hidden size H. The GEMM tiles are the
# usual Hopper starting points (128x128 outputs, 64-deep K steps, 8 warps, 3 stages for 16-bit operands;
# fp32 and fp16 operands run fp32 dots, so their tiles are halved to stay in registers). Every entry
# passes the sm_90a compile gate (tests/kernels/test_compile_gate.py) with no spills.
_FWD_16 = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3)
_FWD_32 = dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=32, num_warps=4, num_stages=2)
_DZ = dict(BLOCK_N=16, BLOCK_V=256, num_warps=4, num_stages=1)
_GEMM_16 = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
_GEMM_32 = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2)
SHAPE_CLASSES = ("h<=1024", "h>1024")
TILES = {}
for _cls in SHAPE_CLASSES:
    TILES.update({
        ("logits_stats", "bf16", _cls): _FWD_16, ("logits_stats", "fp16", _cls): _FWD_16,
        ("logits_stats", "fp32", _cls): _FWD_32,
        ("dz", "bf16", _cls): _DZ, ("dz", "fp16", _cls): _DZ, ("dz", "fp32", _cls): _DZ,
        ("dh", "bf16", _cls): _GEMM_16, ("dh", "fp16", _cls): _GEMM_32, ("dh", "fp32", _cls): _GEMM_32,
        ("dw", "bf16", _cls): _GEMM_16, ("dw", "fp16", _cls): _GEMM_32, ("dw", "fp32", _cls): _GEMM_32,
    })
# The interpreter runs programs one by one in Python: few, large tiles keep the tests fast.
_INTERPRETER_TILES = {"logits_stats": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, num_warps=4, num_stages=1),
                      "dz": dict(BLOCK_N=128, BLOCK_V=256, num_warps=4, num_stages=1),
                      "dh": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=4, num_warps=4, num_stages=1),
                      "dw": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=1)}


def shape_class(hidden_size: int) -> str:
    return "h<=1024" if hidden_size <= 1024 else "h>1024"


def tile(kernel: str, dtype: torch.dtype, hidden_size: int, device: torch.device) -> dict:
    if device.type != "cuda":
        return _INTERPRETER_TILES[kernel]
    return TILES[(kernel, _DTYPE_NAMES[dtype], shape_class(hidden_size))]


def flags(dtype: torch.dtype) -> dict:
    """UPCAST: bf16 tiles go through fp32 (the interpreter's bf16 dot is wrong). IEEE: exact fp32 dots for
    fp32 inputs (not TF32)."""
    return dict(UPCAST=interpreting() and dtype == torch.bfloat16, IEEE=dtype == torch.float32)


def dz_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the gradient GEMMs read dz in: bf16 for bf16 inputs, else fp32. (In the interpreter the
    GEMMs upcast bf16 tiles, so the bf16 workspace is exercised there too.)"""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


# ----------------------------------------------------------------------------------------- kernels
if HAVE_TRITON:

    @triton.jit
    def _dot(a, b, acc, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a, b, acc, input_precision="ieee")
        return tl.dot(a, b, acc)

    @triton.jit
    def _logits_stats_kernel(h_ptr, w_ptr, tgt_ptr, part_ptr, z_ptr, N, V, H, stride_hn, stride_hh, stride_wv,
                             stride_wh, stride_zn, inv_temp, v_per_split, BLOCK_N: tl.constexpr,
                             BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, WITH_ENTROPY: tl.constexpr,
                             STORE_Z: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                             TEMP_PTR: tl.constexpr, ROWWISE: tl.constexpr):
        # TEMP_PTR: inv_temp is a pointer to one fp32 (a decode CUDA graph reads the temperature there).
        if TEMP_PTR:
            inv_t = tl.load(inv_temp)
        else:
            inv_t = inv_temp
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        splits = tl.num_programs(1)
        rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=0)
        m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        s = tl.zeros((BLOCK_N,), dtype=tl.float32)
        zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
        e = tl.zeros((BLOCK_N,), dtype=tl.float32)
        v_lo = pid_s.to(tl.int64) * v_per_split
        v_hi = tl.minimum(v_lo + v_per_split, V)
        for v0 in range(v_lo, v_hi, BLOCK_V):
            # Loop variables are not int64 in every Triton backend (the interpreter yields int32), so the
            # index vectors are widened explicitly before they meet a stride.
            cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
            col_ok = cols < v_hi
            acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
            for h0 in range(0, H, BLOCK_H):
                hk = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
                hk_ok = hk < H
                a = tl.load(h_ptr + rows[:, None] * stride_hn + hk[None, :] * stride_hh,
                            mask=row_ok[:, None] & hk_ok[None, :], other=0.0)
                b = tl.load(w_ptr + cols[None, :] * stride_wv + hk[:, None] * stride_wh,
                            mask=col_ok[None, :] & hk_ok[:, None], other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                if ROWWISE:  # the interpreter (flags): an ordered sum over H, whatever the row's place
                    acc = acc + tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
                else:
                    acc = _dot(a, b, acc, IEEE)
            z = acc * inv_t
            if STORE_Z:
                tl.store(z_ptr + rows[:, None] * stride_zn + cols[None, :], z,
                         mask=row_ok[:, None] & col_ok[None, :])
            z = tl.where(col_ok[None, :], z, float("-inf"))
            # Every tile holds at least one valid column (splits are non-empty), so m_new is finite.
            m_new = tl.maximum(m, tl.max(z, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(z - m_new[:, None])
            s = s * alpha + tl.sum(p, axis=1)
            if WITH_ENTROPY:
                e = e * alpha + tl.sum(p * tl.where(col_ok[None, :], z, 0.0), axis=1)  # 0 * -inf would be NaN
            zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
            m = m_new
        base = pid_s.to(tl.int64) * N + rows
        stride_k = splits.to(tl.int64) * N
        tl.store(part_ptr + base, m, mask=row_ok)
        tl.store(part_ptr + stride_k + base, s, mask=row_ok)
        tl.store(part_ptr + 2 * stride_k + base, zt, mask=row_ok)
        if WITH_ENTROPY:
            tl.store(part_ptr + 3 * stride_k + base, e, mask=row_ok)

    @triton.jit(do_not_specialize=["N"])
    def _stats_combine_kernel(part_ptr, out_ptr, N, S, WITH_ENTROPY: tl.constexpr, BLOCK_R: tl.constexpr):
        """Merge the vocabulary splits of each row in split order, one row per lane: with top = max_k m_k
        and w_k = exp(m_k - top), lse = top + ln sum_k s_k w_k, logp = sum_k zt_k - lse and
        mu = sum_k e_k w_k / sum_k s_k w_k. A row's result depends on its own partials only (the torch
        reductions this replaces pick their order by the number of rows)."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = rows < N
        stride_k = S.to(tl.int64) * N
        top = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
        at = part_ptr + rows  # split k's partials start k * N further on: the pointer steps, in 64 bits
        for k in range(0, S):
            top = tl.maximum(top, tl.load(at, mask=ok, other=0.0))
            at += N
        total = tl.zeros((BLOCK_R,), dtype=tl.float32)
        zt = tl.zeros((BLOCK_R,), dtype=tl.float32)
        e = tl.zeros((BLOCK_R,), dtype=tl.float32)
        at = part_ptr + rows
        for k in range(0, S):
            w = tl.exp(tl.load(at, mask=ok, other=0.0) - top)
            total += tl.load(at + stride_k, mask=ok, other=0.0) * w
            zt += tl.load(at + 2 * stride_k, mask=ok, other=0.0)
            if WITH_ENTROPY:
                e += tl.load(at + 3 * stride_k, mask=ok, other=0.0) * w
            at += N
        lse = top + tl.log(total)
        tl.store(out_ptr + rows, zt - lse, mask=ok)
        tl.store(out_ptr + N + rows, lse, mask=ok)
        if WITH_ENTROPY:
            mu = e / total
            tl.store(out_ptr + 2 * N + rows, lse - mu, mask=ok)
            tl.store(out_ptr + 3 * N + rows, mu, mask=ok)


# ----------------------------------------------------------------------------------------- launchers
def check_launch(device: torch.device) -> None:
    _check_launch(device, fallback="; use backend='reference' or CPU tensors")


MAX_SPLITS = 128  # vocabulary splits of the forward: enough programs for a decode step's few rows
COMBINE_ROWS = 128  # rows per program of the combine


def fixed_splits(v_blocks: int) -> int:
    """The forward's vocabulary splits, from the vocabulary alone: a row's log-partition is added in the
    same order whatever the number of rows (the exact mode, fastrft.models.exact, needs the sampler's
    one-row calls and the trainer's chunks to agree bit for bit)."""
    return max(1, min(v_blocks, MAX_SPLITS))


def logits_stats(hidden, weight, targets, temperature: float, with_entropy: bool, z_out=None,
                 splits: int | None = None, inv_temperature: torch.Tensor | None = None):
    """(logp, lse, entropy, mu), each (N,) fp32 (entropy and mu None without ``with_entropy``); with
    ``z_out`` (N, V) fp32 the logits h.W^T / T are also written there. ``inv_temperature``: a one-element
    fp32 device tensor holding 1 / T, read by the kernel instead of ``temperature`` (CUDA graphs).

    Batch-invariant: the tiles depend on dtype and hidden size, the vocabulary splits on V (unless
    ``splits`` overrides them, as tests do), and the splits are merged per row in split order, so a
    row's results do not depend on how many rows share the call."""
    check_launch(hidden.device)
    n, h = hidden.shape
    v = weight.shape[0]
    cfg = dict(tile("logits_stats", hidden.dtype, h, hidden.device))
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    n_blocks = triton.cdiv(n, cfg["BLOCK_N"])
    v_blocks = triton.cdiv(v, cfg["BLOCK_V"])
    num_splits = fixed_splits(v_blocks) if splits is None else max(1, min(splits, v_blocks, 65535))
    v_per_split = triton.cdiv(v_blocks, num_splits) * cfg["BLOCK_V"]
    num_splits = triton.cdiv(v, v_per_split)  # every split non-empty
    part = torch.empty((4, num_splits, n), dtype=torch.float32, device=hidden.device)
    store = z_out is not None
    temp_ptr = inv_temperature is not None
    _logits_stats_kernel[(n_blocks, num_splits)](
        hidden, weight, targets, part, z_out if store else part, n, v, h, hidden.stride(0), hidden.stride(1),
        weight.stride(0), weight.stride(1), z_out.stride(0) if store else 0,
        inv_temperature if temp_ptr else 1.0 / temperature, v_per_split, WITH_ENTROPY=with_entropy,
        STORE_Z=store, TEMP_PTR=temp_ptr, num_warps=warps, num_stages=stages, **cfg, **flags(hidden.dtype),
        ROWWISE=interpreting())
    out = torch.empty((4 if with_entropy else 2, n), dtype=torch.float32, device=hidden.device)
    if n:
        _stats_combine_kernel[(triton.cdiv(n, COMBINE_ROWS),)](part, out, n, num_splits, WITH_ENTROPY=with_entropy,
                                                               BLOCK_R=COMBINE_ROWS, num_warps=4, num_stages=1)
    if not with_entropy:
        return out[0], out[1], None, None
    return out[0], out[1], out[2], out[3]


# ----------------------------------------------------------------------------------------- compile gate
# Representative hidden sizes per shape class (Qwen2.5-0.5B; Qwen2.5-1.5B and Llama-3.2-1B share the
# other class) and vocabularies: H and V are multiples of 16 in every model we run, which the JIT
# launcher specialises on; the row counts N / C vary, so they are compiled without that hint.
CLASS_SHAPES = {"h<=1024": (896, 151936), "h>1024": (1536, 151936)}


def compile_cases(full: bool = False) -> list:
    """The forward's TILES entries as the CUDA launchers produce them (UPCAST off, contiguous operands: unit
    strides are constants), for the sm_90a compile gate (the gradient kernels' are in
    fastrft.kernels.lm_head_grad_triton). The CI run compiles the class of the 1-2B models; the full run
    adds the other."""
    from fastrft.kernels.aot import CompileCase, int_args

    cases = []
    for ent in (False, True):
        cases.append(CompileCase(f"lm_head.stats_combine[entropy={ent}]", _stats_combine_kernel,
                                 dict(part_ptr="*fp32", out_ptr="*fp32", N="i32", S="i32"),
                                 dict(WITH_ENTROPY=ent, BLOCK_R=COMBINE_ROWS), 4, 1))
    for (kernel, dt, cls), cfg in TILES.items():
        if kernel != "logits_stats" or (not full and cls != "h>1024"):
            continue
        cfg = dict(cfg)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        h, v = CLASS_SHAPES[cls]
        p = f"*{dt}"
        fl = dict(UPCAST=False, IEEE=dt == "fp32", ROWWISE=False)
        name = f"lm_head.{kernel}[{dt},{cls}"
        ints = int_args(N=4099, V=v, H=h, stride_hn=h, stride_hh=1, stride_wv=h, stride_wh=1, stride_zn=v,
                        v_per_split=v // 8)
        for store in (False, True):
            for ent in (False, True):
                sig = dict(h_ptr=p, w_ptr=p, tgt_ptr="*i64", part_ptr="*fp32", z_ptr="*fp32", inv_temp="fp32",
                           **ints[0])
                cases.append(CompileCase(f"{name},store_z={store},entropy={ent}]", _logits_stats_kernel, sig,
                                         dict(cfg, WITH_ENTROPY=ent, STORE_Z=store, TEMP_PTR=False, **fl, **ints[1]),
                                         warps, stages))
        # The exact decode step (fastrft.kernels.exact_triton.sample_head): logits stored, 1/T from memory.
        sig = dict(h_ptr=p, w_ptr=p, tgt_ptr="*i64", part_ptr="*fp32", z_ptr="*fp32", inv_temp="*fp32", **ints[0])
        cases.append(CompileCase(f"{name},store_z=True,entropy=False,temp_ptr=True]", _logits_stats_kernel, sig,
                                 dict(cfg, WITH_ENTROPY=False, STORE_Z=True, TEMP_PTR=True, **fl, **ints[1]),
                                 warps, stages))
    return cases
