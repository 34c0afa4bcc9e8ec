"""One entry point, :func:`load_dataset`, that maps a dataset name and split to examples.

GSM8K and MATH ship inside the package as xz-compressed JSONL (see ``builtin/README.md``), so the
trainer works offline; a user file in any supported format can replace either.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import os

from fastrft.errors import ConfigError
from fastrft.data.arithmetic import arithmetic_problems
from fastrft.data.example import Example
from fastrft.data.loaders import load_gsm8k, load_math

#: Dataset names :func:`load_dataset` accepts (also the reward-function names).
DATASETS = ("gsm8k", "math", "arithmetic")
SPLITS = ("train", "test")

_LOADERS = {"gsm8k": load_gsm8k, "math": load_math}


def builtin_path(name: str, split: str) -> os.PathLike[str]:
    """Locate the packaged copy of a dataset split.

    Args:
        name (str): ``"gsm8k"`` or ``"math"``.
        split (str): ``"train"`` or ``"test"``.

    Returns:
        os.PathLike[str]: A traversable pointing at ``builtin/<name>_<split>.jsonl.xz``.
    """
    return importlib.resources.files("fastrft.data") / "builtin" / f"{name}_{split}.jsonl.xz"


@functools.lru_cache(maxsize=None)
def _load_builtin(name: str, split: str) -> tuple[Example, ...]:
    # Decompressing and validating ~7.5k records takes a noticeable fraction of a second and the
    # trainer asks for the same split repeatedly (train set, eval set, dedupe); a tuple of frozen
    # examples can be shared safely because nobody can mutate it.
    resource = builtin_path(name, split)
    # as_file gives a real filesystem path even when the package is imported from a zip.
    with importlib.resources.as_file(resource) as path:
        return tuple(_LOADERS[name](path))


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")


def load_dataset(name: str, split: str, *, path: str | os.PathLike[str] | None = None,
                 level: str = "add1", seed: int = 0, size: int | None = None,
                 reward: str | None = None) -> list[Example]:
    """Load one split of a dataset as a fresh list of examples.

    Args:
        name (str): One of :data:`DATASETS`.
        split (str): ``"train"`` or ``"test"``.
        path (str | os.PathLike[str] | None): For ``gsm8k``/``math``, a file to load instead of the
            builtin copy (any format :func:`~fastrft.data.loaders.read_records` reads; ids then take
            their split from the file name). Not allowed for ``arithmetic``.
        level (str): Arithmetic difficulty level (see :data:`~fastrft.data.arithmetic.LEVELS`);
            ignored by the other datasets.
        seed (int): Arithmetic sampling seed; ignored by the other datasets.
        size (int | None): Arithmetic: the split size (see
            :func:`~fastrft.data.arithmetic.arithmetic_problems`). GSM8K/MATH: keep only the first
            ``size`` examples in file order. ``None`` keeps everything / uses the defaults.
        reward (str | None): The reward every example is scored with (``Example.reward``): a registered
            name or ``"module.path:function"`` (``--reward``). ``None`` keeps the dataset's own.

    Returns:
        list[Example]: A new list on every call, so callers may shuffle or filter it freely.

    Raises:
        ConfigError: Unknown dataset, split or level; a path given for ``arithmetic``; a bad size; a
            reward that cannot be resolved.
        DataError: The file is missing or malformed.
    """
    examples = _load(name, split, path=path, level=level, seed=seed, size=size)
    if reward is None:
        return examples
    from fastrft import rewards

    rewards.get(reward)  # an unusable reward fails here, not at the first scored response
    return [dataclasses.replace(ex, reward=reward) for ex in examples]


def _load(name: str, split: str, *, path, level: str, seed: int, size: int | None) -> list[Example]:
    _check_choice(name, DATASETS, "dataset")
    _check_choice(split, SPLITS, "split")
    if name == "arithmetic":
        if path is not None:
            raise ConfigError(
                "the arithmetic dataset is generated, not read from a file; drop the data path "
                "and choose a level instead"
            )
        return arithmetic_problems(level, split, seed=seed, size=size)
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ConfigError(f"size must be a positive integer, got {size!r}")
    examples = list(_load_builtin(name, split)) if path is None else _LOADERS[name](path)
    return examples if size is None else examples[:size]
