"""``fastrft demo``: the paper's minimalist layer, sized for a laptop CPU.

SmolLM2-135M-Instruct (embedded), the synthetic task "What is a + b?" with single digits, ONE training
example ("What is 8 + 3?"), ONE rollout per round for 16 rounds, the reward (1 if the last number of the
response is right and the response finished within 96 tokens, else 0) used directly as the learning
signal, no KL. Test set: 32 of the 80 other single-digit sums (a seeded subset), one temperature-1.0
sample each (the paper's test Pass@1). The strict "####" format rate is reported beside it: the model
never learns the format, only the answer.

Settings chosen by measurement (../shared/notes/smollm2-calibration.md and bench/RESULTS.md): base
train Pass@1 of this example is about 0.1-0.4 at T = 1; lr 2e-5 learns it within ~10 rounds for seed 0
and carries over to held-out sums, where 5e-5 over-fits and 1e-5 is slower. Over seeds 0-5 every run
reaches train Pass@1 1.0 by round 60, some only after round 30 (bench/RESULTS.md): `fastrft demo
--rounds 60 --test-size 80` runs the longer study.
"""

from __future__ import annotations

import time

from fastrft.config import AlgoConfig, DataConfig, EvalConfig, OptimConfig, RolloutConfig, RunConfig, TrainConfig


def demo_config() -> TrainConfig:
    return TrainConfig(
        data=DataConfig(dataset="arithmetic", level="add1", example_index=(65,)),  # "What is 8 + 3?"
        rollout=RolloutConfig(group_size=1, max_new_tokens=96),
        # A response cut off at the budget never gave its answer: without this, a truncated ramble whose
        # last number happens to be right is rewarded (measured: 1 of 6 seeds then fails to learn).
        algo=AlgoConfig(advantage="none", kl_coef=0.0, fail_truncated=True),
        optim=OptimConfig(lr=2e-5, weight_decay=0.01, grad_clip=1.0),
        # Sized so that `make demo` prints its table within 6 minutes of a clean 2-core machine, install
        # included, even on a day the machine runs 3x slower (bench/RESULTS.md): decoding is what costs, so
        # the evaluation samples 8 answers to the training example and 1 to each of 32 held-out sums
        # (a seeded subset of the 80), without greedy decoding.
        eval=EvalConfig(eval_every=8, train_samples=8, test_size=32, greedy=False, extra_rewards=("gsm8k",)),
        # One checkpoint at the end (for fastrft export): SmolLM2 + AdamW state is 1.6 GB per checkpoint.
        run=RunConfig(rounds=16, seed=0, name="demo", save_every=0, keep_checkpoints=1),
    )


def run_demo(config: TrainConfig) -> int:
    from fastrft.report import before_after_table, read_metrics
    from fastrft.trainer import Trainer

    start = time.monotonic()
    trainer = Trainer(config)
    ex = trainer.train_set.examples[0]
    print(f"fastrft demo: model {config.model.model}, training example {ex.id}: {ex.question!r} "
          f"(answer {ex.answer}), {len(trainer.test_set.examples)} test problems, {config.run.rounds} rounds, "
          f"G={config.rollout.group_size}, lr {config.optim.lr:g}")
    summary = trainer.run()
    records = read_metrics(trainer.out_dir / "metrics.jsonl")
    e = config.eval
    greedy = "; test_greedy = argmax decoding" if e.greedy else ""
    print(f"\nPass@1 before and after (train = the training example, {e.train_samples} samples at "
          f"T={e.eval_temperature:g}; test = {len(trainer.test_set.examples)} held-out sums, 1 sample each at "
          f"T={e.eval_temperature:g}{greedy}; *_gsm8k = strict '####' format):\n")
    print(before_after_table(records))
    first, last = summary["first_eval"], summary["last_eval"]
    print(f"\ntrain Pass@1 {first['train_pass1']:.3f} -> {last['train_pass1']:.3f}; "
          f"test Pass@1 {first.get('test_pass1', 0):.3f} -> {last.get('test_pass1', 0):.3f}; "
          f"{summary['updates']} updates, {summary['skipped_rounds']} rounds skipped (reward 0, no signal)")
    print(f"plot: {summary['plot']}\nrun directory: {summary['out_dir']}  "
          f"(total {time.monotonic() - start:.0f} s)")
    return 0
