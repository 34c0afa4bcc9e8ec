"""The training data of a run: the pool, the examples of each round, the evaluation sets, the prompt cache.

At construction the splits are loaded and the examples fixed: the configured example(s), or a pool for
the batch mode (--examples-per-round), optionally narrowed to a band of the base model's pass rate
(--difficulty: the data offers its ``candidates``, the caller estimates their pass counts, a generation,
and hands them to :meth:`TrainingData.select`). The test set never holds a
problem that may be trained on. Prompts are encoded once: the evaluation sets hold theirs, and the batch
mode caches those of the pool examples it has drawn.
"""

from __future__ import annotations

from typing import Callable, Iterable

from fastrft.config import TrainConfig
from fastrft.data import Example, dedupe_against, encode_prompt, load_dataset, selection
from fastrft.data.custom import examples_from_rows, is_custom, load_rows
from fastrft.errors import ConfigError
from fastrft.evaluate import EvalSet
from fastrft.loop import seeds
from fastrft.loop.types import RoundBatch


class TrainingData:
    """Owner of the pool, the evaluation sets (``train_set``, ``test_set``) and the prompt cache."""

    def __init__(self, cfg: TrainConfig, tokenizer, rows: dict[str, Iterable] | None = None):
        """``rows``: {"train": ..., "test": ...} of a dataset passed from Python (fastrft.data.custom). With
        --difficulty the data is not ready until :meth:`select` has the candidates' pass counts."""
        self.cfg, self.tokenizer, self._rows = cfg, tokenizer, rows or {}
        self._prompt_cache: dict[int, list[int]] = {}
        self.pool, self._test_split = self._load()
        d = cfg.data
        #: with --difficulty: the examples whose base-model pass counts :meth:`select` needs; else None
        self.candidates: list[Example] | None = None if d.difficulty is None else [
            self.pool[i] for i in selection.candidate_order(len(self.pool), d.difficulty_candidates, d.data_seed)]
        if self.candidates is None:
            self.train_set, self.test_set = self._eval_sets(self._test_split)

    def select(self, counts: dict[str, int]) -> None:
        """Narrow the pool to the --difficulty band, given the base model's correct-of-k ``counts`` on the
        :attr:`candidates` (fastrft.loop.difficulty.pass_counts), and make the evaluation sets."""
        d = self.cfg.data
        chosen = selection.select_by_difficulty(self.candidates, counts, d.difficulty_samples, d.difficulty,
                                                None if d.examples_per_round else d.difficulty_count)
        if d.examples_per_round > len(chosen):
            raise ConfigError(f"examples_per_round (--examples-per-round) {d.examples_per_round} exceeds the "
                              f"{len(chosen)} examples in the difficulty band {d.difficulty}")
        self.pool, self.candidates = chosen, None
        self.train_set, self.test_set = self._eval_sets(self._test_split)

    def encode(self, example: Example) -> list[int]:
        d = self.cfg.data
        return encode_prompt(self.tokenizer, example, d.dataset, max_prompt_tokens=d.max_prompt_tokens,
                             template=d.prompt_template, system=d.system_prompt)

    def for_round(self, r: int) -> RoundBatch:
        """The examples round ``r`` trains on: the fixed ones, or the batch mode's draw from the pool."""
        d = self.cfg.data
        if not d.examples_per_round:
            return RoundBatch(r, self.train_set.examples, self.train_set.prompt_ids)
        idx = selection.batch_for_round(len(self.pool), d.examples_per_round, r, self.cfg.run.seed)
        for i in idx:
            if i not in self._prompt_cache:
                self._prompt_cache[i] = self.encode(self.pool[i])
        return RoundBatch(r, [self.pool[i] for i in idx], [self._prompt_cache[i] for i in idx])

    def check_lengths(self, fits: Callable[[list[list[int]], int], None]) -> None:
        """Refuse, before anything is written, response budgets that the evaluated prompts (and, with fixed
        examples, the trained ones) cannot take: ``fits(prompt_ids, max_new_tokens)`` is the engine's check."""
        ro, e = self.cfg.rollout, self.cfg.eval
        prompts = self.train_set.prompt_ids + self.test_set.prompt_ids
        for name, n in (("max_new_tokens", ro.max_new_tokens),
                        ("eval_max_new_tokens", e.eval_max_new_tokens or ro.max_new_tokens)):
            try:
                fits(prompts, n)
            except ConfigError as err:
                raise ConfigError(f"{name} (--{name.replace('_', '-')}) {n}: {err}; lower it") from None

    @property
    def train_example_ids(self) -> list[str]:
        return [x.id for x in self.train_set.examples]

    # ------------------------------------------------------------------ construction
    def _load(self) -> tuple[list[Example], list[Example]]:
        d = self.cfg.data
        if is_custom(d.dataset) or self._rows:
            train, test = self._split("train", d.train_file), self._split("test", d.test_file)
            # The rows not trained on are the test set (or, --eval-split train, those of the train split).
            test = train if test is None or self.cfg.eval.eval_split == "train" else test
        else:
            train = load_dataset(d.dataset, "train", path=d.train_file, level=d.level, seed=d.data_seed,
                                 reward=d.reward)
            test = train if self.cfg.eval.eval_split == "train" else \
                load_dataset(d.dataset, "test", path=d.test_file, level=d.level, seed=d.data_seed, reward=d.reward)
        if d.difficulty is None and not d.examples_per_round:
            bad = [i for i in d.example_index if i >= len(train)]
            if bad:
                raise ConfigError(f"example_index (--example-index) {bad[0]} is out of range: the {d.dataset} train "
                                  f"split has {len(train)} examples (valid 0..{len(train) - 1})")
            pool = [train[i] for i in d.example_index]
        else:
            pool = [train[i] for i in selection.pool_indices(len(train), d.train_pool, d.data_seed)]
        if d.examples_per_round > len(pool):
            raise ConfigError(f"examples_per_round (--examples-per-round) {d.examples_per_round} exceeds the training "
                              f"pool ({len(pool)} examples)")
        return pool, test

    def _split(self, split: str, path) -> list[Example] | None:
        d = self.cfg.data
        rows = self._rows.get(split)
        source = "python" if rows is not None else d.dataset
        if rows is None:
            rows = load_rows(d.dataset, split, path)
        if rows is None:
            return None
        return examples_from_rows(rows, source=source, split=split, prompt_column=d.prompt_column,
                                  answer_column=d.answer_column, reward=d.reward)

    def _eval_sets(self, test_split: list[Example]) -> tuple[EvalSet, EvalSet]:
        d, e = self.cfg.data, self.cfg.eval
        # A problem that may be trained on never counts as a test problem.
        test = dedupe_against(test_split, self.pool)
        if not test and test_split:
            raise ConfigError("the training pool covers every test problem; lower --train-pool (or use a dataset "
                              "with a separate test split)")
        if e.test_size is not None and e.test_size < len(test):
            test = [test[i] for i in seeds.test_subset(d.data_seed, len(test), e.test_size)]
        if d.examples_per_round:
            n = min(e.train_eval_size, len(self.pool))
            train_eval = [self.pool[i] for i in seeds.train_eval_subset(d.data_seed, len(self.pool), n)]
        else:
            train_eval = self.pool
        return (EvalSet(train_eval, [self.encode(x) for x in train_eval]),
                EvalSet(test, [self.encode(x) for x in test]))
