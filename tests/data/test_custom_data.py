"""Datasets of your own, as TRL takes them: rows from Python, a local file with a column mapping, a hub
dataset through the datasets library; prompt templates, system prompts, conversations; clear errors."""

from __future__ import annotations

import json
import sys
import types

import pytest

from fastrft.cli import main
from fastrft.config import AlgoConfig, DataConfig, EvalConfig, ModelConfig, RolloutConfig, RunConfig, TrainConfig
from fastrft.data import Example, render_prompt
from fastrft.errors import ConfigError
from fastrft.report import read_metrics

ROWS = [{"question": f"What is {a} + {b}?", "final": str(a + b), "level": "easy"} for a in range(3) for b in range(4)]


def _cfg(model, out, **data):
    return TrainConfig(model=ModelConfig(model=str(model)),
                       data=DataConfig(prompt_column="question", answer_column="final", reward="arithmetic", **data),
                       rollout=RolloutConfig(group_size=2, max_new_tokens=3), algo=AlgoConfig(advantage="grpo"),
                       eval=EvalConfig(eval_every=0, test_size=3, train_samples=1),
                       run=RunConfig(rounds=1, out=str(out), progress=False))


def test_a_dataset_and_a_batched_reward_from_python(tiny_llama, tmp_path):
    from fastrft.trainer import Trainer

    seen = {}

    def uses_columns(completions, prompts, answer, level, **kwargs):
        seen.update(prompts=prompts, level=level)
        return [0.5] * len(completions)

    out = tmp_path / "run"
    trainer = Trainer(_cfg(tiny_llama, out, example_index=(5,)), train_dataset=ROWS, reward_funcs=[uses_columns])
    assert trainer.train_set.examples[0].id == "python/train/5" and trainer.train_set.examples[0].answer == "2"
    assert all(ex.question != "What is 1 + 1?" for ex in trainer.test_set.examples)  # the trained row is not a test
    trainer.run()
    assert seen == {"prompts": ["What is 1 + 1?"] * 2, "level": ["easy", "easy"]}
    (r,) = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "round"]
    assert r["reward_uses_columns_mean"] == 0.5 and r["examples"] == ["python/train/5"]
    assert json.loads((out / "config.json").read_text())["data"]["dataset"] == "custom"


def test_a_local_file_with_a_column_mapping_from_the_command_line(tiny_llama, tmp_path, capsys):
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    args = ["train", "--model", str(tiny_llama), "--dataset", "custom", "--train-file", str(path), "--prompt-column",
            "question", "--answer-column", "final", "--reward", "arithmetic", "--example-index", "2",
            "--prompt-template", "{prompt} Answer after ####.", "--system-prompt", "Be brief.", "--rounds", "1",
            "--eval-every", "0", "--test-size", "2", "--train-samples", "1", "--max-new-tokens", "3", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    (r,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "round"]
    assert r["examples"] == ["custom/train/2"]
    bad = [a if a != "final" else "answer" for a in args]  # the file has no "answer" column
    assert main([*bad, "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "no column 'answer' (--answer-column)" in err and "'final'" in err and not (tmp_path / "bad").exists()
    assert main([*args[:5], "--rounds", "1", "--out", str(tmp_path / "noreward")]) == 2
    assert "reward (--reward) must be given for dataset 'custom'" in capsys.readouterr().err


def test_prompt_templates_system_prompts_and_conversations_render_with_the_chat_template():
    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return json.dumps(messages)

    plain = Example("custom/train/0", "What is 2 + 2?", "4", "arithmetic")
    shown = json.loads(render_prompt(Tok(), plain, "custom", template="Q: {prompt}", system="Be brief."))
    assert shown == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: What is 2 + 2?"}]
    talk = [{"role": "system", "content": "Mine."}, {"role": "user", "content": "What is 2 + 2?"}]
    conv = Example("custom/train/1", "What is 2 + 2?", "4", "arithmetic", {"prompt_messages": talk})
    assert json.loads(render_prompt(Tok(), conv, "custom", system="Be brief.")) == talk  # its own system turn wins
    with pytest.raises(ConfigError, match=r"prompt_template \(--prompt-template\) must contain \{prompt\}"):
        DataConfig(prompt_template="Question:")
    with pytest.raises(ConfigError, match=r"prompt_template.*cannot be filled"):
        DataConfig(prompt_template="{prompt} {answer}")


def test_a_hub_dataset_goes_through_the_datasets_library(tiny_llama, tmp_path, monkeypatch, capsys):
    from fastrft.trainer import Trainer

    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed: one line that says what to install
    with pytest.raises(ConfigError, match="needs the datasets package: pip install datasets"):
        Trainer(_cfg(tiny_llama, tmp_path / "a", dataset="someone/sums"))
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        if split != "train":
            raise ValueError(f'Unknown split "{split}". Should be one of [\'train\'].')
        return ROWS

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    trainer = Trainer(_cfg(tiny_llama, tmp_path / "b", dataset="someone/sums"))
    assert calls == [("someone/sums", "train"), ("someone/sums", "test")]
    assert trainer.train_set.examples[0].id == "someone/sums/train/0" and len(trainer.test_set.examples) == 3


def test_a_datasets_dataset_is_taken_as_is(tiny_llama, tmp_path):
    """A real datasets.Dataset, as a TRL user passes one."""
    datasets = pytest.importorskip("datasets")
    from fastrft.trainer import Trainer

    out = tmp_path / "run"
    trainer = Trainer(_cfg(tiny_llama, out, example_index=(3,)), train_dataset=datasets.Dataset.from_list(ROWS))
    assert trainer.train_set.examples[0].question == ROWS[3]["question"]
    assert trainer.train_set.examples[0].meta["level"] == "easy"
    trainer.run()
    assert [r["examples"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "round"] == [["python/train/3"]]
