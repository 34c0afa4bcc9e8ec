"""LM-head log-prob + policy-gradient loss, forward + backward: time, peak extra memory, TFLOP/s.

    python bench/bench_logprob.py                       # GPU: the issue's shapes in bf16
    python bench/bench_logprob.py --device cpu          # CPU: SmolLM2 shape, fp32, N 1024 and 4096
    python bench/bench_logprob.py --device cpu --side-by-side   # the same, timed round-robin in one process
    python bench/bench_logprob.py --in-process --budget 120 --out DIR   # as bench/gpu_suite.sh runs it

Every provider computes the same loss: token-mean clipped surrogate, on-policy, one advantage per
512-token sequence, no KL; each records its loss value so the table shows they agree. Providers:

- ``cublas-3mm``: the floor. The three matmuls any exact implementation must do (logits, dH, dW), at
  the same shapes and dtype, timed in the same run.
- ``naive``: PyTorch logits -> float -> log_softmax -> gather -> loss (forms [N, V] logits and grads).
- ``reference``: fastrft's chunked PyTorch path (the CPU path of fused_linear_pg_loss).
- ``triton``: fastrft's fused kernels (entropy in the forward for the stats, not in the loss);
  ``triton-entropy``: the same with an entropy bonus, so the entropy term enters the backward too.
- ``liger``: Liger-Kernel's LigerFusedLinearGRPOLoss (loss_type "dapo" = token-mean), when importable.

Effective TFLOP/s counts 6*N*H*V per forward + backward. Each case runs in a fresh process, so its
peak memory is its own and an out-of-memory case is reported instead of ending the run. With
--in-process every case runs in this process instead (no process start, Triton's autotuning kept from
case to case): on CUDA the peak is still the case's own (the allocator's peak statistics are reset before
it) and an out-of-memory case is still reported; on CPU no peak is measured. After a CUDA error, which
leaves the process's CUDA context unusable, the remaining cases run in fresh processes. Numerics: the
max |logp - float64 reference| of the Triton kernel and of PyTorch's own low-precision path on 1,024 rows.

Cases run smallest N first, all shapes and providers of one N before the next. With --budget, each case
is estimated before it starts (from the same shape and provider at the previous N, scaled by N) and
dropped when it would not fit, so the largest N is the first to go; a provider out of memory at one N
is not run at larger ones. --out writes logprob.md, logprob.json and results.csv into a folder after
every case.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import (Budget, Result, cuda_broken, measure, peak_memory, report, result_from_dict,  # noqa: E402
                     result_to_dict, run_isolated, table, write_outputs)

SHAPES = {"qwen2.5-1.5b": (1536, 151936), "llama-3.2-1b": (2048, 128256), "smollm2-135m": (576, 49152),
          "tiny": (64, 1000)}
PROVIDERS = ("cublas-3mm", "naive", "reference", "triton", "triton-entropy", "liger")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SEQ_LEN = 512


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, device=device, dtype=torch.float32).mul_(1.0).to(dtype)
    # LM-head-like scale: logits of a few units, so the softmax is neither flat nor one-hot.
    weight = torch.randn(v, h, generator=g, device=device, dtype=torch.float32).mul_(2.0 / h**0.5).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g, device=device)
    seq_ids = torch.arange(n, device=device) // SEQ_LEN
    advantages = torch.randn(int(seq_ids.max()) + 1 if n else 0, generator=g, device=device)[seq_ids]
    return hidden, weight, targets, seq_ids, advantages


def provider_step(provider: str, hidden, weight, targets, seq_ids, advantages):
    """A closure doing one forward + backward; returns the loss value as a float."""
    from fastrft.algo import PGLossSpec, pg_loss
    from fastrft.kernels import fused_linear_pg_loss

    spec = PGLossSpec()
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()

    def zero():
        h.grad = None
        w.grad = None

    if provider == "cublas-3mm":
        dz = torch.empty(hidden.shape[0], weight.shape[0], device=hidden.device, dtype=hidden.dtype).normal_()

        def step():
            z = hidden @ weight.T
            dh = dz @ weight
            dw = dz.T @ hidden
            del z, dh, dw
            return float("nan")
        return step
    if provider == "naive":
        def step():
            zero()
            logp = torch.log_softmax((h @ w.T).float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
            loss, _ = pg_loss(logp, advantages, seq_ids, spec=spec)
            loss.backward()
            return loss.item()
        return step
    if provider in ("reference", "triton", "triton-entropy"):
        backend = "reference" if provider == "reference" else "triton"
        pspec = PGLossSpec(entropy_coef=1e-3) if provider == "triton-entropy" else spec

        def step():
            zero()
            loss, _ = fused_linear_pg_loss(h, w, targets, advantages, seq_ids, spec=pspec, backend=backend)
            loss.backward()
            return loss.item()
        return step
    if provider == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        n = hidden.shape[0]
        b = n // SEQ_LEN
        liger = LigerFusedLinearGRPOLoss(beta=0.0, compiled=hidden.is_cuda, use_ref_model=False, chunk_size=1,
                                         loss_type="dapo", epsilon_low=0.2, epsilon_high=0.2)
        mask = torch.ones(b, SEQ_LEN, device=hidden.device)
        adv_seq = advantages.view(b, SEQ_LEN)[:, 0].contiguous()

        def step():
            zero()
            out = liger(h.view(b, SEQ_LEN, -1), w, targets.view(b, SEQ_LEN), mask, adv_seq)
            loss = out[0] if isinstance(out, tuple) else out
            loss.backward()
            return loss.item()
        return step
    raise ValueError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")


def worker(provider: str, shape: str, n: int, dtype: str, device: str, repeats: int, in_process: bool = False) -> dict:
    h, v = SHAPES[shape]
    inputs = make_inputs(n, h, v, DTYPES[dtype], device)
    step = provider_step(provider, *inputs)
    loss = step()  # warm-up (compilation, autotuning) outside the measurements
    # A process's RSS high-water mark is not one case's own once other cases ran in it.
    peak = None if in_process and not device.startswith("cuda") else peak_memory(step, device)
    res = measure("logprob", provider, lambda: (step(), None)[1], device=device, repeats=repeats, warmup=0,
                  unit="TFLOP/s",
                  work=6.0 * n * h * v / 1e12, shape=dict(model=shape, N=n, H=h, V=v, dtype=dtype))
    res.peak_mib = peak
    floor = (v * h * 4 + n * h * 4) / 2**20
    res.extra = {"loss": None if loss != loss else round(loss, 6),
                 "peak/(VH4+NH4)": None if peak is None else peak / floor}
    return result_to_dict(res)


def run_case(in_process: bool, provider: str, shape: str, n: int, dtype: str, device: str, repeats: int,
             timeout: float | None) -> dict:
    """One case's result dict, or {"error": ...}: in a fresh process, or here with --in-process."""
    if not in_process:
        return run_isolated(__file__, ["--worker", provider, shape, str(n), dtype, device, str(repeats)],
                            timeout=timeout)
    try:
        return worker(provider, shape, n, dtype, device, repeats, in_process=True)
    except Exception as e:  # noqa: BLE001 - out of memory or a failing provider is the case's row
        return {"error": ("out of memory: " if isinstance(e, torch.OutOfMemoryError) else "")
                + (str(e).strip().splitlines() or [type(e).__name__])[0][:200]}
    finally:
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def side_by_side(shape: str, n: int, dtype: str, device: str, providers: list[str], repeats: int) -> str:
    """Every provider on the same inputs in this one process, timed round-robin (one step of each per
    repeat), so that a machine whose speed drifts over minutes (a shared CPU) moves them all alike; a
    Markdown table of medians and their ratios to naive PyTorch and to the three matmuls. No memory
    column: a shared process cannot tell one provider's peak (the default mode measures it)."""
    import statistics
    import time

    h, v = SHAPES[shape]
    inputs = make_inputs(n, h, v, DTYPES[dtype], device)
    steps = {p: provider_step(p, *inputs) for p in providers}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    losses = {p: step() for p, step in steps.items()}  # warm-up
    times: dict[str, list[float]] = {p: [] for p in providers}
    for _ in range(repeats):
        for p, step in steps.items():
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times[p].append(time.perf_counter() - t0)
    med = {p: statistics.median(t) for p, t in times.items()}
    lines = [f"side by side, {shape} N={n} {dtype}, {repeats} round-robin repeats after one warm-up",
             "", "| provider | median | runs (s) | / naive | / three matmuls | loss |", "|---|---:|---|---:|---:|---:|"]
    for p in providers:
        ratio = (lambda base: f"{med[p] / med[base]:.3f}" if base in med else "–")  # noqa: E731
        loss = "–" if losses[p] != losses[p] else f"{losses[p]:.6g}"
        lines.append(f"| {p} | {med[p] * 1e3:,.1f} ms | {', '.join(f'{t:.2f}' for t in times[p])} | {ratio('naive')} "
                     f"| {ratio('cublas-3mm')} | {loss} |")
    return "\n".join(lines)


