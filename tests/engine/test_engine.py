"""The paged rollout engine against the reference generate and transformers, on tiny random models.

Every test runs the engine's real path: C++ bookkeeping (or its twin where named), store_kv and
paged attention (Triton on GPU; the PyTorch references on CPU), forks with copy-on-write, preemption.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILY_NAMES

import fastrft
from fastrft.engine import Engine, EngineConfig, reference_generate
from fastrft.errors import ConfigError

PROMPTS = [[2, 10, 11, 12, 13], list(range(3, 3 + 37)), [2, 30], list(range(20, 20 + 18))]


def _ids(results):
    return [[c.token_ids for c in g] for g in results]


class RecordingScheduler:
    """Delegates to the engine's scheduler (C++ objects cannot be monkeypatched) and keeps every output."""

    def __init__(self, inner):
        self.inner = inner
        self.outputs = []

    def schedule(self):
        out = self.inner.schedule()
        self.outputs.append(out)
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _engine(model, **kw) -> Engine:
    kw.setdefault("kv_cache_memory", 64 * 2**20)
    return Engine(model, config=EngineConfig(**kw))


@pytest.fixture(scope="module")
def qwen(tiny_models):
    return fastrft.load_model(tiny_models["qwen2"])


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_greedy_matches_reference_and_transformers(tiny_models, family):
    from transformers import AutoModelForCausalLM

    model = fastrft.load_model(tiny_models[family])
    got = _engine(model).generate(PROMPTS, max_new_tokens=24, temperature=0, eos_token_ids=[])
    ref = reference_generate(model, PROMPTS, max_new_tokens=24, temperature=0, eos_token_ids=[])
    assert _ids(got) == _ids(ref)
    hf = AutoModelForCausalLM.from_pretrained(tiny_models[family], dtype=torch.float32).eval()
    for prompt, group in zip(PROMPTS, got):
        x = torch.tensor([prompt])
        with torch.no_grad():
            out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=24,
                              min_new_tokens=24, eos_token_id=None, pad_token_id=0)
        assert group[0].token_ids == out[0, len(prompt):].tolist()


@pytest.mark.parametrize("bookkeeping", ["cpp", "python"])
def test_sampling_matches_reference_and_ignores_batching(qwen, bookkeeping):
    kw = dict(n=3, max_new_tokens=20, temperature=0.9, top_p=0.95, seed=5, eos_token_ids=[])
    ref = reference_generate(qwen, PROMPTS, **kw)
    batched = _engine(qwen, bookkeeping=bookkeeping).generate(PROMPTS, **kw)
    alone = _engine(qwen, bookkeeping=bookkeeping, max_num_seqs=3).generate(PROMPTS, **kw)
    assert _ids(batched) == _ids(ref) == _ids(alone)
    for g_ref, g in zip(ref, batched):
        for c_ref, c in zip(g_ref, g):
            assert max(abs(a - b) for a, b in zip(c_ref.logprobs, c.logprobs)) < 1e-4


def test_preemption_does_not_change_samples(qwen):
    """A KV cache of 12 blocks for 8 sequences that each grow to 4 blocks: the scheduler must preempt
    (and later recompute) sequences, and every sample must still equal the unconstrained run."""
    kw = dict(n=2, max_new_tokens=40, temperature=1.0, seed=9, eos_token_ids=[])
    prompts = [list(range(3, 13)), list(range(13, 23)), list(range(23, 33)), list(range(33, 43))]
    free = _engine(qwen).generate(prompts, **kw)
    tight = _engine(qwen, kv_cache_memory=12 * 16 * qwen.kv_bytes_per_token())
    assert tight.num_blocks == 12
    tight.scheduler = RecordingScheduler(tight.scheduler)
    got = tight.generate(prompts, **kw)
    assert sum(len(o.preempted) for o in tight.scheduler.outputs), "the tight cache never preempted"
    assert _ids(got) == _ids(free)


def test_forks_share_the_prompt_blocks(qwen):
    """n = 8 samples of a 40-token prompt (block size 16: 2 full blocks + 1 partial): after prefill the
    group holds 3 blocks; the first decode step copies the partial block for 7 of the 8 forks."""
    eng = _engine(qwen)
    total = eng.block_manager.num_free_blocks
    groups = eng.submit([list(range(3, 43))], n=8, max_new_tokens=5, temperature=1.0, top_p=1.0, top_k=0, seed=0,
                        eos_token_ids=[])
    eng.step()  # prefill + fork + first sample
    assert total - eng.block_manager.num_free_blocks == 3
    table = eng.block_manager.block_table([s.seq_id for s in groups[0]])
    assert (table == table[0]).all()  # every fork points at the same three blocks
    eng.step()  # first decode: copy-on-write of the shared partial block
    assert total - eng.block_manager.num_free_blocks == 3 + 7
    while any(s.finish_reason is None for s in groups[0]):
        eng.step()
    assert eng.block_manager.num_free_blocks == total


