"""Continuous-batching scheduler: the pure-Python twin of ``fastrft._engine.Scheduler``.

This file is the executable spec of the C++ class (csrc/scheduler.cpp): same API, same outputs, same
exceptions and messages. It owns each sequence's token list (prompt + generated) and status, and drives a
block manager of the same implementation.

One ``schedule()`` call is one model step:

1. Prefill first. Admit waiting requests from the front, first come first served, while the running
   slots, the batch's token budget and the free blocks allow; stop at the first that does not fit (no
   skipping, so a long request cannot starve). A request of group_size G counts G running slots until the
   engine forks it (right after its prefill step).
2. Otherwise decode every running sequence, oldest first. When a sequence cannot get a slot, preempt the
   newest running sequence (possibly itself): its blocks are freed and it returns to the FRONT of the
   waiting queue with its full token list, to be prefilled again later (recompute, no swapping).
3. Otherwise idle.

Between steps a running sequence holds one more token than the block manager: the token sampled last,
whose KV the next decode step computes. The engine keeps this up by recording one sampled token per
scheduled sequence after each step (``append_token``, or ``append_tokens`` for the whole batch).

Prefix-cache hits inside one prefill batch may point at blocks that the same batch is writing; the model
runner writes each layer's KV before attending, so that is safe.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from fastrft.engine.block_manager import PyBlockManager

_I32, _I64 = np.int32, np.int64


def _empty(dtype, shape=(0,)) -> np.ndarray:
    return np.zeros(shape, dtype=dtype)


@dataclass(eq=False)
class ScheduleOutput:
    """One step. kind is "prefill", "decode" or "idle". Fields a kind does not use are empty.

    seq_ids       int64 [B]      the sequences of the step, in batch order
    starts        int32 [B]      prefill: prefix-cached tokens (KV already present) of each sequence
    lens          int32 [B]      prefill: total tokens of each sequence
    slot_mapping  int64 [sum(lens - starts)]  prefill: KV slots of positions starts..lens-1, concatenated
    slots         int64 [B]      decode: the KV slot of the token each sequence computes now
    copies        int64 [C, 2]   decode: (src, dst) block pairs whose KV the runner copies first
    preempted     int64 [P]      sequences sent back to the waiting queue by this call
    """

    kind: str
    seq_ids: np.ndarray = field(default_factory=lambda: _empty(_I64))
    starts: np.ndarray = field(default_factory=lambda: _empty(_I32))
    lens: np.ndarray = field(default_factory=lambda: _empty(_I32))
    slot_mapping: np.ndarray = field(default_factory=lambda: _empty(_I64))
    slots: np.ndarray = field(default_factory=lambda: _empty(_I64))
    copies: np.ndarray = field(default_factory=lambda: _empty(_I64, (0, 2)))
    preempted: np.ndarray = field(default_factory=lambda: _empty(_I64))


class _Req:
    """A sequence's state. group_size: running slots it stands for (counts down as it is forked);
    group: id shared by a request and its forks, so that forks are inserted next to each other."""

    __slots__ = ("tokens", "running", "group_size", "group")

    def __init__(self, tokens: list[int], group_size: int, group: int):
        self.tokens, self.running, self.group_size, self.group = tokens, False, group_size, group


class PyScheduler:
    """FCFS continuous-batching scheduler with prefill priority and recompute preemption."""

    def __init__(self, block_manager: PyBlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        if not isinstance(block_manager, PyBlockManager):
            raise TypeError(f"PyScheduler needs a PyBlockManager, got {type(block_manager).__name__}")
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self._bm = block_manager
        self._max_seqs, self._max_tokens = int(max_num_seqs), int(max_num_batched_tokens)
        self._reqs: dict[int, _Req] = {}
        self._waiting: deque[int] = deque()
        self._running: list[int] = []
        self._running_slots = 0  # sum of group_size over running sequences
        self._groups = itertools.count()

    @property
    def block_manager(self) -> PyBlockManager:
        return self._bm

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def __repr__(self) -> str:
        return f"PyScheduler(waiting={len(self._waiting)}, running={len(self._running)})"

    def _get(self, seq_id: int) -> _Req:
        req = self._reqs.get(seq_id)
        if req is None:
            raise ValueError(f"unknown sequence {seq_id}")
        return req

    # ------------------------------------------------------------------------------------- requests
    def add(self, seq_id: int, token_ids, group_size: int = 1) -> None:
        """Queue a request (token_ids: list or int array [L]) at the back of the waiting queue; it will
        occupy ``group_size`` running slots once forked."""
        seq_id = int(seq_id)
        tokens = np.asarray(token_ids, dtype=np.int64)
        if tokens.ndim != 1:
            raise ValueError("token_ids must be a 1-D integer sequence")
        n, bm = len(tokens), self._bm
        if n == 0:
            raise ValueError(f"request {seq_id}: token_ids is empty")
        if seq_id in self._reqs:
            raise ValueError(f"request {seq_id} already exists")
        if group_size < 1:
            raise ValueError(f"request {seq_id}: group_size must be >= 1, got {group_size}")
        if n > self._max_tokens:
            raise ValueError(f"request {seq_id} has {n} tokens > max_num_batched_tokens={self._max_tokens}: "
                             "it can never be prefilled")
        need = -(-n // bm.block_size)
        if need > bm.num_blocks:
            raise ValueError(f"request {seq_id} needs {need} KV blocks > num_blocks={bm.num_blocks}: "
                             "it is longer than the whole KV cache")
        if group_size > self._max_seqs:
            raise ValueError(f"request {seq_id}: group_size {group_size} > max_num_seqs={self._max_seqs}")
        self._reqs[seq_id] = _Req(tokens.tolist(), int(group_size), next(self._groups))
        self._waiting.append(seq_id)

    def fork(self, parent_id: int, child_id: int) -> None:
        """Fork a running sequence; the child runs right after the parent's group (it is newer)."""
        parent = self._get(parent_id)
        if not parent.running:
            raise ValueError(f"sequence {parent_id} is not running")
        if child_id in self._reqs:
            raise ValueError(f"sequence {child_id} already exists")
        self._bm.fork(parent_id, child_id)
        child = _Req(list(parent.tokens), 1, parent.group)
        child.running = True
        self._reqs[int(child_id)] = child
        j = self._running.index(parent_id) + 1
        while j < len(self._running) and self._reqs[self._running[j]].group == parent.group:
            j += 1
        self._running.insert(j, int(child_id))
        if parent.group_size > 1:
            parent.group_size -= 1  # the slot passes to the child
        else:
            self._running_slots += 1

    def append_token(self, seq_id: int, token: int) -> None:
        """Record a sampled token (the block manager is not touched until the next decode step)."""
        req = self._get(seq_id)
        if not req.running:
            raise ValueError(f"sequence {seq_id} is not running")
        req.tokens.append(int(token))

    def append_tokens(self, seq_ids, token_ids) -> None:
        """``append_token`` for a batch (seq_ids, token_ids: int arrays [B]); checks all before changing any."""
        ids, toks = np.asarray(seq_ids, dtype=np.int64), np.asarray(token_ids, dtype=np.int64)
        if ids.ndim != 1 or toks.ndim != 1:
            raise ValueError("seq_ids and token_ids must be 1-D integer sequences")
        if len(ids) != len(toks):
            raise ValueError(f"seq_ids and token_ids differ in length: {len(ids)} vs {len(toks)}")
        reqs = [self._get(sid) for sid in ids.tolist()]
        for sid, req in zip(ids.tolist(), reqs):
            if not req.running:
                raise ValueError(f"sequence {sid} is not running")
        for req, tok in zip(reqs, toks.tolist()):
            req.tokens.append(tok)

    def finish(self, seq_id: int) -> None:
        """Drop a sequence, running (its blocks are freed) or waiting."""
        req = self._get(seq_id)
        if req.running:
            self._bm.free(seq_id)
            self._running.remove(seq_id)
            self._running_slots -= req.group_size
        else:
            self._waiting.remove(seq_id)
        del self._reqs[seq_id]

    # ------------------------------------------------------------------------------------- queries
    def tokens(self, seq_id: int) -> list[int]:
        return list(self._get(seq_id).tokens)

    def status(self, seq_id: int) -> str:
        return "running" if self._get(seq_id).running else "waiting"

    def running_ids(self) -> np.ndarray:
        return np.array(self._running, dtype=_I64)

    def waiting_ids(self) -> np.ndarray:
        return np.array(self._waiting, dtype=_I64)

    # ------------------------------------------------------------------------------------- the step
    def schedule(self) -> ScheduleOutput:
        out = self._prefill()
        return self._decode() if out is None else out

    def _prefill(self) -> ScheduleOutput | None:
        ids, starts, lens, budget = [], [], [], 0
        bm = self._bm
        while self._waiting:
            sid = self._waiting[0]
            req = self._reqs[sid]
            n = len(req.tokens)
            if n > self._max_tokens or -(-n // bm.block_size) > bm.num_blocks:
                if ids:
                    break
                # Only a preempted sequence that grew gets here; it would block the queue forever.
                raise RuntimeError(f"sequence {sid} ({n} tokens) can never be prefilled again: "
                                   f"max_num_batched_tokens={self._max_tokens}, KV cache {bm.num_blocks} blocks "
                                   f"x {bm.block_size} tokens; cap prompt + max_new_tokens below both")
            if (self._running_slots + req.group_size > self._max_seqs or budget + n > self._max_tokens
                    or not bm.can_allocate(n)):
                break
            self._waiting.popleft()
            starts.append(bm.allocate(sid, req.tokens))
            req.running = True
            self._running.append(sid)
            self._running_slots += req.group_size
            ids.append(sid)
            lens.append(n)
            budget += n
        if not ids:
            return None
        return ScheduleOutput("prefill", seq_ids=np.array(ids, dtype=_I64), starts=np.array(starts, dtype=_I32),
                              lens=np.array(lens, dtype=_I32), slot_mapping=bm.slot_mapping(ids, starts))

    def _decode(self) -> ScheduleOutput:
        bm, running = self._bm, self._running
        for sid in running:  # checked up front so that a caller's mistake leaves no half-done step
            if len(self._reqs[sid].tokens) != bm.num_tokens(sid) + 1:
                raise RuntimeError(f"sequence {sid} has {len(self._reqs[sid].tokens)} tokens for "
                                   f"{bm.num_tokens(sid)} in the KV cache: call append_token once per "
                                   "sequence after each step")
        ids, slots, copies, preempted = [], [], [], []
        i = 0
        while i < len(running):
            sid = running[i]
            while not bm.can_append(sid):
                victim = running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim == sid:
                    break
            if i >= len(running):  # sid itself was preempted (it was the newest)
                break
            slot, copy = bm.append(sid, self._reqs[sid].tokens[-1])
            ids.append(sid)
            slots.append(slot)
            if copy is not None:
                copies.append(copy)
            i += 1
        kind = "decode" if ids else "idle"
        return ScheduleOutput(kind, seq_ids=np.array(ids, dtype=_I64), slots=np.array(slots, dtype=_I64),
                              copies=np.array(copies, dtype=_I64).reshape(-1, 2),
                              preempted=np.array(preempted, dtype=_I64))

    def _preempt(self, sid: int) -> None:
        """Free the newest running sequence and put it at the front of the waiting queue."""
        req = self._reqs[sid]
        self._bm.free(sid)
        self._running.pop()
        self._running_slots -= req.group_size
        req.running, req.group_size, req.group = False, 1, next(self._groups)
        self._waiting.appendleft(sid)
