"""The sampler-vs-trainer log-prob gap, with the exact mode off and on (issue 24).

    python bench/bench_logp_gap.py [--model smollm2-135m-instruct] [--samples 8] [--tokens 48]

For each precision (fp32, bf16) and mode (--exact-logprobs off, on), the engine samples G responses to
one add2 prompt. Every response token's engine log-prob is then compared with the trainer's: the packed
training forward over all G sequences, followed by the fused LM-head log-prob kernel. Each case runs in
its own process, and the engine's batches differ from the training forward's, so the comparison is the
one a run makes. CPU only; prints one row per case.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys


def case(model_name: str, precision: str, mode: str, samples: int, tokens: int) -> dict:
    import torch

    import fastrft
    from fastrft.kernels import linear_logprob
    from fastrft.models import exact, load_model, load_tokenizer

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = load_model(model_name, dtype=dtype, device="cpu").eval()
    if mode == "on":
        exact.enable([model], dtype, torch.device("cpu"))
    tok = load_tokenizer(model_name)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 38 + 45? Output the final answer after "
                                       "\"####\"."}], add_generation_prompt=True, tokenize=True, return_dict=False)
    outs = fastrft.generate(model, [prompt], n=samples, max_new_tokens=tokens, temperature=1.0, seed=1,
                            tokenizer=tok)[0]
    seqs = [prompt + c.token_ids for c in outs]
    ids = torch.tensor([t for s in seqs for t in s[:-1]])
    cu = torch.tensor([0, *itertools.accumulate(len(s) - 1 for s in seqs)], dtype=torch.int32)
    with torch.no_grad():
        hidden = model.forward_packed(ids, cu)
        pos = torch.tensor([int(cu[i]) + len(prompt) - 1 + j for i, c in enumerate(outs) for j in range(len(c.token_ids))])
        targets = torch.tensor([t for c in outs for t in c.token_ids])
        trainer, _ = linear_logprob(hidden.index_select(0, pos), model.lm_head_weight, targets)
    engine = torch.tensor([x for c in outs for x in c.logprobs])
    gap = (trainer - engine).abs()
    return {"mean": float(gap.mean()), "max": float(gap.max()), "zero": float((gap == 0).float().mean()),
            "tokens": gap.numel()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(case(args.model, *args.case.split(":"), args.samples, args.tokens)))
        return
    print("| precision | exact | mean gap | max gap | tokens with gap 0 | tokens |")
    print("|---|---|---:|---:|---:|---:|")
    for precision in ("fp32", "bf16"):
        for mode in ("off", "on"):
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--samples", str(args.samples),
                                  "--tokens", str(args.tokens), "--case", f"{precision}:{mode}"],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {precision} | {mode} | {r['mean']:.3g} | {r['max']:.3g} | {r['zero']:.0%} | {r['tokens']} |",
                  flush=True)


if __name__ == "__main__":
    main()
