"""The rollout engine: continuous batching over a paged KV cache.

``step()`` is schedule -> run -> postprocess:
- the scheduler (C++, :mod:`fastrft._engine`; Python twin as fallback) picks a prefill batch (new or
  preempted sequences, under a token budget) or a decode batch (every running sequence), preempting
  the newest sequences when KV blocks run out;
- the model runner computes the batch's new K/V into their pages and the last-token logits;
- a prefill forks each prompt into its n samples (they share its KV blocks, copy-on-write) and samples
  their first tokens from its last logits; a decode step samples inside the runner (on CUDA, inside the
  step's graph); each request draws from its own counter-based noise;
- postprocess brings the step's tokens and log-probs to the host in one copy, appends them and retires
  finished sequences.

The engine holds the caller's model object (no weight copy). Because the weights change at every
optimizer step, the trainer calls :meth:`Engine.reset_prefix_cache` after each step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fastrft.engine.bookkeeping import make_block_manager, make_scheduler
from fastrft.engine.model_runner import ModelRunner, kv_budget_blocks
from fastrft.engine.sampler import SamplingParams, check_draws, request_seed
from fastrft.engine.sequence import Completion, Sequence, check_requests
from fastrft.errors import ConfigError
from fastrft.kernels.sampling import unpack


@dataclass(frozen=True)
class EngineConfig:
    """block_size: tokens per KV block (a power of two). kv_cache_memory: bytes (> 1) or a fraction of
    free GPU memory (0 < x <= 1); None = half the free GPU memory, or 2 GiB of address space on CPU.
    max_num_seqs: most sequences decoded together. max_num_batched_tokens: prefill token budget per step
    (raised, for a call, to its longest request: prompt + max_new_tokens, so that each request fits alone).
    max_model_len: longest sequence (prompt + response); None = the model's max_position_embeddings.
    bookkeeping: "auto" | "cpp" | "python". cuda_graphs: capture decode steps on CUDA."""

    block_size: int = 16
    kv_cache_memory: float | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int = 16384
    max_model_len: int | None = None
    bookkeeping: str = "auto"
    cuda_graphs: bool = True

    def __post_init__(self):
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ConfigError(f"kv_cache_memory must be > 0 (bytes, or a fraction <= 1), got {self.kv_cache_memory}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.bookkeeping not in ("auto", "cpp", "python"):
            raise ConfigError(f"bookkeeping must be auto, cpp or python, got {self.bookkeeping!r}")


class Engine:
    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        c = self.config
        self.max_model_len = c.max_model_len or model.config.max_position_embeddings
        self.max_num_seqs = c.max_num_seqs or (256 if model.device.type == "cuda" else 64)
        num_blocks = kv_budget_blocks(model, c.block_size, c.kv_cache_memory)
        if num_blocks < 1:
            raise ConfigError(f"kv_cache_memory is too small for a single KV block of {c.block_size} tokens "
                              f"({model.kv_bytes_per_token() * c.block_size} bytes)")
        self.block_manager = make_block_manager(num_blocks, c.block_size, impl=c.bookkeeping)
        self._prefill_tokens = max(c.max_num_batched_tokens, self.max_model_len)
        self.scheduler = make_scheduler(self.block_manager, self.max_num_seqs, self._prefill_tokens,
                                        impl=c.bookkeeping)
        self.runner = ModelRunner(model, num_blocks, c.block_size, self.max_model_len, self.max_num_seqs,
                                  cuda_graphs=c.cuda_graphs)
        self.seqs: dict[int, Sequence] = {}
        self._forks: dict[int, list[Sequence]] = {}
        self._next_id = 0
        self._params: SamplingParams | None = None
        self._stop: set[int] = set()

    @property
    def num_blocks(self) -> int:
        return self.block_manager.num_blocks

    def reset_prefix_cache(self) -> None:
        """Forget cached prompt KV (call after every optimizer step: the weights changed)."""
        self.block_manager.reset_prefix_cache()

    # ----------------------------------------------------------------------------------- public API
    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], *, n: int | list[int] = 1, max_new_tokens: int | list[int] = 256,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                 eos_token_ids=None, progress=None, request_ids: list[tuple[int, int]] | None = None
                 ) -> list[list[Completion]]:
        """Same contract as :func:`fastrft.generate`: P lists of n Completions, seeded per request.
        max_new_tokens may also be a list with one budget per prompt, and n a list with one sample count
        per prompt. ``request_ids`` gives each prompt its (prompt index, first sample index) in a larger
        request set (default (p, 0)): prompt p's samples then draw from the streams of requests
        (index, first), (index, first + 1), ..., so a share of a round generated here is token for token
        what the whole round generates for those requests (fastrft.distributed splits rounds this way).
        ``progress``, if given, is called after every engine step with the number of sequences that
        finished in it."""
        groups = self.submit(prompt_ids, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             top_k=top_k, seed=seed, eos_token_ids=eos_token_ids, request_ids=request_ids)
        try:
            done = 0
            while self._unfinished(groups):
                self.step()
                if progress is not None:
                    now = sum(s.finish_reason is not None for g in groups for s in g)
                    progress(now - done)
                    done = now
        except BaseException:
            self.abort()  # an interrupted call must not leave its sequences holding KV blocks
            raise
        return self.collect(groups)

    def abort(self) -> None:
        """Drop every unfinished sequence of the current call and free its KV blocks."""
        for sid, seq in self.seqs.items():
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
                try:
                    self.scheduler.finish(sid)
                except (ValueError, RuntimeError, KeyError):
                    pass  # a fork that was never created, or already retired
        self._forks.clear()

    def submit(self, prompt_ids, *, n: int | list[int], max_new_tokens: int | list[int], temperature: float,
               top_p: float, top_k: int, seed: int, eos_token_ids,
               request_ids: list[tuple[int, int]] | None = None) -> list[list[Sequence]]:
        """Queue the requests of one call (prompt p's samples form group p); see :meth:`generate`."""
        if any(s.finish_reason is None for s in self.seqs.values()):
            raise RuntimeError("the engine is still running a previous call; collect it first")
        budgets = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(prompt_ids)
        if len(budgets) != len(prompt_ids):
            raise ConfigError(f"max_new_tokens has {len(budgets)} entries for {len(prompt_ids)} prompts")
        counts = list(n) if isinstance(n, (list, tuple)) else [n] * len(prompt_ids)
        if len(counts) != len(prompt_ids):
            raise ConfigError(f"n has {len(counts)} entries for {len(prompt_ids)} prompts")
        ids = list(request_ids) if request_ids is not None else [(p, 0) for p in range(len(prompt_ids))]
        if len(ids) != len(prompt_ids):
            raise ConfigError(f"request_ids has {len(ids)} entries for {len(prompt_ids)} prompts")
        self._params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k,
                                      max_new_tokens=max(budgets) if budgets else 1)
        for count in set(counts):
            check_requests(self.model, prompt_ids, count)
        for p, (prompt, budget, count) in enumerate(zip(prompt_ids, budgets, counts)):
            if budget < 1:
                raise ConfigError(f"max_new_tokens must be >= 1, got {budget} for prompt {p}")
            self.check_fits([prompt], budget, count)
        self._stop = set(self.model.eos_token_ids if eos_token_ids is None else eos_token_ids)
        # A prefill step packs at most max_num_batched_tokens tokens, or one request of this call if that
        # is longer (a preempted sequence comes back with its generated tokens: prompt + budget at most).
        limit = max(self.config.max_num_batched_tokens, max((len(p) + b for p, b in zip(prompt_ids, budgets)), default=0))
        if limit != self._prefill_tokens:  # no request is queued between calls: a new scheduler is free
            self._prefill_tokens = limit
            self.scheduler = make_scheduler(self.block_manager, self.max_num_seqs, limit,
                                            impl=self.config.bookkeeping)
        self.seqs.clear()
        groups: list[list[Sequence]] = []
        for p, prompt in enumerate(prompt_ids):
            prompt = [int(t) for t in prompt]
            index, first = ids[p]
            group = [Sequence(-1, index, first + j, prompt, request_seed(seed, index, first + j),
                              max_new_tokens=budgets[p]) for j in range(counts[p])]
            self._register(group[0])
            self._forks[group[0].seq_id] = group[1:]
            self.scheduler.add(group[0].seq_id, prompt, group_size=counts[p])
            groups.append(group)
        return groups

    def collect(self, groups: list[list[Sequence]]) -> list[list[Completion]]:
        out = [[s.completion() for s in group] for group in groups]
        if self.tokenizer is not None:
            for group in out:
                for c in group:
                    c.text = self.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        return out

    def step(self) -> None:
        batch = self.scheduler.schedule()
        rows, draws, forks = self._run(batch)
        self._postprocess(rows, draws.cpu(), forks)  # the step's one device-to-host copy

    # ----------------------------------------------------------------------------------- internals
    def check_fits(self, prompt_ids, max_new_tokens: int, n: int = 1) -> None:
        """Refuse (ConfigError) requests this engine cannot hold: a prompt plus its response beyond the
        model's context or the KV cache, or more samples than it decodes together."""
        longest = max(len(p) for p in prompt_ids) + max_new_tokens
        if longest > self.max_model_len:
            raise ConfigError(f"a prompt of {max(len(p) for p in prompt_ids)} tokens plus max_new_tokens="
                              f"{max_new_tokens} exceeds the model's context of {self.max_model_len} tokens")
        need = -(-longest // self.config.block_size)
        if need > self.num_blocks:
            raise ConfigError(f"one sequence of up to {longest} tokens needs {need} KV blocks, but the cache "
                              f"holds {self.num_blocks} (kv_cache_memory); raise kv_cache_memory or shorten it")
        if n > self.max_num_seqs:
            raise ConfigError(f"n={n} samples exceed max_num_seqs={self.max_num_seqs}, the most sequences "
                              "decoded together; raise it")

    def _register(self, seq: Sequence) -> None:
        seq.seq_id = self._next_id
        self._next_id += 1
        self.seqs[seq.seq_id] = seq

    def _unfinished(self, groups) -> bool:
        return any(s.finish_reason is None for g in groups for s in g)

    def _run(self, batch) -> tuple[list[Sequence], torch.Tensor, list[tuple[Sequence, Sequence]]]:
        """Run the model on the batch and sample: (the sequences sampled for, in order; their (2, n) draws;
        the (parent, child) forks a prefill made, for :meth:`_postprocess` to register)."""
        seqs = [self.seqs[int(i)] for i in batch.seq_ids]
        if batch.kind == "prefill":
            hidden = self.runner.prefill(seqs, batch.starts, batch.lens, batch.slot_mapping,
                                         self.block_manager.block_table(batch.seq_ids))
            # A prompt's other samples share its prefill: each draws from its last hidden state. They are
            # registered and forked after the step (_postprocess), so this phase only computes.
            rows, index, forks = [], [], []
            for i, seq in enumerate(seqs):
                for child in self._forks.get(seq.seq_id, []):
                    forks.append((seq, child))
                    rows.append(child)
                    index.append(i)
                rows.append(seq)
                index.append(i)
            if index != list(range(len(seqs))):
                hidden = hidden.index_select(0, torch.tensor(index, device=hidden.device))
            seeds, positions = self._stream(rows)
            dev = hidden.device
            return rows, self.runner.draw(hidden, self._params, torch.as_tensor(seeds).to(dev),
                                          torch.as_tensor(positions).to(dev)), forks
        if batch.kind == "decode":
            self.runner.copy_blocks(batch.copies)
            seeds, positions = self._stream(seqs)
            return seqs, self.runner.decode(seqs, batch.slots, self.block_manager.block_table(batch.seq_ids),
                                            self.block_manager.context_lens(batch.seq_ids), self._params, seeds,
                                            positions), []
        raise RuntimeError("the engine stalled with unfinished sequences and nothing schedulable; this is a bug")

    @staticmethod
    def _stream(seqs: list[Sequence]) -> tuple[np.ndarray, np.ndarray]:
        """Each sequence's noise coordinates: its request seed and the position of the token it draws."""
        return (np.fromiter((s.seed for s in seqs), dtype=np.int64, count=len(seqs)),
                np.fromiter((len(s.output) for s in seqs), dtype=np.int64, count=len(seqs)))

    def _postprocess(self, rows: list[Sequence], draws: torch.Tensor, forks=()) -> None:
        for parent, child in forks:  # in the order the sequential registration had: ids are unchanged
            self._forks.pop(parent.seq_id, None)
            self._register(child)
            self.scheduler.fork(parent.seq_id, child.seq_id)
        tokens, logps = unpack(draws)
        broken = [s.seq_id for s, t in zip(rows, tokens) if t < 0]
        if broken:  # their K/V may hold NaN: zero it before the abort frees it, so no later call reads it
            self.runner.zero_blocks(sorted({b for sid in broken for b in self.block_manager.blocks_of(sid)}))
            self.block_manager.reset_prefix_cache()
        check_draws(tokens, lambda i: f"request (prompt {rows[i].prompt_index}, sample {rows[i].sample_index})",
                    [len(s.output) for s in rows])
        live_ids, live_tokens = [], []
        for seq, tok, lp in zip(rows, tokens, logps):
            seq.output.append(tok)
            seq.logprobs.append(lp)
            if tok in self._stop:
                seq.finish_reason = "stop"
            elif len(seq.output) >= seq.max_new_tokens:
                seq.finish_reason = "length"
            if seq.finish_reason is not None:
                self.scheduler.finish(seq.seq_id)
            else:
                live_ids.append(seq.seq_id)
                live_tokens.append(tok)
        # One call for the whole batch: per-sequence calls into C++ cost as much as the schedule itself.
        self.scheduler.append_tokens(live_ids, live_tokens)
