"""Rollout: sampling and generation. ``generate`` is the simple KV-cache reference."""

from fastrft.engine.generate import Completion, generate
from fastrft.engine.sampler import SamplingParams, request_seed, sample, sampling_logprobs

__all__ = ["Completion", "generate", "SamplingParams", "request_seed", "sample", "sampling_logprobs"]
