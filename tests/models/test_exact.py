"""Exact on-policy mode (--exact-logprobs): the sampler's log-probs equal the trainer's bit for bit.

The end-to-end check is a multi-round run built to exercise everything that batches a token
differently: G = 8 samples sharing their prompt's KV, responses of varied length, a token budget that
cuts both the engine's prefill and the optimizer step into pieces, and a KV cache so small that the
engine preempts and recomputes sequences. Every round's logp_gap_max must be exactly 0, in fp32 and in
bf16-mixed, and it is not 0 with the mode off (the test would catch a mode that does nothing).
World size 2 is checked on the runs of tests/loop/test_distributed.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import exact_config, untimed
from conftest import run_counting_preemptions as run
from fastrft.config import EvalConfig, ModelConfig
from fastrft.errors import ConfigError
from fastrft.models import exact, ops, row_rules
from fastrft.trainer import Trainer



@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_sampler_and_trainer_logprobs_agree_bit_for_bit(tiny_llama, tmp_path, precision):
    cfg = exact_config(tiny_llama, tmp_path / "on", precision=precision, ppo_epochs=2, mini_batches=2)
    trainer, rounds, preempted = run(cfg, count_preemptions=True)
    assert trainer.ops.exact
    assert preempted > 0  # the small cache forced recomputation
    assert max(r["micro_batches"] for r in rounds) > 1  # the budget cut the steps
    trained = [r for r in rounds if not r["skipped"]]
    assert trained, "no round trained; the check would be empty"
    assert [r["logp_gap_max"] for r in trained] == [0.0] * len(trained)
    # The same run with the mode off: the gap is back, so the check above can fail.
    _, off_rounds, _ = run(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, exact_logprobs="off"),
                                               run=dataclasses.replace(cfg.run, out=str(tmp_path / "off"))))
    assert max(r["logp_gap_max"] for r in off_rounds if not r["skipped"]) > 0


def test_the_cuda_path_is_exact_too(tiny_llama, tmp_path, precision="bf16-mixed"):
    """The exact mode's CUDA path (--kernels triton: every linear layer, norm, attention and the LM head
    through fastrft.kernels.exact_triton, the sampler drawing from the trainer's LM-head kernel), run in
    the Triton interpreter on CPU: the same multi-round check, in bf16-mixed (the CUDA default; fp32 goes
    through the same kernels, tests/kernels/test_exact_triton.py), with one PPO epoch of 2 mini-batches (the old
    log-probs are still the rollout's). About 45 s: the interpreter runs every program in Python."""
    from fastrft.kernels import exact_triton

    if not exact_triton.available(torch.device("cpu")):
        pytest.skip("needs triton and TRITON_INTERPRET=1 (conftest sets it without a GPU)")
    cfg = exact_config(tiny_llama, tmp_path / "on", precision=precision, rounds=2, mini_batches=2)
    # The interpreter runs each kernel program in Python: the evaluations shrink to one short answer.
    cfg = cfg.replace(model=dataclasses.replace(cfg.model, kernels="triton"),
                      rollout=dataclasses.replace(cfg.rollout, max_new_tokens=8),  # 8 x (prompt + 8) > the cache
                      eval=EvalConfig(eval_every=0, train_samples=1, test_size=1, greedy=False, eval_max_new_tokens=2,
                                      train_eval_size=1))
    trainer, rounds, preempted = run(cfg, count_preemptions=True)
    assert trainer.ops.name == "exact-triton"
    assert type(trainer.engine.runner.head).__name__ == "FusedHead"  # the trainer's LM-head kernel samples
    assert preempted > 0 and max(r["micro_batches"] for r in rounds) > 1
    trained = [r for r in rounds if not r["skipped"]]
    assert trained
    assert [r["logp_gap_max"] for r in trained] == [0.0] * len(trained)


def test_skipping_the_old_logprob_pass_changes_nothing(tiny_llama, tmp_path, monkeypatch):
    """In exact mode PPO's old log-probs are the rollout's; the run equals one that recomputes them."""
    from fastrft.loop.learner import Learner

    cfg = exact_config(tiny_llama, tmp_path / "skip", rounds=2, ppo_epochs=2, mini_batches=2)

    def refuse(self, train):
        raise AssertionError("exact mode recomputed the old log-probs")

    monkeypatch.setattr(Learner, "recompute_old_logprobs", refuse)
    skip_trainer, skipped, _ = run(cfg)
    monkeypatch.undo()
    monkeypatch.setattr(Learner, "rollout_logprobs", lambda self, train: Learner.recompute_old_logprobs(self, train))
    recompute_trainer, recomputed, _ = run(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run,
                                                                                          out=str(tmp_path / "re"))))

    def strip(records):
        return untimed(records)

    assert strip(skipped) == strip(recomputed)
    a, b = skip_trainer.precision.master.state_dict(), recompute_trainer.precision.master.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_that_switches_the_mode_is_a_config_change(tiny_llama, tmp_path):
    out = tmp_path / "run"
    run(exact_config(tiny_llama, out, rounds=1))
    with pytest.raises(ConfigError, match="exact_logprobs"):
        Trainer(exact_config(tiny_llama, out, rounds=2, mode="off"))


