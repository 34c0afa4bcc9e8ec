"""Rollout generation: reproducibility, batch independence, stopping, log-probs of the distribution
sampled (the sampler's own statistics are in test_sampling.py), and bad requests."""

from __future__ import annotations

import pytest
import torch

import fastrft
from fastrft.errors import ConfigError

PROMPTS = [[2, 10, 11, 12], [2, 20, 21, 22, 23, 24, 25, 26], [2, 30]]


@pytest.fixture(scope="module")
def model(tiny_models):
    return fastrft.load_model(tiny_models["qwen2"])


def _ids(results):
    return [[c.token_ids for c in group] for group in results]


def test_same_seed_same_samples_different_seed_different(model):
    a = fastrft.generate(model, PROMPTS, n=3, max_new_tokens=12, seed=7, eos_token_ids=[])
    b = fastrft.generate(model, PROMPTS, n=3, max_new_tokens=12, seed=7, eos_token_ids=[])
    c = fastrft.generate(model, PROMPTS, n=3, max_new_tokens=12, seed=8, eos_token_ids=[])
    assert _ids(a) == _ids(b)
    assert _ids(a) != _ids(c)
    # the n samples of one prompt are distinct streams, not copies
    assert len({tuple(t) for t in _ids(a)[1]}) > 1


@pytest.mark.parametrize("max_batch_size", [1, 2, 5])
def test_samples_do_not_depend_on_batching(model, max_batch_size):
    ref = fastrft.generate(model, PROMPTS, n=3, max_new_tokens=12, seed=3, eos_token_ids=[])
    got = fastrft.generate(model, PROMPTS, n=3, max_new_tokens=12, seed=3, eos_token_ids=[],
                           max_batch_size=max_batch_size)
    assert _ids(got) == _ids(ref)
    for ga, gb in zip(ref, got):
        for ca, cb in zip(ga, gb):
            assert max(abs(x - y) for x, y in zip(ca.logprobs, cb.logprobs)) < 1e-4


def test_logprobs_are_those_of_the_sampling_distribution(model):
    """Each reported log-prob equals log_softmax(logits / T) of a full forward at that position."""
    temperature = 0.7
    out = fastrft.generate(model, PROMPTS, n=2, max_new_tokens=10, temperature=temperature, seed=1,
                           eos_token_ids=[])
    for prompt, group in zip(PROMPTS, out):
        for c in group:
            seq = torch.tensor([prompt + c.token_ids])
            logits = model.logits(seq)[0, len(prompt) - 1:-1] / temperature
            expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=1e-4)


def test_stops_on_eos_and_reports_finish_reason(model):
    free = fastrft.generate(model, PROMPTS, n=4, max_new_tokens=16, seed=5, eos_token_ids=[])
    # pick a token that the unconstrained samples do produce, and declare it the stop token
    stop_tok = free[0][0].token_ids[3]
    out = fastrft.generate(model, PROMPTS, n=4, max_new_tokens=16, seed=5, eos_token_ids=[stop_tok])
    stopped = 0
    for g_free, g in zip(free, out):
        for cf, c in zip(g_free, g):
            if stop_tok in cf.token_ids:
                cut = cf.token_ids.index(stop_tok) + 1
                assert c.token_ids == cf.token_ids[:cut] and c.finish_reason == "stop"
                stopped += 1
            else:
                assert c.token_ids == cf.token_ids and c.finish_reason == "length"
            assert len(c.logprobs) == len(c.token_ids)
    assert stopped >= 1


def test_default_eos_is_the_models(model):
    model_eos = model.eos_token_ids
    out = fastrft.generate(model, PROMPTS, n=8, max_new_tokens=40, seed=0)
    for g in out:
        for c in g:
            assert all(t not in model_eos for t in c.token_ids[:-1])
            assert (c.finish_reason == "stop") == (c.token_ids[-1] in model_eos)


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    greedy = _ids(fastrft.generate(model, PROMPTS, max_new_tokens=10, temperature=0, eos_token_ids=[]))
    assert _ids(fastrft.generate(model, PROMPTS, max_new_tokens=10, top_k=1, seed=4, eos_token_ids=[])) == greedy
    assert _ids(fastrft.generate(model, PROMPTS, max_new_tokens=10, top_p=1e-6, seed=4, eos_token_ids=[])) == greedy


def test_text_is_decoded_with_tokenizer(tiny_models, model):
    tok = fastrft.load_tokenizer(tiny_models["qwen2"])
    c = fastrft.generate(model, PROMPTS[:1], max_new_tokens=6, seed=2, eos_token_ids=[], tokenizer=tok)[0][0]
    assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(n=0), "n must be"),
])
def test_bad_sampling_arguments(model, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        fastrft.generate(model, PROMPTS, **kwargs)


@pytest.mark.parametrize("prompts,match", [([[]], "empty"), ([[1, 10_000]], "outside")])
def test_bad_prompts(model, prompts, match):
    with pytest.raises(ConfigError, match=match):
        fastrft.generate(model, prompts)
