"""The log-partition of a row of logits, computed in one order whatever the number of rows.

The sampler (:func:`fastrft.kernels.sampling.sample_tokens`, one row per decoding sequence) and the
trainer's fused LM-head loss (:func:`fastrft.kernels.linear_logprob.lm_head_chunks`, chunks of hundreds
of rows) both take logp = (z_t - m) - ln sum_v exp(z_v - m) through these two functions, so that their
log-probs of a token agree bit for bit when their logits do (the exact mode,
:mod:`fastrft.models.exact`). Two of PyTorch's CPU loops depend on the row count:

- a sum over a single row of 32k+ elements is split between threads (a two-pass reduction), where
  two or more rows are each summed whole by one thread: :func:`row_sums` never reduces a single row;
- an elementwise op takes the vectorised path for whole vectors and a scalar path for the last few
  elements, and SLEEF's vector log and libm's scalar log can differ in the last bit:
  :func:`log_rows` pads its input to whole vectors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EXP_FLOOR = -87.0  # exp below this is subnormal in fp32 (100x slower on CPUs) and far below a sum >= 1
_VECTOR = 64  # elements: a multiple of every CPU vector width times PyTorch's 2x unroll


def exp_shifted_(shifted: torch.Tensor) -> torch.Tensor:
    """exp(max(shifted, EXP_FLOOR)) in place: the terms of the partition sum (shifted = z - row max).
    A vocabulary that is not a whole number of vectors goes through a padded copy, so that every element
    takes the vectorised exp whatever the row count (see fastrft.models.layers.aligned)."""
    shifted.clamp_(min=EXP_FLOOR)
    v = shifted.shape[-1]
    if v % _VECTOR == 0 or shifted.device.type != "cpu":
        return shifted.exp_()
    # In place on the whole-vector columns (each row's run is whole vectors), and through a (R, VECTOR)
    # padded copy for the last few: no temporary of the logits' size.
    whole = v - v % _VECTOR
    if whole:
        shifted[:, :whole].exp_()
    tail = shifted[:, whole:]
    tail.copy_(F.pad(tail, (0, _VECTOR - (v - whole))).exp_()[:, : v - whole])
    return shifted


def row_sums(x: torch.Tensor) -> torch.Tensor:
    """(R, V) -> (R,) row sums, each added in the order a multi-row reduction uses."""
    if x.shape[0] == 1 and x.device.type == "cpu":
        return x.expand(2, -1).sum(1)[:1]
    return x.sum(1)


def log_rows(s: torch.Tensor) -> torch.Tensor:
    """ln of an (R,) vector, every element through the vectorised loop."""
    r = s.shape[0]
    if s.device.type != "cpu" or r % _VECTOR == 0:
        return s.log()
    return F.pad(s, (0, _VECTOR - r % _VECTOR), value=1.0).log()[:r]
