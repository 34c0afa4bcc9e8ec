"""The command line end to end on a tiny random model: flags, outputs on disk, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

from fastrft.cli import main
from fastrft.config import TrainConfig
from fastrft.report import read_metrics


def _train_args(model, out, *extra):
    return ["train", "--model", str(model), "--rounds", "3", "--eval-every", "2", "--group-size", "2",
            "--advantage", "grpo", "--max-new-tokens", "4", "--test-size", "4", "--train-samples", "2",
            "--lr", "1e-3", "--out", str(out), "--no-progress", *extra]


def test_train_end_to_end(tiny_llama, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(_train_args(tiny_llama, out, "--kl-coef", "0.01", "--extra-rewards", "gsm8k")) == 0
    printed = capsys.readouterr().out
    assert "| round |" in printed and str(out) in printed
    cfg = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
    assert (cfg.rollout.group_size, cfg.algo.advantage, cfg.algo.kl_coef, cfg.run.rounds) == (2, "grpo", 0.01, 3)
    records = read_metrics(out / "metrics.jsonl")
    assert [r["round"] for r in records if r["kind"] == "eval"] == [0, 2, 3]
    assert [r["round"] for r in records if r["kind"] == "round"] == [1, 2, 3]
    assert all("test_pass1_gsm8k" in r for r in records if r["kind"] == "eval")
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["updates"] + summary["skipped_rounds"] == 3

    assert main(["plot", str(out)]) == 0
    assert "| round |" in capsys.readouterr().out
    # Two runs overlaid: the figure goes to the current directory by default, and the path says where.
    monkeypatch.chdir(tmp_path)
    assert main(["plot", str(out), str(out)]) == 0
    assert f"plot: {tmp_path / 'overlay.png'}" in capsys.readouterr().out and (tmp_path / "overlay.png").exists()


def test_rerun_into_same_directory(tiny_llama, tmp_path, capsys):
    """The same config finds the run complete and changes nothing; another config is refused with the
    diff, and nothing on disk changes."""
    out = tmp_path / "run"
    assert main(_train_args(tiny_llama, out)) == 0
    before = (out / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert main(_train_args(tiny_llama, out)) == 0
    assert (out / "metrics.jsonl").read_bytes() == before
    assert f"{out} holds this run, complete" in capsys.readouterr().err  # said, not only the table again
    assert main(_train_args(tiny_llama, out, "--lr", "2e-3")) == 2
    err = capsys.readouterr().err
    assert "another config" in err and "optim.lr: 0.001 -> 0.002" in err and "--force" in err
    assert "Traceback" not in err
    assert (out / "metrics.jsonl").read_bytes() == before


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastrft: error: model") and "missing" in err and len(err.splitlines()) == 1
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl: not found" in capsys.readouterr().err


def test_demo_command_runs_with_overrides(tiny_llama, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(tiny_llama), "--rounds", "2", "--eval-every", "1", "--test-size", "3",
                 "--train-samples", "2", "--max-new-tokens", "3", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "training example arithmetic/add1/65: 'What is 8 + 3?'" in printed
    assert "train Pass@1" in printed and (out / "curves.png").exists()


def test_console_entry_point_subprocess(tiny_llama, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fastrft", *_train_args(tiny_llama, out)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "metrics.jsonl").exists()
    bad = subprocess.run([sys.executable, "-m", "fastrft", "train", "--top-p", "2"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "top_p (--top-p) must be in (0, 1]" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_malformed_dataset_line_is_reported_with_file_and_line(tiny_llama, tmp_path, capsys):
    bad = tmp_path / "my_train.jsonl"
    bad.write_text('{"question": "What is 2 + 2?", "answer": "2 + 2 = 4\\n#### 4"}\n'
                   '{"question": "What is 3 + 3?", "answer": "no final answer here"}\n')
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_llama), "--dataset", "gsm8k", "--train-file", str(bad), "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "my_train.jsonl line 2" in err and "'answer'" in err and "####" in err
    assert not out.exists()


def test_help_is_fast_because_it_imports_no_torch():
    """`fastrft --help` is generated from the config classes alone: importing torch takes seconds."""
    code = ("import sys\nfrom fastrft.cli import main\n"
            "for argv in (['--help'], ['train', '--help'], ['ladder', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "assert 'transformers' not in sys.modules, 'transformers was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--max-new-tokens" in proc.stdout and "--threads" in proc.stdout and "--reward" in proc.stdout


def test_cli_flags_do_what_their_help_says(tiny_llama, tmp_path, capsys):
    """train accepts --profile auto like the ladder; --out "" and a malformed value are one line each and
    write nothing; --out's help states its default once; the ladder's help says where its values come from."""
    import pytest

    from fastrft.cli import build_parser

    assert main(_train_args(tiny_llama, tmp_path / "auto", "--profile", "auto", "--rounds", "1")) == 0
    assert "profile paper (chosen by --profile auto" in capsys.readouterr().err  # a directory model: paper
    assert main(_train_args(tiny_llama, tmp_path / "x")[:-3] + ["--out", ""]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out (--out) is empty" in err and not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as info:
        main(["train", "--lr", "fast", "--out", str(tmp_path / "y")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "argument --lr: invalid float value: 'fast'" in err
    train_help = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    out_help = " ".join(train_help.split("--out OUT")[2].split("--name")[0].split())
    assert out_help == "run directory (default: runs/<name>-<timestamp>)"
    ladder_help = " ".join(build_parser()._subparsers._group_actions[0].choices["ladder"].format_help().split())
    assert "--rounds ROUNDS training rounds; each samples once, then takes one optimizer step per PPO epoch and " \
           "mini-batch (none when skipped) (default: set by --profile and the preset)" in ladder_help
    assert "--out OUT the study's directory (default: runs/ladder-<profile>)" in ladder_help
    assert "(default: 200)" not in ladder_help


def test_a_run_that_failed_before_its_first_round_leaves_a_usable_directory(tiny_llama, tmp_path, capsys,
                                                                            monkeypatch):
    """A response budget beyond the model's context is refused before anything is written; so is a reward
    that breaks on its probe (tests/test_second_day.py). One that passes the probe (the reference answer
    as the response) and breaks in the base evaluation leaves a directory that the corrected command
    takes over."""
    (tmp_path / "myrewards.py").write_text("def broken(response, answer):\n    return 1.0 if response == answer else "
                                           "2.0\n\ndef fine(response, answer):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    assert main(_train_args(tiny_llama, out, "--max-new-tokens", "100000000")) == 2
    err = capsys.readouterr().err
    assert "max_new_tokens (--max-new-tokens) 100000000" in err and "context of 512" in err and not out.exists()
    assert main(_train_args(tiny_llama, out, "--reward", "myrewards:broken")) == 2
    assert "returned 2.0" in capsys.readouterr().err and (out / "config.json").exists()
    assert main(_train_args(tiny_llama, out, "--reward", "myrewards:fine")) == 0
    assert "stopped before its first round" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["data"]["reward"] == "myrewards:fine"
    assert [r["round"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "round"] == [1, 2, 3]
    assert len(list(out.glob("config.before-*.json"))) == 1  # the failed attempt's config, kept


def test_fp16_is_refused_and_a_diverged_round_is_reported(tiny_llama, tmp_path, capsys, monkeypatch):
    """fp16 cannot train (its AdamW state underflows): one line naming the alternatives, nothing written.
    A round whose update produced NaN stops the run with what happened, its record never written."""
    import fastrft.loop.run as run_mod

    assert main(_train_args(tiny_llama, tmp_path / "fp16", "--precision", "fp16")) == 2
    err = capsys.readouterr().err
    assert "fp16 cannot train" in err and "bf16-mixed" in err and not (tmp_path / "fp16").exists()
    real = run_mod.train_round

    def diverging(stages, state, r, recorder):
        metrics = real(stages, state, r, recorder)
        return {**metrics, "loss": float("nan")} if r == 2 else metrics

    monkeypatch.setattr(run_mod, "train_round", diverging)
    out = tmp_path / "run"
    assert main(_train_args(tiny_llama, out, "--save-every", "1")) == 2
    err = capsys.readouterr().err
    assert "round 2 diverged: loss not finite" in err and "last checkpoint is round 1" in err
    assert "Traceback" not in err
    assert [r["round"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "round"] == [1]
