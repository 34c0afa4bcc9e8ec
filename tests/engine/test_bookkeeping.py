"""Tests for the paged KV block manager and the continuous-batching scheduler (fastrft.engine.bookkeeping).

Hand-written cases run on both implementations, with expected values worked out in the comments. Random
traces then drive the Python twins (the executable spec) and the C++ classes with identical operations and
compare every observable after every operation. The C++ module is required on Linux (CI builds it): when
it is missing the C++ tests fail, they do not skip.
"""

from __future__ import annotations

import gc
import random
import sys

import numpy as np
import pytest

from fastrft.engine import bookkeeping
from fastrft.engine.block_manager import PyBlockManager, chain_hash
from fastrft.engine.bookkeeping import make_block_manager, make_scheduler
from fastrft.engine.scheduler import PyScheduler


def cpp_engine():
    try:
        from fastrft import _engine
    except ImportError as e:
        if sys.platform.startswith("linux"):
            pytest.fail(f"the C++ extension fastrft._engine is not built ({e}); run `pip install -e .`")
        pytest.skip(f"fastrft._engine not built on {sys.platform}")
    return _engine


@pytest.fixture(params=["python", "cpp"])
def impl(request) -> str:
    if request.param == "cpp":
        cpp_engine()
    return request.param


def new_bm(impl: str, num_blocks: int, block_size: int):
    return PyBlockManager(num_blocks, block_size) if impl == "python" else cpp_engine().BlockManager(num_blocks,
                                                                                                      block_size)


def new_sched(impl: str, num_blocks: int, block_size: int, max_seqs: int, max_tokens: int):
    bm = new_bm(impl, num_blocks, block_size)
    return (PyScheduler if impl == "python" else cpp_engine().Scheduler)(bm, max_seqs, max_tokens)


def refs(bm) -> list[int]:
    return [bm.ref_count(b) for b in range(bm.num_blocks)]


# ------------------------------------------------------------------------------------------ chain_hash


def test_chain_hash_literals_and_twins():
    # chain_hash(0, []) = splitmix64's first output for seed 0, the published 0xE220A8397B1DCDAF.
    assert chain_hash(0, []) == 0xE220A8397B1DCDAF
    # Computed once with numpy uint64 wrap-around arithmetic, independently of the code under test.
    assert chain_hash(0, [1, 2, 3]) == 1470200354583225620
    # Only the low 32 bits of a token are hashed.
    assert chain_hash(0, [7, 2**32 + 7]) == 10767445898065338970
    eng = cpp_engine()
    rng = np.random.default_rng(0)
    for prev in [0, 1, 2**63, 2**64 - 1, 2**64 + 5, -1]:
        for n in [0, 1, 16, 257]:
            toks = rng.integers(-2**40, 2**40, n)
            assert eng.chain_hash(prev, toks) == chain_hash(prev, toks) == chain_hash(prev, toks.tolist())
    assert eng.chain_hash(0, np.array([1, 2, 3], dtype=np.int32)) == 1470200354583225620


# ------------------------------------------------------------------------------------------ block manager


