"""Exported and converted model directories name their transformers class in config.json
("architectures"): TRL's loader fails on null there, and vLLM picks its model class from it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fastrft.checkpoint import save_checkpoint
from fastrft.export import export_run
from fastrft.models import load_model
from fastrft.models.config import FAMILIES, with_architecture

EXPECTED = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
            "olmo2": "Olmo2ForCausalLM"}


def test_every_family_has_its_class():
    assert {name: f.architecture for name, f in FAMILIES.items()} == EXPECTED
    import transformers

    assert all(hasattr(transformers, cls) for cls in EXPECTED.values())


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "olmo2"])
def test_export_writes_architectures_even_when_the_source_has_none(tiny_models, tmp_path, family):
    # A source directory as GGUF conversion used to leave it: "architectures": null.
    source = tmp_path / "source"
    shutil.copytree(tiny_models[family], source)
    hf = json.loads((source / "config.json").read_text())
    assert hf["model_type"] == family
    hf["architectures"] = None
    (source / "config.json").write_text(json.dumps(hf))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"model": str(source)}}))
    save_checkpoint(run, 1, {"model": load_model(source).state_dict()}, keep=1)

    out = export_run(run, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["architectures"] == [EXPECTED[family]]
    from transformers import AutoModelForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)).__name__ == EXPECTED[family]


def test_an_existing_class_is_kept():
    hf = {"model_type": "llama", "architectures": ["MyLlamaForCausalLM"]}
    assert with_architecture(hf) is hf
    assert with_architecture({"model_type": "qwen2"})["architectures"] == ["Qwen2ForCausalLM"]
    assert "architectures" not in with_architecture({"model_type": "gpt2"})
