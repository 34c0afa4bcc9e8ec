"""Per-problem evaluation records (problems.jsonl): every evaluation's metrics are computed from them alone,
with pass@k, maj@k and a 95% interval; bad --eval-k input is one line."""

from __future__ import annotations

import dataclasses
import json

import pytest

from conftest import tiny_config
from fastrft.config import EvalConfig
from fastrft.errors import ConfigError
from fastrft.evaluate import summarize
from fastrft.report.records import read_metrics
from fastrft.trainer import Trainer


def test_the_metrics_are_rebuilt_from_the_problem_records(tiny_llama, tmp_path):
    cfg = tiny_config(tiny_llama, tmp_path / "run", rounds=4, eval_every=2)
    cfg = cfg.replace(eval=dataclasses.replace(cfg.eval, train_samples=4, eval_k=(1, 2, 4), test_size=6))
    Trainer(cfg).run()
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"]
    problems = [json.loads(line) for line in (tmp_path / "run" / "problems.jsonl").read_text().splitlines()]
    assert [r["round"] for r in evals] == [0, 2, 4]
    for ev in evals:
        recs = [p for p in problems if p["round"] == ev["round"]]
        test = [p for p in recs if p["split"] == "test"]
        assert len(test) == 6 and len(recs) == 7 and all(p["n"] == 4 for p in test)
        assert all(p["correct"] == sum(s == 1.0 for s in p["scores"]) and sum(p["answers"].values()) <= p["n"]
                   for p in recs)
        rebuilt = summarize(recs, eval_k=(1, 2, 4))
        measured = {k: v for k, v in ev.items() if k not in ("kind", "round", "time_eval")}
        assert rebuilt == measured  # every metric, bit for bit
        for key in ("test_pass1", "test_pass@2", "test_pass@4", "test_maj@4", "test_greedy", "train_pass1"):
            assert ev[f"{key}_lo"] <= ev[key] <= ev[f"{key}_hi"]
        assert ev["test_pass1"] <= ev["test_pass@2"] <= ev["test_pass@4"]
        assert "test_maj@1" not in ev  # one vote: that is Pass@1


def test_k_above_the_samples_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"eval_k.*k = 8, more than the 4 samples"):
        EvalConfig(eval_k=(1, 8), eval_samples=4)
    with pytest.raises(ConfigError, match="eval_k"):
        EvalConfig(eval_k=(0,))
    assert EvalConfig(eval_k=(1, 4, 16)).samples == 16 and EvalConfig(eval_k=(2,), eval_samples=5).samples == 5


def test_each_round_logs_its_prompts_pass_rates_and_signal(tiny_llama, tmp_path):
    """prompts.jsonl: one line per training prompt per round, its pass rate the round's share correct; the
    round record gains the share of groups with no signal and of truncated responses."""
    cfg = tiny_config(tiny_llama, tmp_path / "run", rounds=3, eval_every=0, group_size=4)
    Trainer(cfg).run()
    rounds = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "round"]
    prompts = [json.loads(line) for line in (tmp_path / "run" / "prompts.jsonl").read_text().splitlines()]
    assert [(p["round"], p["id"], p["n"]) for p in prompts] == [(r["round"], r["examples"][0], 4) for r in rounds]
    for r, p in zip(rounds, prompts):
        assert p["pass_rate"] == r["correct_mean"] and p["correct"] == round(4 * r["correct_mean"])
        assert r["zero_signal_frac"] == (0.0 if 0 < p["correct"] < 4 else 1.0)  # GRPO: signal iff mixed
        assert r["truncated_frac"] == 1.0 - r["stop_frac"]


def _lengths(completions, answers, ids, prompts, **columns):
    """A metrics hook: the mean response length in characters, and how many samples it saw."""
    assert len(answers) == len(ids) == len(prompts) == len(completions)
    return {"chars": sum(map(len, completions)) / len(completions), "samples": float(len(completions))}


