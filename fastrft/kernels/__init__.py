"""Triton kernels of fastrft, installed as ``fastrft.kernels``.

Each op has a Triton kernel, a pure-PyTorch reference beside it (the test oracle, the CPU path and the
readable spec), an autograd Function and a functional. Dispatch: CUDA tensors run Triton, CPU tensors
the reference; ``backend="triton"`` with TRITON_INTERPRET=1 runs the kernels on CPU for tests.
"""

from fastrft.algo.loss import PGLossSpec
from fastrft.kernels.linear_logprob import (BACKENDS, HAVE_TRITON, LinearLogprobFunction, linear_logprob,
                                            linear_logprob_reference)
from fastrft.kernels.paged_attention import (paged_attention_decode, paged_attention_decode_reference, store_kv,
                                             store_kv_reference)
from fastrft.kernels.pg_loss import fused_linear_pg_loss, fused_linear_pg_loss_reference

__all__ = ["BACKENDS", "HAVE_TRITON", "LinearLogprobFunction", "PGLossSpec", "fused_linear_pg_loss",
           "fused_linear_pg_loss_reference", "linear_logprob", "linear_logprob_reference", "paged_attention_decode",
           "paged_attention_decode_reference", "store_kv", "store_kv_reference"]
