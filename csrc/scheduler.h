// Continuous-batching scheduler: FCFS admission with prefill priority, decode of every running sequence,
// recompute preemption of the newest sequence when blocks run out.
//
// Pure C++17 over a BlockManager it does not own (the caller keeps it alive). The Python twin
// fastrft/engine/scheduler.py is its executable spec (same outputs, same error messages); read its module
// docstring for the policy. Errors: std::invalid_argument (ValueError) for bad arguments and unknown or
// duplicate ids, std::runtime_error (RuntimeError) for a broken step protocol.
#pragma once

#include <cstdint>
#include <deque>
#include <string>
#include <unordered_map>
#include <vector>

#include "block_manager.h"

namespace fastrft {

// One step. kind: "prefill", "decode" or "idle"; fields a kind does not use are empty.
struct ScheduleOutput {
  std::string kind;
  std::vector<int64_t> seq_ids;       // [B] sequences of the step, in batch order
  std::vector<int32_t> starts;        // [B] prefill: prefix-cached tokens of each sequence
  std::vector<int32_t> lens;          // [B] prefill: total tokens of each sequence
  std::vector<int64_t> slot_mapping;  // [sum(lens - starts)] prefill: KV slots of positions starts..lens-1
  std::vector<int64_t> slots;         // [B] decode: KV slot of the token each sequence computes
  std::vector<int64_t> copies;        // [C * 2] decode: (src, dst) block pairs, row-major, copied first
  std::vector<int64_t> preempted;     // [P] sequences sent back to the waiting queue by this call
};

class Scheduler {
 public:
  Scheduler(BlockManager& bm, int64_t max_num_seqs, int64_t max_num_batched_tokens);

  // tokens: [n] token ids of the request; group_size: running slots it occupies once forked.
  void add(int64_t seq_id, const int64_t* tokens, int64_t n, int64_t group_size);
  ScheduleOutput schedule();
  void fork(int64_t parent_id, int64_t child_id);
  void append_token(int64_t seq_id, int64_t token);
  // seq_ids, tokens: [B]; all are checked before any is appended.
  void append_tokens(const int64_t* seq_ids, const int64_t* tokens, int64_t B);
  void finish(int64_t seq_id);

  BlockManager& block_manager() { return bm_; }
  int64_t num_waiting() const { return static_cast<int64_t>(waiting_.size()); }
  int64_t num_running() const { return static_cast<int64_t>(running_.size()); }
  const std::vector<int64_t>& tokens(int64_t seq_id) const { return get(seq_id).tokens; }  // [L] token ids
  const char* status(int64_t seq_id) const { return get(seq_id).running ? "running" : "waiting"; }
  const std::vector<int64_t>& running_ids() const { return running_; }  // [R] oldest first
  std::vector<int64_t> waiting_ids() const { return {waiting_.begin(), waiting_.end()}; }  // [W] front first

 private:
  struct Req {
    std::vector<int64_t> tokens;  // [L] prompt + generated token ids
    bool running = false;
    int64_t group_size = 1;       // running slots it stands for; counts down as it is forked
    int64_t group = 0;            // shared by a request and its forks: forks are inserted side by side
  };

  const Req& get(int64_t seq_id) const;
  Req& get(int64_t seq_id);
  bool prefill(ScheduleOutput& out);
  void decode(ScheduleOutput& out);
  void preempt_newest();

  BlockManager& bm_;
  int64_t max_num_seqs_, max_num_batched_tokens_;
  std::unordered_map<int64_t, Req> reqs_;
  std::deque<int64_t> waiting_;
  std::vector<int64_t> running_;  // oldest first
  int64_t running_slots_ = 0;     // sum of group_size over running
  int64_t next_group_ = 0;
};

}  // namespace fastrft
