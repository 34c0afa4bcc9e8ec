"""CPU benchmarks of the foundation: rollout throughput (ours vs transformers' generate) and one
training step, on the embedded SmolLM2-135M-Instruct in fp32.

    python bench/bench_cpu.py [--quick]

Rollouts decode a fixed number of tokens (EOS disabled) from the chat-formatted arithmetic prompts, so
both implementations do identical work. Numbers go to stdout as Markdown (for bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import measure, report  # noqa: E402

import fastrft  # noqa: E402
from fastrft.algo import PGLossSpec, pack  # noqa: E402
from fastrft.kernels import fused_linear_pg_loss  # noqa: E402
from fastrft.data import arithmetic_problems, encode_prompt  # noqa: E402
from fastrft.precision import make_adamw  # noqa: E402

MODEL = "smollm2-135m-instruct"


def prompts(tokenizer, n: int) -> list[list[int]]:
    exs = arithmetic_problems("add1", "train")[:n]
    return [encode_prompt(tokenizer, e, "arithmetic", max_prompt_tokens=512) for e in exs]


def bench_rollout(model, hf, tokenizer, batch: int, new_tokens: int, repeats: int):
    ps = prompts(tokenizer, batch)
    ours = measure("rollout", f"fastrft.generate, batch {batch}, {new_tokens} new tokens",
                   lambda: sum(len(g[0].token_ids) for g in fastrft.generate(
                       model, ps, n=1, max_new_tokens=new_tokens, seed=0, eos_token_ids=[], max_batch_size=batch)),
                   repeats=repeats, warmup=1, unit="tok/s")
    # transformers needs equal-length rows: the arithmetic prompts all have the same length.
    assert len({len(p) for p in ps}) == 1
    x = torch.tensor(ps)

    def hf_run():
        with torch.no_grad():
            out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=True, temperature=1.0, top_k=0,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None)
        return (out.shape[1] - x.shape[1]) * batch

    theirs = measure("rollout", f"transformers generate, batch {batch}, {new_tokens} new tokens", hf_run,
                     repeats=repeats, warmup=1, unit="tok/s")
    return [ours, theirs]


def bench_train_step(model, tokenizer, seqs: int, response_len: int, repeats: int):
    ps = prompts(tokenizer, seqs)
    g = torch.Generator().manual_seed(0)
    responses = [torch.randint(0, model.config.vocab_size, (response_len,), generator=g).tolist() for _ in ps]
    batch = pack(ps, responses, [1.0] * seqs, [[0.0] * response_len for _ in ps])
    opt = make_adamw(model.parameters(), lr=1e-7, betas=(0.9, 0.999), weight_decay=0.01, device=model.device)
    spec = PGLossSpec()

    def step():
        hidden = model.forward_packed(batch.input_ids, batch.cu_seqlens)
        loss, _ = fused_linear_pg_loss(hidden.index_select(0, batch.target_pos), model.lm_head_weight, batch.targets,
                                       batch.advantages, batch.seq_ids, spec=spec)
        opt.zero_grad(set_to_none=False)  # as the trainer does on CPU
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return batch.num_tokens

    return measure("train", f"fwd+bwd+AdamW, {seqs} seq x ({len(ps[0])} prompt + {response_len} response)", step,
                   repeats=max(repeats, 5), warmup=2, unit="tok/s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and smaller batches")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from fastrft.models import embedded

    model = fastrft.load_model(MODEL)
    tokenizer = fastrft.load_tokenizer(MODEL)
    hf = AutoModelForCausalLM.from_pretrained(embedded.cache_dir(MODEL), dtype=torch.float32).eval()
    reps = 1 if args.quick else 3
    results = bench_rollout(model, hf, tokenizer, 1, 64, reps)
    results += bench_rollout(model, hf, tokenizer, 16 if args.quick else 64, 64, 1 if args.quick else 2)
    results.append(bench_train_step(model, tokenizer, 1, 96, reps))
    results.append(bench_train_step(model, tokenizer, 8, 96, reps))
    report(results, "CPU: rollout and training step, SmolLM2-135M-Instruct fp32")


if __name__ == "__main__":
    main()
