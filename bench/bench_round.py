"""One RFT round through fastrft's own Trainer: seconds per round, split into phases, and tokens/s.

    python bench/bench_round.py                             # GPU: Qwen2.5-1.5B shape, bf16; L0, G = 8, G = 64
    python bench/bench_round.py --budget 110 --out DIR      # as bench/gpu_suite.sh runs it
    python bench/bench_round.py --smoke --in-process        # CPU: tiny model, G = 1 and 2, 8-token responses

No checkpoint is needed: a random-weight model with the real architecture (std 0.02, norms at 1) is
written once to a temporary model directory (config.json, model.safetensors, and a character-level
tokenizer padded to the model's vocabulary), and fastrft.trainer.Trainer is built from it exactly as
`fastrft train` builds it. The config is the L0-minimal preset (one training example, the 0/1 reward as
the signal, clip 0.2, KL 0.001 with the k3 estimator, so the trainer holds a frozen reference copy, AdamW
at lr 1e-6) on the synthetic arithmetic data, with G samples per round and 1,024-token responses. The
model has no EOS token (its config.json names none), so every response runs the full budget: the worst
case, as with random weights that almost never sample EOS anyway.

Cases: L0 itself (G = 1), then G = 8 and G = 64 (the L2 choice), smallest first, each estimated from the
one before it and dropped when it would not fit the --budget. Each runs in its own process (with
--in-process, as bench/gpu_suite.sh runs them, all in this one, which spares the process start, the
imports and the CUDA set-up; after a CUDA error the rest run in fresh processes). A case builds the
Trainer (model load, reference copy, engine with its CUDA graphs: "setup s"), runs Trainer.round(1)
(cold: Triton compilation and autotuning, cuBLAS start-up) and, when the budget allows, Trainer.round(2),
the warm round reported. The phases are the trainer's own timers:
- generate: the engine's rollout of the G samples (time_rollout);
- reward: scoring and advantages (time_reward);
- update: packing, the reference model's log-probs, forward + backward through the fused LM-head loss,
  gradient clipping and the AdamW step (time_update);
- of which ref: the reference log-prob pass, which the trainer does not time apart, measured after the
  rounds on a packed batch of the same shape;
- round s: wall time of Trainer.round() with a CUDA synchronisation at its end;
- peak GiB: the CUDA allocator's peak during the round, weights, optimizer state and KV cache included.
tokens/s counts the response tokens of the round over its wall time. When a case runs out of memory in
the update, its generation is still timed on its own, and G = 64 is retried with the round's sequences
split into 8 mini-batches (8 optimizer steps and an old-log-prob pass: not the same algorithm, marked
as such). --set section.field=value passes any other config field (e.g. a memory option of the update).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import (FILE_DTYPE, SHAPES, Budget, Result, cuda_broken, report, run_isolated, table,  # noqa: E402
                     write_model_dir, write_outputs)

COLUMNS = ("generate s", "reward s", "update s", "of which ref s", "gen tok/s", "response tokens", "cold round s",
           "setup s", "peak GiB")


# ------------------------------------------------------------------ one case
def build_config(model_dir: Path, run_dir: Path, *, precision: str, device: str, group: int, tokens: int,
                 mini_batches: int, kv_cache_memory: float | None, overrides: dict):
    """L0-minimal with G = ``group`` and ``tokens``-token responses, as ``fastrft ladder`` resolves a preset."""
    from fastrft import presets
    from fastrft.config import GROUPS, TrainConfig, build_group

    values = presets.overlay(TrainConfig().to_dict(), presets.L0_FIELDS, {
        "model": {"model": str(model_dir), "precision": precision, "device": device},
        "data": {"dataset": "arithmetic"},
        "rollout": {"group_size": group, "max_new_tokens": tokens, "max_batch_size": max(64, group),
                    "kv_cache_memory": kv_cache_memory},
        "algo": {"mini_batches": mini_batches},
        "eval": {"train_samples": 1, "test_size": 1},
        "run": {"out": str(run_dir), "progress": False, "log_samples": 0, "rounds": 2},
    }, overrides)
    return TrainConfig(**{g: build_group(GROUPS[g], v, g) for g, v in values.items()})


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _ref_pass_seconds(trainer, prompt: list[int], group: int, tokens: int, device: str) -> float:
    """The reference model's log-prob pass over G prompt + response sequences, as the update does it."""
    from fastrft.algo import pack
    from fastrft.kernels import linear_logprob

    model = trainer.ref if trainer.ref is not None else trainer.precision.train_model
    gen = torch.Generator().manual_seed(1)
    vocab = model.lm_head_weight.shape[0]
    responses = [torch.randint(0, vocab, (tokens,), generator=gen).tolist() for _ in range(group)]
    batch = pack([prompt] * group, responses, [0.0] * group, [[0.0] * tokens] * group).to(device)
    with torch.no_grad():
        _sync(device)
        t0 = time.perf_counter()
        hidden = model.forward_packed(batch.input_ids, batch.cu_seqlens).index_select(0, batch.target_pos)
        linear_logprob(hidden, model.lm_head_weight, batch.targets, temperature=trainer.cfg.rollout.temperature,
                       backend=trainer.cfg.model.kernels)
        _sync(device)
    return time.perf_counter() - t0


