"""CPU benchmark of the rollout bookkeeping: the C++ scheduler + block manager (fastrft._engine) against
their pure-Python twins, on an identical trace.

    python bench/bench_scheduler.py [--seqs 256] [--steps 500]

Workload: ``--seqs`` live sequences (prompts of 100-1024 tokens, block size 16, enough KV blocks for no
preemption) are prefilled first; then each timed step is the engine's bookkeeping only: schedule(), the
sampled tokens recorded (one append_token() per scheduled sequence, or one append_tokens() call with the
sampler's array), and every 8th step one sequence finishes and a new request takes its place (so its
prefill step is in the trace too). No model runs. Reported: per-step median time, the medians
of its two parts, and the C++ speed-up. Both implementations must produce the same schedule (checked).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from harness import measure, report  # noqa: E402

from fastrft.engine.bookkeeping import make_block_manager, make_scheduler  # noqa: E402

BLOCK_SIZE = 16
VOCAB = 32000


class Trace:
    """One implementation driven through the shared, seeded request stream."""

    def __init__(self, impl: str, seqs: int, steps: int, batched: bool, seed: int = 0):
        self.batched = batched
        rng = np.random.default_rng(seed)
        # Prompts for the initial batch plus one replacement per 8 steps; sampled tokens per step.
        n_prompts = seqs + steps // 8 + 8
        self.prompts = [rng.integers(0, VOCAB, rng.integers(100, 1025)).tolist() for _ in range(n_prompts)]
        sampled = rng.integers(0, VOCAB, (steps + 64, seqs + 1))
        self.sampled = list(sampled) if batched else sampled.tolist()  # rows of int64 arrays or of ints
        num_blocks = (seqs + 8) * (1024 + steps + 64) // BLOCK_SIZE + 64
        self.bm = make_block_manager(num_blocks, BLOCK_SIZE, impl=impl)
        self.sched = make_scheduler(self.bm, max_num_seqs=seqs, max_num_batched_tokens=1 << 22, impl=impl)
        self.next_prompt, self.step_no = 0, 0
        self.t_schedule: list[float] = []
        self.t_append: list[float] = []
        self.digest = hashlib.sha256()
        for _ in range(seqs):
            self._add()
        self.step()  # the prefill of all of them (not timed: setup)
        assert self.sched.num_running == seqs
        self.t_schedule.clear()
        self.t_append.clear()

    def _add(self) -> None:
        self.sched.add(self.next_prompt, self.prompts[self.next_prompt])
        self.next_prompt += 1

    def step(self) -> int:
        sched, toks = self.sched, self.sampled[self.step_no]
        t0 = time.perf_counter()
        out = sched.schedule()
        t1 = time.perf_counter()
        if self.batched:  # one call with the sampler's token array
            n = len(out.seq_ids)
            sched.append_tokens(out.seq_ids, toks[:n])
        else:
            for i, sid in enumerate(out.seq_ids.tolist()):
                sched.append_token(sid, toks[i])
            n = len(out.seq_ids)
        t2 = time.perf_counter()
        self.t_schedule.append(t1 - t0)
        self.t_append.append(t2 - t1)
        if self.step_no % 8 == 7:  # keep the batch full: one finishes, one arrives
            running = sched.running_ids()
            sched.finish(int(running[self.step_no % len(running)]))
            self._add()
        self.step_no += 1
        self.digest.update(out.kind.encode())
        for arr in (out.seq_ids, out.slots, out.slot_mapping, out.copies, out.preempted):
            self.digest.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
        return n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=256, help="live sequences in decode")
    ap.add_argument("--steps", type=int, default=500, help="timed steps per implementation")
    args = ap.parse_args()
    warmup = 16
    results, digests = [], set()
    for batched in (False, True):
        record = "append_tokens (1 call)" if batched else f"{args.seqs} x append_token"
        pair = []
        for impl, label in (("cpp", "C++ fastrft._engine"), ("python", "Python twin")):
            tr = Trace(impl, args.seqs, warmup + args.steps, batched)
            r = measure("scheduler", f"{label}: schedule + {record}", tr.step, repeats=args.steps, warmup=warmup,
                        unit="seq-steps/s", shape={"seqs": args.seqs, "block_size": BLOCK_SIZE, "batched": batched})
            r.extra["schedule() us"] = statistics.median(tr.t_schedule[warmup:]) * 1e6
            r.extra["record tokens us"] = statistics.median(tr.t_append[warmup:]) * 1e6
            digests.add(tr.digest.digest())
            pair.append(r)
        cpp, py = pair
        cpp.extra["speed-up"] = f"{py.median_s / cpp.median_s:.1f}x"
        cpp.extra["schedule() speed-up"] = f"{py.extra['schedule() us'] / cpp.extra['schedule() us']:.1f}x"
        results += pair
    if len(digests) != 1:
        raise SystemExit("the implementations scheduled differently: run tests/engine/test_bookkeeping.py")
    report(results, f"Scheduler bookkeeping per step ({args.seqs} live sequences, block size {BLOCK_SIZE}, CPU, "
           "no model; identical traces)", columns=("schedule() us", "record tokens us", "speed-up",
                                                   "schedule() speed-up"))


if __name__ == "__main__":
    main()
