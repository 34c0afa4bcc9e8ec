"""The ladder's sequential verdicts (fastrft.report.decide) on simulated studies: how often each verdict
comes, and after how many seeds, for a given true effect.

    python bench/sim_decide.py                       # 1,000 studies at effects 0, +0.35 and +0.7 log-odds
    python bench/sim_decide.py --studies 200 --effects 0

A simulated study (:func:`study`) has two layers run at 15 seeds on 40 problems: per seed a training effect
(normal, sd 0.6 in log-odds), per problem a difficulty (normal, sd 1.5), each problem's final score the mean
of 4 samples; the second layer's log-odds are moved by the true effect. The procedure is the ladder's
--until-decided one: 3 planned seeds, 2 added per look, up to 15, margin 0.05. Pure Python, seconds.
tests/report/test_decide.py checks the error rates with the same model.
"""

from __future__ import annotations

import argparse
import collections
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastrft.report.decide import decide  # noqa: E402


def study(rng: random.Random, shift: float, seeds: int = 15, problems: int = 40, samples: int = 4):
    """(layer A's runs, layer B's runs), each {seed: {problem: score}}; B's log-odds moved by ``shift``."""
    difficulty = [rng.gauss(0.0, 1.5) for _ in range(problems)]

    def runs(delta: float) -> dict[int, dict[str, float]]:
        out = {}
        for s in range(seeds):
            u = rng.gauss(0.0, 0.6)  # what this seed's training did
            out[s] = {f"p{j}": sum(rng.random() < 1 / (1 + math.exp(-(d + u + delta))) for _ in range(samples))
                      / samples for j, d in enumerate(difficulty)}
        return out

    return runs(0.0), runs(shift)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=1000)
    ap.add_argument("--effects", default="0,0.35,0.7", help="true effects in log-odds, comma-separated")
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args()
    print("| true effect (log-odds) | helps | hurts | no difference | undecided | mean seeds |")
    print("|---|---:|---:|---:|---:|---:|")
    for shift in (float(x) for x in args.effects.split(",")):
        rng = random.Random(args.seed)
        verdicts, seeds = collections.Counter(), []
        for _ in range(args.studies):
            a, b = study(rng, shift)
            eff, _ = decide(a, b, list(range(15)), planned=3, step=2, max_seeds=15, margin=0.05)
            verdicts[eff.verdict] += 1
            seeds.append(eff.seeds)
        share = {k: f"{100 * verdicts[k] / args.studies:.1f}%" for k in ("helps", "hurts", "no difference",
                                                                          "undecided")}
        print(f"| {shift:+g} | {share['helps']} | {share['hurts']} | {share['no difference']} | "
              f"{share['undecided']} | {sum(seeds) / len(seeds):.1f} |")


if __name__ == "__main__":
    main()
