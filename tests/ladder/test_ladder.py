"""The ladder as a product: presets one choice from L0, the baselines and selections they need, the
study runner with its table and figure, and the paper's two simplest findings on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from fastrft import presets
from fastrft.cli import main
from fastrft.config import (AlgoConfig, DataConfig, EvalConfig, ModelConfig, OptimConfig, RolloutConfig, RunConfig,
                            TrainConfig)
from fastrft.errors import ConfigError
from fastrft.report import read_metrics
from fastrft.trainer import Trainer
from fastrft.report.records import untimed


def _rounds(out):
    return [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "round"]


def _cfg(model, out, *, rounds=10, preset="L0-minimal", **sections):
    values = presets.overlay(TrainConfig().to_dict(), presets.L0_FIELDS, presets.resolve(preset).overrides, {
        "model": {"model": str(model)}, "rollout": {"max_new_tokens": 2}, "optim": {"lr": 3e-3},
        "eval": {"eval_every": 0, "train_samples": 32, "test_size": 4, "greedy": False},
        "run": {"rounds": rounds, "out": str(out), "progress": False}}, sections)
    return TrainConfig.from_dict(values)


# ----------------------------------------------------------------------------------------- presets
def test_every_preset_is_one_choice_from_l0():
    base = presets.overlay(TrainConfig().to_dict(), presets.L0_FIELDS)
    # A choice may set its own parameter (the window's W) beside the switch itself.
    companions = {("algo", "window"), ("algo", "extra_samples")}
    for p in presets.PRESETS.values():
        cfg = TrainConfig.from_dict(presets.overlay(base, p.overrides)).to_dict()
        changed = {(s, k) for s in cfg for k in cfg[s] if cfg[s][k] != base[s][k]}
        assert len(changed - companions) == (0 if p.name == "L0-minimal" else 1), (p.name, changed)
    l0 = TrainConfig.from_dict(base)
    assert (l0.rollout.group_size, l0.algo.advantage, l0.algo.kl_coef, l0.algo.kl_estimator, l0.optim.lr,
            l0.rollout.max_new_tokens, l0.algo.clip_low, l0.data.example_index) == (1, "none", 0.001, "k3", 1e-6,
                                                                                    1024, 0.2, (0,))


def test_unknown_preset_lists_the_valid_ones(capsys):
    with pytest.raises(ConfigError, match=r"unknown preset or layer 'L9'.*L0-minimal.*L5-batch"):
        presets.resolve("L9")
    assert main(["train", "--preset", "L9"]) == 2
    assert "L3-negative-reward" in capsys.readouterr().err
    assert main(["presets"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in presets.PRESETS) and "cpu-mini" in listing


def test_preset_flags_override_the_preset(no_training):
    assert main(["train", "--preset", "L3", "--profile", "cpu-mini", "--reward-fail", "-0.5", "--rounds", "7"]) == 0
    cfg = no_training[-1]
    assert cfg.algo.reward_fail == -0.5 and cfg.run.rounds == 7  # the flags win
    assert cfg.rollout.max_new_tokens == 96 and cfg.optim.lr == 2e-5  # the profile
    assert cfg.algo.kl_coef == 0.001 and cfg.rollout.group_size == 1  # L0 underneath


@pytest.fixture
def no_training(monkeypatch):
    from fastrft import cli

    seen = []
    monkeypatch.setattr(cli, "_train", lambda config, force=False: seen.append(config) or 0)
    return seen


def test_grpo_without_baseline_source_is_refused():
    with pytest.raises(ConfigError, match=r"--advantage.*--group-size"):
        TrainConfig(algo=AlgoConfig(advantage="grpo"))
    TrainConfig(algo=AlgoConfig(advantage="window"))  # these baselines work with G = 1
    TrainConfig(algo=AlgoConfig(advantage="extra_samples"))
    with pytest.raises(ConfigError, match=r"--window"):
        TrainConfig(rollout=RolloutConfig(group_size=8), algo=AlgoConfig(advantage="window", window=4))


# ----------------------------------------------------------------------------------------- baselines
def test_window_advantage_uses_the_examples_last_w_rewards(tiny_llama, tmp_path):
    out = tmp_path / "run"
    Trainer(_cfg(tiny_llama, out, rounds=16, algo={"advantage": "window", "window": 6, "kl_coef": 0.0},
                 rollout={"group_size": 4, "max_new_tokens": 2}, run={"log_samples": 4})).run()
    logged = [[x["reward"] for x in json.loads(line)["samples"]] for line in (out / "rollouts.jsonl").open()]
    rows, seen = _rounds(out), []
    assert 0 < sum(map(sum, logged)) < 4 * len(rows)  # both outcomes occur
    for r, group in zip(rows, logged, strict=True):
        seen += group
        window = torch.tensor(seen[-6:])
        want = (sum(group) / 4 - float(window.mean())) / (float(window.std()) + 1e-6)
        assert r["advantage_mean"] == pytest.approx(want, rel=1e-5, abs=1e-6)
        assert r["baseline_mean"] == pytest.approx(float(window.mean()))


def test_extra_samples_are_scored_but_not_trained_on(tiny_llama, tmp_path):
    out = tmp_path / "run"
    Trainer(_cfg(tiny_llama, out, rounds=6, algo={"advantage": "extra_samples", "extra_samples": 5,
                                                  "kl_coef": 0.0})).run()
    for r in _rounds(out):
        assert r["extra_rollout_tokens"] == 5 * 2  # M samples of max_new_tokens each (EOS is rare)
        want = (r["reward_mean"] - r["baseline_mean"]) / (r["baseline_std"] + 1e-6)
        assert r["advantage_mean"] == pytest.approx(want, rel=1e-5, abs=1e-6)
        if not r["skipped"]:
            assert r["train_tokens"] < 20  # one prompt + its one response, not the extra samples


# ----------------------------------------------------------------------------------------- selection
def test_batches_cover_the_pool_once_per_pass(tiny_llama, tmp_path):
    out = tmp_path / "run"
    t = Trainer(_cfg(tiny_llama, out, rounds=4, data={"examples_per_round": 3, "train_pool": 6},
                     algo={"kl_coef": 0.0}, eval={"train_eval_size": 4}))
    t.run()
    rows = _rounds(out)
    assert all(len(r["examples"]) == 3 for r in rows)
    assert sorted(rows[0]["examples"] + rows[1]["examples"]) == sorted(e.id for e in t.pool)
    assert sorted(rows[2]["examples"] + rows[3]["examples"]) == sorted(e.id for e in t.pool)
    assert len(t.train_set.examples) == 4
    assert not {e.question for e in t.pool} & {e.question for e in t.test_set.examples}


def test_difficulty_selection_caches_and_reports_the_distribution(tiny_llama, tmp_path, monkeypatch):
    cache = tmp_path / "difficulty.json"
    data = {"difficulty": "hard", "difficulty_candidates": 6, "difficulty_samples": 4, "difficulty_cache": str(cache)}
    t = Trainer(_cfg(tiny_llama, tmp_path / "a", rounds=0, data=data))
    stored = json.loads(cache.read_text())["correct"]
    assert len(stored) == 6 and stored[t.train_set.examples[0].id] == 0
    # A second run reads the cache: sampling is never called.
    from fastrft.engine import Engine

    monkeypatch.setattr(Engine, "generate", lambda *a, **k: pytest.fail("re-estimated a cached pass rate"))
    with pytest.raises(ConfigError, match=r"none of the 6 candidates.*Observed \(correct of 4.*0/4: \d"):
        Trainer(_cfg(tiny_llama, tmp_path / "b", rounds=0, data={**data, "difficulty": "0.9:1"}))
    assert not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------------------- findings
def test_l0_learns_the_training_example(tiny_llama, tmp_path):
    """The minimalist layer (G = 1, reward as the signal, KL 0.001) on 'What is 1 + 1?': its Pass@1 rises."""
    out = tmp_path / "run"
    summary = Trainer(_cfg(tiny_llama, out, rounds=120, eval={"eval_every": 120})).run()
    before, after = summary["first_eval"]["train_pass1"], summary["last_eval"]["train_pass1"]
    assert before <= 0.2 and after >= 0.6


def test_l3_negative_reward_behaves_as_the_loss_predicts(tiny_llama, tmp_path):
    """With {-1, +1}, G = 1, on-policy and token-mean, the loss is -R + beta * KL exactly; a failed
    response's log-probability goes down after its update, where L0 would skip it (advantage 0)."""
    out = tmp_path / "run"
    Trainer(_cfg(tiny_llama, out, rounds=8, preset="L3")).run()
    rows = _rounds(out)
    assert all(r["skipped"] == 0 for r in rows)  # every round carries signal
    assert rows[0]["kl_mean"] == 0.0  # the policy is the reference before the first step
    for r in rows:
        assert r["loss"] == pytest.approx(-r["reward_mean"] + 0.001 * r["kl_mean"], abs=1e-6)

    from fastrft.loop.scoring import score
    from fastrft.loop.types import Rollouts, TrainBatch

    t = Trainer(_cfg(tiny_llama, tmp_path / "step", rounds=1, preset="L3"))
    batch = t.data.for_round(1)
    rollouts = Rollouts(t.rollout(1, batch.prompt_ids))
    scores = score(batch, rollouts, t.cfg.algo, history={})
    assert scores.rewards == [-1.0]  # the random model fails
    train = TrainBatch.of(batch, rollouts, scores)
    before = float(t.learner.recompute_old_logprobs(train)[0].sum())
    t.learner.update(1, train, first_update=0)
    after = float(t.learner.recompute_old_logprobs(train)[0].sum())
    assert after < before