def test_fork_and_copy_on_write(impl):
    bm = new_bm(impl, 8, 4)
    assert bm.allocate(1, list(range(6))) == 0          # L=6: block 0 full, block 1 holds tokens 4, 5
    assert bm.blocks_of(1) == [0, 1] and bm.num_free_blocks == 6
    bm.fork(1, 2)
    assert refs(bm)[:3] == [2, 2, 0] and bm.num_tokens(2) == 6
    assert bm.can_append(2)
    # seq 2 writes position 6 into the shared partial block 1: copy it to the pool's front block 2.
    assert bm.append(2, 100) == (2 * 4 + 2, (1, 2))
    assert bm.blocks_of(2) == [0, 2] and refs(bm)[:3] == [2, 1, 1]
    assert bm.append(1, 200) == (1 * 4 + 2, None)      # block 1 is now seq 1's alone: no copy
    assert bm.append(2, 101) == (11, None)             # position 7 fills block 2
    assert bm.append(2, 102) == (12, None)             # position 8 opens block 3
    table = bm.block_table([1, 2])
    assert table.dtype == np.int32 and table.tolist() == [[0, 1, -1], [0, 2, 3]]
    assert bm.context_lens([2, 1]).tolist() == [9, 7] and bm.context_lens([1]).dtype == np.int32
    sm = bm.slot_mapping([1, 2], [5, 6])               # seq 1 positions 5, 6; seq 2 positions 6, 7, 8
    assert sm.dtype == np.int64 and sm.tolist() == [5, 6, 10, 11, 12]
    assert bm.slot_mapping(np.array([2]), np.array([9], dtype=np.int32)).tolist() == []
    assert bm.block_table([]).shape == (0, 0)
    bm.free(2)
    assert refs(bm)[:4] == [1, 1, 0, 0] and bm.num_free_blocks == 6 and not bm.has(2)


def test_block_size_one_and_fork_of_full_block(impl):
    bm = new_bm(impl, 6, 1)
    bm.allocate(7, [5, 6])
    bm.fork(7, 8)
    # Every block is full with block size 1: appends take fresh blocks, never copies.
    assert bm.append(8, 1) == (2, None) and bm.append(7, 1) == (3, None)
    assert bm.block_table([7, 8]).tolist() == [[0, 1, 3], [0, 1, 2]]


def test_prefix_cache_hit_shares_blocks(impl):
    bm = new_bm(impl, 16, 4)
    prompt = list(range(10))                           # blocks [0..3], [4..7], [8, 9]
    assert bm.allocate(1, prompt) == 0
    assert bm.blocks_of(1) == [0, 1, 2]
    # Blocks 0 and 1 are full and do not hold the last token: both are reused.
    assert bm.allocate(2, np.array(prompt, dtype=np.int32)) == 8
    assert bm.blocks_of(2) == [0, 1, 3] and refs(bm)[:4] == [2, 2, 1, 1] and bm.num_free_blocks == 12
    other = prompt[:5] + [99] + prompt[6:]             # differs inside block 1: only block 0 matches
    assert bm.allocate(3, other) == 4
    assert bm.blocks_of(3) == [0, 4, 5] and bm.ref_count(0) == 3
    assert bm.allocate(4, [42] + prompt[1:]) == 0      # a different first block: no reuse at all
    assert bm.blocks_of(4) == [6, 7, 8]


def test_block_of_the_last_token_is_never_cached(impl):
    bm = new_bm(impl, 16, 4)
    eight = list(range(8))                             # two full blocks; block 1 holds the last token
    assert bm.allocate(1, eight) == 0
    assert bm.allocate(2, eight) == 4 and bm.blocks_of(2) == [0, 2]
    assert bm.allocate(3, eight[:4]) == 0 and bm.blocks_of(3) == [3]
    # Full last blocks are still registered, each fresh registration taking over the hash: a longer
    # prompt reuses block 3 (seq 3's copy of tokens 0..3) and block 2 (seq 2's copy of tokens 4..7).
    assert bm.allocate(4, eight + [8]) == 8 and bm.blocks_of(4) == [3, 2, 4]
    assert refs(bm)[:5] == [2, 1, 2, 2, 1]


def test_cached_block_is_evicted_when_the_pool_hands_it_out(impl):
    bm = new_bm(impl, 4, 4)
    a = list(range(9))
    bm.allocate(1, a)                                  # blocks [0, 1, 2]; 0 and 1 cached
    bm.free(1)                                         # pool: [3, 2, 1, 0] (freed last block first)
    assert bm.num_free_blocks == 4
    bm.allocate(2, list(range(100, 109)))              # fresh 3, 2, 1: block 1 forgets prefix a[4:8]
    assert bm.blocks_of(2) == [3, 2, 1]
    bm.free(2)                                         # pool: [0, 1, 2, 3]
    assert bm.allocate(3, a) == 4                      # block 0 still matches, block 1 no longer
    assert bm.blocks_of(3) == [0, 1, 2] and refs(bm) == [1, 1, 1, 0] and bm.num_free_blocks == 1


