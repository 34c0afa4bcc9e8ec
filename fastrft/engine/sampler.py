"""Token sampling with per-request counter-based noise.

Each request (a prompt's j-th sample) has a seed from (run seed, prompt index, sample index). The noise
that picks its token at response position t is a pure function of (seed, t, vocabulary id)
(:mod:`fastrft.kernels.noise`), computed on the logits' device, inside the decode CUDA graph on GPUs.
A request's tokens therefore do not depend on which other requests share its batch, on batch order, on
preemption or on world size, and nothing about the random streams needs saving for an exact resume.

Log-probs are those of the distribution actually sampled from: temperature-scaled logits, restricted by
top-k / top-p and renormalised. With top_k = 0 and top_p = 1 this is log_softmax(logits / T), the same
quantity the trainer recomputes, so their gap measures numerical drift only. Greedy (T = 0) reports
log_softmax(logits) of the argmax.

Logits holding NaN or inf raise :class:`SamplingError`, naming the request and the position; a broken
model never silently yields token 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastrft.errors import ConfigError, FastRFTError
from fastrft.kernels.sampling import sample_tokens

_MIX = 0x9E3779B97F4A7C15  # 64-bit golden-ratio constant: spreads nearby seeds apart


class SamplingError(FastRFTError):
    """The model produced logits that cannot be sampled from (NaN or inf)."""


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
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise ConfigError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def inv_temperature(self) -> float:
        """1 / T as the kernels read it (0 for greedy)."""
        return 0.0 if self.greedy else 1.0 / self.temperature

    def filters(self, vocab_size: int) -> bool:
        """Whether top-k or top-p removes tokens (the slower path) for this vocabulary."""
        return not self.greedy and (0 < self.top_k < vocab_size or self.top_p < 1.0)


def filtered_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(B, V) logits -> (B, V) fp32 logits / T with -inf where top-k / top-p filter a token out."""
    z = logits.float() * params.inv_temperature
    if 0 < params.top_k < z.shape[-1]:
        kth = torch.topk(z, params.top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        # Drop a token when the tokens strictly more likely than it already reach top_p; the most
        # likely token always survives.
        drop_sorted = (probs.cumsum(-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return z


def sampling_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(B, V) logits -> (B, V) fp32 log-probs of the sampling distribution (-inf where filtered)."""
    if params.greedy:
        return torch.log_softmax(logits.float(), dim=-1)
    return torch.log_softmax(filtered_logits(logits, params), dim=-1)


def draw(logits: torch.Tensor, params: SamplingParams, seeds: torch.Tensor, positions: torch.Tensor,
         backend: str = "auto", consume: bool = False) -> torch.Tensor:
    """Sample one token per row on the logits' device; returns the (2, B) int32 result of
    :func:`fastrft.kernels.sampling.sample_tokens` (tokens, -1 for bad logits; log-prob bits).

    logits (B, V); seeds (B,) int64 request seeds; positions (B,) int64 response positions (the number
    of tokens the request has generated so far), both on the logits' device. consume: the logits are a
    scratch buffer the sampler may overwrite (the engine's)."""
    if not params.filters(logits.shape[-1]):
        return sample_tokens(logits, seeds, positions, params.inv_temperature, backend=backend, consume=consume)
    bad = ~torch.isfinite(logits).all(-1)  # checked before filtering writes its own -inf
    out = sample_tokens(filtered_logits(logits, params), seeds, positions, 1.0, strict=False, backend=backend)
    out[0] = torch.where(bad, -1, out[0])
    return out


def sample(logits: torch.Tensor, params: SamplingParams, seeds, positions=None, backend: str = "auto"):
    """:func:`draw` for tests and scripts. Returns (tokens (B,) int64, logprobs (B,) fp32) on the logits'
    device; token -1 marks a row with bad logits.

    seeds: B request seeds (ints or a tensor), or B ``torch.Generator`` objects, the interface of earlier
    versions: each row then takes a fresh 63-bit seed from its generator, so repeated calls draw fresh
    noise. positions: B response positions (default 0)."""
    dev = logits.device
    if isinstance(seeds, (list, tuple)) and seeds and isinstance(seeds[0], torch.Generator):
        seeds = [int(torch.randint(0, 2**63 - 1, (), generator=g)) for g in seeds]
    seeds = torch.as_tensor(seeds, dtype=torch.int64).to(dev)
    positions = torch.zeros_like(seeds) if positions is None else torch.as_tensor(positions, dtype=torch.int64).to(dev)
    out = draw(logits, params, seeds, positions, backend)
    return out[0].long(), out[1].view(torch.float32)


def check_draws(tokens: list[int], who, where: list[int]) -> None:
    """Raise :class:`SamplingError` for the first row whose token is -1. ``who(i)`` names row i's
    request; ``where[i]`` is its response position."""
    for i, tok in enumerate(tokens):
        if tok < 0:
            raise SamplingError(f"{who(i)}: the logits for response token {where[i]} hold NaN or inf, so no token "
                                "can be sampled. The model's weights or activations have overflowed or diverged; "
                                "lower the learning rate, use --precision fp32, or resume from an earlier "
                                "checkpoint")
