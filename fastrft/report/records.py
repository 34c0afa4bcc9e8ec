"""metrics.jsonl and the small JSON files a study shares: writing, locking (fastrft.lock), reading.

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

from fastrft.lock import locked  # re-exported: the caches' writers take it from here


class MetricsLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """One record; a NaN or infinite value (a reward function that never applied) is written as null,
        which JSON can hold."""
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self._f.write(json.dumps(record, allow_nan=False, default=_jsonable) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (a temporary sibling, then a rename): a reader, or a
    crash, never sees half a file. For the small caches a study shares between its runs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


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


def round_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind") == "round"]


def plural(n: int, word: str) -> str:
    """'1 seed', '3 seeds'."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"



def wall_clock(key: str) -> bool:
    """Whether a record field measures time (``time_*``, ``*_per_s``, ``wall_s``): the fields two runs of one
    configuration may differ in. Every comparison of runs (bench/same_run.py, the tests) uses this rule."""
    return key.startswith("time_") or key.endswith("_per_s") or key == "wall_s"


def untimed(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` without its wall-clock fields (:func:`wall_clock`)."""
    return {k: v for k, v in record.items() if not wall_clock(k)}
