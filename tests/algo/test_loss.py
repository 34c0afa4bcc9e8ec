"""Tests for fastrft.algo: the policy-gradient loss spec, token log-probs, packing and advantages.

Every expected value here is computed by hand (literal numbers, or plain Python floats / float64 torch
written independently in the test), never by calling the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastrft.algo import PGLossSpec, aggregate, group_advantages, map_reward, pack, pg_loss
from fastrft.errors import ConfigError
# The chunked PyTorch path of the LM-head log-prob op (the CPU path, beside its Triton kernel).
from fastrft.kernels import linear_logprob_reference as token_logprobs

F64 = torch.float64


def t64(values, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=F64, requires_grad=grad)


def ids(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def loss_and_grad(logp_values, adv, seq, *, spec, old=None, ref=None, entropy=None):
    """Run pg_loss on float64 leaves; return (loss float, d loss/d logp list, stats)."""
    logp = t64(logp_values, grad=True)
    loss, stats = pg_loss(logp, t64(adv), ids(seq), old_logp=None if old is None else t64(old),
                          ref_logp=None if ref is None else t64(ref),
                          entropy=None if entropy is None else t64(entropy), spec=spec)
    (grad,) = torch.autograd.grad(loss, logp)
    return float(loss.detach()), grad.tolist(), stats


def approx(x, rel=1e-9, abs=1e-12):
    return pytest.approx(x, rel=rel, abs=abs)


# ------------------------------------------------------------------------------------ on-policy REINFORCE


@pytest.mark.parametrize(("logp", "adv", "seq", "loss", "grad"), [
    # token-mean: loss = -mean(A), d loss / d logp_i = -A_i / N, whatever logp is (r = 1 on-policy)
    ([-0.5, -1.2, -2.0, -0.1], [1.0, -0.5, 2.0, 0.0], [0, 0, 1, 1], -0.625, [-0.25, 0.125, -0.5, 0.0]),
    ([-3.0], [-2.0], [0], 2.0, [2.0]),
    ([-0.7, -0.7], [0.5, 0.5], [4, 9], -0.5, [-0.25, -0.25]),
    # large advantages far outside the clip range: on-policy r = 1, so never clipped
    ([-5.0, -0.01, -1.0], [30.0, -30.0, 3.0], [0, 1, 2], -1.0, [-10.0, 10.0, -1.0]),
])  # fmt: skip
def test_on_policy_reinforce(logp, adv, seq, loss, grad):
    got_loss, got_grad, stats = loss_and_grad(logp, adv, seq, spec=PGLossSpec())
    assert got_loss == approx(loss)
    assert got_grad == approx(grad)
    assert stats["ratio_min"] == approx(1.0) and stats["ratio_max"] == approx(1.0)
    assert stats["clip_frac_low"] == 0.0 and stats["clip_frac_high"] == 0.0


# ----------------------------------------------------------------------------------------- PPO clipping

# (clip_low, clip_high, r, A, expected per-token loss l, expected d l / d logp), all by hand:
# r above 1+eh with A > 0 -> l = -A(1+eh), grad 0; r below 1-el with A < 0 -> l = -A(1-el), grad 0;
# otherwise l = -A r and d l / d logp = -A r (d r / d logp = r).
CLIP_ROWS = [
    (0.2, 0.2, 1.5, 1.0, -1.2, 0.0),     # high-clipped
    (0.2, 0.2, 1.5, -1.0, 1.5, 1.5),     # A < 0, r large: the unclipped branch is the max
    (0.2, 0.2, 0.5, 1.0, -0.5, -0.5),    # A > 0, r small: unclipped
    (0.2, 0.2, 0.5, -1.0, 0.8, 0.0),     # low-clipped
    (0.2, 0.2, 1.1, 2.0, -2.2, -2.2),    # inside the range
    (0.2, 0.2, 0.9, -2.0, 1.8, 1.8),     # inside the range
    (0.2, 0.2, 1.3, 0.5, -0.6, 0.0),     # high-clipped
    (0.2, 0.2, 0.7, -0.5, 0.4, 0.0),     # low-clipped
    (0.2, 0.2, 0.85, -1.0, 0.85, 0.85),  # inside with symmetric 0.2 ...
    (0.1, 0.3, 0.85, -1.0, 0.9, 0.0),    # ... but low-clipped with clip_low 0.1
    (0.1, 0.3, 1.25, 1.0, -1.25, -1.25),  # not clipped with clip_high 0.3 (would be with 0.2)
    (0.1, 0.3, 1.4, 1.0, -1.3, 0.0),     # high-clipped at 1.3
    (0.1, 0.3, 0.5, 3.0, -1.5, -1.5),    # A > 0 never low-clipped
    (0.0, 0.0, 1.1, 1.0, -1.0, 0.0),     # zero-width clip: any r > 1 with A > 0 is clipped
    (0.2, 0.2, 3.0, 0.0, 0.0, 0.0),      # A = 0: no loss, no gradient
]  # fmt: skip


@pytest.mark.parametrize(("clip_low", "clip_high", "r", "adv", "ell", "dell"), CLIP_ROWS)
@pytest.mark.parametrize("old", [0.0, -1.3])
def test_clipping_single_token(clip_low, clip_high, r, adv, ell, dell, old):
    spec = PGLossSpec(clip_low=clip_low, clip_high=clip_high)
    loss, grad, _ = loss_and_grad([old + math.log(r)], [adv], [0], old=[old], spec=spec)
    assert loss == approx(ell)
    assert grad == approx([dell])


@pytest.mark.parametrize(("clip_low", "clip_high"), [(0.2, 0.2), (0.1, 0.3)])
def test_clipping_batch_token_mean(clip_low, clip_high):
    rows = [row for row in CLIP_ROWS if row[:2] == (clip_low, clip_high)]
    old = [-0.4 - 0.3 * i for i in range(len(rows))]
    logp = [o + math.log(row[2]) for o, row in zip(old, rows)]
    n = len(rows)
    loss, grad, stats = loss_and_grad(logp, [row[3] for row in rows], list(range(n)), old=old,
                                      spec=PGLossSpec(clip_low=clip_low, clip_high=clip_high))
    assert loss == approx(sum(row[4] for row in rows) / n)
    assert grad == approx([row[5] / n for row in rows])
    assert stats["ratio_min"] == approx(min(row[2] for row in rows))
    assert stats["ratio_max"] == approx(max(row[2] for row in rows))


# ------------------------------------------------------------------------------------------- dual clip

# c = 3: for A < 0, l = min(max(-A r, -A clip(r)), -A c); dual-clip active tokens have zero gradient.
DUAL_ROWS = [
    (5.0, -1.0, 3.0, 0.0),    # -A r = 5 > 3 -> capped at 3
    (2.0, -1.0, 2.0, 2.0),    # 2 < 3: untouched, gradient -A r
    (4.0, -0.5, 1.5, 0.0),    # -A r = 2 > -A c = 1.5
    (0.5, -1.0, 0.8, 0.0),    # low-clipped (0.8 < 3), dual clip inactive
    (5.0, 1.0, -1.2, 0.0),    # A > 0: dual clip never applies (high clip does)
    (0.5, 1.0, -0.5, -0.5),   # A > 0, unclipped
    (10.0, 2.0, -2.4, 0.0),   # A > 0 with a huge ratio: still just the high clip
]  # fmt: skip


@pytest.mark.parametrize(("r", "adv", "ell", "dell"), DUAL_ROWS)
def test_dual_clip(r, adv, ell, dell):
    old = -0.9
    loss, grad, _ = loss_and_grad([old + math.log(r)], [adv], [0], old=[old], spec=PGLossSpec(dual_clip=3.0))
    assert loss == approx(ell)
    assert grad == approx([dell])


def test_dual_clip_does_not_change_positive_advantage_tokens():
    rs = [0.3, 0.9, 1.0, 1.15, 1.5, 8.0]
    old = [-1.0] * len(rs)
    logp = [o + math.log(r) for o, r in zip(old, rs)]
    adv = [0.5, 1.0, 2.0, 1.5, 0.7, 3.0]
    without = loss_and_grad(logp, adv, [0] * 6, old=old, spec=PGLossSpec())
    with_dual = loss_and_grad(logp, adv, [0] * 6, old=old, spec=PGLossSpec(dual_clip=1.5))
    assert with_dual[0] == approx(without[0])
    assert with_dual[1] == approx(without[1])
    # and the hand value: -A*min(r, 1.2)/6 (A > 0: max(-A r, -A clip(r)) = -A min(r, clip(r)))
    assert with_dual[0] == approx(sum(-a * min(r, 1.2) for a, r in zip(adv, rs)) / 6)


def test_dual_clip_mixed_batch_token_mean():
    rs, adv = [5.0, 2.0, 5.0, 0.5], [-1.0, -1.0, 1.0, 1.0]
    old = [-0.2, -0.5, -1.0, -2.0]
    logp = [o + math.log(r) for o, r in zip(old, rs)]
    loss, grad, _ = loss_and_grad(logp, adv, [0, 0, 1, 1], old=old, spec=PGLossSpec(dual_clip=3.0))
    assert loss == approx((3.0 + 2.0 - 1.2 - 0.5) / 4)
    assert grad == approx([0.0, 2.0 / 4, 0.0, -0.5 / 4])


# ----------------------------------------------------------------------------------------------- KL

# (estimator, logp, ref, KL value by hand, d KL / d logp by hand)
def _kl_rows():
    rows = []
    for logp, ref in [(-1.0, -1.5), (-2.0, -0.5), (-0.3, -0.3), (-0.05, -3.0)]:
        x = logp - ref
        rows.append(("k1", logp, ref, x, 1.0))
        rows.append(("k2", logp, ref, 0.5 * x * x, x))
        d = ref - logp
        rows.append(("k3", logp, ref, math.exp(d) - d - 1.0, 1.0 - math.exp(d)))
    return rows


def test_kl_hand_values_spot_check():
    # literal numbers for one pair, so the helper above is itself checked: logp - ref = 0.5
    rows = {(e, lp, rf): (v, g) for e, lp, rf, v, g in _kl_rows()}
    assert rows[("k1", -1.0, -1.5)] == (0.5, 1.0)
    assert rows[("k2", -1.0, -1.5)] == (0.125, 0.5)
    v, g = rows[("k3", -1.0, -1.5)]
    assert v == approx(0.1065306597126334) and g == approx(0.3934693402873666)


@pytest.mark.parametrize(("estimator", "logp", "ref", "kl", "dkl"), _kl_rows())
@pytest.mark.parametrize("coef", [0.1, 2.0])
def test_kl_estimators(estimator, logp, ref, kl, dkl, coef):
    # on-policy with A = 0.7 and a second token: t_i = -A_i + coef*KL_i, token-mean over 2 tokens
    spec = PGLossSpec(kl_coef=coef, kl_estimator=estimator)
    # second token has logp == ref: KL = 0 for every estimator, but d k1 / d logp is still 1
    logps, refs, adv = [logp, -1.0], [ref, -1.0], [0.7, -0.2]
    dkl_equal = 1.0 if estimator == "k1" else 0.0
    loss, grad, stats = loss_and_grad(logps, adv, [0, 1], ref=refs, spec=spec)
    assert loss == approx((-0.7 + coef * kl + 0.2) / 2)
    assert grad == approx([(-0.7 + coef * dkl) / 2, (0.2 + coef * dkl_equal) / 2])
    assert stats["kl_mean"] == pytest.approx(kl / 2, rel=1e-6, abs=1e-7)  # stats are reduced in fp32


def test_kl_with_old_logp_and_clipping():
    # old_logp given: t = l(r, A) + coef*k2, with r = 1.5 (high-clipped, A = 1) and r = 1.1 (unclipped)
    old = [-1.0, -2.0]
    logp = [old[0] + math.log(1.5), old[1] + math.log(1.1)]
    ref = [-1.2, -1.9]
    coef = 0.5
    x = [logp[0] - ref[0], logp[1] - ref[1]]
    loss, grad, _ = loss_and_grad(logp, [1.0, 1.0], [0, 0], old=old, ref=ref,
                                  spec=PGLossSpec(kl_coef=coef, kl_estimator="k2"))
    assert loss == approx((-1.2 + coef * 0.5 * x[0] ** 2 - 1.1 + coef * 0.5 * x[1] ** 2) / 2)
    assert grad == approx([(0.0 + coef * x[0]) / 2, (-1.1 + coef * x[1]) / 2])


def test_kl_coef_zero_ignores_ref_in_loss_but_reports_it():
    loss, grad, stats = loss_and_grad([-1.0, -2.0], [1.0, 1.0], [0, 0], ref=[-3.0, -3.0],
                                      spec=PGLossSpec(kl_coef=0.0, kl_estimator="k1"))
    assert loss == approx(-1.0)
    assert grad == approx([-0.5, -0.5])
    assert stats["kl_mean"] == pytest.approx(1.5, rel=1e-6)  # mean of k1 = (2 + 1)/2


# ------------------------------------------------------------------------------------------- entropy


@pytest.mark.parametrize(("coef", "aggregation", "entropy_weights"), [
    # d loss / d entropy_i for the 3-token, 2-sequence example seq = [0, 0, 1]:
    (0.01, "token-mean", [1 / 3, 1 / 3, 1 / 3]),
    (0.5, "token-mean", [1 / 3, 1 / 3, 1 / 3]),
    (-0.2, "token-mean", [1 / 3, 1 / 3, 1 / 3]),  # a negative coefficient penalises entropy
    (0.3, "seq-mean-token-mean", [1 / 4, 1 / 4, 1 / 2]),
    (0.3, "seq-mean-token-sum", [1 / 2, 1 / 2, 1 / 2]),
])  # fmt: skip
def test_entropy_bonus(coef, aggregation, entropy_weights):
    spec = PGLossSpec(entropy_coef=coef, aggregation=aggregation)
    ent_values, adv = [1.5, 0.2, 3.0], [1.0, 1.0, -2.0]
    logp = t64([-0.5, -1.0, -0.2], grad=True)
    entropy = t64(ent_values, grad=True)
    loss, stats = pg_loss(logp, t64(adv), ids([0, 0, 1]), entropy=entropy, spec=spec)
    g_logp, g_ent = torch.autograd.grad(loss, (logp, entropy))
    # the per-token value is -A - coef*H; the aggregation weights w_i are the same for both terms
    assert float(loss.detach()) == approx(sum(w * (-a - coef * h) for w, a, h in zip(entropy_weights, adv, ent_values)))
    assert g_ent.tolist() == approx([-coef * w for w in entropy_weights])
    assert g_logp.tolist() == approx([-a * w for w, a in zip(entropy_weights, adv)])
    assert stats["entropy_mean"] == pytest.approx((1.5 + 0.2 + 3.0) / 3, rel=1e-6)


# --------------------------------------------------------------------------------------- aggregations

# seq_ids [7, 7, 2, 2, 2, 5]: sequences of lengths 2, 3, 1 with unsorted, non-contiguous labels.
AGG_SEQ = [7, 7, 2, 2, 2, 5]
AGG_ADV = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # on-policy: t_i = -A_i  -> per-seq sums -3, -12, -6
AGG_ROWS = [
    ("token-mean", None, -21 / 6, [-a / 6 for a in AGG_ADV]),
    # per-seq means -1.5, -4, -6 -> mean -11.5/3; weight of token i is 1/(3*len(seq(i)))
    ("seq-mean-token-mean", None, -11.5 / 3, [-1 / 6, -2 / 6, -3 / 9, -4 / 9, -5 / 9, -6 / 3]),
    ("seq-mean-token-sum", None, -21 / 3, [-a / 3 for a in AGG_ADV]),
    ("seq-mean-token-sum-norm", 4, -21 / 12, [-a / 12 for a in AGG_ADV]),
    ("seq-mean-token-sum-norm", 10, -21 / 30, [-a / 30 for a in AGG_ADV]),
]  # fmt: skip


@pytest.mark.parametrize(("aggregation", "max_len", "loss", "grad"), AGG_ROWS)
def test_aggregations_pg_loss(aggregation, max_len, loss, grad):
    spec = PGLossSpec(aggregation=aggregation, max_len=max_len)
    logp = [-0.1, -0.2, -0.3, -0.4, -0.5, -0.6]
    got_loss, got_grad, _ = loss_and_grad(logp, AGG_ADV, AGG_SEQ, spec=spec)
    assert got_loss == approx(loss)
    assert got_grad == approx(grad)


@pytest.mark.parametrize(("aggregation", "max_len", "loss", "grad"), AGG_ROWS)
@pytest.mark.parametrize("relabel", [lambda s: s, lambda s: 100 - 3 * s])
def test_aggregate_direct(aggregation, max_len, loss, grad, relabel):
    # aggregate(-A) must equal the same table, whatever the labels are (only grouping matters)
    per_token = t64([-a for a in AGG_ADV], grad=True)
    seq = ids([relabel(s) for s in AGG_SEQ])
    out = aggregate(per_token, seq, PGLossSpec(aggregation=aggregation, max_len=max_len))
    (g,) = torch.autograd.grad(out, per_token)
    assert float(out.detach()) == approx(loss)
    # the table's d loss/d logp_i is -A_i * w_i (t_i = -A_i r_i); d aggregate / d t_i is the weight w_i
    assert g.tolist() == approx([-gr / a for gr, a in zip(grad, AGG_ADV)])


def test_aggregate_interleaved_labels():
    # tokens of one sequence need not be adjacent: [a, b, a, c, b] -> means (1+3)/2, (2+5)/2, 4
    per_token = t64([1.0, 2.0, 3.0, 4.0, 5.0])
    seq = ids([9, 1, 9, 4, 1])
    assert float(aggregate(per_token, seq, PGLossSpec(aggregation="seq-mean-token-mean"))) == approx(
        (2.0 + 3.5 + 4.0) / 3)
    assert float(aggregate(per_token, seq, PGLossSpec(aggregation="seq-mean-token-sum"))) == approx(15 / 3)


# ------------------------------------------------------------------------------------------------ stats


def test_stats_crafted_example():
    # r = [1.5, 0.5, 1.5, 0.5, 1.0, 0.7] with A = [1, -1, -1, 1, 0, -2]:
    # high-clipped (r > 1.2, A > 0): token 0 only; low-clipped (r < 0.8, A < 0): tokens 1 and 5.
    rs = [1.5, 0.5, 1.5, 0.5, 1.0, 0.7]
    adv = [1.0, -1.0, -1.0, 1.0, 0.0, -2.0]
    old = [-1.0, -2.0, -0.5, -1.5, -0.3, -1.1]
    logp = [o + math.log(r) for o, r in zip(old, rs)]
    ref = [lp - 0.1 * (i + 1) for i, lp in enumerate(logp)]  # k1 = 0.1, ..., 0.6
    ent = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    spec = PGLossSpec(kl_coef=0.01, kl_estimator="k1", entropy_coef=0.001)
    _, _, stats = loss_and_grad(logp, adv, [0, 0, 0, 1, 1, 1], old=old, ref=ref, entropy=ent, spec=spec)
    assert set(stats) == {"logp_mean", "entropy_mean", "kl_mean", "clip_frac_low", "clip_frac_high",
                          "ratio_min", "ratio_max"}
    assert all(isinstance(v, float) for v in stats.values())
    assert stats["clip_frac_high"] == pytest.approx(1 / 6)
    assert stats["clip_frac_low"] == pytest.approx(2 / 6)
    assert stats["ratio_min"] == pytest.approx(0.5, rel=1e-9)
    assert stats["ratio_max"] == pytest.approx(1.5, rel=1e-9)
    assert stats["logp_mean"] == pytest.approx(sum(logp) / 6, rel=1e-6)
    assert stats["kl_mean"] == pytest.approx(2.1 / 6, rel=1e-5)
    assert stats["entropy_mean"] == pytest.approx(10.5 / 6, rel=1e-6)


def test_stats_without_ref_or_entropy_are_zero():
    _, _, stats = loss_and_grad([-1.0, -2.0], [1.0, -1.0], [0, 1], spec=PGLossSpec())
    assert stats["kl_mean"] == 0.0 and stats["entropy_mean"] == 0.0
    assert stats["logp_mean"] == pytest.approx(-1.5)


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(("kwargs", "must_mention"), [
    (dict(clip_low=1.0), ["clip_low"]),
    (dict(clip_low=1.5), ["clip_low"]),
    (dict(clip_low=-0.1), ["clip_low"]),
    (dict(clip_high=-0.01), ["clip_high"]),
    (dict(dual_clip=1.0), ["dual_clip"]),
    (dict(dual_clip=0.5), ["dual_clip"]),
    (dict(dual_clip=-3.0), ["dual_clip"]),
    (dict(kl_estimator="k4"), ["kl_estimator", "k1", "k2", "k3"]),
    (dict(kl_estimator="K3"), ["kl_estimator", "k1", "k2", "k3"]),
    (dict(aggregation="mean"), ["aggregation", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                "seq-mean-token-sum-norm"]),
    (dict(aggregation="seq-mean-token-sum-norm"), ["max_len"]),
    (dict(aggregation="seq-mean-token-sum-norm", max_len=0), ["max_len"]),
    (dict(kl_coef=-0.001), ["kl_coef"]),
])  # fmt: skip
def test_invalid_spec_raises_config_error(kwargs, must_mention):
    with pytest.raises(ConfigError) as info:
        PGLossSpec(**kwargs)
    for word in must_mention:
        assert word in str(info.value)


@pytest.mark.parametrize("kwargs", [dict(clip_low=0.0, clip_high=0.0), dict(clip_low=0.99), dict(dual_clip=1.01),
                                    dict(aggregation="seq-mean-token-sum-norm", max_len=1),
                                    dict(entropy_coef=-0.5), dict(kl_coef=0.0)])
def test_valid_edge_specs_accepted(kwargs):
    spec = PGLossSpec(**kwargs)
    for k, v in kwargs.items():
        assert getattr(spec, k) == v


def _base_inputs(n=3):
    return dict(logp=t64([-1.0] * n, grad=True), advantages=t64([1.0] * n), seq_ids=ids([0] * n))


@pytest.mark.parametrize(("name", "extra", "spec"), [
    ("advantages", dict(advantages=t64([1.0, 2.0])), PGLossSpec()),
    ("seq_ids", dict(seq_ids=ids([0, 0, 0, 0])), PGLossSpec()),
    ("old_logp", dict(old_logp=t64([[-1.0], [-1.0], [-1.0]])), PGLossSpec()),
    ("ref_logp", dict(ref_logp=t64([-1.0])), PGLossSpec(kl_coef=0.1)),
    ("entropy", dict(entropy=t64([1.0, 1.0])), PGLossSpec(entropy_coef=0.1)),
])  # fmt: skip
def test_shape_mismatch_raises_value_error(name, extra, spec):
    inputs = {**_base_inputs(), **extra}
    logp = inputs.pop("logp")
    with pytest.raises(ValueError, match=name):
        pg_loss(logp, inputs.pop("advantages"), inputs.pop("seq_ids"), spec=spec, **inputs)


@pytest.mark.parametrize(("spec", "match"), [
    (PGLossSpec(kl_coef=0.1), "ref_logp"),
    (PGLossSpec(entropy_coef=0.01), "entropy"),
    (PGLossSpec(entropy_coef=-0.01), "entropy"),
])  # fmt: skip
def test_missing_required_input_raises_value_error(spec, match):
    b = _base_inputs()
    with pytest.raises(ValueError, match=match):
        pg_loss(b["logp"], b["advantages"], b["seq_ids"], spec=spec)


# ----------------------------------------------------------------------------------------- empty batch


@pytest.mark.parametrize("spec", [PGLossSpec(), PGLossSpec(aggregation="seq-mean-token-mean"),
                                  PGLossSpec(aggregation="seq-mean-token-sum"),
                                  PGLossSpec(aggregation="seq-mean-token-sum-norm", max_len=8),
                                  PGLossSpec(kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0)])
def test_empty_batch_is_zero_without_nan(spec):
    logp = torch.zeros(0, dtype=F64, requires_grad=True)
    empty = torch.zeros(0, dtype=F64)
    loss, stats = pg_loss(logp, empty, torch.zeros(0, dtype=torch.long), old_logp=empty, ref_logp=empty,
                          entropy=empty, spec=spec)
    assert loss.shape == () and float(loss.detach()) == 0.0
    (g,) = torch.autograd.grad(loss, logp)
    assert g.shape == (0,)
    assert all(v == 0.0 and not math.isnan(v) for v in stats.values())


# ------------------------------------------------------------------------------------------ log-probs


def _ref_logprobs(hidden, weight, targets, temperature):
    """float64 reference, written independently: log_softmax gathered, entropy = -sum p log p."""
    logits = hidden.double() @ weight.double().T / temperature
    logsm = torch.log_softmax(logits, dim=-1)
    logp = logsm.gather(1, targets[:, None]).squeeze(1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    return logp, entropy


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1024, 37, 10, 1])  # >N and =N: one piece; 10 and 1: checkpointed chunks
def test_token_logprobs_matches_float64_reference(temperature, chunk):
    n, h, v = 37, 24, 101
    gen = torch.Generator().manual_seed(1234 + chunk)
    hidden64 = torch.randn(n, h, generator=gen, dtype=F64)
    weight64 = torch.randn(v, h, generator=gen, dtype=F64) * 0.3  # logits ~ N(0, 1.5^2)
    targets = torch.randint(0, v, (n,), generator=gen)
    up_logp = torch.randn(n, generator=gen, dtype=F64)
    up_ent = torch.randn(n, generator=gen, dtype=F64)

    hidden = hidden64.float().requires_grad_(True)
    weight = weight64.float().requires_grad_(True)
    logp, entropy = token_logprobs(hidden, weight, targets, temperature=temperature, with_entropy=True, chunk=chunk)
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    assert logp.shape == (n,) and entropy.shape == (n,)
    gh, gw = torch.autograd.grad((logp, entropy), (hidden, weight), (up_logp.float(), up_ent.float()))

    # reference on the fp32-rounded inputs so that only the computation's rounding differs
    rh = hidden.detach().double().requires_grad_(True)
    rw = weight.detach().double().requires_grad_(True)
    ref_logp, ref_ent = _ref_logprobs(rh, rw, targets, temperature)
    ref_gh, ref_gw = torch.autograd.grad((ref_logp, ref_ent), (rh, rw), (up_logp, up_ent))

    # Tolerances: fp32 has unit roundoff ~6e-8; a logit is a 24-term dot product of O(1) values
    # (error ~ sqrt(24)*|x||w|*eps ~ 1e-6 at worst) and logsumexp over 101 logits of magnitude < ~8
    # adds a few eps * 8 ~ 1e-6, so 1e-5 absolute on log-probs/entropies is ~10x headroom.
    # Gradients sum N=37 or V=101 such products (entropy grads involve (logit - mean) products), so
    # they carry relative error ~1e-6..1e-5; rtol 1e-4 plus a small atol for near-zero entries.
    torch.testing.assert_close(logp.double(), ref_logp.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy.double(), ref_ent.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(gh.double(), ref_gh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw.double(), ref_gw, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", [5, 64])
def test_token_logprobs_without_grad_and_without_entropy(chunk):
    n, h, v = 13, 8, 17
    gen = torch.Generator().manual_seed(7)
    hidden, weight = torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen)
    targets = torch.randint(0, v, (n,), generator=gen)
    logp, entropy = token_logprobs(hidden, weight, targets, temperature=0.7, chunk=chunk)
    assert entropy is None
    ref_logp, _ = _ref_logprobs(hidden, weight, targets, 0.7)
    torch.testing.assert_close(logp.double(), ref_logp, atol=1e-5, rtol=0)  # fp32 rounding, as above


def test_token_logprobs_hand_value():
    # V = 2, logits [0, ln 3] at T = 1 -> p = [1/4, 3/4]; target 1: log(3/4); entropy -(1/4 ln 1/4 + 3/4 ln 3/4)
    hidden = torch.tensor([[1.0]])
    weight = torch.tensor([[0.0], [math.log(3.0)]])
    logp, ent = token_logprobs(hidden, weight, torch.tensor([1]), with_entropy=True)
    assert float(logp) == pytest.approx(math.log(0.75), abs=1e-6)
    assert float(ent) == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-6)
    # at T = 2 the logits halve: [0, ln 3 / 2] -> p1 = sqrt3 / (1 + sqrt3)
    logp2, _ = token_logprobs(hidden, weight, torch.tensor([1]), temperature=2.0)
    assert float(logp2) == pytest.approx(math.log(math.sqrt(3) / (1 + math.sqrt(3))), abs=1e-6)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_token_logprobs_rejects_nonpositive_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, dtype=torch.long),
                       temperature=temperature)


# ------------------------------------------------------------------------------------------------ pack

PROMPTS = [[1, 2, 3], [4], [5, 6]]
RESPONSES = [[10, 11], [12, 13, 14], [15]]
ADVS = [0.5, -1.0, 2.0]
LOGPS = [[-0.1, -0.2], [-0.3, -0.4, -0.5], [-0.6]]


def test_pack_hand_made_batch():
    b = pack(PROMPTS, RESPONSES, ADVS, LOGPS)
    # packed sequences: [1 2 3 10] [4 12 13] [5 6]  (last response token never an input)
    assert b.input_ids.tolist() == [1, 2, 3, 10, 4, 12, 13, 5, 6]
    assert b.cu_seqlens.tolist() == [0, 4, 7, 9]
    assert b.targets.tolist() == [10, 11, 12, 13, 14, 15]
    # 10 is predicted by row 2 (token 3), 11 by row 3 (token 10), 12 by row 4 (token 4), ..., 15 by row 8 (6)
    assert b.target_pos.tolist() == [2, 3, 4, 5, 6, 8]
    assert b.seq_ids.tolist() == [0, 0, 1, 1, 1, 2]
    assert b.advantages.tolist() == [0.5, 0.5, -1.0, -1.0, -1.0, 2.0]
    assert b.rollout_logp.tolist() == pytest.approx([-0.1, -0.2, -0.3, -0.4, -0.5, -0.6])
    assert b.num_tokens == 9
    assert (b.input_ids.dtype, b.cu_seqlens.dtype, b.targets.dtype, b.target_pos.dtype, b.seq_ids.dtype,
            b.advantages.dtype, b.rollout_logp.dtype) == (torch.long, torch.int32, torch.long, torch.long,
                                                          torch.long, torch.float32, torch.float32)


def test_pack_target_pos_is_the_previous_token_in_the_same_sequence():
    b = pack(PROMPTS, RESPONSES, ADVS, LOGPS)
    full = [p + r for p, r in zip(PROMPTS, RESPONSES)]
    j = 0
    for s, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        lo, hi = int(b.cu_seqlens[s]), int(b.cu_seqlens[s + 1])
        for k in range(len(r)):
            pos = int(b.target_pos[j])
            assert lo <= pos < hi
            assert int(b.input_ids[pos]) == full[s][len(p) + k - 1]
            j += 1
        # the last response token is not an input of its sequence
        assert b.input_ids[lo:hi].tolist() == full[s][:-1]


@pytest.mark.parametrize(("prompts", "responses", "advs", "logps"), [
    ([[1], [2]], [[3], []], [1.0, 1.0], [[-0.1], []]),  # empty response
    ([[1], [2]], [[3]], [1.0, 1.0], [[-0.1], [-0.2]]),  # list lengths differ
    ([[1]], [[3]], [1.0, 2.0], [[-0.1]]),
])  # fmt: skip
def test_pack_rejects_bad_input(prompts, responses, advs, logps):
    with pytest.raises(ValueError):
        pack(prompts, responses, advs, logps)


def test_pack_rejects_logprobs_not_aligned_with_response():
    # each rollout_logprobs entry holds one log-prob per response token; here they are swapped
    # (2 for a 1-token response, 1 for a 2-token one): the totals agree, the alignment does not.
    with pytest.raises(ValueError):
        pack([[1], [2]], [[3, 4], [5]], [1.0, 1.0], [[-0.1], [-0.2, -0.3]])


def test_pack_empty_prompt_never_points_outside_its_sequence():
    # With an empty prompt nothing in the sequence predicts the first response token: pack must
    # refuse it rather than return a target_pos in another sequence (or -1, the batch's last row).
    try:
        b = pack([[1, 2], []], [[3, 4], [5, 6]], [1.0, 1.0], [[-0.1, -0.2], [-0.3, -0.4]])
    except ValueError:
        return
    for j, s in enumerate(b.seq_ids.tolist()):
        assert int(b.cu_seqlens[s]) <= int(b.target_pos[j]) < int(b.cu_seqlens[s + 1])


# ------------------------------------------------------------------------------------------ advantages

S3 = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]: sqrt(4 * 0.25 / 3)
ADV_ROWS = [
    ("none", [1.0, 0.0, 0.5], 1e-6, [1.0, 0.0, 0.5]),
    ("grpo", [1.0, 0.0, 0.0, 1.0], 1e-6, [0.5 / (S3 + 1e-6), -0.5 / (S3 + 1e-6), -0.5 / (S3 + 1e-6),
                                          0.5 / (S3 + 1e-6)]),
    ("grpo", [2.0, 0.0, 1.0], 0.5, [2 / 3, -2 / 3, 0.0]),  # mean 1, unbiased std 1, eps 0.5
    ("grpo", [2.0, 0.0, 1.0], 0.0, [1.0, -1.0, 0.0]),
    ("grpo", [3.0, 1.0], 0.0, [1 / math.sqrt(2), -1 / math.sqrt(2)]),  # std sqrt(2); biased would be 1
    ("grpo", [1.0, 1.0, 1.0], 1e-6, [0.0, 0.0, 0.0]),  # zero std: eps keeps it finite
    ("grpo", [0.7], 1e-6, [0.0]),
    ("dr_grpo", [2.0, 0.0, 1.0], 1e-6, [1.0, -1.0, 0.0]),
    ("dr_grpo", [1.0, 0.0, 0.0, 0.0], 1e-6, [0.75, -0.25, -0.25, -0.25]),
    ("dr_grpo", [0.7], 1e-6, [0.0]),
    ("rloo", [2.0, 0.0, 1.0], 1e-6, [1.5, -1.5, 0.0]),  # 2 - (0+1)/2, 0 - (2+1)/2, 1 - (2+0)/2
    ("rloo", [1.0, 0.0, 0.0, 0.0], 1e-6, [1.0, -1 / 3, -1 / 3, -1 / 3]),
    ("rloo", [0.7], 1e-6, [0.0]),
]  # fmt: skip


@pytest.mark.parametrize(("name", "rewards", "eps", "expected"), ADV_ROWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_advantages(name, rewards, eps, expected, dtype):
    out = group_advantages(name, torch.tensor(rewards, dtype=dtype), eps=eps)
    assert out.dtype == dtype and out.shape == (len(rewards),)
    assert not torch.isnan(out).any()
    assert out.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize(("score", "pair", "expected"), [
    (1.0, (-1.0, 1.0), 1.0), (0.0, (-1.0, 1.0), -1.0), (0.5, (-1.0, 1.0), 0.0),
    (1.0, (0.0, 1.0), 1.0), (0.0, (0.0, 1.0), 0.0), (0.25, (-2.0, 2.0), -1.0),
    (True, (0.0, 5.0), 5.0), (0, (0.3, 0.9), 0.3), (1.0, (1.0, 0.0), 0.0),
])  # fmt: skip
def test_map_reward(score, pair, expected):
    assert map_reward(score, pair) == pytest.approx(expected)


@pytest.mark.parametrize("name", ["ppo", "GRPO", "", "dr-grpo"])
def test_unknown_advantage_raises_config_error(name):
    with pytest.raises(ConfigError) as info:
        group_advantages(name, torch.tensor([1.0, 0.0]))
    msg = str(info.value)
    assert "advantage" in msg
    for valid in ("none", "grpo", "dr_grpo", "rloo"):
        assert valid in msg


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                         "seq-mean-token-sum-norm"])
def test_aggregation_is_linear_with_layout_weights(aggregation):
    """sum(w * t) == aggregate(t) for arbitrary t: what lets the fused loss form its gradient per chunk."""
    from fastrft.algo.loss import aggregate, aggregation_weights

    spec = PGLossSpec(aggregation=aggregation, max_len=9)
    g = torch.Generator().manual_seed(0)
    seq_ids = torch.tensor([3, 3, 3, 7, 1, 1, 1, 1, 5, 5])  # ragged, unsorted labels
    w = aggregation_weights(seq_ids, spec, torch.float64)
    for _ in range(3):
        t = torch.randn(10, generator=g, dtype=torch.float64)
        assert float((w * t).sum()) == pytest.approx(float(aggregate(t, seq_ids, spec)), abs=1e-12)
    assert aggregation_weights(seq_ids[:0], spec).numel() == 0
