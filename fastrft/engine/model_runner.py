"""Runs the model over the paged KV cache: builds a step's inputs, calls the model; prefill returns the
last tokens' hidden states, decode returns the sampled tokens. Both sample through the runner's one head
(:mod:`fastrft.engine.heads`).

The cache is one (k, v) pair of (num_blocks, block_size, Hkv, D) tensors per layer, zero-filled (see
:func:`zeroed`: on CPU untouched pages cost nothing). On CUDA, decode steps replay CUDA graphs captured once per
batch-size bucket: the step's launch sequence then costs one graph launch instead of hundreds of
kernel launches, which is what bounds batch-1 decode. The graphs include the LM head and the sampler.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

from fastrft.engine.heads import make_head
from fastrft.engine.sampler import SamplingParams
from fastrft.models.ops import PLAIN
from fastrft.models.paged import PagedMeta


GRAPH_DEVICES = ("cuda",)  # device types whose decode steps replay CUDA graphs


def zeroed(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled KV cache tensor: every page slot finite from the start, so decode attention may read
    slots past a context under a mask without zeroing them first. On CPU the zeros come from calloc
    (numpy), whose pages the OS maps lazily: a 2 GiB budget costs memory only where tokens are written,
    where torch.zeros would touch every page."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    size = torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(shape, dtype={1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[size])).view(dtype)


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
        self.max_num_seqs = max_num_seqs
        c = model.config
        shape = (num_blocks, block_size, c.num_kv_heads, c.head_dim)
        self.kv = [(zeroed(shape, model.dtype, model.device), zeroed(shape, model.dtype, model.device))
                   for _ in range(c.num_layers)]
        self.head = make_head(model, max_num_seqs)  # the LM head + sampler of every step (engine.heads)
        self.block_size = block_size
        self.vocab_size = c.vocab_size
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.buckets = decode_buckets(max_num_seqs)
        # Whether decode runs the Triton kernel, whose split-K follows the launch's shapes: then every decode
        # step launches as a CUDA graph's would (decode_splits), eager or not, and so rounds alike.
        self.fixed_launch = model.device.type in GRAPH_DEVICES or getattr(model, "ops", PLAIN).kernels == "triton"
        self.graphs = None
        if cuda_graphs and model.device.type in GRAPH_DEVICES:
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

    def zero_blocks(self, blocks: list[int]) -> None:
        """Zero these KV blocks in every layer (slots past a context must stay finite: see zeroed)."""
        if blocks:
            index = self._tensor(blocks, torch.long)
            for k, v in self.kv:
                k.index_fill_(0, index, 0)
                v.index_fill_(0, index, 0)

    def decode_splits(self, batch: int) -> int:
        """The plain decode kernel's split-K count for a step of ``batch`` rows (a bucket size) over the full
        block-table width: the same for an eager step and for a graph captured at that bucket."""
        from fastrft.kernels import paged_attention_triton as pat

        c = self.model.config
        return pat.default_num_splits(batch, c.num_kv_heads, self.max_blocks_per_seq, self.block_size,
                                      self.model.device)

    def draw(self, hidden: torch.Tensor, params: SamplingParams, seeds: torch.Tensor,
             positions: torch.Tensor) -> torch.Tensor:
        """Sample from hidden states that :meth:`prefill` returned (rows may be reordered or repeated):
        the (2, n) draws of the runner's head (:mod:`fastrft.engine.heads`)."""
        return self.head.draw(hidden, params, seeds, positions)

    @torch.no_grad()
    def prefill(self, seqs, starts, lens, slot_mapping, block_tables) -> torch.Tensor:
        """Compute KV for tokens [start, len) of each sequence; return the (B, H) hidden state of each last
        token, which :meth:`draw` samples from."""
        ids, pos = [], []
        for seq, s, n in zip(seqs, starts.tolist(), lens.tolist()):
            ids.extend(seq.tokens()[s:n])
            pos.extend(range(s, n))
        new = (lens - starts).astype(np.int64)
        cu = np.concatenate([[0], np.cumsum(new)])
        meta = PagedMeta(is_prefill=True, slot_mapping=self._tensor(slot_mapping, torch.long),
                         block_tables=self._tensor(block_tables, torch.int32),
                         context_lens=self._tensor(lens, torch.int32), cu_seqlens_q=self._tensor(cu, torch.int32),
                         has_prefix=bool((starts > 0).any()), trusted=True)
        hidden = self.model.forward_paged(self._tensor(ids, torch.long), self._tensor(pos, torch.long), self.kv, meta)
        return hidden.index_select(0, self._tensor(cu[1:] - 1, torch.long))

    @torch.no_grad()
    def decode(self, seqs, slots, block_tables, context_lens, params: SamplingParams, seeds, positions) -> torch.Tensor:
        """One new token per sequence (its last sampled one), sampled: returns the (2, B) int32 draws on
        the model's device (:func:`fastrft.engine.sampler.draw`). seeds, positions: (B,) host int64 arrays.
        Under CUDA graphs (no top-k / top-p) one replay runs the step, the LM head and the sampler."""
        ids = [seq.last_token() for seq in seqs]
        pos = [seq.num_tokens - 1 for seq in seqs]
        if self.graphs is not None and len(seqs) <= self.graphs.max_batch and not params.filters(self.vocab_size):
            return self.graphs.run(ids, pos, slots, block_tables, context_lens, seeds, positions,
                                   params.inv_temperature)
        splits = None
        if self.fixed_launch:  # launch as the graph of this batch's bucket does: its split-K, the full width
            splits = self.decode_splits(bucket_of(self.buckets, len(seqs)))
            block_tables = np.pad(np.asarray(block_tables, dtype=np.int32),
                                  ((0, 0), (0, self.max_blocks_per_seq - np.shape(block_tables)[1])), constant_values=-1)
        meta = PagedMeta(is_prefill=False, slot_mapping=self._tensor(slots, torch.long),
                         block_tables=self._tensor(block_tables, torch.int32),
                         context_lens=self._tensor(context_lens, torch.int32), trusted=True, decode_splits=splits)
        hidden = self.model.forward_paged(self._tensor(ids, torch.long), self._tensor(pos, torch.long), self.kv, meta)
        return self.head.draw(hidden, params, self._tensor(seeds, torch.long), self._tensor(positions, torch.long))


