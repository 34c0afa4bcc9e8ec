"""Batch-invariant Triton kernels: the exact on-policy mode on CUDA (:mod:`fastrft.models.exact`).

The sampler's log-prob of a token must equal the trainer's bit for bit, so every op of the decoder must
compute a token's values in one order whatever else shares its launch: one row in a decode step, a few
hundred in a prefill, thousands in the packed training forward. cuBLAS and PyTorch's reductions choose
their algorithm (split-K, the threads per row) by the problem size, so the exact mode runs its forward
through these kernels instead. Each one gives an output element one order that depends on compile-time
constants only:

- **no split reductions**: a GEMM output tile owns all of K, a norm row is one program, a query's
  attention one program walking its keys in order;
- **one configuration per (dtype, shape class)**, never by the row count, and the row count is not even
  specialised (``do_not_specialize``), so one compiled kernel serves 1 row and 4,096;
- **rows are independent inside a tile**: a row of ``tl.dot`` reads its own operands only.

Kernels:

- ``_linear_kernel``: y = x W^T (+ b), (BLOCK_M x BLOCK_N) output tiles, K walked in BLOCK_K steps, fp32
  accumulation, one cast at the store. The backward is PyTorch's (only the forward must match).
- ``_rms_norm_kernel``: one row per program on CUDA (blocks of rows in the interpreter), each row's sum of
  squares one ``tl.sum`` over the padded row; the normalised row is cast to the input dtype before the
  weight multiplies it, as :class:`RMSNorm` does.
- ``_attention_kernel``: causal attention for the three callers, one program per (sequence, block of
  (token, query head) rows of one GQA group, kv head). Keys are read in 64-key tiles (:data:`KEY_TILE`)
  from 0 up, with an online softmax in fp32 (exp2 units). Decode (one query), paged prefill (chunked, prefix-cached,
  recomputed after preemption) and the packed training forward differ only in where a key's row is and
  how many tiles the block walks: a query's visible keys sit in the same tiles on every path, and a tile
  it cannot see leaves its state untouched bit for bit (its scores are -inf: the running max does not
  move, the rescale is exactly 1, its weights are exactly 0). The training backward recomputes the
  attention through PyTorch's SDPA, per sequence.
- The LM head and the log-partition: :func:`fastrft.kernels.lm_head_triton.logits_stats`, the trainer's
  fused forward, whose vocabulary splits depend on V only and whose split merge runs per row in split
  order. :func:`sample_head` runs it on the decode rows (logits stored, 1/T read from memory, so it
  sits inside the decode CUDA graph), draws the token from those logits with the Triton sampler, and
  takes logp = z_token - lse: the trainer's z, lse and subtraction, so the trainer's log-prob.

Tiles come from :data:`TILES` on CUDA (checked for sm_90a by the compile gate, :func:`compile_cases`) and
from :data:`INTERPRETER_TILES` under ``TRITON_INTERPRET=1`` (tests on CPU), where bf16 tiles are upcast to
fp32 (the interpreter's bf16 ``tl.dot`` is wrong) and every dot is an ordered sum over K (constexpr ROWWISE):
the interpreter's ``tl.dot`` is numpy's matmul, whose OpenBLAS AVX2 kernels round a row by its place in the
tile, which a GPU's MMA does not.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs: the exact mode runs its PyTorch ops (fastrft.models.exact)
    HAVE_TRITON = False

LOG2E = 1.4426950408889634
KEY_TILE = 64  # keys per attention tile, as in the CPU path (fastrft.models.tiled_attention.TILE)
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# ----------------------------------------------------------------------------------------- tiles
# (kernel, dtype, shape class) -> launch configuration. Shape classes: linear by nothing (one tile per
# dtype: M, N and K vary freely and the tile never follows them), attention by BLOCK_D (the head dim
# rounded up to a power of two). 16-bit operands run tensor-core dots (64-row tiles: one Hopper
# warpgroup MMA); fp32 operands run exact IEEE dots, with smaller tiles. Every entry passes the sm_90a
# compile gate (tests/test_compile_gate.py) with no spills.
TILES: dict[tuple, dict] = {}
for _dt in ("bf16", "fp16"):
    TILES[("linear", _dt)] = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3)
    for _d, _w in ((64, 4), (128, 8), (256, 8)):
        TILES[("attention", _dt, _d)] = dict(BLOCK_M=64, num_warps=_w, num_stages=2)
TILES[("linear", "fp32")] = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2)
for _d, _w in ((64, 4), (128, 8), (256, 8)):
    TILES[("attention", "fp32", _d)] = dict(BLOCK_M=16, num_warps=_w, num_stages=1)
ATTENTION_DIMS = (64, 128, 256)
# The interpreter runs programs one at a time in Python: few, large tiles (the results are not compared
# with CUDA's, only with each other and with a float64 reference); a row-wise dot's (M, K, N) product stays
# within Triton's 2^20 elements.
INTERPRETER_TILES = {"linear": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=1),
                     "attention": dict(BLOCK_M=64, num_warps=4, num_stages=1), "rms_norm": dict(ROWS=64)}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device) -> bool:
    """Whether these kernels can run on ``device``: CUDA with triton, or anything in the interpreter."""
    return HAVE_TRITON and (device.type == "cuda" or interpreting())


def _flags(dtype: torch.dtype) -> dict:
    """UPCAST: bf16 tiles through fp32 (the interpreter's bf16 dot is wrong). IEEE: exact fp32 dots.
    ROWWISE: in the interpreter, dots as an ordered sum over K (fastrft.kernels.lm_head_triton.flags)."""
    return dict(UPCAST=interpreting() and dtype != torch.float32, IEEE=dtype == torch.float32,
                ROWWISE=interpreting())


_CUDA_TILES = False  # tests: run CUDA's tiles (and one-row norm programs) through the interpreter


class cuda_tiles:
    """Context manager for tests: the launchers use :data:`TILES` (the CUDA configurations) on CPU
    tensors too, so the interpreter runs the very launches a GPU would get."""

    def __enter__(self):
        global _CUDA_TILES
        self._old, _CUDA_TILES = _CUDA_TILES, True

    def __exit__(self, *exc):
        global _CUDA_TILES
        _CUDA_TILES = self._old


def _cuda_launch(device: torch.device) -> bool:
    return device.type == "cuda" or _CUDA_TILES


def _tile(kernel: str, dtype: torch.dtype, device: torch.device, head_dim: int | None = None) -> dict:
    if not _cuda_launch(device):
        return dict(INTERPRETER_TILES[kernel])
    key = (kernel, DTYPE_NAMES[dtype])
    if kernel == "attention":
        block_d = triton.next_power_of_2(head_dim)
        cls = next((c for c in ATTENTION_DIMS if block_d <= c), None)
        if cls is None:
            raise ValueError(f"exact attention supports head_dim <= {ATTENTION_DIMS[-1]}; got {head_dim} "
                             "(use --exact-logprobs off)")
        key += (cls,)
    return dict(TILES[key])


# ----------------------------------------------------------------------------------------- kernels
if HAVE_TRITON:

    @triton.jit(do_not_specialize=["M"])
    def _linear_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                       HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       UPCAST: tl.constexpr, IEEE: tl.constexpr, ROWWISE: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
            k_ok = ks < K
            a = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            b = tl.load(w_ptr + cols[None, :] * stride_wn + ks[:, None], mask=col_ok[None, :] & k_ok[:, None],
                        other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            # inline, not a nested jit call: the interpreter re-patches builtins for every such call
            if ROWWISE:
                acc = acc + tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
            elif IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])

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

    @triton.jit(do_not_specialize=["R"])
    def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, R, D, stride_x, stride_y, eps, ROWS: tl.constexpr,
                              BLOCK_D: tl.constexpr):
        r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        d = tl.arange(0, BLOCK_D)
        ok = (r < R)[:, None] & (d < D)[None, :]
        x = tl.load(x_ptr + r[:, None] * stride_x + d[None, :], mask=ok, other=0.0)
        xf = x.to(tl.float32)
        inv = tl.rsqrt(tl.sum(xf * xf, axis=1) / D + eps)
        h = (xf * inv[:, None]).to(x.dtype).to(tl.float32)
        w = tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32)
        tl.store(y_ptr + r[:, None] * stride_y + d[None, :], (w[None, :] * h).to(y_ptr.dtype.element_ty), mask=ok)


def check_model(head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse, before anything runs, a model these kernels have no CUDA tile for (ValueError)."""
    check_launch(device)
    if _cuda_launch(device):
        _tile("attention", dtype, device, head_dim)


def check_launch(device: torch.device) -> None:
    if not HAVE_TRITON:
        raise RuntimeError("the exact mode's Triton kernels need the triton package (pip install triton)")
    if device.type != "cuda" and not interpreting():
        raise RuntimeError("the exact mode's Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before "
                           "fastrft.kernels is imported (CPU interpreter, for tests)")


# ----------------------------------------------------------------------------------------- linear
def linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) by ``_linear_kernel`` (no autograd); x (..., K), weight (N, K)."""
    check_launch(x.device)
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    m, k = rows.shape
    n = w.shape[0]
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m:
        cfg = _tile("linear", x.dtype, x.device)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
        _linear_kernel[grid](rows, w, bias if bias is not None else w, y, m, n, k, rows.stride(0), w.stride(0),
                             y.stride(0), HAS_BIAS=bias is not None, num_warps=warps, num_stages=stages, **cfg,
                             **_flags(x.dtype))
    return y.view(*x.shape[:-1], n)


def linear_backward(ctx, g):
    """The plain backward of y = x W^T + b for an autograd Function whose forward saved (x, weight) and set
    ``ctx.has_bias`` (this module's exact linear and the CPU one of fastrft.models.exact): PyTorch's GEMMs,
    since only the forward has to be batch-invariant."""
    x, weight = ctx.saved_tensors
    g2 = g.reshape(-1, g.shape[-1])
    gx = (g2 @ weight.to(g2.dtype)).view(x.shape).to(x.dtype) if ctx.needs_input_grad[0] else None
    gw = (g2.T @ x.reshape(-1, x.shape[-1]).to(g2.dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
    gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return gx, gw, gb


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return linear_forward(x, weight, bias)

    backward = staticmethod(linear_backward)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The exact linear layer: the Triton forward, PyTorch's backward."""
    if _differentiable(x, weight, bias):
        return _Linear.apply(x, weight, bias)
    return linear_forward(x, weight, bias)


# ----------------------------------------------------------------------------------------- RMSNorm
def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    check_launch(x.device)
    d = x.shape[-1]
    rows = x.reshape(-1, d)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    r = rows.shape[0]
    if r:
        # One row per program on CUDA; blocks of rows in the interpreter. Either way a row is reduced alone.
        rows_per = 1 if _cuda_launch(x.device) else INTERPRETER_TILES["rms_norm"]["ROWS"]
        _rms_norm_kernel[(triton.cdiv(r, rows_per),)](rows, weight.contiguous(), out, r, d, rows.stride(0),
                                                      out.stride(0), float(eps), ROWS=rows_per,
                                                      BLOCK_D=triton.next_power_of_2(d),
                                                      num_warps=4 if d <= 4096 else 8, num_stages=1)
    return out.view(*x.shape[:-1], d)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """fastrft.models.layers.RMSNorm's formula (the backward differentiates this)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class _Recomputed(torch.autograd.Function):
    """forward: ``exact(*args)``; backward: the gradient of ``reference(*args)``, recomputed (the training
    backward need not be batch-invariant, only the forward's values)."""

    @staticmethod
    def forward(ctx, exact, reference, n_static, *args):
        ctx.reference, ctx.n_static = reference, n_static
        ctx.save_for_backward(*args[:len(args) - n_static])
        ctx.static = args[len(args) - n_static:]
        return exact(*args)

    @staticmethod
    def backward(ctx, g):
        tensors = [t.detach().requires_grad_(t.is_floating_point() and need)
                   for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[3:])]
        with torch.enable_grad():
            out = ctx.reference(*tensors, *ctx.static)
        wanted = [t for t in tensors if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, g, allow_unused=True) if wanted else ())
        return (None, None, None, *[next(grads) if t.requires_grad else None for t in tensors],
                *[None] * ctx.n_static)


