"""Batch-invariant numerics: the exact on-policy mode (``--exact-logprobs``).

In this mode every op of the decoder computes a token's values in one order, whatever else shares its
batch: the engine's decode (one row per sequence), its prefill (chunked, prefix-cached, preempted and
recomputed) and the trainer's packed forward give the same bits for the same token under the same
weights. The sampler's log-probs are then the trainer's, bit for bit, and the old-log-prob pass is not
needed. Where each op's order comes from (measured on this project's CPUs; bench/RESULTS.md):

- **every GEMM** (each linear layer's shape, the LM head, the attention tiles) runs under a row rule
  (:mod:`fastrft.models.row_rules`): one plain call, calls padded to at least P rows, or fixed blocks of B
  rows, whichever is the cheapest that gives a row the same bits in every batch on this process's BLAS,
  found at start-up by :func:`check_invariance`. Intel's MKL in its conditional-numerical-reproducibility
  mode ``MKL_CBWR=AUTO,STRICT`` (which ``import fastrft`` sets, fastrft/__init__.py) needs one call for
  fp32; AMD EPYCs' MKL rounds 1-3 rows apart from 4+ whatever that mode says, so it gets calls padded to 4
  rows; oneDNN's bf16 AMX kernels round 33..~700 rows apart from 1..32, so bf16 runs 32-row blocks.
  Forwards without a gradient (the engine, the KL reference) multiply bf16 blocks by oneDNN's pre-packed
  weights where the probe found them on this CPU with the same bits (they need AVX-512 or AVX-NE-CONVERT);
  they skip the per-call weight reorder. The backward is unchanged.
- **attention** (:mod:`fastrft.models.tiled_attention`): each query at position t attends over its context padded to
  a whole number of :data:`TILE`-key tiles, ((t // TILE) + 1) * TILE keys, the keys past t masked.
  Decode, prefill and the training forward therefore run the same two GEMMs (K = head_dim, then
  K = that padded length) and the same softmax over a row of the same length for that query; the rows
  batched around it change only the GEMMs' row count, which their row rule makes irrelevant. It runs in
  fp32 (bf16 inputs are widened exactly), so it is also the more accurate attention.
- **norms, RoPE, the MLP's SiLU**: row-wise ops. Transcendental ones run with their width padded to
  whole vectors (:func:`fastrft.models.layers.aligned`), so that no element takes PyTorch's scalar tail
  loop in one batch and its vector loop in another; RoPE's cos and sin are taken in float64.
- **the LM head and the log-softmax**: one fp32 GEMM under one row rule on both sides
  (:func:`head_logits`; the engine keeps an fp32 copy of a bf16 head) and one formula,
  :mod:`fastrft.kernels.rows`.

The training backward is free to use any kernel: only the forward's values must match.

On CUDA (and on CPU under Triton's interpreter with ``--kernels triton``, which is how the tests run that
path) the backend is "triton": the linear layers, the norms and attention run the batch-invariant kernels
of :mod:`fastrft.kernels.exact_triton`, and the engine samples from the trainer's LM-head kernel
(:func:`fastrft.kernels.exact_triton.sample_head`). :func:`resolve` picks the backend.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

from fastrft import numerics
from fastrft.errors import ConfigError
from fastrft.models import lora, row_rules
from fastrft.models.ops import Ops, get
from fastrft.models.tiled_attention import (TILE, packed_attention, paged_attention, step_plan,  # noqa: F401
                                            tiled_attention)


class ExactModeError(ConfigError):
    """This process cannot compute batch-invariantly (its BLAS rounds a row by its batch under every
    row rule, or MKL was configured before fastrft)."""


# ----------------------------------------------------------------------------------------- linear
class _RuledLinear(torch.autograd.Function):
    """Forward under the shape's row rule (:mod:`fastrft.models.row_rules`); backward plain."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return ruled_linear(x, weight, bias, packed=False)

    backward = staticmethod(numerics.linear_backward)


