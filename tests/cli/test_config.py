"""Tests for fastrft.config and the CLI flags generated from it (fastrft.cli).

No training is run: every CLI test either fails before a model is loaded (config construction happens
first) or replaces ``fastrft.cli._train`` with a recorder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

import fastrft.cli as cli
from fastrft.cli import build_parser, config_from_args, flag_values, load_config_file, main
from fastrft.config import (GROUPS, AlgoConfig, DataConfig, EvalConfig, ModelConfig, OptimConfig, RolloutConfig,
                            RunConfig, TrainConfig, build_group, flag)
from fastrft.errors import ConfigError, FastRFTError


def cli_flag(name: str) -> str:
    """The flag the spec promises, spelled out independently of fastrft.config.flag."""
    return "--" + "-".join(name.split("_"))


# --------------------------------------------------------------------------------- invalid field values

INVALID = [
    (ModelConfig, "precision", "fp8"), (ModelConfig, "precision", "float64"), (ModelConfig, "precision", "bf16mixed"),
    (ModelConfig, "device", "gpu"), (ModelConfig, "device", ""),
    (DataConfig, "dataset", "imagenet"), (DataConfig, "level", "div"),
    (DataConfig, "example_index", ()), (DataConfig, "example_index", (-1,)), (DataConfig, "example_index", (3, 3)),
    (DataConfig, "max_prompt_tokens", 0),
    (DataConfig, "train_file", "train.jsonl"),  # not allowed with the default (synthetic arithmetic) dataset
    (DataConfig, "test_file", "test.jsonl"),
    (DataConfig, "reward", "no_such_reward"), (DataConfig, "reward", "no_such_module_xyz:exact"),
    (RolloutConfig, "group_size", 0), (RolloutConfig, "group_size", 257),
    (RolloutConfig, "temperature", 0.0), (RolloutConfig, "temperature", -1.0),
    (RolloutConfig, "top_p", 0.0), (RolloutConfig, "top_p", 1.5),
    (RolloutConfig, "top_k", -1), (RolloutConfig, "max_new_tokens", 0), (RolloutConfig, "max_batch_size", 0),
    (AlgoConfig, "advantage", "ppo"),
    (AlgoConfig, "clip_low", 1.0), (AlgoConfig, "clip_low", -0.1), (AlgoConfig, "clip_high", -0.1),
    (AlgoConfig, "dual_clip", 1.0), (AlgoConfig, "dual_clip", 0.5),
    (AlgoConfig, "kl_coef", -0.001), (AlgoConfig, "kl_estimator", "k4"), (AlgoConfig, "aggregation", "sum"),
    (AlgoConfig, "reward_success", 0.0),  # equal to the default reward_fail
    (OptimConfig, "lr", 0.0), (OptimConfig, "lr", -1e-6), (OptimConfig, "weight_decay", -0.1),
    (OptimConfig, "beta1", 1.0), (OptimConfig, "beta1", -0.1), (OptimConfig, "beta2", 1.0),
    (OptimConfig, "beta2", -0.5), (OptimConfig, "grad_clip", -1.0), (OptimConfig, "warmup_steps", -1),
    (EvalConfig, "eval_every", -1), (EvalConfig, "train_samples", 0), (EvalConfig, "test_size", 0),
    (EvalConfig, "eval_temperature", 0.0), (EvalConfig, "eval_max_new_tokens", 0),
    (EvalConfig, "extra_rewards", ("no_such_reward",)),
    (RunConfig, "rounds", -1), (RunConfig, "threads", -1),
]  # fmt: skip


@pytest.mark.parametrize(("cls", "name", "bad"), INVALID, ids=lambda x: repr(x) if not isinstance(x, type) else x.__name__)
def test_invalid_value_names_field_and_flag(cls, name, bad):
    with pytest.raises(ConfigError) as info:
        cls(**{name: bad})
    msg = str(info.value)
    assert name in msg, msg
    assert cli_flag(name) in msg, msg


def test_invalid_table_covers_every_validated_field():
    # a field is "validated" when some value is refused; the table above must list each one
    covered = {(cls, name) for cls, name, _ in INVALID}
    validated = {(ModelConfig, "precision"), (ModelConfig, "device"), (DataConfig, "dataset"), (DataConfig, "level"),
                 (DataConfig, "example_index"), (DataConfig, "max_prompt_tokens"), (DataConfig, "train_file"),
                 (DataConfig, "test_file"), (DataConfig, "reward"), (RolloutConfig, "group_size"),
                 (RolloutConfig, "temperature"), (RolloutConfig, "top_p"), (RolloutConfig, "top_k"),
                 (RolloutConfig, "max_new_tokens"), (RolloutConfig, "max_batch_size"), (AlgoConfig, "advantage"), (AlgoConfig, "clip_low"),
                 (AlgoConfig, "clip_high"), (AlgoConfig, "dual_clip"), (AlgoConfig, "kl_coef"),
                 (AlgoConfig, "kl_estimator"), (AlgoConfig, "aggregation"), (AlgoConfig, "reward_success"),
                 (OptimConfig, "lr"), (OptimConfig, "weight_decay"), (OptimConfig, "beta1"), (OptimConfig, "beta2"),
                 (OptimConfig, "grad_clip"), (OptimConfig, "warmup_steps"), (EvalConfig, "eval_every"),
                 (EvalConfig, "train_samples"), (EvalConfig, "test_size"), (EvalConfig, "eval_temperature"),
                 (EvalConfig, "eval_max_new_tokens"), (EvalConfig, "extra_rewards"), (RunConfig, "rounds"),
                 (RunConfig, "threads")}
    assert covered == validated
    # and every (class, field) pair exists
    for cls, name in validated:
        assert name in {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize(("cls", "kwargs"), [
    (ModelConfig, dict(precision="bf16-mixed", device="cuda:1")), (ModelConfig, dict(precision="bf16", device="cpu")),
    (DataConfig, dict(dataset="gsm8k", train_file="a.jsonl", test_file="b.jsonl")),
    (DataConfig, dict(example_index=(0, 5, 2), level="mul")),
    (RolloutConfig, dict(group_size=256, max_batch_size=256, top_p=1.0, top_k=0, temperature=1e-3)),
    (AlgoConfig, dict(clip_low=0.0, clip_high=0.0, dual_clip=1.5, kl_coef=0.0, aggregation="seq-mean-token-sum-norm")),
    (AlgoConfig, dict(reward_fail=-1.0, reward_success=-1.0 + 1e-9)),
    (OptimConfig, dict(beta1=0.0, beta2=0.0, grad_clip=0.0, weight_decay=0.0)),
    (EvalConfig, dict(eval_every=0, test_size=1, eval_max_new_tokens=1, extra_rewards=("gsm8k", "math"))),
    (DataConfig, dict(reward="math")),
    (RunConfig, dict(rounds=0, threads=1)),
])  # fmt: skip
def test_boundary_values_accepted(cls, kwargs):
    cfg = cls(**kwargs)
    for k, v in kwargs.items():
        assert getattr(cfg, k) == v


@pytest.mark.parametrize("device", ["cudafoo", "cuda:x", "cuda1", "cuda:"])
def test_malformed_cuda_device_rejected(device):
    # the message promises "auto, cpu, cuda or cuda:N"; anything else must be refused at construction
    with pytest.raises(ConfigError, match="device"):
        ModelConfig(device=device)


# ----------------------------------------------------------------------------------- cross-field rule


@pytest.mark.parametrize("advantage", ["grpo", "dr_grpo", "rloo"])
def test_group_advantage_needs_group_size_two(advantage):
    with pytest.raises(ConfigError) as info:
        TrainConfig(algo=AlgoConfig(advantage=advantage), rollout=RolloutConfig(group_size=1))
    msg = str(info.value)
    assert "--group-size" in msg and "--advantage" in msg
    cfg = TrainConfig(algo=AlgoConfig(advantage=advantage), rollout=RolloutConfig(group_size=2))
    assert cfg.rollout.group_size == 2 and cfg.algo.advantage == advantage


@pytest.mark.parametrize("group_size", [1, 2, 8])
def test_advantage_none_accepts_any_group_size(group_size):
    cfg = TrainConfig(algo=AlgoConfig(advantage="none"), rollout=RolloutConfig(group_size=group_size))
    assert cfg.rollout.group_size == group_size


# ------------------------------------------------------------------------------------------- frozen


@pytest.mark.parametrize(("obj", "name", "value"), [
    (ModelConfig(), "precision", "bf16"), (DataConfig(), "example_index", (1,)), (RolloutConfig(), "group_size", 4),
    (AlgoConfig(), "kl_coef", 0.5), (OptimConfig(), "lr", 1.0), (EvalConfig(), "greedy", False),
    (RunConfig(), "rounds", 3), (TrainConfig(), "rollout", RolloutConfig(group_size=4)),
])  # fmt: skip
def test_configs_are_frozen(obj, name, value):
    before = getattr(obj, name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, name, value)
    assert getattr(obj, name) == before


# -------------------------------------------------------------------------------------- round trips


def _non_default() -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(precision="bf16-mixed", device="cpu"),
        data=DataConfig(dataset="gsm8k", example_index=(3, 17), train_file="tr.jsonl", max_prompt_tokens=300,
                        data_seed=5),
        rollout=RolloutConfig(group_size=4, temperature=0.8, top_k=20, max_new_tokens=256),
        algo=AlgoConfig(advantage="grpo", dual_clip=3.0, kl_coef=0.0, kl_estimator="k2", entropy_coef=0.01,
                        aggregation="seq-mean-token-sum-norm", reward_fail=-1.0, skip_zero_signal=False),
        optim=OptimConfig(lr=3e-6, beta2=0.95, warmup_steps=10),
        eval=EvalConfig(extra_rewards=("gsm8k",), test_size=50, greedy=False, eval_max_new_tokens=128),
        run=RunConfig(rounds=7, seed=3, out="runs/x", name="t", progress=False),
    )


def test_from_dict_to_dict_round_trip():
    cfg = _non_default()
    assert cfg != TrainConfig()
    back = TrainConfig.from_dict(cfg.to_dict())
    assert back == cfg
    assert back.data.example_index == (3, 17) and isinstance(back.data.example_index, tuple)


def test_json_round_trip():
    cfg = _non_default()
    data = json.loads(cfg.to_json())
    assert data["data"]["example_index"] == [3, 17]  # JSON has lists ...
    back = TrainConfig.from_dict(data)
    assert back == cfg  # ... turned back into tuples
    assert isinstance(back.data.example_index, tuple) and isinstance(back.eval.extra_rewards, tuple)
    assert back.algo.dual_clip == 3.0 and back.eval.test_size == 50


def test_from_dict_partial_uses_defaults():
    cfg = TrainConfig.from_dict({"rollout": {"group_size": 4}, "algo": {"advantage": "rloo"}})
    assert cfg == TrainConfig(rollout=RolloutConfig(group_size=4), algo=AlgoConfig(advantage="rloo"))
    assert TrainConfig.from_dict({}) == TrainConfig()


@pytest.mark.parametrize(("data", "must_mention"), [
    ({"rollout": {"group_sizee": 4}}, ["group_sizee", "rollout"]),
    ({"optim": {"lr": 1e-5, "learning_rate": 1e-5}}, ["learning_rate"]),
    ({"rollout": [4]}, ["rollout"]),
    ({"algo": "grpo"}, ["algo"]),
    ({"eval": None}, ["eval"]),
])  # fmt: skip
def test_from_dict_unknown_field_or_bad_section(data, must_mention):
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict(data)
    for word in must_mention:
        assert word in str(info.value)


@pytest.mark.parametrize("section", ["rollouts", "optimizer"])
def test_from_dict_unknown_section_rejected(section):
    # a misspelt section must not be silently ignored (its settings would be lost without a word)
    with pytest.raises(ConfigError, match=section):
        TrainConfig.from_dict({section: {"group_size": 4}})


def test_build_group_names_unknown_field():
    with pytest.raises(ConfigError, match="warmup"):
        build_group(OptimConfig, {"warmup": 3}, "optim")
    assert build_group(DataConfig, {"example_index": [4, 2]}, "data").example_index == (4, 2)


# ------------------------------------------------------------------------------------------------- CLI


def _train_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_every_field_has_exactly_one_flag():
    train = _train_parser()
    by_dest: dict[str, list[argparse.Action]] = {}
    for action in train._actions:
        if action.option_strings == ["--dtype"]:  # a documented alias: the older spelling of --precision
            assert action.dest == "model.precision"
            continue
        if action.option_strings == ["--warmup-rounds"]:  # the old name of --warmup-steps (config.ALIASES)
            assert action.dest == "optim.warmup_rounds"
            continue
        by_dest.setdefault(action.dest, []).append(action)
    expected_dests = set()
    for group, cls in GROUPS.items():
        for f in dataclasses.fields(cls):
            dest = f"{group}.{f.name}"
            expected_dests.add(dest)
            actions = by_dest.get(dest, [])
            assert len(actions) == 1, (dest, actions)
            opts = [o for o in actions[0].option_strings if not o.startswith("--no-")]
            assert opts == [cli_flag(f.name)], (dest, actions[0].option_strings)
            assert flag(f.name) == cli_flag(f.name)
    config_dests = {d for d in by_dest if "." in d}
    assert config_dests == expected_dests  # no flag without a field
    # no flag string is used twice
    all_opts = [o for a in train._actions for o in a.option_strings]
    assert len(all_opts) == len(set(all_opts))


def test_bool_fields_have_negative_flags():
    opts = {o for a in _train_parser()._actions for o in a.option_strings}
    for group, cls in GROUPS.items():
        for f in dataclasses.fields(cls):
            if isinstance(f.default, bool):
                assert {cli_flag(f.name), "--no-" + cli_flag(f.name)[2:]} <= opts


def test_flags_overlay_exactly_the_given_fields():
    argv = ["train", "--group-size", "4", "--advantage", "grpo", "--example-index", "3,17", "--dual-clip", "none",
            "--no-greedy", "--lr", "3e-6"]
    cfg = config_from_args(build_parser().parse_args(argv), TrainConfig())
    d = TrainConfig()
    expected = TrainConfig(
        model=d.model, run=d.run,
        data=dataclasses.replace(d.data, example_index=(3, 17)),
        rollout=dataclasses.replace(d.rollout, group_size=4),
        algo=dataclasses.replace(d.algo, advantage="grpo", dual_clip=None),
        optim=dataclasses.replace(d.optim, lr=3e-6),
        eval=dataclasses.replace(d.eval, greedy=False),
    )
    assert cfg == expected
    # field by field: exactly these differ from the defaults (dual_clip none == the default None)
    changed = {(g, k) for g, sec in cfg.to_dict().items() for k, v in sec.items() if d.to_dict()[g][k] != v}
    assert changed == {("rollout", "group_size"), ("algo", "advantage"), ("data", "example_index"),
                       ("eval", "greedy"), ("optim", "lr")}
    assert cfg.data.example_index == (3, 17) and cfg.optim.lr == 3e-6 and cfg.algo.dual_clip is None


@pytest.mark.parametrize(("argv", "section", "name", "value"), [
    (["--dual-clip", "3"], "algo", "dual_clip", 3.0),
    (["--test-size", "none"], "eval", "test_size", None),
    (["--test-size", "20"], "eval", "test_size", 20),
    (["--extra-rewards", "gsm8k,math"], "eval", "extra_rewards", ("gsm8k", "math")),
    (["--example-index", "65"], "data", "example_index", (65,)),
    (["--no-progress"], "run", "progress", False),
    (["--skip-zero-signal"], "algo", "skip_zero_signal", True),
    (["--train-file", "none"], "data", "train_file", None),
    (["--kl-estimator", "k1"], "algo", "kl_estimator", "k1"),
])  # fmt: skip
def test_single_flag_parsing(argv, section, name, value):
    cfg = config_from_args(build_parser().parse_args(["train", *argv]), TrainConfig())
    assert getattr(getattr(cfg, section), name) == value
    assert cfg.to_dict() == {**TrainConfig().to_dict(),
                             section: {**TrainConfig().to_dict()[section], name: value}}


def test_flag_overrides_a_base_config():
    base = TrainConfig(rollout=RolloutConfig(group_size=8, top_k=5), optim=OptimConfig(lr=1e-5))
    cfg = config_from_args(build_parser().parse_args(["train", "--top-k", "0"]), base)
    assert cfg == TrainConfig(rollout=RolloutConfig(group_size=8, top_k=0), optim=OptimConfig(lr=1e-5))


def _one_line_error(capsys) -> str:
    out, err = capsys.readouterr()
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fastrft: error: ")
    return lines[0]


@pytest.fixture
def no_training(monkeypatch):
    """Replace the training entry point: record the config instead of loading a model."""
    seen: list[TrainConfig] = []

    def fake_train(config, force=False):
        seen.append(config)
        return 0

    monkeypatch.setattr(cli, "_train", fake_train)
    return seen


def test_main_cross_field_error_is_one_line(capsys, no_training):
    assert main(["train", "--advantage", "grpo"]) == 2
    line = _one_line_error(capsys)
    assert "--group-size" in line and "--advantage" in line
    assert no_training == []


@pytest.mark.parametrize(("argv", "must_mention"), [
    (["--group-size", "0"], "--group-size"),
    (["--kl-estimator", "k9"], "kl_estimator"),
    (["--dataset", "imagenet"], "--dataset"),
    (["--example-index", "3,3"], "--example-index"),
])  # fmt: skip
def test_main_invalid_flag_value_is_one_line(capsys, no_training, argv, must_mention):
    assert main(["train", *argv]) == 2
    assert must_mention in _one_line_error(capsys)
    assert no_training == []


def test_main_config_file_is_base_and_flags_override(tmp_path, no_training):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"rollout": {"group_size": 4, "top_k": 7}, "algo": {"advantage": "grpo"},
                                "optim": {"lr": 5e-6}}))
    assert main(["train", "--config", str(path), "--lr", "3e-6", "--rounds", "2"]) == 0
    (cfg,) = no_training
    assert cfg == TrainConfig(rollout=RolloutConfig(group_size=4, top_k=7), algo=AlgoConfig(advantage="grpo"),
                              optim=OptimConfig(lr=3e-6), run=RunConfig(rounds=2))
    assert load_config_file(str(path)).optim.lr == 5e-6


def test_main_flag_override_checked_against_config_file(tmp_path, capsys, no_training):
    # advantage grpo comes from the file, group_size 1 from the flag: the cross-field rule must fire
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"rollout": {"group_size": 4}, "algo": {"advantage": "grpo"}}))
    assert main(["train", "--config", str(path), "--group-size", "1"]) == 2
    assert "--group-size" in _one_line_error(capsys)
    assert no_training == []


@pytest.mark.parametrize(("content", "must_mention"), [
    (None, "not found"),
    ("{not json", "JSON"),
    ("[1, 2]", "JSON object"),
    ('{"rollout": {"group_sizee": 2}}', "group_sizee"),
])  # fmt: skip
def test_main_bad_config_file(tmp_path, capsys, no_training, content, must_mention):
    path = tmp_path / "sub dir" / "my-config.json"
    if content is not None:
        path.parent.mkdir()
        path.write_text(content)
    assert main(["train", "--config", str(path)]) == 2
    line = _one_line_error(capsys)
    assert must_mention in line
    if content is None or not content.startswith("{\""):
        assert str(path) in line
    assert no_training == []


def test_main_config_file_with_wrong_value_type_is_a_user_error(tmp_path, capsys, no_training):
    # a string where an int belongs is a user-fixable error: exit 2 with a one-line message naming
    # the field, not a TypeError traceback
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"rollout": {"group_size": "four"}}))
    assert main(["train", "--config", str(path)]) == 2
    assert "group_size" in _one_line_error(capsys)


def test_load_config_file_errors_are_fastrft_errors(tmp_path):
    with pytest.raises(FastRFTError, match="missing.json"):
        load_config_file(str(tmp_path / "missing.json"))


def test_group_and_eval_samples_must_fit_one_decode_batch():
    with pytest.raises(ConfigError, match=r"group_size \(--group-size\).*--max-batch-size"):
        RolloutConfig(group_size=128, max_batch_size=64)
    with pytest.raises(ConfigError, match=r"train_samples \(--train-samples\) 32 exceeds max_batch_size"):
        TrainConfig(rollout=RolloutConfig(max_batch_size=16), eval=EvalConfig(train_samples=32))
    RolloutConfig(group_size=128, max_batch_size=128)  # accepted


# -------------------------------------------------------------------------------- reward and threads


def test_reward_flag_takes_a_registered_name_or_module_function(tmp_path, monkeypatch, no_training):
    (tmp_path / "cfg_test_reward.py").write_text("def exact(response, answer):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["train", "--reward", "cfg_test_reward:exact", "--threads", "1"]) == 0
    assert main(["train", "--reward", "gsm8k"]) == 0
    assert [(c.data.reward, c.run.threads) for c in no_training] == [("cfg_test_reward:exact", 1), ("gsm8k", 0)]
    assert TrainConfig().data.reward is None and TrainConfig().run.threads == 0
    # a config.json written by the run reads back the same
    assert TrainConfig.from_dict(json.loads(no_training[0].to_json())) == no_training[0]


@pytest.mark.parametrize(("value", "must_mention"), [
    ("no_such_reward", "'module.path:function'"),
    ("no_such_module_xyz:exact", "module 'no_such_module_xyz' cannot be imported"),
])  # fmt: skip
def test_main_bad_reward_is_one_line(capsys, no_training, value, must_mention):
    assert main(["train", "--reward", value]) == 2
    line = _one_line_error(capsys)
    assert "reward (--reward)" in line and must_mention in line
    assert no_training == []


def test_the_old_name_of_a_renamed_field_still_works(tmp_path):
    """warmup_rounds counted optimizer steps and is now warmup_steps: a config file or a flag with the old name
    sets the new field, and a run directory whose config.json has the old name compares equal."""
    from fastrft.rundir import config_diff

    assert TrainConfig.from_dict({"optim": {"warmup_rounds": 3}}).optim.warmup_steps == 3
    assert flag_values(_train_parser().parse_args(["--warmup-rounds", "4"])) == {"optim": {"warmup_steps": 4}}
    assert config_from_args(_train_parser().parse_args(["--warmup-rounds", "4"]), TrainConfig()).optim.warmup_steps == 4
    with pytest.raises(ConfigError, match="keep only warmup_steps"):  # both spellings, two values
        flag_values(_train_parser().parse_args(["--warmup-rounds", "4", "--warmup-steps", "2"]))
    new = TrainConfig(optim=OptimConfig(warmup_steps=3)).record()
    old = {**new, "optim": {("warmup_rounds" if k == "warmup_steps" else k): v for k, v in new["optim"].items()}}
    assert config_diff(old, new) == ""
    assert "warmup_steps: 3 -> 0" in config_diff(old, TrainConfig().record())
    with pytest.raises(ConfigError, match="keep only warmup_steps"):
        TrainConfig.from_dict({"optim": {"warmup_rounds": 3, "warmup_steps": 2}})


def test_session_settings_are_not_the_runs_identity():
    """config.json holds no session setting; an old config.json that does still resumes."""
    from fastrft.config import session_fields
    from fastrft.rundir import config_diff

    cfg = TrainConfig(run=RunConfig(out="a", progress=False, threads=1, keep_checkpoints=5, report_to=("none",)))
    record = cfg.record()
    assert not any(name in record[section] for section, name in session_fields())
    assert {("run", "out"), ("run", "progress"), ("run", "threads")} <= session_fields()
    old = {**record, "run": {**record["run"], "out": "elsewhere", "progress": True, "threads": 2}}
    assert config_diff(old, TrainConfig().record()) == "" == config_diff(old, cfg.to_dict())
