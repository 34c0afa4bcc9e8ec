"""`fastrft ladder --jobs N` against `--jobs 1`: wall time of the same study, and whether it gives the same numbers.

    python bench/bench_ladder.py                    # L0,L3 x 2 seeds, SmolLM2-135M: 2-4 min a study, 2 cores
    python bench/bench_ladder.py --threads 1        # both studies at 1 torch thread per run: bit-equal metrics
    python bench/bench_ladder.py --model DIR --rounds 1 --max-new-tokens 2 --test-size 4 --csv /tmp/x.csv  # smoke

The study is run twice from scratch, each in a fresh directory and a fresh process (`python -m fastrft
ladder`, as a user runs it): once with `--jobs 1` (one pair after another, in-process, torch's default
thread count) and once with `--jobs N` (N pairs at once, each in its own process with cores // N
threads). Wall time covers everything the command does, imports and model loads included; the L3 pairs
share their seed's round-0 evaluation with L0 in both, so the parallel study also shows what waiting for
it costs. The default sizing keeps the cpu-mini profile's task (SmolLM2-135M on 'What is 8 + 3?') but
cuts it to 3 rounds, evaluation at the start and the end, 8 test problems, 4 train samples and 48-token
responses.

Metrics: every pair's metrics.jsonl is compared record by record, wall-clock fields aside (time_*,
*_per_s). torch's CPU kernels round differently at different thread counts, so at default threads the two
studies may differ in the last bits of the float fields (log-prob gap, grad norm, KL, ...); the table says
which fields and by how much. `--threads T` gives every run of both studies T threads: then they must be
bit-equal. Results: a Markdown table on stdout, rows appended to bench/results.csv (--csv).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import Result, report  # noqa: E402

def untimed(record: dict) -> dict:
    """A metrics record without its wall-clock fields, which no two runs share."""
    return {k: v for k, v in record.items() if not k.startswith("time_") and not k.endswith("_per_s")}


def study(args, jobs: int, out: Path) -> float:
    """Run the study with ``--jobs jobs`` into ``out``; its wall seconds. Output goes to out/../NAME.log."""
    cmd = [sys.executable, "-m", "fastrft", "ladder", "--layers", args.layers, "--seeds", str(args.seeds),
           "--profile", "cpu-mini", "--model", args.model, "--rounds", str(args.rounds), "--eval-every",
           str(args.rounds), "--test-size", str(args.test_size), "--train-samples", str(args.train_samples),
           "--max-new-tokens", str(args.max_new_tokens), "--out", str(out), "--jobs", str(jobs), "--no-progress"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    log = out.with_suffix(".log")
    print(f"--jobs {jobs}: {' '.join(cmd[1:])}\n  (output: {log})", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-10:])
        raise SystemExit(f"--jobs {jobs} failed (exit {rc}); the end of {log}:\n{tail}")
    print(f"  {wall:.1f} s", file=sys.stderr, flush=True)
    return wall


def compare(a: Path, b: Path) -> dict:
    """Per-field differences between the two studies' metrics (wall-clock fields aside): {"equal": bool,
    "pairs": n, "records": n, "fields": {field: {"records": n, "max_abs": x, "max_rel": y}}, "other": [...]}."""
    fields: dict[str, dict] = {}
    other, records = [], 0
    runs = sorted(p.relative_to(a) for p in a.glob("*/seed-*/metrics.jsonl"))
    for rel in runs:
        ra = [untimed(json.loads(x)) for x in (a / rel).read_text().splitlines() if x.strip()]
        rb = [untimed(json.loads(x)) for x in (b / rel).read_text().splitlines() if x.strip()]
        records += len(ra)
        if len(ra) != len(rb):
            other.append(f"{rel}: {len(ra)} vs {len(rb)} records")
        for x, y in zip(ra, rb):
            for k in sorted(set(x) | set(y)):
                u, v = x.get(k), y.get(k)
                if u == v:
                    continue
                if isinstance(u, (int, float)) and isinstance(v, (int, float)):
                    d = fields.setdefault(k, {"records": 0, "max_abs": 0.0, "max_rel": 0.0})
                    d["records"] += 1
                    d["max_abs"] = max(d["max_abs"], abs(u - v))
                    d["max_rel"] = max(d["max_rel"], abs(u - v) / max(abs(u), abs(v)))
                else:
                    other.append(f"{rel} {x.get('kind')} round {x.get('round')}: {k} {u!r} vs {v!r}")
    return {"equal": not fields and not other and bool(runs), "pairs": len(runs), "records": records,
            "fields": fields, "other": other[:20]}


def verdict(diff: dict) -> str:
    if diff["equal"]:
        return f"bit-equal ({diff['pairs']} runs, {diff['records']} records)"
    parts = [f"{k} in {d['records']} records (max rel {d['max_rel']:.1e})" for k, d in sorted(diff["fields"].items())]
    return "DIFFERENT: " + "; ".join(parts + diff["other"][:3])


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="L0,L3")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="alias or HF-format directory")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per run; evaluation at the start and the end")
    ap.add_argument("--test-size", type=int, default=8)
    ap.add_argument("--train-samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--jobs", type=int, default=2, help="the parallel study's --jobs (default 2)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of every run of both studies (default: "
                                                            "unset: --jobs 1 at torch's default, children cores // N)")
    ap.add_argument("--out", help="folder for the two studies and their logs (default: a new temporary folder)")
    ap.add_argument("--csv", help="append the rows here (default bench/results.csv)")
    args = ap.parse_args()
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-ladder-"))
    root.mkdir(parents=True, exist_ok=True)
    seq, par = root / "jobs-1", root / f"jobs-{args.jobs}"
    for d in (seq, par):
        if d.exists():
            raise SystemExit(f"{d} exists; each study must start from scratch: pass a new --out")
    if os.environ.get("OMP_NUM_THREADS") and not args.threads:
        print(f"note: OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} limits the --jobs 1 study's threads",
              file=sys.stderr)
    t1 = study(args, 1, seq)
    tn = study(args, args.jobs, par)
    diff = compare(seq, par)
    shape = {"layers": args.layers, "seeds": args.seeds, "model": args.model, "rounds": args.rounds,
             "test_size": args.test_size, "train_samples": args.train_samples,
             "max_new_tokens": args.max_new_tokens, "threads": args.threads or "default"}
    same = verdict(diff)
    rows = [Result("ladder", "--jobs 1", t1, [t1], shape=shape, extra={"speed-up": 1.0}),
            Result("ladder", f"--jobs {args.jobs}", tn, [tn], shape=shape,
                   extra={"speed-up": round(t1 / tn, 2), "metrics vs --jobs 1": same})]
    title = (f"fastrft ladder --jobs: {args.layers} x {args.seeds} seeds, {args.model}, {args.rounds} rounds, "
             f"{args.test_size} test problems, {args.max_new_tokens}-token responses")
    report(rows, title, columns=("speed-up", "metrics vs --jobs 1"), csv_path=args.csv, time_unit="s")
    result = {"jobs_1_s": round(t1, 1), f"jobs_{args.jobs}_s": round(tn, 1), "speed_up": round(t1 / tn, 3),
              "metrics_equal": diff["equal"], "differences": diff, "out": str(root)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
