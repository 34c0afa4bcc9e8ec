"""Per-request state of a rollout and the completion it returns."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastrft.errors import ConfigError


@dataclass
class Completion:
    """One sampled response. ``token_ids`` includes the stop token when finish_reason is "stop"."""

    token_ids: list[int]
    logprobs: list[float]  # one per token in token_ids, under the sampling distribution
    finish_reason: str  # "stop" (an EOS id was sampled) | "length" (max_new_tokens reached)
    text: str | None = None  # decoded without special tokens when a tokenizer was given
    prompt_index: int = 0
    sample_index: int = 0
    extra: dict = field(default_factory=dict)


@dataclass
class Sequence:
    """One request (prompt p, sample j) inside the engine. ``prompt`` is shared by the samples of a
    prompt; ``seed`` keys the request's noise (with the response position), so preemption and
    recomputation draw the same tokens."""

    seq_id: int
    prompt_index: int
    sample_index: int
    prompt: list[int]
    seed: int
    max_new_tokens: int = 256
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def last_token(self) -> int:
        return self.output[-1] if self.output else self.prompt[-1]

    def completion(self) -> Completion:
        return Completion(list(self.output), list(self.logprobs), self.finish_reason or "length",
                          prompt_index=self.prompt_index, sample_index=self.sample_index)


def check_requests(model, prompt_ids: list[list[int]], n: int, max_batch_size: int = 1) -> None:
    """Refuse malformed requests with a message naming the prompt and what to change."""
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    if max_batch_size < 1:
        raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
    vocab = model.config.vocab_size
    for p, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise ConfigError(f"prompt {p} is empty; every prompt needs at least one token")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ConfigError(f"prompt {p} has a token id outside [0, {vocab})")
