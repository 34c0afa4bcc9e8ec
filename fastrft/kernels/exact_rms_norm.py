"""The exact mode's RMSNorm (:mod:`fastrft.kernels.exact_triton` has the mode's design): one row per
program on CUDA (blocks of rows in the interpreter), each row's sum of squares one ``tl.sum`` over the
padded row; the normalised row is cast to the input dtype before the weight multiplies it, as
:func:`fastrft.numerics.rms_norm` does. The backward differentiates that formula, recomputed."""

from __future__ import annotations

import torch

from fastrft import numerics
from fastrft.kernels.exact_common import (HAVE_TRITON, INTERPRETER_TILES, _cuda_launch, _differentiable, _Recomputed,
                                          check_launch)

if HAVE_TRITON:
    import triton
    import triton.language as tl

if HAVE_TRITON:

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


# ----------------------------------------------------------------------------------------- compile gate
def compile_cases(full: bool = False) -> list:
    """The norm kernel's CUDA launches, per dtype and row width."""
    from fastrft.kernels.aot import CompileCase, int_args

    cases = []
    for dt in ("bf16", "fp16", "fp32"):
        for d in (64, 128, 576, 1536, 4096):
            ints = int_args(D=d, stride_x=d, stride_y=d)
            sig = dict(x_ptr=f"*{dt}", w_ptr=f"*{dt}", y_ptr=f"*{dt}", R="i32", eps="fp32", **ints[0])
            cases.append(CompileCase(f"exact.rms_norm[{dt},d={d}]", _rms_norm_kernel, sig,
                                     dict(ROWS=1, BLOCK_D=triton.next_power_of_2(d)), 4 if d <= 4096 else 8, 1,
                                     full_only=d not in (64, 576) or dt != "bf16"))
    return cases
