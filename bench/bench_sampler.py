"""The sampler's share of a decode step, through the engine: the counter-based sampler against the
host-noise sampler of earlier versions, side by side in one process.

    python bench/bench_sampler.py                     # CPU: SmolLM2-135M-Instruct fp32, batch 64 and 1
    python bench/bench_sampler.py --batches 64 --steps 48 --repeats 3
    python bench/bench_sampler.py --device cuda --out DIR   # GPU: random-weight Qwen2.5-1.5B, bf16, batch 256

CPU. An Engine decodes B chat-formatted arithmetic prompts with EOS off, so every step decodes B
sequences. Every decode step's sampler call is timed (the engine's ``sample_tokens``, wrapped with a timer), and
so is the whole step (``Engine.step``: scheduling, the model, the LM head, the sampler, the host-side
bookkeeping). The share is the sampler's time over the steps' time, over the decode steps after the
first few. Each repeat runs the current sampler and then the earlier one on the same engine, so the two
shares are measured side by side. The earlier sampler is rebuilt here as it was (fastrft <= 46b2dad):
log_softmax of the whole (B, V) logits, a torch.Generator per request drawing V uniforms on the host
every token, stacked and copied to the logits' device, and the exponential race argmax p / -ln(u).

GPU (--device cuda). A decode step runs as one CUDA-graph replay that includes the LM head and the
sampler, so the sampler cannot be timed inside it: the step is timed as a whole (Engine.step, B
sequences, CUDA graphs on), and the sampling kernel alone on (B, V) bf16 logits with CUDA events; the
share is their ratio. The earlier sampler is timed on the same logits for comparison.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import Result, report, write_outputs  # noqa: E402

MODEL = "smollm2-135m-instruct"
COLUMNS = ("step ms", "sampler ms", "share %", "steps")


_GENERATORS: dict[int, torch.Generator] = {}  # the earlier engine kept one per request


def host_noise_draw(logits, params, seeds, positions, **_):
    """The sampler of fastrft <= 46b2dad on the engine's interface: V host uniforms per row and token."""
    from fastrft.engine.sampler import sampling_logprobs

    logp = sampling_logprobs(logits, params)
    if params.greedy:
        tokens = logp.argmax(-1)
    else:
        gens = []
        for s in seeds.tolist():
            if s not in _GENERATORS:
                _GENERATORS[s] = torch.Generator().manual_seed(s)
            gens.append(_GENERATORS[s])
        uniform = torch.stack([torch.rand(logp.shape[-1], generator=g) for g in gens])
        tokens = (logp.exp() / uniform.to(logp.device).log_().neg_()).argmax(dim=-1)
    lp = logp.gather(-1, tokens[:, None]).squeeze(-1)
    return torch.stack([tokens.to(torch.int32), lp.view(torch.int32)])


class Timed:
    """Wraps the engine's sampler call (decode steps: fastrft.engine.heads.sample_tokens) with a timer."""

    def __init__(self, fn, sync):
        self.fn, self.sync, self.seconds, self.calls = fn, sync, 0.0, 0

    def __call__(self, *args, **kwargs):
        self.sync()
        t = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.sync()
        self.seconds += time.perf_counter() - t
        self.calls += 1
        return out


def cpu_case(model, prompts, batch: int, steps: int, warmup: int, impl: str) -> dict:
    import fastrft.engine.heads as heads
    from fastrft.engine import Engine, EngineConfig
    from fastrft.engine.sampler import SamplingParams
    from fastrft.kernels.sampling import sample_tokens

    def host(logits, seeds, positions, inv_temperature, **_):  # the engine's call, in the old sampler
        return host_noise_draw(logits, SamplingParams(temperature=1 / float(inv_temperature)), seeds, positions)

    engine = Engine(model, config=EngineConfig(kv_cache_memory=2**30, max_num_seqs=max(batch, 1)))
    engine.submit(prompts[:batch], n=1, max_new_tokens=steps + warmup + 2, temperature=1.0, top_p=1.0, top_k=0,
                  seed=0, eos_token_ids=[])
    engine.step()  # the prefill
    for _ in range(warmup):
        engine.step()
    timer = Timed(sample_tokens if impl == "fastrft" else host, lambda: None)
    old = heads.sample_tokens
    heads.sample_tokens = timer
    try:
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = time.perf_counter() - t
    finally:
        heads.sample_tokens = old
        engine.abort()
    assert timer.calls == steps, (timer.calls, steps)
    return {"step": wall / steps, "sampler": timer.seconds / steps}


