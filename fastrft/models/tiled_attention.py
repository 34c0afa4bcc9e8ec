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

TILE = 64  # keys per attention tile: a query's context is padded to a multiple of this


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

    q (R, Hq, D): the query rows the plan was made for; gather_kv(seqs, n) -> (k, v), each (S, n, Hkv, D):
    the first n keys and values of each sequence id in ``seqs`` (finite values past a sequence's end; they
    are masked). Returns (R, Hq, D) in q's dtype."""
    hq, d = q.shape[1], q.shape[2]
    q_ext = torch.cat([q, q.new_zeros(1, hq, d)]) if plan.pad else q
    outs = []
    for i, (tile, seqs, index, pos) in enumerate(plan.groups):
        k, v = gather_kv(seqs, (tile + 1) * TILE)
        outs.append(_tile_attention(q_ext, index, k, v, plan.mask(i, k.shape[2], hq // k.shape[2]), scale)
                    .reshape(-1, hq, d))
    flat = outs[0] if len(outs) == 1 else torch.cat(outs)
    return flat if plan.where is None else flat.index_select(0, plan.where)


def _tile_attention(q_ext, index, k, v, hidden, scale: float) -> torch.Tensor:
    """One tile group: index (S, W) rows of q_ext, k/v (S, N, Hkv, D), hidden (S, Hkv, G * W, N) the
    masked scores. Returns (S, W, Hq, D) in q's dtype. Every operand is made contiguous in one layout, so
    the GEMMs see the same memory order on every path."""
    s, w = index.shape
    hq, d = q_ext.shape[1], q_ext.shape[2]
    hkv = k.shape[2]
    g = hq // hkv
    q = (q_ext.index_select(0, index.flatten()).view(s, w, hkv, g, d).permute(0, 2, 3, 1, 4)
         .reshape(s, hkv, g * w, d).float().contiguous())
    kc = k.permute(0, 2, 1, 3).float().contiguous()  # (S, Hkv, N, D)
    vc = v.permute(0, 2, 1, 3).float().contiguous()
    if torch.is_grad_enabled() and (q.requires_grad or kc.requires_grad or vc.requires_grad):
        out = _TileSoftmax.apply(q, kc, vc, hidden, scale)
    else:
        out = _tile_forward(q, kc, vc, hidden, scale)[0]
    return out.view(s, hkv, g, w, d).permute(0, 3, 1, 2, 4).reshape(s, w, hq, d).to(q_ext.dtype)


def _tile_forward(q, kc, vc, hidden, scale: float):
    """softmax(q k^T * scale, masked) v in fp32, one fixed order of operations; (out, p, l)."""
    scores = torch.matmul(q, kc.transpose(-1, -2)).mul_(scale).masked_fill_(hidden, float("-inf"))
    p = scores.sub_(scores.amax(-1, keepdim=True)).exp_()
    l = p.sum(-1, keepdim=True)
    return torch.matmul(p, vc).div_(l), p, l


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