def test_reset_prefix_cache_stops_hits(impl):
    bm = new_bm(impl, 16, 4)
    a = list(range(9))
    bm.allocate(1, a)                                  # blocks [0, 1, 2]
    bm.reset_prefix_cache()
    assert bm.allocate(2, a) == 0 and bm.blocks_of(2) == [3, 4, 5]
    assert bm.allocate(3, a) == 8 and bm.blocks_of(3)[:2] == [3, 4]  # new registrations work again
    # Seq 1 still works and hashes its next full block from its own chain: [8, 9, 10, 11] after a[:8].
    for t in (9, 10, 11):
        bm.append(1, t)
    assert bm.allocate(4, list(range(13))) == 12
    assert bm.blocks_of(4) == [3, 4, 2, 7]


@pytest.mark.parametrize(("call", "exc", "match"), [
    (lambda m: m(8, 3), ValueError, "block_size must be a power of two >= 1, got 3"),
    (lambda m: m(8, 0), ValueError, "block_size must be a power of two"),
    (lambda m: m(0, 4), ValueError, r"num_blocks must be in \[1, 2\*\*31 - 1\], got 0"),
])
def test_constructor_errors(impl, call, exc, match):
    cls = PyBlockManager if impl == "python" else cpp_engine().BlockManager
    with pytest.raises(exc, match=match):
        call(cls)


@pytest.mark.parametrize(("op", "exc", "match"), [
    (lambda bm: bm.allocate(1, [1, 2]), ValueError, "sequence 1 is already allocated"),
    (lambda bm: bm.allocate(5, []), ValueError, "sequence 5: token_ids is empty"),
    (lambda bm: bm.allocate(5, list(range(13))), RuntimeError, "out of KV blocks: sequence 5 needs 4 blocks, 2 free"),
    (lambda bm: bm.fork(9, 5), ValueError, "unknown sequence 9"),
    (lambda bm: bm.fork(1, 2), ValueError, "sequence 2 is already allocated"),
    (lambda bm: bm.append(9, 0), ValueError, "unknown sequence 9"),
    (lambda bm: bm.can_append(9), ValueError, "unknown sequence 9"),
    (lambda bm: bm.free(9), ValueError, "unknown sequence 9"),
    (lambda bm: bm.block_table([1, 9]), ValueError, "unknown sequence 9"),
    (lambda bm: bm.num_tokens(-3), ValueError, "unknown sequence -3"),
    (lambda bm: bm.ref_count(4), ValueError, r"block 4 out of range \[0, 4\)"),
    (lambda bm: bm.slot_mapping([1, 2], [0]), ValueError, "seq_ids and starts differ in length: 2 vs 1"),
    (lambda bm: bm.slot_mapping([1], [9]), ValueError, r"start 9 out of range \[0, 8\] for sequence 1"),
    (lambda bm: bm.can_allocate(-1), ValueError, "num_tokens must be >= 0"),
])
def test_block_manager_errors(impl, op, exc, match):
    bm = new_bm(impl, 4, 4)
    bm.allocate(1, list(range(8)))
    bm.fork(1, 2)
    with pytest.raises(exc, match=match):
        op(bm)


def test_append_out_of_blocks(impl):
    bm = new_bm(impl, 2, 2)
    bm.allocate(1, [1, 2, 3])
    bm.fork(1, 2)
    assert bm.num_free_blocks == 0 and not bm.can_append(2)   # CoW of the shared partial block needs one
    with pytest.raises(RuntimeError, match="out of KV blocks: sequence 2 needs 1 block to append, 0 free"):
        bm.append(2, 4)
    bm.free(1)
    assert bm.can_append(2) and bm.append(2, 4) == (3, None)   # no longer shared: written in place
    assert not bm.can_append(2)                                # full: the next token needs a block


