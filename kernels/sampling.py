"""Token sampling from counter-based noise in one read of the logits: temperature, the Gumbel-max race
and the chosen token's log-prob.

Per row (one request at one response position):

    z = logits * (1 / T)      token = argmax_v z_v + g_v      logp = (z_token - m) - ln(sum_v exp(z_v - m))

with m = max z and g the noise of :mod:`fastrft.kernels.noise` (a pure function of the request's seed,
the position and v). Greedy decoding (inverse temperature 0) takes argmax z and the log-prob at T = 1.
Ties go to the smallest id. A row holding NaN or +inf, or -inf when ``strict``, or no finite logit at
all, comes back as token -1: the caller names the request and fails, rather than sample token 0.

Three implementations, one result (the same token, bit for bit: the scores z + g are computed by the
same fp32 operations everywhere):

- :func:`sample_reference`: the readable spec. It builds the whole (B, V) noise.
- :func:`sample_torch`: the CPU path. Blocks of 64 ids are skipped unless their largest logit plus their
  largest noise M (one Philox call per block) can beat the best score found so far, so the element
  noise is computed for a few blocks per row instead of all V ids.
- ``_sample_kernel`` (Triton, CUDA): one program per (row, vocabulary split) streams the logits in tiles
  of 64-id blocks, keeps an online log-sum-exp, and computes element noise only for tiles with a block
  that can win. Every launch depends on shapes only (it runs inside the decode CUDA graph); the inverse
  temperature is read from a device tensor. ``_sample_combine_kernel`` merges the splits.

Output: one (2, B) int32 tensor, row 0 the tokens and row 1 the log-probs' fp32 bits, so that one
device-to-host copy brings a decode step's results back (:func:`unpack`).
"""

from __future__ import annotations

import os

import torch

from fastrft.kernels import noise as nz

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs run the PyTorch path
    HAVE_TRITON = False

__all__ = ["sample_reference", "sample_tokens", "sample_torch", "unpack"]

_INT_BIG = 2**31 - 1
ACCELERATORS = ("cuda",)  # device types the Triton kernel (as the custom op fastrft::sample_tokens) serves
EXP_FLOOR = -87.0
STAGE1_BLOCKS = 8  # blocks the CPU path searches first to set a best score


def skip_margin(best: torch.Tensor | float):
    """How far below the best score a block's bound (largest logit + M) may lie and still be searched.
    It covers the rounding of the bound's sum and ln's non-monotonicity (measured 0 on the uniform
    grid, allowed 1e-3) with a wide margin; any margin >= those keeps the result exact."""
    return 1e-3 + 1e-5 * abs(best)


# ----------------------------------------------------------------------------------------- PyTorch
def _scaled(logits: torch.Tensor, inv_temperature: float, consume: bool = False) -> torch.Tensor:
    if consume and logits.dtype == torch.float32:
        return logits.mul_(inv_temperature) if inv_temperature not in (0.0, 1.0) else logits
    z = logits.float()
    return z * inv_temperature if inv_temperature not in (0.0, 1.0) else z


def _finish(z, m, token, bad, consume: bool = False) -> torch.Tensor:
    """Pack tokens and log-probs; rows marked bad or without a finite logit get token -1. With consume,
    the sum of exp(z - m) is taken in z's own memory: a (B, V) temporary faults in fresh pages at every
    call (about 15 ms for 12 MiB, measured). exp below EXP_FLOOR is subnormal (100x slower on CPUs) and
    far below the rounding of a sum >= 1, so it is floored."""
    bad = bad | ~torch.isfinite(m)
    safe = token.clamp(0, z.shape[1] - 1)
    z_tok = z.gather(1, safe[:, None]).squeeze(1)
    shifted = z.sub_(m[:, None]) if consume else z - m[:, None]
    logp = (z_tok - m) - torch.log(shifted.clamp_(min=EXP_FLOOR).exp_().sum(1))
    tokens = torch.where(bad, -1, safe).to(torch.int32)
    return torch.stack([tokens, logp.view(torch.int32)])


def sample_reference(logits, seeds, positions, inv_temperature: float, strict: bool = True) -> torch.Tensor:
    """The spec: whole-vocabulary noise, then argmax. Same arguments and result as :func:`sample_tokens`."""
    z = _scaled(logits, inv_temperature)
    bad = torch.isnan(z).any(1) | (z == float("inf")).any(1)
    if strict:
        bad |= (z == float("-inf")).any(1)
    score = z if inv_temperature == 0 else z + nz.gumbel_noise(seeds, positions, z.shape[1])
    return _finish(z, z.amax(1), score.argmax(1), bad)


