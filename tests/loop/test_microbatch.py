"""Token-budgeted micro-batches: the accumulated gradient equals the unsplit step's in every aggregation
mode, the on-policy ratio stays exactly 1, and the trainer with a budget follows the trainer without."""

from __future__ import annotations

import pytest
import torch

from conftest import train_and_collect
from fastrft.algo import PGLossSpec
from fastrft.config import (AlgoConfig, DataConfig, EvalConfig, ModelConfig, OptimConfig, RolloutConfig, RunConfig,
                            TrainConfig)
from fastrft.errors import ConfigError
from fastrft.kernels import HAVE_TRITON, fused_linear_pg_loss
from fastrft.microbatch import merge_micro_stats, micro_batches, step_weights

AGGREGATIONS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def _step(lengths, h=24, v=301, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    hidden = torch.randn(n, h, generator=g) * 0.5
    weight = torch.randn(v, h, generator=g) * 0.5
    targets = torch.randint(0, v, (n,), generator=g)
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    adv = torch.randn(len(lengths), generator=g)[seq]
    old = torch.randn(n, generator=g) * 0.3 - 5.0
    ref = torch.randn(n, generator=g) * 0.3 - 5.0
    return hidden, weight, targets, seq, adv, old, ref


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_accumulated_gradient_equals_the_unsplit_step(aggregation, backend):
    if backend == "triton" and not HAVE_TRITON:
        pytest.skip("triton is not installed")
    lengths = [7, 3, 11, 5, 2, 9]  # ragged: a per-micro-batch mean would weigh them wrongly
    hidden, weight, targets, seq, adv, old, ref = _step(lengths, seed=len(aggregation))
    spec = PGLossSpec(aggregation=aggregation, max_len=12, kl_coef=0.05, entropy_coef=0.01, clip_low=0.1)
    kw = dict(spec=spec, backend=backend)

    def grads(parts):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        weights = step_weights(lengths, spec) if len(parts) > 1 else None
        total = 0.0
        starts = torch.tensor([0] + lengths).cumsum(0).tolist()
        for members in parts:
            rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in members])
            mw = None if weights is None else torch.cat([weights[i] for i in members])
            loss, _ = fused_linear_pg_loss(h[rows], w, targets[rows], adv[rows], seq[rows], old_logp=old[rows],
                                           ref_logp=ref[rows], weights=mw, **kw)
            loss.backward()
            total += float(loss.detach())
        return total, h.grad, w.grad

    whole = grads([list(range(len(lengths)))])
    split = grads(micro_batches([n + 4 for n in lengths], 14))  # 4 prompt tokens each: 3-4 micro-batches
    assert len(micro_batches([n + 4 for n in lengths], 14)) >= 3
    assert split[0] == pytest.approx(whole[0], rel=1e-6, abs=1e-7)
    for a, b in zip(split[1:], whole[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_micro_batches_never_split_a_sequence_and_respect_the_budget():
    lengths = [5, 9, 3, 3, 3, 12, 1, 8]
    groups = micro_batches(lengths, 10)
    assert [i for g in groups for i in g] == list(range(len(lengths)))  # every sequence once, in order
    for g in groups:
        assert sum(lengths[i] for i in g) <= 10 or len(g) == 1  # only a lone over-long sequence exceeds it
    assert groups == [[0], [1], [2, 3, 4], [5], [6, 7]]
    with pytest.raises(ValueError, match="must be >= 1"):
        micro_batches(lengths, 0)


def test_merged_stats_weigh_tokens():
    parts = [{"loss": 0.5, "logp_mean": -1.0, "ratio_min": 1.0, "ratio_max": 1.0},
             {"loss": 0.25, "logp_mean": -4.0, "ratio_min": 0.9, "ratio_max": 1.2}]
    out = merge_micro_stats(parts, [3, 1])
    assert out == {"loss": 0.75, "logp_mean": -1.75, "ratio_min": 0.9, "ratio_max": 1.2}


def test_budget_below_one_is_refused():
    with pytest.raises(ConfigError, match=r"max_tokens_per_step \(--max-tokens-per-step\) must be >= 1"):
        OptimConfig(max_tokens_per_step=0)


def _run(model_dir, out, budget):
    cfg = TrainConfig(
        model=ModelConfig(model=str(model_dir)),
        data=DataConfig(dataset="arithmetic", level="add1", example_index=(0, 1)),
        rollout=RolloutConfig(group_size=4, max_new_tokens=4, temperature=1.0),
        algo=AlgoConfig(advantage="grpo", aggregation="seq-mean-token-mean"),
        optim=OptimConfig(lr=3e-3, max_tokens_per_step=budget),
        eval=EvalConfig(eval_every=0, train_samples=4, test_size=4, greedy=False),
        run=RunConfig(rounds=4, seed=3, out=str(out), progress=False, log_samples=0),
    )
    return train_and_collect(cfg)


def test_trainer_with_a_budget_follows_the_trainer_without(tiny_llama, tmp_path):
    """A budget of 1 token puts every sequence in a micro-batch of its own (8 per step): same rewards
    (hence the same samples), losses and weights equal up to fp32 rounding of the accumulation, and the
    on-policy ratio exactly 1 with no clipping in every micro-batch."""
    whole, whole_params = _run(tiny_llama, tmp_path / "whole", None)
    split, split_params = _run(tiny_llama, tmp_path / "split", 1)
    assert [r["reward_mean"] for r in split] == [r["reward_mean"] for r in whole]
    updated = [r for r in split if not r["skipped"]]
    assert updated and all(r["micro_batches"] == 8 for r in updated)
    for r in updated:
        assert r["ratio_min"] == 1.0 and r["ratio_max"] == 1.0
        assert r["clip_frac_low"] == 0.0 and r["clip_frac_high"] == 0.0
    for a, b in zip(split, whole):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        # The logged means are over response tokens whatever the budget (prompt tokens once weighted them).
        for key in ("logp_mean", "entropy_mean", "logp_gap_mean"):
            if not a["skipped"]:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["round"], key)
    for k in whole_params:
        torch.testing.assert_close(split_params[k], whole_params[k], atol=1e-5, rtol=1e-5)


def test_a_steps_logged_means_do_not_depend_on_the_budget(tiny_llama, tmp_path):
    """One step over sequences with prompts and responses of different lengths, whole and cut into
    micro-batches: its logged means are over the response tokens, so they agree (fp32 rounding aside)."""
    from fastrft.engine import Completion
    from fastrft.loop.types import TrainBatch
    from fastrft.trainer import Trainer

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 60, (n,), generator=g).tolist() for n in (30, 3, 17, 5)]
    responses = [torch.randint(3, 60, (n,), generator=g).tolist() for n in (2, 11, 1, 6)]
    train = TrainBatch(prompts, [Completion(r, [-1.0] * len(r), "length") for r in responses], [1.0, -0.5, 0.25, 2.0])
    stats = {}
    for budget in (None, 12):
        cfg = TrainConfig(model=ModelConfig(model=str(tiny_llama)), data=DataConfig(dataset="arithmetic"),
                          rollout=RolloutConfig(group_size=4, max_new_tokens=8),
                          algo=AlgoConfig(advantage="grpo", kl_coef=0.1, entropy_coef=0.01),
                          optim=OptimConfig(lr=1e-3, max_tokens_per_step=budget),
                          run=RunConfig(rounds=1, out=str(tmp_path / str(budget)), progress=False))
        stats[budget] = Trainer(cfg).learner.update(1, train, first_update=0).record
    assert stats[None]["micro_batches"] == 1 and stats[12]["micro_batches"] == 4
    for key in ("loss", "logp_mean", "entropy_mean", "kl_mean", "logp_gap_mean", "clip_frac_low", "clip_frac_high"):
        assert stats[12][key] == pytest.approx(stats[None][key], rel=1e-5, abs=1e-7), key


