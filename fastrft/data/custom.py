"""Datasets of your own, as TRL takes them: rows with a prompt column and an answer column.

The rows come from one of three places:
- ``--dataset custom --train-file F [--test-file F]``: a local .jsonl/.json/.parquet file;
- ``--dataset owner/name``: a Hugging Face hub dataset, through the ``datasets`` library (its cache,
  ``HF_HOME``, ``HF_HUB_OFFLINE``), splits "train" and "test";
- from Python, ``Trainer(config, train_dataset=..., eval_dataset=...)``: a ``datasets.Dataset``, a list
  of dicts, or any iterable of mappings.

``--prompt-column`` (default ``prompt``) holds the prompt: a string, or a conversation (a list of
``{"role", "content"}`` messages, rendered with the model's chat template as is). ``--answer-column``
(default ``answer``) holds the reference answer given to the reward. Every other column rides along in
``Example.meta`` and reaches batched reward functions as keyword arguments. Without a test split, the
training rows that are not trained on serve as the test set (as for the builtin datasets).
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

from fastrft.data.example import Example
from fastrft.errors import ConfigError, DataError

CUSTOM = "custom"
HUB_DATASET = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_custom(name: str) -> bool:
    """Whether ``name`` is ``custom`` or a hub dataset id (owner/name)."""
    return name == CUSTOM or HUB_DATASET.fullmatch(name) is not None


def examples_from_rows(rows: Iterable[Mapping[str, Any]], *, source: str, split: str, prompt_column: str,
                       answer_column: str, reward: str) -> list[Example]:
    """Rows as examples with ids ``<source>/<split>/<row>``; a missing column names the row and the
    columns it has."""
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"{source} {split} row {i + 1}: expected a mapping of columns, got {type(row).__name__}")
        for column, flag in ((prompt_column, "--prompt-column"), (answer_column, "--answer-column")):
            if column not in row:
                raise DataError(f"{source} {split} row {i + 1}: no column {column!r} ({flag}); its columns are "
                                f"{', '.join(map(repr, row))}: name the right one with {flag}")
        prompt, meta = row[prompt_column], {k: v for k, v in row.items() if k not in (prompt_column, answer_column)}
        if isinstance(prompt, list):  # a conversation: rendered with the chat template as given
            users = [m.get("content") for m in prompt if isinstance(m, Mapping) and m.get("role") == "user"]
            if not users or not all(isinstance(m, Mapping) and {"role", "content"} <= set(m) for m in prompt):
                raise DataError(f"{source} {split} row {i + 1}: column {prompt_column!r} is a list but not a "
                                "conversation of {'role', 'content'} messages with a user turn")
            meta["prompt_messages"] = [dict(m) for m in prompt]
            prompt = str(users[-1])
        elif not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{source} {split} row {i + 1}: column {prompt_column!r} must be a non-empty string "
                            f"or a list of messages, got {type(prompt).__name__}")
        out.append(Example(f"{source}/{split}/{i}", prompt, str(row[answer_column]), reward, meta))
    if not out:
        raise DataError(f"{source} {split}: no rows")
    return out


def load_rows(name: str, split: str, path) -> Iterable[Mapping[str, Any]] | None:
    """The rows of split ``split``: from ``path``, or the hub dataset ``name``; None when a hub dataset
    has no such split (the test set then comes from the training rows)."""
    if path is not None:
        from fastrft.data.loaders import read_records

        return [record for _, record in read_records(path)]
    if name == CUSTOM:
        if split == "train":
            raise ConfigError("dataset (--dataset) custom needs train_file (--train-file), or pass train_dataset= "
                              "to Trainer from Python")
        return None
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"dataset (--dataset) {name!r} is a hub dataset, which needs the datasets package: "
                          "pip install datasets") from None
    try:
        return datasets.load_dataset(name, split=split)
    except ValueError as e:
        if split != "train" and "split" in str(e).lower():
            return None
        raise ConfigError(f"dataset (--dataset) {name!r}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # noqa: BLE001 - connection, missing repo, offline cache miss: one line
        offline = " (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set: only the cache is used)" if \
            _offline() else ""
        raise ConfigError(f"dataset (--dataset) {name!r} cannot be loaded{offline}: {e.__class__.__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None


def _offline() -> bool:
    import os

    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