# ------------------------------------------------------------------------------------------ factory


def test_factory_picks_and_refuses_mixing(monkeypatch):
    eng = cpp_engine()
    assert isinstance(make_block_manager(8, 4), eng.BlockManager)
    py_bm, c_bm = make_block_manager(8, 4, impl="python"), make_block_manager(8, 4, impl="cpp")
    assert isinstance(py_bm, PyBlockManager) and isinstance(c_bm, eng.BlockManager)
    assert isinstance(make_scheduler(py_bm, 4, 64), PyScheduler)
    assert isinstance(make_scheduler(c_bm, 4, 64, impl="cpp"), eng.Scheduler)
    with pytest.raises(ValueError, match="cannot mix"):
        make_scheduler(py_bm, 4, 64, impl="cpp")
    with pytest.raises(ValueError, match="cannot mix"):
        make_scheduler(c_bm, 4, 64, impl="python")
    with pytest.raises(ValueError, match="impl must be one of"):
        make_block_manager(8, 4, impl="rust")
    monkeypatch.setattr(bookkeeping, "_engine_module", lambda: None)  # as if the extension were not built
    with pytest.raises(ImportError, match="not built"):
        make_block_manager(8, 4, impl="cpp")
    bookkeeping._warn_fallback.cache_clear()
    with pytest.warns(RuntimeWarning, match="pure-Python twins") as record:
        assert isinstance(make_block_manager(8, 4), PyBlockManager)
        make_block_manager(8, 4)
    assert len(record) == 1


# ------------------------------------------------------------------------------------------ scheduler


def test_scheduler_prefill_fork_decode(impl):
    s = new_sched(impl, 16, 4, 4, 64)
    s.add(1, list(range(6)), group_size=3)
    s.add(2, list(range(50, 55)), group_size=2)
    out = s.schedule()                                 # 3 + 2 slots > 4: FCFS stops after request 1
    assert out.kind == "prefill" and out.seq_ids.tolist() == [1]
    assert out.starts.tolist() == [0] and out.lens.tolist() == [6] and out.slot_mapping.tolist() == list(range(6))
    assert out.seq_ids.dtype == np.int64 and out.starts.dtype == np.int32 and out.lens.dtype == np.int32
    assert s.num_waiting == 1 and s.status(2) == "waiting" and s.status(1) == "running"
    s.fork(1, 10)
    s.fork(1, 11)
    assert s.running_ids().tolist() == [1, 10, 11] and s.tokens(11) == list(range(6))
    for sid, tok in [(1, 7), (10, 8), (11, 9)]:
        s.append_token(sid, tok)
    out = s.schedule()                                 # still 3 + 2 > 4 slots: decode
    assert out.kind == "decode" and out.seq_ids.tolist() == [1, 10, 11]
    # Position 6 lies in block 1, shared three ways: seq 1 copies it to block 2, seq 10 to block 3, and
    # seq 11, the last holder, writes in place.
    assert out.slots.tolist() == [2 * 4 + 2, 3 * 4 + 2, 1 * 4 + 2]
    assert out.copies.tolist() == [[1, 2], [1, 3]] and out.copies.dtype == np.int64
    assert out.preempted.tolist() == [] and out.slot_mapping.tolist() == []
    s.finish(10)
    s.finish(2)                                        # waiting requests can be dropped too
    assert s.running_ids().tolist() == [1, 11] and s.waiting_ids().tolist() == []
    with pytest.raises(ValueError, match="unknown sequence 2"):
        s.status(2)
    s.append_tokens(np.array([1, 11]), np.array([3, 4], dtype=np.int32))
    slots = s.schedule().slots                         # the array outlives its ScheduleOutput
    gc.collect()
    # Position 7: seq 1 in its copy, block 2 (slot 11); seq 11 in block 1 (slot 7).
    assert slots.tolist() == [11, 7] and s.tokens(11) == [0, 1, 2, 3, 4, 5, 9, 4]


