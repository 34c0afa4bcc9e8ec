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

import torch

from fastrft import numerics
from fastrft.kernels.exact_attention import packed_attention, paged_attention
from fastrft.kernels.exact_common import (ATTENTION_DIMS, HAVE_TRITON, INTERPRETER_TILES, KEY_TILE, TILES,
                                          _cuda_launch, _differentiable, _flags, _Recomputed, _tile, available,
                                          check_launch, check_model, cuda_tiles, interpreting)
from fastrft.numerics import linear_backward

# The mode's API in one place: its attention and shared helpers live in the two modules above.
__all__ = ["ATTENTION_DIMS", "HAVE_TRITON", "INTERPRETER_TILES", "KEY_TILE", "TILES", "available", "check_launch",
           "check_model", "compile_cases", "cuda_tiles", "interpreting", "linear", "linear_backward",
           "linear_forward", "packed_attention", "paged_attention", "rms_norm", "rms_norm_forward",
           "rms_norm_reference", "sample_head"]

if HAVE_TRITON:
    import triton
    import triton.language as tl

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


rms_norm_reference = numerics.rms_norm  # fastrft.models.layers.RMSNorm's formula (the backward differentiates it)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The exact RMSNorm: the Triton forward; the backward of :func:`rms_norm_reference`."""
    if _differentiable(x, weight):
        return _Recomputed.apply(rms_norm_forward, rms_norm_reference, 1, x, weight, float(eps))
    return rms_norm_forward(x, weight, eps)


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
    # The Triton sampler on CUDA; its PyTorch twin (the same token, bit for bit: tests/kernels/test_sampling.py) in
    # the interpreter, where the Triton one is far slower.
    draws = sample_tokens(z, seeds, positions, (~greedy).float())
    tokens = draws[0]
    z_tok = z.gather(1, tokens.clamp(0, v - 1).long()[:, None]).squeeze(1)
    logp = z_tok - lse
    return torch.stack([tokens, logp.view(torch.int32)])


# ----------------------------------------------------------------------------------------- compile gate
# Representative shapes: SmolLM2-135M (H 576), Qwen2.5-1.5B (H 1536).
_LINEAR_SHAPES = {"smollm2": ((576, 576), (576, 1536), (1536, 576)), "qwen2.5-1.5b": ((1536, 256), (8960, 1536))}


def compile_cases(full: bool = False) -> list:
    """The exact mode's CUDA launches of this module: the linear kernel per dtype and model shape, the norm
    per width (the attention kernel's are in fastrft.kernels.exact_attention)."""
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
    return cases