def test_prefix_cache_hits_and_reset(qwen):
    """A repeated prompt is served from cached blocks (same tokens as a fresh run) until the cache is
    reset, as the trainer does after each optimizer step."""
    prompt = [list(range(3, 3 + 45))]  # 2 cacheable full blocks of 16
    eng = _engine(qwen)
    first = eng.generate(prompt, max_new_tokens=10, temperature=0, eos_token_ids=[])
    eng.scheduler = rec = RecordingScheduler(eng.scheduler)

    def prefill_starts():
        starts = [x for o in rec.outputs if o.kind == "prefill" for x in o.starts.tolist()]
        rec.outputs.clear()
        return starts

    again = eng.generate(prompt, max_new_tokens=10, temperature=0, eos_token_ids=[])
    assert prefill_starts() == [32] and _ids(again) == _ids(first)
    eng.reset_prefix_cache()
    eng.generate(prompt, max_new_tokens=10, temperature=0, eos_token_ids=[])
    assert prefill_starts() == [0]


def test_stop_and_length_match_reference(qwen):
    free = reference_generate(qwen, PROMPTS, n=2, max_new_tokens=16, seed=3, eos_token_ids=[])
    stop_tok = free[0][0].token_ids[2]
    kw = dict(n=2, max_new_tokens=16, seed=3, eos_token_ids=[stop_tok])
    got = _engine(qwen).generate(PROMPTS, **kw)
    ref = reference_generate(qwen, PROMPTS, **kw)
    assert _ids(got) == _ids(ref)
    assert [[c.finish_reason for c in g] for g in got] == [[c.finish_reason for c in g] for g in ref]
    assert any(c.finish_reason == "stop" for g in got for c in g)


def test_public_generate_goes_through_the_engine(qwen, monkeypatch):
    calls = []
    real = Engine.step
    monkeypatch.setattr(Engine, "step", lambda self: (calls.append(1), real(self))[1])
    out = fastrft.generate(qwen, PROMPTS[:2], n=2, max_new_tokens=6, seed=1, eos_token_ids=[])
    assert calls and len(out) == 2 and all(len(g) == 2 for g in out)
    assert _ids(out) == _ids(reference_generate(qwen, PROMPTS[:2], n=2, max_new_tokens=6, seed=1, eos_token_ids=[]))


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompts=[[]]), "prompt 0 is empty"),
    (dict(n=0), "n must be >= 1"),
    (dict(prompts=[list(range(3, 50))], max_new_tokens=480), "exceeds the model's context of 512"),
])
def test_bad_requests(qwen, kwargs, match):
    prompts = kwargs.pop("prompts", PROMPTS)
    with pytest.raises(ConfigError, match=match):
        _engine(qwen).generate(prompts, **kwargs)


def test_sequence_longer_than_the_cache_is_refused(qwen):
    eng = _engine(qwen, kv_cache_memory=4 * 16 * qwen.kv_bytes_per_token())
    with pytest.raises(ConfigError, match="needs 5 KV blocks, but the cache holds 4"):
        eng.generate([list(range(3, 40))], max_new_tokens=40)
    # the engine is still usable afterwards
    assert len(eng.generate([[2, 3]], max_new_tokens=4)[0][0].token_ids) <= 4


