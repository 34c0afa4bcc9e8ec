"""Run configuration: one small frozen dataclass per concern, composed into :class:`TrainConfig`.

Every field documents itself (``metadata["help"]``) and maps to exactly one CLI flag, ``--field-name``,
so the CLI is generated from these classes and error messages can name the flag to change. Values are
validated once, at construction; facts learned at run time (EOS ids, dataset sizes) live in the trainer,
never written back here. Defaults follow the paper's setup (the README's ladder section lists its layers).

This module is over the package's 300-line limit on purpose: it is the field table of every flag (a
field, its default, its help text and its check, side by side), and splitting the table across files
would separate the sections that TrainConfig composes and validates together.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

# Only torch-free imports here: the CLI's --help is generated from these classes (see fastrft._lazy).
from fastrft.algo.choices import ADVANTAGE_NAMES, AGGREGATIONS, KL_ESTIMATOR_NAMES
from fastrft.errors import ConfigError
from fastrft.models import lora_names
from fastrft.models.embedded import DEFAULT_MODEL


LR_SCHEDULES = ("constant", "linear", "cosine")
#: --report-to names (TRL's report_to values that fastrft writes).
REPORT_TO = ("tensorboard", "wandb", "none")
#: --precision names (fastrft.precision implements them); auto = bf16-mixed on CUDA, fp32 elsewhere.
PRECISIONS = ("auto", "fp32", "bf16-mixed", "bf16", "fp16")
#: The former --dtype values, still accepted (flag and config files) as the pure precisions.
LEGACY_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def parse_difficulty(text: str) -> tuple[float, float]:
    """'lo:hi' -> (lo, hi); 'hard' -> (0, 0): the pass-rate band --difficulty asks for.

    >>> parse_difficulty("0.2:0.4"), parse_difficulty("hard")
    ((0.2, 0.4), (0.0, 0.0))
    """
    if text == "hard":
        return 0.0, 0.0
    parts = text.split(":")
    try:
        lo, hi = (float(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        lo = hi = None
    if lo is None or not 0 <= lo <= hi <= 1:
        raise ConfigError(f"difficulty (--difficulty) must be 'hard' or a band 'lo:hi' with 0 <= lo <= hi <= 1, "
                          f"e.g. 0.2:0.4; got {text!r}")
    return lo, hi


def opt(default: Any, help: str, **extra: Any):
    """A config field. ``session=True``: a setting of this invocation that cannot change the run's numbers
    (where it is written, how it is displayed, how many threads): never written to config.json, never
    compared on resume. ``resumable=True``: recorded, but a resume may change it (a memory budget)."""
    return field(default=default, metadata={"help": help, **extra})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _require(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{name} ({flag(name)}) {message}")


@dataclass(frozen=True)
class ModelConfig:
    model: str = opt(DEFAULT_MODEL, "model directory (HF format: config.json, *.safetensors, tokenizer), a "
                                    "Hugging Face hub id owner/name[@revision] (downloaded into the HF cache), or "
                                    f"the embedded alias '{DEFAULT_MODEL}'")
    precision: str = opt("auto", "numeric precision: auto (bf16-mixed on CUDA, fp32 on CPU) | fp32 | bf16-mixed "
                                 "(fp32 master weights and AdamW state, bf16 forward/backward, rollouts and "
                                 "evaluation) | bf16 (pure low-precision weights: an update below the format's "
                                 "resolution rounds away; the paper's lr 1e-6 does). fp16 is refused: its AdamW "
                                 "state underflows. --dtype float32 | bfloat16 is the older spelling of fp32 | bf16")
    device: str = opt("auto", "auto (cuda when available, else cpu) | cpu | cuda | cuda:N")
    kernels: str = opt("auto", "LM-head loss implementation: auto (Triton on CUDA, PyTorch reference on CPU) | "
                               "triton | reference")
    activation_checkpointing: bool = opt(False, "recompute each decoder layer's activations in the backward "
                                                "instead of keeping them: less memory per token, one more "
                                                "forward per step; same gradients")
    exact_logprobs: str = opt("auto", "exact on-policy log-probs: on = batch-invariant ops, so the sampler's log-prob "
                                      "of every token equals the trainer's bit for bit (logp_gap 0) and PPO's "
                                      "old-log-prob pass is skipped | off | auto (on where it costs at most 5 percent: fp32 on CPU with "
                                      "--ppo-epochs x --mini-batches > 1; off with --top-p/--top-k, and on CUDA until "
                                      "the cost of its Triton kernels is measured on a GPU)")
    lora_rank: int = opt(0, "LoRA rank r: train low-rank adapters on --lora-targets and freeze the base model (held "
                            "once, in the compute dtype, without gradients or optimizer state); 0 = full fine-tuning")
    lora_alpha: float = opt(32.0, "LoRA alpha: the adapters' output is scaled by alpha / r (alpha / sqrt(r) with "
                                  "--lora-rslora), as in PEFT")
    lora_dropout: float = opt(0.0, "dropout on the adapters' input in the training forward (PEFT's lora_dropout); "
                                   "--exact-logprobs on refuses it and auto turns off (the sampler does not drop)")
    lora_targets: tuple[str, ...] = opt(lora_names.TARGETS, "the projections that get adapters, by PEFT's "
                                                            "target_modules names: q_proj, k_proj, v_proj, o_proj, "
                                                            "gate_proj, up_proj, down_proj, or all-linear")
    lora_rslora: bool = opt(False, "rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r (PEFT's "
                                   "use_rslora)")
    lora_train_embeddings: bool = opt(False, "with LoRA, also train the token embeddings and the LM head (PEFT's "
                                             "modules_to_save); frozen by default")
    lora_init: str | None = opt(None, "start the adapters from a PEFT adapter directory (adapter_config.json and "
                                      "adapter_model.safetensors); its base model, rank, alpha and targets must "
                                      "match the run's")

    def __post_init__(self):
        _require(self.precision in PRECISIONS, "precision",
                 f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        # fp16 weights, gradients and AdamW moments: AdamW's eps (1e-8) is 0 in fp16, so a parameter whose
        # gradient moments underflow takes a 0/0 step and turns NaN (measured on SmolLM2 in round 2).
        _require(self.precision != "fp16", "precision", "fp16 cannot train: its AdamW state underflows (eps "
                 "1e-8 is 0 in fp16) and the weights turn NaN within rounds; use --precision bf16-mixed (fp32 "
                 "master weights, 16-bit compute) or fp32")
        _require(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None, "device",
                 f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        _require(self.kernels in ("auto", "triton", "reference"), "kernels",
                 f"must be auto, triton or reference, got {self.kernels!r}")
        _require(self.exact_logprobs in ("auto", "on", "off"), "exact_logprobs",
                 f"must be auto, on or off, got {self.exact_logprobs!r}")
        self._check_lora()

    def _check_lora(self) -> None:
        lora_flags = [f.name for f in dataclasses.fields(self) if f.name.startswith("lora_") and f.name != "lora_rank"
                      and getattr(self, f.name) != f.default]
        _require(self.lora_rank >= 0, "lora_rank", f"must be >= 1 (or 0 for full fine-tuning), got {self.lora_rank}")
        _require(self.lora_rank > 0 or not lora_flags, lora_flags[0] if lora_flags else "lora_rank",
                 "sets up LoRA adapters, but --lora-rank is 0 (full fine-tuning); give --lora-rank R")
        _require(math.isfinite(self.lora_alpha) and self.lora_alpha > 0, "lora_alpha",
                 f"must be a positive number, got {self.lora_alpha}")
        _require(0.0 <= self.lora_dropout < 1.0, "lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        lora_names.expand_targets(self.lora_targets)
        if self.lora_init is not None:
            from fastrft.models import peft_io

            peft_io.check_adapter_dir(self)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = opt("arithmetic", "gsm8k | math | arithmetic (synthetic, for small models) | custom (rows of "
                                     "your own: --train-file, --prompt-column, --answer-column) | a Hugging Face hub "
                                     "dataset id owner/name (splits train and test, through the datasets package)")
    train_file: str | None = opt(None, "training split file (.jsonl/.json/.parquet); default: the builtin copy")
    test_file: str | None = opt(None, "test split file; default: the builtin copy")
    level: str = opt("add1", "arithmetic difficulty: add1 | add2 | mul | addsub")
    example_index: tuple[int, ...] = opt((0,), "training example index(es) into the train split, e.g. 65 or 3,17")
    examples_per_round: int = opt(0, "0 = train on the fixed example(s) every round (--example-index or "
                                     "--difficulty); B > 0 = draw B examples per round from the training pool, "
                                     "a fresh shuffle per pass (B = pool size: full-dataset GRPO)")
    train_pool: int | None = opt(None, "size of the training pool: a seeded subset of the train split that "
                                       "batches and difficulty candidates are drawn from (none = whole split)")
    difficulty: str | None = opt(None, "pick the training example by the base model's pass rate: a band "
                                       "'lo:hi' (e.g. 0.2:0.4, inclusive) or 'hard' (0 of k); overrides "
                                       "--example-index; with --examples-per-round it filters the pool")
    difficulty_samples: int = opt(8, "samples per candidate (T = 1.0) when estimating pass rates (k)")
    difficulty_candidates: int = opt(32, "candidates whose pass rate is estimated, taken from the pool in "
                                         "seeded order")
    difficulty_count: int = opt(1, "how many examples --difficulty picks for fixed-example training")
    difficulty_cache: str | None = opt(None, "file of cached pass-rate estimates (default: "
                                             "<run dir>/difficulty.json); shared between runs of one study")
    max_prompt_tokens: int = opt(512, "longest accepted prompt, in tokens")
    data_seed: int = opt(0, "seed of synthetic problems and test subsets; kept apart from --seed so that "
                            "seeds of a multi-seed study see the same data")
    reward: str | None = opt(None, "reward that scores every example, in training and evaluation: a registered "
                                   "name (arithmetic | gsm8k | math) or your own 'module.path:function', "
                                   "f(response: str, answer: str) -> float in [0, 1], importable from "
                                   "PYTHONPATH; none = the dataset's own")
    reward_funcs: tuple[str, ...] = opt((), "TRL-style training reward: functions whose weighted sum is the reward "
                                            "(registered names or 'module.path:function'; f(response, answer) or "
                                            "batched f(completions, **columns)); each is logged. Pass@1 still uses "
                                            "--reward (or the dataset's own); empty = that reward, mapped by "
                                            "--reward-fail/--reward-success")
    reward_weights: tuple[float, ...] = opt((), "one weight per --reward-funcs function (empty = all 1.0)")
    reward_format: str = opt("auto", "how batched --reward-funcs see prompts and completions: auto (as TRL: chat "
                                     "messages, completion[0]['content'], when the dataset's prompts are "
                                     "conversations, else strings) | text | messages (TRL's conversational format "
                                     "for any dataset, e.g. recipes written for a conversational GSM8K on --dataset "
                                     "gsm8k: prompts as the rendered messages)")
    prompt_column: str = opt("prompt", "custom / hub datasets: the column holding the prompt (a string or a list of "
                                       "chat messages)")
    answer_column: str = opt("answer", "custom / hub datasets: the column holding the reference answer")
    prompt_template: str | None = opt(None, "the user turn, with {prompt} standing for the question, e.g. "
                                            "'{prompt} Answer after ####.'; none = the dataset's own instruction "
                                            "(custom datasets: the prompt as written)")
    system_prompt: str | None = opt(None, "a system turn before every prompt (rendered with the chat template)")

    def __post_init__(self):
        from fastrft.data import DATASETS, LEVELS

        from fastrft.data.custom import is_custom

        _require(self.dataset in DATASETS or is_custom(self.dataset), "dataset",
                 f"must be one of {', '.join(DATASETS)}, custom (with --train-file) or a hub dataset id "
                 f"(owner/name), got {self.dataset!r}")
        _require(not is_custom(self.dataset) or self.reward is not None, "reward",
                 f"must be given for dataset {self.dataset!r}: Pass@1 and the default training reward score "
                 "responses with it, f(response, answer) in [0, 1] (a name such as gsm8k, or module.path:function)")
        if self.prompt_template is not None:
            try:
                self.prompt_template.format(prompt="")
            except (KeyError, IndexError, ValueError) as e:
                raise ConfigError(f"prompt_template ({flag('prompt_template')}) {self.prompt_template!r} cannot be "
                                  f"filled ({e.__class__.__name__}: {e}); write {{prompt}} where the question goes "
                                  "and double other braces ({{ }})") from None
            _require("{prompt}" in self.prompt_template, "prompt_template", "must contain {prompt}")
        levels = [lv.name for lv in LEVELS]
        _require(self.level in levels, "level", f"must be one of {', '.join(levels)}, got {self.level!r}")
        _require(len(self.example_index) >= 1, "example_index", "needs at least one index")
        _require(all(i >= 0 for i in self.example_index), "example_index", "entries must be >= 0")
        _require(len(set(self.example_index)) == len(self.example_index), "example_index", "has duplicates")
        _require(self.max_prompt_tokens >= 1, "max_prompt_tokens", "must be >= 1")
        _require(self.examples_per_round >= 0, "examples_per_round", "must be >= 0 (0 = fixed examples)")
        _require(self.train_pool is None or self.train_pool >= 1, "train_pool", "must be >= 1 or none")
        if self.difficulty is not None:
            parse_difficulty(self.difficulty)
        _require(self.difficulty_samples >= 1, "difficulty_samples", "must be >= 1")
        _require(self.difficulty_candidates >= 1, "difficulty_candidates", "must be >= 1")
        _require(self.difficulty_count >= 1, "difficulty_count", "must be >= 1")
        if self.reward is not None:
            from fastrft import rewards

            try:
                rewards.get(self.reward)  # imports and checks a module:function now, before a model loads
            except ConfigError as e:
                raise ConfigError(f"reward ({flag('reward')}) {e}") from None
        _require(not self.reward_weights or len(self.reward_weights) == len(self.reward_funcs), "reward_weights",
                 f"has {len(self.reward_weights)} weight(s) for {len(self.reward_funcs)} --reward-funcs function(s); "
                 "give one weight per function, or none (all 1.0)")
        _require(all(math.isfinite(w) for w in self.reward_weights), "reward_weights", "must be finite numbers")
        _require(self.reward_format in ("auto", "text", "messages"), "reward_format",
                 f"must be auto, text or messages, got {self.reward_format!r}")
        from fastrft.rewards import funcs

        for spec in self.reward_funcs:
            if not spec.startswith(funcs.PYTHON):  # a function passed from Python comes back with the Trainer
                try:
                    funcs.check(spec, funcs.load(spec), self)
                except ConfigError as e:
                    raise ConfigError(f"reward_funcs ({flag('reward_funcs')}) {e}") from None
        if self.dataset == "arithmetic":
            for name in ("train_file", "test_file"):
                _require(getattr(self, name) is None, name,
                         "cannot be set for the synthetic arithmetic dataset (it is generated); drop the flag")


@dataclass(frozen=True)
class RolloutConfig:
    group_size: int = opt(1, "rollouts per training example per round (G)")
    temperature: float = opt(1.0, "sampling temperature for training rollouts (> 0)")
    top_p: float = opt(1.0, "nucleus sampling threshold (1.0 = off)")
    top_k: int = opt(0, "top-k sampling (0 = off)")
    max_new_tokens: int = opt(1024, "response length budget, in tokens")
    max_batch_size: int = opt(64, "most sequences decoded together (the engine's max_num_seqs)")
    block_size: int = opt(16, "tokens per KV-cache block (a power of two)")
    kv_cache_memory: float | None = opt(None, "KV cache budget: bytes (> 1) or a fraction of free GPU memory "
                                              "(<= 1); none = half the free GPU memory, or 2 GiB on CPU")

    def __post_init__(self):
        _require(1 <= self.group_size <= 256, "group_size", f"must be in 1..256, got {self.group_size}")
        _require(self.temperature > 0, "temperature", f"must be > 0 for training rollouts, got {self.temperature}")
        _require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _require(self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}")
        _require(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _require(self.max_batch_size >= 1, "max_batch_size", f"must be >= 1, got {self.max_batch_size}")
        _require(self.block_size >= 1 and self.block_size & (self.block_size - 1) == 0, "block_size",
                 f"must be a power of two, got {self.block_size}")
        _require(self.kv_cache_memory is None or self.kv_cache_memory > 0, "kv_cache_memory",
                 f"must be > 0 (bytes, or a fraction <= 1 of free GPU memory), got {self.kv_cache_memory}")
        _require(self.group_size <= self.max_batch_size, "group_size",
                 f"({self.group_size}) cannot exceed --max-batch-size ({self.max_batch_size}): the samples of one "
                 "prompt are decoded together")


@dataclass(frozen=True)
class AlgoConfig:
    advantage: str = opt("none", "advantage estimator: " + " | ".join(ADVANTAGE_NAMES))
    reward_fail: float = opt(0.0, "reward of an incorrect response")
    reward_success: float = opt(1.0, "reward of a correct response")
    fail_truncated: bool = opt(False, "score a response cut off at --max-new-tokens as incorrect (it never "
                                      "finished its answer; guards lenient rewards against lucky rambles)")
    clip_low: float = opt(0.2, "PPO clip epsilon below 1")
    clip_high: float = opt(0.2, "PPO clip epsilon above 1")
    dual_clip: float | None = opt(None, "dual-clip constant c > 1 for negative advantages (none = off)")
    kl_coef: float = opt(0.001, "KL coefficient against the frozen initial policy (0 = no reference model)")
    kl_estimator: str = opt("k3", "KL estimator: " + " | ".join(KL_ESTIMATOR_NAMES))
    entropy_coef: float = opt(0.0, "entropy bonus coefficient")
    aggregation: str = opt("token-mean", "loss aggregation: " + " | ".join(AGGREGATIONS))
    adv_eps: float = opt(1e-6, "epsilon added to the baseline std (grpo, window, extra_samples)")
    window: int = opt(8, "window advantage: how many of the example's latest rewards (this round's included) "
                         "form the mean/std baseline (W)")
    extra_samples: int = opt(4, "extra_samples advantage: samples per example drawn only to estimate the "
                                "baseline mean/std, never trained on (M)")
    ppo_epochs: int = opt(1, "passes over each round's rollouts")
    mini_batches: int = opt(1, "optimizer steps per pass: the round's sequences split into this many parts")
    skip_zero_signal: bool = opt(True, "skip the backward pass of rounds that carry no gradient signal")

    def __post_init__(self):
        _require(self.advantage in ADVANTAGE_NAMES, "advantage",
                 f"must be one of {', '.join(ADVANTAGE_NAMES)}, got {self.advantage!r}")
        _require(0 <= self.clip_low < 1, "clip_low", f"must be in [0, 1), got {self.clip_low}")
        _require(self.clip_high >= 0, "clip_high", f"must be >= 0, got {self.clip_high}")
        _require(self.dual_clip is None or self.dual_clip > 1, "dual_clip",
                 f"must be > 1 (typically 3) or none, got {self.dual_clip}")
        _require(self.kl_coef >= 0, "kl_coef", f"must be >= 0, got {self.kl_coef}")
        _require(self.kl_estimator in KL_ESTIMATOR_NAMES, "kl_estimator",
                 f"must be one of {', '.join(KL_ESTIMATOR_NAMES)}, got {self.kl_estimator!r}")
        _require(self.entropy_coef >= 0, "entropy_coef", f"must be >= 0, got {self.entropy_coef}")
        _require(self.aggregation in AGGREGATIONS, "aggregation",
                 f"must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}")
        _require(self.adv_eps > 0, "adv_eps", f"must be > 0, got {self.adv_eps}")
        _require(self.reward_fail != self.reward_success, "reward_success", "must differ from --reward-fail")
        _require(self.window >= 1, "window", f"must be >= 1, got {self.window}")
        _require(self.extra_samples >= 2, "extra_samples", f"must be >= 2 (a std needs two samples), got "
                 f"{self.extra_samples}")
        _require(self.ppo_epochs >= 1, "ppo_epochs", f"must be >= 1, got {self.ppo_epochs}")
        _require(self.mini_batches >= 1, "mini_batches", f"must be >= 1, got {self.mini_batches}")

    def loss_spec(self, max_len: int) -> PGLossSpec:
        from fastrft.algo.loss import PGLossSpec

        return PGLossSpec(clip_low=self.clip_low, clip_high=self.clip_high, dual_clip=self.dual_clip,
                          kl_coef=self.kl_coef, kl_estimator=self.kl_estimator, entropy_coef=self.entropy_coef,
                          aggregation=self.aggregation, max_len=max_len)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = opt(1e-6, "AdamW peak learning rate: reached after the warm-up, then held (constant) or "
                          "decayed (--schedule linear, cosine)")
    weight_decay: float = opt(0.01, "AdamW weight decay")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.999, "AdamW beta2")
    grad_clip: float = opt(1.0, "max global gradient norm (0 = off)")
    warmup_steps: int = opt(0, "linear learning-rate warm-up, in optimizer steps (--warmup-rounds: its old name)")
    schedule: str = opt("constant", "learning-rate schedule after warm-up: constant | linear | cosine")
    min_lr_ratio: float = opt(0.0, "final lr / lr of the linear and cosine schedules")
    max_tokens_per_step: int | None = opt(None, "token budget of one forward + backward: each optimizer step's "
                                                "sequences are split into micro-batches of at most this many "
                                                "packed tokens (no sequence is split; one longer than the budget "
                                                "gets a micro-batch of its own) and their gradients accumulate, "
                                                "normalised over the whole step. none = automatic: 2048 on CPU; "
                                                "on CUDA derived from free memory and printed", resumable=True)

    def __post_init__(self):
        _require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _require(0 <= self.beta1 < 1, "beta1", f"must be in [0, 1), got {self.beta1}")
        _require(0 <= self.beta2 < 1, "beta2", f"must be in [0, 1), got {self.beta2}")
        _require(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 = off)")
        _require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        _require(self.schedule in LR_SCHEDULES, "schedule", f"must be one of {', '.join(LR_SCHEDULES)}, "
                 f"got {self.schedule!r}")
        _require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _require(self.max_tokens_per_step is None or self.max_tokens_per_step >= 1, "max_tokens_per_step",
                 f"must be >= 1 token (or none for the automatic default), got {self.max_tokens_per_step}")

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based) out of ``total_steps``.

        >>> o = OptimConfig(lr=1.0, warmup_steps=2, schedule="linear")
        >>> [round(o.lr_at(s, 6), 3) for s in range(6)]
        [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
        """
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, total_steps - self.warmup_steps)
        frac = min(1.0, (step - self.warmup_steps) / span)
        if self.schedule == "constant":
            scale = 1.0
        elif self.schedule == "linear":
            scale = 1.0 - frac
        else:
            scale = 0.5 * (1.0 + math.cos(math.pi * frac))
        return self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * scale)


