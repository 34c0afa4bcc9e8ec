"""Fused LM-head log-prob and entropy: log softmax(hidden @ weight.T / T)[target] without [N, V] logits.

One algorithm, two implementations of its steps (Triton on CUDA, PyTorch on CPU), driven chunk by chunk
by :func:`lm_head_chunks`. For each chunk of C rows:

1. form the chunk's logits z = h.W^T / T in an fp32 (C, V) workspace and, per row, lse, logp = z_t - lse,
   mu = E_p[z] and the entropy lse - mu;
2. ask the caller for the per-row coefficients g_logp = dL/dlogp and g_ent = dL/dentropy of those rows;
3. form, exactly, dz = (g_logp * (onehot(target) - p) - g_ent * p * (z - mu)) / T in the workspace;
4. run two GEMMs in which every output tile has one owner: dH[rows] = dz @ W (fp32 accumulation, one cast)
   and dW += dz^T @ h into an fp32 buffer.

No atomics, no gradient filtering, no N x V tensor: extra memory is the fp32 dW (V*H*4), dH in the
input dtype, and one chunk's workspace. The policy-gradient loss (:mod:`fastrft.kernels.pg_loss`) gets
its coefficients from the loss spec during the forward (gradient-in-forward: three GEMMs in all); a bare
:func:`linear_logprob` takes arbitrary upstream gradients, so its forward is one fused pass that keeps only
per-row statistics (``lm_head_triton.logits_stats`` without the workspace) and its backward runs the chunk
loop with the upstream gradients as coefficients (four GEMMs).

Dispatch: CUDA tensors run the Triton kernels, CPU tensors the PyTorch steps, unless ``backend`` says
otherwise. Tests force ``backend="triton"`` on CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

from typing import Callable

import torch

from fastrft.kernels import lm_head_grad_triton as grad
from fastrft.kernels import lm_head_triton as tri
from fastrft.kernels.lm_head_triton import HAVE_TRITON
from fastrft.kernels.rows import exp_shifted_, log_rows, row_sums

__all__ = ["BACKENDS", "HAVE_TRITON", "LinearLogprobFunction", "check_chunk", "check_inputs", "compile_cases",
           "default_chunk", "linear_logprob", "linear_logprob_reference", "lm_head_chunks", "prepare",
           "resolve_backend"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("auto", "triton", "reference")
Coefficients = Callable[[slice, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor | None]"]


def compile_cases(full: bool = False) -> list:
    """The Triton kernels' launches for the sm_90a compile gate (fastrft.kernels.aot): forward and gradient."""
    return tri.compile_cases(full) + grad.compile_cases(full)


# ----------------------------------------------------------------------------------------- PyTorch steps
def _torch_stats(h, w_t, tgt, inv_temp: float, zbuf, pbuf, logits_mm=None):
    """Steps 1 in PyTorch: logits into zbuf (shifted by the row max), exp into pbuf; returns logp,
    entropy and the state :func:`_torch_dz` needs. Every [C, V] pass is in place or into the buffers."""
    c = h.shape[0]
    z = (logits_mm or torch.mm)(h, w_t, out=zbuf[:c])
    if inv_temp != 1.0:
        z.mul_(inv_temp)
    m = z.amax(1, keepdim=True)
    zt = z.gather(1, tgt[:, None])
    z.sub_(m)
    # exp, row sum and log as the sampler takes them (kernels.rows), so the two agree bit for bit
    p = exp_shifted_(pbuf[:c].copy_(z))
    s = row_sums(p)[:, None]
    c1 = torch.bmm(p.unsqueeze(1), z.unsqueeze(2)).view(c, 1) / s  # E_p[z - m]
    log_s = log_rows(s[:, 0])[:, None]
    logp = (zt - m - log_s).squeeze(1)
    entropy = (log_s - c1).squeeze(1)
    return logp, entropy, (z, p, s, c1, tgt)


def _torch_dz(state, g_logp, g_ent, inv_temp: float):
    """Step 3 in PyTorch, in place over the logits buffer. With z' = z - m and P = p / s:
    dz = onehot * g / T + p * ((-g + g_ent * c1) - g_ent * z') / (s T), c1 = E_P[z']."""
    z, p, s, c1, tgt = state
    scale = inv_temp / s
    a = -g_logp[:, None] * scale
    if g_ent is not None:
        ge = g_ent[:, None]
        a = a + ge * c1 * scale
        torch.addcmul(a, z, -ge * scale, out=z)
        z.mul_(p)
    else:
        torch.mul(p, a, out=z)
    z.scatter_add_(1, tgt[:, None], g_logp[:, None] * inv_temp)
    return z


