"""bench/gpu_suite.sh, the one-call GPU pass, kept working between GPU runs.

Its --cpu-smoke mode runs every stage end to end on tiny shapes on CPU (about a minute of wall time on a
2-core machine); the checks are on what it leaves in its output folder: at most 8 plain files (what the
device tool brings back), a summary with a table of numbers for every stage, the raw JSON and CSV rows.
Without --cpu-smoke, on a machine without CUDA, it must refuse in one line before writing anything.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_suite.sh"
OUT_FILES = {"summary.md", "suite.log", "pytest.txt", "logprob.json", "round.json", "rollout.json", "results.csv",
             "suite.tar.gz"}
SECTIONS = ("GPU tests", "LM-head log-prob + PG loss", "Round time", "Rollout throughput")
NUMBER = re.compile(r"^-?[\d,]+(\.\d+)?(e-?\d+)?( [\w/]+)?$")


def run_suite(args: list[str], tmp: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def sections(summary: str) -> dict[str, str]:
    out = {}
    for part in summary.split("\n## ")[1:]:
        title, _, body = part.partition("\n")
        out[title.strip()] = body
    return out


def data_rows(body: str) -> list[list[str]]:
    """The cells of every Markdown table row that is neither a header nor a separator."""
    rows = [ln for ln in body.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in rows]
    return [c for i, c in enumerate(cells) if not (i + 1 < len(cells) and set("".join(cells[i + 1])) <= set("-:"))
            and not set("".join(c)) <= set("-:")]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    tmp = tmp_path_factory.mktemp("gpu-suite")
    out = tmp / "out"
    proc = run_suite([str(out), "--cpu-smoke"], tmp, timeout=300)
    return proc, out


def test_cpu_smoke_runs_every_stage(smoke):
    proc, out = smoke
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # What the device tool brings back: at most 8 files, no deeper than the folder itself.
    assert {p.name for p in out.iterdir()} == OUT_FILES
    assert all(p.is_file() for p in out.iterdir())
    summary = (out / "summary.md").read_text()
    parts = sections(summary)
    stages = {row[0]: row[1] for row in data_rows(parts["Stages"])}
    assert stages == {"tests": "ok", "logprob": "ok", "round": "ok", "rollout": "ok"}, parts["Stages"]
    for title in SECTIONS:
        rows = data_rows(parts[title])
        assert rows, f"section {title!r} has no table:\n{parts[title]}"
        # Every row measured something: the second column (a count, or a median time) is a number.
        for row in rows:
            assert NUMBER.match(row[1]), f"{title}: {row}"
    assert int(dict(data_rows(parts["GPU tests"]))["collected"]) > 0
    assert parts["Dropped"].strip() == "nothing"


def test_cpu_smoke_raw_rows(smoke):
    proc, out = smoke
    assert proc.returncode == 0
    import importlib.util

    # cublas-3mm, naive, reference; and liger where its (optional) package is installed
    logprob_cases = 3 + (importlib.util.find_spec("liger_kernel") is not None)
    for name, cases in (("logprob", logprob_cases), ("round", 2), ("rollout", 9)):
        data = json.loads((out / f"{name}.json").read_text())
        assert len(data["results"]) == cases, data["results"]
        assert all(not r["error"] and r["median_s"] > 0 and r["throughput"] > 0 for r in data["results"])
        assert data["dropped"] == []
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["bench"] for r in rows} == {"logprob", "round", "rollout"}
    round_rows = json.loads((out / "round.json").read_text())["results"]
    for r in round_rows:  # the phases of a round are the trainer's own timers, and add up to less than it
        phases = r["extra"]["generate s"] + r["extra"]["reward s"] + r["extra"]["update s"]
        assert 0 < phases <= r["median_s"] * 1.05
        assert r["extra"]["response tokens"] == 8 * r["shape"]["G"]  # no EOS: every response runs its budget
    with tarfile.open(out / "suite.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"logprob.md", "round.md", "rollout.md", "suite.txt", "stages.tsv"} <= names
    assert "stage rollout: ok" in (out / "suite.log").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_mode_refuses_without_cuda(tmp_path):
    proc = run_suite([str(tmp_path / "out")], tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "no CUDA device" in lines[0] and "--cpu-smoke" in lines[0]
    assert not (tmp_path / "out").exists()


def test_usage_errors(tmp_path):
    for args in ([], ["a", "b"], [str(tmp_path), "--budget", "soon"], [str(tmp_path), "--frobnicate"]):
        proc = run_suite(args, tmp_path, timeout=30)
        assert proc.returncode == 2, args
        assert proc.stderr.startswith(("usage:", "gpu_suite.sh:")), proc.stderr


def test_budget_drops_what_does_not_fit():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from harness import Budget, pytest_counts
    finally:
        sys.path.pop(0)
    b = Budget(10.0)
    assert b.admit("small", 2.0) and b.admit("unknown")
    assert not b.admit("N=65536 triton", 60.0)
    assert b.dropped and b.dropped[0].startswith("N=65536 triton (estimated 60 s")
    assert Budget(None).admit("anything", 1e9) and Budget(None).timeout() is None
    assert pytest_counts("x\n3 failed, 40 passed, 2 skipped in 81.20s (0:01:21)\n") == {
        "failed": 3, "passed": 40, "skipped": 2, "wall s": 81.2}
    assert pytest_counts("281 tests collected in 0.88s") == {"collected": 281, "wall s": 0.88}
