"""What every Triton kernel module of fastrft shares: whether triton is importable, whether the kernels
run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, how the tests run them), the launch check, and
the dtype names the tile tables use. A leaf: it imports nothing from fastrft."""

from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # CPU-only installs run the PyTorch paths
    HAVE_TRITON = False

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (read when the kernels were imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_launch(device: torch.device, who: str = "the Triton backend", fallback: str = "") -> None:
    """Raise a RuntimeError saying what is missing unless ``who``'s kernels can launch on ``device``: CUDA
    with triton installed, or any device in the interpreter. ``fallback``: what to use instead."""
    if not HAVE_TRITON:
        raise RuntimeError(f"{who} needs the triton package (pip install triton){fallback}")
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(f"{who} needs CUDA tensors, or TRITON_INTERPRET=1 set before fastrft.kernels is "
                           "imported (CPU interpreter, for tests)")
