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
