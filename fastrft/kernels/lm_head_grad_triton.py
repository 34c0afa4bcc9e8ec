"""Triton kernels of the LM-head loss's gradient (:mod:`fastrft.kernels.lm_head_triton` has the forward,
the tile table and the flags): step 3 and 4 of :mod:`fastrft.kernels.linear_logprob`'s chunk loop.

- ``_dz_kernel``: dz = the logit gradient of a chunk, in place over its fp32 logits or into a bf16 buffer.
- ``_dh_kernel``: dH = dz @ W, fp32 accumulation over the whole vocabulary, cast once when stored.
- ``_dw_kernel``: dW += dz^T @ h, one program per (BLOCK_M x BLOCK_N) tile of the fp32 dW buffer, which it
  reads once, accumulates over the chunk's rows, and writes once.

Every output tile has exactly one owner: no atomics.
"""

from __future__ import annotations

import torch

from fastrft.kernels.lm_head_triton import CLASS_SHAPES, HAVE_TRITON, TILES, flags, tile

if HAVE_TRITON:  # (a CPU-only install without triton imports this module too: its PyTorch path needs none of it)
    import triton
    import triton.language as tl

    from fastrft.kernels.lm_head_triton import _dot

# ----------------------------------------------------------------------------------------- kernels
if HAVE_TRITON:

    @triton.jit
    def _dz_kernel(z_ptr, dz_ptr, tgt_ptr, lse_ptr, mu_ptr, glp_ptr, gent_ptr, N, V, stride_zn, stride_dzn,
                   inv_temp, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, HAS_ENT_GRAD: tl.constexpr):
        # A flat grid (no 65,535 limit on a second axis); in place when dz_ptr aliases z_ptr (each element
        # is read and written by the same program, read first).
        pid = tl.program_id(0).to(tl.int64)
        v_blocks = tl.cdiv(V, BLOCK_V)
        rows = (pid // v_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = (pid % v_blocks) * BLOCK_V + tl.arange(0, BLOCK_V)
        row_ok = rows < N
        mask = row_ok[:, None] & (cols[None, :] < V)
        z = tl.load(z_ptr + rows[:, None] * stride_zn + cols[None, :], mask=mask, other=0.0)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        g = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
        tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
        p = tl.exp(z - lse[:, None])
        dz = g[:, None] * (tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0) - p)
        if HAS_ENT_GRAD:
            ge = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
            mu = tl.load(mu_ptr + rows, mask=row_ok, other=0.0)
            dz -= ge[:, None] * p * (z - mu[:, None])
        tl.store(dz_ptr + rows[:, None] * stride_dzn + cols[None, :], (dz * inv_temp).to(dz_ptr.dtype.element_ty),
                 mask=mask)

    @triton.jit
    def _tile_ids(M, N_OUT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        # Grouped ordering: GROUP_M consecutive programs share one column block of the second operand
        # while it is hot in L2.
        pid = tl.program_id(0)
        m_blocks = tl.cdiv(M, BLOCK_M)
        n_blocks = tl.cdiv(N_OUT, BLOCK_N)
        per_group = GROUP_M * n_blocks
        first_m = (pid // per_group) * GROUP_M
        group_m = tl.minimum(m_blocks - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_m
        pid_n = (pid % per_group) // group_m
        return pid_m.to(tl.int64), pid_n.to(tl.int64)

    @triton.jit
    def _dh_kernel(dz_ptr, w_ptr, dh_ptr, C, V, H, stride_dzn, stride_wv, stride_wh, stride_dhn, stride_dhh,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   UPCAST: tl.constexpr, IEEE: tl.constexpr, DOT_FP32: tl.constexpr):
        """dH[C, H] = dz[C, V] @ W[V, H]; fp32 accumulation over all of V, one cast at the store."""
        pid_m, pid_n = _tile_ids(C, H, BLOCK_M, BLOCK_N, GROUP_M)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        hs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < C
        h_ok = hs < H
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, V, BLOCK_K):
            ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
            k_ok = ks < V
            a = tl.load(dz_ptr + rows[:, None] * stride_dzn + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            b = tl.load(w_ptr + ks[:, None] * stride_wv + hs[None, :] * stride_wh, mask=k_ok[:, None] & h_ok[None, :],
                        other=0.0)
            if UPCAST or DOT_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = _dot(a, b, acc, IEEE)
        tl.store(dh_ptr + rows[:, None] * stride_dhn + hs[None, :] * stride_dhh, acc.to(dh_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & h_ok[None, :])

    @triton.jit
    def _dw_kernel(dz_ptr, h_ptr, dw_ptr, C, V, H, stride_dzn, stride_hn, stride_hh, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, ACCUMULATE: tl.constexpr,
                   UPCAST: tl.constexpr, IEEE: tl.constexpr, DOT_FP32: tl.constexpr):
        """dW[V, H] (+)= dz[C, V]^T @ h[C, H] into a contiguous fp32 buffer: read once, written once."""
        pid_m, pid_n = _tile_ids(V, H, BLOCK_M, BLOCK_N, GROUP_M)
        cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        hs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < V
        h_ok = hs < H
        out = dw_ptr + cols[:, None] * H + hs[None, :]
        out_mask = col_ok[:, None] & h_ok[None, :]
        if ACCUMULATE:
            acc = tl.load(out, mask=out_mask, other=0.0)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
            k_ok = ks < C
            a = tl.load(dz_ptr + ks[None, :] * stride_dzn + cols[:, None], mask=col_ok[:, None] & k_ok[None, :],
                        other=0.0)
            b = tl.load(h_ptr + ks[:, None] * stride_hn + hs[None, :] * stride_hh, mask=k_ok[:, None] & h_ok[None, :],
                        other=0.0)
            if UPCAST or DOT_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = _dot(a, b, acc, IEEE)
        tl.store(out, acc, mask=out_mask)


# ----------------------------------------------------------------------------------------- launchers
def form_dz(z, dz, targets, lse, mu, g_logp, g_ent, temperature: float, input_dtype: torch.dtype) -> None:
    """dz (C, V) <- the logit gradient of the chunk whose fp32 logits are z (dz may be z itself)."""
    c, v = z.shape
    cfg = dict(tile("dz", input_dtype, 0, z.device))
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    grid = (triton.cdiv(c, cfg["BLOCK_N"]) * triton.cdiv(v, cfg["BLOCK_V"]),)
    has_ent = g_ent is not None
    _dz_kernel[grid](z, dz, targets, lse, mu if has_ent else lse, g_logp, g_ent if has_ent else g_logp, c, v,
                     z.stride(0), dz.stride(0), 1.0 / temperature, HAS_ENT_GRAD=has_ent, num_warps=warps,
                     num_stages=stages, **cfg)


def grad_gemms(dz, hidden, weight, dh_out, dw_acc, accumulate: bool) -> None:
    """dh_out (C, H) <- dz @ W (cast to its dtype) and dw_acc (V, H) fp32 (+)= dz^T @ hidden; either output
    may be None."""
    c, v = dz.shape
    h = weight.shape[1]
    fl = flags(hidden.dtype)
    fl["DOT_FP32"] = dz.dtype == torch.float32 and hidden.dtype != torch.float32  # fp16 inputs: fp32 dz
    if dh_out is not None:
        cfg = dict(tile("dh", hidden.dtype, h, dz.device))
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        grid = (triton.cdiv(c, cfg["BLOCK_M"]) * triton.cdiv(h, cfg["BLOCK_N"]),)
        _dh_kernel[grid](dz, weight, dh_out, c, v, h, dz.stride(0), weight.stride(0), weight.stride(1),
                         dh_out.stride(0), dh_out.stride(1), num_warps=warps, num_stages=stages, **cfg, **fl)
    if dw_acc is not None:
        cfg = dict(tile("dw", hidden.dtype, h, dz.device))
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        grid = (triton.cdiv(v, cfg["BLOCK_M"]) * triton.cdiv(h, cfg["BLOCK_N"]),)
        _dw_kernel[grid](dz, hidden, dw_acc, c, v, h, dz.stride(0), hidden.stride(0), hidden.stride(1),
                         ACCUMULATE=accumulate, num_warps=warps, num_stages=stages, **cfg, **fl)


# ----------------------------------------------------------------------------------------- compile gate
def compile_cases(full: bool = False) -> list:
    """The gradient kernels' TILES entries as :func:`form_dz` and :func:`grad_gemms` launch them on CUDA,
    for the sm_90a compile gate (shapes as in fastrft.kernels.lm_head_triton.compile_cases)."""
    from fastrft.kernels.aot import CompileCase, int_args

    cases = []
    for (kernel, dt, cls), cfg in TILES.items():
        if kernel not in ("dz", "dh", "dw") or (not full and cls != "h>1024"):
            continue
        cfg = dict(cfg)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        h, v = CLASS_SHAPES[cls]
        p = f"*{dt}"
        dzt = "*bf16" if dt == "bf16" else "*fp32"
        fl = dict(UPCAST=False, IEEE=dt == "fp32")
        name = f"lm_head.{kernel}[{dt},{cls}"
        if kernel == "dz":
            ints = int_args(N=4099, V=v, stride_zn=v, stride_dzn=v)
            for ent in (False, True):
                sig = dict(z_ptr="*fp32", dz_ptr=dzt, tgt_ptr="*i64", lse_ptr="*fp32", mu_ptr="*fp32",
                           glp_ptr="*fp32", gent_ptr="*fp32", inv_temp="fp32", **ints[0])
                cases.append(CompileCase(f"{name},entropy={ent}]", _dz_kernel, sig, dict(cfg, HAS_ENT_GRAD=ent, **ints[1]),
                                         warps, stages))
        elif kernel == "dh":
            ints = int_args(C=4099, V=v, H=h, stride_dzn=v, stride_wv=h, stride_wh=1, stride_dhn=h, stride_dhh=1)
            sig = dict(dz_ptr=dzt, w_ptr=p, dh_ptr=p, **ints[0])
            cases.append(CompileCase(f"{name}]", _dh_kernel, sig, dict(cfg, DOT_FP32=dt == "fp16", **fl, **ints[1]),
                                     warps, stages))
        else:
            ints = int_args(C=4099, V=v, H=h, stride_dzn=v, stride_hn=h, stride_hh=1)
            for accumulate in (False, True):
                sig = dict(dz_ptr=dzt, h_ptr=p, dw_ptr="*fp32", **ints[0])
                cases.append(CompileCase(f"{name},accumulate={accumulate}]", _dw_kernel, sig,
                                         dict(cfg, ACCUMULATE=accumulate, DOT_FP32=dt == "fp16", **fl, **ints[1]),
                                         warps, stages))
    return cases
