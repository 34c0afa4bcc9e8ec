"""The ``exact-triton`` backend: the exact mode's batch-invariant Triton kernels
(:mod:`fastrft.kernels.exact_triton`), on CUDA or in Triton's interpreter on CPU (how the tests run the
CUDA path). The engine samples through the trainer's own LM-head kernel
(:func:`fastrft.kernels.exact_triton.sample_head`), so its log-probs are the trainer's bit for bit."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastrft.models import lora
from fastrft.models.ops import Ops
from fastrft.models.paged import StepPlan


def _kernels():
    """fastrft.kernels.exact_triton, imported when the backend first runs (it needs triton)."""
    from fastrft.kernels import exact_triton

    return exact_triton


@dataclass
class RowsPlan(StepPlan):
    """Where each sequence's new tokens lie among a step's query rows: cu (B + 1,) int32 bounds, max_new
    the longest run (decode: arange(B + 1) and 1)."""

    cu: torch.Tensor
    max_new: int


def _sample_head(hidden, weight, seeds, positions, inv_temperature):
    return _kernels().sample_head(hidden, weight, seeds, positions, inv_temperature)


class ExactTritonOps(Ops):
    name = "exact-triton"
    exact = True
    sample_head = staticmethod(_sample_head)

    def check(self, models, dtype: torch.dtype, device: torch.device) -> None:
        from fastrft.models.exact import ExactModeError

        for m in models:
            if hasattr(m, "config"):
                try:
                    _kernels().check_model(m.config.head_dim, dtype, device)
                except (RuntimeError, ValueError) as err:
                    raise ExactModeError(f"exact log-probs: {err}") from None

    def dense(self, x, weight, bias):
        return _kernels().linear(x, weight, bias)

    def adapted(self, layer, x, weight, bias):  # the adapter's GEMMs under this backend's batch-invariant rules
        return lora.add_delta(layer, x, self.dense(x, weight, bias), self.dense)

    def rms_norm(self, x, weight, eps):
        return _kernels().rms_norm(x, weight, eps)

    def packed_attention(self, q, k, v, cu_seqlens, scale):
        return _kernels().packed_attention(q, k, v, cu_seqlens, scale)

    def plan_step(self, meta, rows: int, device: torch.device) -> RowsPlan:
        if meta.is_prefill:
            cu = meta.cu_seqlens_q
            return RowsPlan(cu, int((cu[1:] - cu[:-1]).max()))
        return RowsPlan(torch.arange(rows + 1, dtype=torch.int32, device=device), 1)

    def paged_attention(self, q, k, v, k_cache, v_cache, meta, scale):
        plan = meta.plan if isinstance(meta.plan, RowsPlan) else self.plan_step(meta, q.shape[0], q.device)
        return _kernels().paged_attention(q, k_cache, v_cache, meta.context_lens, meta.block_tables, plan.cu,
                                          plan.max_new, scale)

