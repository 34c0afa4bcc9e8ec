"""Multi-process checks on one machine, for a lent GPU (or a CPU smoke pass).

    python bench/bench_dist.py --out DIR [--device cuda|cpu] [--shape qwen2.5-0.5b] [--budget S] [--smoke]

1. torchrun world size 1: ``torchrun --standalone --nproc-per-node 1 -m fastrft train`` on a random-weight
   model (NCCL on CUDA, gloo on CPU: the distributed path, FSDP2 and DCP checkpoints, at one rank), then
   ``fastrft export`` of its sharded checkpoint. It also warms Triton's on-disk kernel cache, so the
   timings of step 2 do not pay compilation.
2. ``fastrft ladder --layers L0,L3 --seeds 2`` with ``--jobs 1``, then with ``--jobs 2`` (two runs sharing
   the device), each in a fresh directory: the wall times, the speed-up, and whether every pair's
   metrics.jsonl is the same in both (wall-clock fields aside).

Writes DIR/dist.json (every command, its exit status, wall time and the last lines of its output) and
DIR/dist.md (the table). Random weights rarely emit EOS, so every response runs to --max-new-tokens:
the timings measure a fixed amount of work, not a model's behaviour.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def _run(cmd: list[str], timeout: float, env: dict) -> dict:
    t0 = time.monotonic()
    # A session of its own, so that a timeout ends the command's children too (a ladder's jobs hold GPU
    # memory that the next step would otherwise find taken).
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=max(timeout, 1))
        rc = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        rc = 124
    return {"cmd": " ".join(cmd), "rc": rc, "wall_s": round(time.monotonic() - t0, 2), "tail": out[-3000:]}


def _deterministic(path: Path) -> list[dict]:
    from fastrft.report import read_metrics

    return [{k: v for k, v in r.items() if not (k.startswith("time_") or k.endswith("_per_s"))}
            for r in read_metrics(path)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default=None, help="cuda (default when available) | cpu")
    ap.add_argument("--shape", default=None, help="random-weight shape (default qwen2.5-0.5b on CUDA, tiny on CPU)")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for everything")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU smoke pass)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--skip-torchrun", action="store_true", help="only the ladder comparison")
    args = ap.parse_args()
    t_start = time.monotonic()
    import torch

    from harness import write_model_dir

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = args.shape or ("qwen2.5-0.5b" if device == "cuda" and not args.smoke else "tiny")
    rounds = args.rounds or (1 if args.smoke else 6)
    tokens = args.max_new_tokens or (8 if args.smoke else 128)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_dist."))  # model weights and run dirs stay out of DIR
    model = write_model_dir(shape, "fp32", device, work / f"model-{shape}")
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    if device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    common = ["--model", str(model), "--device", device, "--rounds", str(rounds), "--max-new-tokens", str(tokens),
              "--test-size", "8", "--train-samples", "4", "--no-progress", "--log-samples", "0"]
    left = lambda: args.budget - (time.monotonic() - t_start)  # noqa: E731
    results: dict = {"device": device, "shape": shape, "rounds": rounds, "max_new_tokens": tokens, "steps": {}}

    def save():
        (out / "dist.json").write_text(json.dumps(results, indent=1))

    py = sys.executable
    run_dir = work / "torchrun-ws1"
    if not args.skip_torchrun:
        results["steps"]["torchrun_ws1"] = _run(
        [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "fastrft", "train", *common,
         "--group-size", "8", "--save-every", "2", "--eval-every", "0", "--out", str(run_dir)], left() * 0.4, env)
    if results["steps"].get("torchrun_ws1", {}).get("rc") == 0:
        ckpts = sorted((run_dir / "checkpoints").glob("round-*"))
        results["steps"]["torchrun_ws1"]["sharded_checkpoint"] = bool(ckpts) and (ckpts[-1] / "dcp" / ".metadata").exists()
        results["steps"]["export"] = _run([py, "-m", "fastrft", "export", str(run_dir), "--out", str(work / "export")],
                                          min(120, left()), env)
    save()

    times = {}
    for jobs in (1, 2):
        d = work / f"ladder-jobs{jobs}"
        # A fixed token budget and KV-cache share: automatic ones follow the free memory, which two jobs
        # sharing a GPU see differently, and the runs must do the same work to be compared.
        r = _run([py, "-m", "fastrft", "ladder", "--layers", "L0,L3", "--seeds", "2", "--profile", "paper", *common,
                  "--eval-every", "0", "--out", str(d), "--jobs", str(jobs), "--max-tokens-per-step", "8192",
                  *(["--kv-cache-memory", "0.25"] if device == "cuda" else [])],
                 left() * (0.6 if jobs == 1 else 0.95), env)
        results["steps"][f"ladder_jobs{jobs}"] = r
        times[jobs] = r["wall_s"] if r["rc"] == 0 else None
        save()
    if times.get(1) and times.get(2):
        results["speedup_jobs2"] = round(times[1] / times[2], 3)
        same = {}
        for m in sorted((work / "ladder-jobs1").glob("*/seed-*/metrics.jsonl")):
            rel = m.relative_to(work / "ladder-jobs1")
            other = work / "ladder-jobs2" / rel
            same[str(rel.parent)] = other.exists() and _deterministic(m) == _deterministic(other)
        results["metrics_equal"] = same
    save()
    rows = [f"| {name} | {s['rc']} | {s['wall_s']:.1f} |" for name, s in results["steps"].items()]
    text = (f"# bench_dist: {device}, random-weight {shape}, {rounds} rounds, {tokens}-token responses\n\n"
            "| step | exit | wall s |\n|---|---:|---:|\n" + "\n".join(rows) + "\n\n"
            f"ladder L0,L3 x 2 seeds: --jobs 1 {times.get(1)} s, --jobs 2 {times.get(2)} s, speed-up "
            f"{results.get('speedup_jobs2')}; metrics equal per pair: {results.get('metrics_equal')}\n"
            f"torchrun world size 1 wrote a sharded (DCP) checkpoint: "
            f"{results['steps'].get('torchrun_ws1', {}).get('sharded_checkpoint')}\n")
    (out / "dist.md").write_text(text)
    print(text)
    sys.exit(0 if all(s["rc"] == 0 for s in results["steps"].values()) else 1)


if __name__ == "__main__":
    main()
