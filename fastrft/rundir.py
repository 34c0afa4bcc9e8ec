"""The run directory: whether ``--out`` can be written, what it already holds, and how a run that
cannot resume starts over without dropping what it recorded.

A run directory holds config.json, the logs (metrics.jsonl, problems.jsonl, prompts.jsonl, rollouts.jsonl),
checkpoints/ and summary.json (see the README). Rerunning into it resumes the run; these functions decide
how, before the trainer loads anything, and refuse with one line whenever the alternative would overwrite
or drop records.
"""

from __future__ import annotations

import enum
import json
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from fastrft.errors import ConfigError

#: The logs a run appends to; a checkpoint records their sizes, and a resume cuts them back to those.
LOGS = ("metrics.jsonl", "rollouts.jsonl", "problems.jsonl", "prompts.jsonl")

#: Config fields that change nothing a run computes; a resume may differ in them freely. The token budget
#: only changes memory (up to rounding: it cuts a step into micro-batches whose gradients add up), so a
#: run that ran out of memory can resume with a smaller one.
# What a resume compares is the run's identity: config.json, which holds no session setting (fastrft.config.opt:
# where the run lives, its display, threads, report sinks). So a run started without --out resumes with --out
# runs/train-<stamp>, and a run directory spelled another way (./r, r/, /abs/r) or moved resumes as is.


def check_writable(out: Path) -> None:
    """Refuse an --out that is a file or cannot be written, before anything loads or is written."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out (--out) {out} is a file, not a directory; pass a directory (it is created if "
                          "missing)")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"out (--out) {out}: {probe} is a file, not a directory; choose another path")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise ConfigError(f"out (--out) {out}: cannot write into {probe} ({e.strerror}); choose a writable "
                          "directory") from None


class RunDir(enum.Enum):
    """What a run directory holds for the requested config (:func:`existing_run`)."""

    NEW = "new"  # nothing: a new run
    RESUME = "resume"  # this run, unfinished
    COMPLETE = "complete"  # this run, finished
    FORCED = "forced"  # another config, and --force was given
    UNSTARTED = "unstarted"  # another config of a run that failed before its first round, which this one replaces

    @property
    def has_run(self) -> bool:
        """Whether a run there is continued (restored from a checkpoint)."""
        return self in (RunDir.RESUME, RunDir.FORCED, RunDir.UNSTARTED)

    @property
    def writes_config(self) -> bool:
        """Whether this run writes config.json (the old one, if any, is kept beside it)."""
        return self in (RunDir.NEW, RunDir.FORCED, RunDir.UNSTARTED)


def existing_run(out_dir: Path, requested: dict[str, Any], force: bool) -> RunDir:
    """What ``out_dir`` holds (:class:`RunDir`). A differing config is refused with its diff unless --force
    is given or the run there never started."""
    cfg_file = out_dir / "config.json"
    if not cfg_file.exists():
        if (out_dir / "metrics.jsonl").exists():
            raise ConfigError(f"out (--out) {out_dir} holds a metrics.jsonl but no config.json; choose a new "
                              "directory so nothing recorded there is overwritten")
        return RunDir.NEW
    try:
        stored = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_file}: not valid JSON ({e}); choose a new --out") from None
    diff = config_diff(stored, requested)
    if diff:
        if not force and _unstarted(out_dir):
            print(f"fastrft: {out_dir} holds a run that stopped before its first round (nothing but a base "
                  "evaluation recorded, no checkpoint); starting it over with the requested config, keeping the "
                  "old config.json and records beside the new ones", file=sys.stderr)
            return RunDir.UNSTARTED
        if not force:
            raise ConfigError(f"out (--out) {out_dir} holds a run with another config; refusing to resume "
                              f"into it. Differences (stored -> requested):\n{diff}\nUse a new --out, or pass "
                              "--force to resume it with the requested config (the old config.json is kept).")
        return RunDir.FORCED
    summary = out_dir / "summary.json"
    if summary.exists():
        try:
            if json.loads(summary.read_text()).get("complete"):
                return RunDir.COMPLETE
        except json.JSONDecodeError:
            pass
    return RunDir.RESUME


def base_eval_only(out_dir: Path) -> bool:
    """metrics.jsonl holds the base model's evaluation and nothing else: the run stopped in round 1."""
    records = _records(out_dir / "metrics.jsonl")
    return bool(records) and all(r.get("kind") == "eval" and r.get("round") == 0 for r in records)


