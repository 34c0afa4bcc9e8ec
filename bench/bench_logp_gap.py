"""Where does the sampler-vs-trainer log-prob gap of bf16-mixed come from? A first probe (issue 24).

    python bench/bench_logp_gap.py [--model smollm2-135m-instruct] [--samples 8] [--tokens 48]

The probe samples G responses to one add2 prompt with the engine, in bf16. Each token's engine log-prob
is compared with three recomputations from the training forward (packed, the same bf16 weights):
- the trainer's: logits from the bf16 hidden states and LM head, multiplied in fp32;
- logits multiplied in bf16 (the decode step's LM head): the difference between these two isolates
  the LM head's rounding;
- what is left is the decoder body, the hidden states the decode path computes.
CPU only; prints one line per response and a summary.
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    import fastrft
    from fastrft.models import load_model, load_tokenizer

    model = load_model(args.model, dtype=torch.bfloat16, device="cpu").eval()
    tok = load_tokenizer(args.model)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 38 + 45? Output the final answer after "
                                       "\"####\"."}], add_generation_prompt=True, tokenize=True, return_dict=False)
    outs = fastrft.generate(model, [prompt], n=args.samples, max_new_tokens=args.tokens, temperature=1.0, seed=1,
                            tokenizer=tok)[0]
    rows = {"vs trainer (fp32 LM head)": [], "vs bf16 LM head": [], "LM head rounding alone": []}
    for c in outs:
        seq = torch.tensor(prompt + c.token_ids)
        with torch.no_grad():
            hidden = model.forward_packed(seq[:-1], torch.tensor([0, len(seq) - 1], dtype=torch.int32))[len(prompt) - 1:]
            w, target = model.lm_head_weight, torch.tensor(c.token_ids)[:, None]
            fp32 = torch.log_softmax(hidden.float() @ w.float().T, -1).gather(1, target)[:, 0]
            bf16 = torch.log_softmax((hidden @ w.T).float(), -1).gather(1, target)[:, 0]
        engine = torch.tensor(c.logprobs)
        for key, gap in zip(rows, ((engine - fp32).abs(), (engine - bf16).abs(), (bf16 - fp32).abs())):
            rows[key].append(gap)
    for key, gaps in rows.items():
        g = torch.cat(gaps)
        print(f"{key:28s} |logp gap| mean {float(g.mean()):.3g}  max {float(g.max()):.3g}  ({g.numel()} tokens)")


if __name__ == "__main__":
    main()
