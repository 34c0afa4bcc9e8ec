"""Batch-invariant numerics: the exact on-policy mode (``--exact-logprobs``).

In this mode every op of the decoder computes a token's values in one order, whatever else shares its
batch: the engine's decode (one row per sequence), its prefill (chunked, prefix-cached, preempted and
recomputed) and the trainer's packed forward give the same bits for the same token under the same
weights. The sampler's log-probs are then the trainer's, bit for bit, and the old-log-prob pass is not
needed. Where each op's order comes from (measured on this project's CPUs; bench/RESULTS.md):

- **fp32 linear layers**: MKL picks a different sgemm kernel by row count (1, 2-15 and 16+ rows give
  three different results). Its conditional-numerical-reproducibility mode ``MKL_CBWR=AUTO,STRICT``
  computes each output element in one order for every row count and thread count, at the same speed
  for 8+ rows. ``import fastrft`` sets it (fastrft/__init__.py); it must be set before the first
  matmul, which :func:`check_invariance` verifies.
- **bf16 linear layers**: oneDNN's AMX kernels round some rows differently for 33..~700 rows than for
  1..32 rows. A forward that calls the GEMM on blocks of exactly :data:`ROW_BLOCK` rows is invariant by
  construction; the engine's decode batches (up to 32 rows) are one call. The backward is unchanged.
  Forwards without a gradient (the engine, the KL reference) multiply by oneDNN's pre-packed weights,
  which give the plain GEMM's bits at up to 32 rows and skip its per-call weight reorder.
- **attention** (:mod:`fastrft.models.tiled_attention`): each query at position t attends over its context padded to
  a whole number of :data:`TILE`-key tiles, ((t // TILE) + 1) * TILE keys, the keys past t masked.
  Decode, prefill and the training forward therefore run the same two GEMMs (K = head_dim, then
  K = that padded length) and the same softmax over a row of the same length for that query; the rows
  batched around it change only the GEMMs' row count, which the CNR mode makes irrelevant. It runs in
  fp32 (bf16 inputs are widened exactly), so it is also the more accurate attention.
- **norms, RoPE, the MLP's SiLU**: row-wise ops. Transcendental ones run with their width padded to
  whole vectors (:func:`fastrft.models.layers.aligned`), so that no element takes PyTorch's scalar tail
  loop in one batch and its vector loop in another; RoPE's cos and sin are taken in float64.
- **the LM head and the log-softmax**: one fp32 GEMM on both sides (the engine keeps an fp32 copy of
  a bf16 head) and one formula, :mod:`fastrft.kernels.rows`.

The training backward is free to use any kernel: only the forward's values must match.

On CUDA (and on CPU under Triton's interpreter with ``--kernels triton``, which is how the tests run that
path) the backend is "triton": the linear layers, the norms and attention run the batch-invariant kernels
of :mod:`fastrft.kernels.exact_triton`, and the engine samples from the trainer's LM-head kernel
(:func:`fastrft.kernels.exact_triton.sample_head`). :func:`resolve` picks the backend.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from fastrft.errors import ConfigError
from fastrft.models.tiled_attention import TILE, packed_attention, paged_attention, tiled_attention  # noqa: F401

ROW_BLOCK = 32  # rows per bf16 GEMM call in exact mode


class ExactModeError(ConfigError):
    """This process cannot compute batch-invariantly (the BLAS was configured before fastrft)."""


# ----------------------------------------------------------------------------------------- linear
class _BlockedLinear(torch.autograd.Function):
    """Forward in GEMM calls of exactly ROW_BLOCK rows (the last one zero-padded); backward plain."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return blocked_linear(x, weight, bias, packed=False)

    @staticmethod
    def backward(ctx, g):
        return triton_kernels().linear_backward(ctx, g)  # plain PyTorch GEMMs (triton itself is not needed)


