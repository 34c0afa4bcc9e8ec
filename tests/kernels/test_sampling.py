"""The sampler: its counter-based noise against the spec and known answers, the four implementations
(the whole-vocabulary reference, the CPU path with its PyTorch and C++ block searches, the Triton
kernel in the interpreter) giving the same tokens bit for bit, its statistics, and its bad input."""

from __future__ import annotations

import math

import pytest
import torch

from fastrft.engine.sampler import SamplingParams, filtered_logits, sample, sampling_logprobs
from fastrft.kernels import noise as nz
from fastrft.kernels import sampling as S

try:
    from fastrft import _engine
except ImportError:  # the C++ twin is tested where it is built (make test builds it)
    _engine = None
needs_cpp = pytest.mark.skipif(_engine is None, reason="the C++ extension fastrft._engine is not built")


def _case(b: int, v: int, seed: int = 0, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, v, generator=g) * scale
    seeds = torch.randint(0, 2**63 - 1, (b,), generator=g)
    positions = torch.randint(0, 5000, (b,), generator=g)
    return logits, seeds, positions


# ----------------------------------------------------------------------------------------- the noise
# Random123's known-answer vectors for Philox4x32-10: (key, counter) -> the four words.
KAT = [((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
       ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
       ((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]


@pytest.mark.parametrize("key,counter,words", KAT)
def test_philox_known_answers(key, counter, words):
    got = nz.philox4x32(*(torch.tensor([c]) for c in counter), *(torch.tensor([k]) for k in key))
    assert [int(w) for w in got] == list(words)


def test_ln_is_accurate_monotone_and_identical_in_cpp():
    """Over the whole uniform grid and the exponentials made from it: ln within 1e-7 relative of float64,
    never decreasing along the grid (what block skipping relies on), and the C++ twin bit-equal."""
    u = (torch.arange(2**23, dtype=torch.float32) + 0.5) * nz.GRID
    e = nz.neg(nz.ln(u))
    for x in (u, e, e * nz.INV_BLOCK + 0.25):
        got = nz.ln(x)
        exact = torch.log(x.double())
        assert ((got.double() - exact).abs() <= 1e-7 * exact.abs() + 1e-12).all()
        if _engine is not None:
            assert torch.equal(torch.from_numpy(_engine.fixed_ln(x.numpy())).view(torch.int32), got.view(torch.int32))
    g = nz.neg(nz.ln(e))
    assert (g[1:] >= g[:-1]).all()


def test_noise_is_gumbel_and_a_block_never_exceeds_its_max():
    """The top-down construction gives Gumbel(0) marginals (mean = Euler's gamma, variance pi^2 / 6),
    every element of a block is at most the block's M, and J holds M exactly."""
    seeds = torch.arange(64) * 7919
    positions = torch.arange(64) % 5
    g = nz.gumbel_noise(seeds, positions, 64 * 200)  # 819,200 values
    # Sampling error of the mean: sqrt(1.645 / 819200) = 0.0014; of the variance about 0.005.
    assert abs(g.mean().item() - 0.5772157) < 0.007
    assert abs(g.var().item() - math.pi**2 / 6) < 0.03
    blocks = torch.arange(200).expand(64, 200)
    e_block, j = nz.block_noise(seeds, positions, blocks)
    top = nz.block_max_noise(e_block)
    per_block = g.view(64, 200, 64)
    assert (per_block <= top[..., None]).all()
    assert torch.equal(per_block.gather(2, j[..., None]).squeeze(-1), top)


def test_noise_depends_on_seed_position_and_id_only():
    seeds, positions = torch.tensor([11, 11, 12]), torch.tensor([3, 4, 3])
    g = nz.gumbel_noise(seeds, positions, 300)
    assert not torch.equal(g[0], g[1]) and not torch.equal(g[0], g[2])
    alone = nz.gumbel_noise(seeds[1:2], positions[1:2], 300)
    assert torch.equal(alone[0], g[1])
    assert torch.equal(nz.gumbel_noise(seeds, positions, 200), g[:, :200])  # an id's noise ignores V


@pytest.mark.parametrize("b,v,splits", [(3, 1003, 1), (4, 4096 + 130, 3), (2, 64, 1)])
def test_kernel_noise_is_the_spec_bit_for_bit(b, v, splits):
    _, seeds, positions = _case(b, v)
    assert torch.equal(S.triton_noise(seeds, positions, v, splits).view(torch.int32),
                       nz.gumbel_noise(seeds, positions, v).view(torch.int32))


# ----------------------------------------------------------------------------------------- the tokens
def _implementations():
    impls = {"torch-search": lambda *a, **k: S.sample_torch(*a, search="torch", **k),
             "triton": lambda *a, **k: S.sample_tokens(*a, backend="triton", **k),
             "triton-split": lambda x, s, p, t, **k: S.tri.sample_triton(x, s, p, torch.tensor([t], dtype=torch.float32),
                                                                    k.get("strict", True), num_splits=3)}
    if _engine is not None:
        impls["cpp-search"] = lambda *a, **k: S.sample_torch(*a, search="cpp", **k)
    return impls


@pytest.mark.parametrize("inv_t", [1.0, 1 / 0.7, 0.0, 4.0])
@pytest.mark.parametrize("b,v,scale", [(5, 1003, 3.0), (3, 64, 1.0), (4, 8192 + 37, 0.3), (2, 130, 30.0)])
def test_every_implementation_draws_the_references_tokens(b, v, scale, inv_t):
    """Odd vocabularies, flat (scale 0.3: every block a candidate) and peaked logits, greedy and hot."""
    logits, seeds, positions = _case(b, v, seed=v, scale=scale)
    ref = S.sample_reference(logits, seeds, positions, inv_t)
    expect = torch.log_softmax(logits.double() * (inv_t or 1.0), -1).gather(1, ref[0].long()[:, None]).squeeze(1)
    assert torch.allclose(ref[1].view(torch.float32).double(), expect, rtol=0, atol=2e-5)
    for name, impl in _implementations().items():
        got = impl(logits, seeds, positions, inv_t)
        assert torch.equal(got[0], ref[0]), name
        # log-probs: the same formula, with the kernel's online sum rounding differently
        assert torch.allclose(got[1].view(torch.float32), ref[1].view(torch.float32), rtol=0, atol=1e-5), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_reads_half_precision_logits(dtype):
    logits, seeds, positions = _case(4, 777, seed=3)
    logits = logits.to(dtype)
    ref = S.sample_reference(logits, seeds, positions, 1.0)
    assert torch.equal(S.sample_tokens(logits, seeds, positions, 1.0, backend="triton")[0], ref[0])


def test_filtered_ids_never_win_and_ties_go_to_the_smallest_id():
    logits, seeds, positions = _case(6, 300, seed=5)
    logits[:, 1::2] = float("-inf")  # half the ids filtered out
    logits[5] = 0.0
    logits[5, 7], logits[5, 9] = 50.0, 50.0  # a tie under greedy decoding
    for name, impl in _implementations().items():
        got = impl(logits, seeds, positions, 1.0, strict=False)
        assert (got[0][:5] % 2 == 0).all(), name
        assert impl(logits, seeds, positions, 0.0, strict=False)[0][5] == 7, name


def test_a_row_does_not_depend_on_its_batch():
    logits, seeds, positions = _case(12, 2000, seed=9)
    whole = S.sample_torch(logits, seeds, positions, 1.0)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    shuffled = S.sample_torch(logits[order], seeds[order], positions[order], 1.0)
    assert torch.equal(shuffled[:, torch.argsort(order)], whole)
    assert torch.equal(S.sample_torch(logits[4:5], seeds[4:5], positions[4:5], 1.0), whole[:, 4:5])


# ----------------------------------------------------------------------------------------- statistics
def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square test of counts against probabilities (cells with p > 0); the p-value."""
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was drawn"
    n = counts.sum()
    expected = n * probs[keep].double()
    stat = ((counts[keep].double() - expected) ** 2 / expected).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


def _binned(counts: torch.Tensor, probs: torch.Tensor, n: int, min_expected: float = 20.0):
    """Merge the least likely tokens into one cell so that every cell expects >= min_expected draws."""
    order = torch.argsort(probs, descending=True)
    big = order[probs[order] * n >= min_expected]
    rest = order[probs[order] * n < min_expected]
    return (torch.cat([counts[big], counts[rest].sum(0, keepdim=True)]),
            torch.cat([probs[big], probs[rest].sum(0, keepdim=True)]))


STAT_PARAMS = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.6),
               SamplingParams(temperature=1.0, top_k=5), SamplingParams(temperature=0.8, top_p=0.7),
               SamplingParams(temperature=1.3, top_k=40, top_p=0.95)]


@pytest.mark.parametrize("params", STAT_PARAMS, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}")
def test_token_frequencies_match_the_sampling_distribution(params):
    """60,000 draws (distinct requests and positions) from one 257-token distribution.

    Bound: with fixed seeds the test is deterministic; its threshold p >= 1e-6 means a correct sampler
    would fail for one seed in a million, while the power check below shows that a 10% error in the
    temperature already fails by far. Cells expecting fewer than 20 draws are merged, so the
    chi-square approximation holds."""
    n, v = 60_000, 257
    base = torch.randn(1, v, generator=torch.Generator().manual_seed(2)) * 2.5
    logits = base.expand(n, v)
    seeds = torch.arange(n, dtype=torch.int64) * 0x9E3779B97F4A7C15 % (2**63)
    positions = torch.arange(n, dtype=torch.int64) % 97
    tokens, logps = sample(logits, params, seeds, positions)
    probs = sampling_logprobs(base, params).exp()[0]
    counts = torch.bincount(tokens, minlength=v)
    assert counts[probs == 0].sum() == 0
    assert _chi_square_p(*_binned(counts, probs, n)) > 1e-6
    torch.testing.assert_close(logps, probs.log()[tokens], rtol=0, atol=2e-5)
    # Power: the same counts against a distribution 10% hotter are rejected.
    wrong = sampling_logprobs(base, SamplingParams(temperature=params.temperature * 1.1, top_k=params.top_k,
                                                   top_p=params.top_p)).exp()[0]
    if (wrong > 0).equal(probs > 0):
        assert _chi_square_p(*_binned(counts, wrong, n)) < 1e-6


def test_top_p_and_top_k_filtering_values():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = sampling_logprobs(logits, SamplingParams(top_p=0.75)).exp()[0]
    torch.testing.assert_close(p, torch.tensor([0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]))
    k = sampling_logprobs(logits, SamplingParams(top_k=3, temperature=1.0)).exp()[0]
    torch.testing.assert_close(k, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    z = filtered_logits(logits, SamplingParams(top_k=2, temperature=0.5))
    assert torch.isinf(z[0, 2:]).all() and torch.equal(z[0, :2], logits[0, :2] * 2.0)


# ----------------------------------------------------------------------------------------- bad input
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy meets the NaN too
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_give_token_minus_one_never_zero(bad):
    logits, seeds, positions = _case(4, 200, seed=4)
    logits[1, 17] = bad
    logits[2] = float("-inf")  # nothing finite at all
    for name, impl in {"reference": S.sample_reference, **_implementations()}.items():
        for inv_t in (1.0, 0.0):
            tokens = impl(logits, seeds, positions, inv_t)[0]
            assert tokens[1] == -1 and tokens[2] == -1 and tokens[0] >= 0 and tokens[3] >= 0, (name, inv_t)
    params = SamplingParams(top_k=5)
    assert sample(logits, params, seeds, positions)[0].tolist()[1:3] == [-1, -1]


def test_bad_arguments_are_refused():
    logits, seeds, positions = _case(2, 50)
    with pytest.raises(ValueError, match="seeds must be int64"):
        S.sample_tokens(logits, seeds.int(), positions, 1.0)
    with pytest.raises(ValueError, match="logits must be"):
        S.sample_tokens(logits.t(), seeds, positions, 1.0)
    for t in (-1.0, float("nan"), float("inf")):
        with pytest.raises(Exception, match="temperature"):
            SamplingParams(temperature=t)


def test_the_engine_names_the_request_and_position_of_nan_logits(tiny_models):
    """A model whose logits turn NaN for one request: generate raises SamplingError naming that request
    and the response position, instead of returning token 0; the engine is left idle and reusable."""
    import fastrft
    from fastrft.engine import Engine, EngineConfig, SamplingError

    model = fastrft.load_model(tiny_models["qwen2"])
    engine = Engine(model, config=EngineConfig(kv_cache_memory=2**22, max_num_seqs=8))
    prompts = [[2, 10, 11, 12], [2, 20, 21]]
    clean = engine.generate(prompts, n=2, max_new_tokens=6, seed=1, eos_token_ids=[])
    poisoned = clean[1][1].token_ids[2]  # request (1, 1) samples this token at response position 2
    with torch.no_grad():
        saved = model.model.embed_tokens.weight[poisoned].clone()
        model.model.embed_tokens.weight[poisoned] = float("nan")  # its embedding: the next logits are NaN
    try:
        with pytest.raises(SamplingError, match=r"request \(prompt \d, sample \d\).*response token \d.*NaN or inf"):
            engine.generate(prompts, n=2, max_new_tokens=6, seed=1, eos_token_ids=[])
    finally:
        with torch.no_grad():
            model.model.embed_tokens.weight[poisoned] = saved
    again = engine.generate(prompts, n=2, max_new_tokens=6, seed=1, eos_token_ids=[])
    assert [[c.token_ids for c in g] for g in again] == [[c.token_ids for c in g] for g in clean]


def test_sample_still_takes_generators():
    """The interface of earlier versions, sample(logits, params, generators): each row takes a fresh seed
    from its generator, so one shared generator gives independent rows and calls, at the right frequencies."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    probs = torch.softmax(logits[0], -1)
    gen = torch.Generator().manual_seed(11)
    counts = torch.zeros(6)
    for _ in range(50):
        tokens, logps = sample(logits.expand(400, -1), SamplingParams(), [gen] * 400)
        counts += torch.bincount(tokens, minlength=6)
        torch.testing.assert_close(logps, probs.log()[tokens])
    assert _chi_square_p(counts, probs) > 1e-6
