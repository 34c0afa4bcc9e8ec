"""A TRL user's second day (issue 32): resume does what the messages say, one process per run
directory, a failing reward costs one line and no work, and the rough edges of the first trial."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fastrft import lock, rundir
from fastrft.cli import main
from fastrft.report import read_metrics
from conftest import untimed


def _args(model, out, *extra, rounds=2):
    args = ["train", "--model", str(model), "--rounds", str(rounds), "--eval-every", "0", "--group-size", "2",
            "--advantage", "grpo", "--max-new-tokens", "3", "--test-size", "2", "--train-samples", "1",
            "--no-progress", "--save-every", "1"]
    return args + (["--out", str(out)] if out is not None else []) + list(extra)


# ----------------------------------------------------------------------------------- 1. resume as told
def test_a_run_started_without_out_resumes_with_the_out_its_message_names(tiny_llama, tmp_path, monkeypatch,
                                                                             capsys):
    monkeypatch.chdir(tmp_path)
    assert main(_args(tiny_llama, None, rounds=1)) == 0
    (made,) = list((tmp_path / "runs").iterdir())
    capsys.readouterr()
    # The same directory, spelled as the message spells it, with ./ and a trailing /, absolute, and moved.
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(made, moved)
    for spelling in (f"runs/{made.name}", f"./runs/{made.name}/", str(made), str(moved)):
        assert main(_args(tiny_llama, spelling, rounds=1)) == 0, capsys.readouterr().err
        err = capsys.readouterr().err
        assert "complete" in err and "another config" not in err


def test_config_diff_leaves_out_where_the_run_lives():
    a = {"run": {"out": "r/ref", "rounds": 3}}
    assert rundir.config_diff(a, {"run": {"out": "/abs/r/ref/", "rounds": 3}}) == ""
    assert "run.rounds" in rundir.config_diff(a, {"run": {"out": "r/ref", "rounds": 4}})


_HOLDER = textwrap.dedent("""
    import sys, time
    from fastrft import lock
    held = lock.hold(sys.argv[1], "holder for a test")
    print("held", flush=True)
    time.sleep(600)
