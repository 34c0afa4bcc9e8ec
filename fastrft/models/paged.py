"""Attention metadata of one paged inference step (prefill or decode)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class StepPlan:
    """What a backend derives from a paged step's metadata once, for every layer of the step to read
    (:meth:`fastrft.models.ops.Ops.plan_step`): e.g. how the exact CPU attention batches its query rows
    (:class:`fastrft.models.tiled_attention.TilePlan`)."""


@dataclass
class PagedMeta:
    """What the attention layers need to read and write a paged KV cache for one step.

    slot_mapping (T,) int64: cache slot (block * block_size + offset) of each new token, -1 = padding;
    block_tables (B, max_blocks) int32, -1 padded; context_lens (B,) int32: tokens each sequence attends
    to after this step (cached + new). Prefill also has cu_seqlens_q (B+1,) int32 over the new tokens and
    has_prefix: whether any sequence starts with prefix-cached tokens (then attention reads the pages).
    trusted: see the field.
    """

    is_prefill: bool
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor | None = None
    has_prefix: bool = False
    # The engine's own steps: its caches start zeroed (every slot finite) and it computes slots and tables
    # itself, so the kernels skip the value checks and the zeroing of unused slots.
    trusted: bool = False
    # The model's backend's plan for this step (CausalLM.forward_paged sets it; None: the backend needs none).
    plan: StepPlan | None = None
    # Decode: the split-K count of the plain Triton decode kernel (None: from the step's shapes). The engine
    # sets it from its capacity, so that an eager step and a CUDA-graph step launch alike.
    decode_splits: int | None = None
