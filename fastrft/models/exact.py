"""Batch-invariant numerics: the exact on-policy mode (``--exact-logprobs``).

In this mode every op of the decoder computes a token's values in one order, whatever else shares its
batch: the engine's decode (one row per sequence), its prefill (chunked, prefix-cached, preempted and
recomputed) and the trainer's packed forward give the same bits for the same token under the same
weights. The sampler's log-probs are then the trainer's, bit for bit, and the old-log-prob pass is not
needed. Where each op's order comes from (measured on this project's CPUs; bench/RESULTS.md):

- **fp32 linear layers**: MKL picks a different sgemm kernel by row count (1, 2-15 and 16+ rows give
  three different results). Its conditional-numerical-reproducibility mode ``MKL_CBWR=AUTO,STRICT``
  computes each output element in one order for every row count and thread count, at the same speed
  for 8+ rows. fastrft sets it at import (:func:`fastrft._numerics`); it must be set before the first
  matmul, which :func:`check_invariance` verifies.
- **bf16 linear layers**: oneDNN's AMX kernels round some rows differently for 33..~700 rows than for
  1..32 rows. A forward that calls the GEMM on blocks of exactly :data:`ROW_BLOCK` rows is invariant by
  construction; the engine's decode batches (up to 32 rows) are one call. The backward is unchanged.
- **attention** (:func:`tiled_attention`): each query at position t attends over its context padded to
  a whole number of :data:`TILE`-key tiles, ((t // TILE) + 1) * TILE keys, the keys past t masked.
  Decode, prefill and the training forward therefore run the same two GEMMs (K = head_dim, then
  K = that padded length) and the same softmax over a row of the same length for that query; the rows
  batched around it change only the GEMMs' row count, which the CNR mode makes irrelevant. It runs in
  fp32 (bf16 inputs are widened exactly), so it is also the more accurate attention.
- **norms, RoPE, the MLP's SiLU**: row-wise ops whose vectorised loops see whole vectors for these
  shapes; :func:`check_invariance` and the tests measure them, they need no change.
- **the LM head and the log-softmax**: one fp32 GEMM on both sides (the engine keeps an fp32 copy of
  a bf16 head) and one formula, :func:`fastrft.kernels.sampling.logprob_of`.

The training backward is free to use any kernel: only the forward's values must match.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

TILE = 64  # keys per attention tile: a query's context is padded to a multiple of this
ROW_BLOCK = 32  # rows per bf16 GEMM call in exact mode
CNR = "AUTO,STRICT"  # the MKL_CBWR value the mode needs


class ExactModeError(RuntimeError):
    """This process cannot compute batch-invariantly (the BLAS was configured before fastrft)."""


# ----------------------------------------------------------------------------------------- linear
class _BlockedLinear(torch.autograd.Function):
    """Forward in GEMM calls of exactly ROW_BLOCK rows (the last one zero-padded); backward plain."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return blocked_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        gx = (g2 @ weight).view(x.shape) if ctx.needs_input_grad[0] else None
        gw = g2.T @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def blocked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear computed ROW_BLOCK rows per GEMM call (no autograd)."""
    rows = x.reshape(-1, x.shape[-1])
    m = rows.shape[0]
    if m <= ROW_BLOCK:  # one call (a decode batch): measured to round as a full block does
        return F.linear(x, weight, bias)
    n = -(-m // ROW_BLOCK) * ROW_BLOCK
    padded = F.pad(rows, (0, 0, 0, n - m)) if n != m else rows
    out = torch.empty((n, weight.shape[0]), dtype=x.dtype, device=x.device)
    for i in range(0, n, ROW_BLOCK):
        torch.addmm(bias, padded[i:i + ROW_BLOCK], weight.T, out=out[i:i + ROW_BLOCK]) if bias is not None \
            else torch.mm(padded[i:i + ROW_BLOCK], weight.T, out=out[i:i + ROW_BLOCK])
    return out[:m].view(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The exact mode's linear layer: plain in fp32 (CNR makes it invariant), row-blocked otherwise."""
    if x.dtype == torch.float32 or x.device.type != "cpu":
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _BlockedLinear.apply(x, weight, bias)
    return blocked_linear(x, weight, bias)


