"""bench/bench_trl.py, one RFT round through fastrft and through TRL's GRPOTrainer: its --smoke run (a tiny
random model, G = 2, 8-token responses, 2 interleaved rounds of each) must time both sides end to end, and
--device cuda must refuse in one line where there is no CUDA device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_trl.py"
IMPLS = {"fastrft", "TRL GRPOTrainer"}


def run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_smoke_times_both_implementations(tmp_path):
    pytest.importorskip("trl", reason="bench_trl.py compares against TRL: pip install 'fastrft[peers]'")
    pytest.importorskip("datasets", reason="TRL's trainers take a datasets.Dataset: pip install 'fastrft[peers]'")
    out = tmp_path / "out"
    proc = run(["--smoke", "--device", "cpu", "--threads", "1", "--out", str(out)], timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for impl in IMPLS:  # the printed table holds both rows
        assert f"| {impl}, G=2 |" in proc.stdout, proc.stdout

    data = json.loads((out / "trl.json").read_text())
    rows = {r["shape"]["impl"]: r for r in data["results"]}
    assert set(rows) == IMPLS and len(data["results"]) == 2, data["results"]
    for impl, r in rows.items():
        assert not r["error"] and r["median_s"] > 0 and r["throughput"] > 0, r
        e = r["extra"]
        assert e["gen s"] > 0 and e["fwd+bwd s"] > 0 and e["optim s"] > 0, (impl, e)
        assert e["gen s/1k tok"] > 0 and e["s/1k tok"] > e["gen s/1k tok"], (impl, e)
        rounds = e["rounds"]
        assert [x["round"] for x in rounds] == [1, 2] and e["measured rounds"] == 1  # round 1 is the warm-up
        for x in rounds:  # the phases are parts of the round, timed inside it
            assert 0 < x["tokens"] <= 2 * 8
            assert 0 < x["gen"] + x["fwd_bwd"] + x["optim"] <= x["wall"] * 1.001, (impl, x)
    ratios = {k: v for k, v in rows["TRL GRPOTrainer"]["extra"].items() if k.startswith("TRL/fastrft")}
    assert len(ratios) == 3 and all(v > 0 for v in ratios.values()), ratios
    assert any("the same ids on both sides" in n for n in data["notes"]), data["notes"]  # one prompt for both
    md = (out / "trl.md").read_text()
    assert "| fastrft, G=2 |" in md and "| TRL GRPOTrainer, G=2 |" in md and "TRL / fastrft" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_refuses_without_a_device(tmp_path):
    proc = run(["--device", "cuda", "--out", str(tmp_path / "out")], timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA" in lines[0] and "--device cpu" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()
