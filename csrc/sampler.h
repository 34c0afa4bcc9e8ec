// The sampler's block search: a bit-identical C++ twin of the PyTorch stages of
// fastrft.kernels.sampling.sample_torch, which states the algorithm (the noise itself is specified in
// fastrft/kernels/noise.py). Pure C++17, no Python or torch.
//
// Floating point: every fp32 operation is written out in the spec's order and compiled without
// contraction (-ffp-contract=off, no fast-math), so each noise value has the PyTorch spec's bits.
#pragma once

#include <cstdint>

namespace fastrft {

// Philox4x32-10 of counter (c0, c1, c2, c3) under key (k0, k1); out: [4] words.
void philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1, uint32_t* out);

// Cephes logf through fixed fp32 operations (fastrft.kernels.noise.ln), for positive normal x.
float fixed_ln(float x);

// Per row r, the id of the largest z[r, v] + g_v over v < V (the smallest id on ties), g being the
// Gumbel noise of request seeds[r] at response position positions[r]. Blocks of 64 ids are searched
// only when their largest logit plus their largest noise can beat the best score so far.
//   z:         [B, stride] fp32 scaled logits, ids v < V used (-inf ids never win)
//   block_max: [B, nb] fp32, nb = ceil(V / 64): the max of each block's logits (-inf when all are)
//   seeds, positions: [B] int64
//   tokens:    [B] int64 out; INT32_MAX for a row without a finite score
//   threads:   rows are shared among this many threads (>= 1)
void race_search(const float* z, int64_t B, int64_t V, int64_t stride, const float* block_max, const int64_t* seeds,
                 const int64_t* positions, int64_t* tokens, int threads);

// race_search for rows [lo, hi), in the calling thread.
void race_rows(const float* z, int64_t lo, int64_t hi, int64_t V, int64_t stride, const float* block_max,
               const int64_t* seeds, const int64_t* positions, int64_t* tokens);

}  // namespace fastrft
