"""Shared benchmark harness: repeated timing with the median, peak memory, device and commit.

Every benchmark script builds a list of ``Result`` rows with :func:`measure` and hands them to
:func:`report`, which prints a Markdown table (ready for bench/RESULTS.md) and appends JSON lines to
``bench/results.jsonl`` (ignored by git) so that numbers can be traced back to a run.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Callable

import torch


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True).stdout.strip()
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Result:
    bench: str
    case: str
    median_s: float
    times_s: list[float]
    throughput: float | None = None  # units below
    unit: str = ""
    extra: dict = field(default_factory=dict)


def measure(bench: str, case: str, fn: Callable[[], float | None], *, repeats: int = 3, warmup: int = 1,
            unit: str = "", work: float | None = None) -> Result:
    """Time ``fn`` ``repeats`` times after ``warmup`` calls. ``fn`` may return the amount of work done
    (e.g. tokens); otherwise ``work`` is used. Throughput = work / median time."""
    for _ in range(warmup):
        fn()
    times, amounts = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        amount = fn()
        times.append(time.perf_counter() - start)
        amounts.append(amount if amount is not None else work)
    med = statistics.median(times)
    amount = statistics.median(a for a in amounts if a is not None) if any(a is not None for a in amounts) else None
    return Result(bench, case, med, times, None if amount is None else amount / med, unit)


def report(results: list[Result], title: str) -> str:
    header = (f"### {title}\n\ndevice: {device_name()}; torch {torch.__version__}; commit {git_sha()}; "
              f"date {date.today().isoformat()}; peak RSS {peak_rss_mib():.0f} MiB\n")
    rows = ["| case | median | runs | throughput |", "|---|---:|---:|---:|"]
    for r in results:
        tp = f"{r.throughput:,.1f} {r.unit}" if r.throughput is not None else "–"
        rows.append(f"| {r.case} | {r.median_s:.3f} s | {len(r.times_s)} | {tp} |")
    text = header + "\n" + "\n".join(rows) + "\n"
    print(text)
    with open(Path(__file__).with_name("results.jsonl"), "a") as f:
        for r in results:
            f.write(json.dumps({**asdict(r), "device": device_name(), "commit": git_sha(),
                                "date": date.today().isoformat()}) + "\n")
    return text
