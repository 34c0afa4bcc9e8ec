// Continuous-batching scheduler: see scheduler.h and the Python twin fastrft/engine/scheduler.py.
#include "scheduler.h"

#include <algorithm>
#include <stdexcept>

namespace fastrft {

namespace {
inline std::string str(int64_t v) { return std::to_string(v); }
}  // namespace

Scheduler::Scheduler(BlockManager& bm, int64_t max_num_seqs, int64_t max_num_batched_tokens)
    : bm_(bm), max_num_seqs_(max_num_seqs), max_num_batched_tokens_(max_num_batched_tokens) {
  if (max_num_seqs < 1) throw std::invalid_argument("max_num_seqs must be >= 1, got " + str(max_num_seqs));
  if (max_num_batched_tokens < 1)
    throw std::invalid_argument("max_num_batched_tokens must be >= 1, got " + str(max_num_batched_tokens));
}

const Scheduler::Req& Scheduler::get(int64_t seq_id) const {
  auto it = reqs_.find(seq_id);
  if (it == reqs_.end()) throw std::invalid_argument("unknown sequence " + str(seq_id));
  return it->second;
}

Scheduler::Req& Scheduler::get(int64_t seq_id) {
  return const_cast<Req&>(static_cast<const Scheduler*>(this)->get(seq_id));
}

// ------------------------------------------------------------------------------------------ requests

void Scheduler::add(int64_t seq_id, const int64_t* tokens, int64_t n, int64_t group_size) {
  const std::string id = str(seq_id);
  if (n == 0) throw std::invalid_argument("request " + id + ": token_ids is empty");
  if (reqs_.count(seq_id)) throw std::invalid_argument("request " + id + " already exists");
  if (group_size < 1)
    throw std::invalid_argument("request " + id + ": group_size must be >= 1, got " + str(group_size));
  if (n > max_num_batched_tokens_)
    throw std::invalid_argument("request " + id + " has " + str(n) + " tokens > max_num_batched_tokens=" +
                                str(max_num_batched_tokens_) + ": it can never be prefilled");
  const int64_t need = (n + bm_.block_size() - 1) / bm_.block_size();
  if (need > bm_.num_blocks())
    throw std::invalid_argument("request " + id + " needs " + str(need) + " KV blocks > num_blocks=" +
                                str(bm_.num_blocks()) + ": it is longer than the whole KV cache");
  if (group_size > max_num_seqs_)
    throw std::invalid_argument("request " + id + ": group_size " + str(group_size) + " > max_num_seqs=" +
                                str(max_num_seqs_));
  Req req;
  req.tokens.assign(tokens, tokens + n);
  req.group_size = group_size;
  req.group = next_group_++;
  reqs_.emplace(seq_id, std::move(req));
  waiting_.push_back(seq_id);
}

void Scheduler::fork(int64_t parent_id, int64_t child_id) {
  Req& parent = get(parent_id);
  if (!parent.running) throw std::invalid_argument("sequence " + str(parent_id) + " is not running");
  if (reqs_.count(child_id)) throw std::invalid_argument("sequence " + str(child_id) + " already exists");
  bm_.fork(parent_id, child_id);
  Req child;
  child.tokens = parent.tokens;
  child.running = true;
  child.group = parent.group;
  if (parent.group_size > 1) --parent.group_size; else ++running_slots_;  // the slot passes to the child
  const int64_t group = parent.group;
  reqs_.emplace(child_id, std::move(child));  // invalidates `parent`
  auto pos = std::find(running_.begin(), running_.end(), parent_id) + 1;
  while (pos != running_.end() && reqs_.find(*pos)->second.group == group) ++pos;
  running_.insert(pos, child_id);
}

void Scheduler::append_token(int64_t seq_id, int64_t token) {
  Req& req = get(seq_id);
  if (!req.running) throw std::invalid_argument("sequence " + str(seq_id) + " is not running");
  req.tokens.push_back(token);
}

void Scheduler::append_tokens(const int64_t* seq_ids, const int64_t* tokens, int64_t B) {
  std::vector<Req*> reqs(B);
  for (int64_t i = 0; i < B; ++i) reqs[i] = &get(seq_ids[i]);
  for (int64_t i = 0; i < B; ++i)
    if (!reqs[i]->running) throw std::invalid_argument("sequence " + str(seq_ids[i]) + " is not running");
  for (int64_t i = 0; i < B; ++i) reqs[i]->tokens.push_back(tokens[i]);
}

void Scheduler::finish(int64_t seq_id) {
  const Req& req = get(seq_id);
  if (req.running) {
    bm_.free(seq_id);
    running_.erase(std::find(running_.begin(), running_.end(), seq_id));
    running_slots_ -= req.group_size;
  } else {
    waiting_.erase(std::find(waiting_.begin(), waiting_.end(), seq_id));
  }
  reqs_.erase(seq_id);
}

// ------------------------------------------------------------------------------------------ the step

ScheduleOutput Scheduler::schedule() {
  ScheduleOutput out;
  if (!prefill(out)) decode(out);
  return out;
}

bool Scheduler::prefill(ScheduleOutput& out) {
  int64_t budget = 0;
  std::vector<int64_t> starts;
  while (!waiting_.empty()) {
    const int64_t sid = waiting_.front();
    Req& req = reqs_.find(sid)->second;
    const int64_t n = static_cast<int64_t>(req.tokens.size());
    if (n > max_num_batched_tokens_ || (n + bm_.block_size() - 1) / bm_.block_size() > bm_.num_blocks()) {
      if (!out.seq_ids.empty()) break;
      // Only a preempted sequence that grew gets here; it would block the queue forever.
      throw std::runtime_error("sequence " + str(sid) + " (" + str(n) + " tokens) can never be prefilled again: " +
                               "max_num_batched_tokens=" + str(max_num_batched_tokens_) + ", KV cache " +
                               str(bm_.num_blocks()) + " blocks x " + str(bm_.block_size()) +
                               " tokens; cap prompt + max_new_tokens below both");
    }
    if (running_slots_ + req.group_size > max_num_seqs_ || budget + n > max_num_batched_tokens_ ||
        !bm_.can_allocate(n))
      break;
    waiting_.pop_front();
    const int64_t cached = bm_.allocate(sid, req.tokens.data(), n);
    req.running = true;
    running_.push_back(sid);
    running_slots_ += req.group_size;
    out.seq_ids.push_back(sid);
    starts.push_back(cached);
    out.starts.push_back(static_cast<int32_t>(cached));
    out.lens.push_back(static_cast<int32_t>(n));
    budget += n;
  }
  if (out.seq_ids.empty()) return false;
  out.kind = "prefill";
  out.slot_mapping = bm_.slot_mapping(out.seq_ids.data(), starts.data(), static_cast<int64_t>(starts.size()));
  return true;
}

void Scheduler::decode(ScheduleOutput& out) {
  for (int64_t sid : running_) {  // checked up front so that a caller's mistake leaves no half-done step
    const int64_t have = static_cast<int64_t>(reqs_.find(sid)->second.tokens.size()), cached = bm_.num_tokens(sid);
    if (have != cached + 1)
      throw std::runtime_error("sequence " + str(sid) + " has " + str(have) + " tokens for " + str(cached) +
                               " in the KV cache: call append_token once per sequence after each step");
  }
  out.seq_ids.reserve(running_.size());
  out.slots.reserve(running_.size());
  for (size_t i = 0; i < running_.size(); ++i) {
    const int64_t sid = running_[i];
    while (!bm_.can_append(sid)) {
      const int64_t victim = running_.back();
      preempt_newest();
      out.preempted.push_back(victim);
      if (victim == sid) break;
    }
    if (i >= running_.size()) break;  // sid itself was preempted (it was the newest)
    const AppendResult r = bm_.append(sid, reqs_.find(sid)->second.tokens.back());
    out.seq_ids.push_back(sid);
    out.slots.push_back(r.slot);
    if (r.copy_src >= 0) {
      out.copies.push_back(r.copy_src);
      out.copies.push_back(r.copy_dst);
    }
  }
  out.kind = out.seq_ids.empty() ? "idle" : "decode";
}

void Scheduler::preempt_newest() {
  const int64_t sid = running_.back();
  Req& req = reqs_.find(sid)->second;
  bm_.free(sid);
  running_.pop_back();
  running_slots_ -= req.group_size;
  req.running = false;
  req.group_size = 1;
  req.group = next_group_++;
  waiting_.push_front(sid);
}

}  // namespace fastrft
