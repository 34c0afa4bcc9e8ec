"""The exact mode's linear layer (:mod:`fastrft.kernels.exact_triton` has the mode's design): y = x W^T (+ b)
in (BLOCK_M x BLOCK_N) output tiles that own all of K, walked in BLOCK_K steps with fp32 accumulation and
one cast at the store; one configuration per dtype, the row count not specialised. The backward is
PyTorch's (only the forward must match the sampler's)."""

from __future__ import annotations

import torch

from fastrft.kernels.exact_common import HAVE_TRITON, TILES, _differentiable, _flags, _tile, check_launch
from fastrft.numerics import linear_backward

if HAVE_TRITON:
    import triton
    import triton.language as tl

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


# ----------------------------------------------------------------------------------------- compile gate
# Representative shapes: SmolLM2-135M (H 576), Qwen2.5-1.5B (H 1536).
_LINEAR_SHAPES = {"smollm2": ((576, 576), (576, 1536), (1536, 576)), "qwen2.5-1.5b": ((1536, 256), (8960, 1536))}


def compile_cases(full: bool = False) -> list:
    """The linear kernel's CUDA launches, per dtype and model shape, with and without a bias."""
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
    return cases