def test_options_that_cannot_be_exact_are_refused_with_the_reason(tiny_llama, tmp_path):
    cfg = exact_config(tiny_llama, tmp_path / "x")
    topp = cfg.replace(rollout=dataclasses.replace(cfg.rollout, top_p=0.9))
    with pytest.raises(ConfigError, match="top-p"):
        exact.resolve(topp, torch.device("cpu"))
    # CUDA runs the Triton kernels (fastrft.kernels.exact_triton); cuBLAS's log-probs cannot be exact.
    assert exact.resolve(cfg, torch.device("cuda")) == "exact-triton"
    assert exact.resolve(cfg, torch.device("cpu")) == "exact-torch"
    reference = cfg.replace(model=dataclasses.replace(cfg.model, kernels="reference"))
    with pytest.raises(ConfigError, match="cuBLAS"):
        exact.resolve(reference, torch.device("cuda"))
    # A head dim past the CUDA kernels' tile table is refused when the mode is switched on, before a run.
    wide = type("Wide", (), {"config": type("C", (), {"head_dim": 320})(), "set_ops": lambda *a: None})()
    with pytest.raises(exact.ExactModeError, match="head_dim <= 256"):
        exact.enable([wide], torch.bfloat16, torch.device("cuda"), "exact-triton")
    with pytest.raises(ConfigError, match="TRITON_INTERPRET"):
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("TRITON_INTERPRET", raising=False)
            exact.resolve(cfg.replace(model=dataclasses.replace(cfg.model, kernels="triton")), torch.device("cpu"))
    auto = cfg.replace(model=dataclasses.replace(cfg.model, exact_logprobs="auto"))
    ppo = auto.replace(algo=dataclasses.replace(auto.algo, ppo_epochs=2))
    assert exact.resolve(ppo, torch.device("cpu"), "fp32") == "exact-torch"  # where it costs <= 5%
    assert exact.resolve(auto, torch.device("cpu"), "fp32") == "plain"  # one step per round: 1.10x
    assert exact.resolve(ppo, torch.device("cpu"), "bf16-mixed") == "plain"
    assert exact.resolve(ppo.replace(rollout=topp.rollout), torch.device("cpu"), "fp32") == "plain"
    assert exact.resolve(ppo, torch.device("cuda"), "fp32") == "plain"  # its GPU cost is not measured yet
    with pytest.raises(ConfigError, match="exact-logprobs"):
        ModelConfig(exact_logprobs="yes")


