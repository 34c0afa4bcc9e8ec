"""metrics.jsonl and the small JSON files a study shares: writing, locking, reading.

metrics.jsonl holds one JSON object per line with ``kind`` = "round" (one per training round) or
"eval" (one per evaluation). It is flushed and fsynced after every record, so an interrupted run leaves
every completed round readable; a torn last line (a crash mid-write) is skipped by the reader.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks; the caches are then safe for one writer at a time
    fcntl = None


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


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (a temporary sibling, then a rename): a reader, or a
    crash, never sees half a file. For the small caches a study shares between its runs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock for ``path`` (an advisory ``flock`` on the sibling ``<name>.lock``).

    The study caches are read-modify-write: two runs that read, add their entry and :func:`write_json`
    at the same time would each drop the other's entry. Writers that read and write inside this block
    never lose an entry; readers need no lock (a rename is atomic). The lock is on a sibling file
    because the cache itself is replaced by every write, and a lock on a replaced file locks nothing."""
    lock = Path(path).with_name(Path(path).name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a", encoding="utf-8") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the file is closed
        yield


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

