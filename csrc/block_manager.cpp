// Paged KV block manager: see block_manager.h and the Python twin fastrft/engine/block_manager.py.
#include "block_manager.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace fastrft {

namespace {

inline uint64_t mix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

inline std::string str(int64_t v) { return std::to_string(v); }

}  // namespace

uint64_t chain_hash(uint64_t prev, const int64_t* tokens, int64_t n) {
  uint64_t h = mix(prev);
  for (int64_t i = 0; i < n; ++i) h = mix(h ^ (static_cast<uint64_t>(tokens[i]) & 0xFFFFFFFFULL));
  return h;
}

BlockManager::BlockManager(int64_t num_blocks, int64_t block_size)
    : num_blocks_(num_blocks), block_size_(block_size) {
  if (block_size < 1 || (block_size & (block_size - 1)) != 0)
    throw std::invalid_argument("block_size must be a power of two >= 1, got " + str(block_size));
  if (num_blocks < 1 || num_blocks > INT32_MAX)
    throw std::invalid_argument("num_blocks must be in [1, 2**31 - 1], got " + str(num_blocks));
  ref_.assign(num_blocks, 0);
  has_hash_.assign(num_blocks, 0);
  hash_.assign(num_blocks, 0);
  block_tokens_.resize(num_blocks);
  prev_.resize(num_blocks);
  next_.resize(num_blocks);
  for (int64_t b = 0; b < num_blocks; ++b) push_free(static_cast<int32_t>(b));
}

// ------------------------------------------------------------------------------------------ internals

const BlockManager::Seq& BlockManager::get(int64_t seq_id) const {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw std::invalid_argument("unknown sequence " + str(seq_id));
  return it->second;
}

BlockManager::Seq& BlockManager::get(int64_t seq_id) {
  return const_cast<Seq&>(static_cast<const BlockManager*>(this)->get(seq_id));
}

void BlockManager::push_free(int32_t b) {
  prev_[b] = tail_;
  next_[b] = -1;
  if (tail_ >= 0) next_[tail_] = b; else head_ = b;
  tail_ = b;
  ++num_free_;
}

void BlockManager::unlink_free(int32_t b) {
  if (prev_[b] >= 0) next_[prev_[b]] = next_[b]; else head_ = next_[b];
  if (next_[b] >= 0) prev_[next_[b]] = prev_[b]; else tail_ = prev_[b];
  --num_free_;
}

int32_t BlockManager::take_free() {
  int32_t b = head_;  // callers check num_free_ first
  unlink_free(b);
  if (has_hash_[b]) {
    auto it = cache_.find(hash_[b]);
    if (it != cache_.end() && it->second == b) cache_.erase(it);
    has_hash_[b] = 0;
    block_tokens_[b].clear();
  }
  ref_[b] = 1;
  return b;
}

void BlockManager::register_block(int32_t b, uint64_t h, const int64_t* tokens) {
  has_hash_[b] = 1;
  hash_[b] = h;
  block_tokens_[b].assign(tokens, tokens + block_size_);
  cache_[h] = b;
}

// ------------------------------------------------------------------------------------------ allocation

bool BlockManager::can_allocate(int64_t num_tokens) const {
  if (num_tokens < 0) throw std::invalid_argument("num_tokens must be >= 0, got " + str(num_tokens));
  return num_free_ >= (num_tokens + block_size_ - 1) / block_size_;
}

int64_t BlockManager::allocate(int64_t seq_id, const int64_t* tokens, int64_t n) {
  if (seqs_.count(seq_id)) throw std::invalid_argument("sequence " + str(seq_id) + " is already allocated");
  if (n == 0) throw std::invalid_argument("sequence " + str(seq_id) + ": token_ids is empty");
  const int64_t bs = block_size_, need = (n + bs - 1) / bs;
  if (need > num_free_)
    throw std::runtime_error("out of KV blocks: sequence " + str(seq_id) + " needs " + str(need) + " blocks, " +
                             str(num_free_) + " free");
  Seq seq;
  seq.blocks.reserve(need);
  seq.hashes.reserve(n / bs);
  seq.num_tokens = n;
  uint64_t h = 0;
  int64_t cached = 0;
  bool hitting = true;
  for (int64_t i = 0; i < need; ++i) {
    const int64_t* chunk = tokens + i * bs;
    const bool full = (i + 1) * bs <= n;
    if (full) {
      h = chain_hash(h, chunk, bs);
      seq.hashes.push_back(h);
    }
    if (hitting && (i + 1) * bs <= n - 1) {  // cacheable: not the block of the last token
      auto it = cache_.find(h);
      if (it != cache_.end() && std::equal(chunk, chunk + bs, block_tokens_[it->second].begin())) {
        const int32_t b = it->second;
        if (ref_[b] == 0) unlink_free(b);
        ++ref_[b];
        seq.blocks.push_back(b);
        cached += bs;
        continue;
      }
    }
    hitting = false;
    const int32_t b = take_free();
    if (full) register_block(b, h, chunk);
    seq.blocks.push_back(b);
  }
  const int64_t done = static_cast<int64_t>(seq.hashes.size()) * bs;
  seq.tail.assign(tokens + done, tokens + n);
  seqs_.emplace(seq_id, std::move(seq));
  return cached;
}