@pytest.mark.parametrize("kw,match", [
    (dict(block_size=24), "block_size must be a power of two"),
    (dict(kv_cache_memory=100), "too small for a single KV block"),
    (dict(kv_cache_memory=0.5), "fraction of free GPU memory"),
])
def test_bad_engine_config(qwen, kw, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        Engine(qwen, config=EngineConfig(**kw))


def test_per_prompt_response_budgets(qwen):
    out = _engine(qwen).generate(PROMPTS, n=2, max_new_tokens=[3, 9, 1, 5], seed=4, eos_token_ids=[])
    assert [[len(c.token_ids) for c in g] for g in out] == [[3, 3], [9, 9], [1, 1], [5, 5]]
    ref = reference_generate(qwen, PROMPTS, n=2, max_new_tokens=9, seed=4, eos_token_ids=[])
    for g, g_ref in zip(out, ref):  # a shorter budget is a prefix of the longer run
        for c, c_ref in zip(g, g_ref):
            assert c.token_ids == c_ref.token_ids[:len(c.token_ids)]
    with pytest.raises(ConfigError, match="4 entries for 2 prompts"):
        _engine(qwen).generate(PROMPTS[:2], max_new_tokens=[1, 2, 3, 4])


def test_progress_counts_every_finished_sequence_once(qwen):
    """The evaluation's progress bar: the hook sees each sequence finish exactly once, as it finishes,
    and the samples are those of a call without the hook."""
    kw = dict(n=3, max_new_tokens=12, temperature=1.0, seed=4)
    seen = []
    got = _engine(qwen).generate(PROMPTS, progress=seen.append, **kw)
    assert sum(seen) == 3 * len(PROMPTS) and all(x >= 0 for x in seen)
    assert len(seen) > 1 and seen[0] < 3 * len(PROMPTS)  # reported step by step, not once at the end
    assert _ids(got) == _ids(_engine(qwen).generate(PROMPTS, **kw))


def test_eval_sequences_is_the_progress_total(qwen):
    from fastrft.data import arithmetic_problems
    from fastrft.evaluate import EvalSet, eval_sequences, evaluate
    from conftest import make_tokenizer

    tok = make_tokenizer()
    exs = arithmetic_problems("add1", "test")[:3]
    enc = lambda xs: EvalSet(xs, [tok.encode("<bos>" + x.question)[:20] for x in xs])  # noqa: E731
    train, test = enc(exs[:1]), enc(exs[1:])
    engine = Engine(qwen, tok, EngineConfig(kv_cache_memory=64 * 2**20))
    for greedy in (False, True):
        seen = []
        evaluate(engine, train, test, train_samples=4, temperature=1.0, max_new_tokens=5, greedy=greedy, seed=0,
                 progress=seen.append)
        assert sum(seen) == eval_sequences(train, test, train_samples=4, greedy=greedy) == 4 + 2 * (1 + greedy)


def test_prefill_steps_respect_the_token_budget(qwen):
    """max_num_batched_tokens bounds every prefill step, raised for a call to its longest request (prompt +
    max_new_tokens) so that each request fits alone; the samples equal an unbounded engine's."""
    prompts = [list(range(3 + i, 23 + i)) for i in range(5)] + [list(range(30, 75))]  # 5 x 20 tokens, one of 45
    kw = dict(n=1, max_new_tokens=4, temperature=0.0, top_p=1.0, top_k=0, seed=0, eos_token_ids=[])
    free = _engine(qwen).generate(prompts, **{k: v for k, v in kw.items() if k not in ("top_p", "top_k")})
    eng = _engine(qwen, max_num_batched_tokens=32)
    groups = eng.submit(prompts, **kw)
    eng.scheduler = rec = RecordingScheduler(eng.scheduler)
    while any(s.finish_reason is None for g in groups for s in g):
        eng.step()
    got = eng.collect(groups)
    steps = [o.lens.tolist() for o in rec.outputs if o.kind == "prefill"]
    assert sorted(n for lens in steps for n in lens) == [20] * 5 + [45]
    assert all(sum(lens) <= 45 + 4 for lens in steps)  # the call's limit: its longest request
    assert [45] in steps and [20, 20] in steps  # the long prompt ran alone; short ones were packed
    assert _ids(got) == _ids(free)


def test_a_share_of_a_call_samples_what_the_whole_call_samples(qwen):
    """request_ids and per-prompt sample counts (how fastrft.distributed splits a call across ranks): the
    share [prompt 1 samples 2-3, prompt 2 sample 0, prompt 3 samples 0-1] of a 4 x 4 call, generated
    alone, is token for token the reference's whole call at those requests, with its log-probs."""
    kw = dict(max_new_tokens=15, temperature=1.0, seed=4, eos_token_ids=[])
    whole = reference_generate(qwen, PROMPTS, n=4, **kw)
    share = [(1, 2, 2), (2, 0, 1), (3, 0, 2)]  # (prompt, first sample, samples)
    part = _engine(qwen).generate([PROMPTS[p] for p, _, _ in share], n=[k for *_, k in share],
                                  request_ids=[(p, first) for p, first, _ in share], **kw)
    for (p, first, k), group in zip(share, part):
        assert [(c.prompt_index, c.sample_index) for c in group] == [(p, first + j) for j in range(k)]
        for j, c in enumerate(group):
            assert c.token_ids == whole[p][first + j].token_ids
            assert max(abs(a - b) for a, b in zip(c.logprobs, whole[p][first + j].logprobs)) < 1e-4


def test_per_prompt_counts_and_request_ids_must_match_the_prompts(qwen):
    engine = _engine(qwen)
    with pytest.raises(ConfigError, match="n has 1 entries for 2 prompts"):
        engine.generate(PROMPTS[:2], n=[2], max_new_tokens=2)
    with pytest.raises(ConfigError, match="request_ids has 1 entries for 2 prompts"):
        engine.generate(PROMPTS[:2], request_ids=[(0, 0)], max_new_tokens=2)
    with pytest.raises(ConfigError, match="n must be >= 1"):
        engine.generate(PROMPTS[:2], n=[1, 0], max_new_tokens=2)
