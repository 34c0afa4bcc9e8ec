"""The Triton side of the sampler (:mod:`fastrft.kernels.sampling`): the fused sampling kernel, the
kernel that merges vocabulary splits, their launcher, the custom op ``fastrft::sample_tokens`` that
CUDA calls go through (so fake tensors and torch.compile see its output shape), and the compile
gate's cases.

``_sample_kernel``: program (row, split) streams its split of the row's logits in tiles of BLOCKS
64-id noise blocks. Per tile it computes the block maxima, an online log-sum-exp, the block noise (one
Philox call per two blocks) and each block's bound, and computes element noise only when some block
of the tile can beat the best score so far. With one split it writes the token and log-prob;
otherwise (m, s, best score, best logit, best id, bad) per split, merged by ``_sample_combine_kernel``
in split order, so ties still go to the smallest id. ``_ln`` is :func:`fastrft.kernels.noise.ln`
operation for operation; launches pass ``enable_fp_fusion=False`` so that no multiply-add is fused.
"""

from __future__ import annotations

import torch

from fastrft.kernels import noise as nz

from fastrft.kernels.triton_support import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

_INT_BIG = 2**31 - 1


if HAVE_TRITON:
    # Triton reads globals only as constexpr scalars: one name per coefficient.
    _P0, _P1, _P2, _P3, _P4, _P5, _P6, _P7, _P8 = (tl.constexpr(c) for c in nz.LN_P)
    _SQRT_HALF = tl.constexpr(nz.SQRT_HALF)
    _LN2_HI = tl.constexpr(nz.LN2_HI)
    _LN2_LO = tl.constexpr(nz.LN2_LO)
    _GRID = tl.constexpr(nz.GRID)
    _BIG = tl.constexpr(_INT_BIG)
    _INV_BLOCK = tl.constexpr(nz.INV_BLOCK)

    @triton.jit
    def _ln(x):  # kernels/noise.py ln(), operation for operation
        bits = x.to(tl.int32, bitcast=True)
        e = (bits >> 23) - 126
        m = ((bits & 0x007FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)
        small = m < _SQRT_HALF
        fe = tl.where(small, e - 1, e).to(tl.float32)
        f = tl.where(small, (m + m) - 1.0, m - 1.0)
        z = f * f
        y = f * _P0 + _P1
        y = y * f + _P2
        y = y * f + _P3
        y = y * f + _P4
        y = y * f + _P5
        y = y * f + _P6
        y = y * f + _P7
        y = y * f + _P8
        y = (y * f) * z
        y = y + fe * _LN2_LO
        y = y - z * 0.5
        r = f + y
        return r + fe * _LN2_HI

    @triton.jit
    def _exponential(word):
        u = ((word >> 9).to(tl.int32).to(tl.float32) + 0.5) * _GRID
        return 0.0 - _ln(u)

    @triton.jit
    def _sample_kernel(x_ptr, seed_ptr, pos_ptr, inv_t_ptr, out_ptr, part_f_ptr, part_i_ptr, noise_ptr, B, V,
                       stride_x, cols_per_split, BLOCKS: tl.constexpr, STRICT: tl.constexpr, DIRECT: tl.constexpr,
                       WRITE_NOISE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        splits = tl.num_programs(1)
        lo = split * cols_per_split
        hi = tl.minimum(lo + cols_per_split, V)
        seed = tl.load(seed_ptr + row)
        pos = tl.load(pos_ptr + row).to(tl.uint32)
        inv_t = tl.load(inv_t_ptr)
        sampling = inv_t != 0.0
        scale = tl.where(sampling, inv_t, 1.0)
        nb = tl.arange(0, BLOCKS)
        k = tl.arange(0, 64)
        zero_b = tl.zeros((BLOCKS,), tl.uint32)
        one_b = tl.full((BLOCKS,), 1, tl.uint32)
        zero_e = tl.zeros((BLOCKS, 64), tl.uint32)
        m = float("-inf")
        s = 0.0
        best = float("-inf")
        best_z = float("-inf")
        best_id = _BIG
        bad = 0
        for start in range(lo, hi, BLOCKS * 64):
            v = start + nb[:, None] * 64 + k[None, :]
            ok = v < hi
            x = tl.load(x_ptr + row * stride_x + v, mask=ok, other=float("-inf")).to(tl.float32)
            x = x * scale
            nonfinite = (x != x) | (x == float("inf"))
            if STRICT:
                nonfinite = nonfinite | ((x == float("-inf")) & ok)
            bad = tl.maximum(bad, tl.max(tl.max(nonfinite.to(tl.int32), axis=1), axis=0))
            bmax = tl.max(x, axis=1)
            m_new = tl.maximum(m, tl.max(bmax, axis=0))
            if m_new > float("-inf"):  # an online log-sum-exp; exp(-inf) = 0 covers filtered ids
                s = s * tl.exp(m - m_new) + tl.sum(tl.sum(tl.exp(x - m_new), axis=1), axis=0)
                m = m_new
            score = x
            search = inv_t == 0.0
            if sampling:
                blk = start // 64 + nb
                w0, w1, w2, w3 = tl.philox(seed, (blk >> 1).to(tl.uint32), zero_b + pos, one_b, zero_b)
                odd = (blk & 1) == 1
                e_blk = _exponential(tl.where(odd, w2, w0))
                j = (tl.where(odd, w3, w1) >> 26).to(tl.int32)
                bound = bmax + (0.0 - _ln(e_blk * _INV_BLOCK))
                threshold = best - (1e-3 + 1e-5 * tl.abs(best))  # skip_margin()
                if WRITE_NOISE:
                    threshold = float("-inf")
                search = tl.max(bound, axis=0) >= threshold
                if search:
                    c = (v >> 2).to(tl.uint32)
                    e0, e1, e2, e3 = tl.philox(seed, c, zero_e + pos, zero_e, zero_e)
                    lane = v & 3
                    word = tl.where(lane == 0, e0, tl.where(lane == 1, e1, tl.where(lane == 2, e2, e3)))
                    e_el = tl.where(k[None, :] == j[:, None], 0.0, _exponential(word))
                    g = 0.0 - _ln(e_blk[:, None] * _INV_BLOCK + e_el)
                    if WRITE_NOISE:
                        tl.store(noise_ptr + row * V + v, g, mask=ok)
                    score = x + g
            if search:
                t_best = tl.max(tl.max(score, axis=1), axis=0)
                t_id = tl.min(tl.min(tl.where(score == t_best, v, _BIG), axis=1), axis=0)
                if t_best > best:
                    best = t_best
                    best_id = t_id
                    best_z = tl.max(tl.max(tl.where(v == t_id, x, float("-inf")), axis=1), axis=0)
        if DIRECT:
            failed = (bad > 0) | (m == float("-inf")) | (best == float("-inf"))
            logp = (best_z - m) - tl.log(s)
            tl.store(out_ptr + row, tl.where(failed, -1, best_id))
            tl.store(out_ptr + B + row, logp.to(tl.int32, bitcast=True))
        else:
            p = (row * splits + split) * 4
            tl.store(part_f_ptr + p, m)
            tl.store(part_f_ptr + p + 1, s)
            tl.store(part_f_ptr + p + 2, best)
            tl.store(part_f_ptr + p + 3, best_z)
            tl.store(part_i_ptr + (row * splits + split) * 2, best_id)
            tl.store(part_i_ptr + (row * splits + split) * 2 + 1, bad)

    @triton.jit
    def _sample_combine_kernel(part_f_ptr, part_i_ptr, out_ptr, B, S, BLOCK_S: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        i = tl.arange(0, BLOCK_S)
        ok = i < S
        p = (row * S + i) * 4
        m = tl.load(part_f_ptr + p, mask=ok, other=float("-inf"))
        s = tl.load(part_f_ptr + p + 1, mask=ok, other=0.0)
        best = tl.load(part_f_ptr + p + 2, mask=ok, other=float("-inf"))
        best_z = tl.load(part_f_ptr + p + 3, mask=ok, other=float("-inf"))
        ids = tl.load(part_i_ptr + (row * S + i) * 2, mask=ok, other=_BIG)
        bad = tl.max(tl.load(part_i_ptr + (row * S + i) * 2 + 1, mask=ok, other=0), axis=0)
        big_m = tl.max(m, axis=0)
        total = tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - big_m)), axis=0)
        top = tl.max(best, axis=0)
        first = tl.min(tl.where(best == top, i, BLOCK_S), axis=0)  # splits are in id order: smallest id
        tok = tl.sum(tl.where(i == first, ids, 0), axis=0)
        z_tok = tl.max(tl.where(i == first, best_z, float("-inf")), axis=0)
        failed = (bad > 0) | (big_m == float("-inf")) | (top == float("-inf"))
        tl.store(out_ptr + row, tl.where(failed, -1, tok))
        tl.store(out_ptr + B + row, ((z_tok - big_m) - tl.log(total)).to(tl.int32, bitcast=True))