@dataclass(frozen=True)
class EvalConfig:
    eval_every: int = opt(100, "evaluate every N rounds (and at round 0 and at the end); 0 = only start/end")
    train_samples: int = opt(8, "samples per training example for train Pass@1")
    test_size: int | None = opt(None, "test problems per evaluation (a seeded subset; none = all)")
    eval_temperature: float = opt(1.0, "sampling temperature of Pass@1 evaluation")
    greedy: bool = opt(True, "also report greedy accuracy on the test set")
    eval_max_new_tokens: int | None = opt(None, "response budget in evaluation (none = --max-new-tokens)")
    extra_rewards: tuple[str, ...] = opt((), "more reward functions to report beside the training one, e.g. gsm8k")
    train_eval_size: int = opt(16, "with --examples-per-round: pool examples (a seeded subset) that train "
                                   "Pass@1 is measured on")
    eval_k: tuple[int, ...] = opt((1,), "k of the test set's pass@k and maj@k (maj@k: math rewards), e.g. 1,4,16; "
                                        "each test problem gets max(k) samples unless --eval-samples says more")
    eval_samples: int | None = opt(None, "temperature samples per test problem (none = the largest --eval-k)")
    eval_split: str = opt("test", "the split the test evaluation draws its problems from: test, or train (its "
                                  "problems outside the training pool)")
    eval_metrics: str | None = opt(None, "module:function called at every evaluation with the test completions, "
                                         "answers and dataset columns; its dict of floats is logged as eval_<name>")

    def __post_init__(self):
        _require(self.eval_every >= 0, "eval_every", "must be >= 0")
        _require(self.train_eval_size >= 1, "train_eval_size", "must be >= 1")
        _require(self.train_samples >= 1, "train_samples", "must be >= 1")
        _require(self.test_size is None or self.test_size >= 1, "test_size", "must be >= 1 or none")
        _require(self.eval_temperature > 0, "eval_temperature", "must be > 0 (greedy is reported separately)")
        _require(self.eval_max_new_tokens is None or self.eval_max_new_tokens >= 1, "eval_max_new_tokens",
                 "must be >= 1 or none")
        _require(len(self.eval_k) >= 1 and all(k >= 1 for k in self.eval_k), "eval_k",
                 f"must be one or more k >= 1, e.g. 1,4,16 (got {','.join(map(str, self.eval_k)) or 'none'})")
        _require(self.eval_samples is None or self.eval_samples >= 1, "eval_samples", "must be >= 1 or none")
        _require(self.eval_split in ("test", "train"), "eval_split", f"is {self.eval_split!r}; choose test or train")
        _require(self.eval_samples is None or max(self.eval_k) <= self.eval_samples, "eval_k",
                 f"has k = {max(self.eval_k, default=0)}, more than the {self.eval_samples} samples per test problem "
                 "of --eval-samples: pass@k and maj@k need n >= k samples (raise --eval-samples or drop that k)")
        from fastrft import rewards

        for name in self.extra_rewards:
            _require(name in rewards.names(), "extra_rewards", f"has unknown reward {name!r}; choose from "
                     f"{', '.join(rewards.names())}")

    @property
    def samples(self) -> int:
        """Temperature samples per test problem: --eval-samples, or the largest --eval-k."""
        return self.eval_samples if self.eval_samples is not None else max(self.eval_k)


