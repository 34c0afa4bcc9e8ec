// See sampler.h. The constants and the operation order follow fastrft/kernels/noise.py line by line.
#include "sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

namespace fastrft {
namespace {

constexpr int kBlock = 64;
constexpr float kGrid = 1.1920928955078125e-07f;  // 2^-23
constexpr float kInvBlock = 0.015625f;             // 1 / 64
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// A uint32 word -> the exponential 0 - ln(((w >> 9) + 0.5) * 2^-23).
inline float exponential(uint32_t w) {
  const float u = (static_cast<float>(static_cast<int32_t>(w >> 9)) + 0.5f) * kGrid;
  return 0.0f - fixed_ln(u);
}

// The spec's skip_margin(best): how far below the best score a bound may lie and still be searched.
inline float margin(float best) { return 1e-3f + 1e-5f * std::fabs(best); }

struct Best {
  float score = kNegInf;
  int64_t id = std::numeric_limits<int32_t>::max();
  void offer(float s, int64_t v) {
    if (s > score || (s == score && v < id)) {
      score = s;
      id = v;
    }
  }
};

// Scores of block b's ids, offered to best; ids whose logit plus the block's largest noise cannot beat
// the best are skipped (exact: every noise of the block is at most its largest).
void search_block(const float* zr, int64_t V, int64_t b, float e_block, int j, float max_noise, uint32_t k0,
                  uint32_t k1, uint32_t pos, Best& best) {
  const float a = e_block * kInvBlock;
  uint32_t words[4];
  for (int q = 0; q < kBlock / 4; ++q) {
    const int64_t v0 = b * kBlock + 4 * q;
    bool any = false;
    for (int l = 0; l < 4; ++l) {
      const int64_t v = v0 + l;
      if (v < V && zr[v] != kNegInf && zr[v] + max_noise >= best.score - margin(best.score)) any = true;
    }
    if (!any) continue;
    philox4x32(static_cast<uint32_t>(v0 >> 2), pos, 0, 0, k0, k1, words);
    for (int l = 0; l < 4; ++l) {
      const int64_t v = v0 + l;
      if (v >= V || zr[v] == kNegInf) continue;
      const float e_el = (4 * q + l == j) ? 0.0f : exponential(words[l]);
      const float g = 0.0f - fixed_ln(a + e_el);
      best.offer(zr[v] + g, v);
    }
  }
}

}  // namespace

void philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1, uint32_t* out) {
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

float fixed_ln(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const int32_t e = (bits >> 23) - 126;
  const int32_t mbits = (bits & 0x007FFFFF) | 0x3F000000;
  float m;
  std::memcpy(&m, &mbits, sizeof m);
  const bool small = m < 0.70710678118654752440f;
  const float fe = static_cast<float>(small ? e - 1 : e);
  const float f = small ? (m + m) - 1.0f : m - 1.0f;
  const float z = f * f;
  float y = f * 7.0376836292e-2f + -1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f + -1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f + -1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f + -2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = (y * f) * z;
  y = y + fe * -2.12194440e-4f;
  y = y - z * 0.5f;
  const float r = f + y;
  return r + fe * 0.693359375f;
}

void race_search(const float* z, int64_t B, int64_t V, int64_t stride, const float* block_max, const int64_t* seeds,
                 const int64_t* positions, int64_t* tokens, int threads) {
  // Rows are independent: split them into contiguous shares, one per thread (the caller's own included).
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>(threads, B));
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < n; ++t)
    pool.emplace_back(race_rows, z, B * t / n, B * (t + 1) / n, V, stride, block_max, seeds, positions, tokens);
  race_rows(z, 0, B / n, V, stride, block_max, seeds, positions, tokens);
  for (auto& th : pool) th.join();
}

void race_rows(const float* z, int64_t lo, int64_t hi, int64_t V, int64_t stride, const float* block_max,
               const int64_t* seeds, const int64_t* positions, int64_t* tokens) {
  const int64_t nb = (V + kBlock - 1) / kBlock;
  std::vector<float> e_block(nb), max_noise(nb), bound(nb);
  std::vector<int> jmax(nb);
  for (int64_t r = lo; r < hi; ++r) {
    const float* zr = z + r * stride;
    const float* bm = block_max + r * nb;
    const uint64_t seed = static_cast<uint64_t>(seeds[r]);
    const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    const uint32_t pos = static_cast<uint32_t>(positions[r]);
    // Block words: block b takes words 2 (b & 1) and 2 (b & 1) + 1 of counter (b >> 1, pos, 1, 0).
    int64_t first = 0;
    uint32_t w[4];
    for (int64_t b = 0; b < nb; ++b) {
      if ((b & 1) == 0) philox4x32(static_cast<uint32_t>(b >> 1), pos, 1, 0, k0, k1, w);
      const int o = 2 * static_cast<int>(b & 1);
      e_block[b] = exponential(w[o]);
      jmax[b] = static_cast<int>(w[o + 1] >> 26);
      max_noise[b] = 0.0f - fixed_ln(e_block[b] * kInvBlock);
      bound[b] = bm[b] + max_noise[b];
      if (bound[b] > bound[first]) first = b;
    }
    // The block with the highest bound first, then every block that can still beat the best.
    Best best;
    auto visit = [&](int64_t b) {
      search_block(zr, V, b, e_block[b], jmax[b], max_noise[b], k0, k1, pos, best);
    };
    visit(first);
    for (int64_t b = 0; b < nb; ++b)
      if (b != first && bound[b] >= best.score - margin(best.score)) visit(b);
    tokens[r] = best.score == kNegInf ? std::numeric_limits<int32_t>::max() : best.id;
  }
}

}  // namespace fastrft
