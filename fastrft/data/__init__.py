"""Datasets for reinforcement fine-tuning: GSM8K, MATH and synthetic arithmetic.

Everything is turned into :class:`Example` records (question, reference final answer, reward name),
and :mod:`fastrft.data.prompts` turns those into the prompts the policy is trained on. GSM8K and MATH
ship inside the package (``builtin/``), so nothing is downloaded.
"""

from fastrft.data.arithmetic import (
    DEFAULT_TEST_SIZE,
    DEFAULT_TRAIN_SIZE,
    LEVELS,
    ArithmeticLevel,
    arithmetic_problems,
)
from fastrft.data.example import Example, dedupe_against, normalise_question
from fastrft.data.loaders import (
    SUPPORTED_EXTENSIONS,
    load_gsm8k,
    load_math,
    read_records,
    split_from_path,
)
from fastrft.data.prompts import (
    PROMPT_SUFFIXES,
    encode_prompt,
    has_chat_template,
    prompt_text,
    render_prompt,
)
from fastrft.data.registry import DATASETS, SPLITS, builtin_path, load_dataset

__all__ = [
    "DATASETS",
    "DEFAULT_TEST_SIZE",
    "DEFAULT_TRAIN_SIZE",
    "LEVELS",
    "PROMPT_SUFFIXES",
    "SPLITS",
    "SUPPORTED_EXTENSIONS",
    "ArithmeticLevel",
    "Example",
    "arithmetic_problems",
    "builtin_path",
    "dedupe_against",
    "encode_prompt",
    "has_chat_template",
    "load_dataset",
    "load_gsm8k",
    "load_math",
    "normalise_question",
    "prompt_text",
    "read_records",
    "render_prompt",
    "split_from_path",
]
