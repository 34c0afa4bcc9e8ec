"""Rollout throughput: fastrft's paged engine against transformers' generate (static cache).

    python bench/bench_rollout.py                         # GPU: Qwen2.5-0.5B / 1.5B shapes, bf16
    python bench/bench_rollout.py --device cpu --quick    # CPU smoke run on a small random model
    python bench/bench_rollout.py --shapes qwen2.5-1.5b --budget 120 --out DIR   # as bench/gpu_suite.sh runs it

Random-weight models with the real architectures (no checkpoint needed). Workloads:
  (a) 256 independent prompts of random length 100-1024, responses of random length 100-1024, EOS
      ignored; also its first 1 and 64 prompts, to compare with transformers at batch 1, 64 and 256;
  (b) the RFT shape: 1 prompt of 512 tokens x G = 256 samples of 1024 tokens, for both.
Throughput counts the response tokens each request asked for, divided by wall time (transformers pads
a batch to its longest request; its padding tokens are not counted). Also reported: the KV memory of
(b) with prompt sharing (peak blocks in use, measured) and without (computed), and batch-1 decode
latency against the weight-read bound (model bytes / copy bandwidth measured in the same run).
Each case runs in its own process (--in-process: all in this one, sparing a process start, imports
and CUDA set-up per case).

transformers runs eagerly by default (disable_compile=True): with a static cache on CUDA it would
otherwise compile its forward for every new batch shape, inside the timed call. --hf-compile lets it
compile, and warms up with the timed call itself, which doubles that case's cost.

Cases run smallest first: the batch-1 latency, then workload (a) at each batch size (fastrft, then
transformers), then at the largest size fastrft on (a) and (b) before transformers on them. With --budget,
each case is estimated from the time per decode step measured at the nearest smaller batch of the same
provider (scaled by the square root of the batch ratio) and dropped when it would not fit, so the
largest cases go first; a case without an estimate starts only with time left and is stopped at the
budget's end (in-process: at the caller's). After a CUDA error, which leaves a process's CUDA context
unusable, --in-process runs the remaining cases in fresh processes. --out writes rollout.md, rollout.json
and results.csv into a folder after every case.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import (SHAPES, Budget, Result, build_model, cuda_broken, hf_config, report, run_isolated,  # noqa: E402
                     table, write_outputs)

# Sizes: prompt/response length range and count of (a); prompt length, response length and G of (b);
# batch-1 latency tokens; the batch sizes compared with transformers.
SIZES = {
    "full": dict(lo=100, hi=1024, count=256, plen=512, out=1024, g=256, latency=512, batches=(1, 64, 256)),
    "quick": dict(lo=16, hi=64, count=32, plen=32, out=64, g=32, latency=64, batches=(1, 8, 32)),
    "smoke": dict(lo=4, hi=8, count=8, plen=8, out=8, g=4, latency=8, batches=(1, 4, 8)),
}


def workload(kind: str, size: str, seed: int = 0):
    """(prompts, response budgets, n)."""
    z = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    vocab = 2000
    if kind == "b":
        return [torch.randint(1, vocab, (z["plen"],), generator=g).tolist()], [z["out"]], z["g"]
    lens = torch.randint(z["lo"], z["hi"] + 1, (z["count"],), generator=g).tolist()
    outs = torch.randint(z["lo"], z["hi"] + 1, (z["count"],), generator=g).tolist()
    prompts = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lens]
    return prompts, outs, 1


def requested_tokens(kind: str, batch: int, size: str) -> int:
    _, outs, n = workload(kind, size)
    return sum(outs[:batch]) * n


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_engine(shape, dtype, device, kind, batch, size, hf_compile=False) -> dict:
    from fastrft.engine import Engine, EngineConfig

    model = build_model(shape, dtype, device)
    prompts, outs, n = workload(kind, size)
    prompts, outs = prompts[:batch], outs[:batch]
    engine = Engine(model, config=EngineConfig(max_num_seqs=max(batch * n, 1), max_model_len=4096))
    peak = [0]
    step = engine.step

    def tracked():
        step()
        peak[0] = max(peak[0], engine.num_blocks - engine.block_manager.num_free_blocks)

    engine.step = tracked
    engine.generate(prompts[:1], n=1, max_new_tokens=4, eos_token_ids=[])  # warm-up: compile / tune kernels
    peak[0] = 0
    _sync(device)
    start = time.perf_counter()
    out = engine.generate(prompts, n=n, max_new_tokens=outs, eos_token_ids=[], temperature=1.0)
    _sync(device)
    wall = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for g in out for c in g)
    bs = engine.config.block_size
    per_block = model.kv_bytes_per_token() * bs
    unshared = sum(n * -(-(len(p) + o) // bs) for p, o in zip(prompts, outs))
    return dict(wall=wall, tokens=tokens, kv_peak_mib=peak[0] * per_block / 2**20,
                kv_unshared_mib=unshared * per_block / 2**20)


def run_hf(shape, dtype, device, kind, batch, size, hf_compile=False) -> dict:
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(**{k: v for k, v in hf_config(shape).items() if k != "model_type"})
    with torch.device(device):  # initialise on the device: a 1.5B model's CPU init takes many seconds
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model = model.to(device).eval()
    prompts, outs, n = workload(kind, size)
    prompts, outs = prompts[:batch], outs[:batch]
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    # The G samples of workload (b) are G rows of the same prompt.
    ids, mask = ids.repeat_interleave(n, 0).to(device), mask.repeat_interleave(n, 0).to(device)
    gen = dict(do_sample=True, temperature=1.0, top_k=0, eos_token_id=None, pad_token_id=0,
               cache_implementation="static", disable_compile=not hf_compile)
    new = max(outs)
    with torch.no_grad():
        # Warm up on the timed batch; a compiled forward also needs the timed cache length.
        warm = new if hf_compile else 4
        model.generate(ids, attention_mask=mask, max_new_tokens=warm, min_new_tokens=warm, **gen)
        _sync(device)
        start = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, **gen)
        _sync(device)
    return dict(wall=time.perf_counter() - start, tokens=sum(outs) * n)


def run_latency(shape, dtype, device, size) -> dict:
    """Batch-1 decode: seconds per token, and the weight-read bound from measured copy bandwidth."""
    from fastrft.engine import Engine, EngineConfig

    model = build_model(shape, dtype, device)
    engine = Engine(model, config=EngineConfig(max_num_seqs=1, max_model_len=4096))
    new = SIZES[size]["latency"]
    engine.generate([[1] * 8], max_new_tokens=8, eos_token_ids=[])
    _sync(device)
    start = time.perf_counter()
    engine.generate([[1] * 128], max_new_tokens=new, eos_token_ids=[])
    _sync(device)
    per_token = (time.perf_counter() - start) / new
    buf = torch.empty((256 if device.startswith("cuda") else 16) * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(buf)
    dst.copy_(buf)
    _sync(device)
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(buf)
    _sync(device)
    bandwidth = 2 * buf.numel() * 10 / (time.perf_counter() - start)  # read + write bytes per second
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(per_token=per_token, bound=weight_bytes / bandwidth, bandwidth=bandwidth)


def worker(what: str, shape: str, dtype_name: str, device: str, kind: str, batch: int, size: str,
           hf_compile: bool) -> dict:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    if what == "latency":
        return run_latency(shape, dtype, device, size)
    fn = run_engine if what == "fastrft" else run_hf
    return fn(shape, dtype, device, kind, batch, size, hf_compile)


def run_case(in_process: bool, args: list, timeout: float | None) -> dict:
    """One case's result dict, or {"error": ...}: in a fresh process, or here with --in-process."""
    if not in_process:
        return run_isolated(__file__, ["--worker", *map(str, args)], timeout=timeout)
    try:
        return worker(*args)
    except Exception as e:  # noqa: BLE001 - out of memory or a failing provider is the case's row
        return {"error": (str(e).strip().splitlines() or [type(e).__name__])[0][:200]}
    finally:
        gc.collect()
        if args[3].startswith("cuda"):
            torch.cuda.empty_cache()


