"""The engine's sampling head: the LM head and the sampler, from a step's last hidden states to its
(2, B) draws (tokens and their log-probs). A runner holds one, chosen once from the model's backend
(:mod:`fastrft.models.ops`); prefill, eager decode and the CUDA-graph decode step all sample through it.

Precision, one decision for every path: the logits are fp32, computed from fp32 hidden states and an
fp32 LM head (a bf16 head is widened once per weight version, never multiplied in bf16), as the trainer's
LM-head loss computes them (fastrft.kernels.linear_logprob). bf16 logits would put the sampler's
log-probs a few percent off the trainer's. The GEMM is the backend's (``Ops.head_gemm``: the exact CPU
mode's row-ruled one), or the backend's fused LM-head sampler (``Ops.sample_head``: the exact Triton
mode's, the trainer's own LM-head kernel).
"""

from __future__ import annotations

import torch

from fastrft.engine.sampler import SamplingParams, draw
from fastrft.kernels.sampling import sample_tokens
from fastrft.models.ops import PLAIN


class LogitsHead:
    """fp32 logits, then the sampler over them."""

    def __init__(self, model, max_rows: int):
        self.model = model
        self.max_rows = max_rows
        ops = getattr(model, "ops", PLAIN)
        self.gemm = ops.head_gemm or torch.mm
        self.kernels = ops.kernels  # the sampler's: Triton on CUDA ("auto"), or everywhere ("triton")
        self._w32, self._key = None, None  # fp32 copy of a low-precision head, kept at one address
        self._out: torch.Tensor | None = None  # CPU: logits buffer reused across steps (see logits)

    def weight(self) -> torch.Tensor:
        """The LM-head weight in fp32: the model's own when fp32, else a copy refreshed in place whenever the
        weight changes (an optimizer step's in-place refresh bumps its version counter). In place, so a CUDA
        graph that read it reads the refreshed values: call this before each replay."""
        w = self.model.lm_head_weight
        if w.dtype == torch.float32:
            return w
        key = (w.data_ptr(), w._version)
        if self._key != key:
            if self._w32 is None or self._w32.shape != w.shape or self._w32.device != w.device:
                self._w32 = torch.empty(w.shape, dtype=torch.float32, device=w.device)
            self._w32.copy_(w.detach())
            self._key = key
        return self._w32

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, V) fp32 logits of n hidden states. On CPU they go into one buffer kept across steps: a fresh
        B x V result would fault in its pages at every step."""
        w = self.weight()
        n = hidden.shape[0]
        hidden = hidden.float()
        if hidden.device.type != "cpu":
            return self.gemm(hidden, w.T)
        if self._out is None or self._out.shape[0] < n:
            self._out = torch.empty((max(n, self.max_rows), w.shape[0]), dtype=torch.float32)
        return self.gemm(hidden, w.T, out=self._out[:n])

    @torch.no_grad()
    def sample(self, hidden: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor,
               inv_temperature: float | torch.Tensor) -> torch.Tensor:
        """Draw from softmax(logits / T) (inv_temperature: 1/T, 0 greedy; a float, or a one-element device
        tensor as a CUDA graph reads it): the (2, n) draws of :func:`fastrft.kernels.sampling.sample_tokens`."""
        return sample_tokens(self.logits(hidden), seeds, positions, inv_temperature, consume=True,
                             backend=self.kernels)

    @torch.no_grad()
    def draw(self, hidden: torch.Tensor, params: SamplingParams, seeds: torch.Tensor,
             positions: torch.Tensor) -> torch.Tensor:
        """Sample under ``params``; top-k / top-p (evaluation only with the exact backends: training refuses
        them there) filter fp32 logits first."""
        if not params.filters(self.model.config.vocab_size):
            return self.sample(hidden, seeds, positions, params.inv_temperature)
        return draw(self.logits(hidden), params, seeds, positions, backend=self.kernels, consume=True)


class FusedHead(LogitsHead):
    """The backend's fused LM-head sampler (no (n, V) logits leave the kernel)."""

    @torch.no_grad()
    def sample(self, hidden, seeds, positions, inv_temperature):
        return self.model.ops.sample_head(hidden, self.model.lm_head_weight, seeds, positions, inv_temperature)


def make_head(model, max_rows: int) -> LogitsHead:
    """The head for ``model``'s backend."""
    return (LogitsHead if getattr(model, "ops", PLAIN).sample_head is None else FusedHead)(model, max_rows)
