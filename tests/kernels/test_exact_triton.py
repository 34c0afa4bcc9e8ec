"""The exact mode's Triton kernels (fastrft.kernels.exact_triton), in the interpreter on CPU.

Two properties per kernel: it computes the op (forward against a float64 reference, backward against
float64 autograd), and a row's result does not depend on what shares its launch (bit for bit across row
counts, and, for attention, across the packed training forward, the paged prefill in chunks over
shuffled pages, and one-token decode). On CUDA the second property rests on the kernels' construction
(one tile per dtype, no split reductions, rows independent in tl.dot), which the interpreter's numpy
dots share; the end-to-end run is in tests/models/test_exact.py.

Tolerances: fp32 operands are compared with float64 at 1e-5 relative (fp32 accumulation over <= 100
terms). bf16 outputs get 2^-7 relative: one bf16 ulp, because the interpreter truncates fp32 -> bf16
where a GPU rounds to nearest (triton.runtime.interpreter._convert_float), on top of the half ulp of the
reference's own rounding.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from fastrft.kernels import exact_triton as et  # noqa: E402
from fastrft.kernels import lm_head_triton as head  # noqa: E402
from fastrft.models import ops  # noqa: E402
from fastrft.models.paged import PagedMeta  # noqa: E402

TRITON = ops.get("exact-triton")

if not et.available(torch.device("cpu")):
    pytest.skip("needs TRITON_INTERPRET=1 (conftest sets it without a GPU)", allow_module_level=True)

BF16_REL = 2.0**-7


@pytest.fixture(params=["interpreter-tiles", "cuda-tiles"])
def tiles(request):
    """Each test runs twice: with the interpreter's large tiles, and with the CUDA launches' own tiles
    (:data:`exact_triton.TILES`, one-row norm programs), which is what a GPU runs."""
    if request.param == "cuda-tiles":
        with et.cuda_tiles():
            yield request.param
    else:
        yield request.param


def _close(actual, expected, dtype, atol=1e-6):
    rel = 1e-5 if dtype == torch.float32 else BF16_REL
    err = (actual.double() - expected).abs()
    assert bool((err <= atol + rel * expected.abs()).all()), f"max error {err.max().item():.3g}"


# ----------------------------------------------------------------------------------------- linear
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_forward_backward_and_row_invariance(tiles, dtype, bias):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(70, 72, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(100, 72, generator=gen).to(dtype).requires_grad_()
    b = torch.randn(100, generator=gen).to(dtype).requires_grad_() if bias else None
    y = et.linear(x, w, b)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if bias else None
    ref = torch.nn.functional.linear(x64, w64, b64)
    _close(y, ref.detach(), dtype, atol=1e-5)
    g = torch.randn(70, 100, generator=gen)
    y.backward(g.to(dtype))
    ref.backward(g.double())
    # The backward is PyTorch's matmul in the operands' dtype: bf16 rounds the gradient once more.
    _close(x.grad, x64.grad, dtype, atol=1e-4 if dtype == torch.float32 else 0.5)
    _close(w.grad, w64.grad, dtype, atol=1e-4 if dtype == torch.float32 else 0.5)
    if bias:
        _close(b.grad, b64.grad, dtype, atol=1e-4 if dtype == torch.float32 else 0.5)
    with torch.no_grad():
        full = et.linear(x, w, b)
        for m in (1, 3, 17, 64, 65):  # a decode row, small batches, a whole tile and one past it
            assert torch.equal(et.linear(x[:m], w, b), full[:m]), m
            assert torch.equal(et.linear(x[-m:], w, b), full[-m:]), m  # rows at other tile offsets


# ----------------------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_the_module_and_is_row_invariant(tiles, dtype):
    from fastrft.models.layers import RMSNorm

    gen = torch.Generator().manual_seed(2)
    x = (3 * torch.randn(37, 2, 24, generator=gen)).to(dtype).requires_grad_()
    norm = RMSNorm(24, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24, generator=gen))
    y = et.rms_norm(x, norm.weight, norm.eps)
    x64 = x.detach().double().requires_grad_()
    w64 = norm.weight.detach().double().requires_grad_()
    ref = w64 * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5))
    # bf16: the normalised row is rounded to bf16 before the weight multiply (the module's formula).
    _close(y, ref.detach(), dtype, atol=1e-6 if dtype == torch.float32 else 2 * BF16_REL * 3)
    g = torch.randn(37, 2, 24, generator=gen)
    y.backward(g.to(dtype))
    ref.backward(g.double())
    _close(x.grad, x64.grad, dtype, atol=1e-5 if dtype == torch.float32 else 0.1)
    _close(norm.weight.grad, w64.grad, dtype, atol=1e-4 if dtype == torch.float32 else 1.0)
    with torch.no_grad():
        full = et.rms_norm(x, norm.weight, norm.eps)
        assert all(torch.equal(et.rms_norm(x[:m], norm.weight, norm.eps), full[:m]) for m in (1, 5))


# ----------------------------------------------------------------------------------------- attention
LENS = [5, 70, 1, 130]  # crosses 64-key tiles, a one-token sequence
HQ, HKV, D = 4, 2, 24  # GQA, a head dim that is not a power of two


def _packed(dtype, seed=3):
    gen = torch.Generator().manual_seed(seed)
    t = sum(LENS)
    q, k, v = (torch.randn(t, h, D, generator=gen).to(dtype) for h in (HQ, HKV, HKV))
    cu = torch.tensor([0, *torch.tensor(LENS).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


def _attention_reference(q, k, v, cu, scale):
    out = torch.empty_like(q)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        kk = k[s:e].repeat_interleave(HQ // HKV, 1)
        vv = v[s:e].repeat_interleave(HQ // HKV, 1)
        scores = torch.einsum("qhd,khd->hqk", q[s:e], kk) * scale
        scores = scores.masked_fill(torch.ones(e - s, e - s, dtype=torch.bool).triu(1), float("-inf"))
        out[s:e] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_forward_and_backward_match_float64(tiles, dtype):
    q, k, v, cu = _packed(dtype)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    scale = D**-0.5
    out = et.packed_attention(q, k, v, cu, scale)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = _attention_reference(q64, k64, v64, cu, scale)
    _close(out, ref.detach(), dtype, atol=1e-6 if dtype == torch.float32 else 4e-3)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    out.backward(g.to(dtype))
    ref.backward(g.double())
    tol = 1e-5 if dtype == torch.float32 else 0.05
    for a, b in ((q, q64), (k, k64), (v, v64)):
        _close(a.grad, b.grad, dtype, atol=tol)


def _paged_cache(k, v, cu, page, num_blocks, gen):
    """Write each sequence's K/V into shuffled pages; returns caches and block tables."""
    kc = torch.zeros(num_blocks, page, HKV, D, dtype=k.dtype)
    vc = torch.zeros_like(kc)
    width = max(-(-n // page) for n in LENS)
    tables = torch.full((len(LENS), width), -1, dtype=torch.int32)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    for b, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        for j in range(-(-(e - s) // page)):
            blk = free.pop()
            tables[b, j] = blk
            n = min(page, e - s - j * page)
            kc[blk, :n] = k[s + j * page:s + j * page + n]
            vc[blk, :n] = v[s + j * page:s + j * page + n]
    return kc, vc, tables


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_prefill_chunks_and_decode_give_a_query_the_same_bits(tiles, dtype):
    """Every token's attention output, computed (1) in the packed training forward, (2) by a paged
    prefill of the second half of each sequence over its cached first half (chunked prefill, prefix
    cache), (3) by one-token decode at its own position, over shuffled pages: bit for bit equal."""
    q, k, v, cu = _packed(dtype)
    scale = D**-0.5
    gen = torch.Generator().manual_seed(5)
    packed = et.packed_attention(q, k, v, cu, scale)
    page = 16
    kc, vc, tables = _paged_cache(k, v, cu, page, 40, gen)
    starts = cu[:-1].tolist()
    # (2) each sequence's last ceil(n / 2) tokens as a prefill batch
    new = [-(-n // 2) for n in LENS]
    rows = torch.cat([torch.arange(s + n - m, s + n) for s, n, m in zip(starts, LENS, new)])
    meta = PagedMeta(is_prefill=True, slot_mapping=torch.zeros(0, dtype=torch.long), block_tables=tables,
                     context_lens=torch.tensor(LENS, dtype=torch.int32),
                     cu_seqlens_q=torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32),
                     has_prefix=True)
    prefill = TRITON.paged_attention(q[rows], None, None, kc, vc, meta, scale)
    assert torch.equal(prefill, packed[rows])
    # (3) decode: a batch of one query per sequence at assorted positions, in a shuffled order
    for pick in (0, 3, 64, 69, 129):
        seqs = [b for b, n in enumerate(LENS) if pick < n]
        order = torch.randperm(len(seqs), generator=gen).tolist()
        seqs = [seqs[i] for i in order]
        rows = torch.tensor([starts[b] + pick for b in seqs])
        meta = PagedMeta(is_prefill=False, slot_mapping=torch.zeros(0, dtype=torch.long),
                         block_tables=tables[seqs], context_lens=torch.full((len(seqs),), pick + 1, dtype=torch.int32))
        assert torch.equal(TRITON.paged_attention(q[rows], None, None, kc, vc, meta, scale), packed[rows]), pick
    # a sequence packed alone, or with others, gives the same bits
    alone = et.packed_attention(q[starts[3]:], k[starts[3]:], v[starts[3]:], torch.tensor([0, 130], dtype=torch.int32),
                                scale)
    assert torch.equal(alone, packed[starts[3]:])


# ----------------------------------------------------------------------------------------- LM head + sampler
def test_lm_head_rows_and_the_sampler_share_the_trainers_logprob():
    """logits_stats gives a row the same logp whatever the row count (the splits are merged per row in
    order), and sample_head's log-prob of the token it draws is the trainer kernel's for that token."""
    gen = torch.Generator().manual_seed(6)
    n, h, v = 40, 64, 300
    hidden = torch.randn(n, h, generator=gen).to(torch.bfloat16)
    weight = torch.randn(v, h, generator=gen).to(torch.bfloat16)
    seeds = torch.arange(100, 100 + n, dtype=torch.long)
    positions = torch.arange(n, dtype=torch.long) % 7
    for inv_t in (1.0 / 0.7, 0.0):
        draws = et.sample_head(hidden, weight, seeds, positions, inv_t)
        tokens = draws[0].long()
        assert bool((tokens >= 0).all())
        logp_sampler = draws[1].view(torch.float32)
        temperature = 0.7 if inv_t else 1.0
        for splits in (None, 3):  # one split (the interpreter's tile at this V), and a merge of three
            lp, lse, _, _ = head.logits_stats(hidden, weight, tokens, temperature, False, splits=splits)
            if splits is None:
                assert torch.equal(lp, logp_sampler), inv_t  # bit for bit, the exact mode's claim
            for m in (1, 2, 7):
                lp_m, _, _, _ = head.logits_stats(hidden[:m], weight, tokens[:m], temperature, False, splits=splits)
                assert torch.equal(lp_m, lp[:m]), (splits, m)
        # The token itself: the sampler's Gumbel race over the trainer's logits.
        z = (hidden.double() @ weight.double().T) * (inv_t or 1.0)
        ref = z.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
        assert torch.allclose(logp_sampler.double(), ref, atol=1e-4)
        if not inv_t:
            assert torch.equal(tokens, z.argmax(1))


def test_the_exact_head_reads_the_temperature_from_memory_as_it_would_from_an_argument():
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(5, 64, generator=gen)
    weight = torch.randn(130, 64, generator=gen)
    tgt = torch.arange(5, dtype=torch.long)
    z1, z2 = torch.empty(5, 130), torch.empty(5, 130)
    a = head.logits_stats(hidden, weight, tgt, 0.7, True, z_out=z1)
    b = head.logits_stats(hidden, weight, tgt, 1.0, True, z_out=z2, inv_temperature=torch.tensor([1 / 0.7]))
    assert torch.equal(z1, z2) and all(torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------- the decode graph
def test_the_decode_graph_samples_the_trainers_logprobs(tiny_llama, monkeypatch):
    """The engine's CUDA decode path (the step captured as a graph, here replayed eagerly on CPU tensors;
    the LM head and sampler inside it read 1/T from a device scalar) with the exact Triton ops: every
    sampled token's log-prob is the trainer's (the fused LM-head kernel over the training forward's
    hidden states) bit for bit."""
    import fastrft.engine.model_runner as model_runner
    from fastrft.engine import Engine, EngineConfig
    from fastrft.kernels.linear_logprob import linear_logprob
    from fastrft.models.loader import load_model

    def eager(fn, pool):
        out = fn()

        class Replay:
            def replay(self):
                out.copy_(fn())

            def pool(self):
                return None

        return Replay(), out

    model = load_model(tiny_llama, dtype=torch.bfloat16)
    model.set_ops(ops.get("exact-triton"))
    prompts, temperature = [[2, 5, 6, 7], [2, 9, 9, 4, 4, 8, 3]], 0.8
    # The graph path against eager decode, for every backend: tests/engine/test_decode_graph.py.
    monkeypatch.setattr(model_runner, "GRAPH_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(model_runner, "cuda_graph_capture", eager)
    engine = Engine(model, config=EngineConfig(kv_cache_memory=2**20, max_num_seqs=4, max_model_len=64))
    assert engine.runner.graphs is not None
    out = engine.generate(prompts, n=2, max_new_tokens=6, temperature=temperature, seed=3, eos_token_ids=[])
    results = {True: [(c.token_ids, c.logprobs) for group in out for c in group]}

    def trainer_logprobs(results):
        seqs = [(prompts[i // 2], toks) for i, (toks, _) in enumerate(results)]
        ids = torch.tensor([t for p, toks in seqs for t in p + toks])
        lens = [len(p) + len(toks) for p, toks in seqs]
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        with torch.no_grad():
            hidden = model.forward_packed(ids, cu)
        rows = torch.tensor([s + len(p) - 1 + j for (p, toks), s in zip(seqs, cu[:-1].tolist())
                             for j in range(len(toks))])
        targets = torch.tensor([t for _, toks in seqs for t in toks])
        logp, _ = linear_logprob(hidden[rows], model.lm_head_weight, targets, temperature=temperature,
                                 backend="triton")
        return logp, torch.tensor([lp for _, lps in results for lp in lps])

    trainer, sampled = trainer_logprobs(results[True])
    assert torch.equal(trainer, sampled)
    # The mode off (the default ops, the same trainer kernel): the log-probs differ, so the check can fail.
    model.set_ops(ops.PLAIN)
    engine = Engine(model, config=EngineConfig(kv_cache_memory=2**20, max_num_seqs=4, max_model_len=64,
                                               cuda_graphs=False))
    out = engine.generate(prompts, n=2, max_new_tokens=6, temperature=temperature, seed=3, eos_token_ids=[])
    trainer, sampled = trainer_logprobs([(c.token_ids, c.logprobs) for group in out for c in group])
    assert not torch.equal(trainer, sampled)
    assert torch.allclose(trainer, sampled, atol=0.5)  # the same distribution, up to bf16 rounding
