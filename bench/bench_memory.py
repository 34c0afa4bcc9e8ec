"""Peak memory and time of one training step against packed tokens, with and without a token budget.

    python bench/bench_memory.py                                   # CPU: SmolLM2-135M, fp32, 512 -> 16,384 tokens
    python bench/bench_memory.py --tokens 512,2048 --repeats 1     # a quick look
    python bench/bench_memory.py --shape qwen2.5-1.5b              # GPU: random Qwen2.5-1.5B shape, bf16-mixed
    python bench/bench_memory.py --shape qwen2.5-0.5b --precision bf16-mixed --tokens 4096 --configs budget \
        --lora-rank 0,16                                           # full fine-tuning against LoRA r = 16

Configurations: ``none`` (one forward + backward over the whole step), ``budget`` (--max-tokens-per-step,
default 2,048) and ``budget+ckpt`` (the budget and activation checkpointing). A step is what the trainer
does for one optimizer step: the step's sequences cut into micro-batches (fastrft.microbatch), each packed,
run through the model and the fused policy-gradient loss with the step's aggregation weights, backward,
then AdamW on the master weights (``--precision``, as the trainer runs it: fastrft.precision). Sequences are random tokens, 64 prompt + 448 response each (512 packed tokens), with random
advantages. Each case runs in a fresh process: the gradients and AdamW's state are allocated first, then
one warm-up step and ``--repeats`` timed ones, so "peak extra" is what a step adds above the model, its
gradients and the optimizer state: on CPU the RSS high-water mark (reset through /proc/self/clear_refs
once they are allocated) less the RSS then, on GPU the CUDA allocator's peak. A case whose estimate exceeds the machine's
memory is reported as skipped instead of being run.

``--lora-rank R`` (a comma list; 0 is full fine-tuning) trains LoRA adapters on all seven projections, the
model built as the trainer builds it (fastrft.precision.load_policy: the frozen base held once, in the
compute dtype; masters, gradients and AdamW state for the adapters only). Since what LoRA saves is the
state, not the step, the table then also gives "peak RSS": the process's whole high-water mark over the
steps (model, state and step; CPU), and each case's ratio to rank 0's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import Result, _rss_mib, report, result_from_dict, result_to_dict, run_isolated  # noqa: E402

CONFIGS = ("none", "budget", "budget+ckpt")
PROMPT, RESPONSE = 64, 448


def make_step(precision, tokens: int, budget: int | None, device: str, seed: int = 0):
    from fastrft.algo import PGLossSpec, pack
    from fastrft.kernels import fused_linear_pg_loss
    from fastrft.microbatch import micro_batches, step_weights
    from fastrft.precision import make_adamw

    g = torch.Generator().manual_seed(seed)
    model = precision.train_model
    vocab = model.lm_head_weight.shape[0]
    n = max(1, tokens // (PROMPT + RESPONSE))
    prompts = [torch.randint(0, vocab, (PROMPT,), generator=g).tolist() for _ in range(n)]
    responses = [torch.randint(0, vocab, (RESPONSE + 1,), generator=g).tolist() for _ in range(n)]
    advantages = torch.randn(n, generator=g).tolist()
    spec = PGLossSpec(aggregation="seq-mean-token-mean")
    optimizer = make_adamw(precision.trainable, lr=1e-6, betas=(0.9, 0.999), weight_decay=0.01,
                           device=precision.master.device)
    # The gradients and AdamW's two states exist before anything is measured: a step with zero gradients
    # allocates them (and moves nothing but by weight decay), so the peak counts only what a step adds.
    for p in precision.trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    groups = micro_batches([PROMPT + RESPONSE] * n, budget)
    weights = step_weights([RESPONSE + 1] * n, spec) if len(groups) > 1 else None

    def step():
        optimizer.zero_grad(set_to_none=False)
        for group in groups:
            batch = pack([prompts[i] for i in group], [responses[i] for i in group], [advantages[i] for i in group],
                         [[0.0] * (RESPONSE + 1) for _ in group]).to(device)
            hidden = model.forward_packed(batch.input_ids, batch.cu_seqlens).index_select(0, batch.target_pos)
            w = None if weights is None else torch.cat([weights[i] for i in group]).to(device)
            loss, _ = fused_linear_pg_loss(hidden, model.lm_head_weight, batch.targets, batch.advantages,
                                           batch.seq_ids, spec=spec, weights=w)
            loss.backward()
            del hidden, loss
        optimizer.step()
        precision.after_step()
    return step, n * (PROMPT + RESPONSE), len(groups)


def worker(model_name: str, precision: str, device: str, tokens: int, config: str, budget: int, repeats: int,
           rank: int = 0) -> dict:
    from fastrft.config import ModelConfig, RunConfig, TrainConfig
    from fastrft.models.lora_names import TARGETS
    from fastrft.precision import Precision, load_policy

    cfg = TrainConfig(model=ModelConfig(model=model_name, precision=precision, lora_rank=rank,
                                        lora_targets=TARGETS if rank else ModelConfig().lora_targets),
                      run=RunConfig(seed=0))
    prec = Precision(load_policy(cfg, precision, torch.device(device)), precision)
    prec.train_model.activation_checkpointing = config == "budget+ckpt"
    step, packed, micro = make_step(prec, tokens, None if config == "none" else budget, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mib("VmRSS")  # model, gradients and optimizer state, all allocated
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    step()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    # CPU: the RSS high-water mark since the baseline, warm-up included (the same step).
    whole = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else _rss_mib("VmHWM")
    peak = whole - (base / 2**20 if device.startswith("cuda") else base)
    times.sort()
    median = times[len(times) // 2]
    label = f"{config} T={packed}" + (f" LoRA r={rank}" if rank else "")
    res = Result("memory", label, median, times_s=times, unit="tok/s", throughput=packed / median,
                 shape=dict(model=Path(model_name).name, tokens=packed, precision=precision, config=config,
                           budget=budget, lora_rank=rank))
    res.peak_mib = peak
    res.extra = {"micro-batches": micro, "ms/token": 1e3 * median / packed, "peak RSS MiB": round(whole),
                 "trainable": sum(t.numel() for t in prec.trainable)}
    return result_to_dict(res)


def _available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model alias or directory")
    ap.add_argument("--shape", default=None, help="instead of --model: a random-weight model of this shape "
                                                  "(the harness's SHAPES, e.g. qwen2.5-1.5b), written to a "
                                                  "temporary directory")
    ap.add_argument("--precision", default=None, choices=("fp32", "bf16-mixed", "bf16", "fp16"),
                    help="default: bf16-mixed on GPU, fp32 on CPU")
    ap.add_argument("--tokens", default="512,1024,2048,4096,8192,16384", help="comma list of packed tokens per step")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--budget", type=int, default=2048, help="--max-tokens-per-step of the budget configurations")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--mib-per-token", type=float, default=1.8,
                    help="activation estimate used to skip unbudgeted cases that would not fit in memory")
    ap.add_argument("--lora-rank", default="0", help="comma list of LoRA ranks on all 7 projections (0: full "
                                                     "fine-tuning), e.g. 0,16")
    ap.add_argument("--worker", nargs=8, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        m, d, dev, t, c, b, r, rank = args.worker
        print(json.dumps(worker(m, d, dev, int(t), c, int(b), int(r), int(rank))))
        return
    precision = args.precision or ("bf16-mixed" if args.device.startswith("cuda") else "fp32")
    model = args.model
    if args.shape:
        import tempfile

        from harness import FILE_DTYPE, write_model_dir

        model = str(write_model_dir(args.shape, FILE_DTYPE[precision], args.device,
                                    Path(tempfile.mkdtemp(prefix="bench-memory-")) / args.shape))
    ranks = [int(x) for x in args.lora_rank.split(",")]
    if any(r < 0 for r in ranks):
        ap.error(f"--lora-rank {args.lora_rank}: ranks must be >= 0 (0: full fine-tuning)")
    results = []
    for config in args.configs.split(","):
        for tokens in (int(x) for x in args.tokens.split(",")):
            full = None
            for rank in ranks:
                case = f"{config} T={tokens}" + (f" LoRA r={rank}" if rank else "")
                need = (tokens if config == "none" else args.budget) * args.mib_per_token
                if not args.device.startswith("cuda") and need > 0.8 * _available_mib():
                    results.append(Result("memory", case, None, error=f"skipped: needs about {need / 1024:.0f} GiB",
                                          shape=dict(tokens=tokens, config=config)))
                    continue
                print(f"... {case}", file=sys.stderr, flush=True)
                out = run_isolated(__file__, ["--worker", model, precision, args.device, str(tokens), config,
                                              str(args.budget), str(args.repeats), str(rank)], timeout=3600)
                if out.get("error"):
                    results.append(Result("memory", case, None, error=out["error"],
                                          shape=dict(tokens=tokens, config=config)))
                    continue
                r = result_from_dict(out)
                if rank == 0:
                    full = r.extra["peak RSS MiB"]
                if len(ranks) > 1:
                    r.extra["RSS vs full"] = round(r.extra["peak RSS MiB"] / full, 3) if full else None
                results.append(r)
    report(results, f"one training step, {args.shape or args.model} {precision}, budget {args.budget}", args.device,
           columns=("micro-batches", "ms/token") + (("peak RSS MiB", "trainable", "RSS vs full")
                                                    if ranks != [0] else ()), time_unit="s")


if __name__ == "__main__":
    main()
