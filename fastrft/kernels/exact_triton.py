"""Batch-invariant Triton kernels: the exact on-policy mode on CUDA (:mod:`fastrft.models.exact`).

The sampler's log-prob of a token must equal the trainer's bit for bit, so every op of the decoder must
compute a token's values in one order whatever else shares its launch: one row in a decode step, a few
hundred in a prefill, thousands in the packed training forward. cuBLAS and PyTorch's reductions choose
their algorithm (split-K, the threads per row) by the problem size, so the exact mode runs its forward
through these kernels instead. Each one gives an output element one order that depends on compile-time
constants only:

- **no split reductions**: a GEMM output tile owns all of K, a norm row is one program, a query's
  attention one program walking its keys in order;
- **one configuration per (dtype, shape class)**, never by the row count, and the row count is not even
  specialised (``do_not_specialize``), so one compiled kernel serves 1 row and 4,096;
- **rows are independent inside a tile**: a row of ``tl.dot`` reads its own operands only.

Kernels:

- ``_linear_kernel``: y = x W^T (+ b), (BLOCK_M x BLOCK_N) output tiles, K walked in BLOCK_K steps, fp32
  accumulation, one cast at the store. The backward is PyTorch's (only the forward must match).
- ``_rms_norm_kernel``: one row per program on CUDA (blocks of rows in the interpreter), each row's sum of
  squares one ``tl.sum`` over the padded row; the normalised row is cast to the input dtype before the
  weight multiplies it, as :class:`RMSNorm` does.
- ``_attention_kernel``: causal attention for the three callers, one program per (sequence, block of
  (token, query head) rows of one GQA group, kv head). Keys are read in 64-key tiles (:data:`KEY_TILE`)
  from 0 up, with an online softmax in fp32 (exp2 units). Decode (one query), paged prefill (chunked, prefix-cached,
  recomputed after preemption) and the packed training forward differ only in where a key's row is and
  how many tiles the block walks: a query's visible keys sit in the same tiles on every path, and a tile
  it cannot see leaves its state untouched bit for bit (its scores are -inf: the running max does not
  move, the rescale is exactly 1, its weights are exactly 0). The training backward recomputes the
  attention through PyTorch's SDPA, per sequence.
- The LM head and the log-partition: :func:`fastrft.kernels.lm_head_triton.logits_stats`, the trainer's
  fused forward, whose vocabulary splits depend on V only and whose split merge runs per row in split
  order. :func:`sample_head` runs it on the decode rows (logits stored, 1/T read from memory, so it
  sits inside the decode CUDA graph), draws the token from those logits with the Triton sampler, and
  takes logp = z_token - lse: the trainer's z, lse and subtraction, so the trainer's log-prob.

One file per op: :mod:`~fastrft.kernels.exact_linear`, :mod:`~fastrft.kernels.exact_rms_norm`,
:mod:`~fastrft.kernels.exact_attention`, :mod:`~fastrft.kernels.exact_head`; what they share is in
:mod:`~fastrft.kernels.exact_common`. This module is the mode's API in one place.

Tiles come from :data:`TILES` on CUDA (checked for sm_90a by the compile gate, each module's
``compile_cases``) and
from :data:`INTERPRETER_TILES` under ``TRITON_INTERPRET=1`` (tests on CPU), where bf16 tiles are upcast to
fp32 (the interpreter's bf16 ``tl.dot`` is wrong) and every dot is an ordered sum over K (constexpr ROWWISE):
the interpreter's ``tl.dot`` is numpy's matmul, whose OpenBLAS AVX2 kernels round a row by its place in the
tile, which a GPU's MMA does not.
"""

from __future__ import annotations

from fastrft.kernels.exact_attention import packed_attention, paged_attention
from fastrft.kernels.exact_common import (ATTENTION_DIMS, HAVE_TRITON, INTERPRETER_TILES, KEY_TILE, TILES, available,
                                          check_launch, check_model, cuda_tiles, interpreting)
from fastrft.kernels.exact_head import sample_head
from fastrft.kernels.exact_linear import linear, linear_forward
from fastrft.kernels.exact_rms_norm import rms_norm, rms_norm_forward, rms_norm_reference
from fastrft.numerics import linear_backward

__all__ = ["ATTENTION_DIMS", "HAVE_TRITON", "INTERPRETER_TILES", "KEY_TILE", "TILES", "available", "check_launch",
           "check_model", "cuda_tiles", "interpreting", "linear", "linear_backward", "linear_forward",
           "packed_attention", "paged_attention", "rms_norm", "rms_norm_forward", "rms_norm_reference", "sample_head"]
