"""The paged-attention kernels' CUDA tile table (:mod:`fastrft.kernels.paged_attention_triton` launches with
it; its ``compile_cases`` compiles every entry for sm_90a in the compile gate).
"""

from __future__ import annotations

import torch

from fastrft.kernels.triton_support import DTYPE_NAMES

MAX_SPLITS = 256


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


# ----------------------------------------------------------------------------------------- CUDA tiles
# The tile configurations of the CUDA launches, in ONE table: (kernel, dtype, shape class) -> config.
# The launchers read it; compile_cases() enumerates every entry, and tests/kernels/test_compile_gate.py compiles
# them for Hopper (sm_90a) and fails on any register spill or shared memory past 227 KiB. To tune a
# tile, edit its entry here and rerun the gate (python -m fastrft.kernels.aot --full).
#
# Shape classes: head_dim class = the smallest of HEAD_DIM_CLASSES >= BLOCK_D (next_power_of_2(head_dim));
# an entry's tile is checked at the class's largest shape, so smaller shapes of the class use fewer
# registers. decode: (head_dim class, BLOCK_G = next_power_of_2(Hq // Hkv)); combine: (head_dim class,
# split class >= BLOCK_S = next_power_of_2(num_splits)), BLOCK_D caps the columns one program merges (the
# grid covers the rest; every column is the same reduction over the splits); store_kv: (head_dim class,),
# BLOCK_H caps the kv heads one program copies (the grid covers the rest).
#
# decode's register footprint is the (BLOCK_G, BLOCK_N, BLOCK_D) fp32 score/value product plus the
# (BLOCK_N, BLOCK_D) int64 addresses of the K/V tile. Measured with ptxas (triton 3.7.1, sm_90a): at most
# 64 product elements and 32 addresses per thread stays spill-free with headroom (<= ~200 registers);
# 128 product elements per thread (the old BLOCK_G=8, BLOCK_N=16, BLOCK_D=128 at 4 warps) spilled at
# 255 registers. Past 8 warps a thread may hold only 65536 / threads registers (128 at 16 warps), hence
# 8 warps at most here.
HEAD_DIM_CLASSES = (64, 128, 256)
GROUP_CLASSES = (1, 2, 4, 8, 16)
SPLIT_CLASSES = (16, 64, 256)  # MAX_SPLITS = 256 bounds BLOCK_S

_DECODE_TILES = {  # (head_dim class, BLOCK_G) -> (BLOCK_N, num_warps); num_stages 3 (Triton's default)
    (64, 1): (32, 4), (64, 2): (32, 4), (64, 4): (16, 4), (64, 8): (16, 4), (64, 16): (16, 8),
    (128, 1): (32, 4), (128, 2): (32, 4), (128, 4): (16, 4), (128, 8): (16, 8), (128, 16): (8, 8),
    (256, 1): (16, 4), (256, 2): (8, 4), (256, 4): (8, 4), (256, 8): (8, 8), (256, 16): (4, 8),
}
_COMBINE_TILES = {  # (head_dim class, split class) -> (BLOCK_D columns per program, num_warps)
    (64, 16): (64, 4), (64, 64): (64, 4), (64, 256): (64, 8),
    (128, 16): (128, 4), (128, 64): (128, 4), (128, 256): (64, 8),
    (256, 16): (256, 4), (256, 64): (128, 4), (256, 256): (64, 8),
}
_STORE_TILES = {64: (32, 4), 128: (16, 4), 256: (8, 4)}  # head_dim class -> (BLOCK_H, num_warps)

# The same tiles for every dtype today; an entry may be overridden per dtype when tuned on a GPU.
TILES: dict[tuple, dict] = {}
for _dt in DTYPE_NAMES.values():
    for (_d, _g), (_n, _w) in _DECODE_TILES.items():
        TILES[("decode", _dt, _d, _g)] = dict(BLOCK_N=_n, num_warps=_w, num_stages=3)
    for (_d, _s), (_c, _w) in _COMBINE_TILES.items():
        TILES[("combine", _dt, _d, _s)] = dict(BLOCK_D=_c, num_warps=_w, num_stages=3)
    for _d, (_h, _w) in _STORE_TILES.items():
        TILES[("store_kv", _dt, _d)] = dict(BLOCK_H=_h, num_warps=_w, num_stages=3)


def _class_of(n: int, classes: tuple) -> int | None:
    return next((c for c in classes if n <= c), None)


def cuda_tile(kernel: str, dtype: torch.dtype, head_dim: int, other: int | None = None) -> dict | None:
    """The table's configuration for a CUDA launch, or None when the shape lies outside every class
    (head_dim > 256, a GQA group > 16). ``other``: the group size for "decode", num_splits for
    "combine". Shapes only: safe inside CUDA-graph capture."""
    block_d = _next_pow2(head_dim)
    key = (kernel, DTYPE_NAMES.get(dtype), _class_of(block_d, HEAD_DIM_CLASSES))
    if kernel == "decode":
        key += (_class_of(_next_pow2(other), GROUP_CLASSES),)
    elif kernel == "combine":
        key += (_class_of(_next_pow2(other), SPLIT_CLASSES),)
    return TILES.get(key)


def _cuda_tile_or_raise(kernel: str, dtype: torch.dtype, head_dim: int, other: int | None = None) -> dict:
    tile = cuda_tile(kernel, dtype, head_dim, other)
    if tile is None:
        what = f"head_dim={head_dim}" + (f", GQA group={other}" if kernel == "decode" else "")
        raise ValueError(f"the Triton {kernel} kernel has no CUDA tile configuration for {what} (head_dim <= "
                         f"{HEAD_DIM_CLASSES[-1]}, group <= {GROUP_CLASSES[-1]}); use backend='auto' or "
                         f"'reference', or add an entry to fastrft.kernels.paged_attention_tiles.TILES and run the "
                         f"compile gate (tests/kernels/test_compile_gate.py)")
    return tile
