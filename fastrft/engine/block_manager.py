"""Paged KV-cache block manager: the pure-Python twin of ``fastrft._engine.BlockManager``.

This file is the executable spec of the C++ class (csrc/block_manager.cpp): same API, same return
values, same exceptions and messages. tests/engine/test_bookkeeping.py drives both with identical random traces.

The KV cache is ``num_blocks`` blocks of ``block_size`` token slots; slot ``b * block_size + j`` holds
token j of block b. A sequence of length L owns ceil(L / block_size) blocks, listed in its block table.

Prefix caching: a full block is named by the chained hash of every token up to its end,
``h_i = chain_hash(h_{i-1}, tokens of block i)`` with ``h_{-1} = 0``; a cache map hash -> block lets a new
sequence reuse the blocks of an earlier one with the same prefix (ref count + 1, stored token ids compared
so that a hash collision can never alias two prefixes). The block holding a prompt's last token is never
reused: its KV must be recomputed to produce the logits that sample the next token.

Free blocks wait in a FIFO pool: allocation takes the front, freeing pushes to the back, so the blocks
freed most recently (the ones most likely to hold a reusable prefix) are recycled last. A cached block
stays matchable while it sits in the pool; it loses its cache entry only when it is handed out afresh.

Forks share every block (ref count + 1); the first append into a shared partial block copies it first
(copy-on-write) and reports the (src, dst) pair so that the caller copies the KV rows.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

_MASK64 = (1 << 64) - 1
_MAX_BLOCKS = 2**31 - 1  # block ids are int32 in block tables


def _mix(x: int) -> int:
    """splitmix64 finaliser on a uint64 held in a Python int."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def chain_hash(prev: int, tokens) -> int:
    """uint64 hash of ``tokens`` (ints; their low 32 bits are hashed) chained onto ``prev`` (uint64;
    taken modulo 2**64). Equal to ``fastrft._engine.chain_hash``.

    >>> chain_hash(0, [1, 2, 3])
    1470200354583225620
    """
    h = _mix(int(prev) & _MASK64)
    for t in tokens:
        h = _mix(h ^ (int(t) & 0xFFFFFFFF))
    return h


