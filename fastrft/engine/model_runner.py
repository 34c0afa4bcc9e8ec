"""Runs the model over the paged KV cache: builds a step's inputs, calls the model, returns logits.

The cache is one (k, v) pair of (num_blocks, block_size, Hkv, D) tensors per layer, allocated with
``torch.empty`` (pages past a sequence's context are never read, so they need no initialisation, and on
CPU untouched memory costs nothing). On CUDA, decode steps replay CUDA graphs captured once per
batch-size bucket: the step's launch sequence then costs one graph launch instead of hundreds of
kernel launches, which is what bounds batch-1 decode.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

from fastrft.models.paged import PagedMeta


def kv_budget_blocks(model, block_size: int, memory: float | int | None) -> int:
    """Number of KV blocks that fit the budget: ``memory`` bytes (> 1), or a fraction of free GPU
    memory (0 < memory <= 1); None = half the free GPU memory, or 2 GiB of address space on CPU."""
    per_block = model.kv_bytes_per_token() * block_size
    device = model.device
    if memory is None:
        memory = 0.5 if device.type == "cuda" else 2 * 2**30
    if memory <= 1:
        if device.type != "cuda":
            raise ValueError(f"kv_cache_memory={memory} is a fraction of free GPU memory, but the model is on "
                             f"{device}; give a size in bytes instead")
        free, _ = torch.cuda.mem_get_info(device)
        memory = free * memory
    return int(memory // per_block)


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, max_model_len: int, max_num_seqs: int,
                 cuda_graphs: bool = True):
        self.model = model
        c = model.config
        shape = (num_blocks, block_size, c.num_kv_heads, c.head_dim)
        self.kv = [(torch.empty(shape, dtype=model.dtype, device=model.device),
                    torch.empty(shape, dtype=model.dtype, device=model.device)) for _ in range(c.num_layers)]
        self.block_size = block_size
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.graphs = None
        if cuda_graphs and model.device.type == "cuda":
            self.graphs = CudaGraphDecoder(self, max_num_seqs)

    def _tensor(self, x, dtype) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x), dtype=dtype).to(self.model.device, non_blocking=True)

    def copy_blocks(self, copies: np.ndarray) -> None:
        """Copy-on-write: give each (src, dst) pair's destination block the source block's K/V."""
        if len(copies) == 0:
            return
        src = self._tensor(copies[:, 0], torch.long)
        dst = self._tensor(copies[:, 1], torch.long)
        for k, v in self.kv:
            k.index_copy_(0, dst, k.index_select(0, src))
            v.index_copy_(0, dst, v.index_select(0, src))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden @ self.model.lm_head_weight.T).float()

    @torch.no_grad()
    def prefill(self, seqs, starts, lens, slot_mapping, block_tables) -> torch.Tensor:
        """Compute KV for tokens [start, len) of each sequence; return (B, V) logits of each last token."""
        ids, pos = [], []
        for seq, s, n in zip(seqs, starts.tolist(), lens.tolist()):
            ids.extend(seq.tokens()[s:n])
            pos.extend(range(s, n))
        new = (lens - starts).astype(np.int64)
        cu = np.concatenate([[0], np.cumsum(new)])
        meta = PagedMeta(is_prefill=True, slot_mapping=self._tensor(slot_mapping, torch.long),
                         block_tables=self._tensor(block_tables, torch.int32),
                         context_lens=self._tensor(lens, torch.int32), cu_seqlens_q=self._tensor(cu, torch.int32),
                         has_prefix=bool((starts > 0).any()))
        hidden = self.model.forward_paged(self._tensor(ids, torch.long), self._tensor(pos, torch.long), self.kv, meta)
        return self._logits(hidden.index_select(0, self._tensor(cu[1:] - 1, torch.long)))

    @torch.no_grad()
    def decode(self, seqs, slots, block_tables, context_lens) -> torch.Tensor:
        """One new token per sequence (its last sampled one); return (B, V) logits."""
        ids = [seq.last_token() for seq in seqs]
        pos = [seq.num_tokens - 1 for seq in seqs]
        if self.graphs is not None and len(seqs) <= self.graphs.max_batch:
            return self._logits(self.graphs.run(ids, pos, slots, block_tables, context_lens))
        meta = PagedMeta(is_prefill=False, slot_mapping=self._tensor(slots, torch.long),
                         block_tables=self._tensor(block_tables, torch.int32),
                         context_lens=self._tensor(context_lens, torch.int32))
        return self._logits(self.model.forward_paged(self._tensor(ids, torch.long), self._tensor(pos, torch.long),
                                                     self.kv, meta))


class CudaGraphDecoder:
    """Decode under CUDA graphs, one graph per batch-size bucket, sharing one memory pool.

    Static buffers hold the step's inputs; a smaller batch is padded to its bucket with rows that write
    to no slot (-1) and attend to one token of block 0, whose outputs are discarded. The block-table
    width is fixed at max_model_len / block_size so that every launch depends on shapes only.
    """

    def __init__(self, runner: ModelRunner, max_num_seqs: int):
        self.runner = runner
        model = runner.model
        device = model.device
        self.buckets = sorted({b for b in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
                               if b < max_num_seqs} | {max_num_seqs})
        self.max_batch = self.buckets[-1]
        n, width = self.max_batch, runner.max_blocks_per_seq
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(n, width, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(n, model.config.hidden_size, dtype=model.dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        pool = None
        for b in reversed(self.buckets):  # largest first, so smaller graphs reuse its pool
            meta = PagedMeta(is_prefill=False, slot_mapping=self.slots[:b], block_tables=self.block_tables[:b],
                             context_lens=self.context_lens[:b])
            run = lambda b=b, meta=meta: model.forward_paged(self.input_ids[:b], self.positions[:b],  # noqa: E731
                                                             runner.kv, meta)
            self.hidden[:b] = run()  # warm-up: compiles/tunes kernels outside the capture
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.hidden[:b] = run()
            pool = graph.pool()
            self.graphs[b] = graph

    def run(self, ids, pos, slots, block_tables, context_lens) -> torch.Tensor:
        n = len(ids)
        b = self.buckets[bisect.bisect_left(self.buckets, n)]
        dev = self.input_ids.device
        self.input_ids[:n] = torch.as_tensor(ids, device=dev)
        self.positions[:n] = torch.as_tensor(pos, device=dev)
        self.slots[:n] = torch.as_tensor(np.asarray(slots), device=dev)
        self.slots[n:b] = -1
        self.context_lens[:n] = torch.as_tensor(np.asarray(context_lens), device=dev)
        self.context_lens[n:b] = 1
        bt = torch.as_tensor(np.asarray(block_tables), device=dev)
        self.block_tables[:n].fill_(-1)
        self.block_tables[:n, : bt.shape[1]] = bt
        self.block_tables[n:b] = 0
        self.graphs[b].replay()
        return self.hidden[:n]