""")


def _hold_in_other_process(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_locked_run_directory_refuses_train_export_and_ladder_and_a_killed_holder_never_blocks(
        tiny_llama, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_llama, out, rounds=1)) == 0
    assert not (out / lock.RUN_LOCK).exists()  # released, and its file removed, when the run ended
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    holder = _hold_in_other_process(out)
    try:
        assert main(_args(tiny_llama, out, rounds=1)) == 2
        err = capsys.readouterr().err
        assert f"is in use by process {holder.pid}" in err and "holder for a test" in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert main(["export", str(out), "--out", str(tmp_path / "export")]) == 2
        assert f"in use by process {holder.pid}" in capsys.readouterr().err
        assert not (tmp_path / "export").exists()
        study = tmp_path / "study"
        study_holder = _hold_in_other_process(study)
        try:
            assert main(["ladder", "--model", str(tiny_llama), "--layers", "L0", "--seeds", "1", "--out", str(study),
                         "--rounds", "1"]) == 2
            assert f"in use by process {study_holder.pid}" in capsys.readouterr().err
            assert [p.name for p in study.iterdir()] == [lock.RUN_LOCK]  # the holder's; nothing written
        finally:
            study_holder.kill()
            study_holder.wait()
        # Nothing was written by the refused commands.
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != lock.RUN_LOCK} == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / lock.RUN_LOCK).exists()  # what kill -9 leaves behind ...
    assert main(_args(tiny_llama, out, rounds=1)) == 0  # ... does not block
    assert "complete" in capsys.readouterr().err and not (out / lock.RUN_LOCK).exists()


def test_two_fastrft_processes_on_one_run_directory_one_runs_the_other_refuses(tiny_llama, tmp_path):
    # The first process holds the directory for as long as the test needs: its reward function waits for
    # a gate file (it is called first on the probe, after the lock is taken), so no timing is assumed.
    (tmp_path / "gated.py").write_text(textwrap.dedent("""
        import os, time

        def gated(completions, **kwargs):
            while not os.path.exists(os.environ["GATE"]):
                time.sleep(0.02)
            return [0.0] * len(completions)
        """))
    gate = tmp_path / "gate"
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastrft", *_args(tiny_llama, out, "--reward-funcs", "gated:gated", rounds=3)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GATE": str(gate),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / lock.RUN_LOCK).exists() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.01)
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    finally:
        gate.touch()
    assert first.wait(timeout=600) == 0, first.stderr.read()
    assert second.returncode == 2 and f"in use by process {first.pid}" in second.stderr, second.stderr
    records = read_metrics(out / "metrics.jsonl")
    assert [(r["kind"], r["round"]) for r in records] == [("eval", 0), ("round", 1), ("round", 2), ("round", 3),
                                                         ("eval", 3)]


def test_a_directory_removed_under_a_held_lock_is_locked_anew(tmp_path):
    run = tmp_path / "run"
    old = lock.hold(run, "first Trainer")
    shutil.rmtree(run)  # e.g. a notebook that deletes the run directory and builds the Trainer again
    new = lock.hold(run, "second Trainer")
    old.release()  # the first Trainer's handle must not release the second's lock
    probe = subprocess.run([sys.executable, "-c", "import sys; from fastrft import lock\n"
                            "try:\n    lock.hold(sys.argv[1], 'other')\nexcept Exception as e:\n    print(e)",
                            str(run)], capture_output=True, text=True, timeout=120)
    assert f"in use by process {os.getpid()}" in probe.stdout and "second Trainer" in probe.stdout
    new.release()
    assert not (run / lock.RUN_LOCK).exists()


def test_an_async_reward_runs_inside_a_running_event_loop():
    """In a notebook an event loop is running; the coroutine then runs on a loop of its own."""
    import asyncio

    from fastrft.data import Example
    from fastrft.rewards import funcs

    async def judge(completions, **kwargs):
        await asyncio.sleep(0)
        return [0.5] * len(completions)

    async def inside_a_loop():
        fs = funcs.resolve(["python:judge"], [], [judge])
        return funcs.score(fs, ["a", "b"], [Example("x/1", "q", "2", "arithmetic")] * 2)

    assert asyncio.run(inside_a_loop()) == ([0.5, 0.5], {"judge": [0.5, 0.5]})


def test_the_lock_of_a_study_cache_leaves_no_file(tmp_path):
    cache = tmp_path / "base-eval.json"
    with lock.locked(cache):
        assert (tmp_path / "base-eval.json.lock").exists()
    assert list(tmp_path.iterdir()) == []


def test_a_reset_engine_hands_out_blocks_as_a_fresh_one_does():
    """Why a resumed run's first logp_gap differed in the last digits: the block pool of a run that had
    been running was in another order than a fresh process's, so the same round read its KV cache from
    other blocks (other addresses, other rounding wherever BLAS depends on alignment). A reset with no
    sequence alive now puts the pool back in a fresh manager's order."""
    from fastrft.engine.block_manager import PyBlockManager

    kinds = [PyBlockManager]
    try:
        from fastrft import _engine

        kinds.append(_engine.BlockManager)
    except ImportError:
        pass
    for kind in kinds:
        used, fresh = kind(16, 4), kind(16, 4)
        used.allocate(1, list(range(9)))
        used.allocate(2, list(range(100, 107)))
        used.free(1)
        used.free(2)
        used.reset_prefix_cache()
        for bm in (used, fresh):
            bm.allocate(3, list(range(50, 61)))
            bm.allocate(4, list(range(70, 75)))
        assert used.block_table([3, 4]).tolist() == fresh.block_table([3, 4]).tolist(), kind


# ------------------------------------------------------------------------------ 2. a failing reward
def _reward_module(tmp_path, monkeypatch, body: str, name: str = "myrewards"):
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)
    return name