def run_round_case(model_dir: str, precision: str, device: str, group: int, tokens: int, mini_batches: int,
                   kv_cache_memory: float | None, deadline: float | None, overrides: dict) -> dict:
    """Build a Trainer, run round 1 (cold) and, if it fits before ``deadline`` (time.time()), round 2 (warm)."""
    from fastrft.trainer import Trainer

    t_start = time.perf_counter()
    run_dir = Path(tempfile.mkdtemp(prefix="bench-round-"))
    try:
        cfg = build_config(Path(model_dir), run_dir / "run", precision=precision, device=device, group=group, tokens=tokens,
                           mini_batches=mini_batches, kv_cache_memory=kv_cache_memory, overrides=overrides)
        trainer = Trainer(cfg)
        _sync(device)
        setup = time.perf_counter() - t_start
        out = {"setup": setup, "rounds": []}
        prompt = trainer.examples_for_round(1)[1][0]
        out["prompt_tokens"] = len(prompt)
        for r in (1, 2):
            if r == 2 and deadline is not None:
                if time.time() + 1.3 * out["rounds"][-1]["wall"] > deadline:
                    out["note"] = "warm round dropped (budget): the cold round is reported"
                    break
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            _sync(device)
            t0 = time.perf_counter()
            try:
                m = trainer.round(r)
            except torch.OutOfMemoryError as e:
                out["error"] = "out of memory in the round: " + str(e).strip().splitlines()[0][:160]
                m = None
            if m is None:  # outside the except clause, whose traceback holds the round's activations
                trainer.optimizer.zero_grad(set_to_none=True)
                gc.collect()
                torch.cuda.empty_cache()
                _sync(device)
                t0 = time.perf_counter()
                groups = trainer.rollout(r, [prompt])
                _sync(device)
                out["generate_only"] = time.perf_counter() - t0
                out["response_tokens"] = sum(len(c.token_ids) for g in groups for c in g)
                return out
            _sync(device)
            wall = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
            out["rounds"].append({"wall": wall, "peak_gib": peak, **{k: v for k, v in m.items()
                                                                    if isinstance(v, (int, float))}})
        ref = None
        if deadline is None or time.time() + out["rounds"][-1]["time_update"] < deadline:
            ref = _ref_pass_seconds(trainer, prompt, group, tokens, device)
        out["ref"] = ref
        return out
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _row(name: str, out: dict, info: dict) -> Result:
    if out.get("error") and "generate_only" not in out:
        return Result("round", name, None, error=out["error"], shape=info)
    if "generate_only" in out:
        extra = {"generate s": round(out["generate_only"], 3), "update s": "out of memory",
                 "gen tok/s": round(out["response_tokens"] / out["generate_only"], 1),
                 "response tokens": out["response_tokens"], "setup s": round(out["setup"], 1)}
        return Result("round", name, None, error="update out of memory (generation timed alone)", shape=info,
                      extra=extra)
    rounds = out["rounds"]
    last = rounds[-1]
    warm = len(rounds) > 1
    tokens = last.get("rollout_tokens", 0)
    extra = {"generate s": round(last["time_rollout"], 3), "reward s": round(last["time_reward"], 3),
             "update s": round(last["time_update"], 3),
             "of which ref s": None if out.get("ref") is None else round(out["ref"], 3),
             "gen tok/s": round(last["rollout_tokens_per_s"], 1), "response tokens": int(tokens),
             "cold round s": round(rounds[0]["wall"], 2), "setup s": round(out["setup"], 1),
             "peak GiB": None if last["peak_gib"] is None else round(last["peak_gib"], 1),
             "train tokens": last.get("train_tokens"), "prompt tokens": out.get("prompt_tokens"),
             "warm": warm}
    r = Result("round", name + ("" if warm else " (cold round only)"), last["wall"], [last["wall"]],
               tokens / last["wall"], "tok/s", shape=info, extra=extra)
    return r