def _records(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    except (OSError, json.JSONDecodeError):
        return [{}]  # unreadable: counts as something other than a base evaluation


def _unstarted(out_dir: Path) -> bool:
    """No checkpoint, and no record but the round-0 evaluation: a run that failed before its first round
    (a bad flag found late, a reward that broke), which the corrected command may take over."""
    from fastrft.checkpoint import checkpoint_dirs

    if checkpoint_dirs(out_dir) or _count_lines(out_dir / "rollouts.jsonl"):
        return False
    metrics = out_dir / "metrics.jsonl"
    try:
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] \
            if metrics.exists() else []
    except (OSError, json.JSONDecodeError):
        return False
    return all(r.get("kind") == "eval" and r.get("round") == 0 for r in records)


def config_diff(stored: dict[str, Any], requested: dict[str, Any]) -> str:
    """The fields that differ between two config dicts, one per line: the session settings (which a
    config.json written before they were left out of it still holds) and the fields a resume may change are
    not compared."""
    lines = []
    from fastrft.config import LEGACY_DTYPES, TrainConfig, canonical, resumable_fields, session_fields

    skip = session_fields() | resumable_fields()

    # A field added after a run was written is absent from its config.json: it ran with the default.
    defaults = TrainConfig().to_dict()
    for section in sorted(set(stored) | set(requested)):
        a, b = canonical(section, stored.get(section, {})), requested.get(section, {})
        if section == "model" and "dtype" in a:  # written before --precision replaced --dtype
            a = {**{k: v for k, v in a.items() if k != "dtype"},
                 "precision": a.get("precision", LEGACY_DTYPES.get(a["dtype"], a["dtype"]))}
        for name in sorted(set(a) | set(b)):
            if (section, name) in skip:
                continue
            default = defaults.get(section, {}).get(name, "<absent>")
            va, vb = a.get(name, default), b.get(name, default)
            if isinstance(va, list):
                va = tuple(va)
            if isinstance(vb, list):
                vb = tuple(vb)
            if va != vb:
                lines.append(f"  {section}.{name}: {va!r} -> {vb!r}")
    return "\n".join(lines)


def start_over(out_dir: Path, damaged: list[tuple], force: bool) -> None:
    """No usable checkpoint: start afresh if nothing was recorded, or with ``force``, keeping the old records
    beside the new ones as *.before-<time>.jsonl; otherwise refuse, saying what was found. ``damaged``:
    (checkpoint directory, problem) of each damaged checkpoint."""
    from fastrft.report.records import plural

    logs = [out_dir / name for name in LOGS]
    records = sum(_count_lines(p) for p in logs)
    if records and not force:
        if damaged:
            each = ", ".join(f"{Path(path).name}: {problem}" for path, problem in damaged)
            found = (f"its only checkpoint is damaged ({each})" if len(damaged) == 1 else
                     f"all {len(damaged)} of its checkpoints are damaged ({each})")
        else:
            found = "no checkpoint (the run crashed or was killed before writing its first one)"
        raise ConfigError(f"out (--out) {out_dir} holds {plural(records, 'recorded line')} ({', '.join(LOGS)}) "
                          f"but {found}, so the run cannot continue from them; nothing was "
                          "changed. Pass --force to start it over (the old records are kept as "
                          "*.before-<time>.jsonl), or use a new --out")
    when = stamp()
    for p in logs:
        if _count_lines(p):
            kept = p.with_name(f"{p.stem}.before-{when}{p.suffix}")
            p.rename(kept)
            print(f"fastrft: starting {out_dir} over; its old records are in {kept}", file=sys.stderr)
        elif p.exists():
            p.unlink()


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def is_complete(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished run (its summary.json says complete)."""
    try:
        return bool(json.loads((Path(run_dir) / "summary.json").read_text()).get("complete"))
    except (OSError, json.JSONDecodeError):
        return False


def stamp() -> str:
    """A timestamp for the names of files kept aside (config.before-<time>.json and the like)."""
    return f"{datetime.now():%Y%m%d-%H%M%S}"
