"""Batched sampling over the native model with a contiguous KV cache: the readable reference rollout.

The engine (:mod:`fastrft.engine.engine`) is tested against this function: same requests, same seeds,
same tokens.

Per chunk of requests: the distinct prompts are left-padded and prefilled once; each prompt's cache row
is then repeated for its n samples (the prompt KV is computed once, as the paged engine will share it
by reference). Decode steps run every live row together; rows that finish are dropped from the batch.
The paged C++ engine replaces the cache management and is tested against this function.
"""

from __future__ import annotations

import torch

from fastrft.engine.sampler import SamplingParams, check_draws, draw, request_seed
from fastrft.engine.sequence import Completion, check_requests
from fastrft.kernels.sampling import unpack


@torch.no_grad()
def reference_generate(model, prompt_ids: list[list[int]], *, n: int = 1, max_new_tokens: int = 256,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
             eos_token_ids: list[int] | tuple[int, ...] | None = None, tokenizer=None,
             max_batch_size: int = 64) -> list[list[Completion]]:
    """Sample ``n`` completions for each prompt.

    prompt_ids: list of P token-id lists; temperature 0 means greedy; eos_token_ids None stops on the
    model's EOS ids and [] never stops early; seed: requests (p, j) use independent streams derived from
    (seed, p, j), so results do not depend on max_batch_size. Returns P lists of n Completions.
    """
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens)
    check_requests(model, prompt_ids, n, max_batch_size)
    stop = set(model.eos_token_ids if eos_token_ids is None else eos_token_ids)

    requests = [(p, j) for p in range(len(prompt_ids)) for j in range(n)]
    results: list[list[Completion | None]] = [[None] * n for _ in prompt_ids]
    for start in range(0, len(requests), max_batch_size):
        chunk = requests[start:start + max_batch_size]
        for (p, j), c in zip(chunk, _generate_chunk(model, prompt_ids, chunk, params, seed, stop)):
            if tokenizer is not None:
                c.text = tokenizer.decode(c.token_ids, skip_special_tokens=True)
            results[p][j] = c
    return results  # type: ignore[return-value]


def _generate_chunk(model, prompt_ids, chunk, params: SamplingParams, seed: int, stop: set[int]):
    device = model.device
    prompts = sorted({p for p, _ in chunk})
    lens = [len(prompt_ids[p]) for p in prompts]
    width = max(lens)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, p in enumerate(prompts):  # left padding aligns every prompt's last token
        ids[row, width - lens[row]:] = torch.tensor(prompt_ids[p])
        valid[row, width - lens[row]:] = True
    positions = (valid.long().cumsum(-1) - 1).clamp_min(0)
    cache = model.new_cache(len(prompts), width + min(params.max_new_tokens, 128))
    hidden = model.forward_cached(ids.to(device), positions.to(device), cache, valid.to(device))
    logits = hidden[:, -1] @ model.lm_head_weight.T

    rows = torch.tensor([prompts.index(p) for p, _ in chunk], device=device)
    cache.select(rows)
    logits = logits.index_select(0, rows)
    next_pos = torch.tensor([len(prompt_ids[p]) for p, _ in chunk], device=device)
    seeds = torch.tensor([request_seed(seed, p, j) for p, j in chunk], device=device)
    out = [Completion([], [], "length", prompt_index=p, sample_index=j) for p, j in chunk]
    live = list(range(len(chunk)))  # batch row -> index into chunk

    for step in range(params.max_new_tokens):
        toks, logps = unpack(draw(logits, params, seeds, torch.full_like(seeds, step)).cpu())
        check_draws(toks, lambda r: f"request (prompt {chunk[live[r]][0]}, sample {chunk[live[r]][1]})",
                    [step] * len(live))
        tokens = torch.tensor(toks, device=device)
        keep = []
        for row, (i, tok, lp) in enumerate(zip(live, toks, logps)):
            out[i].token_ids.append(tok)
            out[i].logprobs.append(lp)
            if tok in stop:
                out[i].finish_reason = "stop"
            elif step + 1 < params.max_new_tokens:
                keep.append(row)
        if not keep:
            break
        if len(keep) < len(live):
            sel = torch.tensor(keep, device=device)
            cache.select(sel)
            tokens, next_pos = tokens.index_select(0, sel), next_pos.index_select(0, sel)
            seeds = seeds.index_select(0, sel)
            live = [live[r] for r in keep]
        hidden = model.forward_cached(tokens[:, None], next_pos[:, None], cache)
        logits = hidden[:, -1] @ model.lm_head_weight.T
        next_pos = next_pos + 1
    return out