# ----------------------------------------------------------------------------------------- the ops
def _reference_attention(q, k, v, scale):
    """Causal attention of one sequence in float64: q (L, Hq, D), k/v (L, Hkv, D)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    s = s.masked_fill(torch.ones(q.shape[0], q.shape[0], dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiled_attention_is_batch_invariant_and_matches_float64(dtype):
    """Odd lengths across tiles, GQA 3:1: packed with other sequences, alone, or one query at a time
    from pages (decode), a query's output has the same bits; and it is the float64 reference's to fp32
    rounding (bf16 inputs widen exactly; the output rounds once to bf16)."""
    from fastrft.models.paged import PagedMeta

    g = torch.Generator().manual_seed(0)
    lens, hq, hkv, d, page = [131, 7, 64, 65], 6, 2, 24, 16
    qs = [torch.randn(n, hq, d, generator=g).to(dtype) for n in lens]
    ks = [torch.randn(n, hkv, d, generator=g).to(dtype) for n in lens]
    vs = [torch.randn(n, hkv, d, generator=g).to(dtype) for n in lens]
    scale = d ** -0.5
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    packed = exact.packed_attention(torch.cat(qs), torch.cat(ks), torch.cat(vs), cu, scale)
    for i, n in enumerate(lens):
        alone = exact.packed_attention(qs[i], ks[i], vs[i], torch.tensor([0, n], dtype=torch.int32), scale)
        assert torch.equal(alone, packed[cu[i]:cu[i + 1]])
        ref = _reference_attention(qs[i], ks[i], vs[i], scale)
        tol = 1e-5 if dtype == torch.float32 else 8e-3
        torch.testing.assert_close(alone.double(), ref, atol=tol, rtol=tol)
    # Decode from a paged cache holding sequence 0 in shuffled blocks: position t alone, batched with t + 3.
    n = lens[0]
    blocks = torch.randperm(-(-n // page) + 2, generator=g)[: -(-n // page)]
    kc = torch.randn(len(blocks) + 2, page, hkv, d, generator=g).to(dtype)  # finite garbage past the context
    vc = torch.randn_like(kc)
    slots = (blocks[:, None] * page + torch.arange(page)).flatten()[:n]
    kc.view(-1, hkv, d)[slots], vc.view(-1, hkv, d)[slots] = ks[0], vs[0]
    table = blocks[None].int()
    for t in (0, 63, 64, 100, n - 4):
        both = [t, t + 3]
        meta = PagedMeta(is_prefill=False, slot_mapping=torch.zeros(2, dtype=torch.long),
                         block_tables=table.expand(2, -1), context_lens=torch.tensor([x + 1 for x in both]))
        out = exact.paged_attention(torch.stack([qs[0][x] for x in both]), kc, vc, meta, scale)
        assert torch.equal(out[0], packed[t]) and torch.equal(out[1], packed[t + 3])


def test_bf16_linear_is_row_count_invariant():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 40, generator=g).bfloat16()
    b = torch.randn(96, generator=g).bfloat16()
    x = torch.randn(300, 40, generator=g).bfloat16()
    full = exact.linear(x, w, b)
    for m in (1, 5, 32, 33, 77, 299):
        assert torch.equal(exact.linear(x[:m], w, b), full[:m])
    # The backward is the plain one: gradients as F.linear's.
    xr, wr = x[:50].clone().requires_grad_(), w.clone().requires_grad_()
    exact.linear(xr, wr, None).float().sum().backward()
    xp, wp = x[:50].clone().requires_grad_(), w.clone().requires_grad_()
    torch.nn.functional.linear(xp, wp).float().sum().backward()
    assert torch.equal(xr.grad, xp.grad) and torch.equal(wr.grad, wp.grad)


def test_the_engines_prepacked_bf16_gemm_equals_the_training_forwards():
    """The engine and the KL reference multiply by oneDNN's pre-packed weights (no grad) where the probe
    found them on this CPU; the training forward multiplies plain blocks. Same bits at every row count,
    with a bias, and a weight that changes in place (an optimizer step) is repacked, not read stale."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(200, 72, generator=g).bfloat16().requires_grad_()
    b = torch.randn(200, generator=g).bfloat16()
    x = torch.randn(150, 72, generator=g).bfloat16()
    if not row_rules.choose(row_rules.Site("linear", 72, 200, torch.bfloat16, True)).packed:
        pytest.skip("this CPU or torch build has no oneDNN pre-packed bf16 linear (tests/models/test_row_rules.py "
                    "covers the unpacked path)")
    for m in (1, 7, 32, 33, 64, 150):
        trained = exact.linear(x[:m], w, b)  # grad mode: the training forward's blocks
        with torch.no_grad():
            assert torch.equal(exact.linear(x[:m], w, b), trained)
    with torch.no_grad():
        before = exact.linear(x, w, b)
        w.mul_(-0.5)  # an in-place update, as the optimizer's refresh of the compute copy
        after = exact.linear(x, w, b)
    assert torch.equal(after, exact.ruled_linear(x, w.detach(), b, packed=False))
    assert not torch.equal(after, before)