def test_activation_checkpointing_gives_the_plain_gradients_bit_for_bit(tiny_llama):
    """CPU fp32: the recomputed forward runs the same deterministic ops, so every gradient is identical."""
    from fastrft.algo import pack
    from fastrft.models import load_model

    model = load_model(str(tiny_llama), dtype="float32", device="cpu")
    g = torch.Generator().manual_seed(0)
    vocab = model.lm_head_weight.shape[0]
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 9, 3)]
    responses = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (4, 2, 7)]
    batch = pack(prompts, responses, [1.0, -0.5, 0.25], [[0.0] * len(r) for r in responses])

    calls = []
    model.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))  # the recompute stops early

    def grads(checkpointing):
        model.zero_grad(set_to_none=True)
        model.activation_checkpointing = checkpointing
        calls.clear()
        hidden = model.forward_packed(batch.input_ids, batch.cu_seqlens).index_select(0, batch.target_pos)
        loss, _ = fused_linear_pg_loss(hidden, model.lm_head_weight, batch.targets, batch.advantages, batch.seq_ids,
                                       spec=PGLossSpec(entropy_coef=0.01))
        loss.backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}, len(calls)

    (plain, plain_calls), (recomputed, recomputed_calls) = grads(False), grads(True)
    assert (plain_calls, recomputed_calls) == (1, 2)  # the checkpointed layer really ran again in the backward
    assert plain.keys() == recomputed.keys()
    for k in plain:
        assert torch.equal(plain[k], recomputed[k]), k


def test_default_budget_on_cpu_and_the_per_token_estimate():
    """Unset, the CPU budget is 2,048 tokens; the per-token estimate for SmolLM2-135M in fp32 (30 layers,
    H 576, I 1536) is near the 1.7 MiB measured, and checkpointing cuts it by more than 10x."""
    from fastrft.microbatch import CPU_DEFAULT_TOKENS, activation_bytes_per_token, default_token_budget

    assert default_token_budget(None, torch.device("cpu"), False)[0] == CPU_DEFAULT_TOKENS == 2048
    plain = activation_bytes_per_token(576, 1536, 30, 4, checkpointing=False)
    assert 1.5 * 2**20 < plain < 2.2 * 2**20
    assert activation_bytes_per_token(576, 1536, 30, 4, checkpointing=True) * 10 < plain


def test_checkpointing_on_a_model_that_cannot_names_the_reason(tiny_llama, tmp_path, monkeypatch):
    from fastrft.models.decoder import CausalLM
    from fastrft.trainer import Trainer

    monkeypatch.setattr(CausalLM, "supports_activation_checkpointing", False)
    cfg = TrainConfig(model=ModelConfig(model=str(tiny_llama), activation_checkpointing=True),
                      run=RunConfig(rounds=1, out=str(tmp_path / "run"), progress=False))
    with pytest.raises(ConfigError, match=r"--activation-checkpointing\): CausalLM cannot recompute its layers"):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()  # refused before anything was written