def plan(providers: list[str], size: str, batches: list[int]) -> list[tuple[str, str, int]]:
    """(provider, workload, batch), smallest first (fastrft before transformers at each size), so that
    every case but the first of a provider has a measured throughput to be estimated from; "latency" is
    the batch-1 decode case."""
    cases = [("latency", "-", 1)]
    for b in sorted(set(batches) | {SIZES[size]["count"]}):
        if b == SIZES[size]["count"]:  # the largest: (a) in full, then (b), ours before transformers'
            cases += [("fastrft", "a", b), ("fastrft", "b", 1)] + [(p, "a", b) for p in providers] + \
                     [(p, "b", 1) for p in providers]
        else:
            cases += [(p, "a", b) for p in providers]
    seen, out = set(), []
    for c in cases:
        if c not in seen and (c[0] in providers or c[0] == "latency"):
            seen.add(c)
            out.append(c)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default=None, help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--dtype", default=None, help="bf16 (GPU default) | fp16 | fp32 (CPU default)")
    ap.add_argument("--providers", default="fastrft,transformers")
    ap.add_argument("--batches", default=None, help="batch sizes of (a) compared with transformers (default 1,64,256)")
    ap.add_argument("--quick", action="store_true", help="small workloads (CPU smoke runs)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model and workloads: an end-to-end check, not a measurement")
    ap.add_argument("--hf-compile", action="store_true",
                    help="let transformers compile its forward (see the docstring)")
    ap.add_argument("--in-process", action="store_true", help="run the cases in this process, not one process each")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run; cases that would not fit "
                                                               "are dropped")
    ap.add_argument("--out", default=None, help="folder for rollout.md, rollout.json and results.csv")
    ap.add_argument("--worker", nargs=8, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        w = a.worker
        print(json.dumps(worker(w[0], w[1], w[2], w[3], w[4], int(w[5]), w[6], w[7] == "True")))
        return
    gpu = a.device.startswith("cuda")
    dtype = a.dtype or ("bf16" if gpu else "fp32")
    size = "smoke" if a.smoke else "quick" if a.quick else "full"
    shapes = (a.shapes or ("tiny" if size == "smoke" else "qwen2.5-0.5b,qwen2.5-1.5b" if gpu else "tiny")).split(",")
    providers = [p for p in a.providers.split(",") if p]
    batches = [int(x) for x in a.batches.split(",")] if a.batches else list(SIZES[size]["batches"])
    hf_name = "transformers+compile" if a.hf_compile else "transformers"
    title = f"Rollout throughput, {dtype}" + ("" if a.hf_compile or not gpu else " (transformers eager, static cache)")
    columns = ("kv_peak_mib", "kv_unshared_mib", "bound_ms", "latency/bound", "copy_GB/s")
    budget = Budget(a.budget)
    results: list[Result] = []
    # provider -> (sequences, seconds per decode step, seconds outside the timed generation) per measured case
    measured: dict[str, list[tuple[int, float, float]]] = {}

    def shape_of(kind: str, batch: int) -> tuple[int, int]:
        """(sequences decoded together, decode steps = the longest response)."""
        _, outs, n = workload(kind, size)
        return batch * n, max(outs[:batch])

    def estimate(provider: str, kind: str, batch: int) -> float | None:
        """From the nearest smaller measured case of the provider, assuming a decode step's time grows with
        the square root of the batch (a guess between a weight-read-bound step, flat in the batch, and
        per-sequence work, linear in it)."""
        seqs, steps = shape_of(kind, batch)
        known = [m for m in measured.get(provider, []) if m[0] <= seqs]
        if not known:
            return None
        seqs0, step_s, overhead = max(known)
        return overhead + steps * step_s * (seqs / seqs0) ** 0.5

    def save():
        if a.out:
            write_outputs(a.out, "rollout", title, results, table(results, title, a.device, columns), device=a.device,
                          dropped=budget.dropped)

    for shape in shapes:
        for provider, kind, batch in plan(providers, size, batches):
            who = hf_name if provider == "transformers" else provider
            if provider == "latency":
                name = f"{shape} batch-1 decode latency"
            elif kind == "b":
                name = f"{shape} {who} workload (b) 1 x G={SIZES[size]['g']}"
            else:
                name = f"{shape} {who} workload (a) batch {batch}"
            if not budget.admit(name, None if provider == "latency" else estimate(provider, kind, batch)):
                continue
            print(f"... {name}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            out = run_case(a.in_process, [provider, shape, dtype, a.device, kind, batch, size, a.hf_compile],
                           budget.timeout())
            if a.in_process and cuda_broken(out.get("error", "")):
                a.in_process = False
                print("(a CUDA error: the remaining cases run in fresh processes)", file=sys.stderr)
            took = time.perf_counter() - t0
            info = dict(model=shape, dtype=dtype, workload=kind, batch=batch)
            if out.get("error"):
                results.append(Result("rollout", name, None, error=out["error"], shape=info))
            elif provider == "latency":
                results.append(Result("rollout", name, out["per_token"], [out["per_token"]], 1 / out["per_token"],
                                      "tok/s", shape=dict(model=shape, dtype=dtype),
                                      extra={"bound_ms": round(out["bound"] * 1e3, 3),
                                             "latency/bound": round(out["per_token"] / out["bound"], 2),
                                             "copy_GB/s": round(out["bandwidth"] / 1e9, 1)}))
            else:
                extra = {k: round(v, 1) for k, v in out.items() if k.startswith("kv_")}
                tps = out["tokens"] / out["wall"]
                results.append(Result("rollout", name, out["wall"], [out["wall"]], tps, "tok/s", shape=info,
                                      extra=extra))
                seqs, steps = shape_of(kind, batch)
                measured.setdefault(provider, []).append((seqs, out["wall"] / steps, max(took - out["wall"], 0.0)))
            save()
    report(results, title, a.device, columns=columns, csv_path=Path(a.out) / "results.csv" if a.out else None)
    save()


if __name__ == "__main__":
    main()