def decode_buckets(max_num_seqs: int) -> list[int]:
    """The batch sizes decode graphs are captured at (a batch runs in the smallest bucket that holds it)."""
    return sorted({b for b in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
                   if b < max_num_seqs} | {max_num_seqs})


def bucket_of(buckets: list[int], n: int) -> int:
    """The smallest bucket holding n rows (n itself past the largest)."""
    i = bisect.bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else n


def cuda_graph_capture(fn, pool):
    """Capture ``fn()`` into a CUDA graph on ``pool``: returns (graph, fn's outputs). Warms up first,
    outside the capture, so kernels compile and tune before it."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


class CudaGraphDecoder:
    """Decode under CUDA graphs, one graph per batch-size bucket, sharing one memory pool. A graph runs
    the model step, the LM head over the B last hidden states and the sampler, so a decode step is one
    replay and one device-to-host copy of the (2, B) tokens and log-probs.

    Static buffers hold the step's inputs: token ids, positions, slots, context lengths, request seeds,
    response positions (one int64 staging tensor, filled by one host-to-device copy), the block table,
    and the inverse temperature (a device scalar, so any T replays the same graph). A smaller batch is
    padded to its bucket with rows that write to no slot (-1) and attend to one token of block 0, whose
    results are discarded. The block-table width is fixed at max_model_len / block_size so that every
    launch depends on shapes only. ``capture``: how a graph is captured (tests pass an eager stand-in).
    """

    FIELDS = ("ids", "pos", "slots", "context_lens", "seeds", "positions")

    def __init__(self, runner: ModelRunner, max_num_seqs: int, capture=None):
        self.runner = runner
        model = runner.model
        device = model.device
        self.buckets = runner.buckets
        self.max_batch = n = self.buckets[-1]
        width = runner.max_blocks_per_seq
        # Host staging: pinned where CUDA is real, so the one copy per step is asynchronous.
        pin = torch.cuda.is_available()
        self.host = torch.zeros((len(self.FIELDS), n), dtype=torch.long, pin_memory=pin)
        self.inputs = torch.zeros((len(self.FIELDS), n), dtype=torch.long, device=device)
        self.inputs[3].fill_(1)  # padding rows attend to one token
        self.inputs[2].fill_(-1)  # and write nowhere
        self.block_tables = torch.zeros(n, width, dtype=torch.int32, device=device)
        self.inv_temperature = torch.ones(1, dtype=torch.float32, device=device)
        self.graphs: dict[int, object] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        capture = capture or cuda_graph_capture
        pool = None
        for b in reversed(self.buckets):  # largest first, so smaller graphs reuse its pool
            self.graphs[b], self.outputs[b] = capture(lambda b=b: self._step(b), pool)
            pool = self.graphs[b].pool()

    def _step(self, b: int) -> torch.Tensor:
        """The captured work for bucket b: everything reads the static buffers."""
        ids, pos, slots, ctx, seeds, positions = self.inputs[:, :b]
        meta = PagedMeta(is_prefill=False, slot_mapping=slots, block_tables=self.block_tables[:b],
                         context_lens=ctx.to(torch.int32), trusted=True, decode_splits=self.runner.decode_splits(b))
        hidden = self.runner.model.forward_paged(ids, pos, self.runner.kv, meta)
        # The eager path's head, 1/T read from the static scalar.
        return self.runner.head.sample(hidden, seeds, positions, self.inv_temperature)

    def run(self, ids, pos, slots, block_tables, context_lens, seeds, positions, inv_temperature: float):
        n = len(ids)
        b = bucket_of(self.buckets, n)
        host = self.host
        for row, values in enumerate((ids, pos, slots, context_lens, seeds, positions)):
            host[row, :n] = torch.as_tensor(np.asarray(values), dtype=torch.long)
        host[2, n:b] = -1
        host[3, n:b] = 1
        # Rows past n keep earlier steps' ids and positions: valid values, and their results are dropped.
        # (.to() then a device copy into the static buffer: the graph reads fixed addresses.)
        dev = self.inputs.device
        self.inputs.copy_(host.to(dev, non_blocking=True))
        bt = torch.as_tensor(np.asarray(block_tables, dtype=np.int32))
        self.block_tables[:n, : bt.shape[1]].copy_(bt.to(dev, non_blocking=True))
        self.block_tables[n:b] = 0
        self.inv_temperature.fill_(inv_temperature)
        self.runner.head.weight()  # a changed LM head is widened in place, where the graph reads it
        self.graphs[b].replay()
        return self.outputs[b][:, :n]