# ----------------------------------------------------------------------------------------- attention
class TilePlan:
    """How :func:`tiled_attention` batches a set of query rows; it depends on the rows' sequences and
    positions only, so one plan serves every layer of a forward.

    groups: per tile index t, (t, seqs (S,) long tensor, index (S, W) long rows of q, pos (S, W) long);
    a sequence's rows are padded to W with the index of an appended zero row (``pad``: whether any is).
    where (R,) long or None: row i of the result is row where[i] of the groups' concatenated outputs."""

    def __init__(self, row_seq: np.ndarray, row_pos: np.ndarray, device: torch.device):
        rows = len(row_seq)
        tile = row_pos // TILE
        order = np.lexsort((row_pos, row_seq, tile))  # by tile, then sequence, then position
        self.groups, flat, self.pad = [], [], False
        for t in np.unique(tile):
            members = order[tile[order] == t]
            seqs, first, counts = np.unique(row_seq[members], return_index=True, return_counts=True)
            width = int(counts.max())
            index = np.full((len(seqs), width), rows, dtype=np.int64)
            rank = np.arange(len(members)) - np.repeat(first, counts)
            slot = np.repeat(np.arange(len(seqs)), counts)
            index[slot, rank] = members
            pos = np.zeros((len(seqs), width), dtype=np.int64)
            pos[slot, rank] = row_pos[members]
            self.pad |= bool((counts != width).any())
            self.groups.append((int(t), torch.from_numpy(seqs).to(device), torch.from_numpy(index).to(device),
                                torch.from_numpy(pos).to(device)))
            flat.append(index.reshape(-1))
        flat = np.concatenate(flat) if flat else np.zeros(0, dtype=np.int64)
        if np.array_equal(flat, np.arange(rows)):
            self.where = None
        else:
            where = np.empty(rows, dtype=np.int64)
            real = flat < rows
            where[flat[real]] = np.nonzero(real)[0]
            self.where = torch.from_numpy(where).to(device)


def tiled_attention(q: torch.Tensor, plan: TilePlan, gather_kv, scale: float) -> torch.Tensor:
    """Causal attention in which each query's result depends on its own context only.

    q (R, Hq, D): the query rows the plan was made for; gather_kv(seqs, n) -> (k, v), each (S, n, Hkv, D):
    the first n keys and values of each sequence id in ``seqs`` (finite values past a sequence's end; they
    are masked). Returns (R, Hq, D) in q's dtype."""
    hq, d = q.shape[1], q.shape[2]
    q_ext = torch.cat([q, q.new_zeros(1, hq, d)]) if plan.pad else q
    outs = []
    for tile, seqs, index, pos in plan.groups:
        k, v = gather_kv(seqs, (tile + 1) * TILE)
        outs.append(_tile_attention(q_ext, index, pos, k, v, scale).reshape(-1, hq, d))
    flat = outs[0] if len(outs) == 1 else torch.cat(outs)
    return flat if plan.where is None else flat.index_select(0, plan.where)


def _tile_attention(q_ext, index, pos, k, v, scale: float) -> torch.Tensor:
    """One tile group: index (S, W) rows of q_ext, pos (S, W) their positions, k/v (S, N, Hkv, D).
    Returns (S, W, Hq, D) in q's dtype. Every operand is made contiguous in one layout, so the GEMMs
    see the same memory order on every path."""
    s, w = index.shape
    hq, d = q_ext.shape[1], q_ext.shape[2]
    n, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    q = (q_ext.index_select(0, index.flatten()).view(s, w, hkv, g, d).permute(0, 2, 3, 1, 4)
         .reshape(s, hkv, g * w, d).float().contiguous())
    kc = k.permute(0, 2, 1, 3).float().contiguous()  # (S, Hkv, N, D)
    vc = v.permute(0, 2, 1, 3).float().contiguous()
    scores = torch.matmul(q, kc.transpose(-1, -2)) * scale
    hidden = torch.arange(n, device=q.device)[None, None, :] > pos[:, :, None]  # (S, W, N)
    hidden = hidden[:, None, None].expand(s, hkv, g, w, n).reshape(s, hkv, g * w, n)
    scores = scores.masked_fill(hidden, float("-inf"))
    p = torch.exp(scores - scores.amax(-1, keepdim=True))
    out = torch.matmul(p, vc) / p.sum(-1, keepdim=True)
    return out.view(s, hkv, g, w, d).permute(0, 3, 1, 2, 4).reshape(s, w, hq, d).to(q_ext.dtype)


_PACKED_PLANS: dict[tuple, tuple] = {}