def test_micro_batches_of_one_give_the_same_gradient_in_exact_mode(tiny_llama):
    """Issue 24's micro-batch observation: with the default attention a sequence alone takes another SDPA
    batch shape than in a group, and the gradient norm moves in the last bits; with the exact ops a step
    split into micro-batches of one sequence gives the gradient of the unsplit step, bit for bit."""
    from fastrft.models import load_model

    torch.manual_seed(0)
    seqs = [torch.randint(3, 80, (40,)) for _ in range(4)]

    def grads(model, groups):
        model.zero_grad()
        for group in groups:
            ids = torch.cat([seqs[i] for i in group])
            cu = torch.tensor([0, *torch.tensor([40] * len(group)).cumsum(0).tolist()], dtype=torch.int32)
            hidden = model.forward_packed(ids, cu)
            (hidden.float().square().mean() * len(group)).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    model = load_model(str(tiny_llama), dtype=torch.float32)
    model.set_ops(ops.get("exact-torch"))
    whole, ones = grads(model, [[0, 1, 2, 3]]), grads(model, [[0], [1], [2], [3]])
    torch.testing.assert_close(whole, ones)  # same gradient up to the order the micro-batches add up
    model.set_ops(ops.PLAIN)
    d_whole, d_ones = grads(model, [[0, 1, 2, 3]]), grads(model, [[0], [1], [2], [3]])
    torch.testing.assert_close(d_whole, d_ones, atol=1e-5, rtol=1e-4)


def test_tiled_attention_backward_matches_float64():
    """The training backward (textbook formula from the kept probabilities) against autograd through the
    float64 reference, two sequences across tile boundaries, GQA 2:1."""
    g = torch.Generator().manual_seed(2)
    lens, hq, hkv, d = [70, 9], 4, 2, 16
    q, k, v = (torch.randn(sum(lens), h, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
    up = torch.randn(sum(lens), hq, d, generator=g, dtype=torch.float64)
    cu = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32)
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    (exact.packed_attention(qf, kf, vf, cu, d ** -0.5).double() * up).sum().backward()
    qd, kd, vd = (t.clone().requires_grad_() for t in (q, k, v))
    out = torch.cat([_reference_attention(qd[a:b], kd[a:b], vd[a:b], d ** -0.5) for a, b in ((0, 70), (70, 79))])
    (out * up).sum().backward()
    for got, want in ((qf.grad, qd.grad), (kf.grad, kd.grad), (vf.grad, vd.grad)):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("vocab", [80, 999, 40000])
def test_log_partition_is_row_count_invariant(vocab):
    """kernels.rows: a row's exp, sum and log give the same bits alone, in a batch, or at an odd offset;
    and the sampler's log-prob of a token equals the trainer's formula on the same logits."""
    from fastrft.kernels.linear_logprob import linear_logprob
    from fastrft.kernels.rows import exp_shifted_, log_rows, row_sums
    from fastrft.kernels.sampling import sample_tokens

    g = torch.Generator().manual_seed(vocab)
    z = torch.randn(37, vocab, generator=g) * 4

    def logz(rows):
        shifted = rows - rows.amax(1, keepdim=True)
        return log_rows(row_sums(exp_shifted_(shifted)))

    full = logz(z.clone())
    for a, b in ((0, 1), (5, 6), (3, 20), (36, 37), (1, 37)):
        assert torch.equal(logz(z[a:b].clone()), full[a:b])
    # The sampler (one row per decoding sequence) against the trainer's chunked kernel, on logits made
    # exactly z by one-hot hidden states and a head whose first 37 columns are z's rows.
    if vocab <= 1000:
        h = torch.eye(vocab)[:37]
        w = torch.cat([z, torch.zeros(vocab - 37, vocab)]).T.contiguous()
        draws = sample_tokens(z.clone(), torch.arange(37), torch.zeros(37, dtype=torch.long), 1.0)
        trainer, _ = linear_logprob(h, w, draws[0].long(), backend="reference")
        assert torch.equal(trainer, draws[1].view(torch.float32))


@pytest.mark.parametrize("family", ["qwen3", "olmo2"])
def test_other_families_are_exact_too(tiny_models, tmp_path, family):
    """Per-head q/k norms with a head dim of 24 (Qwen3), full-width q/k norms after each sublayer (OLMo-2)."""
    cfg = exact_config(tiny_models[family], tmp_path / "run", rounds=2, ppo_epochs=2)
    cfg = cfg.replace(rollout=dataclasses.replace(cfg.rollout, kv_cache_memory=None))
    _, rounds, _ = run(cfg)
    trained = [r for r in rounds if not r["skipped"]]
    assert trained and [r["logp_gap_max"] for r in trained] == [0.0] * len(trained)
