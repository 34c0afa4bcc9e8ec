"""Rollout: the paged continuous-batching engine, its sampler, and the simple reference generate.

``generate`` (also ``fastrft.generate``) runs through :class:`Engine`; ``reference_generate`` is the
readable contiguous-cache implementation it is tested against.
"""

from __future__ import annotations

from fastrft.engine.engine import Engine, EngineConfig
from fastrft.engine.reference import reference_generate
from fastrft.engine.sampler import SamplingError, SamplingParams, draw, request_seed, sample, sampling_logprobs
from fastrft.engine.sequence import Completion


def generate(model, prompt_ids: list[list[int]], *, n: int = 1, max_new_tokens: int = 256, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, seed: int = 0, eos_token_ids=None, tokenizer=None,
             max_batch_size: int | None = None, engine_config: EngineConfig | None = None) -> list[list[Completion]]:
    """Sample ``n`` completions for each prompt through a paged engine built for this call.

    prompt_ids: P token-id lists. temperature 0 = greedy; eos_token_ids None = the model's EOS ids, [] =
    never stop early; request (p, j) draws from its own stream seeded from (seed, p, j), so results do
    not depend on batching. max_batch_size caps the sequences decoded together (None: 256 on GPU, 64 on
    CPU), but never below n: the samples of one prompt are forks of its prefill and run together.
    Returns P lists of n :class:`Completion`. The KV cache is sized to this call (capped by the default
    budget); for repeated calls keep one :class:`Engine` instead.
    """
    if engine_config is None:
        bs = 16
        blocks = sum(-(-len(p) // bs) + n * (-(-max_new_tokens // bs) + 1) for p in prompt_ids)
        need = blocks * bs * model.kv_bytes_per_token()
        cap = 2 * 2**30 if model.device.type != "cuda" else None
        memory = min(need, cap) if cap else need
        engine_config = EngineConfig(block_size=bs, kv_cache_memory=max(memory, 2),
                                     max_num_seqs=max(max_batch_size or (256 if model.device.type == "cuda" else 64), n),
                                     cuda_graphs=False)
    engine = Engine(model, tokenizer, engine_config)
    return engine.generate(prompt_ids, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           top_k=top_k, seed=seed, eos_token_ids=eos_token_ids)


__all__ = ["Completion", "Engine", "EngineConfig", "SamplingError", "SamplingParams", "draw", "generate",
           "reference_generate", "request_seed", "sample", "sampling_logprobs"]
