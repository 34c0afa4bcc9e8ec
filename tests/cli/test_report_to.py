"""--report-to, as TRL's report_to: tensorboard, wandb, none. wandb is an optional extra, absent here: a
stand-in module with wandb's init/log/finish records what a run sends (as WANDB_MODE=offline would keep
it), and without the package the flag is refused before anything is written."""

from __future__ import annotations

import importlib.machinery
import sys
import types

from fastrft.cli import main


def _args(model, out, *extra):
    return ["train", "--model", str(model), "--rounds", "2", "--eval-every", "2", "--group-size", "2", "--advantage",
            "grpo", "--max-new-tokens", "3", "--test-size", "2", "--train-samples", "1", "--out", str(out),
            "--no-progress", *extra]


def test_report_to_wandb_logs_every_round_and_evaluation(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert main(_args(tiny_llama, tmp_path / "none", "--report-to", "wandb")) == 2
    err = capsys.readouterr().err
    assert "report_to (--report-to wandb) needs the wandb package" in err and not (tmp_path / "none").exists()
    assert main(_args(tiny_llama, tmp_path / "x", "--report-to", "comet")) == 2
    assert "report_to (--report-to) must list tensorboard, wandb, none" in capsys.readouterr().err

    sent = {"init": [], "log": [], "finish": 0}
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    class Run:
        def log(self, data, step):
            sent["log"].append((step, data))

        def finish(self):
            sent["finish"] += 1

    fake.init = lambda **kw: sent["init"].append(kw) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    assert main(_args(tiny_llama, out, "--report-to", "wandb,tensorboard")) == 0
    (init,) = sent["init"]
    assert init["name"] == "run" and init["dir"] == str(out) and init["resume"] == "allow" and init["config"]["run"]
    steps = [(step, sorted(k.split("/")[0] for k in data)[0]) for step, data in sent["log"]]
    assert steps == [(0, "eval"), (1, "train"), (2, "train"), (2, "eval")]
    assert "train/reward_mean" in sent["log"][1][1] and "eval/test_pass1" in sent["log"][-1][1]
    assert sent["finish"] == 1 and any((out / "tb").iterdir())  # both sinks wrote


def test_report_to_wandb_for_real_in_offline_mode(tiny_llama, tmp_path, monkeypatch):
    """The real wandb package, WANDB_MODE=offline: the run's records land in <run dir>/wandb under the run
    id kept in the run directory, rounds and evaluations both."""
    import pytest

    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    assert main(_args(tiny_llama, out, "--report-to", "wandb")) == 0
    (log,) = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    data = log.read_bytes()
    assert b"train/reward_mean" in data and b"eval/test_pass1" in data and b"train/loss" in data