def ruled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 packed: bool | None = None) -> torch.Tensor:
    """F.linear (no autograd) in the GEMM calls of its shape's row rule (:func:`row_rules.choose`: one
    plain call on Intel's fp32, calls padded to 4 rows on AMD's, blocks of 32 rows for oneDNN's bf16).

    packed: multiply by a pre-packed copy of ``weight`` (:func:`packed_weight`), where the probe found
    that oneDNN offers it and that it gives the same bits; it saves oneDNN's per-call weight reorder, most
    of a small call's time. None (the default): wherever the probe allows. The forward that trains
    (:class:`_RuledLinear`) does not pack: its weights change at every optimizer step, and repacking them
    would cost more than it saves. The engine's decode steps and the KL reference, whose weights change
    at most once per round, do."""
    rows = x.reshape(-1, x.shape[-1])
    choice = row_rules.choose(row_rules.Site("linear", weight.shape[1], weight.shape[0], weight.dtype,
                                             bias is not None))
    pw = packed_weight(weight, choice.rule.block) if choice.packed and packed is not False else None
    out = None if pw is not None else torch.empty((rows.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    y = choice.rule.run(lambda piece, dest: row_rules.gemm(piece, weight.T, bias, pw, out=dest), rows, out=out)
    return y.view(*x.shape[:-1], weight.shape[0])


def packed_weight(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """oneDNN's pre-packed layout of a (N, K) bf16 weight for ``rows``-row GEMMs, kept on the tensor and
    redone when the weight changes (its version counter or storage moves)."""
    key = (weight.data_ptr(), weight._version, rows)
    cached = getattr(weight, "_fastrft_packed", None)
    if cached is None or cached[0] != key:
        cached = (key, row_rules.reorder(weight.detach(), rows))
        weight._fastrft_packed = cached
    return cached[1]


def head_logits(hidden: torch.Tensor, weight_t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The LM head's logits hidden (R, H) @ weight_t (H, V) under its row rule: the same bits for a row
    in the engine's decode batch, its prefill and the trainer's chunks (their GEMM in the exact mode)."""
    choice = row_rules.choose(row_rules.Site("head", weight_t.shape[0], weight_t.shape[1], weight_t.dtype))
    return choice.rule.run(lambda piece, dest: row_rules.gemm(piece, weight_t, out=dest), hidden, out=out)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The exact mode's linear layer on CPU: under its shape's row rule (:func:`ruled_linear`)."""
    if x.device.type != "cpu":
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RuledLinear.apply(x, weight, bias)
    return ruled_linear(x, weight, bias)


class ExactTorchOps(Ops):
    """The exact mode on CPU: row-ruled GEMMs, tiled attention, the row-ruled LM-head GEMM on both sides
    (the engine's head and the trainer's loss). RMSNorm's plain formula is already batch-invariant here."""

    name = "exact-torch"
    exact = True
    head_gemm = staticmethod(head_logits)

    def dense(self, x, weight, bias):
        return linear(x, weight, bias)

    def adapted(self, layer, x, weight, bias):  # the adapter's GEMMs under this backend's batch-invariant rules
        return lora.add_delta(layer, x, self.dense(x, weight, bias), self.dense)

    def packed_attention(self, q, k, v, cu_seqlens, scale):
        return packed_attention(q, k, v, cu_seqlens, scale)

    def plan_step(self, meta, rows, device):
        return step_plan(meta, device)

    def paged_attention(self, q, k, v, k_cache, v_cache, meta, scale):
        return paged_attention(q, k_cache, v_cache, meta, scale)

    def check(self, models, dtype: torch.dtype, device: torch.device) -> None:
        """Raise :class:`ExactModeError` unless this process's BLAS honours a row rule at every GEMM site of
        ``models`` (:func:`check_invariance`)."""
        check_invariance(sites([m for m in models if _computes_in(m, dtype)], dtype), device)


# ----------------------------------------------------------------------------------------- the process
def cnr_requested() -> bool:
    return os.environ.get("MKL_CBWR", "").upper().replace(" ", "").endswith("STRICT")


def sites(models, dtype: torch.dtype) -> list[row_rules.Site]:
    """Every GEMM of the exact CPU path of ``models``: each linear layer in ``dtype``, the LM head (fp32 on
    both sides: the engine keeps an fp32 copy of a bf16 head) and the attention tiles (fp32)."""
    out = set()
    for m in models:
        for k, n, bias in getattr(m, "linear_shapes", lambda: [])():
            out.add(row_rules.Site("linear", k, n, dtype, bias))
        if hasattr(m, "lm_head_weight"):
            v, h = m.lm_head_weight.shape
            out.add(row_rules.Site("head", h, v, torch.float32))
            cfg = m.config
            out.add(row_rules.Site("attention", cfg.head_dim, cfg.num_heads // cfg.num_kv_heads,
                                   torch.float32))
    return sorted(out, key=lambda s: (s.kind, s.k, s.n, str(s.dtype), s.bias))


@torch.no_grad()
def check_invariance(targets: list[row_rules.Site], device: torch.device) -> dict[row_rules.Site, row_rules.Choice]:
    """Give every GEMM site its row rule on this process's BLAS (:func:`fastrft.models.row_rules.choose`),
    before anything runs; raise :class:`ExactModeError` naming the first site that no rule makes
    batch-invariant, with the rules tried. Returns the choices (for the start-up line and the bench)."""
    if device.type != "cpu":
        return {}
    chosen = {}
    for site in targets:
        try:
            chosen[site] = row_rules.choose(site)
        except row_rules.RowRuleError as err:
            hint = ("; MKL's reproducibility mode is off: set MKL_CBWR=AUTO,STRICT in the environment, or import "
                    "fastrft before anything runs a matrix multiply" if site.dtype == torch.float32
                    and not cnr_requested() else "")
            raise ExactModeError(f"exact log-probs: this CPU's BLAS cannot be made batch-invariant: {err}{hint}; "
                                 "use --exact-logprobs off") from None
    return chosen


def describe(chosen: dict[row_rules.Site, row_rules.Choice]) -> str:
    """One line: which GEMM path each kind of site took, e.g. "linear bf16: blocks of 32 rows (pre-packed)"."""
    by_kind: dict[str, set[str]] = {}
    for site, choice in chosen.items():
        name = f"{site.kind} {str(site.dtype).removeprefix('torch.')}"
        by_kind.setdefault(name, set()).add(str(choice.rule) + (" (pre-packed)" if choice.packed else ""))
    return "; ".join(f"{k}: {', '.join(sorted(v))}" for k, v in sorted(by_kind.items()))


def resolve(cfg, device: torch.device, precision: str = "fp32") -> str:
    """Which backend a run computes with: ``--exact-logprobs`` (cfg.model.exact_logprobs) against what can
    honour it. Returns "plain" (off), "exact-torch" (the CPU ops of this module) or "exact-triton" (the
    Triton kernels of fastrft.kernels.exact_triton: CUDA, or CPU under TRITON_INTERPRET=1 with ``--kernels
    triton``, which is how the tests run the CUDA path). ``on`` with something that cannot honour it raises
    :class:`fastrft.errors.ConfigError` with the reason. ``auto`` is on where the mode costs at most 5%
    (bench/RESULTS.md, "Exact log-probs"): fp32 on CPU with more than one optimizer step per round, where
    the skipped old-log-prob pass pays for it. Its CUDA cost has not been measured on a GPU, so ``auto``
    leaves it off there."""
    setting, ro = cfg.model.exact_logprobs, cfg.rollout
    reasons = []
    triton = device.type != "cpu" or cfg.model.kernels == "triton"
    if triton:
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
    if getattr(cfg.model, "lora_dropout", 0.0):
        reasons.append("--lora-dropout drops activations in the training forward that the sampler keeps")
    if setting == "on" and reasons:
        raise ConfigError(f"exact_logprobs (--exact-logprobs) on cannot be honoured: {reasons[0]}; use "
                          "--exact-logprobs off (or auto)")
    cheap = not triton and precision == "fp32" and cfg.algo.ppo_epochs * cfg.algo.mini_batches > 1
    on = setting == "on" or (setting == "auto" and not reasons and cheap)
    return ("exact-triton" if triton else "exact-torch") if on else "plain"


def enable(models, dtype: torch.dtype, device: torch.device, backend: str = "exact-torch") -> Ops:
    """Give ``models`` (the master, training and rollout modules; repeats are fine) the backend named
    ``backend``, after it has checked that this process can honour it (the CPU ops: this BLAS's row
    rules, :func:`check_invariance`; the Triton kernels: the head dim and device). Returns the backend."""
    models = list({id(m): m for m in models}.values())
    ops = get(backend)
    ops.check(models, dtype, device)
    for m in models:
        m.set_ops(ops)
    return ops


def choose(cfg, device: torch.device, precision: str, models, dtype: torch.dtype, notify: bool = True) -> Ops:
    """The run's backend, given to ``models``: :func:`resolve`, then :func:`enable`. Where the exact mode is
    ``auto`` and this machine cannot honour it, the plain backend, with a one-line notice (``notify``);
    with ``on`` the :class:`ExactModeError`."""
    name = resolve(cfg, device, precision)
    try:
        return enable(models, dtype, device, name)
    except ExactModeError as err:  # `on` refuses; `auto` never stops a run
        if cfg.model.exact_logprobs == "on":
            raise
        if notify:
            print(f"fastrft: --exact-logprobs auto: off on this machine ({reason(err)})", file=sys.stderr)
        return enable(models, dtype, device, "plain")


def _computes_in(model, dtype: torch.dtype) -> bool:
    """Whether ``model`` runs forwards in ``dtype`` (bf16-mixed's fp32 masters only step, never compute)."""
    w = getattr(model, "lm_head_weight", None)
    return w is None or w.dtype == dtype


def reason(err: ExactModeError) -> str:
    """The cause an ExactModeError states, without its prefix and its advice (for one-line notices)."""
    return str(err).removeprefix("exact log-probs: ").split("; use --exact-logprobs off")[0]