def packed_attention(q, k, v, cu_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`tiled_attention` over a packed varlen batch (the training forward and plain prefill)."""
    bounds = tuple(cu_seqlens.tolist())
    cached = _PACKED_PLANS.get((bounds, q.device))
    if cached is None:
        lens = np.diff(np.asarray(bounds, dtype=np.int64))
        seq = np.repeat(np.arange(len(lens)), lens)
        pos = np.arange(bounds[-1] - bounds[0]) - np.repeat(np.asarray(bounds[:-1]) - bounds[0], lens)
        width = -(-int(lens.max(initial=1)) // TILE) * TILE
        slots = torch.from_numpy(seq * width + pos).to(q.device)
        cached = (TilePlan(seq, pos, q.device), slots, width, len(lens))
        if len(_PACKED_PLANS) > 64:
            _PACKED_PLANS.clear()
        _PACKED_PLANS[(bounds, q.device)] = cached
    plan, slots, width, nseq = cached
    hkv, d = k.shape[1], k.shape[2]

    def padded(x):
        return x.new_zeros(nseq * width, hkv, d).index_copy(0, slots, x).view(nseq, width, hkv, d)

    kp, vp = padded(k), padded(v)

    def gather(seqs, n):
        return kp.index_select(0, seqs)[:, :n], vp.index_select(0, seqs)[:, :n]

    return tiled_attention(q, plan, gather, scale)


def paged_attention(q, k_cache, v_cache, meta, scale: float) -> torch.Tensor:
    """:func:`tiled_attention` over the paged cache (decode: one query per sequence; prefill: each
    sequence's new tokens, the last ones of its context). The step's new K/V are already in the cache.
    The plan is made once per step and kept on ``meta``."""
    plan = getattr(meta, "tile_plan", None)
    if plan is None:
        ctx = meta.context_lens.cpu().numpy().astype(np.int64)
        if meta.is_prefill:
            new = np.diff(meta.cu_seqlens_q.cpu().numpy().astype(np.int64))
        else:
            new = np.ones_like(ctx)
        seq = np.repeat(np.arange(len(ctx)), new)
        pos = np.repeat(ctx, new) - np.repeat(new, new) + (np.arange(new.sum()) - np.repeat(np.cumsum(new) - new, new))
        plan = meta.tile_plan = TilePlan(seq, pos, q.device)
    page, hkv, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    tables = meta.block_tables

    def gather(seqs, n):
        nb = -(-n // page)
        ids = tables.index_select(0, seqs)[:, :nb].long().clamp_min(0)
        if ids.shape[1] < nb:  # a table narrower than the tile: block 0 stands in (masked)
            ids = F.pad(ids, (0, nb - ids.shape[1]))
        flat = ids.flatten()
        shape = (len(seqs), nb * page, hkv, d)
        return k_cache.index_select(0, flat).view(shape)[:, :n], v_cache.index_select(0, flat).view(shape)[:, :n]

    return tiled_attention(q, plan, gather, scale)


# ----------------------------------------------------------------------------------------- the process
def cnr_requested() -> bool:
    return os.environ.get("MKL_CBWR", "").upper().replace(" ", "").endswith("STRICT")


@torch.no_grad()
def check_invariance(shapes: list[tuple[int, int]], dtype: torch.dtype, device: torch.device) -> None:
    """Verify, on this process's BLAS, that a row of every linear layer shape (in_features, out_features)
    comes out the same at every row count the mode uses (1, 3, 16, 33, 300 rows); raise
    :class:`ExactModeError` naming the first one that does not."""
    if device.type != "cpu":
        return
    gen = torch.Generator().manual_seed(0)
    for k, n in sorted(set(shapes)):
        w = torch.randn(n, k, generator=gen).to(dtype)
        x = torch.randn(300, k, generator=gen).to(dtype)
        full = linear(x, w, None)
        for m in (1, 3, 16, 33):
            if not torch.equal(linear(x[:m], w, None), full[:m]):
                hint = ("MKL's reproducibility mode is off: set MKL_CBWR=AUTO,STRICT in the environment, or import "
                        "fastrft before anything runs a matrix multiply" if dtype == torch.float32 and not
                        cnr_requested() else "this CPU's BLAS rounds differently by batch size")
                raise ExactModeError(f"exact log-probs: a {k}x{n} {str(dtype).removeprefix('torch.')} linear layer "
                                     f"gives different bits for {m} rows than for 300 ({hint}); use "
                                     "--exact-logprobs off")


def resolve(cfg, device: torch.device, precision: str = "fp32") -> bool:
    """Whether a run computes exactly: ``--exact-logprobs`` (cfg.model.exact_logprobs) against what can
    honour it. ``on`` with something that cannot raises :class:`fastrft.errors.ConfigError` with the
    reason. ``auto`` is on where the mode costs at most 5% (bench/RESULTS.md, "Exact log-probs"): fp32 on
    CPU with more than one optimizer step per round, where the skipped old-log-prob pass pays for it
    (1.05x; one step per round costs 1.10x, bf16-mixed 1.23x)."""
    from fastrft.errors import ConfigError

    setting, ro = cfg.model.exact_logprobs, cfg.rollout
    reasons = []
    if device.type != "cpu":
        reasons.append(f"it is implemented for CPU runs only (the {device.type} decode and training kernels are "
                       "not batch-invariant yet)")
    if ro.top_k > 0 or ro.top_p < 1.0:
        reasons.append("--top-p/--top-k sample from a truncated distribution, which is not the trainer's")
    if cfg.model.kernels == "triton":
        reasons.append("--kernels triton computes the trainer's log-probs with the Triton kernels, which the "
                       "CPU sampler does not share")
    if setting == "on" and reasons:
        raise ConfigError(f"exact_logprobs (--exact-logprobs) on cannot be honoured: {reasons[0]}; use "
                          "--exact-logprobs off (or auto)")
    cheap = precision == "fp32" and cfg.algo.ppo_epochs * cfg.algo.mini_batches > 1
    return setting == "on" or (setting == "auto" and not reasons and cheap)


def enable(models, dtype: torch.dtype, device: torch.device) -> None:
    """Switch ``models`` (the master, training and rollout modules; repeats are fine) to the exact ops,
    after checking that this process's BLAS honours them (:func:`check_invariance`)."""
    models = list({id(m): m for m in models}.values())
    shapes = [s for m in models if hasattr(m, "linear_shapes") for s in m.linear_shapes()]
    check_invariance(shapes, dtype, device)
    for m in models:
        m.set_exact(True)
