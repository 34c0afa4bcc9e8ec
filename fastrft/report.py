"""Metrics on disk and what is made of them: the append-only metrics.jsonl, plots, the before/after table.

metrics.jsonl holds one JSON object per line with ``kind`` = "round" (one per training round) or
"eval" (one per evaluation). It is flushed and fsynced after every record, so an interrupted run leaves
every completed round readable; a torn last line (a crash mid-write) is skipped by the reader.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, allow_nan=False, default=_jsonable) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every complete record of a metrics.jsonl; a malformed line other than the last raises ValueError."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break  # torn final write of an interrupted run
            raise ValueError(f"{path} line {i + 1}: not valid JSON ({e})") from None
    return records


def eval_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind") == "eval"]


CURVES = (("train_pass1", "train Pass@1", "-", "tab:blue"), ("test_pass1", "test Pass@1 (T=1)", "-", "tab:orange"),
          ("test_greedy", "test greedy", "--", "tab:orange"))


def plot_curves(records: list[dict[str, Any]], png: str | Path, title: str = "") -> Path:
    """Train/test Pass@1 (and greedy) against the round, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = eval_records(records)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for key, label, style, color in CURVES:
        pts = [(r["round"], r[key]) for r in evals if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), style, marker="o", color=color, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png)
    plt.close(fig)
    return png


def before_after_table(records: list[dict[str, Any]], keys: tuple[str, ...] | None = None) -> str:
    """A Markdown table of every evaluation (round by round) for the metrics present."""
    evals = eval_records(records)
    if not evals:
        return "(no evaluations recorded)"
    if keys is None:
        preferred = ["train_pass1", "test_pass1", "test_greedy", "train_pass1_gsm8k", "test_pass1_gsm8k",
                     "train_response_len"]
        keys = tuple(k for k in preferred if any(k in r for r in evals))
    header = "| round | " + " | ".join(keys) + " |"
    rule = "|---:|" + "---:|" * len(keys)
    rows = [f"| {r['round']} | " + " | ".join(_fmt(k, r.get(k)) for k in keys) + " |" for r in evals]
    return "\n".join([header, rule, *rows])


def _fmt(key: str, x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.1f}" if key.endswith("_len") else f"{x:.3f}"
    return str(x)
