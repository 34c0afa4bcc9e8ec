"""Fused LM-head log-prob and entropy: log softmax(hidden @ weight.T / T)[target] without [N, V] logits.

Forward (``_linear_logprob_fwd_kernel``): a program owns BLOCK_N rows and one contiguous split of the
vocabulary. It walks the split in BLOCK_V tiles, computing each logits tile as a tiled GEMM over H with
fp32 accumulation, and keeps per row an online max m, a rescaled sum s = sum exp(z - m), the target's
logit and, for the entropy, e = sum exp(z - m) * z. It writes only these four (N,) partials per split; a
tiny O(splits * N) combine gives lse, logp = z_target - lse, mu = E_p[z] and entropy = lse - mu.

Backward (``_linear_logprob_bwd_kernel``): a program owns one (BLOCK_N x BLOCK_V) tile. It recomputes the
logits tile and forms, exactly,

    dL/dz = g_logp * (onehot(target) - p) - g_entropy * p * (z - mu),     z = h.W^T / T,

scaled by 1/T, then accumulates dH += dz @ W and dW += dz^T @ h over H chunks with fp32 atomics. Every
term is kept: no gradient filtering. Extra memory is the fp32 dH and dW buffers (N*H*4 + V*H*4 bytes)
and O(N) vectors; nothing of size N*V is ever allocated.

Dispatch: CUDA tensors run the Triton kernels, CPU tensors the PyTorch reference beside them, unless
``backend`` says otherwise. Tests force ``backend="triton"`` on CPU under TRITON_INTERPRET=1, whose
interpreter computes bf16 ``tl.dot`` wrongly and refuses bf16 atomics: bf16 tiles are upcast to fp32
there (constexpr UPCAST) and the atomics always target fp32 buffers.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs run the reference
    HAVE_TRITON = False

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("auto", "triton", "reference")


# ----------------------------------------------------------------------------------------- kernels
if HAVE_TRITON:

    @triton.jit
    def _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_hn, stride_hh, stride_wv, stride_wh,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr,
                     IEEE: tl.constexpr):
        """(BLOCK_N, BLOCK_V) fp32 tile of hidden @ weight.T for the given rows/cols (int64 indices)."""
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
            if IEEE:
                acc += tl.dot(a, b, input_precision="ieee")
            else:
                acc += tl.dot(a, b)
        return acc

    @triton.jit
    def _linear_logprob_fwd_kernel(h_ptr, w_ptr, tgt_ptr, part_ptr, N, V, H, stride_hn, stride_hh, stride_wv,
                                   stride_wh, inv_temp, v_per_split, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                                   BLOCK_H: tl.constexpr, WITH_ENTROPY: tl.constexpr, UPCAST: tl.constexpr,
                                   IEEE: tl.constexpr):
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
            z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_hn, stride_hh, stride_wv,
                             stride_wh, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, IEEE) * inv_temp
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

    @triton.jit
    def _linear_logprob_bwd_kernel(h_ptr, w_ptr, tgt_ptr, lse_ptr, mu_ptr, glp_ptr, gent_ptr, dh_ptr, dw_ptr, N, V, H,
                                   stride_hn, stride_hh, stride_wv, stride_wh, inv_temp, BLOCK_N: tl.constexpr,
                                   BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
                                   HAS_LOGP_GRAD: tl.constexpr, HAS_ENT_GRAD: tl.constexpr,
                                   NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, UPCAST: tl.constexpr,
                                   IEEE: tl.constexpr, BWD_FP32: tl.constexpr):
        # A flat 1-D grid (no 65,535 limit on a second axis), swizzled so that GROUP_N consecutive programs
        # share one weight tile while it is hot in L2.
        pid = tl.program_id(0).to(tl.int64)
        n_blocks = tl.cdiv(N, BLOCK_N)
        v_blocks = tl.cdiv(V, BLOCK_V)
        per_group = GROUP_N * v_blocks
        first_n = (pid // per_group) * GROUP_N
        group_n = tl.minimum(n_blocks - first_n, GROUP_N)
        pid_n = first_n + (pid % per_group) % group_n
        pid_v = (pid % per_group) // group_n
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        row_ok = rows < N
        col_ok = cols < V
        z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_hn, stride_hh, stride_wv, stride_wh,
                         BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, IEEE) * inv_temp
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        p = tl.exp(z - lse[:, None])
        dz = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        if HAS_LOGP_GRAD:
            g = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
            tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
            dz += g[:, None] * (tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0) - p)
        if HAS_ENT_GRAD:
            ge = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
            mu = tl.load(mu_ptr + rows, mask=row_ok, other=0.0)
            dz -= ge[:, None] * p * (z - mu[:, None])
        dz = tl.where(row_ok[:, None] & col_ok[None, :], dz * inv_temp, 0.0)
        # bf16 inputs feed the tensor cores with dz rounded to bf16, as cuBLAS's own backward does (bf16
        # keeps fp32's exponent range). fp16's 5-bit exponent would flush the vocabulary tail
        # (p_j * g ~ 1e-9) to zero, so with fp16 inputs dz and the operands stay fp32 (TF32 on GPU).
        if BWD_FP32:
            dz_in = dz
        else:
            dz_in = dz.to(h_ptr.dtype.element_ty)
        for h0 in range(0, H, BLOCK_H):
            hk = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
            hk_ok = hk < H
            if NEED_DH:
                w = tl.load(w_ptr + cols[:, None] * stride_wv + hk[None, :] * stride_wh,
                            mask=col_ok[:, None] & hk_ok[None, :], other=0.0)
                if BWD_FP32:
                    w = w.to(tl.float32)
                if IEEE:
                    dh = tl.dot(dz_in, w, input_precision="ieee")
                else:
                    dh = tl.dot(dz_in, w)
                tl.atomic_add(dh_ptr + rows[:, None] * H + hk[None, :], dh, mask=row_ok[:, None] & hk_ok[None, :])
            if NEED_DW:
                a = tl.load(h_ptr + rows[:, None] * stride_hn + hk[None, :] * stride_hh,
                            mask=row_ok[:, None] & hk_ok[None, :], other=0.0)
                if BWD_FP32:
                    a = a.to(tl.float32)
                if IEEE:
                    dw = tl.dot(tl.trans(dz_in), a, input_precision="ieee")
                else:
                    dw = tl.dot(tl.trans(dz_in), a)
                tl.atomic_add(dw_ptr + cols[:, None] * H + hk[None, :], dw, mask=col_ok[:, None] & hk_ok[None, :])


# ----------------------------------------------------------------------------------------- launchers
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _blocks(device: torch.device) -> dict:
    """Tile sizes. The interpreter runs programs one by one in Python, so big tiles keep tests fast;
    on GPU these are starting values for the autotuning of the GPU issue."""
    if device.type == "cuda":
        return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3, GROUP_N=8)
    return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, num_warps=4, num_stages=1, GROUP_N=4)


def _flags(dtype: torch.dtype) -> dict:
    """UPCAST: bf16 tiles go through fp32 (the interpreter's bf16 dot is wrong). IEEE: exact fp32 dots
    for fp32 inputs (not TF32). BWD_FP32 (backward only): dz and its operands stay fp32."""
    upcast = _interpreting() and dtype == torch.bfloat16
    return dict(UPCAST=upcast, IEEE=dtype == torch.float32)


def _bwd_flags(dtype: torch.dtype) -> dict:
    flags = _flags(dtype)
    return dict(flags, BWD_FP32=flags["UPCAST"] or dtype in (torch.float16, torch.float32))


def _num_splits(n_blocks: int, v_blocks: int, device: torch.device, splits: int | None) -> int:
    if splits is None:
        # Enough programs to fill the GPU even when N is small; one split when N alone fills it.
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
        splits = -(-target // max(n_blocks, 1))
    return max(1, min(splits, v_blocks, 65535))


def _launch_check(hidden, weight, targets) -> None:
    if not HAVE_TRITON:
        raise RuntimeError("the Triton backend needs the triton package (pip install triton); "
                           "use backend='reference' or CPU tensors")
    if hidden.device.type != "cuda" and not _interpreting():
        raise RuntimeError("the Triton backend needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                           "fastrft.kernels is imported (CPU interpreter, for tests)")


def _triton_forward(hidden, weight, targets, temperature: float, with_entropy: bool, splits: int | None = None):
    _launch_check(hidden, weight, targets)
    n, h = hidden.shape
    v = weight.shape[0]
    cfg = _blocks(hidden.device)
    n_blocks = triton.cdiv(n, cfg["BLOCK_N"])
    v_blocks = triton.cdiv(v, cfg["BLOCK_V"])
    num_splits = _num_splits(n_blocks, v_blocks, hidden.device, splits)
    v_per_split = triton.cdiv(v_blocks, num_splits) * cfg["BLOCK_V"]
    num_splits = triton.cdiv(v, v_per_split)  # every split non-empty
    part = torch.empty((4, num_splits, n), dtype=torch.float32, device=hidden.device)
    _linear_logprob_fwd_kernel[(n_blocks, num_splits)](
        hidden, weight, targets, part, n, v, h, hidden.stride(0), hidden.stride(1), weight.stride(0),
        weight.stride(1), 1.0 / temperature, v_per_split, BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"],
        BLOCK_H=cfg["BLOCK_H"], WITH_ENTROPY=with_entropy, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **_flags(hidden.dtype))
    m, s, zt, e = part.unbind(0)
    top = m.max(dim=0).values
    scale = torch.exp(m - top)
    total = (s * scale).sum(0)
    lse = top + torch.log(total)
    logp = zt.sum(0) - lse
    if not with_entropy:
        return logp, lse, None, None
    mu = (e * scale).sum(0) / total
    return logp, lse, lse - mu, mu


def _triton_backward(hidden, weight, targets, lse, mu, g_logp, g_ent, temperature: float, need_dh: bool,
                     need_dw: bool):
    n, h = hidden.shape
    v = weight.shape[0]
    cfg = _blocks(hidden.device)
    dh = torch.zeros((n, h), dtype=torch.float32, device=hidden.device) if need_dh else None
    dw = torch.zeros((v, h), dtype=torch.float32, device=hidden.device) if need_dw else None
    dummy = lse  # stands in for absent optional pointers; never read behind a false constexpr
    grid = (triton.cdiv(n, cfg["BLOCK_N"]) * triton.cdiv(v, cfg["BLOCK_V"]),)
    _linear_logprob_bwd_kernel[grid](
        hidden, weight, targets, lse, mu if mu is not None else dummy,
        g_logp if g_logp is not None else dummy, g_ent if g_ent is not None else dummy,
        dh if dh is not None else dummy, dw if dw is not None else dummy, n, v, h, hidden.stride(0),
        hidden.stride(1), weight.stride(0), weight.stride(1), 1.0 / temperature, BLOCK_N=cfg["BLOCK_N"],
        BLOCK_V=cfg["BLOCK_V"], BLOCK_H=cfg["BLOCK_H"], GROUP_N=cfg["GROUP_N"], HAS_LOGP_GRAD=g_logp is not None,
        HAS_ENT_GRAD=g_ent is not None, NEED_DH=need_dh, NEED_DW=need_dw, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **_bwd_flags(hidden.dtype))
    return (dh.to(hidden.dtype) if need_dh else None), (dw.to(weight.dtype) if need_dw else None)


# ----------------------------------------------------------------------------------------- reference
def _reference_chunk(hidden, weight, targets, temperature: float, with_entropy: bool, compute_dtype):
    logits = (hidden.to(compute_dtype) @ weight.to(compute_dtype).T) / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    if not with_entropy:
        return logp, None
    entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, entropy


class ChunkedLogprobFunction(torch.autograd.Function):
    """The CPU path: the kernel's algorithm in PyTorch, ``chunk`` rows of logits at a time.

    Forward keeps only lse and mu = E_p[z] per row; backward recomputes each chunk's logits and forms
    dz = g_logp * (onehot - p) - g_entropy * p * (z - mu), divided by T, then dH = dz @ W and
    dW += dz^T @ h. Peak memory is one chunk's [chunk, V] temporaries plus the gradients.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, chunk, compute_dtype):
        w = weight.to(compute_dtype)
        logp, lse, mu = [], [], []
        for i in range(0, hidden.shape[0], chunk):
            z = (hidden[i:i + chunk].to(compute_dtype) @ w.T) / temperature
            lz = torch.logsumexp(z, dim=-1)
            logp.append(z.gather(-1, targets[i:i + chunk, None]).squeeze(-1) - lz)
            lse.append(lz)
            if with_entropy:
                mu.append((torch.exp(z - lz[:, None]) * z).sum(-1))
        cat = (lambda xs: torch.cat(xs) if xs else hidden.new_zeros(0, dtype=compute_dtype))  # noqa: E731
        logp, lse, mu = cat(logp), cat(lse), cat(mu)
        ctx.save_for_backward(hidden, weight, targets, lse, mu)
        ctx.temperature, ctx.with_entropy, ctx.chunk, ctx.compute_dtype = temperature, with_entropy, chunk, compute_dtype
        ctx.set_materialize_grads(False)
        return logp, (lse - mu if with_entropy else logp.new_zeros(0))

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse, mu = ctx.saved_tensors
        cd, temperature, chunk = ctx.compute_dtype, ctx.temperature, ctx.chunk
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_ent = g_ent if ctx.with_entropy else None
        w = weight.to(cd)
        dh = torch.zeros(hidden.shape, dtype=cd) if need_dh else None
        dw = torch.zeros(weight.shape, dtype=cd) if need_dw else None
        if g_logp is not None or g_ent is not None:
            for i in range(0, hidden.shape[0], chunk):
                h = hidden[i:i + chunk].to(cd)
                z = (h @ w.T) / temperature
                p = torch.exp(z - lse[i:i + chunk, None])
                dz = torch.zeros_like(z)
                if g_logp is not None:
                    g = g_logp[i:i + chunk].to(cd)
                    dz -= g[:, None] * p
                    dz.scatter_add_(1, targets[i:i + chunk, None], g[:, None])
                if g_ent is not None:
                    dz -= g_ent[i:i + chunk, None].to(cd) * p * (z - mu[i:i + chunk, None])
                dz /= temperature
                if need_dh:
                    torch.mm(dz, w, out=dh[i:i + chunk])
                if need_dw:
                    dw.addmm_(dz.T, h)  # in place: no [V, H] temporary per chunk
        return ((dh.to(hidden.dtype) if need_dh else None), (dw.to(weight.dtype) if need_dw else None),
                None, None, None, None, None)


def linear_logprob_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                             temperature: float = 1.0, with_entropy: bool = False,
                             compute_dtype: torch.dtype = torch.float32, chunk: int | None = -1):
    """The PyTorch reference, in ``compute_dtype`` (float64 in tests).

    chunk None: the test oracle and readable spec: logits materialised for all rows, differentiated
    by autograd. chunk > 0 (or -1: sized so that a chunk holds about 16M logits): the CPU path,
    :class:`ChunkedLogprobFunction`, which never holds more than one chunk of logits.
    Returns (logp, entropy or None) in ``compute_dtype``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    if chunk is None:
        return _reference_chunk(hidden, weight, targets, temperature, with_entropy, compute_dtype)
    if chunk == -1:
        chunk = max(64, 2**24 // max(weight.shape[0], 1))
    logp, entropy = ChunkedLogprobFunction.apply(hidden, weight, targets, float(temperature), with_entropy, int(chunk),
                                                 compute_dtype)
    return logp, (entropy if with_entropy else None)


# ----------------------------------------------------------------------------------------- autograd
class LinearLogprobFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, splits):
        if hidden.shape[0] == 0:  # nothing to launch; the backward returns zero gradients
            empty = hidden.new_zeros(0, dtype=torch.float32)
            logp, lse, entropy, mu = empty, empty, (empty if with_entropy else None), (empty if with_entropy else None)
        else:
            logp, lse, entropy, mu = _triton_forward(hidden, weight, targets, temperature, with_entropy, splits)
        ctx.save_for_backward(hidden, weight, targets, lse, mu if mu is not None else lse.new_empty(0))
        ctx.temperature, ctx.with_entropy = temperature, with_entropy
        ctx.set_materialize_grads(False)  # a None upstream gradient switches its term off in the kernel
        return logp, (entropy if with_entropy else logp.new_empty(0))

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse, mu = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not ctx.with_entropy:
            g_ent = None
        if (g_logp is None and g_ent is None) or not (need_dh or need_dw) or hidden.shape[0] == 0:
            return (torch.zeros_like(hidden) if need_dh else None, torch.zeros_like(weight) if need_dw else None,
                    None, None, None, None)
        dh, dw = _triton_backward(hidden, weight, targets, lse, mu if ctx.with_entropy else None,
                                  None if g_logp is None else g_logp.float().contiguous(),
                                  None if g_ent is None else g_ent.float().contiguous(), ctx.temperature,
                                  need_dh, need_dw)
        return dh, dw, None, None, None, None


# ----------------------------------------------------------------------------------------- functional
def check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float) -> None:
    """Refuse bad inputs with a message naming the argument, before any launch."""
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be (N, H) and weight (V, H); got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden has H={hidden.shape[1]} but weight has H={weight.shape[1]}")
    if hidden.dtype not in DTYPES or weight.dtype != hidden.dtype:
        raise ValueError(f"hidden and weight must share one dtype of float32/float16/bfloat16; got "
                         f"{hidden.dtype} and {weight.dtype}")
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets must be ({hidden.shape[0]},) like hidden's rows; got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 (or int32); got {targets.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"hidden, weight and targets must be on one device; got {hidden.device}, "
                         f"{weight.device}, {targets.device}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if targets.numel():
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= weight.shape[0]:
            bad = lo if lo < 0 else hi
            raise ValueError(f"targets must lie in [0, V={weight.shape[0]}); found {bad}")


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is unknown; choose one of: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and HAVE_TRITON else "reference"
    return backend


def linear_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                   with_entropy: bool = False, backend: str = "auto", splits: int | None = None):
    """log softmax(hidden @ weight.T / temperature)[targets] and (optionally) the entropy, per row.

    hidden (N, H) and weight (V, H): one dtype of fp32/fp16/bf16, any strides (passed to the kernel as
    they are; nothing is copied). targets (N,) int64 in [0, V) (made contiguous). Returns (logp (N,) fp32,
    entropy (N,) fp32 or None); differentiable in hidden and weight through both outputs.
    backend: "auto" (Triton on CUDA, reference on CPU) | "triton" | "reference". ``splits`` overrides the
    number of vocabulary splits of the Triton forward (tests use it to exercise the combine).
    """
    check_inputs(hidden, weight, targets, temperature)
    targets = targets.long().contiguous()
    if resolve_backend(backend, hidden.device) == "reference":
        logp, entropy = linear_logprob_reference(hidden, weight, targets, temperature=temperature,
                                                 with_entropy=with_entropy)
        return logp.float(), (entropy.float() if entropy is not None else None)
    logp, entropy = LinearLogprobFunction.apply(hidden, weight, targets, float(temperature), with_entropy, splits)
    return logp, (entropy if with_entropy else None)
