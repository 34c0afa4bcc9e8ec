"""Tokenizer loading from a local model directory (or an embedded-model alias); never from a hub."""

from __future__ import annotations

from pathlib import Path

from fastrft.errors import ModelLoadError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path_or_alias: str | Path):
    """Return a transformers tokenizer for a model directory or alias.

    The directory must hold tokenizer files (tokenizer.json or tokenizer_config.json + vocab); a pad
    token is set to the EOS token when the tokenizer has none, since batched code pads with it.
    """
    from transformers import AutoTokenizer

    from fastrft.models.loader import resolve_model_dir

    model_dir = resolve_model_dir(path_or_alias)
    if not any((model_dir / f).exists() for f in TOKENIZER_FILES):
        raise ModelLoadError(f"{model_dir}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{model_dir}: cannot load the tokenizer ({e})") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok
