"""The policy-gradient loss family in plain PyTorch: the specification the fused kernels must equal.

On per-token tensors of shape (N,) (the response tokens of a packed batch), with A the advantage:

- ratio      r = exp(logp - old_logp); with old_logp None, r = exp(logp - logp.detach()) (value 1,
             gradient of logp: the on-policy REINFORCE case);
- policy     l = max(-A*r, -A*clip(r, 1-clip_low, 1+clip_high)); with dual_clip c and A < 0,
             l = min(l, -A*c);
- KL         k1 = logp - ref; k2 = (logp - ref)^2 / 2; k3 = exp(ref - logp) - (ref - logp) - 1;
- per token  t = l + kl_coef*KL - entropy_coef*entropy;
- aggregate  token-mean: sum(t)/N; seq-mean-token-mean: mean over sequences of the per-sequence mean;
             seq-mean-token-sum: mean over sequences of the per-sequence sum;
             seq-mean-token-sum-norm: sum(t) / (num_sequences * max_len)  (Dr. GRPO).

Every variant is a row of a table (KL_ESTIMATORS, AGGREGATION_TABLE), never a string branch elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from fastrft.algo.choices import AGGREGATIONS, KL_ESTIMATOR_NAMES
from fastrft.errors import ConfigError


def _k1(logp, ref):
    return logp - ref


def _k2(logp, ref):
    return 0.5 * (logp - ref) ** 2


def _k3(logp, ref):
    d = ref - logp
    return torch.exp(d) - d - 1


KL_ESTIMATORS = {"k1": _k1, "k2": _k2, "k3": _k3}
assert tuple(KL_ESTIMATORS) == KL_ESTIMATOR_NAMES, "fastrft.algo.choices lists the KL estimators the config accepts"


@dataclass(frozen=True)
class PGLossSpec:
    """Which member of the loss family. Validated at construction."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    aggregation: str = "token-mean"
    max_len: int | None = None

    def __post_init__(self):
        if not 0 <= self.clip_low < 1:
            raise ConfigError(f"clip_low must be in [0, 1), got {self.clip_low}")
        if self.clip_high < 0:
            raise ConfigError(f"clip_high must be >= 0, got {self.clip_high}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ConfigError(f"dual_clip must be > 1 (typically 3), got {self.dual_clip}; use None to disable")
        if self.kl_coef < 0:
            raise ConfigError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"kl_estimator {self.kl_estimator!r} is unknown; choose one of: "
                              f"{', '.join(KL_ESTIMATORS)}")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation {self.aggregation!r} is unknown; choose one of: {', '.join(AGGREGATIONS)}")
        if AGGREGATION_TABLE[self.aggregation].needs_max_len and (self.max_len is None or self.max_len < 1):
            raise ConfigError(f"aggregation {self.aggregation!r} needs max_len >= 1 "
                              "(the response-length budget, e.g. max_new_tokens)")

    @property
    def needs_ref(self) -> bool:
        return self.kl_coef > 0

    @property
    def needs_entropy(self) -> bool:
        return self.entropy_coef != 0


