"""Checkpoints: a run killed with SIGKILL and resumed (even with its newest checkpoint damaged) ends
bit-identical to an uninterrupted one on CPU; the export loads in transformers with the same logits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastrft.checkpoint import checkpoint_dirs, load_latest, save_checkpoint, verify
from fastrft.cli import main
from fastrft.report import read_metrics
from conftest import subprocess_env, untimed

# Every field of metrics.jsonl except wall-clock timings, which no two runs share.
def _cmd(model, out, precision="fp32", lora=False):
    # Every piece of carried state is exercised: the window history, the KL reference, two PPO epochs of
    # two mini-batches (old log-probs, several optimizer steps a round), warm-up + cosine lr, AdamW moments.
    # With LoRA: adapters with dropout (its RNG stream is carried too), trained on a reward with signal in
    # every group (conftest.digit_share; the child finds it through subprocess_env(tests=True)).
    adapters = ["--lora-rank", "4", "--lora-dropout", "0.1", "--reward-funcs", "conftest:digit_share"] if lora else []
    return [sys.executable, "-m", "fastrft", "train", "--model", str(model), "--out", str(out), "--rounds", "24",
            "--save-every", "4", "--keep-checkpoints", "2", "--group-size", "4", "--advantage", "window",
            "--window", "8", "--kl-coef", "0.01", "--ppo-epochs", "2", "--mini-batches", "2", "--lr", "3e-3",
            "--warmup-rounds", "3", "--schedule", "cosine", "--max-new-tokens", "3", "--eval-every", "6",
            "--test-size", "4", "--train-samples", "4", "--eval-k", "1,2", "--log-samples", "2", "--no-progress",
            "--seed", "3", "--precision", precision, *adapters]


def _final_model(out):
    round_, payload = load_latest(out)
    return round_, payload["model"]


@pytest.mark.parametrize(("precision", "lora"), [("fp32", False), ("bf16-mixed", False), ("fp32", True),
                                               ("bf16-mixed", True)], ids=["fp32", "bf16-mixed", "fp32-lora",
                                                                            "bf16-mixed-lora"])
def test_kill_9_then_resume_is_bit_identical(tiny_llama, tmp_path, precision, lora):
    """bf16-mixed too: a checkpoint holds the fp32 masters and AdamW state; the bf16 compute copy and the
    bf16 KL reference are functions of them, rebuilt identically on resume. With LoRA the checkpoint holds
    the adapters alone: the frozen base is loaded again from its source."""
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    env = subprocess_env(tests=lora)
    cmd = lambda out: _cmd(tiny_llama, out, precision, lora)  # noqa: E731
    subprocess.run(cmd(ref), check=True, env=env, capture_output=True, timeout=600)

    proc = subprocess.Popen(cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        metrics = killed / "metrics.jsonl"
        if metrics.exists() and sum(1 for line in metrics.read_text().splitlines() if '"kind": "round"' in line) >= 14:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    rounds_done = [r["round"] for r in read_metrics(killed / "metrics.jsonl") if r["kind"] == "round"]
    assert 14 <= max(rounds_done) < 24
    saved = [r for r, _ in checkpoint_dirs(killed)]
    assert saved and saved[-1] >= 12

    # Damage the newest checkpoint: the resume must notice and fall back to the one before.
    newest = checkpoint_dirs(killed)[-1][1]
    with open(newest / "state.pt", "r+b") as f:
        f.seek(200)
        f.write(b"\x00garbage\x00")
    assert "SHA-256" in verify(newest)

    resumed = subprocess.run(cmd(killed), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "damaged" in resumed.stderr and "continuing after round" in resumed.stderr

    a, b = read_metrics(ref / "metrics.jsonl"), read_metrics(killed / "metrics.jsonl")
    assert [r["round"] for r in b if r["kind"] == "round"] == list(range(1, 25))
    assert untimed(a) == untimed(b)
    assert (ref / "rollouts.jsonl").read_text() == (killed / "rollouts.jsonl").read_text()
    assert (ref / "problems.jsonl").read_text() == (killed / "problems.jsonl").read_text()  # cut back, then redone
    (ra, wa), (rb, wb) = _final_model(ref), _final_model(killed)
    assert ra == rb == 24 and wa.keys() == wb.keys()
    assert all(v.dtype == torch.float32 for v in wa.values())  # the masters, in bf16-mixed too
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # The runs really trained: the weights moved away from the initial ones (with LoRA: B, which starts at 0).
    from fastrft.models import load_model

    if lora:
        assert set(wa) == {k for k in wa if ".lora_" in k} and any(torch.count_nonzero(wa[k]) for k in wa
                                                                 if ".lora_B." in k)
    else:
        init = load_model(tiny_llama).state_dict()
        assert any(not torch.equal(init[k], wa[k]) for k in wa)
    assert len(checkpoint_dirs(killed)) <= 3  # kept: the newest 2 (+ the damaged one, left for inspection)


def test_adamw_is_fused_and_a_checkpoint_of_the_unfused_step_resumes_exactly(tiny_llama, tmp_path, monkeypatch):
    """Runs use torch's fused AdamW. A checkpoint written by the earlier per-parameter AdamW still resumes,
    and continues with the step it was written with, bit for bit: the copy below, resumed from its
    round-3 checkpoint by today's code, ends with the weights and records of the uninterrupted run."""
    import shutil

    import fastrft.loop.learner as learner_module
    from fastrft.config import RunConfig
    from fastrft.precision import make_adamw
    from fastrft.trainer import Trainer
    from conftest import tiny_config

    def config(out):
        return tiny_config(tiny_llama, out, eval_every=0, group_size=4).replace(
            run=RunConfig(rounds=6, seed=0, out=str(out), progress=False, save_every=3))

    assert Trainer(config(tmp_path / "new")).optimizer.param_groups[0]["fused"] is True

    def unfused(params, **kw):
        kw.pop("device")
        return torch.optim.AdamW(params, **kw)

    with monkeypatch.context() as m:  # the optimizer of earlier versions, for two whole runs
        m.setattr(learner_module, "make_adamw", unfused)
        for name in ("old", "resumed"):
            Trainer(config(tmp_path / name)).run()
    resumed = tmp_path / "resumed"
    shutil.rmtree(resumed / "checkpoints" / "round-000006")  # as if it had stopped after round 3's checkpoint
    (resumed / "summary.json").unlink()
    assert learner_module.make_adamw is make_adamw
    trainer = Trainer(config(resumed))
    assert trainer.resumed_from == 3 and trainer.optimizer.param_groups[0]["fused"] is None
    trainer.run()
    a, b = load_latest(tmp_path / "old")[1], load_latest(resumed)[1]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert untimed(read_metrics(resumed / "metrics.jsonl")) == \
        untimed(read_metrics(tmp_path / "old" / "metrics.jsonl"))