def numerics(shape: str, dtype: str, device: str, rows: int = 1024) -> dict:
    """max |logp - float64| for the Triton kernel and for PyTorch's low-precision path, same inputs."""
    from fastrft.kernels import HAVE_TRITON, linear_logprob, linear_logprob_reference

    h, v = SHAPES[shape]
    hidden, weight, targets, _, _ = make_inputs(rows, h, v, DTYPES[dtype], device, seed=1)
    ref = linear_logprob_reference(hidden, weight, targets, compute_dtype=torch.float64, chunk=256)[0]
    low = torch.log_softmax(hidden @ weight.T, dim=-1).gather(1, targets[:, None]).squeeze(1).double()
    out = {"torch_lowp": float((low - ref).abs().max())}
    if HAVE_TRITON and device.startswith("cuda"):
        tri = linear_logprob(hidden, weight, targets, backend="triton")[0].double()
        out["triton"] = float((tri - ref).abs().max())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--shapes", default=None, help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--n", default=None, help="comma list of token counts N")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="2 repeats instead of --repeats")
    ap.add_argument("--smoke", action="store_true", help="tiny shape (H 64, V 1000), N 512, 1 repeat: an end-to-end "
                                                         "check of the script, not a measurement")
    ap.add_argument("--in-process", action="store_true", help="run the cases in this process, not one process each")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run; cases that would not fit "
                                                               "are dropped, largest N first")
    ap.add_argument("--out", default=None, help="folder for logprob.md, logprob.json and results.csv")
    ap.add_argument("--side-by-side", action="store_true",
                    help="time every provider in one process, round-robin, and print their ratios (no memory)")
    ap.add_argument("--worker", nargs=6, metavar=("PROVIDER", "SHAPE", "N", "DTYPE", "DEVICE", "REPEATS"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--numerics-worker", nargs=3, metavar=("SHAPE", "DTYPE", "DEVICE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        p, s, n, d, dev, r = args.worker
        print(json.dumps(worker(p, s, int(n), d, dev, int(r))))
        return
    if args.numerics_worker:
        print(json.dumps(numerics(*args.numerics_worker)))
        return

    if args.quick:
        args.repeats = 2
    gpu = args.device.startswith("cuda")
    dtype = args.dtype or ("bf16" if gpu else "fp32")
    default_shapes, default_ns = ("tiny", "512") if args.smoke else (
        ("qwen2.5-1.5b,llama-3.2-1b", "4096,16384,65536") if gpu else ("smollm2-135m", "1024,4096"))
    if args.smoke:
        args.repeats = 1
    shapes = (args.shapes or default_shapes).split(",")
    ns = sorted(int(x) for x in (args.n or default_ns).split(","))
    providers = [p for p in args.providers.split(",") if p]
    notes = []
    if not gpu:
        # Triton on CPU is the interpreter: a correctness tool, not something to time.
        providers = [p for p in providers if not p.startswith("triton")]
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        if "liger" in providers:
            notes.append("liger-kernel is not importable: its provider was skipped")
        providers = [p for p in providers if p != "liger"]
        print("(liger-kernel is not importable: its provider is skipped)", file=sys.stderr)

    if args.side_by_side:
        for shape in shapes:
            for n in ns:
                print(side_by_side(shape, n, dtype, args.device, providers, args.repeats), flush=True)
        return
    title = f"LM-head log-prob + PG loss, fwd+bwd, {dtype}"
    columns = ("loss", "peak/(VH4+NH4)")
    budget = Budget(args.budget)
    order = {(s_, n_, p_): i for i, (s_, n_, p_) in enumerate((s_, n_, p_) for s_ in shapes for n_ in ns
                                                               for p_ in providers)}
    results: list[Result] = []
    last_step: dict[tuple[str, str], tuple[int, float]] = {}  # (shape, provider) -> (N, seconds per step)
    out_of_memory: dict[tuple[str, str], int] = {}

    def save():
        if args.out:
            rows = sorted(results, key=lambda r: order[(r.shape["model"], r.shape["N"], r.extra.get("provider"))])
            write_outputs(args.out, "logprob", title, rows, table(rows, title, args.device, columns),
                          device=args.device, dropped=budget.dropped, notes=notes)

    for i, n in enumerate(ns):
        for shape in shapes:
            h, v = SHAPES[shape]
            for p in providers:
                case = f"{shape} N={n} {p}"
                shape_info = dict(model=shape, N=n, H=h, V=v, dtype=dtype)
                if (shape, p) in out_of_memory:
                    results.append(Result("logprob", case, None, error=f"not run: out of memory at N="
                                          f"{out_of_memory[(shape, p)]}", shape=shape_info, extra={"provider": p}))
                    continue
                estimate = None
                if (shape, p) in last_step:  # warm-up + peak pass + repeats, scaled from the previous N
                    n0, t0 = last_step[(shape, p)]
                    estimate = t0 * n / n0 * (args.repeats + 2) + 2.0
                if not budget.admit(case, estimate):
                    continue
                print(f"... {case}", file=sys.stderr, flush=True)
                out = run_case(args.in_process, p, shape, n, dtype, args.device, args.repeats, budget.timeout())
                if args.in_process and cuda_broken(out.get("error", "")):
                    args.in_process = False  # the context is gone: the rest run in fresh processes
                    notes.append(f"a CUDA error at {case}: the cases after it ran in fresh processes")
                if out.get("error"):
                    if "out of memory" in out["error"].lower():
                        out_of_memory[(shape, p)] = n
                    results.append(Result("logprob", case, None, error=out["error"], shape=shape_info,
                                          extra={"provider": p}))
                else:
                    r = result_from_dict(out)
                    r.case = case
                    r.extra["provider"] = p
                    results.append(r)
                    last_step[(shape, p)] = (n, r.median_s)
                save()
        if i == 0:  # numerics once, after the smallest N: cheap, and the bf16 accuracy target needs it
            for shape in shapes:
                if not budget.admit(f"numerics {shape}"):
                    continue
                if args.in_process:
                    try:
                        num = numerics(shape, dtype, args.device)
                    except Exception as e:  # noqa: BLE001
                        num = {"error": str(e).strip().splitlines()[0][:200]}
                else:
                    num = run_isolated(__file__, ["--numerics-worker", shape, dtype, args.device],
                                       timeout=budget.timeout())
                shown = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in num.items())
                notes.append(f"numerics {shape} {dtype}, 1,024 rows: max |logp - float64| = {shown}")
                print(notes[-1], flush=True)
            save()
    results.sort(key=lambda r: order[(r.shape["model"], r.shape["N"], r.extra.get("provider"))])
    report(results, title, args.device, columns=columns,
           csv_path=Path(args.out) / "results.csv" if args.out else None)
    for line in notes:
        print(line)
    save()


if __name__ == "__main__":
    main()