class _Layout:
    """Which sequence each of N tokens belongs to, derived once: num_seqs, dense labels 0..S-1, and the
    tokens per sequence."""

    def __init__(self, seq_ids: torch.Tensor):
        labels, self.dense = torch.unique(seq_ids, return_inverse=True)
        self.num_seqs = labels.numel()

    def counts(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.bincount(self.dense, minlength=self.num_seqs).to(dtype)


def _full(n: int, value: float, dtype, device) -> torch.Tensor:
    return torch.full((n,), value, dtype=dtype, device=device)


@dataclass(frozen=True)
class Aggregation:
    """One row of :data:`AGGREGATION_TABLE`: the reduction of per-token values to the loss, and the equal
    per-token weights w with sum(w * t) == reduce(t) (what the fused kernels take). ``layout``: whether it
    needs the tokens' sequences; ``needs_max_len``: whether it divides by the response-length budget."""

    reduce: Callable  # (t (N,), layout or None, spec) -> scalar
    weights: Callable  # (n, layout or None, spec, dtype, device) -> (N,)
    layout: bool = True
    needs_max_len: bool = False


AGGREGATION_TABLE: dict[str, Aggregation] = {
    "token-mean": Aggregation(lambda t, lay, spec: t.sum() / t.numel(),
                              lambda n, lay, spec, dt, dev: _full(n, 1.0 / n, dt, dev), layout=False),
    "seq-mean-token-mean": Aggregation(
        lambda t, lay, spec: (t.new_zeros(lay.num_seqs).index_add(0, lay.dense, t) / lay.counts(t.dtype)).mean(),
        lambda n, lay, spec, dt, dev: 1.0 / (lay.num_seqs * lay.counts(dt)[lay.dense])),
    "seq-mean-token-sum": Aggregation(
        lambda t, lay, spec: t.new_zeros(lay.num_seqs).index_add(0, lay.dense, t).mean(),
        lambda n, lay, spec, dt, dev: _full(n, 1.0 / lay.num_seqs, dt, dev)),
    "seq-mean-token-sum-norm": Aggregation(
        lambda t, lay, spec: t.sum() / (lay.num_seqs * spec.max_len),
        lambda n, lay, spec, dt, dev: _full(n, 1.0 / (lay.num_seqs * spec.max_len), dt, dev), needs_max_len=True),
}
assert tuple(AGGREGATION_TABLE) == AGGREGATIONS, "fastrft.algo.choices lists the aggregations the config accepts"


def aggregate(per_token: torch.Tensor, seq_ids: torch.Tensor, spec: PGLossSpec) -> torch.Tensor:
    """Reduce per-token values (N,) to a scalar by ``spec.aggregation``; seq_ids (N,) int, any labels."""
    if per_token.numel() == 0:
        return per_token.sum()  # zero, and still connected to the graph
    row = AGGREGATION_TABLE[spec.aggregation]
    return row.reduce(per_token, _Layout(seq_ids) if row.layout else None, spec)


def aggregation_weights(seq_ids: torch.Tensor, spec: PGLossSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-token weights w (N,) with sum(w * t) == aggregate(t, seq_ids, spec) for every t.

    Every aggregation is linear in the per-token values with weights fixed by the batch layout alone, so
    dL/dt_i = w_i and each token's gradient coefficient is local to its row: this is what lets the fused
    LM-head loss form the gradient in the same pass that finds the row's log-sum-exp.
    """
    n = seq_ids.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=dtype, device=seq_ids.device)
    row = AGGREGATION_TABLE[spec.aggregation]
    return row.weights(n, _Layout(seq_ids) if row.layout else None, spec, dtype, seq_ids.device)


def token_terms(logp: torch.Tensor, advantages: torch.Tensor, *, old_logp: torch.Tensor | None = None,
                ref_logp: torch.Tensor | None = None, entropy: torch.Tensor | None = None, spec: PGLossSpec):
    """The per-token loss t (N,) before aggregation, with the ratio and the KL estimate (or None).

    Each t_i depends on row i alone (its logp, entropy, old/ref log-probs and advantage).
    """
    adv = advantages.to(logp.dtype)
    log_ratio = logp - (logp.detach() if old_logp is None else old_logp.to(logp.dtype))
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1 - spec.clip_low, 1 + spec.clip_high)
    per_token = torch.maximum(-adv * ratio, -adv * clipped)
    if spec.dual_clip is not None:
        per_token = torch.where(adv < 0, torch.minimum(per_token, -adv * spec.dual_clip), per_token)
    kl = None
    if ref_logp is not None:
        kl = KL_ESTIMATORS[spec.kl_estimator](logp, ref_logp.to(logp.dtype))
        if spec.kl_coef:
            per_token = per_token + spec.kl_coef * kl
    if spec.entropy_coef:
        per_token = per_token - spec.entropy_coef * entropy.to(logp.dtype)
    return per_token, ratio, kl


def pg_loss(logp: torch.Tensor, advantages: torch.Tensor, seq_ids: torch.Tensor, *,
            old_logp: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None,
            entropy: torch.Tensor | None = None, spec: PGLossSpec,
            weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The policy-gradient loss and its detached statistics.

    logp (N,) float, differentiable: log-probs of the taken tokens under the current policy;
    advantages (N,) float per token; seq_ids (N,) int sequence index of each token;
    old_logp (N,) sampling-policy log-probs or None (on-policy); ref_logp (N,) reference-policy log-probs,
    required when spec.kl_coef > 0; entropy (N,) required when spec.entropy_coef != 0.
    weights (N,), optional: aggregation weights computed over a larger batch that these tokens are a
    micro-batch of (:func:`aggregation_weights` of the whole step, sliced): the loss is then sum(w * t), and
    the micro-batches' losses and gradients add up to the whole step's.
    Returns (scalar loss, stats) with stats: logp_mean, entropy_mean, kl_mean, clip_frac_low,
    clip_frac_high, ratio_min, ratio_max (floats; NaN-free; 0 for an empty batch).
    """
    n = logp.shape[0]
    for name, t in (("advantages", advantages), ("seq_ids", seq_ids), ("old_logp", old_logp),
                    ("ref_logp", ref_logp), ("entropy", entropy), ("weights", weights)):
        if t is not None and t.shape != (n,):
            raise ValueError(f"pg_loss: {name} has shape {tuple(t.shape)}, expected ({n},) like logp")
    if spec.needs_ref and ref_logp is None:
        raise ValueError("pg_loss: spec.kl_coef > 0 needs ref_logp")
    if spec.needs_entropy and entropy is None:
        raise ValueError("pg_loss: spec.entropy_coef != 0 needs entropy")

    per_token, ratio, kl = token_terms(logp, advantages, old_logp=old_logp, ref_logp=ref_logp, entropy=entropy,
                                       spec=spec)
    adv = advantages.to(logp.dtype)
    loss = aggregate(per_token, seq_ids, spec) if weights is None else (weights.to(logp.dtype) * per_token).sum()

    with torch.no_grad():
        r = ratio.detach()

        def mean(x):
            return float(x.float().mean()) if x is not None and x.numel() else 0.0

        stats = {
            "logp_mean": mean(logp.detach()),
            "entropy_mean": mean(entropy.detach() if entropy is not None else None),
            "kl_mean": mean(kl.detach() if kl is not None else None),
            # A token is clipped when the clamp is the active branch of the max (it changes the value).
            "clip_frac_low": mean(((r < 1 - spec.clip_low) & (adv < 0)).float()) if n else 0.0,
            "clip_frac_high": mean(((r > 1 + spec.clip_high) & (adv > 0)).float()) if n else 0.0,
            "ratio_min": float(r.min()) if n else 0.0,
            "ratio_max": float(r.max()) if n else 0.0,
        }
    return loss, stats