def test_checkpoint_write_is_atomic_and_pruned(tmp_path):
    for r in (1, 2, 3):
        save_checkpoint(tmp_path, r, {"x": torch.full((3,), float(r))}, keep=2)
    assert [r for r, _ in checkpoint_dirs(tmp_path)] == [2, 3]
    # A write killed before its rename leaves only a temporary directory, which is not a checkpoint.
    (tmp_path / "checkpoints" / ".tmp-round-000004-1").mkdir()
    round_, payload = load_latest(tmp_path)
    assert round_ == 3 and torch.equal(payload["x"], torch.full((3,), 3.0))
    # A truncated state file (a partial copy, a full disk) fails the checksum; the previous one is used.
    path = checkpoint_dirs(tmp_path)[-1][1] / "state.pt"
    path.write_bytes(path.read_bytes()[:-10])
    warnings = []
    round_, payload = load_latest(tmp_path, warn=warnings.append)
    assert round_ == 2 and torch.equal(payload["x"], torch.full((3,), 2.0))
    assert "round-000003" in warnings[0] and "SHA-256" in warnings[0]


class _RunsCode:
    """Pickled, it calls os.system when loaded by an unpickler that allows any global."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_is_refused_and_its_code_never_runs(tmp_path, capsys):
    """state.pt is read as data only: a file whose manifest is right but which holds a call (written by
    someone else, for resume or export) is refused with a line that says why, and nothing runs."""
    marker = tmp_path / "code-ran"
    save_checkpoint(tmp_path, 1, {"x": torch.ones(2)}, keep=5)
    save_checkpoint(tmp_path, 2, {"x": _RunsCode(marker)}, keep=5)  # the newest, whole by its manifest
    assert verify(checkpoint_dirs(tmp_path)[-1][1]) is None
    warnings = []
    round_, payload = load_latest(tmp_path, warn=warnings.append)
    assert round_ == 1 and torch.equal(payload["x"], torch.ones(2)) and not marker.exists()
    assert "round-000002" in warnings[0] and "posix.system" in warnings[0] and "could run code" in warnings[0]
    # export of a run whose only checkpoint is crafted: one line, nothing run, nothing written
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": {"model": "unused"}}))
    save_checkpoint(tmp_path / "run", 1, {"x": _RunsCode(marker)}, keep=5)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "could run code" in err and "no whole checkpoint" in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["llama", "llama-tied-bias", "qwen3"])
def test_export_loads_in_transformers_with_the_same_logits(tiny_models, tmp_path, family, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from fastrft.models import load_model

    run, out = tmp_path / "run", tmp_path / "export"
    assert main(["train", "--model", str(tiny_models[family]), "--out", str(run), "--rounds", "3", "--group-size", "4",
                 "--advantage", "grpo", "--lr", "1e-2", "--max-new-tokens", "3", "--eval-every", "0", "--test-size", "2",
                 "--train-samples", "2", "--no-progress"]) == 0
    assert main(["export", str(run), "--out", str(out)]) == 0
    _, trained = _final_model(run)
    saved = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(saved[k], trained[k]) for k in saved)  # the bits of the checkpoint
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / f).exists()

    native = load_model(out)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[2, 5, 9, 13, 40, 7, 11, 3, 4]])
    with torch.no_grad():
        ours = native.forward_packed(ids[0], torch.tensor([0, ids.shape[1]], dtype=torch.int32))
        ours = ours @ native.lm_head_weight.T
        theirs = hf(ids).logits[0]
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() <= 1e-4 * scale
    # The export differs from the base model: training changed it.
    base = AutoModelForCausalLM.from_pretrained(tiny_models[family], dtype=torch.float32).eval()
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits[0], theirs)
    # Every exported file has the same mode: the process's default (model.safetensors was once 0600).
    assert {f.stat().st_mode & 0o777 for f in out.iterdir()} == {(out / "config.json").stat().st_mode & 0o777}
    # Export refuses to overwrite, and to write into a file, with one line.
    assert main(["export", str(run), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")
    assert main(["export", str(run), "--out", str(tmp_path / "a-file")]) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and "Traceback" not in err and (tmp_path / "a-file").read_text() == "x"
