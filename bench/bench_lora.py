"""What LoRA buys: decode speed with adapters, a training step's time, one round's memory and time.

    python bench/bench_lora.py decode     # batch-64 decode tok/s with r = 16 adapters on every projection vs none
    python bench/bench_lora.py step       # one G = 8 step's fwd + bwd + AdamW: LoRA r = 16 vs full fine-tuning
    python bench/bench_lora.py round      # one L0 round end to end, a Qwen2.5-1.5B shape with LoRA r = 16

``decode`` runs both cases in one process, interleaved (A B A B ...); ``step`` runs each case in its own
process, the processes alternating (A B A B ...); both on the embedded SmolLM2-135M-Instruct (``--model``)
in fp32 (the CPU default; ``--precision``), so the ratio is measured side by side. ``round`` runs in a fresh process and reports its peak RSS (the process's high-water mark, model
included); its model has random weights with the real shapes (bench/harness.py). On CUDA (``--device cuda``)
it reports the CUDA allocator's peak instead; ``bench/gpu_suite.sh`` runs its ``lora`` stage this way with a
Qwen2.5-7B shape. The peak memory of one training step, full fine-tuning against LoRA, is
``bench/bench_memory.py --lora-rank 0,16``'s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import FILE_DTYPE, Result, _rss_mib, report, run_isolated, write_model_dir  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _policy(model_name: str | None, shape: str | None, precision: str, rank: int, device: str):
    """(Precision, model) of ``model_name`` (or a random model of ``shape``) with ``rank`` adapters (0: none),
    built as the trainer builds it (fastrft.precision.load_policy)."""
    from fastrft.config import ModelConfig, RunConfig, TrainConfig
    from fastrft.precision import Precision, load_policy

    if shape is not None:
        tmp = Path(tempfile.mkdtemp(prefix="bench-lora-"))
        model_name = str(write_model_dir(shape, FILE_DTYPE[precision], device, tmp / shape))
    cfg = TrainConfig(model=ModelConfig(model=model_name, precision=precision, lora_rank=rank,
                                        lora_targets=TARGETS if rank else ModelConfig().lora_targets),
                      run=RunConfig(seed=0))
    model = load_policy(cfg, precision, torch.device(device))
    return Precision(model, precision)


# ----------------------------------------------------------------------------------------- decode
def decode(args) -> list[Result]:
    from fastrft.engine import Engine, EngineConfig

    engines = {}
    for rank in (0, args.rank):
        p = _policy(args.model, args.shape, args.precision, rank, args.device)
        engines[rank] = Engine(p.rollout_model, config=EngineConfig(max_num_seqs=args.batch,
                                                                    kv_cache_memory=args.kv_cache_mib * 2**20))
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8]] * args.batch
    times = {rank: [] for rank in engines}
    for i in range(args.repeats + 1):  # interleaved; the first round is a warm-up
        for rank, engine in engines.items():
            _sync(args.device)
            t0 = time.perf_counter()
            engine.generate(prompts, n=1, max_new_tokens=args.new_tokens, temperature=1.0, seed=i, eos_token_ids=[])
            _sync(args.device)
            if i:
                times[rank].append(time.perf_counter() - t0)
    results = []
    work = args.batch * args.new_tokens
    for rank, ts in times.items():
        case = "no adapters" if rank == 0 else f"LoRA r={rank}, all 7 projections"
        med = statistics.median(ts)
        results.append(Result("lora-decode", case, med, ts, work / med, "tok/s",
                              shape=dict(batch=args.batch, new_tokens=args.new_tokens, precision=args.precision)))
    base = results[0].throughput
    for r in results:
        r.extra["vs none"] = round(r.throughput / base, 3)
    return results


# ----------------------------------------------------------------------------------------- step
def _step_fn(precision, n: int, prompt: int, response: int, budget: int | None = None, seed: int = 0):
    """One optimizer step as the learner takes it: n sequences cut into micro-batches of ``budget`` packed
    tokens (default: the trainer's, fastrft.microbatch.default_token_budget), each forward, the fused PG loss
    and backward; then AdamW over the trainable parameters."""
    from fastrft.algo import PGLossSpec, pack
    from fastrft.kernels import fused_linear_pg_loss
    from fastrft.loop.logprobs import response_hidden
    from fastrft.microbatch import default_token_budget, micro_batches, step_weights
    from fastrft.precision import make_adamw

    model = precision.train_model
    device = precision.master.lm_head_weight.device
    budget = budget or default_token_budget(precision, device, False)[0]
    g = torch.Generator().manual_seed(seed)
    vocab = model.lm_head_weight.shape[0]
    prompts = [torch.randint(0, vocab, (prompt,), generator=g).tolist() for _ in range(n)]
    responses = [torch.randint(0, vocab, (response,), generator=g).tolist() for _ in range(n)]
    advantages = torch.randn(n, generator=g).tolist()
    optimizer = make_adamw(precision.trainable, lr=1e-6, betas=(0.9, 0.999), weight_decay=0.01, device=device)
    spec = PGLossSpec(aggregation="seq-mean-token-mean")
    groups = micro_batches([prompt + response] * n, budget)
    weights = step_weights([response] * n, spec) if len(groups) > 1 else None

    def step() -> float:
        optimizer.zero_grad(set_to_none=device.type == "cuda")
        for group in groups:
            batch = pack([prompts[i] for i in group], [responses[i] for i in group], [advantages[i] for i in group],
                         [[0.0] * response for _ in group]).to(device)
            hidden, weight = response_hidden(model, batch)
            w = None if weights is None else torch.cat([weights[i] for i in group]).to(device)
            loss, _ = fused_linear_pg_loss(hidden, weight, batch.targets, batch.advantages, batch.seq_ids, spec=spec,
                                           weights=w)
            loss.backward()
            del hidden, weight, loss
        optimizer.step()
        precision.after_step()
        return n * (prompt + response)

    return step


def _step_worker(model: str, shape: str, precision: str, rank: int, device: str, group: int, prompt: int,
                 response: int, repeats: int) -> dict:
    fn = _step_fn(_policy(None if shape else model, shape or None, precision, rank, device), group, prompt, response)
    fn()  # warm-up: allocates the gradients and AdamW's state
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"times": times}


def step(args) -> list[Result]:
    """Each case in its own process, as a training run is (two models stepping in one process share its
    heap, and the second is slowed by the first's freed memory: measured up to 1.6x), the processes one
    after another and alternating, ``--rounds`` times each."""
    times: dict[int, list[float]] = {0: [], args.rank: []}
    for _ in range(args.rounds):
        for rank in times:
            got = run_isolated(__file__, ["--worker", "step", args.model, args.shape or "", args.precision, str(rank),
                                          args.device, str(args.group), str(args.prompt), str(args.response),
                                          str(args.repeats)], timeout=3600)
            if "error" in got:
                raise SystemExit(f"bench_lora step, rank {rank}: {got['error']}")
            times[rank] += got["times"]
    results = []
    for rank, ts in times.items():
        case = "full fine-tuning" if rank == 0 else f"LoRA r={rank}, all 7 projections"
        med = statistics.median(ts)
        results.append(Result("lora-step", case, med, ts, args.group * (args.prompt + args.response) / med, "tok/s",
                              shape=dict(group=args.group, prompt=args.prompt, response=args.response,
                                         precision=args.precision)))
    for r in results:
        r.extra["vs full"] = round(r.median_s / results[0].median_s, 3)
    return results


# ----------------------------------------------------------------------------------------- round
def _round_worker(shape: str, precision: str, rank: int, device: str, response: int, out: str) -> dict:
    from fastrft import presets
    from fastrft.config import TrainConfig
    from fastrft.trainer import Trainer

    tmp = Path(tempfile.mkdtemp(prefix="bench-lora-round-"))
    model_dir = write_model_dir(shape, FILE_DTYPE[precision], device, tmp / shape)
    values = presets.overlay(TrainConfig().to_dict(), presets.L0_FIELDS, {
        "model": {"model": str(model_dir), "precision": precision, "lora_rank": rank, "device": device},
        "data": {"dataset": "gsm8k"}, "rollout": {"max_new_tokens": response},
        "eval": {"eval_every": 0, "test_size": 1, "train_samples": 1},
        "run": {"rounds": 1, "out": out, "progress": False, "save_every": 0}})
    t0 = time.perf_counter()
    trainer = Trainer(TrainConfig.from_dict(values))
    t_build = time.perf_counter() - t0
    trainer.run()
    t_round = time.perf_counter() - t0 - t_build
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else _rss_mib("VmHWM"))
    return {"peak_mib": peak, "seconds": t_round, "build_s": t_build}


def isolated(args, bench: str, cases: list[tuple[str, list[str]]]) -> list[Result]:
    results = []
    for case, worker_args in cases:
        got = run_isolated(__file__, ["--worker", bench, *worker_args], timeout=3600)
        r = Result(f"lora-{bench}", case, got.get("seconds"), [got["seconds"]] if "seconds" in got else [],
                   peak_mib=got.get("peak_mib"), error=got.get("error", ""),
                   shape=dict(shape=args.shape, precision=args.precision))
        r.extra = {k: v for k, v in got.items() if k not in ("seconds", "peak_mib", "error")}
        results.append(r)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="?", choices=("decode", "step", "round"), default="decode")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="decode/step: model alias or directory")
    ap.add_argument("--shape", default=None, help="a random-weight model of this shape (bench/harness.py SHAPES); "
                                                   "round: default qwen2.5-1.5b")
    ap.add_argument("--precision", default=None, help="default: fp32 (decode, step), bf16-mixed (round)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--kv-cache-mib", type=int, default=1024)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--response", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5, help="decode: interleaved repeats; step: timed steps per process")
    ap.add_argument("--rounds", type=int, default=2, help="step: processes per case, alternating")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        if args.worker[0] == "step":
            _, model, shape, precision, rank, device, group, prompt, response, repeats = args.worker
            print(json.dumps(_step_worker(model, shape, precision, int(rank), device, int(group), int(prompt),
                                          int(response), int(repeats))))
            return
        _, shape, precision, rank, device, response, out = args.worker
        print(json.dumps(_round_worker(shape, precision, int(rank), device, int(response), out)))
        return
    if args.what in ("decode", "step"):
        args.precision = args.precision or "fp32"
        results = decode(args) if args.what == "decode" else step(args)
        title = (f"LoRA decode, batch {args.batch}, {args.new_tokens} new tokens" if args.what == "decode" else
                 f"LoRA training step, G = {args.group}, {args.prompt} + {args.response} tokens")
        report(results, f"{title} ({args.precision}, {args.shape or args.model})", args.device,
               columns=("vs none",) if args.what == "decode" else ("vs full",))
        return
    args.precision = args.precision or "bf16-mixed"
    args.shape = args.shape or "qwen2.5-1.5b"
    out = tempfile.mkdtemp(prefix="bench-lora-run-")
    results = isolated(args, "round", [(f"LoRA r={args.rank}, L0 round", [args.shape, args.precision, str(args.rank),
                                                                          args.device, str(args.response),
                                                                          out + "/run"])])
    title = f"One L0 round end to end with LoRA ({args.response}-token response)"
    report(results, f"{title} ({args.precision}, {args.shape} shape, random weights)", args.device,
           columns=("build_s",), time_unit="s")


if __name__ == "__main__":
    main()
