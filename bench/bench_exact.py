"""What the exact on-policy mode costs: seconds per round with --exact-logprobs on against off.

    python bench/bench_exact.py [--rounds 4] [--precisions fp32,bf16-mixed] [--configs plain,ppo]
    python bench/bench_exact.py --device cuda --shape qwen2.5-0.5b --precisions bf16-mixed   # a lent GPU

On CUDA the mode runs the Triton kernels of fastrft.kernels.exact_triton (the gpu_suite.sh stage
``exact``); ``--shape`` then names a random-weight model shape of bench/bench_rollout.py (written once to a
temporary directory), since a GPU machine carries no model files. ``--shape tiny`` with ``--device cpu``
is the smoke run.

Each case is one process (so each mode starts from a fresh MKL/oneDNN state) that builds the Trainer on
SmolLM2-135M-Instruct exactly as ``fastrft train`` does, then times Trainer.round(r) for r = 1..rounds
and reports the median of rounds 2..rounds (round 1 is cold). The task is the issue's: add2 example 0,
G = 8, 48-token responses, temperature 1, on CPU. Configs:
- plain: one optimizer step per round (old_logp is the policy's own detached log-prob);
- ppo: 2 PPO epochs x 2 mini-batches (4 steps), where the default mode recomputes the old log-probs and
  the exact mode takes the rollout's.
Cases run one after another, never in parallel (timings on 2 cores swing 3-10x under load); on and off
alternate so that a drift in the machine's speed hits both. Prints one table row per (precision,
config) with both times, their ratio, and each mode's logp_gap_max over the timed rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time


def case(precision: str, config: str, mode: str, rounds: int, device: str = "cpu", model: str | None = None) -> dict:
    import torch

    from fastrft.config import (AlgoConfig, DataConfig, EvalConfig, ModelConfig, OptimConfig, RolloutConfig,
                                RunConfig, TrainConfig)
    from fastrft.trainer import Trainer

    algo = AlgoConfig(advantage="grpo", **({"ppo_epochs": 2, "mini_batches": 2} if config == "ppo" else {}))
    with tempfile.TemporaryDirectory() as out:
        model_kw = {"model": model} if model else {}
        cfg = TrainConfig(model=ModelConfig(precision=precision, exact_logprobs=mode, device=device, **model_kw),
                          data=DataConfig(dataset="arithmetic", level="add2", example_index=(0,)),
                          rollout=RolloutConfig(group_size=8, max_new_tokens=48), algo=algo,
                          optim=OptimConfig(lr=1e-6), eval=EvalConfig(eval_every=0),
                          run=RunConfig(rounds=rounds, seed=0, out=out, progress=False))
        trainer = Trainer(cfg)
        times, gaps = [], []
        for r in range(1, rounds + 1):
            start = time.perf_counter()
            rec = trainer.round(r)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            if "logp_gap_max" in rec:
                gaps.append(rec["logp_gap_max"])
        from fastrft.models import exact, row_rules

        return {"round_s": statistics.median(times[1:]), "gap_max": max(gaps) if gaps else None,
                "threads": torch.get_num_threads(), "exact": trainer.exact_logprobs,
                "paths": exact.describe(row_rules.chosen())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--precisions", default="fp32,bf16-mixed")
    parser.add_argument("--configs", default="plain,ppo")
    parser.add_argument("--device", default="cpu", help="cpu (the default) or cuda")
    parser.add_argument("--shape", help="a random-weight model shape of bench/bench_rollout.py (e.g. qwen2.5-0.5b, "
                                        "tiny) instead of the embedded SmolLM2")
    parser.add_argument("--model", help=argparse.SUPPRESS)  # the written model directory, for --case
    parser.add_argument("--case", help=argparse.SUPPRESS)  # precision:config:mode, run in this process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(case(*args.case.split(":"), args.rounds, args.device, args.model)))
        return
    extra = ["--device", args.device]
    tmp = None
    if args.shape:
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).parent))
        from harness import FILE_DTYPE, write_model_dir

        tmp = tempfile.TemporaryDirectory()
        dtype = FILE_DTYPE[args.precisions.split(",")[0]]
        extra += ["--model", str(write_model_dir(args.shape, dtype, args.device, Path(tmp.name) / args.shape))]
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from harness import cpu_features, device_name, git_sha, versions

    print(f"{device_name(args.device)}; {cpu_features()}; {versions()}; commit {git_sha()}")
    print(f"device {args.device}, model {args.shape or 'SmolLM2-135M-Instruct'}; median seconds per round of "
          f"rounds 2..{args.rounds}")
    print("| precision | config | off s/round | on s/round | on / off | gap max off | gap max on |")
    print("|---|---|---:|---:|---:|---:|---:|")
    paths = {}
    for precision in args.precisions.split(","):
        for config in args.configs.split(","):
            res = {}
            for mode in ("off", "on"):
                out = subprocess.run([sys.executable, __file__, "--rounds", str(args.rounds), *extra, "--case",
                                      f"{precision}:{config}:{mode}"], capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"case {precision}:{config}:{mode} failed:\n{out.stderr[-3000:]}")
                res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            off, on = res["off"], res["on"]
            paths[precision] = on.get("paths") or "-"
            print(f"| {precision} | {config} | {off['round_s']:.2f} | {on['round_s']:.2f} | "
                  f"{on['round_s'] / off['round_s']:.3f} | {off['gap_max']:.3g} | {on['gap_max']:.3g} |", flush=True)
    for precision, text in paths.items():  # the row rule each GEMM took (fastrft.models.row_rules)
        print(f"- GEMM paths, {precision}: {text}")


if __name__ == "__main__":
    main()