def _cpp_search():
    try:
        from fastrft._engine import race_search
    except ImportError:  # the extension is not built: the PyTorch stages below
        return None
    return race_search


def sample_torch(logits, seeds, positions, inv_temperature: float, strict: bool = True,
                 search: str = "auto", consume: bool = False) -> torch.Tensor:
    """The CPU path: the reference's tokens, searching only the blocks that can win (module docstring).
    ``search``: "cpp" runs the block search in the C++ extension (its bit-identical twin, one loop per
    row instead of a few hundred small tensor operations), "torch" in PyTorch, "auto" C++ when built.
    ``consume``: fp32 logits may be overwritten (the engine's own buffer): no (B, V) temporaries."""
    z = _scaled(logits, inv_temperature, consume)
    b, v = z.shape
    nb = -(-v // nz.BLOCK)
    padded = z if v == nb * nz.BLOCK else torch.nn.functional.pad(z, (0, nb * nz.BLOCK - v), value=float("-inf"))
    blocks = padded.view(b, nb, nz.BLOCK)
    bmax = blocks.amax(-1)  # NaN propagates
    m = bmax.amax(1)
    # A sum is finite only if every term is (an overflow needs logits near 1e34, which is no better).
    bad = ~torch.isfinite(z.sum(1)) if strict else torch.isnan(m) | (m == float("inf"))
    rows = torch.arange(b, device=z.device)
    if inv_temperature == 0:  # greedy: the first block holding the row max, then its first id
        top = bmax.argmax(1)
        return _finish(z, m, top * nz.BLOCK + blocks[rows, top].argmax(1), bad, consume)
    cpp = _cpp_search() if search in ("auto", "cpp") and z.device.type == "cpu" else None
    if search == "cpp" and cpp is None:
        raise RuntimeError("search='cpp' needs the C++ extension fastrft._engine (pip install -e .)")
    if cpp is not None:
        # torch's thread count (what --threads sets); a thread per 8 rows at least, as each costs ~30 us.
        threads = max(1, min(torch.get_num_threads(), b // 8))
        token = torch.from_numpy(cpp(z.contiguous().numpy(), v, bmax.numpy(), seeds.numpy(), positions.numpy(),
                                     threads))
        return _finish(z, m, token, bad | (token == _INT_BIG), consume)
    ids = torch.arange(nb, device=z.device).expand(b, nb)
    e_block, j = nz.block_noise(seeds, positions, ids)
    bound = bmax + nz.block_max_noise(e_block)
    # Stage 1: the few blocks with the highest bounds set a best score. Stage 2: every block whose bound
    # comes within the margin of it; the winner's block is among them (its bound >= its score >= best).
    first = bound.topk(min(STAGE1_BLOCKS, nb), dim=1).indices
    r1 = rows[:, None].expand_as(first).reshape(-1)
    best = _search(blocks, seeds, positions, e_block, j, r1, first.reshape(-1))[0].view(b, -1).amax(1)
    cand = (bound >= (best - skip_margin(best))[:, None]).nonzero()
    r, c = cand[:, 0], cand[:, 1]
    score, at = _search(blocks, seeds, positions, e_block, j, r, c)
    row_best = torch.full((b,), float("-inf"), device=z.device).scatter_reduce(0, r, score, "amax")
    ids_at_best = torch.where(score == row_best[r], c * nz.BLOCK + at, _INT_BIG)
    token = torch.full((b,), _INT_BIG, device=z.device).scatter_reduce(0, r, ids_at_best, "amin")
    return _finish(z, m, token, bad | ~torch.isfinite(row_best), consume)


def _search(blocks, seeds, positions, e_block, j, rows, cols):
    """(best score, its offset) in block cols[i] of row rows[i], for every i; the first offset on ties."""
    e_elem = nz.element_exponentials(seeds[rows], positions[rows], cols[:, None])[:, 0]
    score = blocks[rows, cols] + nz.block_gumbels(e_block[rows, cols], j[rows, cols], e_elem)
    best, at = score.max(1)
    return best, at


# ----------------------------------------------------------------------------------------- Triton
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


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_splits(batch: int, vocab: int, device: torch.device, tile: int) -> int:
    """Vocabulary splits per row from shapes only: enough programs for two per SM when the batch is
    small, never a split without a whole tile. 1 off-GPU."""
    if device.type != "cuda":
        return 1
    from fastrft.kernels.paged_attention import _sm_count

    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(MAX_SPLITS, -(-2 * sms // max(batch, 1)), -(-vocab // tile)))


def _sample_triton(logits, seeds, positions, inv_t: torch.Tensor, strict: bool, num_splits: int | None = None,
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
def _sample_op(logits: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor, inv_temperature: torch.Tensor,
               strict: bool) -> torch.Tensor:
    return _sample_triton(logits, seeds, positions, inv_temperature, strict)


@_sample_op.register_fake
def _(logits, seeds, positions, inv_temperature, strict):
    return logits.new_empty((2, logits.shape[0]), dtype=torch.int32)


def triton_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int, num_splits: int = 1) -> torch.Tensor:
    """The kernel's own (B, vocab_size) noise (written by its WRITE_NOISE variant), for tests."""
    b = seeds.shape[0]
    x = torch.zeros((b, vocab_size), device=seeds.device)
    out = torch.full((b, vocab_size), float("nan"), device=seeds.device)
    _sample_triton(x, seeds, positions, torch.ones(1, device=seeds.device), True, num_splits, noise=out)
    return out


# ----------------------------------------------------------------------------------------- public
def check_inputs(logits, seeds, positions) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be (B, V) with contiguous rows; got shape {tuple(logits.shape)}, "
                         f"strides {logits.stride()}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"logits must be float32, float16 or bfloat16; got {logits.dtype}")
    for name, t in (("seeds", seeds), ("positions", positions)):
        if t.shape != (logits.shape[0],) or t.dtype != torch.int64 or t.device != logits.device:
            raise ValueError(f"{name} must be int64 of shape ({logits.shape[0]},) on {logits.device}; got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")


def sample_tokens(logits: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor,
                  inv_temperature: float | torch.Tensor, *, strict: bool = True, backend: str = "auto",
                  num_splits: int | None = None, consume: bool = False) -> torch.Tensor:
    """Sample one token per row; returns (2, B) int32 on the logits' device (row 0 tokens, -1 for a
    row with bad logits; row 1 the fp32 log-prob bits; :func:`unpack`).

    logits (B, V) fp32/fp16/bf16, rows contiguous; seeds (B,) int64 request seeds
    (:func:`fastrft.engine.request_seed`); positions (B,) int64 response positions; inv_temperature: 1/T,
    0 for greedy, a float or a one-element fp32 tensor on the logits' device (what a CUDA graph reads);
    strict: -inf counts as a bad logit (off when the caller filtered with -inf itself). backend "auto":
    Triton on CUDA, PyTorch elsewhere; "triton" on CPU needs TRITON_INTERPRET=1. consume: the PyTorch
    path may overwrite fp32 logits (a scratch buffer of the caller's) instead of allocating (B, V).
    """
    from fastrft.kernels.linear_logprob import BACKENDS

    check_inputs(logits, seeds, positions)
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is unknown; choose one of: {', '.join(BACKENDS)}")
    if backend == "reference" or (backend == "auto" and (logits.device.type not in ACCELERATORS or not HAVE_TRITON)):
        inv = float(inv_temperature) if not isinstance(inv_temperature, torch.Tensor) else float(inv_temperature.item())
        return sample_torch(logits, seeds, positions, inv, strict, consume=consume)
    if not HAVE_TRITON:
        raise RuntimeError("backend='triton' needs the triton package")
    if logits.device.type not in ACCELERATORS and not _interpreting():
        raise RuntimeError("the Triton sampler needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                           "fastrft.kernels is imported")
    if not isinstance(inv_temperature, torch.Tensor):
        inv_temperature = torch.full((1,), float(inv_temperature), dtype=torch.float32, device=logits.device)
    if num_splits is not None or logits.device.type not in ACCELERATORS:
        return _sample_triton(logits, seeds, positions, inv_temperature, strict, num_splits)
    return _sample_op(logits, seeds, positions, inv_temperature, strict)


def unpack(packed: torch.Tensor) -> tuple[list[int], list[float]]:
    """A host (2, B) int32 result -> (tokens, log-probs) as Python lists."""
    return packed[0].tolist(), packed[1].view(torch.float32).tolist()


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