def test_scheduler_forks_stay_consecutive_and_count_slots(impl):
    s = new_sched(impl, 64, 4, 5, 64)
    s.add(1, [1, 2, 3], group_size=2)
    s.add(2, [4, 5, 6])
    s.add(3, [7, 8, 9])
    assert s.schedule().seq_ids.tolist() == [1, 2, 3]  # 2 + 1 + 1 = 4 slots
    s.fork(1, 10)                                      # the group's slot passes to the child
    s.fork(1, 11)                                      # group size exhausted: one more slot
    assert s.running_ids().tolist() == [1, 10, 11, 2, 3]
    s.add(4, [1])
    for sid in (1, 10, 11, 2, 3):
        s.append_token(sid, 0)
    assert s.schedule().kind == "decode"               # 5 slots in use, 5 + 1 > 5: request 4 must wait
    s.finish(11)
    s.finish(2)
    for sid in (1, 10, 3):
        s.append_token(sid, 0)
    assert s.schedule().seq_ids.tolist() == [4]


def test_scheduler_preempts_newest_and_readmits_full_tokens(impl):
    s = new_sched(impl, 4, 2, 4, 16)
    s.add(1, [1, 2, 3])                                # 2 blocks each
    s.add(2, [4, 5, 6])
    assert s.schedule().seq_ids.tolist() == [1, 2]
    s.append_token(1, 7)
    s.append_token(2, 8)
    out = s.schedule()                                 # both fill their second block in place
    assert out.kind == "decode" and out.slots.tolist() == [3, 7]
    s.append_token(1, 9)
    s.append_token(2, 10)
    out = s.schedule()                                 # seq 1 needs a third block: seq 2 (newest) goes
    assert out.kind == "decode" and out.seq_ids.tolist() == [1] and out.preempted.tolist() == [2]
    assert s.waiting_ids().tolist() == [2] and s.status(2) == "waiting"
    assert s.tokens(2) == [4, 5, 6, 8, 10]
    s.finish(1)
    out = s.schedule()
    assert out.kind == "prefill" and out.seq_ids.tolist() == [2] and out.lens.tolist() == [5]


def test_scheduler_errors(impl):
    s = new_sched(impl, 8, 4, 4, 20)
    with pytest.raises(ValueError, match="request 1: token_ids is empty"):
        s.add(1, [])
    s.add(1, [1, 2])
    with pytest.raises(ValueError, match="request 1 already exists"):
        s.add(1, [1])
    with pytest.raises(ValueError, match="group_size must be >= 1, got 0"):
        s.add(2, [1], group_size=0)
    with pytest.raises(ValueError, match="has 21 tokens > max_num_batched_tokens=20: it can never be prefilled"):
        s.add(2, [0] * 21)
    s2 = new_sched(impl, 2, 4, 4, 64)
    with pytest.raises(ValueError, match="needs 3 KV blocks > num_blocks=2: it is longer than the whole KV cache"):
        s2.add(2, [0] * 9)
    with pytest.raises(ValueError, match="group_size 5 > max_num_seqs=4"):
        s.add(2, [1], group_size=5)
    with pytest.raises(ValueError, match="sequence 1 is not running"):
        s.fork(1, 3)
    with pytest.raises(ValueError, match="unknown sequence 7"):
        s.finish(7)
    s.add(3, [5, 6])
    s.schedule()                                       # prefills 1 and 3
    s.add(4, [7])
    with pytest.raises(ValueError, match="sequence 4 is not running"):
        s.append_token(4, 0)
    with pytest.raises(ValueError, match="seq_ids and token_ids differ in length: 2 vs 1"):
        s.append_tokens([1, 3], [0])
    with pytest.raises(ValueError, match="sequence 4 is not running"):
        s.append_tokens([3, 4], [0, 0])               # checked first: seq 3 got nothing either
    assert s.tokens(3) == [5, 6]
    s.finish(3)
    s.finish(4)
    with pytest.raises(ValueError, match="sequence 1 already exists"):
        s.fork(1, 1)
    with pytest.raises(RuntimeError, match="call append_token once per sequence after each step"):
        s.schedule()                                   # no token was sampled for seq 1
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1"):
        new_sched(impl, 8, 4, 0, 20)


