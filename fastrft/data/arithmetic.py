"""Synthetic "What is A + B?" problems at several difficulty levels, generated deterministically.

Each level has a finite population of problems enumerated in a fixed order; a problem's position in
that order is its index and therefore its id (``arithmetic/<level>/<index>``), so the same problem
always has the same id whatever seed or size produced it.

``add1`` is small enough (81 problems) that both splits are the whole population; the trainer picks
its training questions and removes them from the test set itself. For the larger levels a seeded
shuffle of the population is cut once into a test pool and a train pool, and each split takes a
prefix of its pool. Because the cut does not depend on the requested sizes, a train split and a test
split drawn with the same seed never share a problem, whatever sizes the two calls ask for.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

from fastrft.errors import ConfigError
from fastrft.data.example import Example

DEFAULT_TRAIN_SIZE = 1000
DEFAULT_TEST_SIZE = 200
SPLITS = ("train", "test")


@dataclass(frozen=True)
class ArithmeticLevel:
    """One difficulty level: operand ranges and the operators written between them."""

    name: str
    description: str
    operands: tuple[range, ...]
    operators: tuple[str, ...]

    @property
    def population(self) -> int:
        """int: How many distinct problems the level has."""
        return math.prod(len(r) for r in self.operands)


#: The levels, easiest first. No level mixes ``*`` with ``+``/``-``, so evaluating left to right is
#: the same as evaluating with the usual precedence.
LEVELS: tuple[ArithmeticLevel, ...] = (
    ArithmeticLevel("add1", "a + b with a, b in 1..9 (all 81 ordered pairs)",
                    (range(1, 10), range(1, 10)), ("+",)),
    ArithmeticLevel("add2", "a + b with a, b in 10..99", (range(10, 100), range(10, 100)), ("+",)),
    ArithmeticLevel("mul", "a * b with a in 10..99, b in 2..9", (range(10, 100), range(2, 10)), ("*",)),
    ArithmeticLevel("addsub", "a + b - c with a, b, c in 1..9",
                    (range(1, 10), range(1, 10), range(1, 10)), ("+", "-")),
)
_BY_NAME = {level.name: level for level in LEVELS}


def _level(name: str) -> ArithmeticLevel:
    if name not in _BY_NAME:
        choices = "; ".join(f"{lv.name} ({lv.description})" for lv in LEVELS)
        raise ConfigError(f"unknown arithmetic level {name!r}; choose one of: {choices}")
    return _BY_NAME[name]


def _evaluate(operands: tuple[int, ...], operators: tuple[str, ...]) -> int:
    value = operands[0]
    for op, x in zip(operators, operands[1:]):
        value = value + x if op == "+" else value - x if op == "-" else value * x
    return value


def _example(level: ArithmeticLevel, index: int, operands: tuple[int, ...]) -> Example:
    text = str(operands[0]) + "".join(f" {op} {x}" for op, x in zip(level.operators, operands[1:]))
    return Example(id=f"arithmetic/{level.name}/{index}", question=f"What is {text}?",
                   answer=str(_evaluate(operands, level.operators)), reward="arithmetic",
                   meta={"level": level.name})


def _pools(level: ArithmeticLevel, seed: int) -> tuple[list[int], list[int]]:
    order = list(range(level.population))
    # A string seed is hashed with SHA-512 by `random`, independent of PYTHONHASHSEED, so the
    # shuffle is identical across processes and machines; the level name keeps levels independent.
    random.Random(f"fastrft-arithmetic/{level.name}/{seed}").shuffle(order)
    # A fifth of the population (at least the default test size) is held out for testing.
    cut = max(DEFAULT_TEST_SIZE, level.population // 5)
    return order[cut:], order[:cut]


def _check_size(size: int | None, default: int, available: int, what: str) -> int:
    if size is None:
        return min(default, available)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"size must be a positive integer, got {size!r}")
    if size > available:
        raise ConfigError(f"{what} has only {available} distinct problems; asked for {size}")
    return size


def arithmetic_problems(level: str, split: str, *, seed: int = 0,
                        size: int | None = None) -> list[Example]:
    """Generate the problems of one arithmetic level and split.

    Args:
        level (str): One of the names in :data:`LEVELS` (``add1``, ``add2``, ``mul``, ``addsub``).
        split (str): ``"train"`` or ``"test"``.
        seed (int): Selects the shuffle for the sampled levels; ignored by ``add1``.
        size (int | None): Number of problems. ``None`` means the default: all 81 for ``add1``,
            otherwise 1000 for train and 200 for test, capped at the pool size (``mul`` and
            ``addsub`` have only 520 and 529 training problems). For ``add1`` a size takes the first
            ``size`` problems in index order.

    Returns:
        list[Example]: Problems such as ``"What is 8 + 3?"`` with answer ``"11"``, ids
        ``arithmetic/<level>/<index>``, ``reward = "arithmetic"``, ``meta = {"level": level}``.

    Raises:
        ConfigError: Unknown level or split, or a size that is not positive or exceeds what the
            level's split can supply.
    """
    spec = _level(level)
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    problems = list(itertools.product(*spec.operands))
    if spec.name == "add1":
        n = _check_size(size, spec.population, spec.population, f"level {spec.name}")
        return [_example(spec, i, problems[i]) for i in range(n)]
    train_pool, test_pool = _pools(spec, seed)
    pool, default = (train_pool, DEFAULT_TRAIN_SIZE) if split == "train" else (test_pool, DEFAULT_TEST_SIZE)
    n = _check_size(size, default, len(pool), f"the {split} split of level {spec.name}")
    return [_example(spec, i, problems[i]) for i in pool[:n]]