# CUDA launch configuration (tile of BLOCKS noise blocks, warps), checked by the sm_90a compile gate;
# the interpreter runs few, large tiles.
CUDA_TILE = dict(BLOCKS=16, num_warps=4, num_stages=2)
INTERPRET_TILE = dict(BLOCKS=64, num_warps=1, num_stages=1)
MAX_SPLITS = 64


def default_splits(batch: int, vocab: int, device: torch.device, tile: int) -> int:
    """Vocabulary splits per row from shapes only: enough programs for two per SM when the batch is
    small, never a split without a whole tile. 1 off-GPU."""
    if device.type != "cuda":
        return 1
    from fastrft.kernels.paged_attention_triton import _sm_count

    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(MAX_SPLITS, -(-2 * sms // max(batch, 1)), -(-vocab // tile)))


def sample_triton(logits, seeds, positions, inv_t: torch.Tensor, strict: bool, num_splits: int | None = None,
                   noise: torch.Tensor | None = None, cuda_tile: bool | None = None) -> torch.Tensor:
    b, v = logits.shape
    out = torch.empty((2, b), dtype=torch.int32, device=logits.device)
    if b == 0:
        return out
    use_cuda = logits.device.type == "cuda" if cuda_tile is None else cuda_tile
    cfg = CUDA_TILE if use_cuda else INTERPRET_TILE
    tile = cfg["BLOCKS"] * nz.BLOCK
    splits = num_splits or default_splits(b, v, logits.device, tile)
    per_split = -(-(-(-v // splits)) // tile) * tile  # whole tiles, so noise blocks never straddle splits
    splits = -(-v // per_split)
    direct = splits == 1
    part_f = torch.empty((b, splits, 4), dtype=torch.float32, device=logits.device) if not direct else out
    part_i = torch.empty((b, splits, 2), dtype=torch.int32, device=logits.device) if not direct else out
    _sample_kernel[(b, splits)](logits, seeds, positions, inv_t, out, part_f, part_i,
                                noise if noise is not None else out, b, v, logits.stride(0), per_split,
                                BLOCKS=cfg["BLOCKS"], STRICT=strict, DIRECT=direct, WRITE_NOISE=noise is not None,
                                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=False)
    if not direct:
        _sample_combine_kernel[(b,)](part_f, part_i, out, b, splits, BLOCK_S=triton.next_power_of_2(splits),
                                     num_warps=1, num_stages=1)
    return out


@torch.library.custom_op("fastrft::sample_tokens", mutates_args=())
def sample_op(logits: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor, inv_temperature: torch.Tensor,
               strict: bool) -> torch.Tensor:
    return sample_triton(logits, seeds, positions, inv_temperature, strict)


@sample_op.register_fake
def _(logits, seeds, positions, inv_temperature, strict):
    return logits.new_empty((2, logits.shape[0]), dtype=torch.int32)


def triton_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int, num_splits: int = 1) -> torch.Tensor:
    """The kernel's own (B, vocab_size) noise (written by its WRITE_NOISE variant), for tests."""
    b = seeds.shape[0]
    x = torch.zeros((b, vocab_size), device=seeds.device)
    out = torch.full((b, vocab_size), float("nan"), device=seeds.device)
    sample_triton(x, seeds, positions, torch.ones(1, device=seeds.device), True, num_splits, noise=out)
    return out



# ----------------------------------------------------------------------------------------- compile gate
def compile_cases(full: bool = False) -> list:
    """The CUDA launches: the sampling kernel for each logits dtype, direct and split, strict or not (and
    the noise-writing variant in the full run), and the combine kernel."""
    from fastrft.kernels.aot import CompileCase, int_args

    cfg = dict(CUDA_TILE)
    blocks, warps, stages = cfg["BLOCKS"], cfg["num_warps"], cfg["num_stages"]
    ints, consts = int_args(B=256, V=151936, stride_x=151936, cols_per_split=151936)
    cases = []
    for dt in ("fp32", "bf16", "fp16"):
        for direct in (True, False):
            for strict in (True, False):
                for noise in (False, True):
                    if noise and (dt != "fp32" or not direct or not strict):
                        continue
                    sig = dict(x_ptr=f"*{dt}", seed_ptr="*i64", pos_ptr="*i64", inv_t_ptr="*fp32", out_ptr="*i32",
                               part_f_ptr="*fp32" if not direct else "*i32",
                               part_i_ptr="*i32", noise_ptr="*fp32" if noise else "*i32", **ints)
                    name = f"sample[{dt},{'direct' if direct else 'split'},strict={strict}" + (",noise]" if noise else "]")
                    cases.append(CompileCase(name, _sample_kernel, sig, dict(consts, BLOCKS=blocks, STRICT=strict,
                                                                             DIRECT=direct, WRITE_NOISE=noise),
                                             warps, stages, full_only=noise or (dt == "fp16"),
                                             options=dict(enable_fp_fusion=False)))
    ints, consts = int_args(B=256, S=12)
    cases.append(CompileCase("sample_combine[s12]", _sample_combine_kernel,
                             dict(part_f_ptr="*fp32", part_i_ptr="*i32", out_ptr="*i32", **ints),
                             dict(consts, BLOCK_S=16), 1, 1))
    return cases