# ----------------------------------------------------------------------------------------- chunk driver
def default_chunk(n: int, v: int, device: torch.device) -> int:
    """Rows per chunk. GPU: about 2^29 logits (a 2 GiB fp32 workspace at V = 152k: large GEMMs, few passes
    over dW). CPU: about 3 * 2^23 logits (512 rows at V = 49k: two 96 MiB buffers). Smaller chunks cost
    time there, because every chunk reads and writes all of dW (bench/RESULTS.md compares chunk sizes)."""
    budget = 2**29 if device.type == "cuda" else 3 * 2**23
    rows = max(128, budget // max(v, 1)) // 64 * 64
    return max(1, min(n, rows))


def lm_head_chunks(hidden, weight, targets, temperature: float, coefficients: Coefficients | None, *,
                   need_dh: bool, need_dw: bool, use_triton: bool, with_entropy: bool = True,
                   compute_dtype: torch.dtype = torch.float32, chunk: int | None = None, logits_mm=None):
    """Steps 1-4 over all rows. ``coefficients(rows, logp_c, entropy_c) -> (g_logp_c, g_ent_c or None)``
    gives the per-row gradient coefficients of the objective (None coefficients: forward only).
    ``logits_mm(h, w_t, out=)``: the PyTorch path's logits GEMM (torch.mm by default); the exact mode
    passes its row-ruled one (:func:`fastrft.models.exact.head_logits`), the engine's, so that a row's
    logits have the sampler's bits whatever the chunk's row count.

    Returns (logp (N,), entropy (N,) or None, dH (N, H) in hidden's dtype or None, dW (V, H) in
    weight's dtype or None); logp and entropy in fp32 (``compute_dtype`` on the PyTorch path).
    """
    n, h = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    grads = coefficients is not None
    need_dh, need_dw = need_dh and grads, need_dw and grads
    chunk = default_chunk(n, v, dev) if chunk is None else max(1, min(int(chunk), max(n, 1)))
    out_dtype = torch.float32 if use_triton else compute_dtype
    logp = torch.empty(n, dtype=out_dtype, device=dev)
    entropy = torch.empty(n, dtype=out_dtype, device=dev) if with_entropy or grads else None
    dh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_dh else None
    if use_triton:
        dw = torch.empty((v, h), dtype=torch.float32, device=dev) if need_dw else None
        zbuf = torch.empty((chunk, v), dtype=torch.float32, device=dev) if grads else None
        dzt = tri.dz_dtype(hidden.dtype)
        dzbuf = torch.empty((chunk, v), dtype=dzt, device=dev) if grads and dzt != torch.float32 else zbuf
    else:
        w = weight.to(compute_dtype)
        w_t = w.T
        dw = torch.zeros((v, h), dtype=compute_dtype, device=dev) if need_dw else None
        zbuf = torch.empty((chunk, v), dtype=compute_dtype, device=dev)
        pbuf = torch.empty_like(zbuf)
        dh_buf = (torch.empty((chunk, h), dtype=compute_dtype, device=dev)
                  if need_dh and hidden.dtype != compute_dtype else None)
    inv_temp = 1.0 / temperature
    for i in range(0, n, chunk):
        rows = slice(i, min(i + chunk, n))
        c = rows.stop - rows.start
        tgt = targets[rows]
        if use_triton:
            z = zbuf[:c] if grads else None
            lp, lse, ent, mu = tri.logits_stats(hidden[rows], weight, tgt, temperature, entropy is not None, z_out=z)
        else:
            hc = hidden[rows].to(compute_dtype)
            lp, ent, state = _torch_stats(hc, w_t, tgt, inv_temp, zbuf, pbuf, logits_mm)
        logp[rows] = lp
        if entropy is not None:
            entropy[rows] = ent
        if not grads:
            continue
        g_logp, g_ent = coefficients(rows, lp, ent)
        g_logp = torch.zeros_like(lp) if g_logp is None else g_logp.to(lp.dtype).contiguous()
        g_ent = None if g_ent is None else g_ent.to(lp.dtype).contiguous()
        if use_triton:
            dz = dzbuf[:c]
            grad.form_dz(z, dz, tgt, lse, mu, g_logp, g_ent, temperature, hidden.dtype)
            grad.grad_gemms(dz, hidden[rows], weight, dh[rows] if need_dh else None, dw, accumulate=i > 0)
        else:
            dz = _torch_dz(state, g_logp, g_ent, inv_temp)
            if need_dh:
                if dh_buf is None:
                    torch.mm(dz, w, out=dh[rows])
                else:
                    dh[rows] = torch.mm(dz, w, out=dh_buf[:c])
            if need_dw:
                dw.addmm_(dz.T, hc)  # in place: no [V, H] temporary per chunk
    if need_dw and n == 0:
        dw.zero_()
    if dw is not None and dw.dtype != weight.dtype:
        dw = dw.to(weight.dtype)
    return logp, (entropy if with_entropy else None), dh, dw


# ----------------------------------------------------------------------------------------- reference
def _reference_chunk(hidden, weight, targets, temperature: float, with_entropy: bool, compute_dtype):
    logits = (hidden.to(compute_dtype) @ weight.to(compute_dtype).T) / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    if not with_entropy:
        return logp, None
    entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, entropy


class LinearLogprobFunction(torch.autograd.Function):
    """Forward: per-row statistics only (the fused Triton pass, or the PyTorch chunk loop). Backward: the
    chunk loop with the upstream gradients as coefficients (the logits are recomputed)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, splits, chunk, use_triton, compute_dtype,
                logits_mm=None):
        if use_triton and hidden.shape[0]:
            logp, _, entropy, _ = tri.logits_stats(hidden, weight, targets, temperature, with_entropy, splits=splits)
        else:
            logp, entropy, _, _ = lm_head_chunks(hidden, weight, targets, temperature, None, need_dh=False,
                                                 need_dw=False, use_triton=use_triton, with_entropy=with_entropy,
                                                 compute_dtype=compute_dtype, chunk=chunk, logits_mm=logits_mm)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.args = (temperature, with_entropy, chunk, use_triton, compute_dtype, logits_mm)
        ctx.set_materialize_grads(False)  # a None upstream gradient switches its term off
        return logp, (entropy if with_entropy else logp.new_empty(0))

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets = ctx.saved_tensors
        temperature, with_entropy, chunk, use_triton, compute_dtype, logits_mm = ctx.args
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not with_entropy:
            g_ent = None
        none = (None,) * 8
        if (g_logp is None and g_ent is None) or not (need_dh or need_dw):
            return (torch.zeros_like(hidden) if need_dh else None, torch.zeros_like(weight) if need_dw else None,
                    *none)

        def upstream(rows, lp, ent):
            return (None if g_logp is None else g_logp[rows]), (None if g_ent is None else g_ent[rows])

        _, _, dh, dw = lm_head_chunks(hidden, weight, targets, temperature, upstream, need_dh=need_dh,
                                      need_dw=need_dw, use_triton=use_triton, compute_dtype=compute_dtype, chunk=chunk,
                                      logits_mm=logits_mm)
        return dh, dw, *none


def linear_logprob_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                             temperature: float = 1.0, with_entropy: bool = False,
                             compute_dtype: torch.dtype = torch.float32, chunk: int | None = -1):
    """The PyTorch reference, in ``compute_dtype`` (float64 in tests).

    chunk None: the test oracle and readable spec: logits materialised for all rows, differentiated
    by autograd. chunk > 0 (or -1: :func:`default_chunk`): the CPU path, the chunk loop of
    :func:`lm_head_chunks` in PyTorch, which never holds more than one chunk of logits.
    Returns (logp, entropy or None) in ``compute_dtype``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    if chunk is None:
        return _reference_chunk(hidden, weight, targets, temperature, with_entropy, compute_dtype)
    logp, entropy = LinearLogprobFunction.apply(hidden, weight, targets, float(temperature), with_entropy, None,
                                                None if chunk == -1 else int(chunk), False, compute_dtype)
    return logp, (entropy if with_entropy else None)


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


def check_chunk(chunk) -> None:
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive number of rows or None (the default size); got {chunk!r}")


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is unknown; choose one of: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and HAVE_TRITON else "reference"
    return backend


def prepare(hidden, weight, targets, temperature: float, chunk, backend: str) -> tuple[torch.Tensor, bool]:
    """Every check of the public entry points, before any launch; returns (int64 contiguous targets,
    whether the Triton path runs)."""
    check_inputs(hidden, weight, targets, temperature)
    check_chunk(chunk)
    use_triton = resolve_backend(backend, hidden.device) == "triton"
    if use_triton:
        tri.check_launch(hidden.device)
    return targets.long().contiguous(), use_triton


def linear_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                   with_entropy: bool = False, backend: str = "auto", splits: int | None = None,
                   chunk: int | None = None, logits_mm=None):
    """log softmax(hidden @ weight.T / temperature)[targets] and (optionally) the entropy, per row.

    hidden (N, H) and weight (V, H): one dtype of fp32/fp16/bf16, any strides (passed to the kernel as
    they are; nothing is copied). targets (N,) int64 in [0, V) (made contiguous). Returns (logp (N,) fp32,
    entropy (N,) fp32 or None); differentiable in hidden and weight through both outputs.
    backend: "auto" (Triton on CUDA, reference on CPU) | "triton" | "reference". ``splits`` overrides the
    number of vocabulary splits of the Triton forward (tests use it to exercise the combine); ``chunk``
    the rows per chunk of the backward (default :func:`default_chunk`); ``logits_mm`` the PyTorch path's
    logits GEMM (:func:`lm_head_chunks`).
    """
    targets, use_triton = prepare(hidden, weight, targets, temperature, chunk, backend)
    logp, entropy = LinearLogprobFunction.apply(hidden, weight, targets, float(temperature), with_entropy, splits,
                                                chunk, use_triton, torch.float32, logits_mm)
    return logp, (entropy if with_entropy else None)
