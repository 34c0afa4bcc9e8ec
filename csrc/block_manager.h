// Paged KV-cache block manager with prefix caching and copy-on-write forks.
//
// Pure C++17, no Python or torch: it hands out block ids and slot indices. The Python twin
// fastrft/engine/block_manager.py is its executable spec (same behaviour, same error messages); read its
// module docstring for the policy. Errors: std::invalid_argument for bad arguments and unknown or
// duplicate sequence ids (Python ValueError), std::runtime_error when out of blocks (RuntimeError).
//
// Units: a block holds block_size token slots; slot s = block * block_size + offset addresses one token's
// KV row in the flat cache. Token ids are int64 (their low 32 bits are hashed); sequence ids are int64.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

namespace fastrft {

// splitmix64 finaliser chained over tokens: h = mix(prev); for t: h = mix(h ^ (t & 0xFFFFFFFF)).
// tokens: [n] token ids.
uint64_t chain_hash(uint64_t prev, const int64_t* tokens, int64_t n);

struct AppendResult {
  int64_t slot;      // KV slot of the appended token
  int32_t copy_src;  // copy-on-write: block whose KV rows the caller copies into copy_dst; -1 if none
  int32_t copy_dst;
};

class BlockManager {
 public:
  BlockManager(int64_t num_blocks, int64_t block_size);

  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  int64_t num_free_blocks() const { return num_free_; }

  // True when ceil(num_tokens / block_size) blocks are free (ignores possible cache hits).
  bool can_allocate(int64_t num_tokens) const;
  // tokens: [n] token ids of the new sequence. Returns the prefix-cached token count (multiple of
  // block_size, at most n - 1).
  int64_t allocate(int64_t seq_id, const int64_t* tokens, int64_t n);
  void fork(int64_t parent_id, int64_t child_id);
  bool can_append(int64_t seq_id) const;
  AppendResult append(int64_t seq_id, int64_t token_id);
  void free(int64_t seq_id);
  // Forget every cached prefix; with no sequence alive, also put the free pool back in a fresh
  // manager's order (what follows a reset then gets the same blocks in every process).
  void reset_prefix_cache();

  // seq_ids: [B]. Width of block_table(): the largest block count among them.
  int64_t max_blocks(const int64_t* seq_ids, int64_t B) const;
  // seq_ids: [B]; out: [B, width] int32 block ids, row-major, padded with -1 (width >= max_blocks).
  void block_table(const int64_t* seq_ids, int64_t B, int64_t width, int32_t* out) const;
  // seq_ids, starts: [B] (starts in tokens). Returns [sum(L_i - starts_i)] int64 slots of positions
  // starts[i] .. L_i - 1 of each sequence, concatenated in order.
  std::vector<int64_t> slot_mapping(const int64_t* seq_ids, const int64_t* starts, int64_t B) const;
  // seq_ids: [B]; out: [B] int32 sequence lengths L_i (tokens).
  void context_lens(const int64_t* seq_ids, int64_t B, int32_t* out) const;

  int64_t num_tokens(int64_t seq_id) const { return get(seq_id).num_tokens; }
  const std::vector<int32_t>& blocks_of(int64_t seq_id) const { return get(seq_id).blocks; }
  int64_t ref_count(int64_t block) const;
  bool has(int64_t seq_id) const { return seqs_.count(seq_id) != 0; }

 private:
  struct Seq {
    std::vector<int32_t> blocks;   // [ceil(L / block_size)] block table
    std::vector<uint64_t> hashes;  // [L / block_size] chained hashes of the full blocks
    std::vector<int64_t> tail;     // [L % block_size] token ids of the partial last block
    int64_t num_tokens = 0;        // L
  };

  const Seq& get(int64_t seq_id) const;
  Seq& get(int64_t seq_id);
  int32_t take_free();            // front of the pool; drops the block's cache entry; ref = 1
  void push_free(int32_t b);      // back of the pool
  void unlink_free(int32_t b);    // a cache hit takes b out of the middle of the pool
  void register_block(int32_t b, uint64_t h, const int64_t* tokens);

  int64_t num_blocks_, block_size_;
  std::vector<int32_t> ref_;                        // [num_blocks] reference counts
  std::vector<uint8_t> has_hash_;                   // [num_blocks] block holds a registered full prefix
  std::vector<uint64_t> hash_;                      // [num_blocks] its chained hash
  std::vector<std::vector<int64_t>> block_tokens_;  // [num_blocks][block_size] its token ids
  std::unordered_map<uint64_t, int32_t> cache_;     // chained hash -> block
  // FIFO free pool as an intrusive doubly-linked list over block ids (-1 = none): O(1) removal on hits.
  std::vector<int32_t> prev_, next_;                // [num_blocks]
  int32_t head_ = -1, tail_ = -1;
  int64_t num_free_ = 0;
  std::unordered_map<int64_t, Seq> seqs_;
};

}  // namespace fastrft