def run_cpu(a) -> list[Result]:
    import fastrft
    from fastrft.data import arithmetic_problems, encode_prompt

    torch.set_num_threads(a.threads or torch.get_num_threads())
    model = fastrft.load_model(MODEL)
    tok = fastrft.load_tokenizer(MODEL)
    batches = [int(b) for b in a.batches.split(",")]
    exs = arithmetic_problems("add1", "train")[: max(batches)]
    prompts = [encode_prompt(tok, e, "arithmetic", max_prompt_tokens=512) for e in exs]
    results = []
    for batch in batches:
        runs = {"fastrft": [], "host-noise (<= 46b2dad)": []}
        for _ in range(a.repeats):
            for impl, name in (("fastrft", "fastrft"), ("host", "host-noise (<= 46b2dad)")):
                runs[name].append(cpu_case(model, prompts, batch, a.steps, a.warmup, impl))
        for name, rs in runs.items():
            step = statistics.median(r["step"] for r in rs)
            sampler = statistics.median(r["sampler"] for r in rs)
            results.append(Result("sampler", f"{name}, batch {batch}, V {model.config.vocab_size}", step,
                                  [r["step"] for r in rs], batch / step, "tok/s",
                                  shape={"batch": batch, "vocab": model.config.vocab_size, "threads":
                                         torch.get_num_threads()},
                                  extra={"step ms": round(1e3 * step, 2), "sampler ms": round(1e3 * sampler, 3),
                                         "share %": round(100 * sampler / step, 2), "steps": a.steps}))
    return results


def run_cuda(a) -> list[Result]:
    from harness import build_model

    from fastrft.engine import Engine, EngineConfig, SamplingParams
    from fastrft.kernels.sampling import sample_tokens

    model = build_model(a.shape, torch.bfloat16, "cuda")
    v = model.config.vocab_size
    results = []
    for batch in [int(b) for b in a.batches.split(",")]:
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(1, 2000, (512,), generator=g).tolist() for _ in range(batch)]
        engine = Engine(model, config=EngineConfig(max_num_seqs=batch, max_model_len=4096))
        engine.submit(prompts, n=1, max_new_tokens=a.steps + a.warmup + 2, temperature=1.0, top_p=1.0, top_k=0,
                      seed=0, eos_token_ids=[])
        engine.step()
        for _ in range(a.warmup):
            engine.step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(a.steps):
            engine.step()  # ends with the step's device-to-host copy, so it is synchronous
        step = (time.perf_counter() - t) / a.steps
        engine.abort()
        logits = torch.randn(batch, v, device="cuda", generator=torch.Generator("cuda").manual_seed(1)).bfloat16()
        seeds = torch.arange(batch, device="cuda") * 7919
        positions = torch.full((batch,), 100, device="cuda")
        inv_t = torch.ones(1, device="cuda")

        def events(fn, n=50):
            for _ in range(5):
                fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(n):
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            return statistics.median(times)

        kernel = events(lambda: sample_tokens(logits, seeds, positions, inv_t))
        host = events(lambda: host_noise_draw(logits, SamplingParams(), seeds, positions), n=5)
        for name, sampler in (("fastrft kernel (in the step's graph)", kernel), ("host-noise (<= 46b2dad)", host)):
            results.append(Result("sampler", f"{name}, batch {batch}, V {v}", step, [step], batch / step, "tok/s",
                                  shape={"batch": batch, "vocab": v, "model": a.shape},
                                  extra={"step ms": round(1e3 * step, 3), "sampler ms": round(1e3 * sampler, 4),
                                         "share %": round(100 * sampler / step, 2), "steps": a.steps}))
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--batches", default=None, help="comma list (default 64,1 on CPU, 256,1 on CUDA)")
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed per case")
    ap.add_argument("--warmup", type=int, default=4, help="decode steps before timing")
    ap.add_argument("--repeats", type=int, default=3, help="CPU: alternations of the two samplers")
    ap.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default: torch's)")
    ap.add_argument("--shape", default="qwen2.5-1.5b", help="CUDA: random-weight shape of bench_rollout.py")
    ap.add_argument("--out", default=None, help="folder for sampler.md, sampler.json and results.csv")
    a = ap.parse_args(argv)
    gpu = a.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        print("bench_sampler.py: --device cuda needs a CUDA device; torch sees none", file=sys.stderr)
        sys.exit(2)
    a.batches = a.batches or ("256,1" if gpu else "64,1")
    results = run_cuda(a) if gpu else run_cpu(a)
    title = ("The sampler's share of a decode step: " +
             (f"random-weight {a.shape}, bf16, CUDA graphs" if gpu else "SmolLM2-135M-Instruct, fp32"))
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
    report(results, title, a.device, columns=COLUMNS, csv_path=Path(a.out) / "results.csv" if a.out else None)
    if a.out:
        from harness import table

        write_outputs(a.out, "sampler", title, results, table(results, title, a.device, COLUMNS), device=a.device)


if __name__ == "__main__":
    main()
