"""Saved activations that the backward rebuilds instead of keeping.

Autograd keeps every tensor an op needs for its gradient until the backward reaches that op. Some of them
are one cheap op away from tensors the graph keeps anyway:
- in the SwiGLU MLP, ``silu(gate)`` (kept by the product) and ``silu(gate) * up`` (kept by ``down_proj`` for
  its weight's or its adapter's gradient), from ``gate`` and ``up``, which the graph keeps for their own
  gradients;
- an RMSNorm's output (kept by the projections it feeds) and the fp32 copy of a bf16 input (kept by the
  norm's own ops), from the input, which one of them keeps anyway.

The decoder opens a :func:`scope` around each layer of a training forward (not a checkpointed one, which is
rebuilt whole), and the layers :func:`mark` such tensors. While the scope is open, an op that saves a marked
tensor (or a view of it) keeps the recipe instead; the backward calls the recipe once, however many ops
saved it, and views the result as each op saw it. A recipe computes the same ops on the same tensors, so
the values, and so every gradient, are bit for bit a plain backward's (tests/models/test_rebuild.py).

The scope's table holds the marked tensors until the layer's forward ends, so no other tensor can reuse
their memory and be mistaken for one of them; that costs one layer's marked tensors at a time.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Callable

import torch

_TABLE: ContextVar[dict | None] = ContextVar("fastrft_rebuild", default=None)


class _Recipe:
    """How to rebuild one tensor, and its value once rebuilt (freed with the last op that saved it)."""

    __slots__ = ("fn", "value")

    def __init__(self, fn: Callable[[], torch.Tensor]):
        self.fn, self.value = fn, None

    def get(self) -> torch.Tensor:
        if self.value is None:
            with torch.no_grad():
                self.value = self.fn()
        return self.value


def _key(t: torch.Tensor):
    return t.untyped_storage().data_ptr(), t.dtype, t.device


def mark(t: torch.Tensor, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """Inside a :func:`scope`: ops that save ``t`` from now on keep ``fn`` instead, and the backward rebuilds
    ``t`` as ``fn()``, which must give its values with its storage's layout (the same view of a storage of
    the same size). Returns ``get``: ``t``'s value, rebuilt when called inside another recipe. Outside a
    scope, or for a tensor no op will save (no gradient), nothing is marked and ``get`` returns ``t``."""
    table = _TABLE.get()
    if table is None or not t.requires_grad:
        return lambda: t
    recipe = _Recipe(fn)
    table[_key(t)] = (recipe, t, t.storage_offset(), t.untyped_storage().nbytes())
    return recipe.get


def _pack(table: dict):
    def pack(t: torch.Tensor):
        entry = table.get(_key(t)) if t.layout == torch.strided else None
        if entry is None:
            return t
        recipe, _, base, nbytes = entry
        return recipe, nbytes, t.size(), t.stride(), t.storage_offset() - base
    return pack


def _unpack(packed):
    if isinstance(packed, torch.Tensor):
        return packed
    recipe, nbytes, size, stride, offset = packed
    value = recipe.get()
    if value.untyped_storage().nbytes() != nbytes:
        raise RuntimeError("fastrft.models.rebuild: a recipe rebuilt its tensor with another storage layout")
    return value.as_strided(size, stride, value.storage_offset() + offset)


@contextlib.contextmanager
def scope(on: bool = True):
    """Mark and rebuild inside (when ``on``, gradients are enabled and no scope is open already)."""
    if not on or not torch.is_grad_enabled() or _TABLE.get() is not None:
        yield
        return
    table: dict = {}
    token = _TABLE.set(table)
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack(table), _unpack):
            yield
    finally:
        _TABLE.reset(token)
        table.clear()
