"""fused_linear_pg_loss (Triton forward/backward over the vocabulary, the foundation's pg_loss spec on the
per-token vectors) against the same loss with float64 materialised logits, for every loss variant and
aggregation, forward value, gradients (with a random upstream gradient) and stats; and a tiny-model RL
run whose learning curve through the kernel equals the one through the PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from conftest import train_and_collect
from fastrft.config import (AlgoConfig, DataConfig, EvalConfig, ModelConfig, OptimConfig, RolloutConfig, RunConfig,
                            TrainConfig)
from fastrft.kernels import HAVE_TRITON, PGLossSpec, fused_linear_pg_loss, fused_linear_pg_loss_reference

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed (pip install 'fastrft[test]')")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

SPECS = {
    "reinforce-token-mean": PGLossSpec(),
    "clip-seq-mean-token-mean": PGLossSpec(clip_low=0.1, clip_high=0.3, aggregation="seq-mean-token-mean"),
    "dual-clip-seq-mean-token-sum": PGLossSpec(dual_clip=1.5, aggregation="seq-mean-token-sum"),
    "kl-k1-sum-norm": PGLossSpec(kl_coef=0.1, kl_estimator="k1", aggregation="seq-mean-token-sum-norm", max_len=16),
    "kl-k2": PGLossSpec(kl_coef=0.2, kl_estimator="k2"),
    "kl-k3-entropy": PGLossSpec(kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01,
                                aggregation="seq-mean-token-mean"),
    "entropy-only": PGLossSpec(entropy_coef=0.1, aggregation="seq-mean-token-sum"),
}


def _batch(n=41, h=32, v=515, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * 0.5).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 0.5).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    seq_ids = torch.tensor(sorted(torch.randint(0, 5, (n,), generator=g).tolist()))  # 5 ragged sequences
    adv = torch.randn(5, generator=g)[seq_ids]
    with torch.no_grad():
        logits = hidden.double() @ weight.double().T
        logp = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    # old/ref log-probs near the current ones, so that ratios land on both sides of the clip range
    old = (logp + 0.4 * torch.randn(n, generator=g, dtype=torch.float64)).float()
    ref = (logp + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)).float()
    to = lambda t: t.to(DEVICE)  # noqa: E731
    return to(hidden), to(weight), to(targets), to(adv), to(seq_ids), to(old), to(ref)


def _loss_and_grads(fn, hidden, weight, upstream, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss, stats = fn(h, w, **kw)
    (loss * upstream).backward()
    return loss.detach().double(), stats, h.grad.double(), w.grad.double()


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("on_policy", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
@pytest.mark.parametrize("backend,chunk", [("triton", None), ("triton", 16), ("reference", 7)])
def test_every_variant_matches_float64_reference(name, on_policy, temperature, backend, chunk):
    """The gradient formed in the forward, chunk by chunk (41 rows: one chunk, or 16+16+9, or 7 x 5 + 6
    on the PyTorch path), against autograd through float64 logits."""
    hidden, weight, targets, adv, seq_ids, old, ref = _batch(seed=len(name))
    spec = SPECS[name]
    kw = dict(targets=targets, advantages=adv, seq_ids=seq_ids, old_logp=None if on_policy else old,
              ref_logp=ref if spec.needs_ref else None, spec=spec, temperature=temperature)
    upstream = 1.7  # a random-looking scalar upstream gradient: the loss is scaled, not just differentiated
    got = _loss_and_grads(lambda h, w, **k: fused_linear_pg_loss(h, w, backend=backend, chunk=chunk, **k), hidden,
                          weight, upstream, **kw)
    want = _loss_and_grads(fused_linear_pg_loss_reference, hidden.double(), weight.double(), upstream, **kw)
    # fp32 accumulation in the kernel vs float64: log-probs agree to ~1e-6, so the O(1) loss to ~1e-6 and
    # the gradients to ~1e-6 of their largest entry; 2e-5 leaves a 10x margin.
    assert abs(float(got[0] - want[0])) <= 2e-5 * max(1.0, abs(float(want[0])))
    for g_got, g_want in ((got[2], want[2]), (got[3], want[3])):
        assert (g_got - g_want).abs().max() <= 2e-5 * g_want.abs().max().clamp_min(1e-12)
    for key in ("logp_mean", "entropy_mean", "kl_mean", "clip_frac_low", "clip_frac_high", "ratio_min", "ratio_max"):
        assert got[1][key] == pytest.approx(want[1][key], abs=2e-5), key
    if not on_policy and name.startswith("clip"):
        assert got[1]["clip_frac_low"] > 0 and got[1]["clip_frac_high"] > 0  # both clip branches exercised


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    hidden, weight, targets, adv, seq_ids, old, ref = _batch(dtype=dtype, seed=3)
    spec = SPECS["kl-k3-entropy"]
    kw = dict(targets=targets, advantages=adv, seq_ids=seq_ids, old_logp=old, ref_logp=ref, spec=spec)
    got = _loss_and_grads(lambda h, w, **k: fused_linear_pg_loss(h, w, backend="triton", **k), hidden, weight, 1.0,
                          **kw)
    want = _loss_and_grads(fused_linear_pg_loss_reference, hidden.double(), weight.double(), 1.0, **kw)
    # The reference sees the same rounded inputs: the loss carries only fp32 accumulation error; the
    # gradients are returned in the input dtype, so they carry its rounding (2 eps of the largest entry).
    eps = 2.0**-10 if dtype == torch.float16 else 2.0**-7
    assert abs(float(got[0] - want[0])) <= 1e-4
    for g_got, g_want in ((got[2], want[2]), (got[3], want[3])):
        assert (g_got - g_want).abs().max() <= 2 * eps * g_want.abs().max()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_only_one_operand_needs_grad_and_no_grad_mode(backend):
    """Gradient-in-forward skips the GEMM nobody asked for, and without autograd the loss is the plain
    forward pass: same value, no graph."""
    hidden, weight, targets, adv, seq_ids, old, ref = _batch(seed=8)
    spec = SPECS["kl-k3-entropy"]
    kw = dict(old_logp=old, ref_logp=ref, spec=spec, backend=backend, chunk=16)
    want = _loss_and_grads(fused_linear_pg_loss_reference, hidden.double(), weight.double(), 1.0, targets=targets,
                           advantages=adv, seq_ids=seq_ids, old_logp=old, ref_logp=ref, spec=spec)
    h = hidden.clone().requires_grad_()
    loss, _ = fused_linear_pg_loss(h, weight, targets, adv, seq_ids, **kw)
    loss.backward()
    assert (h.grad.double() - want[2]).abs().max() <= 2e-5 * want[2].abs().max()
    w = weight.clone().requires_grad_()
    loss, _ = fused_linear_pg_loss(hidden, w, targets, adv, seq_ids, **kw)
    loss.backward()
    assert (w.grad.double() - want[3]).abs().max() <= 2e-5 * want[3].abs().max()
    with torch.no_grad():
        plain, _ = fused_linear_pg_loss(hidden.clone().requires_grad_(), weight, targets, adv, seq_ids, **kw)
    assert plain.grad_fn is None and abs(float(plain) - float(want[0])) <= 2e-5


def test_second_backward_is_refused_with_a_clear_error():
    hidden, weight, targets, adv, seq_ids, _, _ = _batch(seed=9)
    h = hidden.clone().requires_grad_()
    loss, _ = fused_linear_pg_loss(h, weight, targets, adv, seq_ids, spec=PGLossSpec(), backend="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward only"):
        loss.backward()


def test_no_tensor_of_size_n_times_v():
    """Memory stays flat in N: with 8 chunks, no buffer the loss allocates is larger than one chunk's fp32
    logits (C x V x 4 bytes) or the fp32 dW, while N x V would be 8 times the former."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        nbytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    Largest.nbytes = max(Largest.nbytes, t.untyped_storage().nbytes())
            return out

    n, h, v, chunk = 256, 16, 999, 32
    hidden, weight, targets, adv, seq_ids, _, _ = _batch(n=n, h=h, v=v, seed=10)
    hidden.requires_grad_()
    weight.requires_grad_()
    for backend in ("triton", "reference"):
        Largest.nbytes = 0
        with Largest():
            loss, _ = fused_linear_pg_loss(hidden, weight, targets, adv, seq_ids, spec=PGLossSpec(entropy_coef=0.1),
                                           backend=backend, chunk=chunk)
            loss.backward()
        assert 4 * chunk * v <= Largest.nbytes <= 4 * max(chunk * v, v * h, n * h), backend


