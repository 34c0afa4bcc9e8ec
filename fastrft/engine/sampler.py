"""Token sampling with per-request random streams.

Each request (a prompt's j-th sample) owns a ``torch.Generator`` seeded from (run seed, prompt index,
sample index) and draws one exponential-noise vector per generated token. Its tokens therefore do not
depend on
which other requests share its batch, on batch order or on preemption: the property the paged engine
relies on when it reschedules sequences.

Log-probs are those of the distribution actually sampled from: temperature-scaled logits, restricted by
top-k / top-p and renormalised. With top_k = 0 and top_p = 1 this is log_softmax(logits / T), the same
quantity the trainer recomputes, so their gap measures numerical drift only. Greedy (T = 0) reports
log_softmax(logits) of the argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastrft.errors import ConfigError

_MIX = 0x9E3779B97F4A7C15  # 64-bit golden-ratio constant: spreads nearby seeds apart


def request_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed for one request; distinct (prompt, sample) pairs get unrelated streams."""
    h = (seed * _MIX + prompt_index) & (2**64 - 1)
    h = ((h ^ (h >> 31)) * _MIX + sample_index) & (2**64 - 1)
    h ^= h >> 29
    return h & (2**63 - 1)


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256

    def __post_init__(self):
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sampling_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(B, V) logits -> (B, V) fp32 log-probs of the sampling distribution (-inf where filtered)."""
    logits = logits.float()
    if params.greedy:
        return torch.log_softmax(logits, dim=-1)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens strictly more likely than it already reach top_p; the most
        # likely token always survives.
        drop_sorted = (probs.cumsum(-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def sample(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]):
    """Draw one token per row.

    logits (B, V); generators: one per row (ignored when greedy). Returns (tokens (B,) int64,
    logprobs (B,) fp32) with logprobs under the sampling distribution.
    """
    logp = sampling_logprobs(logits, params)
    if params.greedy:
        tokens = logp.argmax(dim=-1)
    else:
        # Exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) from the row's own stream picks token i
        # with probability p_i. Unlike an inverse CDF over the whole vocabulary, whose cumulative sum
        # carries the rounding of every token before it, the winner changes under a tiny perturbation
        # of p only at a near-tie of the top two scores, so batch composition does not flip draws.
        # Filtered tokens have p = 0 and never win.
        # -log(U) is Exp(1); drawing uniforms and taking one batched log is ~2.5x cheaper on CPU than
        # per-row exponential_().
        uniform = torch.stack([torch.rand(logp.shape[-1], generator=g) for g in generators])
        tokens = (logp.exp() / uniform.to(logp.device).log_().neg_()).argmax(dim=-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
