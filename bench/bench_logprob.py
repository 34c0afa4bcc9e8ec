"""LM-head log-prob + policy-gradient loss, forward + backward: time, peak extra memory, TFLOP/s.

    python bench/bench_logprob.py                       # GPU: the issue's shapes in bf16
    python bench/bench_logprob.py --device cpu          # CPU: SmolLM2 shape, fp32, N 1024 and 4096

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
peak memory is its own and an out-of-memory case is reported instead of ending the run. Numerics: the
max |logp - float64 reference| of the Triton kernel and of PyTorch's own low-precision path on 1,024 rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import Result, measure, peak_memory, report, result_from_dict, result_to_dict, run_isolated  # noqa: E402

SHAPES = {"qwen2.5-1.5b": (1536, 151936), "llama-3.2-1b": (2048, 128256), "smollm2-135m": (576, 49152)}
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


def worker(provider: str, shape: str, n: int, dtype: str, device: str, repeats: int) -> dict:
    h, v = SHAPES[shape]
    inputs = make_inputs(n, h, v, DTYPES[dtype], device)
    step = provider_step(provider, *inputs)
    loss = step()  # warm-up (compilation, autotuning) outside the measurements
    peak = peak_memory(step, device)
    res = measure("logprob", provider, lambda: (step(), None)[1], device=device, repeats=repeats, warmup=0,
                  unit="TFLOP/s",
                  work=6.0 * n * h * v / 1e12, shape=dict(model=shape, N=n, H=h, V=v, dtype=dtype))
    res.peak_mib = peak
    floor = (v * h * 4 + n * h * 4) / 2**20
    res.extra = {"loss": None if loss != loss else round(loss, 6), "peak/(VH4+NH4)": peak / floor}
    return result_to_dict(res)


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
    shapes = (args.shapes or ("qwen2.5-1.5b,llama-3.2-1b" if gpu else "smollm2-135m")).split(",")
    ns = [int(x) for x in (args.n or ("4096,16384,65536" if gpu else "1024,4096")).split(",")]
    providers = [p for p in args.providers.split(",") if p]
    if not gpu:
        # Triton on CPU is the interpreter: a correctness tool, not something to time.
        providers = [p for p in providers if not p.startswith("triton")]
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        providers = [p for p in providers if p != "liger"]
        print("(liger-kernel is not importable: its provider is skipped)", file=sys.stderr)

    results: list[Result] = []
    for shape in shapes:
        for n in ns:
            for p in providers:
                print(f"... {shape} N={n} {p}", file=sys.stderr, flush=True)
                out = run_isolated(__file__, ["--worker", p, shape, str(n), dtype, args.device, str(args.repeats)])
                if out.get("error"):
                    h, v = SHAPES[shape]
                    results.append(Result("logprob", f"{shape} N={n} {p}", None, error=out["error"],
                                          shape=dict(model=shape, N=n, H=h, V=v, dtype=dtype)))
                else:
                    r = result_from_dict(out)
                    r.case = f"{shape} N={n} {p}"
                    results.append(r)
    report(results, f"LM-head log-prob + PG loss, fwd+bwd, {dtype}", args.device,
           columns=("loss", "peak/(VH4+NH4)"))
    for shape in shapes:
        num = run_isolated(__file__, ["--numerics-worker", shape, dtype, args.device])
        print(f"numerics {shape} {dtype}: max |logp - float64| = {num}")


if __name__ == "__main__":
    main()
