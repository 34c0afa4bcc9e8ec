"""Batch-invariant causal attention for the exact mode (fastrft.models.exact).

A query at position t attends over its context padded to whole TILE-key tiles, ((t // TILE) + 1) * TILE
keys, the keys past t masked, in fp32. Decode, prefill and the training forward therefore run the same
two GEMMs and the same softmax row for it; only the number of rows batched around it changes, which the
BLAS's reproducibility mode makes irrelevant. :class:`TilePlan` batches the query rows of one forward by
tile; :func:`packed_attention` serves the packed training forward, :func:`paged_attention` the engine.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fastrft.models import row_rules
from fastrft.models.paged import StepPlan
from fastrft.numerics import TILE  # keys per attention tile: a query's context is padded to a multiple of this


class TilePlan(StepPlan):
    """How :func:`tiled_attention` batches a set of query rows; it depends on the rows' sequences and
    positions only, so one plan serves every layer of a forward.

    groups: per tile index t, (t, seqs (S,) long tensor, index (S, W) long rows of q, pos (S, W) long);
    a sequence's rows are padded to W with the index of an appended zero row (``pad``: whether any is).
    in_order: one group holds every row, in order and unpadded (a decode step within one tile), so its
    result needs no scatter. ``cache`` keeps what a caller derives from the plan once for every layer."""

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
        self.in_order = len(flat) == 1 and not self.pad and np.array_equal(flat[0], np.arange(rows))
        self.cache: dict = {}
        self._masks: dict[tuple[int, int, int], torch.Tensor] = {}

    def mask(self, i: int, hkv: int, g: int) -> torch.Tensor:
        """(S, Hkv, G * W, N) bool, True where group i's query rows may not see a key (past the query's
        position); made once and shared by every layer."""
        key = (i, hkv, g)
        if key not in self._masks:
            tile, _, index, pos = self.groups[i]
            s, w = index.shape
            n = (tile + 1) * TILE
            hidden = torch.arange(n, device=pos.device)[None, None, :] > pos[:, :, None]  # (S, W, N)
            self._masks[key] = hidden[:, None, None].expand(s, hkv, g, w, n).reshape(s, hkv, g * w, n)
        return self._masks[key]


def tiled_attention(q: torch.Tensor, plan: TilePlan, gather_kv, scale: float) -> torch.Tensor:
    """Causal attention in which each query's result depends on its own context only.

    q (R, Hq, D): the query rows the plan was made for; gather_kv(i, seqs, n) -> (k, v), each (S, n, Hkv, D):
    the first n keys and values of each sequence id in ``seqs`` (those of the plan's group i; finite values
    past a sequence's end, they are masked). Returns (R, Hq, D) in q's dtype.

    The query rows are widened once, and each group's keys and values are permuted and widened in one
    copy: the fewest passes over memory, since the engine calls this once per layer per decode step."""
    rows, hq, d = q.shape
    qf = q.float()
    if plan.pad:
        qf = torch.cat([qf, qf.new_zeros(1, hq, d)])
    single = plan.in_order
    # One output row more than R when a group's rows are padded: the padding rows land there.
    out = torch.empty((rows + (not single), hq, d), dtype=q.dtype, device=q.device)
    for i, (tile, seqs, index, _) in enumerate(plan.groups):
        k, v = gather_kv(i, seqs, (tile + 1) * TILE)
        hkv = k.shape[2]
        o = _tile_attention(qf, None if single else index, _widened(k), _widened(v), plan.mask(i, hkv, hq // hkv),
                            scale, index.shape)
        s, w = index.shape
        # One group holding every row in order writes its result in place; others scatter theirs.
        dest = out if single else torch.empty((s, w, hq, d), dtype=q.dtype, device=q.device)
        dest.view(s, w, hkv, hq // hkv, d).copy_(o.view(s, hkv, hq // hkv, w, d).permute(0, 3, 1, 2, 4))
        if not single:
            out.index_copy_(0, index.flatten(), dest.view(s * w, hq, d))
    return out if single else out[:rows]


def _widened(x: torch.Tensor) -> torch.Tensor:
    """(S, N, Hkv, D) in any float dtype -> (S, Hkv, N, D) fp32, contiguous, in one copy."""
    s, n, hkv, d = x.shape
    return torch.empty((s, hkv, n, d), dtype=torch.float32, device=x.device).copy_(x.permute(0, 2, 1, 3))


def _tile_attention(qf, index, kc, vc, hidden, scale: float, shape) -> torch.Tensor:
    """One tile group of shape (S, W): index (S, W) rows of qf (fp32; None: all of qf's rows, in order),
    kc/vc (S, Hkv, N, D) fp32 contiguous, hidden (S, Hkv, G * W, N) the masked scores. Returns
    (S, Hkv, G * W, D) fp32. Every GEMM operand is laid out alike on every path (contiguous), so the
    GEMMs see the same memory order."""
    s, w = shape
    hq, d = qf.shape[1], qf.shape[2]
    hkv = kc.shape[1]
    g = hq // hkv
    rows = qf if index is None else qf.index_select(0, index.flatten())
    q = rows.view(s, w, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(s, hkv, g * w, d)
    grad = torch.is_grad_enabled() and (q.requires_grad or kc.requires_grad or vc.requires_grad)

    def piece(qp, hp, _):  # padded pieces' extra rows are zero queries that see every key: finite, dropped
        qp = qp.contiguous()
        return _TileSoftmax.apply(qp, kc, vc, hp, scale) if grad else _tile_forward(qp, kc, vc, hp, scale)[0]

    # The GEMMs' row count is G * W per (sequence, kv head): cut or padded as this BLAS needs (row_rules).
    return row_rules.choose(row_rules.Site("attention", d, g, torch.float32)).rule.run(piece, q, hidden)


def _tile_forward(q, kc, vc, hidden, scale: float):
    """softmax(q k^T * scale, masked) v in fp32, one fixed order of operations; (out, p, l)."""
    scores = row_rules.gemm(q, kc.transpose(-1, -2)).mul_(scale).masked_fill_(hidden, float("-inf"))
    p = scores.sub_(scores.amax(-1, keepdim=True)).exp_()
    l = p.sum(-1, keepdim=True)
    return row_rules.gemm(p, vc).div_(l), p, l


class _TileSoftmax(torch.autograd.Function):
    """The exact forward, and the textbook attention backward from the kept probabilities (the training
    backward need not be batch-invariant, only the forward)."""

    @staticmethod
    def forward(ctx, q, kc, vc, hidden, scale):
        out, p, l = _tile_forward(q, kc, vc, hidden, scale)
        ctx.save_for_backward(q, kc, vc, p.div_(l), out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, g):
        q, kc, vc, probs, out = ctx.saved_tensors
        dv = torch.matmul(probs.transpose(-1, -2), g)
        dp = torch.matmul(g, vc.transpose(-1, -2))
        ds = dp.sub_((g * out).sum(-1, keepdim=True)).mul_(probs).mul_(ctx.scale)
        return torch.matmul(ds, kc), torch.matmul(ds.transpose(-1, -2), q), dv, None, None


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

    def gather(i, seqs, n):
        return kp.index_select(0, seqs)[:, :n], vp.index_select(0, seqs)[:, :n]

    return tiled_attention(q, plan, gather, scale)


def paged_attention(q, k_cache, v_cache, meta, scale: float) -> torch.Tensor:
    """:func:`tiled_attention` over the paged cache (decode: one query per sequence; prefill: each
    sequence's new tokens, the last ones of its context). The step's new K/V are already in the cache.
    The plan is the step's (``meta.plan``, made once for every layer by :func:`step_plan`)."""
    plan = meta.plan if isinstance(meta.plan, TilePlan) else step_plan(meta, q.device)
    page, hkv, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    tables = meta.block_tables

    def gather(i, seqs, n):
        nb = -(-n // page)
        flat = plan.cache.get(("blocks", i, page))  # the same for every layer of the step
        if flat is None:
            ids = tables.index_select(0, seqs)[:, :nb].long().clamp_min(0)
            if ids.shape[1] < nb:  # a table narrower than the tile: block 0 stands in (masked)
                ids = F.pad(ids, (0, nb - ids.shape[1]))
            flat = plan.cache[("blocks", i, page)] = ids.flatten()
        shape = (len(seqs), nb * page, hkv, d)
        return k_cache.index_select(0, flat).view(shape)[:, :n], v_cache.index_select(0, flat).view(shape)[:, :n]

    return tiled_attention(q, plan, gather, scale)


def step_plan(meta, device: torch.device) -> TilePlan:
    """The :class:`TilePlan` of a paged step's query rows (decode: one per sequence; prefill: each
    sequence's new tokens, the last ones of its context)."""
    ctx = meta.context_lens.cpu().numpy().astype(np.int64)
    if meta.is_prefill:
        new = np.diff(meta.cu_seqlens_q.cpu().numpy().astype(np.int64))
    else:
        new = np.ones_like(ctx)
    seq = np.repeat(np.arange(len(ctx)), new)
    pos = np.repeat(ctx, new) - np.repeat(new, new) + (np.arange(new.sum()) - np.repeat(np.cumsum(new) - new, new))
    return TilePlan(seq, pos, device)
