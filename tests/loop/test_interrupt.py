"""An interrupted run keeps its rounds: SIGTERM (a scheduler's preemption) or Ctrl-C finishes the round,
writes a checkpoint of it and exits; the rerun continues there and ends with the same records as a run
that was never interrupted, wall-clock fields aside."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from fastrft.checkpoint import checkpoint_dirs
from fastrft.cli import main
from fastrft.report import read_metrics
from conftest import subprocess_env, untimed


def _args(model, out):
    # --save-every 0: the only checkpoint a run writes by itself is its last, so any resume point before
    # the end comes from the stop request. KL, a window baseline and AdamW moments carry state.
    return ["train", "--model", str(model), "--out", str(out), "--rounds", "10", "--save-every", "0",
            "--group-size", "2", "--advantage", "window", "--window", "4", "--kl-coef", "0.01", "--lr", "3e-3",
            "--max-new-tokens", "3", "--eval-every", "4", "--test-size", "3", "--train-samples", "2",
            "--log-samples", "2", "--no-progress", "--seed", "5"]


def _rounds(path):
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"kind": "round"' in line)


@pytest.fixture(scope="module")
def reference(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("interrupt") / "ref"
    subprocess.run([sys.executable, "-m", "fastrft", *_args(tiny_llama, out)], check=True, env=subprocess_env(),
                   capture_output=True, timeout=600)
    return out


def _stopped_in_call(evaluate, n):
    """``evaluate`` that sends this process SIGTERM at the start of its n-th call."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)  # the handler runs here and abandons the evaluation
        return evaluate(*args, **kwargs)

    return wrapped


def _same_as(reference, out):
    a, b = read_metrics(reference / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    assert [r["round"] for r in b if r["kind"] == "round"] == list(range(1, 11))
    assert untimed(a) == untimed(b)
    assert (reference / "rollouts.jsonl").read_text() == (out / "rollouts.jsonl").read_text()
    assert (reference / "problems.jsonl").read_text() == (out / "problems.jsonl").read_text()


def test_sigterm_checkpoints_and_the_rerun_continues(tiny_llama, tmp_path, reference):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastrft", *_args(tiny_llama, out)]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and _rounds(out / "metrics.jsonl") < 3:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM received" in err and "rerun the same command to continue" in err
    assert "Traceback" not in err
    done = _rounds(out / "metrics.jsonl")
    assert 3 <= done < 10, "the run finished before it could be stopped"
    assert [r for r, _ in checkpoint_dirs(out)] == [done]  # the last completed round, and only it

    rerun = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"continuing after round {done}" in rerun.stderr
    _same_as(reference, out)


def test_stop_during_an_evaluation_resumes_with_that_evaluation(tiny_llama, tmp_path, reference, monkeypatch,
                                                                capsys):
    """A stop request during an evaluation abandons it; the checkpoint marks it pending, and the rerun
    measures it first: the records equal the uninterrupted run's."""
    import torch

    import fastrft.loop.evaluator as evaluator_mod

    torch.set_num_threads(1)  # as in the reference subprocess: summation order, hence the bits, follow it
    handler_before = signal.getsignal(signal.SIGTERM)
    real = evaluator_mod.evaluate
    monkeypatch.setattr(evaluator_mod, "evaluate", _stopped_in_call(real, 2))  # the evaluation after round 4
    out = tmp_path / "run"
    assert main(_args(tiny_llama, out)) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "abandoning the evaluation" in err and "after round 4" in err
    records = read_metrics(out / "metrics.jsonl")
    assert [r["round"] for r in records if r["kind"] == "eval"] == [0]  # round 4's was abandoned
    assert [r for r, _ in checkpoint_dirs(out)] == [4]
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the run put the old handler back

    monkeypatch.setattr(evaluator_mod, "evaluate", real)
    assert main(_args(tiny_llama, out)) == 0
    _same_as(reference, out)


def test_without_out_the_message_names_the_directory(tiny_llama, tmp_path, monkeypatch, capsys):
    """The default run directory carries a timestamp: the message must say which --out continues it."""
    monkeypatch.chdir(tmp_path)
    args = [a for a in _args(tiny_llama, "unused") if a not in ("--out", "unused")]
    import fastrft.loop.run as run_mod

    real = run_mod.train_round

    def round_then_stop(stages, state, r, recorder):
        if r == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(stages, state, r, recorder)

    monkeypatch.setattr(run_mod, "train_round", round_then_stop)
    assert main(args) == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert "finishing round 2, then checkpointing it" in err and "stopped by SIGINT after round 2" in err
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert f"with --out {run_dir.relative_to(tmp_path)} to continue" in err
    assert [r for r, _ in checkpoint_dirs(run_dir)] == [2]  # round 2 finished before the stop


def test_stop_right_after_the_base_evaluation_checkpoints_round_0(tiny_llama, tmp_path, reference, monkeypatch,
                                                                   capsys):
    """Its record is written, so the stop keeps it in a round-0 checkpoint and the rerun goes on from there
    (it neither refuses for want of a checkpoint nor measures round 0 twice)."""
    import torch

    from fastrft.loop.recorder import Recorder

    torch.set_num_threads(1)
    real = Recorder.evaluation

    def log_then_stop(self, record, line, problems):
        real(self, record, line, problems)
        if record["round"] == 0:  # the evaluation is logged: round 1 never starts
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Recorder, "evaluation", log_then_stop)
    out = tmp_path / "run"
    assert main(_args(tiny_llama, out)) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    # The signal came between rounds: the message says so, not "finishing round 1".
    assert "stopping after round 0, then checkpointing it" in err and "stopped by SIGTERM after round 0" in err
    assert [r for r, _ in checkpoint_dirs(out)] == [0]
    assert [(r["kind"], r["round"]) for r in read_metrics(out / "metrics.jsonl")] == [("eval", 0)]
    monkeypatch.setattr(Recorder, "evaluation", real)
    assert main(_args(tiny_llama, out)) == 0
    _same_as(reference, out)


def test_stop_during_the_base_evaluation_leaves_nothing_to_resume(tiny_llama, tmp_path, reference, monkeypatch,
                                                                 capsys):
    """Nothing was recorded, so there is no checkpoint and the rerun simply starts the run."""
    import torch

    import fastrft.loop.evaluator as evaluator_mod

    torch.set_num_threads(1)
    real = evaluator_mod.evaluate
    monkeypatch.setattr(evaluator_mod, "evaluate", _stopped_in_call(real, 1))
    out = tmp_path / "run"
    assert main(_args(tiny_llama, out)) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "no checkpoint (nothing was completed)" in err
    assert "nothing is recorded yet, so there is nothing to checkpoint" in err and "then checkpointing" not in err
    assert checkpoint_dirs(out) == [] and read_metrics(out / "metrics.jsonl") == []
    monkeypatch.setattr(evaluator_mod, "evaluate", real)
    assert main(_args(tiny_llama, out)) == 0
    _same_as(reference, out)
