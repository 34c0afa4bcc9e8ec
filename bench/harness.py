"""Shared benchmark harness: repeated timing (median), peak memory, throughput, device and commit.

- :func:`measure` times a callable (CUDA-synchronised on GPU) after warm-up and returns a :class:`Result`.
- :func:`peak_memory` measures the peak memory a callable adds above what was allocated before it: the
  CUDA caching allocator's peak on GPU; the process's RSS high-water mark on CPU (meaningful when each
  case runs in a fresh process, which :func:`run_isolated` provides).
- :func:`report` prints a Markdown table (for bench/RESULTS.md) and appends every row to
  ``bench/results.csv`` (ignored by git) with date, commit, device and shapes, so that each number can be
  traced to its run.
"""

from __future__ import annotations

import csv
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Callable

import torch

CSV_PATH = Path(__file__).with_name("results.csv")


def device_name(device: str = "cuda" if torch.cuda.is_available() else "cpu") -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def versions() -> str:
    parts = [f"torch {torch.__version__}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        pass
    if torch.cuda.is_available():
        parts.append(f"CUDA {torch.version.cuda}")
        try:
            drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10).stdout.strip().splitlines()
            if drv:
                parts.append(f"driver {drv[0]}")
        except (OSError, subprocess.SubprocessError):
            pass
    return ", ".join(parts)


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True).stdout.strip()
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Result:
    bench: str
    case: str
    median_s: float | None
    times_s: list[float] = field(default_factory=list)
    throughput: float | None = None
    unit: str = ""
    peak_mib: float | None = None
    shape: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    error: str = ""


def measure(bench: str, case: str, fn: Callable[[], float | None], *, device: str = "cpu", repeats: int = 5,
            warmup: int = 1, unit: str = "", work: float | None = None, shape: dict | None = None) -> Result:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs. ``fn`` may return the
    amount of work it did (tokens, FLOPs); otherwise ``work`` is used. throughput = work / median."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times, amounts = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        amount = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
        amounts.append(amount if amount is not None else work)
    med = statistics.median(times)
    known = [a for a in amounts if a is not None]
    return Result(bench, case, med, times, (statistics.median(known) / med) if known else None, unit,
                  shape=shape or {})


def _rss_mib(field_name: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory(fn: Callable[[], object], device: str) -> float:
    """MiB that ``fn`` adds at its peak above what is allocated when it starts."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _rss_mib("VmRSS")
    fn()
    return _rss_mib("VmHWM") - base  # the process high-water mark: run one case per process


def run_isolated(script: str, args: list[str], timeout: int = 1800) -> dict:
    """Run ``script args`` in a fresh Python process that prints one JSON object as its last line."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0][:200]}"}
    return json.loads(lines[-1])


def report(results: list[Result], title: str, device: str = "cpu", columns: tuple[str, ...] = ()) -> str:
    header = (f"### {title}\n\ndevice: {device_name(device)}; {versions()}; commit {git_sha()}; "
              f"date {date.today().isoformat()}\n")
    extra_cols = list(columns)
    rows = ["| " + " | ".join(["case", "median", "runs", "throughput", "peak extra MiB", *extra_cols]) + " |",
            "|---|---:|---:|---:|---:|" + "---:|" * len(extra_cols)]
    for r in results:
        if r.error:
            rows.append(f"| {r.case} | {r.error} | – | – | – |" + " – |" * len(extra_cols))
            continue
        tp = f"{r.throughput:,.2f} {r.unit}" if r.throughput is not None else "–"
        peak = f"{r.peak_mib:,.0f}" if r.peak_mib is not None else "–"
        cells = [_cell(r.extra.get(c)) for c in extra_cols]
        rows.append("| " + " | ".join([r.case, f"{r.median_s * 1e3:,.2f} ms", str(len(r.times_s)), tp, peak, *cells])
                    + " |")
    text = header + "\n" + "\n".join(rows) + "\n"
    print(text, flush=True)
    new = not CSV_PATH.exists()
    with open(CSV_PATH, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["date", "commit", "device", "bench", "case", "shape", "median_ms", "runs", "throughput",
                             "unit", "peak_extra_mib", "extra", "error"])
        for r in results:
            writer.writerow([date.today().isoformat(), git_sha(), device_name(device), r.bench, r.case,
                             json.dumps(r.shape), None if r.median_s is None else round(r.median_s * 1e3, 4),
                             len(r.times_s), r.throughput, r.unit, r.peak_mib, json.dumps(r.extra), r.error])
    return text


def _cell(x) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def result_from_dict(d: dict) -> Result:
    return Result(**{k: v for k, v in d.items() if k in Result.__dataclass_fields__})


def result_to_dict(r: Result) -> dict:
    return asdict(r)