def test_scheduler_refuses_a_sequence_that_outgrew_the_cache(impl):
    s = new_sched(impl, 2, 1, 2, 8)
    s.add(1, [1, 2])
    s.schedule()
    s.append_token(1, 3)
    out = s.schedule()                                 # no block for position 2: preempts itself
    assert out.kind == "idle" and out.preempted.tolist() == [1] and out.seq_ids.tolist() == []
    with pytest.raises(RuntimeError, match=r"sequence 1 \(3 tokens\) can never be prefilled again"):
        s.schedule()


# ------------------------------------------------------------------------------------------ random traces


def outcome(fn):
    """(value, None) or (None, (exception type, message)): compared between the twins."""
    try:
        value = fn()
    except (ValueError, RuntimeError) as e:
        return None, (type(e), str(e))
    if isinstance(value, np.ndarray):
        value = (value.dtype.str, value.shape, value.tolist())
    return value, None


def check_invariants(bm: PyBlockManager) -> None:
    """Independent bookkeeping invariants on the Python twin's internals."""
    counted = [0] * bm.num_blocks
    for seq in bm._seqs.values():
        for b in seq.blocks:
            counted[b] += 1
        assert len(seq.blocks) == -(-seq.num_tokens // bm.block_size)
        assert len(seq.hashes) == seq.num_tokens // bm.block_size
        assert len(seq.tail) == seq.num_tokens % bm.block_size
    assert counted == bm._ref
    assert set(bm._free) == {b for b in range(bm.num_blocks) if counted[b] == 0}
    assert bm.num_free_blocks == len(bm._free)
    for h, b in bm._cache.items():
        assert bm._hash[b] == h and len(bm._block_tokens[b]) == bm.block_size


def compare_block_managers(py, cc, live) -> None:
    assert py.num_free_blocks == cc.num_free_blocks
    ids = sorted(live)
    for fn in ("block_table", "context_lens"):
        a, b = getattr(py, fn)(ids), getattr(cc, fn)(ids)
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), fn
    assert refs(py) == refs(cc)


def prompt_pool(rng: random.Random, num_blocks: int, bs: int, n: int = 6) -> list[list[int]]:
    """Prompts that share prefixes at and between block boundaries, so that hits happen; a few are
    longer than the pool can ever hold."""
    base = [rng.randrange(1000) for _ in range(min(4 * bs + 3, num_blocks * bs + 1))]
    pool = []
    for _ in range(n):
        length = rng.randint(1, len(base))
        p = list(base[:length])
        if rng.random() < 0.4:  # diverge somewhere
            i = rng.randrange(length)
            p[i] = 1000 + rng.randrange(1000)
        pool.append(p)
    return pool


