"""One RFT round through TRL's GRPOTrainer and through fastrft's Trainer, side by side in one process.

    python bench/bench_trl.py                                  # CPU: SmolLM2-135M-Instruct, fp32, G = 4 and 8
    python bench/bench_trl.py --group-sizes 4 --rounds 3 --threads 1
    python bench/bench_trl.py --device cuda --out DIR          # GPU: random-weight Qwen2.5-0.5B, bf16
    python bench/bench_trl.py --device cuda --shape qwen2.5-1.5b --budget 200 --out DIR
    python bench/bench_trl.py --smoke                          # CPU: tiny random model, G = 2, 8 tokens, 2 rounds

Needs trl (>= 1.16) and datasets: `pip install 'fastrft[peers]'`.

The workload, the same for both: the paper's minimal layer widened to a group. One training example
("What is 8 + 3?", the demo's, chat-formatted exactly as fastrft formats it), G samples per round
(--group-sizes, default 4 and 8) of at most --max-new-tokens (96) tokens at temperature 1.0, top-p 1.0,
no top-k; reward = fastrft's arithmetic reward (the last number in the response is the answer), which TRL
gets wrapped as a reward function; GRPO advantages (group mean / std); token-mean loss with PPO clip 0.2
(the ratio is 1: one optimizer step per round, no old-log-prob pass on either side); no KL (beta = 0 on
both, so neither side holds or runs a reference model); AdamW at lr 1e-6, weight decay 0.01, betas
(0.9, 0.999), grad clip 1.0, constant lr; no evaluation, no checkpoints, no logging beyond a temporary
folder.

- fastrft: fastrft.trainer.Trainer with the config `fastrft train` would build from these settings
  (precision auto: fp32 on CPU, bf16-mixed on CUDA), except skip_zero_signal=False, so that a round whose
  G rewards are all equal still runs its forward, backward and optimizer step, as TRL's always does.
- TRL: GRPOTrainer with GRPOConfig(per_device_train_batch_size = num_generations = G,
  gradient_accumulation_steps = steps_per_generation = num_iterations = 1, max_steps = --rounds,
  use_vllm=False, gradient_checkpointing=False (TRL's default is True), lr_scheduler_type="constant",
  weight_decay=0.01, loss_type="dapo" (token mean), scale_rewards="group", bf16 on CUDA only, report_to
  none), a dataset holding the same prompt text (tokenised by TRL to the same ids: checked and noted)
  and the answer, and TRL's default optimizer (transformers' "adamw_torch_fused").

The rounds interleave, fastrft round 1, TRL round 1, fastrft round 2, ... at the same torch thread count
(--threads, default all cores): trainer.train() drives TRL, and a TrainerCallback runs each fastrft round
between two TRL steps, off TRL's clock. The first --warmup rounds (1) of each side are left out of the
statistics. Phases, without touching TRL's source:
- generation: fastrft's time_rollout (the engine's rollout, text decoding included); TRL's
  GRPOTrainer._generate, timed on the instance (tokenising the prompts, transformers' generate, masking
  after EOS, decoding);
- forward + backward: fastrft's time_fwd_bwd (packing, the fused LM-head loss, backward); TRL's
  training_step less its _prepare_inputs (the loss's forward through TRL's chunked LM head, backward);
- optimizer: fastrft's time_optim (grad clip, AdamW, the prefix-cache reset); TRL from the end of
  training_step to TrainerCallback.on_optimizer_step (grad clip, AdamW);
- other: the round's wall time less those three (rewards, advantages, padding, bookkeeping, logging).
On CUDA every timer synchronises the device. "per 1k tok" columns divide the phase's time summed over the
measured rounds by the tokens generated in them (counted up to and including EOS, as each side counts
its completion lengths); the medians are per phase, so they need not add up to the median round. The
ratios are TRL / fastrft: above 1 means fastrft is faster.

Where the two differ by design (kept, since it is what each implementation does):
- TRL generates with transformers' generate over G left-padded copies of the prompt (the prompt is
  prefilled G times) and keeps decoding finished rows until the longest one ends; fastrft's engine
  prefills the prompt once and shares its KV blocks among the G samples, and retires each at its EOS;
- TRL's loss forward runs the (G, prompt + longest completion) padded batch; fastrft packs the G
  sequences without padding. Both avoid materialising the full [tokens, vocabulary] logits (TRL's fused
  LM head, fastrft's fused LM-head loss) and both compute the entropy alongside the log-probs;
- each side samples with its own random streams, so responses and their lengths differ: hence the
  per-token columns;
- on CUDA fastrft runs bf16-mixed (fp32 masters and AdamW state, a bf16 compute copy); TRL runs fp32
  weights under bf16 autocast (--trl-weights fp32, the default, and TRL's own when it loads a model by
  name: its dtype defaults to float32), the same numerics, or bf16 weights (--trl-weights bf16, what
  model_init_kwargs={"dtype": "bfloat16"} gives: faster, but at lr 1e-6 most AdamW updates round
  away). vLLM cannot be installed on the GPU machine, so TRL generates through transformers there too.

On CUDA the model is a random-weight Qwen2.5 shape (--shape, default qwen2.5-0.5b; bench/bench_round.py
writes its directory, bf16), whose responses run the whole budget (no EOS for fastrft; TRL stops only on a
sampled pad id, which random weights almost never draw). --device cuda without CUDA stops with one line.
With --out DIR, trl.md (the tables and notes) and trl.json (every round of both sides) are written there
after every case, and the rows are appended to DIR/results.csv (else bench/results.csv).
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import Budget, Result, report, table, write_outputs  # noqa: E402

MODEL = "smollm2-135m-instruct"
EXAMPLE_INDEX = 65  # "What is 8 + 3?", the demo's training example
PHASES = ("gen", "fwd_bwd", "optim", "other")
PHASE_NAMES = {"gen": "gen", "fwd_bwd": "fwd+bwd", "optim": "optim", "other": "other"}
COLUMNS = ("gen s", "fwd+bwd s", "optim s", "other s", "tokens/round", "s/1k tok", "gen s/1k tok",
           "fwd+bwd s/1k tok", "optim s/1k tok", "other s/1k tok", "reward")
IMPLS = ("fastrft", "TRL GRPOTrainer")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------ the two trainers
def build_fastrft(model: str, run_dir: Path, *, device: str, group: int, tokens: int, rounds: int, threads: int):
    from fastrft.config import (AlgoConfig, DataConfig, EvalConfig, ModelConfig, OptimConfig, RolloutConfig,
                                RunConfig, TrainConfig)
    from fastrft.trainer import Trainer

    gpu = device.startswith("cuda")
    cfg = TrainConfig(
        model=ModelConfig(model=model, device=device),  # precision auto: fp32 on CPU, bf16-mixed on CUDA
        data=DataConfig(dataset="arithmetic", level="add1", example_index=(EXAMPLE_INDEX,)),
        rollout=RolloutConfig(group_size=group, max_new_tokens=tokens, temperature=1.0, top_p=1.0, top_k=0,
                              max_batch_size=max(64, group), kv_cache_memory=0.1 if gpu else None),
        algo=AlgoConfig(advantage="grpo", kl_coef=0.0, skip_zero_signal=False),
        optim=OptimConfig(lr=1e-6, weight_decay=0.01, grad_clip=1.0),
        eval=EvalConfig(eval_every=0, train_samples=1, test_size=1, greedy=False),
        run=RunConfig(rounds=rounds, seed=0, out=str(run_dir), progress=False, log_samples=0, threads=threads),
    )
    return Trainer(cfg)


def _callback_class():
    from transformers import TrainerCallback

    class Interleave(TrainerCallback):
        """Runs a fastrft round before TRL's first step and after each of its steps, off TRL's clock, and
        closes each TRL round at on_step_end."""

        def __init__(self, between, close_round, clock):
            self.between, self.close_round, self.clock = between, close_round, clock
            self.mark = self.opt_end = None

        def on_train_begin(self, args, state, control, **kwargs):
            if not self.between(0):
                control.should_training_stop = True
            self.mark = self.clock()

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.opt_end = self.clock()

        def on_step_end(self, args, state, control, **kwargs):
            self.close_round(state.global_step, self.mark, self.clock(), self.opt_end)
            if not self.between(state.global_step):
                control.should_training_stop = True
            self.mark = self.clock()

    return Interleave


def _time_method(obj, name: str, on_done) -> None:
    """Replace the bound method ``obj.name`` on the instance by a timed call: on_done(seconds, result, end)."""
    fn = getattr(obj, name)

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        t0 = obj._bench_clock()
        out = fn(*args, **kwargs)
        t1 = obj._bench_clock()
        on_done(t1 - t0, out, t1)
        return out

    setattr(obj, name, timed)


def build_trl(model_dir: Path, out_dir: Path, *, device: str, group: int, tokens: int, rounds: int, prompt_text: str,
              answer: str, weights: str, callback, clock, timers: dict, reward_log: list):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    from fastrft import rewards

    gpu = device.startswith("cuda")
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.eos_token is None:  # the random-weight tokenizer names none; TRL needs one to mask after it
        tok.eos_token = tok.pad_token
    dtype = torch.bfloat16 if gpu and weights == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    score = rewards.get("arithmetic")

    def arithmetic(prompts, completions, answer, **_):
        out = [score(c, a) for c, a in zip(completions, answer)]
        reward_log.append(out)
        return out

    args = GRPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=group, num_generations=group,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, max_steps=rounds,
        max_completion_length=tokens, temperature=1.0, top_p=1.0, top_k=0, beta=0.0, epsilon=0.2,
        loss_type="dapo", scale_rewards="group", learning_rate=1e-6, weight_decay=0.01, adam_beta1=0.9,
        adam_beta2=0.999, max_grad_norm=1.0, lr_scheduler_type="constant", warmup_steps=0,
        gradient_checkpointing=False, use_vllm=False, bf16=gpu, fp16=False, use_cpu=not gpu,
        report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        shuffle_dataset=False, dataloader_num_workers=0, log_completions=False, seed=0,
    )
    data = Dataset.from_dict({"prompt": [prompt_text] * rounds, "answer": [answer] * rounds})
    trainer = GRPOTrainer(model=model, reward_funcs=[arithmetic], args=args, train_dataset=data,
                          processing_class=tok, callbacks=[callback])
    for cb in (PrinterCallback, ProgressCallback):  # no per-step printing
        trainer.remove_callback(cb)
    trainer._bench_clock = clock

    def gen_done(dt, out, _end):
        timers["gen"] += dt
        prompt_ids, completion_ids = out[0], out[1]
        timers["tokens"] += sum(len(c) for c in completion_ids)
        timers["prompt_ids"] = list(prompt_ids[0])

    def prep_done(dt, _out, _end):
        timers["prep"] += dt

    def step_done(dt, _out, end):
        timers["step"] += dt
        timers["step_end"] = end

    _time_method(trainer, "_generate", gen_done)
    _time_method(trainer, "_prepare_inputs", prep_done)
    _time_method(trainer, "training_step", step_done)
    return trainer


# ------------------------------------------------------------------ one case (one G)
def run_case(*, model: str, model_dir: Path, device: str, group: int, tokens: int, rounds: int, threads: int,
             weights: str, budget: Budget) -> dict:
    """Both trainers for one G, interleaved round by round. Returns every round of each side."""
    from fastrft.data.prompts import render_prompt

    work = Path(tempfile.mkdtemp(prefix="bench-trl-"))
    clock = lambda: (_sync(device), time.perf_counter())[1]  # noqa: E731
    out = {"fastrft": [], "trl": [], "notes": []}
    ours = theirs = None
    try:
        t0 = clock()
        ours = build_fastrft(model, work / "fastrft", device=device, group=group, tokens=tokens, rounds=rounds,
                             threads=threads)
        examples, prompts = ours.examples_for_round(1)
        example, prompt_ids = examples[0], prompts[0]
        out["prompt_tokens"] = len(prompt_ids)
        out["fastrft_fused"] = ours.optimizer.param_groups[0]["fused"]
        out["setup_fastrft"] = clock() - t0

        timers = {"gen": 0.0, "prep": 0.0, "step": 0.0, "step_end": None, "tokens": 0, "prompt_ids": None}
        reward_log: list[list[float]] = []

        def fastrft_round(r: int) -> None:
            t = clock()
            m = ours.round(r)
            wall = clock() - t
            out["fastrft"].append({"round": r, "wall": wall, "gen": m["time_rollout"],
                                   "fwd_bwd": m.get("time_fwd_bwd", 0.0), "optim": m.get("time_optim", 0.0),
                                   "tokens": m["rollout_tokens"], "reward": m["reward_mean"],
                                   "skipped": m["skipped"]})

        def between(done: int) -> bool:
            """After TRL's round ``done``: run fastrft's round done + 1, if rounds and the budget allow."""
            if done >= rounds:
                return False
            if out["fastrft"] and out["trl"]:
                pair = out["fastrft"][-1]["wall"] + out["trl"][-1]["wall"]
                if budget.left() < 1.2 * pair + 2.0:
                    out["notes"].append(f"G={group}: stopped after {done} rounds each (budget)")
                    return False
            fastrft_round(done + 1)
            return True

        def close_round(step: int, start: float, end: float, opt_end: float | None) -> None:
            fwd_bwd = timers["step"] - timers["prep"]
            optim = (opt_end - timers["step_end"]) if opt_end is not None and timers["step_end"] else 0.0
            scores = reward_log[-1] if reward_log else []
            out["trl"].append({"round": step, "wall": end - start, "gen": timers["gen"], "fwd_bwd": fwd_bwd,
                               "optim": optim, "tokens": timers["tokens"],
                               "reward": sum(scores) / len(scores) if scores else None})
            if timers["prompt_ids"] is not None:
                out["trl_prompt_ids_equal"] = timers["prompt_ids"] == list(prompt_ids)
                out["trl_prompt_tokens"] = len(timers["prompt_ids"])
            timers.update(gen=0.0, prep=0.0, step=0.0, step_end=None, tokens=0)

        t0 = clock()
        callback = _callback_class()(between, close_round, clock)
        theirs = build_trl(model_dir, work / "trl", device=device, group=group, tokens=tokens, rounds=rounds,
                           prompt_text=render_prompt(ours.tokenizer, example, "arithmetic"), answer=example.answer,
                           weights=weights, callback=callback, clock=clock, timers=timers, reward_log=reward_log)
        out["setup_trl"] = clock() - t0
        out["trl_optimizer"] = str(getattr(theirs.args.optim, "value", theirs.args.optim))
        theirs.train()
        out["threads"] = torch.get_num_threads()
        return out
    finally:
        del ours, theirs
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------ statistics and tables
def summarize(rows: list[dict], warmup: int) -> dict:
    """Medians per phase and per-1k-token times over the rounds after the warm-up (the last round alone when
    no round is left after it)."""
    for r in rows:
        r["other"] = r["wall"] - r["gen"] - r["fwd_bwd"] - r["optim"]
    measured = rows[warmup:] or rows[-1:]
    tokens = sum(r["tokens"] for r in measured)
    keys = ("wall", *PHASES)
    rewards_ = [r["reward"] for r in rows if r.get("reward") is not None]
    return {"warm": len(rows) > warmup, "rounds": len(measured), "tokens": tokens,
            "median": {k: statistics.median(r[k] for r in measured) for k in keys},
            "per_1k": {k: 1000 * sum(r[k] for r in measured) / max(tokens, 1) for k in keys},
            "tokens_median": statistics.median(r["tokens"] for r in measured),
            "walls": [r["wall"] for r in measured], "reward_mean": sum(rewards_) / len(rewards_) if rewards_ else None}


def result_row(impl: str, group: int, s: dict, shape: dict, rows: list[dict]) -> Result:
    name = f"{impl}, G={group}" + ("" if s["warm"] else " (cold round only)")
    med, per = s["median"], s["per_1k"]
    extra = {f"{PHASE_NAMES[p]} s": round(med[p], 4) for p in PHASES}
    extra.update({"tokens/round": s["tokens_median"], "s/1k tok": round(per["wall"], 4)})
    extra.update({f"{PHASE_NAMES[p]} s/1k tok": round(per[p], 4) for p in PHASES})
    extra.update({"reward": None if s["reward_mean"] is None else round(s["reward_mean"], 3),
                  "measured rounds": s["rounds"], "rounds": rows})
    return Result("trl", name, med["wall"], s["walls"], s["tokens"] / sum(s["walls"]), "tok/s",
                  shape={**shape, "impl": impl, "G": group}, extra=extra)


def ratios(ours: dict, theirs: dict) -> dict:
    """TRL / fastrft: > 1 means fastrft is faster."""
    def div(a, b):
        return a / b if b > 0 else None
    return {"s/tok": div(theirs["per_1k"]["wall"], ours["per_1k"]["wall"]),
            "gen s/tok": div(theirs["per_1k"]["gen"], ours["per_1k"]["gen"]),
            "optim s": div(theirs["median"]["optim"], ours["median"]["optim"])}


def ratio_table(rows: list[tuple[int, dict]]) -> str:
    def cell(x):
        return "–" if x is None else f"{x:.2f}×"
    lines = ["| G | time per generated token | generation time per generated token | optimizer time per round |",
             "|---:|---:|---:|---:|"]
    lines += [f"| {g} | {cell(r['s/tok'])} | {cell(r['gen s/tok'])} | {cell(r['optim s'])} |" for g, r in rows]
    return "TRL / fastrft (above 1: fastrft faster)\n\n" + "\n".join(lines) + "\n"


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda")
    ap.add_argument("--shape", default=None, help="random-weight shape: tiny, qwen2.5-0.5b, qwen2.5-1.5b (default: "
                                                  "SmolLM2-135M-Instruct on CPU, qwen2.5-0.5b on CUDA, tiny with "
                                                  "--smoke)")
    ap.add_argument("--group-sizes", default=None, help="comma list of G, each >= 2 (default 4,8; 2 with --smoke)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="response budget (default 96; 8 with --smoke)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds per implementation and case, warm-up included (default 6; 2 with --smoke)")
    ap.add_argument("--warmup", type=int, default=1, help="first rounds of each side left out of the statistics")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both (default: all cores)")
    ap.add_argument("--trl-weights", default="fp32", choices=("fp32", "bf16"),
                    help="CUDA: TRL's weights, fp32 under bf16 autocast (TRL's default; fastrft's bf16-mixed "
                         "numerics) or bf16")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run; cases that would not fit "
                                                               "are dropped, and a case stops early at the limit")
    ap.add_argument("--out", default=None, help="folder for trl.md, trl.json and results.csv")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, G = 2, 8 tokens, 2 rounds: an "
                                                         "end-to-end check")
    a = ap.parse_args(argv)

    gpu = a.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        print(f"bench_trl.py: --device {a.device} needs a CUDA device, and torch {torch.__version__} sees none; "
              "use --device cpu", file=sys.stderr)
        sys.exit(2)
    if not gpu and a.device != "cpu":
        ap.error(f"--device must be cpu or cuda, got {a.device!r}")
    try:
        import datasets  # noqa: F401
        import trl
    except ImportError as e:
        print(f"bench_trl.py: needs trl>=1.16 and datasets (pip install 'fastrft[peers]'): {e}", file=sys.stderr)
        sys.exit(2)
    groups = [int(g) for g in (a.group_sizes or ("2" if a.smoke else "4,8")).split(",")]
    if min(groups) < 2:
        ap.error("--group-sizes: TRL's GRPO needs G >= 2")
    tokens = a.max_new_tokens or (8 if a.smoke else 96)
    rounds = a.rounds or (2 if a.smoke else 6)
    if rounds < 1 or a.warmup < 0 or tokens < 1:
        ap.error("--rounds and --max-new-tokens must be >= 1, --warmup >= 0")
    threads = a.threads or len(os.sched_getaffinity(0))
    shape = a.shape or ("tiny" if a.smoke else "qwen2.5-0.5b" if gpu else None)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(threads)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module=r"(trl|transformers|accelerate|torch)(\.|$)")

    precision = "bf16-mixed" if gpu else "fp32"
    trl_prec = ("fp32 weights under bf16 autocast" if a.trl_weights == "fp32" else "bf16 weights, bf16 autocast") \
        if gpu else "fp32"
    model_name = f"random-weight {shape}" if shape else "SmolLM2-135M-Instruct"
    title = (f"One RFT round, fastrft vs TRL {trl.__version__} GRPOTrainer: {model_name}, 1 example x G samples, "
             f"<= {tokens} new tokens")
    per_side = "" if gpu else f"; {threads} torch thread{'s' if threads > 1 else ''} each"
    notes = [f"precision: fastrft {precision}; TRL {trl_prec}{per_side}",
             f"{rounds} rounds per side per case, interleaved; the first {a.warmup} of each side left out",
             "TRL generates through transformers' generate (use_vllm=False)"
             + ("; vLLM cannot be installed on the GPU machine" if gpu else ""),
             "per 1k tok: a phase's seconds summed over the measured rounds / their generated tokens (x 1000); "
             "phase medians are taken per phase"]
    results: list[Result] = []
    ratio_rows: list[tuple[int, dict]] = []
    budget = Budget(a.budget)

    def text() -> str:
        body = table(results, title, a.device, COLUMNS, time_unit="s")
        return body + ("\n" + ratio_table(ratio_rows) if ratio_rows else "")

    def save() -> None:
        if a.out:
            write_outputs(a.out, "trl", title, results, text(), device=a.device, dropped=budget.dropped, notes=notes)

    tmp_model = None
    try:
        if shape:
            from harness import write_model_dir

            tmp_model = Path(tempfile.mkdtemp(prefix="bench-trl-model-"))
            print(f"... writing a random-weight {shape} model to {tmp_model}", file=sys.stderr, flush=True)
            model_dir = write_model_dir(shape, "bf16" if gpu else "fp32", a.device, tmp_model)
            model = str(model_dir)
        else:
            from fastrft.models.loader import resolve_model_dir

            model = MODEL
            model_dir = resolve_model_dir(MODEL)
        prev = None  # (G, seconds) of the last case
        for group in groups:
            # The case before, scaled as a decode step grows (about the square root of G); its set-up and
            # cold round (compilation) are paid again, which covers the update's growth with G.
            estimate = None if prev is None else prev[1] * (group / prev[0]) ** 0.5
            if not budget.admit(f"G={group}", estimate):
                continue
            print(f"... G={group}: {rounds} rounds of each, interleaved", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                out = run_case(model=model, model_dir=model_dir, device=a.device, group=group, tokens=tokens,
                               rounds=rounds, threads=threads, weights=a.trl_weights, budget=budget)
            except Exception as e:  # noqa: BLE001 - a failing case is the case's row
                traceback.print_exc()
                msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                results.append(Result("trl", f"G={group}", None, error=f"{type(e).__name__}: {msg}"))
                save()
                continue
            prev = (group, time.perf_counter() - t0)
            notes.extend(out["notes"])
            info = {"model": model_name, "precision": precision, "tokens": tokens,
                    "prompt_tokens": out["prompt_tokens"]}
            if not out["fastrft"] or not out["trl"]:
                results.append(Result("trl", f"G={group}", None, error="no complete round (budget)", shape=info))
                save()
                continue
            s_ours, s_theirs = summarize(out["fastrft"], a.warmup), summarize(out["trl"], a.warmup)
            ours_row = result_row(IMPLS[0], group, s_ours, info, out["fastrft"])
            ours_row.extra["setup s"] = round(out["setup_fastrft"], 2)
            theirs_row = result_row(IMPLS[1], group, s_theirs, info, out["trl"])
            theirs_row.extra["setup s"] = round(out["setup_trl"], 2)
            r = ratios(s_ours, s_theirs)
            theirs_row.extra.update({f"TRL/fastrft {k}": None if v is None else round(v, 3) for k, v in r.items()})
            theirs_row.extra["optimizer"] = out.get("trl_optimizer")
            results += [ours_row, theirs_row]
            ratio_rows.append((group, r))
            if out.get("trl_prompt_ids_equal") is False:
                notes.append(f"G={group}: TRL tokenised the prompt to {out.get('trl_prompt_tokens')} tokens, fastrft "
                             f"to {out['prompt_tokens']}: not the same ids")
            elif out.get("trl_prompt_ids_equal") and f"prompt: {out['prompt_tokens']} tokens" not in " ".join(notes):
                notes.append(f"prompt: {out['prompt_tokens']} tokens, the same ids on both sides")
            if out.get("threads") not in (None, threads) and not gpu:
                notes.append(f"G={group}: torch ran {out['threads']} threads at the end, not {threads}")
            if out.get("trl_optimizer") and not any(n.startswith("TRL optimizer") for n in notes):
                notes.append(f"TRL optimizer: transformers' {out['trl_optimizer']!r}; fastrft: torch.optim.AdamW, "
                             f"fused={out.get('fastrft_fused')}")
            save()
    finally:
        if tmp_model is not None:
            shutil.rmtree(tmp_model, ignore_errors=True)
    report(results, title, a.device, columns=COLUMNS, csv_path=Path(a.out) / "results.csv" if a.out else None,
           time_unit="s")
    if ratio_rows:
        print(ratio_table(ratio_rows))
    for n in notes:
        print(f"- {n}")
    for d in budget.dropped:
        print(f"- dropped: {d}")
    save()


if __name__ == "__main__":
    main()
