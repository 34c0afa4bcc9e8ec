"""What the exact on-policy mode costs: seconds per round with --exact-logprobs on against off.

    python bench/bench_exact.py [--rounds 4] [--precisions fp32,bf16-mixed] [--configs plain,ppo]

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


def case(precision: str, config: str, mode: str, rounds: int) -> dict:
    import torch

    from fastrft.config import (AlgoConfig, DataConfig, EvalConfig, ModelConfig, OptimConfig, RolloutConfig,
                                RunConfig, TrainConfig)
    from fastrft.trainer import Trainer

    algo = AlgoConfig(advantage="grpo", **({"ppo_epochs": 2, "mini_batches": 2} if config == "ppo" else {}))
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(model=ModelConfig(precision=precision, exact_logprobs=mode),
                          data=DataConfig(dataset="arithmetic", level="add2", example_index=(0,)),
                          rollout=RolloutConfig(group_size=8, max_new_tokens=48), algo=algo,
                          optim=OptimConfig(lr=1e-6), eval=EvalConfig(eval_every=0),
                          run=RunConfig(rounds=rounds, seed=0, out=out, progress=False))
        trainer = Trainer(cfg)
        times, gaps = [], []
        for r in range(1, rounds + 1):
            start = time.perf_counter()
            rec = trainer.round(r)
            times.append(time.perf_counter() - start)
            if "logp_gap_max" in rec:
                gaps.append(rec["logp_gap_max"])
        return {"round_s": statistics.median(times[1:]), "gap_max": max(gaps) if gaps else None,
                "threads": torch.get_num_threads(), "exact": trainer.exact_logprobs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--precisions", default="fp32,bf16-mixed")
    parser.add_argument("--configs", default="plain,ppo")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # precision:config:mode, run in this process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(case(*args.case.split(":"), args.rounds)))
        return
    print("| precision | config | off s/round | on s/round | on / off | gap max off | gap max on |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for precision in args.precisions.split(","):
        for config in args.configs.split(","):
            res = {}
            for mode in ("off", "on"):
                out = subprocess.run([sys.executable, __file__, "--rounds", str(args.rounds), "--case",
                                      f"{precision}:{config}:{mode}"], capture_output=True, text=True, check=True)
                res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            off, on = res["off"], res["on"]
            print(f"| {precision} | {config} | {off['round_s']:.2f} | {on['round_s']:.2f} | "
                  f"{on['round_s'] / off['round_s']:.3f} | {off['gap_max']:.3g} | {on['gap_max']:.3g} |", flush=True)


if __name__ == "__main__":
    main()
