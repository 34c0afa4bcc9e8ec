"""A contiguous, left-aligned KV cache for batched generation: the readable reference.

Rows of a batch share one column index: prompts of different lengths are left-padded and the padding
columns are marked invalid, so a decode step writes every row's new K/V at the same column. The paged
engine (C++ block manager) replaces this; this one stays as its test oracle.

Shapes: per layer K and V are (B, Hkv, capacity, D); ``valid`` is (B, capacity) bool.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch, num_kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.length = 0  # columns written so far
        self._pending = 0  # tokens of the step in flight

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def begin(self, new_valid: torch.Tensor) -> torch.Tensor | None:
        """Start a step of t new columns; new_valid (B, t) bool marks real (non-pad) tokens.

        Returns the attention mask (B, 1, t, length + t) bool for this step, or None when every key is
        visible to the single new query (decode without padding), which lets SDPA take its fast path.
        """
        t = new_valid.shape[1]
        if self.length + t > self.capacity:
            self._grow(self.length + t)
        end = self.length + t
        self.valid[:, self.length:end] = new_valid
        self._pending = t
        if t == 1 and bool(self.valid[:, :end].all()):
            return None
        keys = self.valid[:, None, None, :end]
        causal = torch.ones(t, end, dtype=torch.bool, device=self.valid.device).tril(self.length)
        # A padding query would see no valid key and SDPA would return NaN; letting every query see its
        # own column keeps the (discarded) output finite.
        diagonal = torch.zeros(t, end, dtype=torch.bool, device=self.valid.device)
        diagonal[:, self.length:].fill_diagonal_(True)
        return (keys & causal) | diagonal

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this step's k, v (B, Hkv, t, D) for ``layer``; return all keys/values so far."""
        end = self.length + self._pending
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def end(self) -> None:
        self.length += self._pending
        self._pending = 0

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (LongTensor of batch indices, in the new order); drops finished sequences
        or repeats a prompt's row for each of its samples."""
        self.k = [x.index_select(0, rows) for x in self.k]
        self.v = [x.index_select(0, rows) for x in self.v]
        self.valid = self.valid.index_select(0, rows)

    def _grow(self, needed: int) -> None:
        # Doubling keeps the total copy cost linear in the number of generated tokens.
        new_cap = max(needed, 2 * self.capacity)
        extra = new_cap - self.capacity

        def pad(x: torch.Tensor) -> torch.Tensor:
            z = x.new_zeros(x.shape[0], x.shape[1], extra, x.shape[3])
            return torch.cat([x, z], dim=2)

        self.k = [pad(x) for x in self.k]
        self.v = [pad(x) for x in self.v]
        self.valid = torch.cat([self.valid, self.valid.new_zeros(self.batch, extra)], dim=1)