def test_sequence_without_signal_gets_exactly_zero_gradient():
    """A sequence whose every token has advantage 0 (and no KL/entropy term) is fully masked out of the
    loss: its hidden rows must receive exactly zero gradient, not rounding noise."""
    hidden, weight, targets, adv, seq_ids, _, _ = _batch(seed=4)
    adv = torch.where(seq_ids == seq_ids[0], torch.zeros_like(adv), adv)
    h = hidden.clone().requires_grad_()
    loss, _ = fused_linear_pg_loss(h, weight, targets, adv, seq_ids, spec=PGLossSpec(), backend="triton")
    loss.backward()
    masked = seq_ids == seq_ids[0]
    assert torch.count_nonzero(h.grad[masked]) == 0
    assert torch.count_nonzero(h.grad[~masked]) > 0


def test_logp_gap_stat_against_rollout_logprobs():
    hidden, weight, targets, adv, seq_ids, old, _ = _batch(seed=5)
    loss, stats = fused_linear_pg_loss(hidden, weight, targets, adv, seq_ids, spec=PGLossSpec(), rollout_logp=old,
                                       backend="triton")
    _, ref_stats = fused_linear_pg_loss(hidden, weight, targets, adv, seq_ids, spec=PGLossSpec(), rollout_logp=old,
                                        backend="reference")
    assert stats["logp_gap_max"] == pytest.approx(ref_stats["logp_gap_max"], abs=1e-5) and stats["logp_gap_max"] > 0.1