def random_ops(rng: random.Random, py: PyBlockManager, pool, next_id: int):
    """The next operation(s) of a block-manager trace, as (kind, fn(bm)) pairs, and the next fresh id.
    Mostly legal operations, with a steady trickle of ones that must fail."""
    live = sorted(py._seqs)
    victim = rng.choice(live) if live else -5  # -5: an unknown id (until a duplicate-id allocate uses it)
    fullness = 1 - py.num_free_blocks / py.num_blocks
    r = rng.random()
    if not live or r < 0.2 * (1 - fullness) + 0.05:
        sid = next_id if rng.random() < 0.95 else victim  # sometimes a duplicate id
        toks = rng.choice(pool) if rng.random() < 0.97 else []
        if rng.random() < 0.3:  # numpy input as well as lists
            toks = np.array(toks, dtype=rng.choice([np.int32, np.int64]))
        return [("allocate", lambda bm: bm.allocate(sid, toks))], next_id + 1
    r = rng.random()
    if r < 0.1:
        child = next_id if rng.random() < 0.95 else victim
        parent = victim if rng.random() < 0.95 else -1
        return [("fork", lambda bm: bm.fork(parent, child))], next_id + 1
    if r < 0.5:  # a burst of appends to one sequence, so that blocks of every size fill up
        burst = rng.randint(1, 2 * py.block_size)
        toks = [rng.randrange(1000) for _ in range(burst)]
        return [("append", lambda bm, t=t: bm.append(victim, t)) for t in toks], next_id
    if r < 0.5 + 0.4 * fullness:
        bad = rng.random() < 0.03
        return [("free", lambda bm: bm.free(-7 if bad else victim))], next_id
    if r < 0.8:
        n = rng.randrange(4 * py.block_size)
        return [("can", lambda bm: (bm.can_allocate(n), bm.can_append(victim)))], next_id
    if r < 0.83:
        return [("reset", lambda bm: bm.reset_prefix_cache())], next_id
    ids = live[:3] + ([-2] if rng.random() < 0.05 else [])
    starts = [rng.randrange(py.num_tokens(i) + 2) if i in py._seqs else 0 for i in ids]
    return [("slots", lambda bm: bm.slot_mapping(ids, starts))], next_id


@pytest.mark.parametrize(("num_blocks", "block_size", "steps"), [
    (3, 1, 4000), (16, 1, 3000), (4, 2, 3000), (6, 16, 1500), (40, 16, 800), (2, 256, 400), (12, 256, 400),
    (24, 4, 2000),
])
def test_block_manager_random_trace(num_blocks, block_size, steps):
    eng = cpp_engine()
    rng = random.Random(num_blocks * 1000 + block_size)
    py, cc = PyBlockManager(num_blocks, block_size), eng.BlockManager(num_blocks, block_size)
    pool = prompt_pool(rng, num_blocks, block_size)
    next_id, ops, failures, hits, copies = 0, 0, 0, 0, 0
    for _ in range(steps):
        batch, next_id = random_ops(rng, py, pool, next_id)
        for kind, op in batch:
            a, b = outcome(lambda: op(py)), outcome(lambda: op(cc))
            assert a == b, f"op {ops} ({kind}): python {a} vs C++ {b}"
            ops += 1
            failures += a[1] is not None
            hits += kind == "allocate" and a[1] is None and a[0] > 0
            copies += kind == "append" and a[1] is None and a[0][1] is not None
            stop = kind == "append" and a[1] is not None  # the rest of a failed burst would fail too
            live = set(py._seqs)
            assert all(cc.has(t) for t in live) and not any(cc.has(t) for t in (-7, -2, -1, next_id))
            compare_block_managers(py, cc, live)
            check_invariants(py)
            if stop:
                break
    # The trace did exercise errors, prefix-cache hits and copy-on-write (impossible with block size 1).
    assert ops > 3000 and failures > 10 and hits > 0 and (copies > 0) == (block_size > 1), (ops, failures, hits,
                                                                                               copies)
    assert failures < ops / 2, (ops, failures)


OUT_FIELDS = ("seq_ids", "starts", "lens", "slot_mapping", "slots", "copies", "preempted")


def snapshot(out) -> dict:
    snap = {f: (getattr(out, f).dtype.str, getattr(out, f).shape, getattr(out, f).tolist()) for f in OUT_FIELDS}
    snap["kind"] = out.kind
    return snap


