"""Native decoder parity with transformers, per family, and the loader's refusals.

The tiny checkpoints are built and saved by transformers itself (tests/conftest.py), then loaded by both
implementations. Logits must agree to 1e-4 of the logits' scale in fp32 (observed: ~1e-6; fp32 matmul
reassociation between two implementations is ~1e-6 relative, so 1e-4 leaves margin without hiding a
wrong formula, which shows up at 1e-2 or more). Greedy decoding must be token-identical.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import FAMILY_NAMES

import fastrft
from fastrft.errors import ModelLoadError
from fastrft.models import packed_positions


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_logits_match_transformers(tiny_models, family):
    path = tiny_models[family]
    ours, ref = fastrft.load_model(path), _hf(path)
    x = torch.randint(3, ours.config.vocab_size, (3, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(x).logits.float()
    got = ours.logits(x)
    assert got.shape == expected.shape
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-4 * scale


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_greedy_generation_matches_transformers(tiny_models, family):
    path = tiny_models[family]
    ours, ref = fastrft.load_model(path), _hf(path)
    prompt = torch.randint(3, ours.config.vocab_size, (17,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        x = torch.tensor([prompt])
        # An explicit mask: without one, generate() masks every prompt token equal to pad_token_id.
        out = ref.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=32,
                           min_new_tokens=32, eos_token_id=None, pad_token_id=0)
    expected = out[0, len(prompt):].tolist()
    got = fastrft.generate(ours, [prompt], n=1, max_new_tokens=32, temperature=0, eos_token_ids=[])[0][0]
    assert got.token_ids == expected
    assert got.finish_reason == "length"


@pytest.mark.parametrize("family", ["llama", "qwen3", "olmo2"])
def test_packed_forward_equals_separate_sequences(tiny_models, family):
    """Causal attention stays within each packed sequence, positions restart at 0."""
    model = fastrft.load_model(tiny_models[family])
    g = torch.Generator().manual_seed(3)
    lens = [5, 11, 1, 11, 7]  # repeated and unit lengths exercise the grouped SDPA path
    seqs = [torch.randint(3, model.config.vocab_size, (n,), generator=g) for n in lens]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        packed = model.forward_packed(torch.cat(seqs), cu)
        for s, start in zip(seqs, cu[:-1].tolist()):
            alone = model.forward_packed(s, torch.tensor([0, len(s)], dtype=torch.int32))
            torch.testing.assert_close(packed[start:start + len(s)], alone, atol=1e-5, rtol=1e-5)


def test_packed_positions():
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    assert packed_positions(cu, 7).tolist() == [0, 1, 2, 0, 1, 2, 3]


@pytest.mark.parametrize("family", ["llama-tied-bias", "qwen2", "olmo2"])
def test_cached_prefill_and_decode_equal_full_forward(tiny_models, family):
    """Left-padded batched prefill, then decode steps with cache growth, reproduce the full forward."""
    model = fastrft.load_model(tiny_models[family])
    g = torch.Generator().manual_seed(4)
    lens, steps = [9, 4], 6
    seqs = [torch.randint(3, model.config.vocab_size, (n + steps,), generator=g) for n in lens]
    width = max(lens)
    ids = torch.zeros(2, width, dtype=torch.long)
    valid = torch.zeros(2, width, dtype=torch.bool)
    for i, n in enumerate(lens):
        ids[i, width - n:], valid[i, width - n:] = seqs[i][:n], True
    pos = (valid.long().cumsum(-1) - 1).clamp_min(0)
    cache = model.new_cache(2, width + 1)  # forces the cache to grow during decode
    with torch.no_grad():
        hidden = model.forward_cached(ids, pos, cache, valid)
        got = [[hidden[i, -1]] for i in range(2)]
        for t in range(steps - 1):
            tok = torch.stack([seqs[i][lens[i] + t] for i in range(2)])[:, None]
            p = torch.tensor([[lens[0] + t], [lens[1] + t]])
            h = model.forward_cached(tok, p, cache)
            for i in range(2):
                got[i].append(h[i, -1])
        for i in range(2):
            full = model.forward_packed(seqs[i], torch.tensor([0, len(seqs[i])], dtype=torch.int32))
            want = full[lens[i] - 1: lens[i] - 1 + steps]
            torch.testing.assert_close(torch.stack(got[i]), want, atol=1e-5, rtol=1e-5)


def test_sharded_checkpoint_loads(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tiny_models["llama"]
    dst = tmp_path / "sharded"
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, keys in halves.items():
        save_file({k: state[k] for k in keys}, str(dst / fname))
        weight_map.update({k: fname for k in keys})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    x = torch.randint(3, 80, (1, 12))
    torch.testing.assert_close(fastrft.load_model(dst).logits(x), fastrft.load_model(src).logits(x))


def test_dtype_and_eos_from_generation_config(tiny_models, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_models["qwen2"], dst)
    (dst / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 5]}))
    model = fastrft.load_model(dst, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert model.eos_token_ids == (1, 5)


def _broken_copy(src, tmp_path, edit=None, drop=None):
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    if edit:
        cfg = json.loads((dst / "config.json").read_text())
        edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if drop:
        (dst / drop).unlink()
    return dst


@pytest.mark.parametrize("edit,drop,match", [
    (lambda c: c.update(model_type="gpt2"), None, "model_type 'gpt2' is not supported"),
    (lambda c: c.update(use_sliding_window=True), None, "use_sliding_window"),
    (lambda c: c.update(hidden_act="gelu"), None, "hidden_act"),
    (lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), None, "yarn"),
    (lambda c: c.pop("hidden_size"), None, "hidden_size"),
    (lambda c: c.update(num_hidden_layers=3), None, "missing from the checkpoint"),
    (lambda c: c.update(intermediate_size=100), None, "shape"),
    (None, "config.json", "config.json"),
    (None, "model.safetensors", "no \\*.safetensors"),
])
def test_loader_refuses_clearly(tiny_models, tmp_path, edit, drop, match):
    dst = _broken_copy(tiny_models["qwen2"], tmp_path, edit, drop)
    with pytest.raises(ModelLoadError, match=match):
        fastrft.load_model(dst)


def test_missing_model_names_alias_and_hub_policy(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="neither a directory, a known alias.*smollm2-135m-instruct.*hub id"):
        fastrft.load_model(str(tmp_path / "nowhere"))
    # An owner/name is a hub id, looked up in the Hugging Face cache (tests/models/test_hub.py trains from one).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError, match="not in the Hugging Face cache .*HF_HUB_OFFLINE"):
        fastrft.load_model("Qwen/Qwen2.5-0.5B-Instruct")


def test_tokenizer_missing_files(tiny_models, tmp_path):
    dst = tmp_path / "notok"
    dst.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_models["llama"] / f, dst / f)
    fastrft.load_model(dst)  # weights alone are enough for the model
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        fastrft.load_tokenizer(dst)


def test_rope_parameters_nested_per_layer_type(tiny_models, tmp_path):
    def nest(same: bool):
        def edit(c):
            base = {"rope_type": "default", "rope_theta": 12345.0}
            other = base if same else {**base, "rope_theta": 99.0}
            c["rope_parameters"] = {"full_attention": base, "sliding_attention": other}
        return edit

    model = fastrft.load_model(_broken_copy(tiny_models["qwen3"], tmp_path / "a", nest(True)))
    assert model.config.rope.theta == 12345.0
    with pytest.raises(ModelLoadError, match="differ between layer types"):
        fastrft.load_model(_broken_copy(tiny_models["qwen3"], tmp_path / "b", nest(False)))