def parse_sets(items: list[str]) -> dict:
    """["algo.kl_coef=0", ...] -> {"algo": {"kl_coef": 0}}; values are read as JSON when they parse."""
    out: dict = {}
    for item in items:
        key, _, value = item.partition("=")
        section, _, field = key.partition(".")
        if not field or not _:
            raise SystemExit(f"--set {item!r}: expected section.field=value, e.g. algo.kl_coef=0")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(section, {})[field] = parsed
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default=None,
                    help=f"one of {', '.join(SHAPES)} (default qwen2.5-1.5b; tiny with --smoke)")
    ap.add_argument("--precision", default=None, choices=list(FILE_DTYPE),
                    help="the trainer's --precision (default bf16-mixed on GPU, fp32 on CPU)")
    ap.add_argument("--groups", default=None, help="comma list of G (default 1,8,64; 1,2 with --smoke)")
    ap.add_argument("--tokens", type=int, default=None, help="response tokens (default 1024; 8 with --smoke)")
    ap.add_argument("--kv-cache-memory", type=float, default=None,
                    help="engine KV budget: bytes, or a fraction of free GPU memory (default 0.1 on GPU, so that the "
                         "update keeps the rest)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="any other config field, e.g. --set algo.kl_coef=0 (repeatable)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, G = 1 and 2, 8 tokens: an end-to-end check")
    ap.add_argument("--in-process", action="store_true", help="run the cases in this process, not one process each")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run; cases that would not fit "
                                                               "are dropped, largest G first")
    ap.add_argument("--out", default=None, help="folder for round.md, round.json and results.csv")
    ap.add_argument("--make-model", nargs=4, metavar=("SHAPE", "DTYPE", "DEVICE", "DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.make_model:
        shape, dtype, device, path = a.make_model
        write_model_dir(shape, dtype, device, Path(path))
        print(json.dumps({"ok": True}))
        return
    if a.worker:
        print(json.dumps(run_round_case(**json.loads(a.worker))))
        return

    gpu = a.device.startswith("cuda")
    shape = a.shape or ("tiny" if a.smoke else "qwen2.5-1.5b")
    precision = a.precision or ("bf16-mixed" if gpu else "fp32")
    dtype = FILE_DTYPE[precision]
    groups = [int(g) for g in (a.groups or ("1,2" if a.smoke else "1,8,64")).split(",")]
    tokens = a.tokens or (8 if a.smoke else 1024)
    kv = a.kv_cache_memory if a.kv_cache_memory is not None else (0.1 if gpu else None)
    overrides = parse_sets(a.set)
    budget = Budget(a.budget)
    title = (f"One RFT round, L0-minimal settings, {tokens}-token responses, random-weight {shape}, {precision}: "
             "warm round (the second)")
    notes = [f"engine KV budget: {kv if kv is not None else 'default'}"
             + (" of free GPU memory" if kv is not None and kv <= 1 else "")
             + ("; overrides: " + json.dumps(overrides) if overrides else "")]
    results: list[Result] = []

    def save():
        if a.out:
            write_outputs(a.out, "round", title, results, table(results, title, a.device, COLUMNS, time_unit="s"),
                          device=a.device, dropped=budget.dropped, notes=notes)

    def call(payload: dict, timeout):
        if a.in_process:
            try:
                return run_round_case(**payload)
            except Exception as e:  # noqa: BLE001 - a failing case is the case's row
                return {"error": (str(e).strip().splitlines() or [type(e).__name__])[0][:200]}
            finally:
                gc.collect()
                if gpu:
                    torch.cuda.empty_cache()
        return run_isolated(__file__, ["--worker", json.dumps(payload)], timeout=timeout)

    model_dir = Path(tempfile.mkdtemp(prefix="bench-round-model-"))
    try:
        t0 = time.perf_counter()
        print(f"... writing a random-weight {shape} model to {model_dir}", file=sys.stderr, flush=True)
        if a.in_process:
            write_model_dir(shape, dtype, a.device, model_dir)
            made = {"ok": True}
        else:
            made = run_isolated(__file__, ["--make-model", shape, dtype, a.device, str(model_dir)],
                                timeout=budget.timeout())
        if made.get("error"):
            results.append(Result("round", "writing the model directory", None, error=made["error"]))
            save()
            return
        notes.append(f"random-weight model directory written in {time.perf_counter() - t0:.1f} s")
        cases = [(g, 1, f"L0-minimal (G={g})" if g == 1 else f"L0 with G={g}") for g in groups]
        prev = None  # (G, setup, generate, reward + update) of the last measured case
        while cases:
            group, mini, name = cases.pop(0)
            estimate = None
            if prev is not None:
                g0, setup, gen, upd = prev
                scale = group / g0
                # Two rounds; a decode step's time taken to grow with the square root of G (between a
                # weight-read-bound step and per-sequence work), the update's with G.
                estimate = setup + 2 * (gen * scale ** 0.5 + upd * scale * (1.3 if mini > 1 else 1.0))
            if not budget.admit(name, estimate):
                continue
            print(f"... {name}", file=sys.stderr, flush=True)
            left = budget.left()
            payload = dict(model_dir=str(model_dir), precision=precision, device=a.device, group=group, tokens=tokens,
                           mini_batches=mini, kv_cache_memory=kv, overrides=overrides,
                           deadline=None if left == float("inf") else time.time() + left - 2.0)
            out = call(payload, budget.timeout())
            if a.in_process and cuda_broken(str(out.get("error", ""))):
                a.in_process = False  # the context is gone: the rest run in fresh processes
                notes.append(f"a CUDA error in {name}: the cases after it ran in fresh processes")
            info = dict(model=shape, precision=precision, G=group, tokens=tokens, mini_batches=mini)
            results.append(_row(name, out, info))
            if out.get("rounds"):
                last = out["rounds"][-1]
                prev = (group, out["setup"], last["time_rollout"], last["time_reward"] + last["time_update"])
            if "out of memory" in str(out.get("error", "")) and mini == 1 and group >= 16:
                cases.insert(0, (group, 8, f"L0 with G={group}, 8 mini-batches (8 optimizer steps: another algorithm)"))
            save()
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    report(results, title, a.device, columns=COLUMNS, csv_path=Path(a.out) / "results.csv" if a.out else None,
           time_unit="s")
    for n in notes:
        print(f"- {n}")
    save()


if __name__ == "__main__":
    main()
