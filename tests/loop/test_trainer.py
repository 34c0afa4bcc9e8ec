"""The round loop on a tiny random model: it must learn a trivially learnable task, log every round,
skip exactly the rounds without gradient signal, and never lose what it has written."""

from __future__ import annotations

import json

import pytest

from fastrft.config import DataConfig, EvalConfig, RunConfig
from fastrft.errors import ConfigError
from fastrft.report import read_metrics
from fastrft.trainer import Trainer
from conftest import tiny_config


def rounds_of(out):
    return [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "round"]


def evals_of(out):
    return [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]


@pytest.mark.parametrize("advantage,group_size", [("grpo", 8), ("none", 4)])
def test_policy_gradient_learns_a_trivial_task(tiny_llama, tmp_path, advantage, group_size):
    out = tmp_path / "run"
    summary = Trainer(tiny_config(tiny_llama, out, advantage=advantage, group_size=group_size)).run()
    evals = evals_of(out)
    assert [e["round"] for e in evals] == [0, 10, 20]
    assert evals[0]["train_pass1"] <= 0.2  # the untrained model rarely answers
    assert evals[-1]["train_pass1"] >= 0.9  # ... and the trained one almost always does
    rounds = rounds_of(out)
    assert [r["round"] for r in rounds] == list(range(1, 21))
    first, last = rounds[:5], rounds[-5:]
    assert sum(r["reward_mean"] for r in last) > sum(r["reward_mean"] for r in first) + 2.0
    assert summary["updates"] + summary["skipped_rounds"] == 20


def test_skips_exactly_the_rounds_without_signal(tiny_llama, tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_config(tiny_llama, out, advantage="none", group_size=1, rounds=12, lr=1e-4)).run()
    rounds = rounds_of(out)
    for r in rounds:
        assert r["skipped"] == (1 if r["reward_mean"] == 0 else 0)
        assert ("loss" in r) == (r["skipped"] == 0)
    assert rounds[-1]["skipped_total"] == sum(r["skipped"] for r in rounds) >= 1


def test_kl_reference_and_rollout_logprob_agreement(tiny_llama, tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_config(tiny_llama, out, kl_coef=0.1, rounds=5, eval_every=0)).run()
    rounds = rounds_of(out)
    assert all(r["skipped"] == 0 for r in rounds)  # KL on: every round trains
    assert rounds[0]["kl_mean"] == 0.0  # the policy equals its frozen reference before the first step
    # Once a group's rewards differ, GRPO moves the policy away from the reference, and KL stays > 0.
    first_signal = next(i for i, r in enumerate(rounds) if 0 < r["reward_mean"] < 1)
    assert first_signal < len(rounds) - 1
    assert all(r["kl_mean"] > 0 for r in rounds[first_signal + 1:])
    # The sampler's log-probs and the trainer's recomputation agree to fp32 rounding.
    assert max(r["logp_gap_max"] for r in rounds) < 1e-4


def test_runs_are_reproducible(tiny_llama, tmp_path):
    def trace(out):
        Trainer(tiny_config(tiny_llama, out, rounds=5, eval_every=0)).run()
        return [(r["reward_mean"], r.get("loss")) for r in rounds_of(out)]

    assert trace(tmp_path / "a") == trace(tmp_path / "b")


def test_test_set_excludes_training_example(tiny_llama, tmp_path):
    cfg = tiny_config(tiny_llama, tmp_path / "run", rounds=0)
    cfg = cfg.replace(eval=EvalConfig(test_size=None))
    t = Trainer(cfg)
    assert len(t.test_set.examples) == 80
    assert t.train_set.examples[0].question not in {e.question for e in t.test_set.examples}


def test_interrupted_run_keeps_its_metrics_and_refuses_another_config(tiny_llama, tmp_path, monkeypatch):
    out = tmp_path / "run"
    def crash_at_4(sample):
        def rollouts(r, prompts):
            if r == 4:
                raise KeyboardInterrupt
            return sample(r, prompts)

        return rollouts

    trainer = Trainer(tiny_config(tiny_llama, out, rounds=10, eval_every=0), sampler=crash_at_4)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    before = (out / "metrics.jsonl").read_text()
    assert [r["round"] for r in rounds_of(out)] == [1, 2, 3]
    assert json.loads((out / "config.json").read_text())["run"]["rounds"] == 10
    with pytest.raises(ConfigError, match=r"another config(.|\n)*run\.rounds: 10 -> 20(.|\n)*--force"):
        Trainer(tiny_config(tiny_llama, out))
    assert (out / "metrics.jsonl").read_text() == before


def test_bad_example_index_leaves_no_run_directory(tiny_llama, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tiny_llama, out).replace(data=DataConfig(dataset="arithmetic", example_index=(81,)))
    with pytest.raises(ConfigError, match=r"example_index \(--example-index\) 81 is out of range.*0\.\.80"):
        Trainer(cfg)
    assert not out.exists()


def test_truncated_responses_can_be_scored_as_failures(tiny_llama, tmp_path):
    """With a 2-token budget and EOS never sampled early, nearly every response is truncated: with
    fail_truncated they all score 0, whatever their text, and rollouts.jsonl records them."""
    out = tmp_path / "run"
    cfg = tiny_config(tiny_llama, out, advantage="none", group_size=4, rounds=6, eval_every=0, fail_truncated=True)
    cfg = cfg.replace(run=RunConfig(rounds=6, seed=0, out=str(out), progress=False, log_samples=4))
    Trainer(cfg).run()
    samples = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert [s["round"] for s in samples] == list(range(1, 7))
    flat = [x for s in samples for x in s["samples"]]
    assert len(flat) == 24
    assert all(x["reward"] == 0.0 for x in flat if x["finish"] == "length")
    assert any(x["finish"] == "length" for x in flat)


def test_the_progress_bar_shows_the_round_it_counts(tmp_path, capsys):
    """The bar's reward, loss and entropy are those of the round just counted, not of the one before."""
    from fastrft.config import RunConfig, TrainConfig
    from fastrft.loop.recorder import Recorder

    recorder = Recorder(TrainConfig(run=RunConfig(rounds=3, log_samples=0)), tmp_path, done=0, progress=True)
    recorder.bar.mininterval = 0  # draw on every update
    for r, reward in ((1, "0.25"), (2, "0.50")):
        recorder.round({"kind": "round", "round": r}, {"reward": reward})
        shown = capsys.readouterr().err.split("\r")[-1]
        assert f"{r}/3" in shown and f"reward={reward}" in shown, shown
    recorder.close()
