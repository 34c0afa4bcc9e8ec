"""Does the gradient of one optimizer step depend on how the step is cut into micro-batches? (issue 24)

    python bench/micro_batch_gradnorm.py [--group-size 8] [--example-index 65]

One SmolLM2 round on an add1 example: the G rollouts are sampled once, then replayed into trainers whose
token budget puts all sequences in one micro-batch, or 2, 4 or 1 sequences in each. Each trainer takes
one optimizer step on the same rollouts from the same weights and logs its gradient norm. Runs with
--exact-logprobs off and on; prints the norms' bits side by side. Run it once as is and once with
MKL_CBWR=AUTO (MKL's default kernels by row count; the exact mode's start-up probe then gives the GEMMs
that round by row count padded calls or fixed row blocks, fastrft.models.row_rules, or refuses where no
rule works) to see what the reproducibility mode that fastrft sets changes.
"""

from __future__ import annotations

import argparse
import tempfile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--example-index", type=int, default=65)
    args = parser.parse_args()
    from fastrft.config import (AlgoConfig, DataConfig, EvalConfig, ModelConfig, OptimConfig, RolloutConfig,
                                RunConfig, TrainConfig)
    from fastrft.models.exact import ExactModeError
    from fastrft.trainer import Trainer

    def config(out, mode, budget):
        return TrainConfig(model=ModelConfig(exact_logprobs=mode),
                           data=DataConfig(dataset="arithmetic", level="add1", example_index=(args.example_index,)),
                           rollout=RolloutConfig(group_size=args.group_size, max_new_tokens=96),
                           algo=AlgoConfig(advantage="grpo"), optim=OptimConfig(lr=1e-6, max_tokens_per_step=budget),
                           eval=EvalConfig(eval_every=0), run=RunConfig(rounds=1, seed=0, out=out, progress=False))

    with tempfile.TemporaryDirectory() as tmp:
        first = Trainer(config(f"{tmp}/sample", "off", None))
        _, prompts = first.examples_for_round(1)
        rollouts = first.sampler(1, prompts)
        lengths = sorted(len(prompts[0]) + len(c.token_ids) for c in rollouts.groups[0])
        print(f"packed lengths {lengths}")
        del first
        for mode in ("off", "on"):
            norms = {}
            for per in (len(lengths), 4, 2, 1):
                budget = sum(lengths[-per:])  # room for the `per` longest sequences
                try:
                    trainer = Trainer(config(f"{tmp}/{mode}-{per}", mode, budget),
                                      sampler=lambda default: lambda r, p: rollouts)
                except ExactModeError as e:  # no row rule makes this BLAS batch-invariant
                    print(f"exact {mode}: refused: {e}")
                    break
                rec = trainer.round(1)
                norms[per] = (rec["grad_norm"], rec["micro_batches"])
                del trainer
            if not norms:
                continue
            base = norms[len(lengths)][0]
            for per, (norm, micro) in norms.items():
                print(f"exact {mode}: <= {per} sequences per micro-batch ({micro} micro-batches): grad norm "
                      f"{norm!r}{'  (same bits)' if norm == base else f'  (relative {abs(norm - base) / base:.2g})'}")


if __name__ == "__main__":
    main()
