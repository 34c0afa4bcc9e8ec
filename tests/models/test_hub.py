"""Models by hub id, resolved offline from a Hugging Face cache laid out here as huggingface_hub lays it
out (models--owner--name/refs and snapshots): training, revisions, and the one-line errors."""

from __future__ import annotations

import shutil

from fastrft.cli import main
from fastrft.report import read_metrics

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache(root, model_dir, repo="fastrft-test/tiny-llama"):
    """An HF_HOME whose hub cache holds ``model_dir`` as ``repo`` at revision main (= COMMIT)."""
    entry = root / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model_dir, entry / "snapshots" / COMMIT)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(COMMIT)
    return root


def _args(model, out):
    return ["train", "--model", model, "--rounds", "1", "--eval-every", "0", "--group-size", "2", "--advantage",
            "grpo", "--max-new-tokens", "3", "--test-size", "2", "--train-samples", "1", "--out", str(out),
            "--no-progress"]


def test_a_hub_id_trains_from_the_cache_offline(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", str(_cache(tmp_path / "hf", tiny_llama)))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    assert main(_args("fastrft-test/tiny-llama", out)) == 0
    assert [r["round"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "round"] == [1]
    assert main(_args(f"fastrft-test/tiny-llama@{COMMIT}", tmp_path / "pinned")) == 0  # a revision
    assert main(["export", str(out), "--out", str(tmp_path / "export")]) == 0  # export finds the source too
    assert (tmp_path / "export" / "tokenizer.json").exists()


def test_hub_errors_are_one_line_and_write_nothing(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", str(_cache(tmp_path / "hf", tiny_llama)))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(_args("someone/not-cached", tmp_path / "a")) == 2
    err = capsys.readouterr().err
    assert "not in the Hugging Face cache" in err and "HF_HUB_OFFLINE" in err and err.count("\n") == 1
    assert main(_args("fastrft-test/tiny-llama@v9", tmp_path / "b")) == 2
    assert "fastrft-test/tiny-llama@v9" in capsys.readouterr().err
    assert main(_args("no/such/dir", tmp_path / "c")) == 2  # neither a directory nor a hub id
    assert "nor a hub id" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")
