"""Is a refactor invisible? Compare two run directories of the same configuration, made at two commits.

    python bench/same_run.py RUN_A RUN_B

Checks, and exits non-zero on the first difference it reports:
- metrics.jsonl: the same records in the same order, every field equal except the wall-clock ones
  (``time_*``, ``*_per_s``, ``wall_s``), compared as JSON values (floats bit for bit);
- rollouts.jsonl: byte for byte;
- the exported weights (``fastrft export`` of each run into RUN/export): every tensor bit for bit;
- the checkpoint rounds kept, and config.json (but run.out).

A refactor changes nothing a user can observe (the developers' guide): this is how that is shown.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def _wall(key: str) -> bool:
    from fastrft.report.records import wall_clock  # the one rule, shared with the tests

    return wall_clock(key)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _config(run: Path) -> dict:
    """config.json without the session settings (fastrft.config.opt): config.json leaves them out since
    2026-12-07, so a run written before holds them and one written after does not; they are not the run's
    identity either way."""
    from fastrft.config import canonical, session_fields

    # A study's runs name files of the study (its difficulty cache) by path: where the study lives aside.
    text = (run / "config.json").read_text().replace(json.dumps(str(run.parent.parent))[1:-1], "<study>")
    cfg = json.loads(text)
    cfg = {section: canonical(section, values) for section, values in cfg.items()}  # renamed fields
    for section, name in session_fields():
        cfg.get(section, {}).pop(name, None)
    return cfg


def compare_metrics(a: Path, b: Path) -> list[str]:
    ra, rb = _records(a), _records(b)
    out = [] if len(ra) == len(rb) else [f"metrics.jsonl: {len(ra)} records against {len(rb)}"]
    for i, (x, y) in enumerate(zip(ra, rb)):
        keys = [k for k in dict.fromkeys([*x, *y]) if not _wall(k)]
        for k in keys:
            if x.get(k, "<absent>") != y.get(k, "<absent>"):
                out.append(f"metrics.jsonl record {i} ({x.get('kind')} round {x.get('round')}): {k} "
                           f"{x.get(k, '<absent>')!r} != {y.get(k, '<absent>')!r}")
        if [k for k in x if not _wall(k)] != [k for k in y if not _wall(k)]:
            out.append(f"metrics.jsonl record {i}: field order differs")
    return out


def compare_weights(a: Path, b: Path) -> list[str]:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    if wa.keys() != wb.keys():
        return [f"exported weights: tensor names differ ({sorted(set(wa) ^ set(wb))[:5]})"]
    return [f"exported weights: {k} differs (max |diff| {(wa[k].double() - wb[k].double()).abs().max():.3g})"
            for k in wa if wa[k].dtype != wb[k].dtype or not _same_bits(wa[k], wb[k])]


def _same_bits(x, y) -> bool:
    import torch

    return x.shape == y.shape and bool(torch.equal(x.contiguous().view(-1).view(torch.uint8),
                                                   y.contiguous().view(-1).view(torch.uint8)))


def export(run: Path) -> Path:
    dest = run / "export"
    if not (dest / "model.safetensors").exists():
        subprocess.run([sys.executable, "-m", "fastrft", "export", str(run), "--out", str(dest)], check=True)
    return dest / "model.safetensors"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    a, b = map(Path, argv)
    problems = compare_metrics(a / "metrics.jsonl", b / "metrics.jsonl")
    ra, rb = a / "rollouts.jsonl", b / "rollouts.jsonl"
    if ra.exists() != rb.exists() or (ra.exists() and ra.read_bytes() != rb.read_bytes()):
        problems.append("rollouts.jsonl differs")
    if _config(a) != _config(b):
        problems.append("config.json differs (run.out aside)")
    ca = sorted(p.name for p in (a / "checkpoints").glob("round-*")) if (a / "checkpoints").exists() else []
    cb = sorted(p.name for p in (b / "checkpoints").glob("round-*")) if (b / "checkpoints").exists() else []
    if ca != cb:
        problems.append(f"checkpoints kept: {ca} against {cb}")
    problems += compare_weights(export(a), export(b))
    n = len(_records(a / "metrics.jsonl"))
    if problems:
        print("\n".join(problems[:40]))
        return 1
    print(f"same run: {n} metrics records, rollouts.jsonl ({ra.stat().st_size if ra.exists() else 0} bytes), "
          f"checkpoints {ca}, exported weights bit for bit")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