def _as_tokens(token_ids) -> list[int]:
    arr = np.asarray(token_ids, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError("token_ids must be a 1-D integer sequence")
    return arr.tolist()


def _as_ids(ids, name: str = "seq_ids") -> list[int]:
    arr = np.asarray(ids, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D integer sequence")
    return arr.tolist()


class _Seq:
    """One sequence: its block table, its length, the chained hashes of its full blocks and the token
    ids of its partial last block (needed to hash that block once it fills up)."""

    __slots__ = ("blocks", "num_tokens", "hashes", "tail")

    def __init__(self, blocks: list[int], num_tokens: int, hashes: list[int], tail: list[int]):
        self.blocks, self.num_tokens, self.hashes, self.tail = blocks, num_tokens, hashes, tail


class PyBlockManager:
    """Paged KV block manager with prefix caching and copy-on-write forks (see the module docstring).

    Errors: ValueError for bad arguments and unknown or duplicate sequence ids; RuntimeError when the
    pool is out of blocks.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {block_size}")
        if not 1 <= num_blocks <= _MAX_BLOCKS:
            raise ValueError(f"num_blocks must be in [1, 2**31 - 1], got {num_blocks}")
        self._num_blocks, self._bs = int(num_blocks), int(block_size)
        self._ref = [0] * self._num_blocks
        self._hash: list[int | None] = [None] * self._num_blocks  # registered chained hash of a full block
        self._block_tokens: list[list[int] | None] = [None] * self._num_blocks
        self._cache: dict[int, int] = {}  # chained hash -> block
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(self._num_blocks))  # FIFO pool
        self._seqs: dict[int, _Seq] = {}

    # ------------------------------------------------------------------------------------- properties
    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._bs

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def __repr__(self) -> str:
        return (f"PyBlockManager(num_blocks={self._num_blocks}, block_size={self._bs}, "
                f"free={len(self._free)}, seqs={len(self._seqs)})")

    # ------------------------------------------------------------------------------------- internals
    def _get(self, seq_id: int) -> _Seq:
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise ValueError(f"unknown sequence {seq_id}")
        return seq

    def _take_free(self) -> int:
        """Pop the front of the pool; a block handed out afresh forgets the prefix it held."""
        b, _ = self._free.popitem(last=False)
        h = self._hash[b]
        if h is not None:
            if self._cache.get(h) == b:
                del self._cache[h]
            self._hash[b] = None
            self._block_tokens[b] = None
        self._ref[b] = 1
        return b

    def _register(self, b: int, h: int, tokens: list[int]) -> None:
        self._hash[b] = h
        self._block_tokens[b] = list(tokens)
        self._cache[h] = b

    # ------------------------------------------------------------------------------------- allocation
    def can_allocate(self, num_tokens: int) -> bool:
        """Conservative: enough free blocks for ``num_tokens`` tokens, ignoring possible cache hits."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return len(self._free) >= -(-num_tokens // self._bs)

    def allocate(self, seq_id: int, token_ids) -> int:
        """Give ``seq_id`` blocks for ``token_ids`` (list or int32/int64 array [L]); return the number of
        leading tokens whose KV is already cached (a multiple of block_size, at most L - 1)."""
        seq_id = int(seq_id)
        tokens = _as_tokens(token_ids)
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} is already allocated")
        n, bs = len(tokens), self._bs
        if n == 0:
            raise ValueError(f"sequence {seq_id}: token_ids is empty")
        need = -(-n // bs)
        if need > len(self._free):
            raise RuntimeError(f"out of KV blocks: sequence {seq_id} needs {need} blocks, {len(self._free)} free")
        blocks: list[int] = []
        hashes: list[int] = []
        h, cached, hitting = 0, 0, True
        for i in range(need):
            chunk = tokens[i * bs:(i + 1) * bs]
            full = len(chunk) == bs
            if full:
                h = chain_hash(h, chunk)
                hashes.append(h)
            if hitting and (i + 1) * bs <= n - 1:  # cacheable: not the block of the last token
                b = self._cache.get(h)
                if b is not None and self._block_tokens[b] == chunk:
                    if self._ref[b] == 0:
                        del self._free[b]
                    self._ref[b] += 1
                    blocks.append(b)
                    cached += bs
                    continue
            hitting = False
            b = self._take_free()
            if full:
                self._register(b, h, chunk)
            blocks.append(b)
        self._seqs[seq_id] = _Seq(blocks, n, hashes, tokens[len(hashes) * bs:])
        return cached

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares every block of the parent (ref count + 1 each) and has its length."""
        parent = self._get(parent_id)
        if child_id in self._seqs:
            raise ValueError(f"sequence {child_id} is already allocated")
        for b in parent.blocks:
            self._ref[b] += 1
        self._seqs[int(child_id)] = _Seq(list(parent.blocks), parent.num_tokens, list(parent.hashes),
                                         list(parent.tail))

    def can_append(self, seq_id: int) -> bool:
        seq = self._get(seq_id)
        if seq.num_tokens % self._bs == 0 or self._ref[seq.blocks[-1]] > 1:
            return len(self._free) >= 1  # a new block, or a copy of the shared last block
        return True

    def append(self, seq_id: int, token_id: int) -> tuple[int, tuple[int, int] | None]:
        """Reserve the slot of position L for ``token_id``; return (slot, copy) where copy is the
        (src, dst) block pair whose KV rows the caller copies before writing (copy-on-write), or None."""
        if not self.can_append(seq_id):
            raise RuntimeError(f"out of KV blocks: sequence {seq_id} needs 1 block to append, 0 free")
        seq, bs = self._seqs[seq_id], self._bs
        pos, copy = seq.num_tokens, None
        if pos % bs == 0:
            b = self._take_free()
            seq.blocks.append(b)
        else:
            b = seq.blocks[-1]
            if self._ref[b] > 1:
                new = self._take_free()
                self._ref[b] -= 1
                seq.blocks[-1] = new
                copy, b = (b, new), new
        seq.num_tokens += 1
        seq.tail.append(int(token_id))
        if seq.num_tokens % bs == 0:  # the last block just filled up: make it matchable
            h = chain_hash(seq.hashes[-1] if seq.hashes else 0, seq.tail)
            seq.hashes.append(h)
            self._register(b, h, seq.tail)
            seq.tail = []
        return b * bs + pos % bs, copy

    def free(self, seq_id: int) -> None:
        """Drop the sequence; blocks whose ref count reaches 0 go to the back of the pool, last block
        first (so a prefix's first block, the most shareable, is recycled last)."""
        seq = self._get(seq_id)
        for b in reversed(seq.blocks):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free[b] = None
        del self._seqs[seq_id]

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (call after each optimizer step: the weights changed). Blocks in
        use keep working; they can no longer be matched. With no sequence alive, the free pool goes back
        to a fresh manager's order, so that what follows a reset (the round after a checkpoint, the same
        round after a resume) is given the same blocks."""
        self._cache.clear()
        self._hash = [None] * self._num_blocks
        self._block_tokens = [None] * self._num_blocks
        if not self._seqs:
            self._free = OrderedDict.fromkeys(range(self._num_blocks))

    # ------------------------------------------------------------------------------------- queries
    def block_table(self, seq_ids) -> np.ndarray:
        """int32 [B, max_blocks] block ids of ``seq_ids`` ([B]), padded with -1."""
        seqs = [self._get(s) for s in _as_ids(seq_ids)]
        width = max((len(s.blocks) for s in seqs), default=0)
        out = np.full((len(seqs), width), -1, dtype=np.int32)
        for i, s in enumerate(seqs):
            out[i, :len(s.blocks)] = s.blocks
        return out

    def slot_mapping(self, seq_ids, starts) -> np.ndarray:
        """int64 [sum(L_i - starts_i)]: the KV slots of positions starts[i] .. L_i - 1 of each sequence,
        concatenated in order (seq_ids, starts: [B])."""
        ids, starts = _as_ids(seq_ids), _as_ids(starts, "starts")
        if len(ids) != len(starts):
            raise ValueError(f"seq_ids and starts differ in length: {len(ids)} vs {len(starts)}")
        bs = self._bs
        parts = []
        for sid, start in zip(ids, starts):
            seq = self._get(sid)
            if not 0 <= start <= seq.num_tokens:
                raise ValueError(f"start {start} out of range [0, {seq.num_tokens}] for sequence {sid}")
            pos = np.arange(start, seq.num_tokens, dtype=np.int64)
            parts.append(np.asarray(seq.blocks, dtype=np.int64)[pos // bs] * bs + pos % bs)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def context_lens(self, seq_ids) -> np.ndarray:
        """int32 [B]: the length L of each sequence."""
        return np.array([self._get(s).num_tokens for s in _as_ids(seq_ids)], dtype=np.int32)

    def num_tokens(self, seq_id: int) -> int:
        return self._get(seq_id).num_tokens

    def blocks_of(self, seq_id: int) -> list[int]:
        return list(self._get(seq_id).blocks)

    def ref_count(self, block: int) -> int:
        if not 0 <= block < self._num_blocks:
            raise ValueError(f"block {block} out of range [0, {self._num_blocks})")
        return self._ref[block]

    def has(self, seq_id: int) -> bool:
        return seq_id in self._seqs