def scheduler_state(s, ids) -> tuple:
    running = s.running_ids().tolist()
    bm = s.block_manager
    return (s.num_waiting, s.num_running, running, s.waiting_ids().tolist(), s.running_ids().dtype.str,
            {i: (s.status(i), s.tokens(i)) for i in ids}, bm.num_free_blocks, bm.block_table(running).tolist(),
            bm.context_lens(running).tolist())


@pytest.mark.parametrize(("num_blocks", "block_size", "max_seqs", "max_tokens", "seed"), [
    (24, 4, 12, 64, 0), (48, 8, 24, 160, 1), (40, 1, 8, 24, 2), (20, 16, 32, 256, 3),
])
def test_scheduler_random_trace(num_blocks, block_size, max_seqs, max_tokens, seed):
    eng = cpp_engine()
    rng = random.Random(seed)
    scheds = (PyScheduler(PyBlockManager(num_blocks, block_size), max_seqs, max_tokens),
              eng.Scheduler(eng.BlockManager(num_blocks, block_size), max_seqs, max_tokens))
    # The longest a sequence may grow: it must still fit one prefill after being preempted.
    cap = min(max_tokens, num_blocks * block_size // 2)
    bases = [[rng.randrange(500) for _ in range(cap)] for _ in range(3)]
    truth: dict[int, list[int]] = {}  # the engine's own record of every live sequence's tokens
    limit: dict[int, int] = {}        # length at which a sequence finishes
    unforked: dict[int, int] = {}     # request -> group size, until its first prefill
    next_id, preempted, readmitted = 0, set(), 0

    def both(action, *args):
        for s in scheds:
            getattr(s, action)(*args)

    for step in range(800):
        if rng.random() < 0.35 and len(truth) < 3 * max_seqs:
            toks = rng.choice(bases)[:rng.randint(1, cap // 2)]
            g = rng.randint(1, min(8, max_seqs))
            both("add", next_id, toks, g)
            truth[next_id], limit[next_id], unforked[next_id] = list(toks), rng.randint(len(toks) + 1, cap), g
            next_id += 1
        outs = [s.schedule() for s in scheds]
        assert snapshot(outs[0]) == snapshot(outs[1]), f"step {step}"
        out = outs[0]
        sampled = out.seq_ids.tolist()
        if out.kind == "prefill":
            for sid, n in zip(out.seq_ids.tolist(), out.lens.tolist()):
                assert n == len(truth[sid]) and scheds[1].tokens(sid) == truth[sid]
                if sid in preempted:  # re-admitted with its full token list
                    readmitted += 1
                    preempted.discard(sid)
                for _ in range(unforked.pop(sid, 1) - 1):  # the engine forks a group right after prefill
                    both("fork", sid, next_id)
                    truth[next_id], limit[next_id] = list(truth[sid]), limit[sid]
                    sampled.append(next_id)
                    next_id += 1
        preempted.update(out.preempted.tolist())
        toks = [rng.randrange(500) for _ in sampled]
        if rng.random() < 0.5:
            both("append_tokens", np.array(sampled, dtype=np.int64), toks)
        else:
            for sid, tok in zip(sampled, toks):
                both("append_token", sid, tok)
        for sid, tok in zip(sampled, toks):
            truth[sid].append(tok)
            if len(truth[sid]) >= limit[sid] or rng.random() < 0.03:
                both("finish", sid)
                del truth[sid]
                preempted.discard(sid)
        waiting = scheds[0].waiting_ids().tolist()
        if waiting and rng.random() < 0.05:
            sid = rng.choice(waiting)
            both("finish", sid)
            del truth[sid]
            preempted.discard(sid)
        state = scheduler_state(scheds[0], truth)
        assert state == scheduler_state(scheds[1], truth), f"step {step}"
        assert state[5] == {i: (state[5][i][0], t) for i, t in truth.items()}
    assert readmitted > 0  # preemption happened and the victims came back