def _differentiable(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The exact RMSNorm: the Triton forward; the backward of :func:`rms_norm_reference`."""
    if _differentiable(x, weight):
        return _Recomputed.apply(rms_norm_forward, rms_norm_reference, 1, x, weight, float(eps))
    return rms_norm_forward(x, weight, eps)


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


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta, scale: float) -> torch.Tensor:
    """Attention of a step's new tokens over the paged cache (decode or prefill, the new K/V already
    stored), batch-invariant and equal bit for bit to :func:`packed_attention` for the same token.
    Decode launches depend on shapes only (CUDA graphs); a prefill reads its longest new run once and
    keeps it on ``meta``."""
    if meta.is_prefill:
        cached = getattr(meta, "tile_plan", None)
        if not isinstance(cached, tuple):
            cu = meta.cu_seqlens_q
            cached = meta.tile_plan = (cu, int((cu[1:] - cu[:-1]).max()))
    else:
        cached = getattr(meta, "tile_plan", None)
        if not isinstance(cached, tuple) or cached[0].shape[0] != q.shape[0] + 1:
            cached = meta.tile_plan = (torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device), 1)
    cu, max_new = cached
    return _attention(q, k_cache, v_cache, cu, meta.context_lens, meta.block_tables, scale, max_new, k_cache.shape[1])


# ----------------------------------------------------------------------------------------- LM head + sampler
def sample_head(hidden: torch.Tensor, weight: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor,
                inv_temperature: torch.Tensor | float) -> torch.Tensor:
    """Draw one token per row of ``hidden`` (B, H) from softmax(hidden W^T / T); returns the sampler's
    (2, B) int32 draws (row 0 tokens, -1 for a bad row; row 1 the fp32 log-prob bits).

    The logits z and the log-partition lse come from the trainer's own kernel
    (:func:`fastrft.kernels.lm_head_triton.logits_stats`); the token from the Triton sampler over those z
    (their Gumbel race at T = 1: z is already divided by T); logp = z_token - lse, the trainer's
    subtraction. inv_temperature: 1/T (0: greedy, logits and log-prob at T = 1), a float or a one-element
    fp32 device tensor (what a decode CUDA graph reads)."""
    from fastrft.kernels import lm_head_triton as head
    from fastrft.kernels.sampling import sample_tokens

    b, v = hidden.shape[0], weight.shape[0]
    if not isinstance(inv_temperature, torch.Tensor):
        inv_temperature = torch.full((1,), float(inv_temperature), dtype=torch.float32, device=hidden.device)
    greedy = inv_temperature == 0
    inv_t = torch.where(greedy, torch.ones_like(inv_temperature), inv_temperature)
    z = torch.empty((b, v), dtype=torch.float32, device=hidden.device)
    dummy = torch.zeros(b, dtype=torch.long, device=hidden.device)
    _, lse, _, _ = head.logits_stats(hidden, weight, dummy, 1.0, False, z_out=z, inv_temperature=inv_t)
    # The Triton sampler on CUDA; its PyTorch twin (the same token, bit for bit: tests/test_sampling.py) in
    # the interpreter, where the Triton one costs 60 ms a step.
    draws = sample_tokens(z, seeds, positions, (~greedy).float())
    tokens = draws[0]
    z_tok = z.gather(1, tokens.clamp(0, v - 1).long()[:, None]).squeeze(1)
    logp = z_tok - lse
    return torch.stack([tokens, logp.view(torch.int32)])


# ----------------------------------------------------------------------------------------- compile gate
# Representative shapes: SmolLM2-135M (H 576, 9/3 heads of 64), Qwen2.5-1.5B (H 1536, 12/2 heads of 128).
_LINEAR_SHAPES = {"smollm2": ((576, 576), (576, 1536), (1536, 576)), "qwen2.5-1.5b": ((1536, 256), (8960, 1536))}
_ATTENTION_SHAPES = {64: (9, 3), 128: (12, 2), 256: (8, 4)}


def compile_cases(full: bool = False) -> list:
    """The exact mode's CUDA launches: the linear kernel per dtype and model shape, the norm per width,
    and the attention kernel per dtype and head-dim class, packed and paged."""
    from fastrft.kernels.aot import CompileCase, int_args

    cases = []
    for dt in ("bf16", "fp16", "fp32"):
        cfg = dict(TILES[("linear", dt)])
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        fl = dict(UPCAST=False, IEEE=dt == "fp32", ROWWISE=False)
        for model, shapes in _LINEAR_SHAPES.items():
            for k, n in shapes:
                ints = int_args(N=n, K=k, stride_xm=k, stride_wn=k, stride_ym=n)
                for bias in (False, True):
                    sig = dict(x_ptr=f"*{dt}", w_ptr=f"*{dt}", b_ptr=f"*{dt}", y_ptr=f"*{dt}", M="i32", **ints[0])
                    cases.append(CompileCase(f"exact.linear[{dt},{model},{k}x{n},bias={bias}]", _linear_kernel, sig,
                                             dict(cfg, HAS_BIAS=bias, **fl, **ints[1]), warps, stages,
                                             full_only=model != "smollm2" or bias or dt != "bf16"))
        for d in (64, 128, 576, 1536, 4096):
            ints = int_args(D=d, stride_x=d, stride_y=d)
            sig = dict(x_ptr=f"*{dt}", w_ptr=f"*{dt}", y_ptr=f"*{dt}", R="i32", eps="fp32", **ints[0])
            cases.append(CompileCase(f"exact.rms_norm[{dt},d={d}]", _rms_norm_kernel, sig,
                                     dict(ROWS=1, BLOCK_D=triton.next_power_of_2(d)), 4 if d <= 4096 else 8, 1,
                                     full_only=d not in (64, 576) or dt != "bf16"))
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
