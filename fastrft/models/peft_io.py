"""LoRA adapters in PEFT's directory format, in and out: ``adapter_config.json`` and
``adapter_model.safetensors``, tensors named ``base_model.model.<module>.lora_A.weight`` (PEFT's saved names,
the adapter name dropped). ``fastrft export --adapter`` writes one; ``--lora-init`` starts a run from one.

A run's adapters are PEFT's in formula, initialisation and names (:mod:`fastrft.models.lora`), so nothing is
converted: the tensors are written and read as they are.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastrft.errors import ConfigError
from fastrft.models.lora_names import ALL_LINEAR, EMBEDDINGS, TARGETS

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _flag_error(path, message: str) -> ConfigError:
    return ConfigError(f"lora_init (--lora-init) {path}: {message}")


def read_config(path: str | Path) -> dict:
    """The adapter's ``adapter_config.json``, checked to be a plain LoRA adapter that this decoder can carry."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise _flag_error(path, "no such directory; pass a PEFT adapter directory (adapter_config.json and "
                                "adapter_model.safetensors)")
    for name in (CONFIG, WEIGHTS):
        if not (root / name).is_file():
            raise _flag_error(path, f"no {name}; pass a PEFT adapter directory (adapter_config.json and "
                                    "adapter_model.safetensors; PeftModel.save_pretrained writes both)")
    try:
        cfg = json.loads((root / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise _flag_error(root / CONFIG, f"cannot be read as JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
        raise _flag_error(root / CONFIG, f"peft_type is {cfg.get('peft_type')!r}; only LoRA adapters (LORA) load")
    for key, plain in (("use_dora", False), ("rank_pattern", {}), ("alpha_pattern", {}), ("bias", "none"),
                       ("layers_to_transform", None)):
        if cfg.get(key, plain) not in (plain, None) or (plain is None and cfg.get(key) is not None):
            raise _flag_error(root / CONFIG, f"{key} is {cfg[key]!r}; fastrft's adapters are plain LoRA ({key} "
                                             f"{plain!r})")
    if not isinstance(cfg.get("r"), int) or not isinstance(cfg.get("lora_alpha"), (int, float)):
        raise _flag_error(root / CONFIG, "needs an integer r and a number lora_alpha")
    return cfg


def adapter_targets(cfg: dict) -> tuple[str, ...]:
    """The target names an adapter config states, in the decoder's order (all-linear expanded)."""
    names = cfg.get("target_modules")
    if isinstance(names, str):
        names = TARGETS if names == ALL_LINEAR else (names,)
    return tuple(n for n in TARGETS if n in set(names or ()))


def _base_key(name: str | None) -> str:
    return str(name or "").split("@")[0].rstrip("/").rsplit("/", 1)[-1].lower()


def check_adapter_dir(model_cfg) -> None:
    """Refuse (:class:`ConfigError`, naming the mismatch) an adapter at ``model_cfg.lora_init`` whose base model,
    rank, alpha, scaling, targets or trained embeddings differ from the run's (``model_cfg``: fastrft.config's
    ModelConfig)."""
    from fastrft.models.lora_names import expand_targets

    path = model_cfg.lora_init
    cfg = read_config(path)
    base = cfg.get("base_model_name_or_path")
    if base and _base_key(base) != _base_key(model_cfg.model):
        raise _flag_error(path, f"the adapter was trained on {base!r}, but this run's model is {model_cfg.model!r}")
    ours = expand_targets(model_cfg.lora_targets)
    mismatches = [(f"rank {cfg['r']}", f"--lora-rank {model_cfg.lora_rank}", cfg["r"] != model_cfg.lora_rank),
                  (f"lora_alpha {cfg['lora_alpha']:g}", f"--lora-alpha {model_cfg.lora_alpha:g}",
                   float(cfg["lora_alpha"]) != model_cfg.lora_alpha),
                  (f"use_rslora {bool(cfg.get('use_rslora'))}", f"--lora-rslora {model_cfg.lora_rslora}",
                   bool(cfg.get("use_rslora")) != model_cfg.lora_rslora),
                  (f"targets {','.join(adapter_targets(cfg)) or 'none'}", f"--lora-targets {','.join(ours)}",
                   adapter_targets(cfg) != ours),
                  (f"modules_to_save {cfg.get('modules_to_save')}",
                   f"--lora-train-embeddings {model_cfg.lora_train_embeddings}",
                   bool(cfg.get("modules_to_save")) != model_cfg.lora_train_embeddings)]
    for theirs, mine, differ in mismatches:
        if differ:
            raise _flag_error(path, f"the adapter has {theirs}, this run {mine}; make them agree")


def load_adapter(model, path: str | Path) -> None:
    """Set ``model``'s adapters (and trained embeddings) from the PEFT adapter at ``path``; every tensor must
    name one of the model's, with its shape, and every adapter must be covered."""
    import torch
    from safetensors.torch import load_file

    root = Path(path).expanduser()
    tensors = load_file(str(root / WEIGHTS))
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    seen = set()
    for key, value in tensors.items():
        name = key.removeprefix(PREFIX)
        for leaf in EMBEDDINGS:  # PEFT's modules_to_save copy of a module
            name = name.replace(f"{leaf}.modules_to_save.default.", f"{leaf}.")
        if name not in params:
            raise _flag_error(path, f"{WEIGHTS} holds {key!r}, which is not a trainable tensor of this run "
                                    f"(e.g. {next(iter(params))!r}); the adapter was made for another model")
        if tuple(value.shape) != tuple(params[name].shape):
            raise _flag_error(path, f"{key!r} has shape {tuple(value.shape)}, this model's {name} "
                                    f"{tuple(params[name].shape)}; the adapter was made for another model")
        with torch.no_grad():
            params[name].copy_(value)
        seen.add(name)
    missing = sorted(k for k in params if ".lora_" in k and k not in seen)
    if missing:
        raise _flag_error(path, f"{WEIGHTS} has no {missing[0]!r} ({len(missing)} adapter tensors missing)")


def write_adapter(out: Path, state: dict, spec, base_model: str) -> None:
    """Write a PEFT adapter directory: the adapters (and trained embeddings) of ``state`` (a run's trainable
    tensors by name) under the LoRA ``spec``, for the base ``base_model``."""
    from safetensors.torch import save_file

    saved = [leaf for leaf in EMBEDDINGS if any(k.split(".")[-2] == leaf for k in state)]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
              "target_modules": list(spec.targets), "use_rslora": spec.rslora, "bias": "none",
              "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
              "modules_to_save": saved or None, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}}
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).write_text(json.dumps(config, indent=2))
    # PEFT saves a modules_to_save copy under the module's own name (base_model.model.lm_head.weight).
    tensors = {PREFIX + k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
