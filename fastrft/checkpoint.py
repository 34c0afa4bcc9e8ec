"""Checkpoints that survive a kill -9 at any instant, exact resume, and HF-format export.

A checkpoint is a directory ``<run>/checkpoints/round-NNNNNN/`` with

- ``state.pt``: the model's and the optimizer's state dicts, the round, the trainer's counters and
  histories, the selected examples, the byte lengths of ``metrics.jsonl``, ``problems.jsonl`` and ``rollouts.jsonl`` at that
  round, and every RNG state (torch CPU and CUDA, Python, numpy); per-request sampling seeds are derived
  from (seed, round), so they need no state;
- ``manifest.json``: the round and the SHA-256 of ``state.pt``.

It is written into a temporary sibling directory, each file fsynced, then renamed into place (one atomic
``rename``) and the parent fsynced, so a reader sees either the whole checkpoint or none of it. A
checkpoint whose checksum does not match (a disk fault, a hand edit) is reported and skipped in favour
of the previous one. The last ``keep`` checkpoints are kept.

A run of several ranks (torchrun, fastrft.distributed) writes a *sharded* checkpoint instead: the same
directory and manifest, but the model and AdamW state are a distributed-checkpoint (DCP) directory
``dcp/`` that every rank writes its shards into, and ``state.pt`` holds the rest (rank 0's). Rank 0
renames it into place after all ranks have written, so it is atomic the same way, and the manifest's
checksums cover the shards. DCP reshards on load, so a sharded checkpoint resumes on another number of
ranks; :func:`fastrft.export.export_run` assembles the full weights in one process.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import sys
from pathlib import Path
from typing import Any

# rng_state and set_rng_state are part of this module's API (the loop restores RNG state through it).
from fastrft.checkpoint_state import _write_state, load_state, rng_state, set_rng_state  # noqa: F401
from fastrft.errors import FastRFTError

CKPT_DIR = "checkpoints"
SHARDS = "dcp"  # a sharded checkpoint's DCP directory
_NAME = re.compile(r"round-(\d{6,})")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()






def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """(round, path) of the finished checkpoints of a run, oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def save_checkpoint(run_dir: Path, round_: int, payload: dict[str, Any], keep: int) -> Path:
    """Write ``payload`` (tensors and plain Python) as the checkpoint of ``round_``; prune to ``keep``."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(run_dir, round_)
    tmp = root / f".tmp-round-{round_:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    state = tmp / "state.pt"
    _write_state(state, payload)
    manifest = {"round": round_, "files": {"state.pt": _sha256(state)}, "format": 1}
    with open(tmp / "manifest.json", "w", encoding="utf-8") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # a rerun of the same round after a crash between rename and prune
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for _, old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final




def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def save_sharded_checkpoint(run_dir: Path, round_: int, payload: dict[str, Any], keep: int, world,
                            write_shards) -> Path:
    """The checkpoint of ``round_`` of a multi-rank run; every rank calls it. ``write_shards(path)`` writes
    the model and optimizer as DCP under ``path`` (a collective); rank 0 adds ``payload`` as state.pt, the
    manifest over every file, and renames the whole into place once all ranks have written."""
    root = Path(run_dir) / CKPT_DIR
    final = root / f"round-{round_:06d}"
    tmp = root / f".tmp-round-{round_:06d}-sharded"
    if world.main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    world.barrier()
    write_shards(tmp / SHARDS)  # DCP fsyncs each file it writes
    world.barrier()
    if world.main:
        _write_state(tmp / "state.pt", payload)
        manifest = {"round": round_, "files": {str(f.relative_to(tmp)): _sha256(f) for f in _files(tmp)},
                    "format": 2, "sharded": True, "world_size": world.size}
        with open(tmp / "manifest.json", "w", encoding="utf-8") as f:
            json.dump(manifest, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp / SHARDS)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        for _, old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    world.barrier()
    return final


def shard_dir(run_dir: Path, round_: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"round-{round_:06d}" / SHARDS


def load_round(run_dir: Path, round_: int) -> tuple[int, dict[str, Any]]:
    """The checkpoint of ``round_`` (already verified by the rank that chose it)."""
    path = Path(run_dir) / CKPT_DIR / f"round-{round_:06d}"
    return round_, load_state(path / "state.pt")


def checkpoint_dir(run_dir: Path, round_: int) -> Path:
    """Where the checkpoint of ``round_`` lives (written or not)."""
    return Path(run_dir) / CKPT_DIR / f"round-{round_:06d}"


def check_layout(run_dir: Path, round_: int, payload: dict[str, Any], shards: bool) -> None:
    """Refuse, with what to do, a checkpoint this process cannot load: a plain run's checkpoint (whole
    state dicts in state.pt) where the run shards its weights (a full fine-tune under torchrun), or a sharded
    one where it does not. ``shards``: whether this run shards (a LoRA run never does)."""
    sharded = "model" not in payload
    if sharded and not shards:
        raise FastRFTError(f"{run_dir}: the checkpoint of round {round_} is sharded (written by a "
                           f"{payload.get('world_size', '?')}-process torchrun job); resume it under torchrun, "
                           "e.g. torchrun --nproc-per-node 2 -m fastrft train ... (any --nproc-per-node, 1 included: "
                           "DCP reshards), or export it with fastrft export")
    if not sharded and shards:
        raise FastRFTError(f"{run_dir}: the checkpoint of round {round_} was written by a plain (non-torchrun) run; "
                           "resume it with a plain fastrft train, or start the torchrun job in a new --out")


def verify(path: Path) -> str | None:
    """None when the checkpoint at ``path`` is whole; otherwise what is wrong with it."""
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        return f"manifest.json unreadable ({e.__class__.__name__}: {e})"
    for name, digest in files.items():
        f = path / name
        if not f.exists():
            return f"{name} is missing"
        if _sha256(f) != digest:
            return f"{name} fails its SHA-256 check"
    return None






def load_latest(run_dir: Path, warn=None, damaged: list | None = None) -> tuple[int, dict[str, Any]] | None:
    """The newest whole checkpoint of a run as (round, payload), or None. Damaged ones are reported
    through ``warn`` (default: stderr) and skipped; they are left on disk for inspection. ``damaged``
    collects (checkpoint directory, problem) of each one skipped."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    for round_, path in reversed(checkpoint_dirs(run_dir)):
        problem = verify(path)
        if problem is None:
            try:
                return round_, load_state(path / "state.pt")
            except pickle.UnpicklingError as e:
                problem = f"state.pt refused: {e}"
            except Exception as e:  # noqa: BLE001 - whole on disk but unreadable (another torch, a bug)
                problem = f"state.pt cannot be loaded: {e.__class__.__name__}: {e}"
        if damaged is not None:
            damaged.append((path, problem))
        warn(f"fastrft: checkpoint {path} is damaged ({problem}); skipped")
    return None


def clean_partial(run_dir: Path) -> None:
    """Remove temporary directories left by a checkpoint write that was killed."""
    root = Path(run_dir) / CKPT_DIR
    if root.is_dir():
        for p in root.glob(".tmp-round-*"):
            shutil.rmtree(p, ignore_errors=True)


def truncate(path: Path, size: int) -> None:
    """Cut an append-only log back to ``size`` bytes (the records after a checkpoint are redone)."""
    if path.exists() and path.stat().st_size > size:
        with open(path, "r+b") as f:
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())
    elif not path.exists() and size:
        raise FastRFTError(f"{path} is missing but the checkpoint expects {size} bytes of it; the run directory "
                           "was modified by hand")


#: Files of a model directory that hold weights (export copies the others).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