def test_shape_mismatch_is_refused():
    hidden, weight, targets, adv, seq_ids, _, _ = _batch(seed=6)
    with pytest.raises(ValueError, match="advantages has shape"):
        fused_linear_pg_loss(hidden, weight, targets, adv[:-1], seq_ids, spec=PGLossSpec(), backend="triton")
    with pytest.raises(ValueError, match="needs ref_logp"):
        fused_linear_pg_loss(hidden, weight, targets, adv, seq_ids, spec=PGLossSpec(kl_coef=0.1), backend="triton")


def _trainer_run(model_dir, out, kernels):
    cfg = TrainConfig(
        model=ModelConfig(model=str(model_dir), kernels=kernels),
        data=DataConfig(dataset="arithmetic", level="add1", example_index=(0,)),
        rollout=RolloutConfig(group_size=6, max_new_tokens=3, temperature=0.9),
        algo=AlgoConfig(advantage="grpo", kl_coef=0.05, entropy_coef=0.01, aggregation="seq-mean-token-mean"),
        optim=OptimConfig(lr=3e-3),
        eval=EvalConfig(eval_every=0, train_samples=8, test_size=4, greedy=False),
        run=RunConfig(rounds=8, seed=1, out=str(out), progress=False, log_samples=0),
    )
    return train_and_collect(cfg)


def test_training_through_the_kernel_matches_the_reference(tiny_llama, tmp_path):
    """Same seed, same config: per-round rewards (hence the sampled responses) are identical, losses agree
    to fp32 accumulation error, and the final parameters agree closely."""
    ref_rounds, ref_params = _trainer_run(tiny_llama, tmp_path / "ref", "reference")
    tri_rounds, tri_params = _trainer_run(tiny_llama, tmp_path / "tri", "triton")
    assert [r["reward_mean"] for r in tri_rounds] == [r["reward_mean"] for r in ref_rounds]
    assert sum(r["skipped"] for r in ref_rounds) == 0  # KL on: every round updates
    for a, b in zip(tri_rounds, ref_rounds):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        # KL grows to ~2 nats at lr 3e-3; fp32 rounding differences between the two paths' gradients (e.g.
        # SLEEF against libm exp in the last elements of a row) compound over the rounds to ~2.5e-5 relative.
        assert a["kl_mean"] == pytest.approx(b["kl_mean"], rel=1e-4, abs=1e-5)
    for k in ref_params:
        # Adam normalises each step to ~lr, so 8 steps at lr 3e-3 move a weight by up to ~2.4e-2; the two
        # paths differ by fp32 rounding of the gradients, far below that.
        torch.testing.assert_close(tri_params[k], ref_params[k], atol=1e-4, rtol=1e-4)
