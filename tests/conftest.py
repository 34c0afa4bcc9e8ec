"""Shared fixtures: tiny random checkpoints of every supported family, saved by transformers itself, and
a character-level tokenizer with a chat template. Nothing is downloaded."""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
import torch

# No test may reach a model hub: with these set, any attempt fails instead of downloading.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Without a GPU the Triton kernels run in Triton's CPU interpreter; the flag must be set before any
# kernel module is imported (test modules are imported after this file).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

CHARS = list(string.digits + string.ascii_letters + " +-*=?.,:#\"'\n()$\\{}")
SPECIALS = ["<pad>", "<eos>", "<bos>"]
VOCAB = SPECIALS + CHARS  # pad 0, eos 1, bos 2
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<bos>' + m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '=' }}{% endif %}"
)


def make_tokenizer():
    """A character-level fast tokenizer over VOCAB with a minimal chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    tok.add_special_tokens({"additional_special_tokens": []})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _common(vocab: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                bos_token_id=2, eos_token_id=1, pad_token_id=0, initializer_range=0.2)


def family_configs(vocab: int) -> dict:
    """name -> transformers config of a tiny model; covers every switch of the native decoder."""
    from transformers import LlamaConfig, Olmo2Config, Qwen2Config, Qwen3Config

    c = _common(vocab)
    return {
        "llama": LlamaConfig(**c, tie_word_embeddings=False),
        "llama-tied-bias": LlamaConfig(**c, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                                       rope_theta=500000.0),
        "llama3-rope": LlamaConfig(**c, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 64},
                                   rope_theta=500000.0),
        "qwen2": Qwen2Config(**c, tie_word_embeddings=True, rope_theta=1000000.0),
        "qwen3": Qwen3Config(**{**c, "num_attention_heads": 4}, head_dim=24, tie_word_embeddings=False),
        "olmo2": Olmo2Config(**c, tie_word_embeddings=False, rms_norm_eps=1e-6),
    }


def save_tiny_model(name: str, out: Path, vocab: int = len(VOCAB), seed: int = 0) -> Path:
    """Build the named tiny family with transformers (random init from ``seed``) and save it with its
    tokenizer into ``out``."""
    from transformers import AutoModelForCausalLM

    cfg = family_configs(vocab)[name]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # The default init leaves norms at 1 and biases at 0; randomise them so that every weight matters.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    make_tokenizer().save_pretrained(out)
    return out


FAMILY_NAMES = ["llama", "llama-tied-bias", "llama3-rope", "qwen2", "qwen3", "olmo2"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {name: save_tiny_model(name, root / name) for name in FAMILY_NAMES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory):
    """Keep model conversions of the test run out of the user's cache."""
    old = os.environ.get("FASTRFT_HOME")
    os.environ["FASTRFT_HOME"] = str(tmp_path_factory.mktemp("fastrft-home"))
    yield
    if old is None:
        os.environ.pop("FASTRFT_HOME", None)
    else:
        os.environ["FASTRFT_HOME"] = old


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))


# ----------------------------------------------------------------------------------------- shared builders
ROOT = Path(__file__).resolve().parents[1]  # the repository


def untimed(records: list[dict]) -> list[dict]:
    """Records without their wall-clock fields: the rule bench/same_run.py compares runs by
    (fastrft.report.records.wall_clock)."""
    from fastrft.report.records import untimed as one

    return [one(r) for r in records]


