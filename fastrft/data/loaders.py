"""Reading dataset files (JSONL, compressed JSONL, JSON arrays, Parquet) into :class:`Example` lists.

Every problem with a file is reported as a :class:`~fastrft.errors.DataError` that names the file, the
line (or record / row) and the field, because a user who fed us a 50 MB JSONL file needs to know
exactly where to look.
"""

from __future__ import annotations

import gzip
import io
import json
import lzma
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from fastrft.errors import DataError
from fastrft.data.example import Example

#: File-name endings :func:`read_records` understands.
SUPPORTED_EXTENSIONS = (".jsonl", ".jsonl.gz", ".jsonl.xz", ".json", ".parquet")

_OPENERS: dict[str, Callable[[Path], Any]] = {
    ".jsonl": lambda p: open(p, "rb"),
    ".jsonl.gz": lambda p: gzip.open(p, "rb"),
    ".jsonl.xz": lambda p: lzma.open(p, "rb"),
}


def _extension(path: Path) -> str:
    name = path.name.lower()
    # Longest first so that "x.jsonl.gz" is not mistaken for something ending in ".gz" alone.
    for ext in sorted(SUPPORTED_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    raise DataError(
        f"{path}: unsupported file type; use one of {', '.join(SUPPORTED_EXTENSIONS)}"
    )


def where(path: str | os.PathLike[str], number: int) -> str:
    """Format a record's position the way the error messages of this package do.

    Args:
        path (str | os.PathLike[str]): The file the record came from.
        number (int): The 1-based number :func:`read_records` yielded with the record.

    Returns:
        str: ``"<path> line N"`` for JSONL, ``"<path> record N"`` for a JSON array,
        ``"<path> row N"`` for Parquet.
    """
    ext = _extension(Path(path))
    unit = {".json": "record", ".parquet": "row"}.get(ext, "line")
    return f"{path} {unit} {number}"


def read_records(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield the JSON-object records of a dataset file with their 1-based positions.

    The path and extension are checked immediately; records are then read lazily, so a large JSONL
    file is never held in memory as a whole. Blank JSONL lines are skipped but still counted, so the
    numbers match what an editor shows.

    Args:
        path (str | os.PathLike[str]): A ``.jsonl``, ``.jsonl.gz``, ``.jsonl.xz``, ``.json`` (one JSON
            array of objects) or ``.parquet`` file.

    Returns:
        Iterator[tuple[int, dict[str, Any]]]: ``(number, record)`` pairs; ``number`` is the line for
        JSONL, the array index + 1 for JSON and the row index + 1 for Parquet.

    Raises:
        DataError: The file is missing, has an unsupported extension, cannot be decoded, or holds
            something other than JSON objects.
    """
    p = Path(path)
    ext = _extension(p)
    if not p.is_file():
        raise DataError(f"{path}: no such file")
    if ext == ".json":
        return _read_json_array(p, str(path))
    if ext == ".parquet":
        return _read_parquet(p, str(path))
    return _read_jsonl(p, str(path), _OPENERS[ext])


def _read_jsonl(p: Path, shown: str, opener: Callable[[Path], Any]) -> Iterator[tuple[int, dict]]:
    try:
        with opener(p) as raw:
            # utf-8-sig: files saved by some Windows editors start with a BOM that json rejects.
            text = io.TextIOWrapper(raw, encoding="utf-8-sig")
            for number, line in enumerate(text, start=1):
                if not line.strip():
                    continue
                line = line.rstrip("\r\n")  # else an error at the line's end is "line 2, column 1"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    where = "the end of the line" if exc.pos >= len(line) else f"column {exc.colno}"
                    raise DataError(f"{shown} line {number}: not valid JSON ({exc.msg} at {where})") from None
                if not isinstance(record, dict):
                    raise DataError(
                        f"{shown} line {number}: not a JSON object (got {type(record).__name__})"
                    )
                yield number, record
    except (UnicodeDecodeError, OSError, EOFError, lzma.LZMAError) as exc:
        # Covers truncated or corrupt .gz/.xz streams and non-UTF-8 text; a bare traceback from
        # inside the decompressor would not tell the user which file was bad.
        raise DataError(f"{shown}: cannot read file ({exc})") from None


def _read_json_array(p: Path, shown: str) -> Iterator[tuple[int, dict]]:
    try:
        data = json.loads(p.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{shown}: cannot read file ({exc})") from None
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{shown} line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})"
        ) from None
    if not isinstance(data, list):
        raise DataError(f"{shown}: a .json dataset must be one JSON array of objects "
                        f"(got {type(data).__name__}); use .jsonl for one object per line")

    def records() -> Iterator[tuple[int, dict]]:
        for number, record in enumerate(data, start=1):
            if not isinstance(record, dict):
                raise DataError(
                    f"{shown} record {number}: not a JSON object (got {type(record).__name__})"
                )
            yield number, record

    return records()


def _read_parquet(p: Path, shown: str) -> Iterator[tuple[int, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{shown}: reading Parquet needs pyarrow; install it with pip install 'fastrft[parquet]'"
        ) from None
    try:
        table = pq.read_table(p)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{shown}: not a readable Parquet file ({exc})") from None
    return iter(enumerate(table.to_pylist(), start=1))


def split_from_path(path: str | os.PathLike[str]) -> str:
    """Infer the split name used in example ids from a file name.

    Args:
        path (str | os.PathLike[str]): A dataset file.

    Returns:
        str: ``"train"`` if the file name contains "train", else ``"test"`` if it contains "test",
        else the name without any of its extensions (``data/dev.jsonl.gz`` -> ``"dev"``).
    """
    name = Path(path).name
    lowered = name.lower()
    for split in ("train", "test"):
        if split in lowered:
            return split
    return name.split(".", 1)[0]


def _text_field(record: dict[str, Any], name: str, at: str, *, required: bool = True) -> str | None:
    if name not in record:
        if not required:
            return None
        present = ", ".join(sorted(map(str, record))) or "none"
        raise DataError(f"{at}: missing field '{name}' (fields present: {present})")
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"{at}: field '{name}' must be a string, got {type(value).__name__}")
    return value


def _question(record: dict[str, Any], name: str, at: str) -> str:
    text = _text_field(record, name, at)
    assert text is not None
    if not text.strip():
        raise DataError(f"{at}: field '{name}' is empty")
    return text


def _load(path: str | os.PathLike[str], dataset: str,
          convert: Callable[[dict[str, Any], str], tuple[str, str, dict[str, Any]]]) -> list[Example]:
    split = split_from_path(path)
    examples = []
    for number, record in read_records(path):
        question, answer, meta = convert(record, where(path, number))
        examples.append(Example(id=f"{dataset}/{split}/{len(examples)}", question=question,
                                answer=answer, reward=dataset, meta=meta))
    if not examples:
        raise DataError(f"{path}: no records (the file is empty)")
    return examples


def _gsm8k_record(record: dict[str, Any], at: str) -> tuple[str, str, dict[str, Any]]:
    question = _question(record, "question", at)
    solution = _text_field(record, "answer", at)
    assert solution is not None
    # The final answer is whatever follows the *last* marker: worked solutions never contain a
    # second one, but rpartition keeps us right if a user's file does.
    _, marker, final = solution.rpartition("####")
    if not marker or not final.strip():
        raise DataError(f"{at}: field 'answer' has no '#### <final answer>'")
    return question, final.strip(), {"solution": solution}


def _math_record(record: dict[str, Any], at: str) -> tuple[str, str, dict[str, Any]]:
    question = _question(record, "problem", at)
    answer = _text_field(record, "answer", at)
    assert answer is not None
    # An empty answer is allowed: the builtin MATH train split has two multiple-choice problems whose
    # solution boxes nothing, and dropping them would change the published row count. Such examples
    # simply never earn reward.
    meta = {}
    for name in ("level", "type"):
        value = _text_field(record, name, at, required=False)
        if value is not None:
            meta[name] = value
    return question, answer, meta


def load_gsm8k(path: str | os.PathLike[str]) -> list[Example]:
    """Load a GSM8K-format file (``question``, ``answer`` ending in ``#### <final answer>``).

    Args:
        path (str | os.PathLike[str]): Any format :func:`read_records` supports.

    Returns:
        list[Example]: One example per record, ids ``gsm8k/<split>/<0-based index>`` (split from
        :func:`split_from_path`), ``answer`` = the stripped text after the last ``####``,
        ``meta = {"solution": <the full answer field>}``, ``reward = "gsm8k"``.

    Raises:
        DataError: Unreadable file, no records, or a record with a missing, non-string or empty
            ``question``, or an ``answer`` without ``####``.
    """
    return _load(path, "gsm8k", _gsm8k_record)


def load_math(path: str | os.PathLike[str]) -> list[Example]:
    """Load a MATH-format file (``problem``, ``answer``; optional ``level`` and ``type``).

    Args:
        path (str | os.PathLike[str]): Any format :func:`read_records` supports.

    Returns:
        list[Example]: One example per record, ids ``math/<split>/<0-based index>``, ``answer`` = the
        answer field verbatim, ``meta`` holding ``level``/``type`` when present, ``reward = "math"``.

    Raises:
        DataError: Unreadable file, no records, a missing/non-string/empty ``problem``, a missing or
            non-string ``answer``, or a non-string ``level``/``type``.
    """
    return _load(path, "math", _math_record)