def test_a_reward_that_cannot_run_fails_in_one_line_before_anything_is_written(tiny_llama, tmp_path, monkeypatch,
                                                                              capsys):
    mod = _reward_module(tmp_path, monkeypatch, """
        def broken(completions, **kwargs):
            return [len(c) / undefined_name for c in completions]
        """)
    out = tmp_path / "run"
    assert main(_args(tiny_llama, out, "--reward-funcs", f"{mod}:broken")) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.strip()]
    assert line.startswith(f"fastrft: error: reward function '{mod}:broken' raised NameError: name 'undefined_name'")
    assert f"{mod}.py:3" in line and "probe" in line and "Traceback" not in err
    assert not out.exists()  # nothing costly ran, nothing was written


def test_a_correctness_reward_that_raises_is_one_line_too(tiny_llama, tmp_path, monkeypatch, capsys):
    mod = _reward_module(tmp_path, monkeypatch, """
        def strict(response, answer):
            raise ValueError("cannot parse " + response)
        """, name="myreward")
    assert main(_args(tiny_llama, tmp_path / "run", "--reward", f"{mod}:strict")) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.strip()]
    assert line.startswith(f"fastrft: error: reward '{mod}:strict' raised ValueError: cannot parse ")
    assert f"at {mod}.py:3, scoring the response " in line and "Traceback" not in err


def test_a_reward_that_raises_in_round_1_keeps_the_base_evaluation_and_the_fixed_rerun_continues(
        tiny_llama, tmp_path, monkeypatch, capsys):
    fine = """
        def score(completions, answer, **kwargs):
            return [float(a in c) + len(c) / 100 for c, a in zip(completions, answer)]
        """
    ref = tmp_path / "ref"
    mod = _reward_module(tmp_path, monkeypatch, fine)
    assert main(_args(tiny_llama, ref, "--reward-funcs", f"{mod}:score")) == 0
    # The same function with a bug that the probe (the reference answer as the completion) does not
    # reach: round 1 raises.
    mod = _reward_module(tmp_path, monkeypatch, """
        def score(completions, answer, **kwargs):
            out = []
            for c, a in zip(completions, answer):
                if c != a:
                    raise KeyError("missing_key")
                out.append(1.0)
            return out
        """)
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(_args(tiny_llama, out, "--reward-funcs", f"{mod}:score")) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("fastrft: error")]
    assert "reward function 'myrewards:score' raised KeyError: 'missing_key' at myrewards.py:6, scoring " \
           "completion 1 of 2 (" in line and "Traceback" not in err
    assert [(r["kind"], r["round"]) for r in read_metrics(out / "metrics.jsonl")] == [("eval", 0)]
    # Fixed: the rerun keeps the base evaluation and continues, ending where the uninterrupted run ends.
    mod = _reward_module(tmp_path, monkeypatch, fine)
    assert main(_args(tiny_llama, out, "--reward-funcs", f"{mod}:score")) == 0
    assert "keeping the evaluation" in capsys.readouterr().err
    assert untimed(read_metrics(out / "metrics.jsonl")) == untimed(read_metrics(ref / "metrics.jsonl"))
    assert (out / "rollouts.jsonl").read_text() == (ref / "rollouts.jsonl").read_text()


# ---------------------------------------------------------------------------- 4. the rough edges
def test_tensorboard_and_report_to_none_contradict(tiny_llama, tmp_path, capsys):
    assert main(_args(tiny_llama, tmp_path / "r", "--tensorboard", "--report-to", "none")) == 2
    assert "none contradicts --tensorboard" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_ctrl_c_while_starting_says_so(tiny_llama, tmp_path, monkeypatch, capsys):
    import fastrft.trainer

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(fastrft.trainer, "load_policy", interrupted)  # loading the model
    assert main(_args(tiny_llama, tmp_path / "r")) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastrft: interrupted while starting") and "nothing was trained" in err
    assert not (tmp_path / "r").exists()


def test_help_and_messages(capsys):
    from fastrft.cli import build_parser

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices
    train_help = sub["train"].format_help()
    assert "hub id owner/name" in " ".join(train_help.split()) and "custom (rows of your own" in " ".join(
        train_help.split())
    export_help = " ".join(sub["export"].format_help().split())
    assert "--round N" in export_help and "newest whole checkpoint" in export_help
    assert main(["train", "--profile", "nope"]) == 2
    assert "or auto (cpu-mini on a CPU" in capsys.readouterr().err
    assert main(["presets"]) == 0
    assert "- auto: cpu-mini on a CPU" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--example-index", "3,abc"])
    err = capsys.readouterr().err
    assert "'abc' (in '3,abc') is not an integer" in err and "invalid parse value" not in err
    assert main(["export", "r/nope", "--out", "x"]) == 2
    assert "r/nope: no such directory" in capsys.readouterr().err


def test_export_names_the_round_and_takes_one(tiny_llama, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_llama, out, rounds=2)) == 0
    capsys.readouterr()
    assert main(["export", str(out), "--out", str(tmp_path / "e2")]) == 0
    assert f"exported round 2 of {out} (its newest whole checkpoint)" in capsys.readouterr().out
    assert main(["export", str(out), "--out", str(tmp_path / "e1"), "--round", "1"]) == 0
    assert f"exported round 1 of {out}:" in capsys.readouterr().out
    from safetensors import safe_open

    with safe_open(str(tmp_path / "e1" / "model.safetensors"), "pt") as f:
        assert f.metadata()["fastrft_round"] == "1"
    assert main(["export", str(out), "--out", str(tmp_path / "e9"), "--round", "9"]) == 2
    assert "holds no checkpoint of round 9 (its checkpoints: rounds 1, 2" in capsys.readouterr().err


def test_every_checkpoint_damaged_is_one_plain_sentence(tiny_llama, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_llama, out, "--keep-checkpoints", "1", rounds=1)) == 0
    (out / "summary.json").unlink()
    for name in ("rollouts.jsonl", "problems.jsonl", "prompts.jsonl"):
        (out / name).unlink()
    metrics = out / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines()[0] + "\n")  # one recorded line
    for ckpt in (out / "checkpoints").iterdir():
        with open(ckpt / "state.pt", "r+b") as f:
            f.seek(100)
            f.write(b"\x00broken\x00")
    capsys.readouterr()
    assert main(_args(tiny_llama, out, rounds=1)) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("fastrft: error")]
    assert line.count("fastrft:") == 1 and "its only checkpoint is damaged (round-000001: " in line
    assert "holds 1 recorded line (" in line


def test_wandb_run_is_named_after_the_run_directory_and_honours_wandb_dir(tiny_llama, tmp_path, monkeypatch):
    import importlib.machinery
    import types

    inits = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: inits.append(kw) or types.SimpleNamespace(log=lambda *a, **k: None,
                                                                       finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert main(_args(tiny_llama, tmp_path / "my-run", "--report-to", "wandb", rounds=1)) == 0
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-files"))
    assert main(_args(tiny_llama, tmp_path / "other", "--report-to", "wandb", "--name", "chosen", rounds=1)) == 0
    assert inits[0]["name"] == "my-run" and inits[0]["dir"] == str(tmp_path / "my-run")
    assert inits[1]["name"] == "chosen" and "dir" not in inits[1]  # wandb reads WANDB_DIR itself
    assert inits[0]["id"] != inits[1]["id"]
    # A moved run directory continues the same wandb run.
    shutil.copytree(tmp_path / "my-run", tmp_path / "moved")
    (tmp_path / "moved" / "summary.json").unlink()
    assert main(_args(tiny_llama, tmp_path / "moved", "--report-to", "wandb", rounds=1)) == 0
    assert inits[2]["id"] == inits[0]["id"]


def test_progress_bars_in_a_log_file_draw_no_transient_bar_and_rarely_redraw(monkeypatch):
    import io

    from fastrft import progress

    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    with progress.bar(total=100, desc="eval round 3", transient=True) as bar:
        for _ in range(100):
            bar.update(1)
    assert "eval round 3" not in log.getvalue()
    with progress.bar(total=100, desc="rounds") as bar:
        for _ in range(100):
            bar.update(1)
    assert 1 <= log.getvalue().count("rounds") <= 3
