"""``fastrft ladder --jobs N``: pairs in parallel processes give the sequential ladder's results, the
shared caches survive concurrent writers, and bad values or failed pairs are reported by name."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from fastrft.cli import main
from fastrft.report import read_metrics
from fastrft.report.records import untimed

ROOT = Path(__file__).resolve().parents[2]


def _study(model, out, *extra):
    # --threads 1 in both studies: torch's CPU results depend on the thread count in the last bits (the
    # rollout-vs-trainer log-prob gap of this tiny model, every float of a 135M one), so a child (cores
    # // N threads) matches the in-process run only at equal thread counts.
    return ["ladder", "--layers", "L0,L3", "--seeds", "1", "--profile", "paper", "--model", str(model),
            "--rounds", "3", "--max-new-tokens", "2", "--eval-every", "1", "--test-size", "4", "--train-samples", "8",
            "--lr", "3e-3", "--threads", "1", "--out", str(out), *extra]


def test_jobs_give_the_sequential_ladder(tiny_llama, tmp_path, capsys):
    """L3 shares L0's round-0 evaluation: in parallel it waits for L0 to store it, so it records
    shared_from as it does sequentially, and every record, config.json and ladder.md come out the same."""
    seq, par = tmp_path / "seq", tmp_path / "par"
    assert main(_study(tiny_llama, seq)) == 0
    capsys.readouterr()
    assert main(_study(tiny_llama, par, "--jobs", "2")) == 0
    err = capsys.readouterr().err
    assert re.search(r"\[ladder\] L0-minimal seed 0 done in \d+ s", err)
    assert re.search(r"\[ladder\] L3-negative-reward seed 0 done in \d+ s", err)
    for run in ("L0-minimal/seed-0", "L3-negative-reward/seed-0"):
        a, b = read_metrics(seq / run / "metrics.jsonl"), read_metrics(par / run / "metrics.jsonl")
        assert len(a) == len(b) == 7  # evaluations after rounds 0-3, and 3 rounds
        assert [untimed(r) for r in a] == [untimed(r) for r in b], run
        # config.json as the sequential ladder writes it, but the paths; no session setting (the bars) in it
        cfg_a, cfg_b = ((d / run / "config.json").read_text().replace(str(d), "STUDY") for d in (seq, par))
        assert cfg_a == cfg_b and "progress" not in json.loads(cfg_b)["run"]
        assert not (par / run / "checkpoints").exists()
        log = (par / run / "job.log").read_text()
        assert f"[eval] {run} round 3" in log and "\r" not in log and "round/s" not in log  # no bars
    assert read_metrics(par / "L3-negative-reward/seed-0/metrics.jsonl")[0]["shared_from"] == "L0-minimal/seed-0"
    assert "shared_from" not in read_metrics(par / "L0-minimal/seed-0/metrics.jsonl")[0]
    assert len(json.loads((par / "base-eval.json").read_text())) == 1
    minutes = re.compile(r"\d+\.\d min")  # the wall / run column
    assert minutes.sub("T", (seq / "ladder.md").read_text()) == minutes.sub("T", (par / "ladder.md").read_text())


def test_each_child_gets_its_share_of_the_cores_or_a_gpu(monkeypatch):
    from fastrft import ladder_jobs
    from fastrft.config import ModelConfig, RunConfig, TrainConfig

    monkeypatch.setattr(ladder_jobs, "cpu_cores", lambda: 8)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "untouched")

    def env(slot, jobs, gpus, device="auto", threads=0):
        cfg = TrainConfig(model=ModelConfig(device=device), run=RunConfig(threads=threads))
        e, _ = ladder_jobs.child_env(cfg, slot, jobs, gpus)
        return e.get("OMP_NUM_THREADS"), e.get("MKL_NUM_THREADS"), e["CUDA_VISIBLE_DEVICES"]

    assert env(0, 3, None) == ("2", "2", "untouched")  # 8 cores // 3 jobs
    assert env(5, 12, None) == ("1", "1", "untouched")  # more jobs than cores: one thread each
    assert env(0, 2, None, threads=3) == ("3", "3", "untouched")  # --threads wins
    assert env(3, 4, ["0", "1"])[2] == "1"  # slot k -> the k-th GPU modulo their number
    assert env(4, 8, ["GPU-a", "GPU-b", "GPU-c"], device="cuda")[2] == "GPU-b"  # as CUDA_VISIBLE_DEVICES spells them
    assert env(1, 2, ["0", "1"], device="cpu")[::2] == ("4", "untouched")  # a CPU run on a GPU machine


def test_jobs_below_one_are_refused(tmp_path, capsys):
    for jobs in ("0", "-2"):
        out = tmp_path / f"study{jobs}"
        assert main(["ladder", "--layers", "L0", "--seeds", "1", "--profile", "paper", "--out", str(out),
                     "--jobs", jobs]) == 2
        err = capsys.readouterr().err
        assert "jobs (--jobs) must be an integer >= 1" in err and f"got {jobs}" in err
        assert not out.exists()  # refused before anything was written


def test_a_failed_pair_is_named_with_its_log(tmp_path, capsys):
    """Both pairs start (different seeds share nothing), both fail to load the model; the error names
    each pair and quotes the end of its job.log."""
    out = tmp_path / "study"
    missing = tmp_path / "no-such-model"
    assert main(["ladder", "--layers", "L0", "--seeds", "2", "--profile", "paper", "--model", str(missing),
                 "--rounds", "1", "--out", str(out), "--jobs", "2"]) == 2
    err = capsys.readouterr().err
    assert "ladder: 2 pair(s) failed" in err
    for s in (0, 1):
        log = out / f"L0-minimal/seed-{s}/job.log"
        assert f"L0-minimal seed {s} (L0-minimal/seed-{s}) exited with code 2; its log {log} ends with:" in err
        assert "fastrft: error:" in log.read_text() and str(missing) in log.read_text()
    assert "rerun the same command" in err


WRITER = textwrap.dedent("""
    import os, sys, time
    from fastrft.data.selection import DifficultyCache
    from fastrft.evaluate import BaseEvalCache

    folder, me, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    while not os.path.exists(os.path.join(folder, "go")):
        time.sleep(0.002)
    evals = BaseEvalCache(os.path.join(folder, "base-eval.json"))
    counts = DifficultyCache(os.path.join(folder, "difficulty.json"), {"model": "m"})
    for i in range(n):
        evals.put(f"{me}-{i}", {"test_pass1": i / n}, run=me, problems=[{"id": str(i)}])
        counts.update({f"{me}-{i}": i})
""")


def test_concurrent_cache_writers_lose_nothing(tmp_path):
    """Four processes add 40 entries each to both study caches at the same time; every entry is there.
    (Without the lock, a writer that read the file before another's write drops that entry.)"""
    writers, n = [f"w{k}" for k in range(4)], 40
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), me, str(n)], cwd=ROOT) for me in writers]
    time.sleep(0.5)
    (tmp_path / "go").touch()
    assert [p.wait(timeout=120) for p in procs] == [0] * len(writers)
    want = {f"{me}-{i}" for me in writers for i in range(n)}
    evals = json.loads((tmp_path / "base-eval.json").read_text())
    assert set(evals) == want
    assert all(evals[k]["run"] == k.split("-")[0] for k in evals)
    counts = json.loads((tmp_path / "difficulty.json").read_text())
    assert counts["key"] == {"model": "m"} and set(counts["correct"]) == want
