"""Tests for fastrft.data: builtin datasets, file formats, error messages, arithmetic, prompts."""

from __future__ import annotations

import gzip
import json
import lzma
import operator
import pickle
import re
import string

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastrft.data import (DATASETS, LEVELS, PROMPT_SUFFIXES, Example, arithmetic_problems,
                          dedupe_against, encode_prompt, load_dataset, load_gsm8k, load_math,
                          prompt_text, read_records, render_prompt)
from fastrft.errors import ConfigError, DataError

GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
    {"question": "A shop sells 1000 pens.", "answer": "It sold 1,000.\n#### 1,000"},
    {"question": "Half of 10?", "answer": "10/2=5 #### 3 (typo)\n#### 5"},
]
MATH_ROWS = [
    {"problem": "Compute $1+1$.", "answer": "2", "level": "Level 1", "type": "Prealgebra"},
    {"problem": "Simplify $\\frac{2}{4}$.", "answer": "\\frac{1}{2}", "level": "Level 2", "type": "Algebra"},
]


def write_jsonl(path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("name,split,rows", [("gsm8k", "train", 7473), ("gsm8k", "test", 1319),
                                             ("math", "train", 7500), ("math", "test", 5000)])
def test_builtin_row_counts_and_ids(name, split, rows):
    examples = load_dataset(name, split)
    assert len(examples) == len({ex.id for ex in examples}) == rows
    assert [ex.id for ex in examples[:2]] == [f"{name}/{split}/0", f"{name}/{split}/1"]
    assert all(ex.reward == name for ex in examples)


def test_builtin_contents_cache_and_size():
    first = load_dataset("gsm8k", "train")[0]
    assert first.question.startswith("Natalia sold clips to 48 of her friends")
    assert first.answer == "72" and first.meta["solution"].endswith("#### 72")
    first = load_dataset("math", "train")[0]
    assert first.answer == "0" and dict(first.meta) == {"level": "Level 5", "type": "Algebra"}
    assert {ex.meta["level"] for ex in load_dataset("math", "test")} == {f"Level {i}" for i in range(1, 6)}
    load_dataset("gsm8k", "test").clear()  # callers get copies: this must not empty the cache
    assert len(load_dataset("gsm8k", "test")) == 1319
    assert [ex.id for ex in load_dataset("math", "test", size=3)] == [f"math/test/{i}" for i in range(3)]


def test_example_meta_is_read_only_copied_hashable_and_picklable():
    meta = {"level": "Level 3"}
    ex = Example(id="x/0", question="q", answer="1", reward="math", meta=meta)
    meta["level"] = "changed"
    assert ex.meta["level"] == "Level 3"
    with pytest.raises(TypeError):
        ex.meta["level"] = "Level 4"  # type: ignore[index]
    same = Example(id="x/0", question="q", answer="1", reward="math", meta={"level": "Level 3"})
    assert ex == same and hash(ex) == hash(same) and len({ex, same}) == 1
    assert ex != Example(id="x/0", question="q", answer="1", reward="math", meta={"level": "Level 4"})
    assert pickle.loads(pickle.dumps(ex)) == ex


@pytest.mark.parametrize("loader,rows", [(load_gsm8k, GSM8K_ROWS), (load_math, MATH_ROWS)])
def test_formats_round_trip_to_identical_examples(tmp_path, loader, rows):
    (tmp_path / "train.json").write_text(json.dumps(rows, indent=2))
    paths = [write_jsonl(tmp_path / "train.jsonl", rows), tmp_path / "train.json",
             write_jsonl(tmp_path / "train.jsonl.gz", rows, gzip.open),
             write_jsonl(tmp_path / "train.jsonl.xz", rows, lzma.open),
             write_parquet(tmp_path / "train.parquet", rows)]
    results = [loader(p) for p in paths]
    assert len(results[0]) == len(rows) and results[0][0].id.endswith("/train/0")
    for other in results[1:]:
        assert other == results[0]


def test_gsm8k_final_answer_and_split_from_file_name(tmp_path):
    examples = load_gsm8k(write_jsonl(tmp_path / "g.jsonl", GSM8K_ROWS))
    assert [ex.answer for ex in examples] == ["7", "1,000", "5"] and examples[0].id == "gsm8k/g/0"
    assert load_math(write_jsonl(tmp_path / "my_test_set.jsonl", MATH_ROWS))[1].id == "math/test/1"
    assert load_math(write_jsonl(tmp_path / "dev.jsonl.gz", MATH_ROWS, gzip.open))[0].id == "math/dev/0"


def test_blank_lines_are_counted_and_load_dataset_reads_a_given_path(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", ["", json.dumps({"a": 1}), "   ", json.dumps({"b": 2})])
    assert list(read_records(path)) == [(2, {"a": 1}), (4, {"b": 2})]
    path = write_jsonl(tmp_path / "mine_train.jsonl", GSM8K_ROWS)
    assert [ex.answer for ex in load_dataset("gsm8k", "train", path=path)] == ["7", "1,000", "5"]


GOOD = json.dumps(GSM8K_ROWS[0])


@pytest.mark.parametrize("lines,needles", [
    ([GOOD, GOOD, '{"question": "q" "answer": "#### 1"}'], ["line 3", "not valid JSON", "column"]),
    ([GOOD, "[1, 2]"], ["line 2", "not a JSON object", "list"]),
    ([GOOD, GOOD, GOOD, json.dumps({"question": "q"})], ["line 4", "missing field 'answer'"]),
    ([GOOD, json.dumps({"question": "q", "answer": "it is 5"})], ["line 2", "field 'answer'", "####"]),
    ([json.dumps({"question": "q", "answer": "#### "})], ["line 1", "field 'answer'", "####"]),
    ([GOOD, json.dumps({"question": 5, "answer": "#### 5"})], ["line 2", "field 'question'", "string"]),
    ([json.dumps({"question": "  ", "answer": "#### 5"})], ["line 1", "field 'question'", "empty"]),
    (["", "", GOOD, "{oops"], ["line 4", "not valid JSON"]),
    ([GOOD, '{"question": "q", "answer": "#### 1", "extra": [1, 2,, 3]}'], ["line 2", "Expecting value at column 54"]),
    ([GOOD, '{"question": "q", "answer": "#### 1"'], ["line 2", "Expecting ',' delimiter at the end of the line"]),
])
def test_malformed_gsm8k_lines_name_file_line_and_field(tmp_path, lines, needles):
    path = write_jsonl(tmp_path / "gsm8k_train.jsonl", lines)
    with pytest.raises(DataError) as info:
        load_gsm8k(path)
    assert all(needle in str(info.value) for needle in ["gsm8k_train.jsonl", *needles]), info.value


def test_malformed_math_and_other_formats(tmp_path):
    for name, rows, error in [("m.jsonl", [MATH_ROWS[0], {"answer": "1"}], "line 2: missing field 'problem"),
                              ("m2.jsonl", [{**MATH_ROWS[0], "level": 3}], "line 1: field 'level' must be")]:
        with pytest.raises(DataError, match=re.escape(f"{name} {error}")):
            load_math(write_jsonl(tmp_path / name, rows))
    (tmp_path / "a.json").write_text(json.dumps([MATH_ROWS[0], "nope"]))
    with pytest.raises(DataError, match=r"a\.json record 2: not a JSON object"):
        load_math(tmp_path / "a.json")
    path = write_parquet(tmp_path / "p.parquet", [GSM8K_ROWS[0], {**GSM8K_ROWS[1], "answer": "no"}])
    with pytest.raises(DataError, match=r"p\.parquet row 2: field 'answer' has no '####"):
        load_gsm8k(path)


@pytest.mark.parametrize("name,content", [("empty.jsonl", ""), ("blank.jsonl", "\n \n"), ("e.json", "[]")])
def test_empty_file_is_an_error(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=re.escape(name) + ".*no records"):
        load_gsm8k(tmp_path / name)


def test_missing_file_unknown_extension_and_corrupt_archive(tmp_path):
    with pytest.raises(DataError, match="nowhere_train.jsonl.*no such file"):
        read_records(tmp_path / "nowhere_train.jsonl")
    (tmp_path / "data.csv").write_text("question,answer\n")
    with pytest.raises(DataError, match=r"data\.csv.* \.jsonl, \.jsonl\.gz, \.jsonl\.xz, \.json, \.parquet"):
        load_gsm8k(tmp_path / "data.csv")
    (tmp_path / "bad.jsonl.gz").write_bytes(b"definitely not gzip")
    with pytest.raises(DataError, match="bad.jsonl.gz"):
        load_gsm8k(tmp_path / "bad.jsonl.gz")


_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_QUESTION = re.compile(r"What is (\d+) ([-+*]) (\d+)(?: ([-+*]) (\d+))?\?")
_RANGES = {"add1": [(1, 9)] * 2, "add2": [(10, 99)] * 2, "mul": [(10, 99), (2, 9)], "addsub": [(1, 9)] * 3}
_SIGNS = {"add1": ["+"], "add2": ["+"], "mul": ["*"], "addsub": ["+", "-"]}


def parse(question):
    groups = [g for g in _QUESTION.fullmatch(question).groups() if g is not None]
    return [int(g) for g in groups[0::2]], groups[1::2]


def test_add1_is_the_full_enumeration_in_index_order():
    for split in ("train", "test"):
        problems = arithmetic_problems("add1", split, seed=123)
        assert len(problems) == 81
        for index, ex in enumerate(problems):
            (a, b), _ = parse(ex.question)
            assert ex.id == f"arithmetic/add1/{index}" and index == (a - 1) * 9 + (b - 1)
    ex = arithmetic_problems("add1", "train")[65]
    assert (ex.question, ex.answer, ex.id) == ("What is 8 + 3?", "11", "arithmetic/add1/65")


@pytest.mark.parametrize("level", [lv.name for lv in LEVELS])
def test_every_answer_is_correct_and_operands_in_range(level):
    for split in ("train", "test"):
        problems = arithmetic_problems(level, split, seed=7)
        assert problems
        for ex in problems:
            operands, signs = parse(ex.question)
            assert signs == _SIGNS[level]
            assert all(lo <= x <= hi for x, (lo, hi) in zip(operands, _RANGES[level], strict=True))
            value = operands[0]
            for sign, x in zip(signs, operands[1:]):
                value = _OPS[sign](value, x)
            assert (ex.answer, ex.reward, ex.meta["level"]) == (str(value), "arithmetic", level)


def test_arithmetic_is_seeded_and_deterministic():
    assert arithmetic_problems("add2", "train", seed=3) == arithmetic_problems("add2", "train", seed=3)
    assert arithmetic_problems("add2", "train", seed=3) != arithmetic_problems("add2", "train", seed=4)
    assert arithmetic_problems("add2", "test", seed=3) != arithmetic_problems("add2", "test", seed=4)
    assert [len(arithmetic_problems("add2", split)) for split in ("train", "test")] == [1000, 200]
    prefix = arithmetic_problems("add2", "train", seed=3)[:10]
    assert arithmetic_problems("add2", "train", seed=3, size=10) == prefix


@pytest.mark.parametrize("level", ["add2", "mul", "addsub"])
@pytest.mark.parametrize("seed", [0, 1])
def test_train_and_test_are_disjoint(level, seed):
    train = arithmetic_problems(level, "train", seed=seed)
    test = arithmetic_problems(level, "test", seed=seed)
    assert len({ex.question for ex in train}) == len(train)
    assert not {ex.question for ex in train} & {ex.question for ex in test}
    assert dedupe_against(test, train) == test


def test_arithmetic_size_errors_and_unknown_level():
    with pytest.raises(ConfigError, match="only 520"):
        arithmetic_problems("mul", "train", size=521)
    with pytest.raises(ConfigError, match="positive integer"):
        arithmetic_problems("add2", "train", size=0)
    with pytest.raises(ConfigError) as info:
        arithmetic_problems("add3", "train")
    for lv in LEVELS:
        assert lv.name in str(info.value) and lv.description in str(info.value)


TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture
def tokenizer():
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast
    # Character-level (BPE without merges: one token per character) so lengths below are exact; the
    # BOS post-processor makes a stray add_special_tokens=True show up as one extra token.
    vocab = {"[UNK]": 0, "<s>": 1, **{c: i + 2 for i, c in enumerate(sorted(set(string.printable)))}}
    inner = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    inner.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="[UNK]", bos_token="<s>",
                                  additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"])
    tok.chat_template = TEMPLATE
    return tok


def test_prompt_suffixes_are_exact():
    assert PROMPT_SUFFIXES == {
        "gsm8k": " Let's think step by step and output the final answer after \"####\".",
        "math": " Let's think step by step and output the final answer within \\boxed{}.",
        "arithmetic": " Output the final answer after \"####\".",
    }
    ex = arithmetic_problems("add1", "test")[65]
    assert prompt_text(ex, "arithmetic") == 'What is 8 + 3? Output the final answer after "####".'
    assert prompt_text(ex) == prompt_text(ex, "arithmetic")
    with pytest.raises(ConfigError, match="gsm8k, math, arithmetic"):
        prompt_text(ex, "mmlu")


def test_render_and_encode_apply_the_chat_template(tokenizer):
    ex = Example(id="gsm8k/test/0", question=GSM8K_ROWS[0]["question"], answer="7", reward="gsm8k")
    text = ex.question + PROMPT_SUFFIXES["gsm8k"]
    assert render_prompt(tokenizer, ex, "gsm8k") == f"<|user|>{text}<|end|><|assistant|>"
    ids = encode_prompt(tokenizer, ex, "gsm8k", max_prompt_tokens=4096)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[0] == "<|user|>" and tokens[-2:] == ["<|end|>", "<|assistant|>"]
    assert "".join(tokens[1:-2]) == text and len(ids) == len(text) + 3


def test_too_long_prompt_and_no_template_fallback(tokenizer):
    ex = arithmetic_problems("add1", "train")[65]
    n = len(prompt_text(ex)) + 3  # three special tokens from the template
    assert len(encode_prompt(tokenizer, ex, "arithmetic", max_prompt_tokens=n)) == n
    with pytest.raises(DataError) as info:
        encode_prompt(tokenizer, ex, "arithmetic", max_prompt_tokens=n - 1)
    for needle in ("arithmetic/add1/65", str(n), str(n - 1), "--max-prompt-tokens"):
        assert needle in str(info.value)
    tokenizer.chat_template = None
    assert render_prompt(tokenizer, ex, "arithmetic") == prompt_text(ex, "arithmetic")
    assert len(encode_prompt(tokenizer, ex, "arithmetic", max_prompt_tokens=n - 3)) == n - 3


def test_dedupe_against_normalises_whitespace():
    test = [Example(f"t/{i}", q, "1", "gsm8k") for i, q in
            enumerate(["What is  1 + 1?", "What is 2 + 2?", "what is 1 + 1?"])]
    train = [Example("t/9", " What is 1 +\n1? ", "2", "gsm8k")]
    assert [e.id for e in dedupe_against(test, train)] == ["t/1", "t/2"]
    assert dedupe_against(test, []) == test


def test_unknown_dataset_split_and_arithmetic_path(tmp_path):
    assert DATASETS == ("gsm8k", "math", "arithmetic")
    with pytest.raises(ConfigError, match="'mmlu'.*gsm8k, math, arithmetic"):
        load_dataset("mmlu", "train")
    with pytest.raises(ConfigError, match="'dev'.*train, test"):
        load_dataset("gsm8k", "dev")
    with pytest.raises(ConfigError, match="'validation'.*train, test"):
        load_dataset("arithmetic", "validation")
    with pytest.raises(ConfigError, match="add1.*add2.*mul.*addsub"):
        load_dataset("arithmetic", "train", level="hard")
    with pytest.raises(ConfigError, match="generated"):
        load_dataset("arithmetic", "train", path=tmp_path / "x.jsonl")
    assert load_dataset("arithmetic", "test", level="mul", seed=2, size=5) == \
        arithmetic_problems("mul", "test", seed=2, size=5)