def test_the_metrics_hook_is_logged_at_every_evaluation(tiny_llama, tmp_path):
    cfg = tiny_config(tiny_llama, tmp_path / "run", rounds=2, eval_every=1)
    cfg = cfg.replace(eval=dataclasses.replace(cfg.eval, eval_k=(1, 2)))
    Trainer(cfg, compute_metrics=_lengths).run()
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"]
    assert len(evals) == 3 and all(r["eval_samples"] == 8 * 2 and r["eval_chars"] > 0 for r in evals)
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["eval"]["eval_metrics"] == "test_problems:_lengths"  # recorded by name


@pytest.mark.parametrize("bad,message", [
    (lambda **kw: [1.0], "returned a list; it must return a dict"),
    (lambda **kw: {"x": float("nan")}, "x=nan; every value must be a finite number"),
    (lambda **kw: {"test_pass1": 0.5}, "'test_pass1', a name fastrft's own evaluation logs"),
    (lambda **kw: 1 / 0, "raised ZeroDivisionError"),
])
def test_a_bad_metrics_hook_stops_with_one_line(tiny_llama, tmp_path, bad, message):
    from fastrft.metrics_hook import MetricsHookError

    cfg = tiny_config(tiny_llama, tmp_path / "run", rounds=2, eval_every=1)
    with pytest.raises(MetricsHookError, match="metrics hook python:") as e:
        Trainer(cfg, compute_metrics=bad).run()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_fastrft_eval_reproduces_a_rounds_in_training_evaluation(tiny_llama, tmp_path, capsys):
    """`fastrft eval RUN --round 2` on a run's checkpoint: the same metrics (the wall clock aside) and the same
    problem records, bit for bit, as the evaluation the run made after round 2; bf16-mixed, with pass@k."""
    from fastrft.cli import main

    cfg = tiny_config(tiny_llama, tmp_path / "run", rounds=4, eval_every=2)
    cfg = cfg.replace(eval=dataclasses.replace(cfg.eval, train_samples=4, eval_k=(1, 2), test_size=5),
                      model=dataclasses.replace(cfg.model, precision="bf16-mixed"),
                      run=dataclasses.replace(cfg.run, save_every=2, keep_checkpoints=3))
    Trainer(cfg).run()
    run = tmp_path / "run"
    assert main(["eval", str(run), "--round", "2", "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    trained = next(r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval" and r["round"] == 2)
    untimed = lambda r: {k: v for k, v in r.items() if k != "time_eval"}  # noqa: E731
    assert untimed(summary["metrics"]) == untimed(trained) and summary["round"] == 2
    theirs = [line for line in (run / "problems.jsonl").read_text().splitlines() if json.loads(line)["round"] == 2]
    assert (tmp_path / "ev" / "problems.jsonl").read_text().splitlines() == theirs
    out = capsys.readouterr().out
    assert "evaluated round 2 of" in out and "test_pass@2" in out and " ± " in out
    assert not (run / "eval").exists()  # nothing written into the run with --out


def test_fastrft_eval_bad_targets_are_one_line(tiny_llama, tmp_path, capsys):
    from fastrft.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["eval", str(tmp_path / "empty")]) == 2
    assert "neither a model directory" in capsys.readouterr().err
    cfg = tiny_config(tiny_llama, tmp_path / "run", rounds=2, eval_every=0)
    Trainer(cfg.replace(run=dataclasses.replace(cfg.run, save_every=0))).run()
    assert main(["eval", str(tmp_path / "run"), "--round", "1"]) == 2
    assert "has no checkpoint of that round (it has 2" in capsys.readouterr().err
    assert main(["eval", str(tiny_llama), "--round", "1"]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_fastrft_eval_of_a_base_model_is_a_runs_round_0(tiny_llama, tmp_path):
    from fastrft.cli import main

    Trainer(tiny_config(tiny_llama, tmp_path / "run", rounds=1, eval_every=0)).run()
    base = next(r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval")
    assert main(["eval", str(tiny_llama), "--dataset", "arithmetic", "--level", "add1", "--train-samples", "64",
                 "--test-size", "8", "--max-new-tokens", "2", "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert {k: v for k, v in summary["metrics"].items() if k != "time_eval"} == \
        {k: v for k, v in base.items() if k != "time_eval"}
