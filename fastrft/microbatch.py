"""Token-budgeted micro-batches: a memory bound on one forward + backward, with the step's gradient unchanged.

An optimizer step's sequences are cut, in order, into micro-batches of at most ``budget`` packed tokens
(prompt + response - 1 each, what :func:`fastrft.algo.pack` feeds the model). No sequence is split; a
sequence longer than the budget gets a micro-batch of its own (the budget bounds the memory of every
other micro-batch, and refusing would make a long response fail the run).

Normalisation is global. Every aggregation of the loss family is sum_i w_i * t_i with weights fixed by
the layout of the WHOLE step (:func:`fastrft.algo.loss.aggregation_weights`): each micro-batch's loss
uses its slice of those weights, so the micro-batch losses add up to the step's loss, and their
accumulated gradients to its gradient, in every aggregation mode (per-sequence means included, which a
per-micro-batch mean would get wrong).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastrft.algo.loss import PGLossSpec, aggregation_weights


class MicroBatch(NamedTuple):
    members: list[int]  # indices into the step's sequences
    weights: torch.Tensor | None  # its tokens' aggregation weights within the step; None: the step is one micro-batch


def micro_batches(lengths: list[int], budget: int | None) -> list[list[int]]:
    """Consecutive groups of indices into ``lengths`` whose packed tokens stay within ``budget``.

    >>> micro_batches([5, 5, 3, 9, 2], 10)
    [[0, 1], [2], [3], [4]]
    >>> micro_batches([5, 5, 3], None)
    [[0, 1, 2]]
    >>> micro_batches([12, 2], 10)   # longer than the budget: a micro-batch of its own
    [[0], [1]]
    """
    if budget is None:
        return [list(range(len(lengths)))] if lengths else []
    if budget < 1:
        raise ValueError(f"max_tokens_per_step (--max-tokens-per-step) must be >= 1, got {budget}")
    groups: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if groups and used + n <= budget:
            groups[-1].append(i)
            used += n
        else:
            groups.append([i])
            used = n
    return groups


def step_weights(response_lengths: list[int], spec: PGLossSpec) -> list[torch.Tensor]:
    """Per sequence, its tokens' aggregation weights within the whole step (fp32)."""
    seq_ids = torch.repeat_interleave(torch.arange(len(response_lengths)), torch.tensor(response_lengths))
    return list(aggregation_weights(seq_ids, spec, torch.float32).split(response_lengths))


def merge_micro_stats(parts: list[dict[str, float]], tokens: list[int]) -> dict[str, float]:
    """One step's stats from its micro-batches': losses add (they are slices of one normalised sum), means
    are weighted by ``tokens`` (each micro-batch's response tokens: its means are over those), *_min /
    *_max are taken over all."""
    total = sum(tokens)
    out: dict[str, float] = {}
    for k in parts[0]:
        vals = [(p[k], n) for p, n in zip(parts, tokens) if k in p]
        if k == "loss":
            out[k] = sum(v for v, _ in vals)
        elif k.endswith("_min"):
            out[k] = min(v for v, _ in vals)
        elif k.endswith("_max"):
            out[k] = max(v for v, _ in vals)
        else:
            out[k] = sum(v * n for v, n in vals) / max(total, 1)
    return out


#: The CPU default: 2,048 packed tokens keep what a SmolLM2-135M fp32 step adds to about 3.7 GiB (about
#: 1.65 MiB per token, bench/RESULTS.md), under the 4 GiB a laptop can spare.
CPU_DEFAULT_TOKENS = 2048


def activation_bytes_per_token(hidden_size: int, intermediate_size: int, num_layers: int, dtype_bytes: int,
                               checkpointing: bool) -> int:
    """A rough upper estimate of the activations one packed token keeps for the backward.

    Per decoder layer about 18 hidden-sized values (norms, q/k/v, attention output, residuals, saved
    softmax statistics) and 4 intermediate-sized ones (gate, up, their product, the activation). With
    checkpointing only each layer's input is kept, plus one layer's worth during its recompute.
    The estimate against measured peaks: bench/RESULTS.md (bench_memory.py).
    """
    per_layer = 18 * hidden_size + 4 * intermediate_size
    elements = num_layers * hidden_size + per_layer if checkpointing else num_layers * per_layer
    return elements * dtype_bytes


def default_token_budget(precision, device: torch.device, checkpointing: bool) -> tuple[int, str]:
    """(budget, how it was chosen) for --max-tokens-per-step left unset; ``precision`` is the run's
    :class:`fastrft.precision.Precision`.

    CUDA: 80% of the free memory left once the master gradients, AdamW's two fp32 states and the compute
    copy's gradients are counted, and 2 GiB kept for the LM-head workspace and the allocator, divided by
    the per-token estimate in the compute dtype. CPU: the fixed :data:`CPU_DEFAULT_TOKENS`.
    """
    if device.type != "cuda":
        return CPU_DEFAULT_TOKENS, f"the CPU default of {CPU_DEFAULT_TOKENS} tokens"
    model = precision.train_model
    cfg = model.config
    # Under FSDP2 the masters are DTensors: this rank holds its shard of them (and of their gradients and
    # AdamW state); the full compute copy is counted by compute_bytes.
    masters = [p.to_local() if hasattr(p, "to_local") else p for p in precision.trainable]  # (LoRA: the adapters)
    grads = sum(p.numel() * p.element_size() for p in masters)
    adam = sum(2 * p.numel() * 4 for p in masters)
    grads += precision.compute_bytes()  # a bf16 gradient lives until it is folded into its master
    free, _ = torch.cuda.mem_get_info(device)
    per_token = activation_bytes_per_token(cfg.hidden_size, cfg.intermediate_size, cfg.num_layers,
                                           torch.empty((), dtype=precision.compute_dtype).element_size(),
                                           checkpointing)
    avail = 0.8 * (free - grads - adam - 2 * 2**30)
    budget = max(256, int(avail // per_token))
    return budget, (f"{free / 2**30:.1f} GiB free, {(grads + adam) / 2**30:.1f} GiB for gradients and AdamW, "
                    f"about {per_token / 2**20:.2f} MiB of activations per token"
                    f"{' with activation checkpointing' if checkpointing else ''}")