def blocked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   packed: bool | None = None) -> torch.Tensor:
    """F.linear computed ROW_BLOCK rows per GEMM call (no autograd). Whole blocks are read in place; only
    a last partial block is copied and zero-padded.

    packed: multiply by a pre-packed copy of ``weight`` (:func:`packed_weight`), which gives the same bits
    as the plain GEMM at up to ROW_BLOCK rows (checked at start-up, :func:`check_invariance`) and saves
    oneDNN's per-call weight reorder, most of a small call's time. None (the default): wherever oneDNN
    offers it. The forward that trains (:class:`_BlockedLinear`) does not pack: its weights change at
    every optimizer step, and repacking them would cost more than it saves. The engine's decode steps and
    the KL reference, whose weights change at most once per round, do."""
    rows = x.reshape(-1, x.shape[-1])
    m = rows.shape[0]
    if packed is None:
        packed = _CAN_PACK and x.device.type == "cpu" and x.dtype == weight.dtype == torch.bfloat16
    pw = packed_weight(weight) if packed else None

    def gemm(a, out=None):
        if pw is not None:  # (no out= variant: the blocks are concatenated below)
            return torch.ops.mkldnn._linear_pointwise(a, pw, bias, "none", [], "")
        if out is None:
            return F.linear(a, weight, bias)
        return torch.addmm(bias, a, weight.T, out=out) if bias is not None else torch.mm(a, weight.T, out=out)

    if m <= ROW_BLOCK:  # one call (a decode batch): measured to round as a full block does
        return gemm(rows).view(*x.shape[:-1], weight.shape[0])
    whole = m - m % ROW_BLOCK
    tail = F.pad(rows[whole:], (0, 0, 0, ROW_BLOCK - (m - whole))) if whole < m else None
    if pw is not None:
        parts = [gemm(rows[i:i + ROW_BLOCK]) for i in range(0, whole, ROW_BLOCK)]
        if tail is not None:
            parts.append(gemm(tail)[:m - whole])
        return torch.cat(parts).view(*x.shape[:-1], weight.shape[0])
    out = torch.empty((m, weight.shape[0]), dtype=x.dtype, device=x.device)
    for i in range(0, whole, ROW_BLOCK):
        gemm(rows[i:i + ROW_BLOCK], out=out[i:i + ROW_BLOCK])
    if tail is not None:
        out[whole:] = gemm(tail)[:m - whole]
    return out.view(*x.shape[:-1], weight.shape[0])