void BlockManager::fork(int64_t parent_id, int64_t child_id) {
  const Seq& parent = get(parent_id);
  if (seqs_.count(child_id)) throw std::invalid_argument("sequence " + str(child_id) + " is already allocated");
  for (int32_t b : parent.blocks) ++ref_[b];
  Seq child = parent;  // copied before emplace: emplace may rehash and move `parent`
  seqs_.emplace(child_id, std::move(child));
}

bool BlockManager::can_append(int64_t seq_id) const {
  const Seq& seq = get(seq_id);
  if (seq.num_tokens % block_size_ == 0 || ref_[seq.blocks.back()] > 1) return num_free_ >= 1;
  return true;
}

AppendResult BlockManager::append(int64_t seq_id, int64_t token_id) {
  if (!can_append(seq_id))
    throw std::runtime_error("out of KV blocks: sequence " + str(seq_id) + " needs 1 block to append, 0 free");
  Seq& seq = get(seq_id);
  const int64_t bs = block_size_, pos = seq.num_tokens;
  AppendResult r{0, -1, -1};
  int32_t b;
  if (pos % bs == 0) {
    b = take_free();
    seq.blocks.push_back(b);
  } else {
    b = seq.blocks.back();
    if (ref_[b] > 1) {  // shared partial block (a fork): copy before writing
      const int32_t fresh = take_free();
      --ref_[b];
      seq.blocks.back() = fresh;
      r.copy_src = b;
      r.copy_dst = fresh;
      b = fresh;
    }
  }
  seq.num_tokens += 1;
  seq.tail.push_back(token_id);
  if (seq.num_tokens % bs == 0) {  // the last block just filled up: make it matchable
    const uint64_t h = chain_hash(seq.hashes.empty() ? 0 : seq.hashes.back(), seq.tail.data(), bs);
    seq.hashes.push_back(h);
    register_block(b, h, seq.tail.data());
    seq.tail.clear();
  }
  r.slot = static_cast<int64_t>(b) * bs + pos % bs;
  return r;
}

void BlockManager::free(int64_t seq_id) {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw std::invalid_argument("unknown sequence " + str(seq_id));
  const auto& blocks = it->second.blocks;
  for (auto b = blocks.rbegin(); b != blocks.rend(); ++b)
    if (--ref_[*b] == 0) push_free(*b);
  seqs_.erase(it);
}

void BlockManager::reset_prefix_cache() {
  cache_.clear();
  for (int64_t b = 0; b < num_blocks_; ++b) {
    has_hash_[b] = 0;
    block_tokens_[b].clear();
  }
  // With no sequence alive every block is free: put the pool back in a fresh manager's order, so that
  // what follows a reset (a round after a checkpoint, the same round after a resume) gets the same blocks.
  if (seqs_.empty()) {
    head_ = tail_ = -1;
    num_free_ = 0;
    for (int64_t b = 0; b < num_blocks_; ++b) push_free(static_cast<int32_t>(b));
  }
}

// ------------------------------------------------------------------------------------------ queries

int64_t BlockManager::max_blocks(const int64_t* seq_ids, int64_t B) const {
  size_t width = 0;
  for (int64_t i = 0; i < B; ++i) width = std::max(width, get(seq_ids[i]).blocks.size());
  return static_cast<int64_t>(width);
}

void BlockManager::block_table(const int64_t* seq_ids, int64_t B, int64_t width, int32_t* out) const {
  for (int64_t i = 0; i < B; ++i) {
    const auto& blocks = get(seq_ids[i]).blocks;
    int32_t* row = out + i * width;
    std::copy(blocks.begin(), blocks.end(), row);
    std::fill(row + blocks.size(), row + width, -1);
  }
}

std::vector<int64_t> BlockManager::slot_mapping(const int64_t* seq_ids, const int64_t* starts, int64_t B) const {
  std::vector<int64_t> out;
  const int64_t bs = block_size_;
  for (int64_t i = 0; i < B; ++i) {
    const Seq& seq = get(seq_ids[i]);
    if (starts[i] < 0 || starts[i] > seq.num_tokens)
      throw std::invalid_argument("start " + str(starts[i]) + " out of range [0, " + str(seq.num_tokens) +
                                  "] for sequence " + str(seq_ids[i]));
    for (int64_t pos = starts[i]; pos < seq.num_tokens; ++pos)
      out.push_back(static_cast<int64_t>(seq.blocks[pos / bs]) * bs + pos % bs);
  }
  return out;
}

void BlockManager::context_lens(const int64_t* seq_ids, int64_t B, int32_t* out) const {
  for (int64_t i = 0; i < B; ++i) out[i] = static_cast<int32_t>(get(seq_ids[i]).num_tokens);
}

int64_t BlockManager::ref_count(int64_t block) const {
  if (block < 0 || block >= num_blocks_)
    throw std::invalid_argument("block " + str(block) + " out of range [0, " + str(num_blocks_) + ")");
  return ref_[block];
}

}  // namespace fastrft
