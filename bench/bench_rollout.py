"""Rollout throughput: fastrft's paged engine against transformers' generate (static cache).

    python bench/bench_rollout.py                         # GPU: Qwen2.5-0.5B / 1.5B shapes, bf16
    python bench/bench_rollout.py --device cpu --quick    # CPU smoke run on a small random model

Random-weight models with the real architectures (no checkpoint needed). Workloads:
  (a) 256 independent prompts of random length 100-1024, responses of random length 100-1024, EOS
      ignored; also its first 1 and 64 prompts, to compare with transformers at batch 1, 64 and 256;
  (b) the RFT shape: 1 prompt of 512 tokens x G = 256 samples of 1024 tokens.
Throughput counts the response tokens each request asked for, divided by wall time (transformers pads
a batch to its longest request; its padding tokens are not counted). Also reported: the KV memory of
(b) with prompt sharing (peak blocks in use, measured) and without (computed), and batch-1 decode
latency against the weight-read bound (model bytes / copy bandwidth measured in the same run).
Each case runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import Result, report, result_from_dict, result_to_dict, run_isolated  # noqa: E402

SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=True),
}


def hf_config(shape: str) -> dict:
    return dict(model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096,
                hidden_act="silu", eos_token_id=0, bos_token_id=0, **SHAPES[shape])


def build_model(shape: str, dtype: torch.dtype, device: str, seed: int = 0):
    """Our native model with random weights (std 0.02; norms at 1)."""
    from fastrft.models.config import ArchConfig
    from fastrft.models.decoder import CausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = CausalLM(ArchConfig.from_hf(hf_config(shape)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.02)
    model.reset_buffers()
    return model.to(dtype).eval()


def workload(kind: str, quick: bool, seed: int = 0):
    """(prompts, response budgets, n)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi, count = (16, 64, 32) if quick else (100, 1024, 256)
    vocab = 2000
    if kind == "b":
        plen, out, n = (32, 64, 32) if quick else (512, 1024, 256)
        return [torch.randint(1, vocab, (plen,), generator=g).tolist()], [out], n
    lens = torch.randint(lo, hi + 1, (count,), generator=g).tolist()
    outs = torch.randint(lo, hi + 1, (count,), generator=g).tolist()
    prompts = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lens]
    return prompts, outs, 1


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_engine(shape, dtype, device, kind, batch, quick) -> dict:
    from fastrft.engine import Engine, EngineConfig

    model = build_model(shape, dtype, device)
    prompts, outs, n = workload(kind, quick)
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


def run_hf(shape, dtype, device, kind, batch, quick) -> dict:
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(**{k: v for k, v in hf_config(shape).items() if k != "model_type"})
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).eval()
    prompts, outs, n = workload(kind, quick)
    prompts, outs = prompts[:batch], outs[:batch]
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    gen = dict(do_sample=True, temperature=1.0, top_k=0, eos_token_id=None, pad_token_id=0,
               cache_implementation="static")
    with torch.no_grad():
        model.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=4, min_new_tokens=4, **gen)
        _sync(device)
        start = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=max(outs), min_new_tokens=max(outs), **gen)
        _sync(device)
    return dict(wall=time.perf_counter() - start, tokens=sum(outs))


def run_latency(shape, dtype, device, quick) -> dict:
    """Batch-1 decode: seconds per token, and the weight-read bound from measured copy bandwidth."""
    from fastrft.engine import Engine, EngineConfig

    model = build_model(shape, dtype, device)
    engine = Engine(model, config=EngineConfig(max_num_seqs=1, max_model_len=4096))
    new = 64 if quick else 512
    engine.generate([[1] * 8], max_new_tokens=8, eos_token_ids=[])
    _sync(device)
    start = time.perf_counter()
    engine.generate([[1] * 128], max_new_tokens=new, eos_token_ids=[])
    _sync(device)
    per_token = (time.perf_counter() - start) / new
    buf = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
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


def worker(args: list[str]) -> dict:
    what, shape, dtype_name, device, kind, batch, quick = args
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    quick_b = quick == "1"
    if what == "latency":
        return run_latency(shape, dtype, device, quick_b)
    fn = run_engine if what == "fastrft" else run_hf
    return fn(shape, dtype, device, kind, int(batch), quick_b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default=None, help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--dtype", default=None, help="bf16 (GPU default) | fp16 | fp32 (CPU default)")
    ap.add_argument("--providers", default="fastrft,transformers")
    ap.add_argument("--quick", action="store_true", help="small workloads (CPU smoke runs)")
    ap.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker)))
        return
    gpu = a.device.startswith("cuda")
    dtype = a.dtype or ("bf16" if gpu else "fp32")
    shapes = (a.shapes or ("qwen2.5-0.5b,qwen2.5-1.5b" if gpu else "tiny")).split(",")
    providers = a.providers.split(",")
    quick = "1" if a.quick else "0"
    full = 32 if a.quick else 256
    results: list[Result] = []
    for shape in shapes:
        cases = [("fastrft", "a", full), ("fastrft", "b", 1)]
        cases += [(p, "a", b) for b in (1, 8 if a.quick else 64, full) for p in providers]
        seen = set()
        for provider, kind, batch in cases:
            if (provider, kind, batch) in seen:
                continue
            seen.add((provider, kind, batch))
            name = f"{shape} {provider} workload ({kind}) batch {batch}" + (" x G" if kind == "b" else "")
            print(f"... {name}", file=sys.stderr, flush=True)
            out = run_isolated(__file__, ["--worker", provider if provider == "fastrft" else "hf", shape, dtype,
                                          a.device, kind, str(batch), quick], timeout=3600)
            if out.get("error"):
                results.append(Result("rollout", name, None, error=out["error"]))
                continue
            extra = {k: round(v, 1) for k, v in out.items() if k.startswith("kv_")}
            results.append(Result("rollout", name, out["wall"], [out["wall"]], out["tokens"] / out["wall"], "tok/s",
                                  shape=dict(model=shape, dtype=dtype, workload=kind, batch=batch), extra=extra))
        lat = run_isolated(__file__, ["--worker", "latency", shape, dtype, a.device, "-", "1", quick])
        if not lat.get("error"):
            results.append(Result("rollout", f"{shape} batch-1 decode latency", lat["per_token"], [lat["per_token"]],
                                  1 / lat["per_token"], "tok/s", shape=dict(model=shape, dtype=dtype),
                                  extra={"bound_ms": round(lat["bound"] * 1e3, 3),
                                         "latency/bound": round(lat["per_token"] / lat["bound"], 2),
                                         "copy_GB/s": round(lat["bandwidth"] / 1e9, 1)}))
    report(results, f"Rollout throughput, {dtype}", a.device,
           columns=("kv_peak_mib", "kv_unshared_mib", "bound_ms", "latency/bound", "copy_GB/s"))


if __name__ == "__main__":
    main()
