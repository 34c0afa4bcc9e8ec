"""TRL-style rewards: a list of functions with weights, in fastrft's f(response, answer) form or TRL's
batched f(completions, **columns) form, from Python or by name; each logged; bad ones refused."""

from __future__ import annotations

import json

import pytest

from fastrft.config import (AlgoConfig, DataConfig, EvalConfig, ModelConfig, OptimConfig, RolloutConfig, RunConfig,
                            TrainConfig)
from fastrft.data import Example
from fastrft.errors import ConfigError, FastRFTError
from fastrft.report import read_metrics
from fastrft.rewards import funcs


def length_penalty(completions, **kwargs):
    """TRL's batched form: every column arrives as a list, one entry per completion."""
    assert set(kwargs) >= {"prompts", "answer"} and len(kwargs["answer"]) == len(completions)
    return [-len(c) / 100 for c in completions]


def only_short(completions, prompts, answer, **kwargs):
    return [None if len(c) > 3 else 1.0 for c in completions]  # None: does not apply, adds nothing


def test_weighted_sum_of_both_signatures_and_none():
    ex = Example("x/1", "What is 1 + 1?", "2", "arithmetic", {"level": "add1"})
    fs = funcs.resolve(["arithmetic", f"{__name__}:length_penalty", f"{__name__}:only_short"], [2.0, 1.0, 0.5],
                       [funcs.load("arithmetic"), length_penalty, only_short])
    assert [f.batched for f in fs] == [False, True, True]
    totals, values = funcs.score(fs, ["it is 2", "3"], [ex, ex])
    assert totals == pytest.approx([2 * 1.0 - 0.07, 0.0 - 0.01 + 0.5])
    assert values == {"arithmetic": [1.0, 0.0], "length_penalty": [-0.07, -0.01], "only_short": [None, 1.0]}


def test_bad_values_and_bad_lists_are_refused_with_the_function_named():
    ex = Example("x/1", "q", "2", "arithmetic")
    nan = funcs.resolve(["python:nan"], [], [lambda completions, **kw: [float("nan")]])
    with pytest.raises(FastRFTError, match="python:nan.*finite float"):
        funcs.score(nan, ["a"], [ex])
    short = funcs.resolve(["python:short"], [], [lambda completions, **kw: [1.0, 2.0]])
    with pytest.raises(FastRFTError, match="list of 1 floats"):
        funcs.score(short, ["a"], [ex])
    with pytest.raises(ConfigError, match=r"reward_weights \(--reward-weights\) has 1 weight\(s\) for 2"):
        DataConfig(reward_funcs=("arithmetic", "gsm8k"), reward_weights=(1.0,))
    with pytest.raises(ConfigError, match=r"reward_funcs \(--reward-funcs\) unknown reward function 'nope'"):
        DataConfig(reward_funcs=("nope",))
    with pytest.raises(ConfigError, match="passed from Python"):
        funcs.resolve(["python:mine"], [])
    with pytest.raises(ConfigError, match="reward-fail"):
        TrainConfig(data=DataConfig(reward_funcs=("arithmetic",)), algo=AlgoConfig(reward_fail=-1.0))


def test_a_trl_style_reward_list_trains_from_python_and_each_is_logged(tiny_llama, tmp_path):
    from fastrft.trainer import Trainer

    calls = []

    def exact(completions, answer, **kwargs):  # a local function: recorded as python:<name>
        calls.append(len(completions))
        return [1.0 if a in c else 0.0 for c, a in zip(completions, answer)]

    out = tmp_path / "run"
    cfg = TrainConfig(model=ModelConfig(model=str(tiny_llama)),
                      rollout=RolloutConfig(group_size=3, max_new_tokens=4), algo=AlgoConfig(advantage="grpo"),
                      optim=OptimConfig(lr=1e-3), eval=EvalConfig(eval_every=0, test_size=2, train_samples=1),
                      run=RunConfig(rounds=2, out=str(out), progress=False))
    Trainer(cfg, reward_funcs=[exact, length_penalty], reward_weights=[1.0, 0.5]).run()
    rounds = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "round"]
    for r in rounds:
        assert r["reward_mean"] == pytest.approx(r["reward_exact_mean"] + 0.5 * r["reward_length_penalty_mean"])
        assert "correct_mean" in r  # correctness is still measured
    # batched: one call on one probe completion before the run starts, then one per round with its 3
    assert calls == [1, 3, 3]
    stored = json.loads((out / "config.json").read_text())["data"]["reward_funcs"]
    assert stored == ["python:test_a_trl_style_reward_list_trains_from_python_and_each_is_logged.<locals>.exact",
                      f"{__name__}:length_penalty"]
    # The CLI takes names; a reward passed from Python must be passed again to resume.
    with pytest.raises(ConfigError, match="passed from Python"):
        Trainer(TrainConfig.from_dict(json.loads((out / "config.json").read_text())))


def test_reward_funcs_from_the_command_line(tiny_llama, tmp_path, capsys):
    from fastrft.cli import main

    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_llama), "--rounds", "1", "--eval-every", "0", "--group-size", "2",
            "--advantage", "grpo", "--max-new-tokens", "3", "--test-size", "2", "--train-samples", "1",
            "--reward-funcs", f"arithmetic,{__name__}:length_penalty", "--reward-weights", "1,2",
            "--out", str(out), "--no-progress"]
    assert main(args) == 0
    (r,) = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "round"]
    assert r["reward_mean"] == pytest.approx(r["reward_arithmetic_mean"] + 2 * r["reward_length_penalty_mean"])
    assert main([*args[:-3], "--reward-weights", "1", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "reward_weights (--reward-weights) has 1 weight(s) for 2" in err and not (tmp_path / "b").exists()