def subprocess_env(distributed: bool = False, tests: bool = False) -> dict[str, str]:
    """The environment of a child run whose bits are compared: one BLAS thread, a fixed hash seed; for a
    torchrun child, none of this process's own rendezvous variables; ``tests``: this directory importable
    (e.g. --reward-funcs conftest:digit_share)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    if tests:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests"), env.get("PYTHONPATH")]))
    if distributed:
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
    return env


def tiny_config(model_dir, out, *, advantage="grpo", group_size=8, rounds=20, kl_coef=0.0, lr=3e-3, eval_every=10,
                seed=0, **algo):
    """'What is 1 + 1?' with two response tokens: reward 1 iff the last number printed is 2. A random
    char-level model succeeds a few percent of the time, so a working policy gradient finds it fast."""
    from fastrft.config import (AlgoConfig, DataConfig, EvalConfig, ModelConfig, OptimConfig, RolloutConfig,
                                RunConfig, TrainConfig)

    return TrainConfig(
        model=ModelConfig(model=str(model_dir)),
        data=DataConfig(dataset="arithmetic", level="add1", example_index=(0,)),
        rollout=RolloutConfig(group_size=group_size, max_new_tokens=2),
        algo=AlgoConfig(advantage=advantage, kl_coef=kl_coef, **algo),
        optim=OptimConfig(lr=lr),
        eval=EvalConfig(eval_every=eval_every, train_samples=64, test_size=8, greedy=True),
        run=RunConfig(rounds=rounds, seed=seed, out=str(out), progress=False),
    )


EXACT_KV_TOKENS = 160  # the tiny model's cache in tokens: one sequence fits, 8 samples of a prompt do not


def exact_config(model_dir, out, *, precision="fp32", mode="on", rounds=3, **algo):
    """The exact mode on add2: 2 examples a round of 8 samples, a cache small enough to preempt, a token
    budget that splits each step."""
    from fastrft.config import (AlgoConfig, DataConfig, EvalConfig, ModelConfig, OptimConfig, RolloutConfig,
                                RunConfig, TrainConfig)

    kv_bytes = 2 * 2 * 2 * 16 * (4 if precision == "fp32" else 2)  # layers, K and V, kv heads, head dim
    return TrainConfig(
        model=ModelConfig(model=str(model_dir), precision=precision, exact_logprobs=mode),
        data=DataConfig(dataset="arithmetic", level="add2", examples_per_round=2, train_pool=16),
        rollout=RolloutConfig(group_size=8, max_new_tokens=24, kv_cache_memory=EXACT_KV_TOKENS * kv_bytes),
        algo=AlgoConfig(advantage="grpo", **algo),
        optim=OptimConfig(lr=3e-3, max_tokens_per_step=200),
        eval=EvalConfig(eval_every=0, train_samples=1, test_size=2),
        run=RunConfig(rounds=rounds, seed=1, out=str(out), progress=False),
    )


def run_counting_preemptions(cfg, count_preemptions: bool = False):
    """Train ``cfg``; (the trainer, its round records, how many sequences the engine preempted)."""
    from fastrft.engine import engine as engine_module
    from fastrft.report import read_metrics
    from fastrft.trainer import Trainer

    preempted = []
    make = engine_module.make_scheduler

    class Counting:  # the C++ scheduler's methods are read-only: wrap the object
        def __init__(self, real):
            self.real = real

        def __getattr__(self, name):
            return getattr(self.real, name)

        def schedule(self):
            out = self.real.schedule()
            preempted.append(len(out.preempted))
            return out

    if count_preemptions:
        engine_module.make_scheduler = lambda *a, **k: Counting(make(*a, **k))
    try:
        trainer = Trainer(cfg)
        trainer.run()
    finally:
        engine_module.make_scheduler = make
    rounds = [r for r in read_metrics(trainer.out_dir / "metrics.jsonl") if r["kind"] == "round"]
    return trainer, rounds, sum(preempted)


def train_and_collect(cfg):
    """Run ``cfg`` to the end: (its round records, its final master weights, cloned)."""
    from fastrft.report import read_metrics
    from fastrft.trainer import Trainer

    trainer = Trainer(cfg)
    trainer.run()
    rounds = [r for r in read_metrics(trainer.out_dir / "metrics.jsonl") if r["kind"] == "round"]
    return rounds, {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}


def digit_share(response: str, answer: str) -> float:
    """A training reward every group has signal under, even from a random tiny model: the share of digits in
    the response (as 'conftest:digit_share' in --reward-funcs)."""
    return sum(c.isdigit() for c in response) / max(1, len(response))


def with_signal(cfg):
    """``cfg`` trained on :func:`digit_share`, so that every round's update is non-zero."""
    import dataclasses

    return cfg.replace(data=dataclasses.replace(cfg.data, reward_funcs=("conftest:digit_share",)))


def tiny_train_args(model, out, *extra):
    """`fastrft train` arguments of a two-round run of the tiny model (bad-input tests add the flag under test)."""
    return ["train", "--model", str(model), "--rounds", "2", "--eval-every", "0", "--group-size", "2",
            "--advantage", "grpo", "--max-new-tokens", "3", "--test-size", "2", "--train-samples", "2",
            "--lr", "1e-3", "--out", str(out), "--no-progress", *extra]


def one_line_error(capsys, *needles):
    """The captured stderr is one 'fastrft: error:' line, no traceback, holding every needle; returned."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastrft: error: "), err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    return err