@dataclass(frozen=True)
class RunConfig:
    rounds: int = opt(200, "training rounds; each samples once, then takes one optimizer step per PPO epoch "
                           "and mini-batch (none when skipped)")
    seed: int = opt(0, "seed of sampling, data subsets and initialisation")
    out: str | None = opt(None, "run directory", session=True, shown="runs/<name>-<timestamp>")
    name: str = opt("train", "run name, used in the default run directory")
    progress: bool = opt(True, "show a progress bar", session=True)
    log_samples: int = opt(1, "responses per round written to rollouts.jsonl with their rewards (0 = none)")
    save_every: int = opt(50, "write a checkpoint every N rounds, and at the end (0 = only at the end)")
    keep_checkpoints: int = opt(2, "how many of the latest checkpoints are kept", session=True)
    tensorboard: bool = opt(False, "also write TensorBoard event files under <run dir>/tb (needs the "
                                   "tensorboard package); the same as --report-to tensorboard", session=True)
    report_to: tuple[str, ...] = opt((), "where the metrics also go, as TRL's report_to: tensorboard, wandb (the "
                                         "wandb package; WANDB_PROJECT, WANDB_MODE=offline), none; comma-separated",
                                      session=True)
    threads: int = opt(0, "torch CPU threads for this run; 0 = torch's default (one per core). On a machine "
                          "shared with other work, or for each of several jobs side by side, 1 is often faster",
                          session=True)
    dist_timeout: float = opt(600.0, "seconds a rank of a torchrun job waits for the others (at the rendezvous "
                                     "and in each collective) before failing with a message", session=True)

    def __post_init__(self):
        _require(self.dist_timeout > 0, "dist_timeout", f"must be > 0 seconds, got {self.dist_timeout}")
        _require(self.threads >= 0, "threads", f"must be >= 0 (0 = torch's default), got {self.threads}")
        _require(self.rounds >= 0, "rounds", f"must be >= 0, got {self.rounds}")
        _require(self.save_every >= 0, "save_every", f"must be >= 0, got {self.save_every}")
        _require(self.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        _require(self.log_samples >= 0, "log_samples", f"must be >= 0, got {self.log_samples}")
        _require(all(x in REPORT_TO for x in self.report_to), "report_to",
                 f"must list {', '.join(REPORT_TO)}, got {','.join(self.report_to)!r}")
        _require("none" not in self.report_to or len(self.report_to) == 1, "report_to", "none cannot be combined")
        _require(not (self.tensorboard and "none" in self.report_to), "report_to",
                 "none contradicts --tensorboard (which writes <run dir>/tb); drop one of the two")
        _require(self.out is None or self.out.strip() != "", "out", "is empty; give a directory (or leave the "
                 "flag out for runs/<name>-<timestamp>)")
        _require(self.name.strip() != "", "name", "is empty; give the run a name (it starts the default --out)")


@dataclass(frozen=True)
class TrainConfig:
    """Everything one run needs. Cross-field rules are checked here."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        from fastrft.algo.advantage import ADVANTAGES

        est = ADVANTAGES[self.algo.advantage]
        if est.needs_group and self.rollout.group_size < 2:
            raise ConfigError(
                f"advantage={self.algo.advantage} (--advantage) needs a group of rollouts to compute a baseline, "
                f"but group_size (--group-size) is {self.rollout.group_size}: with one rollout every advantage is 0 "
                "and nothing is learned. Use --group-size 2 or more, a one-rollout baseline (--advantage window or "
                "extra_samples), or --advantage none."
            )

        est.baseline.check(self)
        if self.data.examples_per_round and self.data.train_pool is not None \
                and self.data.examples_per_round > self.data.train_pool:
            raise ConfigError(f"examples_per_round (--examples-per-round) {self.data.examples_per_round} exceeds "
                              f"train_pool (--train-pool) {self.data.train_pool}")
        if self.data.reward_funcs and (self.algo.reward_fail, self.algo.reward_success) != (0.0, 1.0):
            raise ConfigError("reward_fail/reward_success (--reward-fail/--reward-success) map the correctness score, "
                              "but reward_funcs (--reward-funcs) sets the reward itself; scale or shift the reward "
                              "with --reward-weights or in the functions, and drop the mapping flags")
        if self.eval.train_samples > self.rollout.max_batch_size:
            raise ConfigError(f"train_samples (--train-samples) {self.eval.train_samples} exceeds max_batch_size "
                              f"(--max-batch-size) {self.rollout.max_batch_size}: the samples of one prompt are "
                              "decoded together; raise --max-batch-size or lower --train-samples")

    @property
    def loss_spec(self) -> PGLossSpec:
        return self.algo.loss_spec(max_len=self.rollout.max_new_tokens)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def record(self) -> dict[str, Any]:
        """What config.json holds: every field but the session settings (:func:`opt`)."""
        session = session_fields()
        return {k: {n: v for n, v in sub.items() if (k, n) not in session} for k, sub in self.to_dict().items()}

    def record_json(self) -> str:
        return json.dumps(self.record(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        unknown = sorted(set(data) - set(GROUPS))
        if unknown:
            raise ConfigError(f"unknown config section(s) {', '.join(map(repr, unknown))}; "
                              f"valid sections: {', '.join(GROUPS)}")
        groups = {}
        for f in dataclasses.fields(cls):
            sub = data.get(f.name, {})
            if not isinstance(sub, dict):
                raise ConfigError(f"config section {f.name!r} must be a mapping")
            groups[f.name] = build_group(GROUPS[f.name], sub, f.name)
        return cls(**groups)

    def replace(self, **groups: Any) -> "TrainConfig":
        return dataclasses.replace(self, **groups)


def session_fields() -> set[tuple[str, str]]:
    """(section, field) of every session setting: not the run's identity (:func:`opt`)."""
    return {(g, f.name) for g, cls in GROUPS.items() for f in dataclasses.fields(cls) if f.metadata.get("session")}


def resumable_fields() -> set[tuple[str, str]]:
    """(section, field) of the recorded settings a resume may change (:func:`opt`)."""
    return {(g, f.name) for g, cls in GROUPS.items() for f in dataclasses.fields(cls) if f.metadata.get("resumable")}


#: (section, old name) -> new name of renamed fields: config files and flags may still use the old name.
ALIASES = {("optim", "warmup_rounds"): "warmup_steps"}


def canonical(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """A config section's values with renamed fields under their current names (:data:`ALIASES`)."""
    out = dict(values)
    for (sec, old), new in ALIASES.items():
        if sec == section and old in out:
            value = out.pop(old)
            if new in out and out[new] != value:
                raise ConfigError(f"{section}: {old} (the old name of {new}) is {value!r} but {new} is {out[new]!r}; "
                                  f"keep only {new}")
            out[new] = value
    return out


GROUPS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "rollout": RolloutConfig, "algo": AlgoConfig,
                           "optim": OptimConfig, "eval": EvalConfig, "run": RunConfig}


def build_group(cls: type, values: dict[str, Any], section: str = "") -> Any:
    values = canonical(section, values)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known - ({"dtype"} if cls is ModelConfig else set()))
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(unknown)} in config section {section!r}; "
                          f"valid: {', '.join(sorted(known))}")
    if cls is ModelConfig and "dtype" in values:  # config files written before --precision existed
        values = dict(values)
        old = values.pop("dtype")
        if old not in LEGACY_DTYPES:
            raise ConfigError(f"{section or 'model'}.dtype must be one of {', '.join(LEGACY_DTYPES)}, got {old!r} "
                              f"(it is now spelled precision: {', '.join(PRECISIONS)})")
        if values.get("precision", "auto") == "auto":
            values["precision"] = LEGACY_DTYPES[old]
        elif values["precision"] != LEGACY_DTYPES[old]:
            raise ConfigError(f"{section or 'model'}: dtype {old!r} and precision {values['precision']!r} "
                              "disagree; keep only precision")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(v, hints[k], f"{section}.{k}" if section else k) for k, v in values.items()})


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check a value read from a file against its field annotation (JSON has lists, not tuples, and
    ints where floats are meant); a mismatch is a ConfigError naming the field."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(_coerce(v, args[0], where) for v in value)
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}[tp](value)
    if not ok:
        raise ConfigError(f"{where} must be of type {tp.__name__}, got {value!r}")
    return float(value) if tp is float else value