# ----------------------------------------------------------------------------------------- ladder
def test_ladder_runs_writes_table_and_figure_and_resumes(tiny_llama, tmp_path, capsys):
    out = tmp_path / "study"
    args = ["ladder", "--layers", "L0,L3", "--seeds", "2", "--profile", "paper", "--model", str(tiny_llama),
            "--rounds", "3", "--max-new-tokens", "2", "--eval-every", "1", "--test-size", "4", "--train-samples", "8",
            "--lr", "3e-3", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    md = (out / "ladder.md").read_text()
    table, dynamics = md.split("## Verdicts")[0], md.split("## Training dynamics")[1]
    assert "| L3-negative-reward | L0-minimal |" in md.split("## Verdicts")[1]  # against the layer before
    rows = [line for line in table.splitlines() if line.startswith("| L")]
    assert [row.split("|")[1].strip() for row in rows] == ["L0-minimal", "L3-negative-reward"]
    assert all(" ± " in row and "| 2 |" in row for row in rows)
    assert "(baseline)" in rows[0] and rows[1].rstrip(" |").split("|")[-2].strip().endswith(("helps", "hurts", "noise"))
    assert [line.split("|")[1].strip() for line in dynamics.splitlines() if line.startswith("| L")] == \
        ["L0-minimal", "L3-negative-reward"]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(out.rglob("*.lock")) == []  # the caches' and the runs' locks leave no file behind
    for p in ("L0-minimal/seed-0", "L0-minimal/seed-1", "L3-negative-reward/seed-1"):
        assert json.loads((out / p / "summary.json").read_text())["complete"]
        assert not (out / p / "checkpoints").exists()  # removed once the run finished
    cfg = json.loads((out / "L3-negative-reward/seed-1/config.json").read_text())
    assert cfg["algo"]["reward_fail"] == -1.0 and cfg["run"]["seed"] == 1
    # L3 differs from L0 only in training: its round-0 evaluation is L0's, read from the study's cache ...
    for s in (0, 1):
        ev0 = [read_metrics(out / p / f"seed-{s}/metrics.jsonl")[0] for p in ("L0-minimal", "L3-negative-reward")]
        assert "shared_from" not in ev0[0] and ev0[1].pop("shared_from") == f"L0-minimal/seed-{s}"
        assert untimed(ev0[0]) == untimed(ev0[1])
    # ... and the run is the one it would have been on its own, every record equal but the timings.
    alone = tmp_path / "alone"
    cfg["run"].update(out=str(alone), seed=0, name="alone")
    Trainer(TrainConfig.from_dict(cfg)).run()
    shared = read_metrics(out / "L3-negative-reward/seed-0/metrics.jsonl")
    shared[0].pop("shared_from")
    assert [untimed(r) for r in read_metrics(alone / "metrics.jsonl")] == [untimed(r) for r in shared]
    stamp = (out / "L0-minimal/seed-0/metrics.jsonl").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0  # everything complete: nothing reruns
    assert "4 runs (4 already complete)" in capsys.readouterr().err
    assert (out / "L0-minimal/seed-0/metrics.jsonl").stat().st_mtime_ns == stamp
    assert main([*args[:-1], "--lr", "1e-3", "--no-progress"]) == 2  # other settings: refused
    assert main(["plot", str(out / "L0-minimal/seed-0"), str(out / "L3-negative-reward/seed-0"),
                 "--out", str(tmp_path / "o.png")]) == 0
    assert (tmp_path / "o.png").read_bytes()[:4] == b"\x89PNG"


def test_ladder_md_states_what_ran_not_the_profile(tiny_llama, tmp_path, capsys):
    """A tiny study under the cpu-mini profile with --rounds and --lr: the header, the choice column and
    the counts describe the runs, not the profile's text (60 rounds, lr 2e-5) or the paper's (lr 1e-6)."""
    out = tmp_path / "study"
    args = ["ladder", "--layers", "L0,L2", "--seeds", "1", "--profile", "cpu-mini", "--model", str(tiny_llama),
            "--rounds", "2", "--max-new-tokens", "2", "--eval-every", "1", "--test-size", "4", "--train-samples", "4",
            "--lr", "3e-3", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert "fastrft ladder: 2 runs (0 already complete)" in capsys.readouterr().err
    text = (out / "ladder.md").read_text()
    header = text.split("| preset |")[0]
    assert "2 runs: 2 presets x 1 seed." in header
    assert "Every run: 2 rounds, evaluation every round, lr 0.003, responses ≤ 2 tokens," in header
    assert "test Pass@1 on 4 problems" in header and "train Pass@1 from 4 samples" in header
    assert "By preset: G = 1 (L0-minimal); G = 4 (L2-rollouts-4)." in header
    assert "--rounds 2 (instead of 60 from profile cpu-mini)" in header
    assert "--lr 0.003 (instead of 2e-05 from profile cpu-mini)" in header
    assert "--max-new-tokens 2 (instead of 96 from profile cpu-mini)" in header and "progress" not in header
    for stale in ("60 rounds", "every 15", "2e-5", "1e-6", "1e-06", "96 tokens", "1 seeds", "1 presets"):
        assert stale not in header, stale
    table = text.split("## Verdicts")[0]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table.splitlines()
            if line.startswith("| L")}
    assert rows["L0-minimal"] == "1 example, G = 1, reward {0,1} as the signal, clip 0.2, KL 0.001 (k3)"
    assert rows["L2-rollouts-4"] == "G = 4 rollouts per round"


def test_ladder_seed_is_the_first_seed_and_name_is_refused(tiny_llama, tmp_path, capsys):
    """--seed 7 runs seeds 7 and 8 (and ladder.md says so); --name, which the ladder cannot honour, is
    refused in one line before anything is written."""
    out = tmp_path / "study"
    args = ["ladder", "--layers", "L0", "--seeds", "2", "--profile", "paper", "--model", str(tiny_llama), "--rounds",
            "1", "--max-new-tokens", "2", "--eval-every", "0", "--test-size", "2", "--train-samples", "1", "--out",
            str(out), "--no-progress"]
    assert main([*args, "--name", "mine"]) == 2
    err = capsys.readouterr().err
    assert "name (--name) is not accepted by the ladder" in err and not out.exists()
    assert main([*args, "--seed", "7"]) == 0
    assert sorted(p.name for p in (out / "L0-minimal").iterdir()) == ["seed-7", "seed-8"]
    seeds = [json.loads((out / "L0-minimal" / d / "config.json").read_text())["run"]["seed"] for d in ("seed-7", "seed-8")]
    assert seeds == [7, 8]
    assert "--seed 7 (the first seed: runs seed-7 to seed-8)" in (out / "ladder.md").read_text()


def test_a_corrupt_base_evaluation_cache_is_named_not_used(tiny_llama, tmp_path, capsys):
    out = tmp_path / "study"
    out.mkdir()
    (out / "base-eval.json").write_text("[1, 2")
    args = ["ladder", "--layers", "L0", "--seeds", "1", "--profile", "paper", "--model", str(tiny_llama),
            "--rounds", "1", "--max-new-tokens", "2", "--test-size", "4", "--out", str(out), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "base-eval.json: not a base-evaluation cache" in err and "delete it" in err
    assert (out / "base-eval.json").read_text() == "[1, 2"  # left as it was


def test_tensorboard_event_files_hold_the_round_metrics(tiny_llama, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    Trainer(_cfg(tiny_llama, out, rounds=3, eval={"eval_every": 1}, run={"tensorboard": True})).run()
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/reward_mean", "train/loss", "train/kl_mean", "eval/train_pass1"} <= tags
    rounds = _rounds(out)
    assert [e.value for e in acc.Scalars("train/reward_mean")] == [r["reward_mean"] for r in rounds]


def _layer(name, test_curves, train_curves=None):
    """A finished layer as ladder.collect returns it, built from per-seed {round: Pass@1} curves."""
    train_curves = train_curves or test_curves
    runs = []
    for s, (te, tr) in enumerate(zip(test_curves, train_curves)):
        recs = [{"kind": "eval", "round": rd, "test_pass1": te[rd], "train_pass1": tr[rd]} for rd in te]
        runs.append({"seed": s, "records": recs, "summary": {"wall_s": 60.0}})
    return {"name": name, "layer": name.split("-")[0], "choice": name, "runs": runs}


def test_ladder_table_says_which_choice_helps_and_which_hurts(tmp_path):
    from fastrft.report import compare, ladder_table, plot_ladder

    # Round 0 is the base model and is left out of the run mean: a preset that starts higher gains nothing.
    l0 = _layer("L0-minimal", [{0: 0.2, 10: 0.5, 20: 0.6}, {0: 0.2, 10: 0.6, 20: 0.6}, {0: 0.2, 10: 0.6, 20: 0.7}])
    up = _layer("L2-rollouts-4", [{0: 0.9, 10: 0.9, 20: 0.9}] * 3)  # run mean 0.9 vs 0.6, no seed spread
    down = _layer("L3-negative-reward", [{0: 0.2, 10: 0.1, 20: 0.2}, {0: 0.2, 10: 0.2, 20: 0.1},
                                         {0: 0.2, 10: 0.0, 20: 0.3}])
    noisy = _layer("L1-advantage", [{0: 0.2, 10: 0.9, 20: 0.9}, {0: 0.2, 10: 0.1, 20: 0.1},
                                    {0: 0.2, 10: 0.9, 20: 0.9}])  # +0.03 on average, SE about 0.27
    tiny = _layer("L4-hard-example", [{0: 0.2, 10: 0.62, 20: 0.62}] * 3)
    flat = _layer("L5-batch", [{0: 0.2, 10: 0.6, 20: 0.6}] * 3)
    c = compare(up, l0, "test_pass1")
    assert c["delta"] == pytest.approx(0.3) and c["verdict"] == "helps"
    # SE: L0's seed means are 0.55, 0.6, 0.65 (sd 0.05), the other layer has none: 0.05 / sqrt(3).
    assert c["se"] == pytest.approx(0.05 / 3 ** 0.5)
    assert compare(down, l0, "test_pass1")["verdict"] == "hurts"
    assert compare(noisy, l0, "test_pass1")["verdict"] == "within noise"
    # No seed spread on either side (SE 0), yet +0.02 is below the minimum effect an evaluation can show.
    assert compare(tiny, flat, "test_pass1") == {"delta": pytest.approx(0.02), "se": 0.0, "verdict": "within noise"}
    table = ladder_table([l0, up, down, noisy, tiny])
    lines = table.splitlines()
    assert "| train vs L0 | test vs L0 |" in lines[0]
    cells = {line.split("|")[1].strip(): [x.strip() for x in line.split("|")[1:-1]] for line in lines[2:]}
    col = lines[0].split("|")[1:-1]
    test_vs = [x.strip() for x in col].index("test vs L0")
    assert cells["L0-minimal"][test_vs] == "(baseline)"
    assert cells["L2-rollouts-4"][test_vs] == "+0.30 ± 0.03 helps"
    assert cells["L3-negative-reward"][test_vs] == "-0.45 ± 0.03 hurts"
    assert cells["L1-advantage"][test_vs].endswith("within noise")
    # Without L0 in the study the first preset is the baseline, and the columns say so.
    assert "| train vs L2 | test vs L2 |" in ladder_table([up, down]).splitlines()[0]
    png = plot_ladder([l0, up, down, noisy, tiny], tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_seed_gives_a_difference_but_no_verdict():
    """With one seed on either side the spread is unknown: no standard error of 0 and no "helps"."""
    from fastrft.report import compare, ladder_table

    l0 = _layer("L0-minimal", [{0: 0.2, 10: 0.3, 20: 0.3}])
    up = _layer("L2-rollouts-4", [{0: 0.2, 10: 0.9, 20: 0.9}])
    assert compare(up, l0, "test_pass1") == {"delta": pytest.approx(0.6), "se": None, "verdict": "no verdict"}
    three = _layer("L0-minimal", [{0: 0.2, 10: 0.3, 20: 0.3}] * 3)
    assert compare(up, three, "test_pass1")["verdict"] == "no verdict"  # one seed on one side is enough
    row = [line for line in ladder_table([l0, up]).splitlines() if line.startswith("| L2")][0]
    assert row.count("+0.60 (1 seed: no verdict)") == 2 and "helps" not in row and "± 0.00" not in row


def test_a_zero_gradient_norm_counts_in_the_median():
    """A step with a zero gradient (KL on, no reward signal) is a step; the median of [0.0, 14.8] is 7.4."""
    from fastrft.report import dynamics_row

    recs = [{"kind": "round", "round": i + 1, "correct_mean": 0.0, "grad_norm": g, "response_len_mean": 10,
             "skipped": 0, "skipped_total": 0} for i, g in enumerate([0.0, 14.8])]
    row = dynamics_row({"name": "L0-minimal", "runs": [{"seed": 0, "records": recs, "summary": {}}]})
    assert row["grad norm median"] == "7.4" and row["grad norm max"] == "15"


def test_dynamics_table_reads_the_rounds():
    from fastrft.report import dynamics_table

    def run(correct, norms, lengths, skipped):
        recs = [{"kind": "eval", "round": 0, "train_pass1": 0.0}]
        for i, (c, g, n, s) in enumerate(zip(correct, norms, lengths, skipped), start=1):
            recs.append({"kind": "round", "round": i, "correct_mean": c, "grad_norm": g, "response_len_mean": n,
                         "skipped": s, "skipped_total": sum(skipped[:i])})
        return {"seed": 0, "records": recs, "summary": {}}

    # Seed a: fails at rounds 1 and 3, then solves; the skipped round's norm (0) is not a step.
    a = run([0.0, 1.0, 0.0, 1.0, 1.0, 1.0], [0.0, 4.0, 9.0, 2.0, 1.0, 3.0], [90, 30, 60, 10, 10, 10], [1, 0, 0, 0, 0, 0])
    # Seed b: half the group right in round 1, all right after; round 6 skipped.
    b = run([0.5, 1.0, 1.0, 1.0, 1.0, 1.0], [5.0, 7.0, 1.0, 1.0, 1.0, 0.0], [20, 20, 20, 20, 20, 30], [0, 0, 0, 0, 0, 1])
    row = dynamics_table([{"name": "L0-minimal", "runs": [a, b]}]).splitlines()[2].split("|")[1:-1]
    cells = [x.strip() for x in row]
    assert cells == ["L0-minimal",
                     "0.79 ± 0.18",   # 4/6 and 5.5/6 of the rollouts correct
                     "2 ± 1",         # last failures at rounds 3 and 1
                     "2.0 ± 1.4",     # 0->1->0->1 flips 3 times; 0.5->1 once
                     "2 ± 1.4",       # medians of [1, 2, 3, 4, 9] and [1, 1, 1, 5, 7]
                     "8 ± 1",         # largest norms 9 and 7
                     "23 ± 1",        # last 5 rounds: 24 and 22 tokens
                     "1 ± 0"]


def test_settings_text_says_when_evaluations_happen(tmp_path):
    """An interval at or beyond the run's length evaluates only at the start and the end: say so."""
    from fastrft.ladder import plan, settings_text

    base = TrainConfig().to_dict()
    for every, rounds, words in ((15, 2, "evaluation at the start and the end"), (0, 5, "evaluation at the start "
                                 "and the end"), (5, 20, "evaluation every 5 rounds and at the end")):
        flags = {"eval": {"eval_every": every}, "run": {"rounds": rounds}}
        pairs = plan(base, flags, ["L0"], 1, "cpu-mini", tmp_path)
        assert f"{rounds} rounds, {words}," in settings_text(pairs)


def test_until_decided_adds_seeds_to_undecided_comparisons_and_resumes(tiny_llama, tmp_path, capsys):
    """--until-decided: the planned 2 seeds, then one more at a time (--jobs 1) while L3 against L0 is
    undecided, up to --max-seeds 4; the verdicts table in ladder.md says where it stopped. A rerun after an
    interruption (the last run not there yet) replays the verdicts, runs it, and gives the same table."""
    import shutil

    out = tmp_path / "study"
    args = ["ladder", "--layers", "L0,L3", "--seeds", "2", "--until-decided", "--max-seeds", "4", "--profile",
            "paper", "--model", str(tiny_llama), "--rounds", "2", "--max-new-tokens", "2", "--eval-every", "0",
            "--test-size", "4", "--train-samples", "4", "--lr", "3e-3", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    md = (out / "ladder.md").read_text()
    row = next(line for line in md.split("## Verdicts")[1].splitlines() if line.startswith("| L3"))
    verdict = row.rstrip(" |").split("|")[-1].strip()
    seeds = int(row.split("|")[5])
    ran = sorted(p.name for p in (out / "L3-negative-reward").iterdir())
    assert ran == [f"seed-{s}" for s in range(seeds)] and 2 <= seeds <= 4
    assert verdict == f"undecided at {seeds} seeds" if seeds == 4 else verdict.endswith(f"(at {seeds} seeds)")
    if seeds > 2:
        assert "undecided; seeds per layer now" in capsys.readouterr().err
    shutil.rmtree(out / "L3-negative-reward" / f"seed-{seeds - 1}")
    assert main(args) == 0
    assert (out / "ladder.md").read_text() == md
    assert main([*args[:6], "--max-seeds", "1", *args[8:]]) == 2
    assert "below the 2 planned seeds" in capsys.readouterr().err
    assert main([a for a in args if a != "--until-decided"]) == 2
    assert "only applies with --until-decided" in capsys.readouterr().err
