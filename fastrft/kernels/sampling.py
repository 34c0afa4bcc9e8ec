"""Token sampling from counter-based noise in one read of the logits: temperature, the Gumbel-max race
and the chosen token's log-prob.

Per row (one request at one response position):

    z = logits * (1 / T)      token = argmax_v z_v + g_v      logp = (z_token - m) - ln(sum_v exp(z_v - m))

with m = max z and g the noise of :mod:`fastrft.kernels.noise` (a pure function of the request's seed,
the position and v). Greedy decoding (inverse temperature 0) takes argmax z and the log-prob at T = 1.
Ties go to the smallest id. A row holding NaN or +inf, or -inf when ``strict``, or no finite logit at
all, comes back as token -1: the caller names the request and fails, rather than sample token 0.

Three implementations, one result (the same token, bit for bit: the scores z + g are computed by the
same fp32 operations everywhere); the CPU path's block search also has a C++ twin in ``fastrft._engine``:

- :func:`sample_reference`: the readable spec. It builds the whole (B, V) noise.
- :func:`sample_torch`: the CPU path. Blocks of 64 ids are skipped unless their largest logit plus their
  largest noise M (one Philox call per block) can beat the best score found so far, so the element
  noise is computed for a few blocks per row instead of all V ids.
- the Triton kernel (CUDA; :mod:`fastrft.kernels.sampling_triton`): one program per (row, vocabulary
  split) streams the logits in tiles of 64-id blocks, keeps an online log-sum-exp, and computes element
  noise only for tiles with a block that can win. Every launch depends on shapes only (it runs inside
  the decode CUDA graph); the inverse temperature is read from a device tensor.

Output: one (2, B) int32 tensor, row 0 the tokens and row 1 the log-probs' fp32 bits, so that one
device-to-host copy brings a decode step's results back (:func:`unpack`).
"""

from __future__ import annotations

import os

import torch

from fastrft.kernels import noise as nz
from fastrft.kernels.rows import EXP_FLOOR, exp_shifted_, log_rows, row_sums
from fastrft.kernels import sampling_triton as tri
from fastrft.kernels.sampling_triton import HAVE_TRITON, compile_cases, triton_noise  # noqa: F401 (the gate reads it)

__all__ = ["compile_cases", "sample_reference", "sample_tokens", "sample_torch", "triton_noise", "unpack"]

_INT_BIG = 2**31 - 1
ACCELERATORS = ("cuda",)  # device types the Triton kernel (as the custom op fastrft::sample_tokens) serves
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
    call (bench/RESULTS.md has the cost). exp below EXP_FLOOR is subnormal (far slower on CPUs) and
    far below the rounding of a sum >= 1, so it is floored."""
    bad = bad | ~torch.isfinite(m)
    safe = token.clamp(0, z.shape[1] - 1)
    z_tok = z.gather(1, safe[:, None]).squeeze(1)
    shifted = z.sub_(m[:, None]) if consume else z - m[:, None]
    logp = (z_tok - m) - log_rows(row_sums(exp_shifted_(shifted)))  # the trainer's formula (kernels.rows)
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
        # torch's thread count (what --threads sets); a thread per 8 rows at least: a thread's start-up
        # costs about as much as a few rows' search.
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
    if logits.device.type not in ACCELERATORS and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("the Triton sampler needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                           "fastrft.kernels is imported")
    if not isinstance(inv_temperature, torch.Tensor):
        inv_temperature = torch.full((1,), float(inv_temperature), dtype=torch.float32, device=logits.device)
    if num_splits is not None or logits.device.type not in ACCELERATORS:
        return tri.sample_triton(logits, seeds, positions, inv_temperature, strict, num_splits)
    return tri.sample_op(logits, seeds, positions, inv_temperature, strict)


def unpack(packed: torch.Tensor) -> tuple[list[int], list[float]]:
    """A host (2, B) int32 result -> (tokens, log-probs) as Python lists."""
    return packed[0].tolist(), packed[1].view(torch.float32).tolist()