_CAN_PACK = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise") and \
    hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's pre-packed layout of a (N, K) bf16 weight for ROW_BLOCK-row GEMMs, kept on the tensor and
    redone when the weight changes (its version counter or storage moves)."""
    key = (weight.data_ptr(), weight._version)
    cached = getattr(weight, "_fastrft_packed", None)
    if cached is None or cached[0] != key:
        cached = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROW_BLOCK))
        weight._fastrft_packed = cached
    return cached[1]


def triton_kernels():
    """fastrft.kernels.exact_triton (imported on first use: CPU-only runs never need triton)."""
    from fastrft.kernels import exact_triton

    return exact_triton


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: str = "torch") -> torch.Tensor:
    """The exact mode's linear layer. "torch" (CPU): plain in fp32 (CNR makes it invariant), row-blocked
    otherwise. "triton": fixed-tile GEMMs without split-K (fastrft.kernels.exact_triton)."""
    if backend == "triton":
        return triton_kernels().linear(x, weight, bias)
    if x.dtype == torch.float32 or x.device.type != "cpu":
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _BlockedLinear.apply(x, weight, bias)
    return blocked_linear(x, weight, bias)


# ----------------------------------------------------------------------------------------- the process
def cnr_requested() -> bool:
    return os.environ.get("MKL_CBWR", "").upper().replace(" ", "").endswith("STRICT")


@torch.no_grad()
def check_invariance(shapes: list[tuple[int, int]], dtype: torch.dtype, device: torch.device) -> None:
    """Verify, on this process's BLAS, that a row of every linear layer shape (in_features, out_features)
    comes out the same at every row count the mode uses (1, 3, 16, 33, 300 rows); raise
    :class:`ExactModeError` naming the first one that does not."""
    global _CAN_PACK
    if device.type != "cpu":
        return
    gen = torch.Generator().manual_seed(0)
    for k, n in sorted(set(shapes)):
        w = torch.randn(n, k, generator=gen).to(dtype)
        x = torch.randn(300, k, generator=gen).to(dtype)
        full = linear(x, w, None)
        if dtype == torch.bfloat16 and device.type == "cpu" and _CAN_PACK:
            # The engine's pre-packed GEMM against the training forward's plain one: if a oneDNN build
            # rounds them apart, every call goes unpacked (slower, still exact).
            if not all(torch.equal(blocked_linear(x[:m], w, None, packed=True),
                                   blocked_linear(x[:m], w, None, packed=False)) for m in (1, 3, 32, 300)):
                _CAN_PACK = False
        for m in (1, 3, 16, 33):
            if not torch.equal(linear(x[:m], w, None), full[:m]):
                hint = ("MKL's reproducibility mode is off: set MKL_CBWR=AUTO,STRICT in the environment, or import "
                        "fastrft before anything runs a matrix multiply" if dtype == torch.float32 and not
                        cnr_requested() else "this CPU's BLAS rounds differently by batch size")
                raise ExactModeError(f"exact log-probs: a {k}x{n} {str(dtype).removeprefix('torch.')} linear layer "
                                     f"gives different bits for {m} rows than for 300 ({hint}); use "
                                     "--exact-logprobs off")


def resolve(cfg, device: torch.device, precision: str = "fp32") -> str | None:
    """Whether and how a run computes exactly: ``--exact-logprobs`` (cfg.model.exact_logprobs) against what
    can honour it. Returns None (off), "torch" (the CPU ops of this module) or "triton" (the Triton kernels
    of fastrft.kernels.exact_triton: CUDA, or CPU under TRITON_INTERPRET=1 with ``--kernels triton``, which
    is how the tests run the CUDA path). ``on`` with something that cannot honour it raises
    :class:`fastrft.errors.ConfigError` with the reason. ``auto`` is on where the mode costs at most 5%
    (bench/RESULTS.md, "Exact log-probs"): fp32 on CPU with more than one optimizer step per round, where
    the skipped old-log-prob pass pays for it (0.92-1.06x over runs; one step per round costs 1.05-1.09x,
    bf16-mixed 1.10-1.14x). Its CUDA cost has not been measured on a GPU, so ``auto`` leaves it off there."""
    setting, ro = cfg.model.exact_logprobs, cfg.rollout
    reasons = []
    backend = "triton" if device.type != "cpu" or cfg.model.kernels == "triton" else "torch"
    if backend == "triton":
        from fastrft.kernels.linear_logprob import HAVE_TRITON

        interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
        if device.type not in ("cpu", "cuda"):
            reasons.append(f"it has batch-invariant kernels for CPU and CUDA only, not {device.type}")
        elif not HAVE_TRITON:
            reasons.append("on CUDA it runs Triton kernels, and triton is not installed (pip install triton)")
        elif device.type == "cpu" and not interpreting:
            reasons.append("--kernels triton on CPU needs TRITON_INTERPRET=1 (the exact CPU ops run with "
                           "--kernels auto)")
        elif cfg.model.kernels == "reference":
            reasons.append("--kernels reference computes the trainer's log-probs with cuBLAS, whose kernels "
                           "depend on the batch size; use --kernels auto")
    if ro.top_k > 0 or ro.top_p < 1.0:
        reasons.append("--top-p/--top-k sample from a truncated distribution, which is not the trainer's")
    if setting == "on" and reasons:
        raise ConfigError(f"exact_logprobs (--exact-logprobs) on cannot be honoured: {reasons[0]}; use "
                          "--exact-logprobs off (or auto)")
    cheap = backend == "torch" and precision == "fp32" and cfg.algo.ppo_epochs * cfg.algo.mini_batches > 1
    return backend if setting == "on" or (setting == "auto" and not reasons and cheap) else None


def enable(models, dtype: torch.dtype, device: torch.device, backend: str = "torch") -> None:
    """Switch ``models`` (the master, training and rollout modules; repeats are fine) to the exact ops of
    ``backend``, after checking that this process's BLAS honours them (:func:`check_invariance`; the
    "triton" kernels fix their own order)."""
    models = list({id(m): m for m in models}.values())
    if backend == "torch":
        shapes = [s for m in models if hasattr(m, "linear_shapes") for s in m.linear_shapes()]
        check_invariance(shapes, dtype, device)
    else:
        for m in models:
            if hasattr(m, "config"):
                try:
                    triton_kernels().check_model(m.config.head_dim, dtype, device)
                except (RuntimeError, ValueError) as err:
                    raise ExactModeError(f"exact log-probs: {err}") from None
    for m in models:
        m.set_exact(True, backend)
