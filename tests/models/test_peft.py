"""LoRA adapters in and out of PEFT: ``fastrft export --adapter`` writes what ``PeftModel.from_pretrained``
loads, with the same logits; ``--lora-init`` starts from an adapter that peft itself wrote; a mismatched
adapter is refused with the mismatch named; the merged export is what transformers loads without peft."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from conftest import tiny_config, with_signal
from fastrft.cli import main
from fastrft.config import ModelConfig
from fastrft.errors import ConfigError
from fastrft.models import lora
from fastrft.precision import load_policy
from fastrft.trainer import Trainer

IDS = torch.tensor([[2, 5, 9, 4, 7, 3, 8, 1]])
# fp32 rounding: the two models run the same fp32 ops in different kernels (PyTorch's SDPA against fastrft's
# attention, fused against separate adds); measured max 2e-6 on logits of size ~3.
ATOL = 1e-4


def _hf(model_dir):
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def _logits(model) -> torch.Tensor:
    cu = torch.tensor([0, IDS.shape[1]], dtype=torch.int32)
    with torch.no_grad():
        return (model.forward_packed(IDS[0], cu) @ model.lm_head_weight.T)[None]


def _lora_config(model_dir, out, rank=4, **kw):
    cfg = with_signal(tiny_config(model_dir, out, rounds=2, eval_every=0, lr=3e-2))
    return cfg.replace(model=dataclasses.replace(cfg.model, lora_rank=rank, **kw))


@pytest.fixture(scope="module", params=[False, True], ids=["adapters", "adapters+embeddings"])
def lora_run(tiny_llama, tmp_path_factory, request):
    """A two-round LoRA run (adapters on every projection, trained B non-zero; with the embeddings and the LM
    head trained too, PEFT's modules_to_save) and its trained model."""
    out = tmp_path_factory.mktemp("lora-run") / "run"
    trainer = Trainer(_lora_config(tiny_llama, out, lora_train_embeddings=request.param))
    trainer.run()
    model = trainer.precision.master
    assert any(torch.count_nonzero(layer.lora_B.weight) for _, layer in lora.adapted(model))
    return out, model


def test_export_adapter_loads_in_peft_with_the_same_logits(lora_run, tiny_llama, tmp_path):
    run_dir, model = lora_run
    assert main(["export", str(run_dir), "--out", str(tmp_path / "adapter"), "--adapter"]) == 0
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["modules_to_save"]
    assert saved == (["embed_tokens", "lm_head"] if model.model.embed_tokens.weight.requires_grad else None)
    peft_model = PeftModel.from_pretrained(_hf(tiny_llama), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = peft_model(IDS).logits
    ours = _logits(model)
    assert (theirs - ours).abs().max() <= ATOL
    # The adapter matters: without it the logits are the base model's, farther off than the rounding.
    with torch.no_grad(), peft_model.disable_adapter():
        assert (peft_model(IDS).logits - ours).abs().max() > 10 * ATOL


def test_merged_export_loads_in_transformers(lora_run, tiny_llama, tmp_path):
    run_dir, model = lora_run
    assert main(["export", str(run_dir), "--out", str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        merged = _hf(tmp_path / "merged")(IDS).logits
    assert (merged - _logits(model)).abs().max() <= ATOL


def _peft_adapter(model_dir, out, rank=4, targets=lora.TARGETS, alpha=32):
    """An adapter written by peft itself, with non-zero B (as if trained)."""
    torch.manual_seed(0)
    peft_model = get_peft_model(_hf(model_dir), LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                                           lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(str(out))
    return peft_model.eval()


def test_lora_init_starts_from_a_peft_adapter(tiny_llama, tmp_path):
    peft_model = _peft_adapter(tiny_llama, tmp_path / "adapter")
    cfg = _lora_config(tiny_llama, tmp_path / "run", lora_init=str(tmp_path / "adapter"))
    model = load_policy(cfg, "fp32", torch.device("cpu"))
    with torch.no_grad():
        theirs = peft_model(IDS).logits
    assert (theirs - _logits(model)).abs().max() <= ATOL


@pytest.mark.parametrize(("change", "named"), [
    (dict(lora_rank=8), "rank 4, this run --lora-rank 8"),
    (dict(lora_targets=("q_proj", "v_proj")), "targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"),
    (dict(lora_alpha=16.0), "lora_alpha 32, this run --lora-alpha 16"),
])
def test_a_mismatched_adapter_is_refused_with_the_mismatch_named(tiny_llama, tmp_path, change, named):
    _peft_adapter(tiny_llama, tmp_path / "adapter")
    with pytest.raises(ConfigError, match="lora_init") as err:
        ModelConfig(model=str(tiny_llama), **{"lora_rank": 4, "lora_init": str(tmp_path / "adapter"), **change})
    assert named in str(err.value)


def test_an_adapter_of_another_base_is_refused(tiny_llama, tmp_path):
    _peft_adapter(tiny_llama, tmp_path / "adapter")
    cfg_file = tmp_path / "adapter" / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "base_model_name_or_path": "Qwen/Qwen2.5-7B"}))
    with pytest.raises(ConfigError, match="trained on 'Qwen/Qwen2.5-7B'"):
        ModelConfig(model=str(tiny_llama), lora_rank=4, lora_init=str(tmp_path / "adapter"))
    with pytest.raises(ConfigError, match="no such directory"):
        ModelConfig(model=str(tiny_llama), lora_rank=4, lora_init=str(tmp_path / "nowhere"))


def test_export_adapter_of_a_full_run_is_refused(tiny_llama, tmp_path, capsys):
    run = tmp_path / "full"
    Trainer(tiny_config(tiny_llama, run, rounds=1, eval_every=0)).run()
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "a"), "--adapter"]) == 2
    err = capsys.readouterr().err
    assert "without LoRA" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()
