"""What the exact mode's Triton kernels share (:mod:`fastrft.kernels.exact_triton`,
:mod:`fastrft.kernels.exact_attention`): the tile tables, the constexpr flags, the launch checks, and the
autograd wrapper whose forward is a batch-invariant kernel and whose backward is PyTorch's.
"""

from __future__ import annotations


import torch

from fastrft.numerics import TILE as KEY_TILE  # keys per attention tile, as in the CPU path

from fastrft.kernels.triton_support import DTYPE_NAMES, HAVE_TRITON, interpreting
from fastrft.kernels.triton_support import check_launch as _check_launch

if HAVE_TRITON:
    import triton

LOG2E = 1.4426950408889634

# ----------------------------------------------------------------------------------------- tiles
# (kernel, dtype, shape class) -> launch configuration. Shape classes: linear by nothing (one tile per
# dtype: M, N and K vary freely and the tile never follows them), attention by BLOCK_D (the head dim
# rounded up to a power of two). 16-bit operands run tensor-core dots (64-row tiles: one Hopper
# warpgroup MMA); fp32 operands run exact IEEE dots, with smaller tiles. Every entry passes the sm_90a
# compile gate (tests/kernels/test_compile_gate.py) with no spills.
TILES: dict[tuple, dict] = {}
for _dt in ("bf16", "fp16"):
    TILES[("linear", _dt)] = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3)
    for _d, _w in ((64, 4), (128, 8), (256, 8)):
        TILES[("attention", _dt, _d)] = dict(BLOCK_M=64, num_warps=_w, num_stages=2)
TILES[("linear", "fp32")] = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2)
for _d, _w in ((64, 4), (128, 8), (256, 8)):
    TILES[("attention", "fp32", _d)] = dict(BLOCK_M=16, num_warps=_w, num_stages=1)
ATTENTION_DIMS = (64, 128, 256)
# The interpreter runs programs one at a time in Python: few, large tiles (the results are not compared
# with CUDA's, only with each other and with a float64 reference); a row-wise dot's (M, K, N) product stays
# within Triton's 2^20 elements.
INTERPRETER_TILES = {"linear": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=1),
                     "attention": dict(BLOCK_M=64, num_warps=4, num_stages=1), "rms_norm": dict(ROWS=64)}


def available(device: torch.device) -> bool:
    """Whether these kernels can run on ``device``: CUDA with triton, or anything in the interpreter."""
    return HAVE_TRITON and (device.type == "cuda" or interpreting())


def _flags(dtype: torch.dtype) -> dict:
    """UPCAST: bf16 tiles through fp32 (the interpreter's bf16 dot is wrong). IEEE: exact fp32 dots.
    ROWWISE: in the interpreter, dots as an ordered sum over K (fastrft.kernels.lm_head_triton.flags)."""
    return dict(UPCAST=interpreting() and dtype != torch.float32, IEEE=dtype == torch.float32,
                ROWWISE=interpreting())


_CUDA_TILES = False  # tests: run CUDA's tiles (and one-row norm programs) through the interpreter


class cuda_tiles:
    """Context manager for tests: the launchers use :data:`TILES` (the CUDA configurations) on CPU
    tensors too, so the interpreter runs the very launches a GPU would get."""

    def __enter__(self):
        global _CUDA_TILES
        self._old, _CUDA_TILES = _CUDA_TILES, True

    def __exit__(self, *exc):
        global _CUDA_TILES
        _CUDA_TILES = self._old


def _cuda_launch(device: torch.device) -> bool:
    return device.type == "cuda" or _CUDA_TILES


def _tile(kernel: str, dtype: torch.dtype, device: torch.device, head_dim: int | None = None) -> dict:
    if not _cuda_launch(device):
        return dict(INTERPRETER_TILES[kernel])
    key = (kernel, DTYPE_NAMES[dtype])
    if kernel == "attention":
        block_d = triton.next_power_of_2(head_dim)
        cls = next((c for c in ATTENTION_DIMS if block_d <= c), None)
        if cls is None:
            raise ValueError(f"exact attention supports head_dim <= {ATTENTION_DIMS[-1]}; got {head_dim} "
                             "(use --exact-logprobs off)")
        key += (cls,)
    return dict(TILES[key])


def check_model(head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse, before anything runs, a model these kernels have no CUDA tile for (ValueError)."""
    check_launch(device)
    if _cuda_launch(device):
        _tile("attention", dtype, device, head_dim)


def check_launch(device: torch.device) -> None:
    _check_launch(device, "the exact mode's Triton kernels")


class _Recomputed(torch.autograd.Function):
    """forward: ``exact(*args)``; backward: the gradient of ``reference(*args)``, recomputed (the training
    backward need not be batch-invariant, only the forward's values)."""

    @staticmethod
    def forward(ctx, exact, reference, n_static, *args):
        ctx.reference, ctx.n_static = reference, n_static
        ctx.save_for_backward(*args[:len(args) - n_static])
        ctx.static = args[len(args) - n_static:]
        return exact(*args)

    @staticmethod
    def backward(ctx, g):
        tensors = [t.detach().requires_grad_(t.is_floating_point() and need)
                   for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[3:])]
        with torch.enable_grad():
            out = ctx.reference(*tensors, *ctx.static)
        wanted = [t for t in tensors if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, g, allow_unused=True) if wanted else ())
        return (None, None, None, *[next(grads) if t.requires_grad else None for t in tensors],
                *[None] * ctx.n_static)


def _differentiable(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
