"""``fastrft export``: a run's checkpoint as an HF-format model directory that ``transformers`` loads.

The checkpoint is the newest whole one (fastrft.checkpoint.load_latest) or a chosen round; the run
directory is locked while it is read (fastrft.lock), so an export never reads a run another process
is writing, and a run never starts while it is exported.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from fastrft.checkpoint import _WEIGHT_SUFFIXES, checkpoint_dirs, load_latest, load_state, shard_dir, verify
from fastrft.errors import FastRFTError
from fastrft.models import peft_io


def export_run(run_dir: str | os.PathLike[str], out: str | os.PathLike[str], round_: int | None = None,
               adapter: bool = False) -> Path:
    """Write a checkpoint of a run (``round_``, or the newest whole one) as an HF-format directory
    (config.json, model.safetensors, the source model's tokenizer and generation files) that
    ``transformers`` loads as is; a LoRA run's adapters are merged into the base weights. ``adapter``: write
    the LoRA adapters alone as a PEFT adapter directory instead (fastrft.models.peft_io). The run directory is
    locked meanwhile (fastrft.lock)."""
    return export_checkpoint(run_dir, out, round_, adapter)[0]


def export_checkpoint(run_dir, out, round_: int | None = None, adapter: bool = False) -> tuple[Path, int]:
    """:func:`export_run`, returning (the directory written, the round exported)."""
    from fastrft import lock

    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise FastRFTError(f"{run_dir}: no such directory" if not run_dir.exists() else
                           f"{run_dir}: not a directory; pass a run directory written by fastrft train")
    if not (run_dir / "config.json").exists():
        raise FastRFTError(f"{run_dir}: no config.json; pass a run directory written by fastrft train")
    with lock.hold(run_dir, lock.command_line(), flag="RUN_DIR", read_only=True):
        return _export(run_dir, out, round_, adapter)


def _export(run_dir: Path, out: Path, round_: int | None, adapter: bool = False) -> tuple[Path, int]:
    from safetensors.torch import save_file

    from fastrft.models.config import with_architecture
    from fastrft.models.loader import resolve_model_dir

    if out.exists() and not out.is_dir():
        raise FastRFTError(f"--out {out} is a file; pass the path of a new directory")
    if out.exists() and any(out.iterdir()):
        raise FastRFTError(f"--out {out} exists and is not empty; choose a new directory")
    cfg_file = run_dir / "config.json"
    if round_ is None:
        found = load_latest(run_dir)
        if found is None:
            raise FastRFTError(f"{run_dir}: no whole checkpoint to export (checkpoints are written every "
                               "--save-every rounds and at the end of a run)")
    else:
        rounds = dict(checkpoint_dirs(run_dir))
        if round_ not in rounds:
            have = ", ".join(map(str, rounds)) or "none"
            raise FastRFTError(f"--round {round_}: {run_dir} holds no checkpoint of round {round_} (its checkpoints: "
                               f"rounds {have}; --keep-checkpoints sets how many a run keeps)")
        problem = verify(rounds[round_])
        if problem is not None:
            raise FastRFTError(f"--round {round_}: checkpoint {rounds[round_]} is damaged ({problem}); choose "
                               "another round")
        found = round_, load_state(rounds[round_] / "state.pt")
    round_, payload = found
    model_cfg = json.loads(cfg_file.read_text())["model"]
    model_name = model_cfg["model"]
    spec = _lora_spec(model_cfg)
    if adapter:
        if spec is None:
            raise FastRFTError(f"--adapter: {run_dir} was trained without LoRA (--lora-rank 0), so it has no adapter; "
                               "export its full weights without --adapter")
        _make_dir(out)
        peft_io.write_adapter(out, payload["model"], spec, model_name)
        return out, round_
    source = resolve_model_dir(model_name)
    hf_config = with_architecture(json.loads((source / "config.json").read_text()))
    if spec is not None:  # the base from its source, the trained tensors from the checkpoint, merged
        from fastrft.models import load_model, lora

        state = load_model(model_name, dtype=torch.float32, device="cpu").state_dict()
        state.update({k: v.float() for k, v in payload["model"].items()})
        state = lora.merged_state(state, spec)
    elif "model" in payload:
        state = payload["model"]
    else:  # sharded: assemble the full fp32 masters from the DCP shards, in this one process
        from fastrft.distributed import dcp_full_model_state
        from fastrft.models import load_model

        template = load_model(model_name, dtype=torch.float32, device="cpu").state_dict()
        state = dcp_full_model_state(shard_dir(run_dir, round_), template)
    if hf_config.get("tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    _make_dir(out)
    for f in sorted(source.iterdir()):
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and f.name not in ("config.json",
                                                                                      "model.safetensors.index.json"):
            shutil.copy2(f, out / f.name)
    dtype = next(iter(state.values())).dtype
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    weights = out / "model.safetensors"
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(weights),
              metadata={"format": "pt", "fastrft_run": str(run_dir), "fastrft_round": str(round_)})
    # safetensors creates the file owner-only (0600); an exported model is shared like its other files.
    umask = os.umask(0)
    os.umask(umask)
    weights.chmod(0o666 & ~umask)
    return out, round_


def _make_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FastRFTError(f"--out {out}: cannot create it ({e.strerror}); choose a writable path") from None


def _lora_spec(model_cfg: dict):
    """The run's LoRA spec from its config.json ``model`` section, or None (runs before LoRA have no fields)."""
    from fastrft.config import ModelConfig, build_group
    from fastrft.models.lora import LoraSpec

    if not model_cfg.get("lora_rank"):
        return None
    return LoraSpec.from_config(build_group(ModelConfig, {k: v for k, v in model_cfg.items() if k != "lora_init"},
                                            "model"))
