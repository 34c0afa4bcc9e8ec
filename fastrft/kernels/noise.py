"""The sampling noise: a pure function of (request seed, response position, vocabulary id), in PyTorch.

This module is the specification. The Triton kernel (:mod:`fastrft.kernels.sampling`) computes the same
values with the same fp32 operations in the same order, so the two agree bit for bit.

**Random words.** Philox4x32-10 (Salmon et al., SC'11; the generator of cuRAND and ``tl.rand``) maps a
128-bit counter and a 64-bit key to four 32-bit words. The key is the request's seed (low word, high
word). The counter is (c, t, domain, 0) with t the response position:

- element words, domain 0: vocabulary id v takes word ``v & 3`` of counter ``v >> 2``;
- block words, domain 1: vocabulary block b (ids [64 b, 64 b + 64)) takes words 2 (b & 1) and
  2 (b & 1) + 1 of counter b >> 1.

A word w becomes a uniform on a 2^23 grid that excludes 0 and 1: u = ((w >> 9) + 0.5) * 2^-23, exact in
fp32, and then an exponential E = -ln u.

**Gumbel noise, top down.** Sampling adds iid Gumbel noise g_v to the logits and takes the argmax (the
Gumbel-max form of the exponential race argmax p_v / E_v). The g_v are built top down per block: the
largest of 64 iid Gumbels is Gumbel(ln 64) and sits at a uniform position J, and the other 63, given
that maximum M, are iid Gumbels truncated below M. With E_b from the block words and E_v from the
element words:

    M = -ln(E_b / 64),   g_J = M,   g_v = -ln(E_b / 64 + E_v)  (v != J),   J = word1 >> 26.

These are exactly iid Gumbel(0) (up to the 2^23 grid), and every g_v of a block is at most M. A sampler
may therefore skip a block whose largest logit plus M cannot beat the best score found so far: this is
what makes the CPU path cheap, while the noise of every id stays defined.

**Logarithm.** ``ln`` is Cephes' single-precision logf written with +, -, * and bit operations only
(about 2 ulp): unlike the platform's logf it rounds identically in PyTorch on any CPU, in Triton's
interpreter (numpy) and on a GPU (launched with ``enable_fp_fusion=False``).
"""

from __future__ import annotations

import struct

import torch

BLOCK = 64  # vocabulary ids per noise block
LANES = 4  # words per Philox call
_M32 = 0xFFFFFFFF
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # key increments
PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # round multipliers


def f32(x: float) -> float:
    """x rounded to the nearest fp32 value (so every implementation sees the same constant)."""
    return struct.unpack("f", struct.pack("f", x))[0]


# Cephes logf: ln(1 + f) = f - f^2 / 2 + f^3 P(f) for f in [sqrt(1/2) - 1, sqrt(2) - 1], and e * ln 2
# added in two parts (LN2_HI is exact in 9 bits, LN2_LO carries the rest).
LN_P = tuple(f32(c) for c in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
                              1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
                              3.3333331174e-1))
SQRT_HALF = f32(0.70710678118654752440)
LN2_HI = 0.693359375
LN2_LO = f32(-2.12194440e-4)
GRID = 2.0**-23  # uniform spacing
INV_BLOCK = 1.0 / BLOCK


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Philox4x32 on int64 tensors (or ints) holding uint32 values; broadcasts. Returns the four output
    words as int64 tensors in [0, 2^32). A 32 x 32-bit product fits 64 bits; int64 multiplication wraps
    modulo 2^64, so its low and high words are the unsigned product's."""
    for _ in range(rounds):
        p0 = c0 * PHILOX_M[0]
        p1 = c2 * PHILOX_M[1]
        # The low words (p & M) only meet xors that are masked afterwards, so they stay unmasked until the end.
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & _M32, p1, ((p0 >> 32) ^ c3 ^ k1) & _M32, p0
        k0 = (k0 + PHILOX_W[0]) & _M32
        k1 = (k1 + PHILOX_W[1]) & _M32
    return c0, c1 & _M32, c2, c3 & _M32


def uniform(word: torch.Tensor) -> torch.Tensor:
    """uint32 words (int64) -> fp32 uniforms ((w >> 9) + 0.5) * 2^-23 in (0, 1), exactly."""
    return ((word >> 9).float() + 0.5) * GRID


def ln(x: torch.Tensor) -> torch.Tensor:
    """Natural log of positive normal fp32 values through fixed fp32 operations (Cephes logf)."""
    bits = x.view(torch.int32)
    e = (bits >> 23) - 126  # x = m * 2^e with m in [0.5, 1)
    m = ((bits & 0x007FFFFF) | 0x3F000000).view(torch.float32)
    small = m < SQRT_HALF
    fe = torch.where(small, e - 1, e).float()
    f = torch.where(small, (m + m) - 1.0, m - 1.0)
    z = f * f
    y = f * LN_P[0] + LN_P[1]
    for c in LN_P[2:]:
        y = y * f + c
    y = (y * f) * z
    y = y + fe * LN2_LO
    y = y - z * 0.5
    r = f + y
    return r + fe * LN2_HI


def neg(x: torch.Tensor) -> torch.Tensor:
    """0 - x, as Triton negates (so a zero comes out +0.0 on every path)."""
    return 0.0 - x


def keys(seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) int64 request seeds -> Philox keys (low word, high word), each (B, 1) int64."""
    s = seeds.long()[:, None]
    return s & _M32, (s >> 32) & _M32


def block_noise(seeds: torch.Tensor, positions: torch.Tensor, blocks: torch.Tensor):
    """Per (request, block): E_b (fp32 exponential) and J (int64 position of the block's largest noise).

    seeds, positions (B,) int64; blocks (B, n) or (n,) int64 block ids. Returns two (B, n) tensors."""
    k0, k1 = keys(seeds)
    blocks = blocks.long()
    odd = (blocks & 1).bool()
    w0, w1, w2, w3 = philox4x32(blocks >> 1, positions.long()[:, None], 1, 0, k0, k1)
    return neg(ln(uniform(torch.where(odd, w2, w0)))), torch.where(odd, w3, w1) >> 26


def element_exponentials(seeds: torch.Tensor, positions: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """E_v for every id of the given blocks: (B, n) block ids -> (B, n, 64) fp32, ids in order."""
    k0, k1 = keys(seeds)
    counters = blocks.long()[..., None] * (BLOCK // LANES) + torch.arange(BLOCK // LANES, device=blocks.device)
    words = philox4x32(counters, positions.long()[:, None, None], 0, 0, k0[..., None], k1[..., None])
    return neg(ln(uniform(torch.stack(words, -1).flatten(-2))))  # lane l of counter c is id 4c + l


def block_gumbels(e_block: torch.Tensor, j: torch.Tensor, e_elem: torch.Tensor) -> torch.Tensor:
    """The (.., 64) Gumbel noise of blocks from their E_b (..), J (..) and element exponentials (.., 64)."""
    at_max = torch.arange(BLOCK, device=j.device) == j[..., None]
    return neg(ln(e_block[..., None] * INV_BLOCK + e_elem.masked_fill(at_max, 0.0)))


def block_max_noise(e_block: torch.Tensor) -> torch.Tensor:
    """M = -ln(E_b / 64): the largest Gumbel noise of each block."""
    return neg(ln(e_block * INV_BLOCK))


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The whole (B, vocab_size) fp32 Gumbel noise of requests ``seeds`` at response ``positions``."""
    nb = -(-vocab_size // BLOCK)
    blocks = torch.arange(nb, device=seeds.device).expand(seeds.shape[0], nb)
    e_block, j = block_noise(seeds, positions, blocks)
    g = block_gumbels(e_block, j, element_exponentials(seeds, positions, blocks))
    return g.flatten(1)[:, :vocab_size]
