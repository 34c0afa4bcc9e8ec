"""Load a native model from a local Hugging Face-format directory.

A model directory holds ``config.json`` and the weights as ``model.safetensors`` or as shards listed by
``model.safetensors.index.json``. Tokenizer files are :func:`fastrft.models.tokenizer.load_tokenizer`'s
business. Nothing is ever fetched from a hub: a name that is not a directory must be a known alias
(see :mod:`fastrft.models.embedded`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from fastrft.errors import ModelLoadError
from fastrft.models.config import ArchConfig
from fastrft.models.decoder import CausalLM

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """None -> float32 (fp32 is the fast and exact choice on CPU; pick bf16 explicitly on GPU)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_model_dir(path_or_alias: str | Path) -> Path:
    """A directory path, an alias of an embedded model (converted into the cache on first use), or a
    Hugging Face hub id ``owner/name[@revision]`` (fastrft.models.hub; downloaded into the HF cache)."""
    from fastrft.models import embedded, hub

    name = str(path_or_alias)
    if name in embedded.ALIASES:
        return embedded.ensure_converted(name)
    path = Path(name).expanduser()
    if not path.is_dir() and hub.is_hub_id(name):
        return hub.snapshot(name)
    if not path.is_dir():
        hint = "; it is neither a directory, a known alias (" + ", ".join(sorted(embedded.ALIASES)) + ")"
        raise ModelLoadError(f"model {name!r} not found{hint} nor a hub id (owner/name). Pass a local HF-format "
                             "directory (config.json + *.safetensors + tokenizer files) or a hub id.")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path / 'config.json'}: not found; a model directory needs a config.json (plus "
                             "*.safetensors and tokenizer files): pass the directory that holds them")
    return path


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index}: malformed shard index ({e})") from None
        files = [model_dir / s for s in shards]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ModelLoadError(f"{model_dir}: shards listed in {index.name} are missing: {', '.join(missing)}")
        return files
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    others = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if others:
        return [model_dir / n for n in others]
    bins = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.gguf"))
    extra = f" (found {', '.join(bins)}: convert them to safetensors first)" if bins else ""
    raise ModelLoadError(f"{model_dir}: no *.safetensors weights{extra}")


def read_eos_ids(model_dir: Path, cfg: ArchConfig) -> tuple[int, ...]:
    """EOS ids from config.json united with generation_config.json (Llama-3 lists several there)."""
    ids = list(cfg.eos_token_ids)
    gen = model_dir / "generation_config.json"
    if gen.exists():
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except json.JSONDecodeError:
            eos = None
        for e in eos if isinstance(eos, list) else ([] if eos is None else [eos]):
            if int(e) not in ids:
                ids.append(int(e))
    return tuple(ids)


def load_model(path_or_alias: str | Path, *, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None) -> CausalLM:
    """Build the native decoder for a model directory (or alias) and load its weights.

    dtype: None -> float32; device: None -> "cpu". Returns the model in eval mode.
    """
    model_dir = resolve_model_dir(path_or_alias)
    cfg = ArchConfig.from_file(model_dir / "config.json")
    torch_dtype, device = resolve_dtype(dtype), torch.device(device or "cpu")
    files = weight_files(model_dir)

    with torch.device("meta"):
        model = CausalLM(cfg)
    expected = set(model.state_dict().keys())
    state: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for name in sf.keys():
                if name in expected:
                    state[name] = sf.get_tensor(name).to(device=device, dtype=torch_dtype)
                elif not _ignorable(name, cfg):
                    raise ModelLoadError(f"{f}: unexpected tensor {name!r} for a {cfg.model_type} model; "
                                         "the checkpoint does not match its config.json")
    missing = sorted(expected - state.keys())
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"{model_dir}: weights missing from the checkpoint: {shown}")
    for name, tensor in state.items():
        want = tuple(_param(model, name).shape)
        if tuple(tensor.shape) != want:
            raise ModelLoadError(f"{model_dir}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"config.json implies {want}")
    model.load_state_dict(state, strict=True, assign=True)
    model.reset_buffers()
    model.eos_token_ids = read_eos_ids(model_dir, cfg)
    model.source_dir = model_dir
    return model.eval()


def _ignorable(name: str, cfg: ArchConfig) -> bool:
    # Tied checkpoints sometimes still store lm_head.weight; rotary caches are recomputed.
    return (name == "lm_head.weight" and cfg.tie_word_embeddings) or name.endswith("rotary_emb.inv_freq")


def _param(model: torch.nn.Module, name: str) -> torch.Tensor:
    obj = model
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj
